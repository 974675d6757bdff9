"""`rtdp demo` end to end on the shipped PushT checkpoints, its rows checked against `rtdp eval` on the same seeds."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from rtdp.cli import main
from rtdp.envs import get_task
from rtdp.errors import CheckpointError, ConfigError
from rtdp.workflows.demo import ASSETS, _fast_policies, parse_shipped
from rtdp.workflows.eval import evaluate
from rtdp.workflows.metrics import paired_comparison

EPISODES = 2


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    code = main(["demo", f"out={out}", f"episodes={EPISODES}", "sampler=ddim", "steps=10", "latency_calls=3",
                 "threads=1", "fast=[pusht_edm/stream-1,pusht_cm/cm-1]", "control=pusht_edm/edm-3",
                 "control_duration_s=3"])
    assert code == 0
    return out, json.loads((out / "report.json").read_text())


def test_demo_report_has_the_eval_keys_and_the_expert(demo_run) -> None:
    out, report = demo_run
    for key in ("task", "checkpoint", "sampler", "steps", "episodes", "success_rate", "success_ci95", "mean_score",
                "nfe_per_chunk", "latency_ms_p50", "latency_ms_p99", "ms_per_action", "expert_success_rate"):
        assert key in report, key
    assert (report["task"], report["sampler"], report["steps"], report["episodes"]) == ("pusht", "ddim", 10, EPISODES)
    assert report["expert_success_rate"] == 1.0  # the scripted expert solves PushT's first evaluation seeds
    assert (out / "checkpoint" / "model.safetensors").exists() and (out / "eval.png").exists()
    assert list(out.glob("rollout_pusht_seed*.mp4"))


def test_demo_rows_are_what_rtdp_eval_gives_on_the_same_seeds(demo_run, tmp_path) -> None:
    _, report = demo_run
    rows = report["policies"]
    assert [r["name"] for r in rows] == ["pusht ddim-10", "pusht_edm stream-1", "pusht_cm cm-1"]
    assert [r["nfe_per_chunk"] for r in rows] == [10, 1, 1]
    reference = rows[0]
    assert reference["success_rate"] == report["success_rate"] and reference["speedup_per_action"] == 1.0
    seeds = get_task("pusht").seeds(EPISODES)
    ddim = evaluate(report["checkpoint"], episodes=EPISODES, sampler="ddim", steps=10, video=False, latency_calls=1,
                    threads=1, out=tmp_path / "ddim")
    for row, asset in zip(rows[1:], ("pusht_edm", "pusht_cm")):
        again = evaluate(ASSETS / asset / "checkpoint", episodes=EPISODES, sampler=row["sampler"], steps=row["steps"],
                         video=False, latency_calls=1, threads=1, out=tmp_path / asset)
        assert [e["seed"] for e in again["per_episode"]] == seeds
        assert row["success_rate"] == again["success_rate"]
        assert row["mean_score"] == pytest.approx(again["mean_score"], abs=1e-9)
        cmp = paired_comparison([e["success"] for e in ddim["per_episode"]],
                                [e["success"] for e in again["per_episode"]])
        assert (row["paired_only_reference"], row["paired_only_this"]) == (cmp["only_reference"], cmp["only_other"])
        # the speed-up is the reference's time per action over this one's, both measured in the demo's run
        assert row["speedup_per_action"] == pytest.approx(reference["ms_per_action"] / row["ms_per_action"])


def test_demo_runs_a_real_time_control_segment(demo_run) -> None:
    out, report = demo_run
    c = report["control"]
    assert c["policy"] == "pusht_edm edm-3" and c["episodes"] == 1
    # 3 s at the task's rate, cycle by cycle; misses are counted, not hidden
    assert c["rate_hz"] == get_task("pusht").control_rate_hz
    assert abs(c["cycles"] - c["rate_hz"] * 3.0) <= 2
    assert c["inference_ms_p50"] is not None and c["inference_ms_p50"] < c["chunk_ms"]
    saved = json.loads((out / "control" / "report.json").read_text())
    assert saved["cycles"] == c["cycles"] and saved["deadline_misses"] == c["deadline_misses"]


def test_demo_entries_are_checked_before_anything_runs() -> None:
    assert parse_shipped("pusht_edm/edm-3") == ("pusht_edm", "edm", 3)
    with pytest.raises(ConfigError, match="<checkpoint>/<sampler>-<steps>"):
        parse_shipped("edm-3")
    with pytest.raises(ConfigError, match="rtdp bench"):
        parse_shipped("pusht/ddpm-100+deepcache3")
    with pytest.raises(CheckpointError, match="shipped: .*pusht_edm"):
        _fast_policies(SimpleNamespace(fast=["nosuch/edm-3"]), "pusht")
    # a shipped policy of another task is skipped, not run on the wrong observations
    assert _fast_policies(SimpleNamespace(fast=["pusht_edm/edm-3"]), "lift") == []
