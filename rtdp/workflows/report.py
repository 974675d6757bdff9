"""Human-facing outputs: summary tables, videos, evaluation plots."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def print_table(title: str, rows: Sequence[tuple[str, str]]) -> None:
    """Print a two-column table (rich when available, plain text otherwise)."""
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title, show_header=False)
        table.add_column("metric", style="bold")
        table.add_column("value")
        for k, v in rows:
            table.add_row(k, v)
        Console().print(table)
    except ImportError:
        width = max(len(k) for k, _ in rows)
        print(title)
        for k, v in rows:
            print(f"  {k:<{width}}  {v}")


def write_video(frames: Sequence[np.ndarray], path: str | Path, fps: int) -> Path:
    """Write frames as mp4 (ffmpeg) or, if that fails, as a gif next to it."""
    import imageio.v2 as imageio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = [np.asarray(f, dtype=np.uint8) for f in frames]
    try:
        imageio.mimwrite(path.with_suffix(".mp4"), frames, fps=fps, macro_block_size=1)
        return path.with_suffix(".mp4")
    except Exception:  # no ffmpeg backend: fall back to a gif, which needs nothing
        imageio.mimwrite(path.with_suffix(".gif"), frames, duration=1.0 / fps, loop=0)
        return path.with_suffix(".gif")


def plot_eval(path: str | Path, scores: Sequence[float], successes: Sequence[bool],
              latencies_ms: Sequence[float], title: str) -> Path:
    """Per-episode scores and the latency distribution, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
    colors = ["tab:green" if s else "tab:red" for s in successes]
    a.bar(np.arange(len(scores)), scores, color=colors)
    a.set_xlabel("episode (seed order)")
    a.set_ylabel("score (green: success)")
    a.set_ylim(0, 1.05)
    a.set_title(title)
    if len(latencies_ms):
        b.hist(latencies_ms, bins=30, color="tab:blue")
        b.axvline(float(np.median(latencies_ms)), color="k", ls="--", label=f"median {np.median(latencies_ms):.1f} ms")
        b.set_xlabel("ms per action chunk (batch 1)")
        b.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
