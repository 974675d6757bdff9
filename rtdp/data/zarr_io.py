"""zarr-level helpers of the replay buffer: the codec, what a folder holds, and reads that fail cleanly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def settle_reads(timeout_s: float = 10.0) -> None:
    """Wait for the chunk reads still in flight on zarr's event loop.

    zarr reads an array's chunks concurrently and a failed read raises while
    the others are still running; left so, they die at interpreter exit as
    "Task was destroyed but it is pending!" tracebacks under the one-line error.
    Waiting for them (their errors are collected by the gather that started
    them) leaves that line alone on the screen.
    """
    import asyncio

    from zarr.core.sync import sync

    async def settle() -> None:
        pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        if pending:
            await asyncio.wait(pending, timeout=timeout_s)

    try:
        sync(settle())
    except Exception:  # best effort: the store's own error is what gets raised
        pass


def describe_error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def compressor(zarr_format: int) -> Any:
    # Diffusion Policy's choice: Blosc zstd level 5 with bit-shuffle.
    if zarr_format == 2:
        from numcodecs import Blosc

        return Blosc(cname="zstd", clevel=5, shuffle=Blosc.BITSHUFFLE)
    from zarr.codecs import BloscCodec

    return BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle")


def node_kind(folder: Path, zarr_format: int) -> str | None:
    """``"group"``, ``"array"`` or None, from the metadata files in ``folder``."""
    if zarr_format == 2:
        if (folder / ".zarray").is_file():
            return "array"
        if (folder / ".zgroup").is_file():
            return "group"
        return None
    meta = folder / "zarr.json"
    if not meta.is_file():
        return None
    try:
        kind = json.loads(meta.read_bytes()).get("node_type")
    except (ValueError, AttributeError):
        return "unreadable"
    return kind if kind in ("group", "array") else "unreadable"


def looks_like_zarr(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in ("zarr.json", ".zgroup", ".zarray"))
