"""Every verb that only reads a checkpoint writes under the working directory, never into the package."""

from __future__ import annotations

import json
from pathlib import Path

from rtdp.cli import main

PACKAGE = Path(__file__).resolve().parents[1] / "rtdp"
SHIPPED = PACKAGE / "assets" / "checkpoints" / "pusht" / "checkpoint"


def _package_files() -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(PACKAGE)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in PACKAGE.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def test_eval_bench_and_control_of_a_shipped_checkpoint_leave_the_package_as_it_was(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    before = _package_files()
    assert main(["eval", f"checkpoint={SHIPPED}", "episodes=1", "sampler=ddim", "steps=2", "latency_calls=2",
                 "threads=1"]) == 0
    assert main(["bench", f"checkpoint={SHIPPED}", "configs=[ddim-2,ddim-2+deepcache2]", "calls=2", "warmup=1",
                 "episodes=1", "threads=1", "json=bench.json"]) == 0
    assert main(["control", f"checkpoint={SHIPPED}", "sampler=ddim", "steps=2", "episodes=1", "duration_s=1",
                 "live=false", "threads=1"]) == 0
    assert _package_files() == before
    # and each wrote where it says: the working directory's outputs/
    assert (tmp_path / "outputs/eval/pusht/eval.png").exists()
    assert json.loads((tmp_path / "bench.json").read_text())["configs"][0]["name"] == "ddim-2"
    assert (tmp_path / "outputs/control/report.json").exists()
