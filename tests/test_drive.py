"""The driving verbs end to end on a few scenes: collect, train, eval, bench, closed loop (report keys and sense)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

pytest.importorskip("highway_env")

from rtdp.cli import main  # noqa: E402
from rtdp.data.replay_buffer import ReplayBuffer  # noqa: E402
from rtdp.envs.highway import SCENE_KEYS  # noqa: E402
from rtdp.workflows import drive  # noqa: E402

warnings.filterwarnings("ignore", category=DeprecationWarning)

TERM_KEYS = {"scenes", "pdms", "nc", "dac", "ttc", "ep", "comfort"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A store of scenes and a tiny anchored planner trained on it for a few steps."""
    root = tmp_path_factory.mktemp("drive")
    store = root / "scenes.zarr"
    summary = drive.collect_scenes(store, 30, seed=1, progress=False)  # seed 1: merge, short episodes
    assert summary["scenes"] >= 30
    rc = main(["train", "task=highway", "policy=anchor", f"data={store}", f"out={root / 'anchor'}", "steps=3",
               "batch_size=8", "policy.d_model=32", "policy.n_heads=2", "policy.encoder_layers=1",
               "policy.decoder_layers=1", "policy.num_anchors=4", "checkpoint_every=3", "action_error_windows=4",
               "threads=1"])
    assert rc == 0
    return root, store


def test_collect_writes_one_episode_of_scenes_per_expert_episode(trained):
    _, store = trained
    buf = ReplayBuffer.open(store)
    assert set(SCENE_KEYS) <= set(buf.keys)
    for key, shape in SCENE_KEYS.items():
        assert buf.step_shape(key) == shape
    assert buf.n_episodes >= 1 and buf.n_steps >= 30


def test_collect_needs_scenes_and_names_bad_scenarios(tmp_path, capsys):
    assert main(["collect", "task=highway", f"out={tmp_path / 'x.zarr'}"]) == 2
    assert "scenes=N" in capsys.readouterr().err
    assert main(["collect", "task=highway", "scenes=5", "scenario=motorway", f"out={tmp_path / 'y.zarr'}"]) == 2
    assert "scenario must be one of" in capsys.readouterr().err


def test_eval_reports_the_pdm_score_per_scenario(trained, tmp_path, monkeypatch):
    root, _ = trained
    monkeypatch.setattr(drive, "SCENE_CACHE", tmp_path / "scenes")
    report_path = tmp_path / "eval.json"
    rc = main(["eval", "task=highway", f"checkpoint={root / 'anchor' / 'checkpoint'}", "scenes=12", "first_seed=100001",
               "latency_calls=3", "bev=1", f"out={tmp_path / 'eval'}", f"json={report_path}"])
    assert rc == 0
    report = json.loads(report_path.read_text())
    keys = {"task", "checkpoint", "nfe_per_plan", "latency_ms_p50", "latency_ms_p99", "per_scenario"} | TERM_KEYS
    assert keys <= set(report)
    assert report["scenes"] == 12 and report["nfe_per_plan"] == 2
    for value in (report[k] for k in TERM_KEYS - {"scenes"}):
        assert 0.0 <= value <= 1.0
    # PDMS is the mean over scenes, so the per-scenario means weigh back to it
    parts = report["per_scenario"].values()
    assert np.isclose(sum(p["pdms"] * p["scenes"] for p in parts) / 12, report["pdms"])
    assert (tmp_path / "eval" / "bev_000.png").is_file()
    # the expert's own future on the same (cached) scenes
    assert main(["eval", "task=highway", "expert=true", "scenes=12", "first_seed=100001", "bev=0",
                 f"json={tmp_path / 'expert.json'}"]) == 0
    expert = json.loads((tmp_path / "expert.json").read_text())
    assert expert["dac"] > 0.9 and expert["pdms"] > report["pdms"]  # a vehicle tracking it may clip a roundabout


def test_bench_rows_hold_the_contract_keys(trained, tmp_path, monkeypatch):
    root, _ = trained
    monkeypatch.setattr(drive, "SCENE_CACHE", tmp_path / "scenes")
    report = drive.bench_planners([str(root / "anchor" / "checkpoint")], configs=["anchor-1", "anchor-2"], scenes=8,
                                  first_seed=100001, calls=3, threads=1, n_candidates=4)
    assert [r["name"] for r in report["configs"]] == ["anchor:anchor-1", "anchor:anchor-2"]
    for row in report["configs"]:
        assert {"name", "nfe_per_plan", "latency_ms_p50", "latency_ms_p99", "pdms", "diversity"} <= set(row)
    assert [r["nfe_per_plan"] for r in report["configs"]] == [1, 2]


def test_diversity_is_the_mean_pairwise_final_distance_of_the_top_k():
    cands = np.zeros((1, 4, 8, 2))
    cands[0, 1, -1] = [3.0, 4.0]  # 5 m from the first's end
    cands[0, 2, -1] = [0.0, 10.0]  # 10 m from the first, sqrt(9 + 36) from the second
    cands[0, 3, -1] = [100.0, 0.0]  # far away, but ranked last
    pair = [5.0, 10.0, np.sqrt(45.0)]
    assert np.isclose(drive.diversity(cands, np.array([[3.0, 2.0, 1.0, 0.0]]), k=3), np.mean(pair))
    assert np.isclose(drive.diversity(cands[:, :3], None, k=5), np.mean(pair))  # unranked: the first k
    assert drive.diversity(cands[:, :1]) == 0.0 and drive.diversity(None) == 0.0


def test_closed_loop_expert_and_planner_report(trained):
    root, _ = trained
    planner = drive.load_planner(root / "anchor" / "checkpoint")
    expert = drive.drive_closed_loop(None, "merge", [100001], progress=False)
    assert expert["episodes"] == 1 and expert["collision_rate"] == 0.0 and expert["progress_m"] > 100
    res = drive.drive_closed_loop(planner, "merge", [100001], progress=False)
    assert res["episodes"] == 1 and res["plan_ms_p50"] > 0
    assert 0.0 <= res["collision_rate"] + res["offroad_rate"] <= 1.0


def test_a_pusht_checkpoint_is_not_a_planner():
    from rtdp.errors import ConfigError

    with pytest.raises(ConfigError, match="not a driving planner"):
        drive.load_planner("rtdp/assets/checkpoints/pusht/checkpoint")


def test_the_shipped_planner_plans_near_the_expert_in_two_calls():
    from rtdp.envs.highway import HighwayEnv, expert_episode

    planner = drive.load_planner("rtdp/assets/checkpoints/highway/checkpoint")
    assert tuple(planner.anchor_trajectories().shape) == (20, 8, 2)
    scenes = expert_episode(HighwayEnv("highway"), 100000)[:6]
    batch = {k: np.stack([s[k] for s in scenes]) for k in scenes[0]}
    planned = drive.plan_scenes(planner, batch, steps=None)
    assert planned["nfe"] == 2 and planned["candidates"].shape == (6, 20, 8, 2)
    ade = np.linalg.norm(planned["plans"] - batch["action"], axis=-1).mean()
    assert ade < 4.0, ade  # metres over the 4 s; a plan that ignored the scene would miss by tens of metres


def test_action_policy_keys_are_refused_not_ignored(capsys):
    assert main(["eval", "task=highway", "expert=true", "precision=int8"]) == 2
    assert "action policies" in capsys.readouterr().err
    assert main(["bench", "task=highway", "checkpoint=rtdp/assets/checkpoints/highway/checkpoint", "episodes=5"]) == 2
    assert "scenes=N" in capsys.readouterr().err
