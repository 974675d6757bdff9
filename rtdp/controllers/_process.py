"""Stopping a helper process (simulator, inference worker) on every exit path."""

from __future__ import annotations


def stop_process(conn, proc, goodbye: tuple, timeout_s: float = 5.0) -> None:
    """Ask ``proc`` to exit with ``goodbye`` on ``conn``; terminate it if it does not. Never raises."""
    try:
        conn.send(goodbye)
    except (BrokenPipeError, OSError, ValueError):
        pass  # already gone: join below returns at once
    proc.join(timeout=timeout_s)
    if proc.is_alive():
        proc.terminate()
        proc.join(timeout=timeout_s)
    conn.close()
