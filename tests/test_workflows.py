"""collect and eval end to end on PushT, checked against the simulator and DESIGN.md's report keys."""

from __future__ import annotations

import importlib.util
import json
import multiprocessing as mp
import os
import queue
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from rtdp.cli import compose, main
from rtdp.data.replay_buffer import ReplayBuffer
from rtdp.envs import get_task, make
from rtdp.workflows.collect import CollectError, _gather, _worker, collect
from rtdp.workflows.metrics import wilson_interval
from rtdp.workflows.rollout import EpisodeResult, rollout_expert

CHECKPOINTS = Path(__file__).resolve().parents[1] / "rtdp/assets/checkpoints"

EVAL_KEYS = {"task", "checkpoint", "sampler", "steps", "episodes", "success_rate", "success_ci95", "mean_score",
             "nfe_per_chunk", "latency_ms_p50", "latency_ms_p99", "ms_per_action"}


def test_collected_demonstrations_replay_in_the_simulator(tmp_path) -> None:
    store = tmp_path / "demos.zarr"
    summary = collect("pusht", 2, store, seed=7, progress=False)
    buf = ReplayBuffer.open(store)
    assert summary["store_episodes"] == buf.n_episodes == 2
    assert {"action", "agent_pos", "keypoint", "state"} <= set(buf.keys)
    # replaying the recorded actions from the same seed reproduces the recorded observations
    env = make("pusht")
    for i in range(2):
        ep = buf.get_episode(i)
        obs, _ = env.reset(seed=7 + i)
        for t in range(len(ep["action"])):
            np.testing.assert_allclose(obs["state"], ep["state"][t], atol=1e-4)
            obs, _, terminated, _, info = env.step(ep["action"][t])
        assert info["is_success"] and terminated, "a kept demonstration must end in success"
    env.close()


def test_collect_appends_to_an_existing_store(tmp_path) -> None:
    store = tmp_path / "demos.zarr"
    collect("pusht", 1, store, seed=0, progress=False)
    summary = collect("pusht", 1, store, seed=1, progress=False)
    assert summary["store_episodes"] == 2


def _episodes(store) -> list[dict[str, np.ndarray]]:
    buf = ReplayBuffer.open(store)
    return [buf.get_episode(i) for i in range(buf.n_episodes)]


def _assert_same_episodes(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for ep_a, ep_b in zip(a, b):
        assert ep_a.keys() == ep_b.keys()
        for k in ep_a:
            np.testing.assert_array_equal(ep_a[k], ep_b[k], err_msg=k)


def test_collect_with_two_workers_writes_the_store_one_worker_writes(tmp_path) -> None:
    one = collect("pusht", 3, tmp_path / "one.zarr", seed=4, progress=False)
    two = collect("pusht", 3, tmp_path / "two.zarr", seed=4, workers=2, progress=False)
    # shards of 2 and 1 seeds, written in seed order whatever order they arrive in
    _assert_same_episodes(_episodes(tmp_path / "two.zarr"), _episodes(tmp_path / "one.zarr"))
    for key in ("attempted", "expert_success_rate", "expert_mean_score", "mean_length", "store_episodes", "store_steps"):
        assert two[key] == one[key], key
    assert not mp.active_children()  # the workers have exited


def test_collect_workers_find_a_task_registered_outside_rtdp(tmp_path) -> None:
    import tests.test_toy_family  # noqa: F401  registers test_reach, which a spawned worker must import too

    collect("test_reach", 3, tmp_path / "one.zarr", seed=0, keep_failed=True, progress=False)
    collect("test_reach", 3, tmp_path / "two.zarr", seed=0, keep_failed=True, workers=2, progress=False)
    _assert_same_episodes(_episodes(tmp_path / "two.zarr"), _episodes(tmp_path / "one.zarr"))


def test_a_collect_worker_that_dies_is_a_collect_error_and_written_episodes_stay(tmp_path) -> None:
    store = tmp_path / "demos.zarr"
    collect("pusht", 1, store, seed=0, progress=False)
    before = _episodes(store)

    def kill_worker_1() -> None:
        t_end = time.monotonic() + 60
        while time.monotonic() < t_end:
            for p in mp.active_children():
                if p.name == "rtdp-collect-1" and p.pid is not None:
                    os.kill(p.pid, signal.SIGKILL)
                    return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_worker_1, daemon=True)
    killer.start()
    t0 = time.monotonic()
    with pytest.raises(CollectError, match=r"worker 1 died \(exit code -9\).*continue with seed=") as info:
        collect("pusht", 4, store, seed=1, workers=2, progress=False)
    killer.join(timeout=5)
    assert time.monotonic() - t0 < 60  # an error, not a wait that never ends
    assert "2, 4" in str(info.value)  # worker 1's seeds
    after = _episodes(store)
    # the store is readable, keeps what it held, and whatever of the new run was written is seed 1 alone
    # (seed 2 belongs to the dead worker, so nothing past it can be written in order)
    _assert_same_episodes(after[:1], before)
    assert len(after) <= 2
    if len(after) == 2:
        collect("pusht", 1, tmp_path / "ref.zarr", seed=1, progress=False)
        _assert_same_episodes(after[1:], _episodes(tmp_path / "ref.zarr"))
    assert not mp.active_children()  # the surviving worker was stopped too


class _Proc:
    def __init__(self, exitcode):
        self.exitcode = exitcode


def test_gather_turns_worker_failures_and_stalls_into_collect_errors() -> None:
    ep = {"action": np.zeros((1, 2))}
    got = []

    def filled(*items):
        q = queue.Queue()
        for item in items:
            q.put(item)
        return q

    # a worker that reports an exception
    sent = []
    _worker("no_such_task", [5], type("Q", (), {"put": staticmethod(sent.append)})(), 1)
    assert sent[0][:2] == ("error", 1) and "UnknownNameError" in sent[0][2]
    with pytest.raises(CollectError, match="worker 1 \\(seeds 5\\) failed: UnknownNameError"):
        _gather(filled(*sent), 4, [_Proc(None), _Proc(None)], [[4], [5]], lambda *a: got.append(a),
                stall_timeout_s=30)
    # a worker that exits cleanly without sending its episodes; the other's episode is handed on first
    with pytest.raises(CollectError, match="worker 1 ended before sending the episodes of seeds 5"):
        _gather(filled((EpisodeResult(4, True, 1.0, 1), ep)), 4, [_Proc(0), _Proc(0)], [[4], [5]],
                lambda *a: got.append(a), stall_timeout_s=30)
    assert [r.seed for r, _ in got] == [4]
    # a worker that is alive but sends nothing
    t0 = time.monotonic()
    with pytest.raises(CollectError, match="no episode from the collection workers for 1 s"):
        _gather(filled(), 4, [_Proc(None)], [[4]], lambda *a: None, stall_timeout_s=1.0)
    assert time.monotonic() - t0 < 5
    # an episode sent just before the worker exited still counts
    done = []
    _gather(filled((EpisodeResult(4, True, 1.0, 1), ep)), 4, [_Proc(0)], [[4]], lambda *a: done.append(a),
            stall_timeout_s=30)
    assert [r.seed for r, _ in done] == [4]


def _check_report(report: dict, task: str, episodes: int) -> None:
    assert EVAL_KEYS <= set(report)
    assert report["task"] == task and report["episodes"] == episodes == len(report["per_episode"])
    assert [e["seed"] for e in report["per_episode"]] == get_task(task).seeds(episodes)
    for e in report["per_episode"]:
        assert isinstance(e["success"], bool) and 0.0 <= e["score"] <= 1.0
        assert e["success"] == (e["score"] == 1.0)  # both tasks score 1 exactly when they succeed
    wins = sum(e["success"] for e in report["per_episode"])
    assert report["success_rate"] == pytest.approx(wins / episodes)
    assert report["success_ci95"] == pytest.approx(list(wilson_interval(wins, episodes)))
    assert report["mean_score"] == pytest.approx(np.mean([e["score"] for e in report["per_episode"]]))


def test_eval_of_the_expert_matches_its_own_rollout(tmp_path) -> None:
    report_path = tmp_path / "expert.json"
    assert main(["eval", "expert=true", "task=pusht", "episodes=2", f"out={tmp_path / 'out'}",
                 f"json={report_path}"]) == 0
    report = json.loads(report_path.read_text())
    _check_report(report, "pusht", 2)
    # the same two episodes, rolled out directly
    task = get_task("pusht")
    reference = rollout_expert(task, task.seeds(2), progress=False).episodes
    assert [(e["seed"], e["success"], e["score"]) for e in report["per_episode"]] == \
        [(r.seed, r.success, pytest.approx(r.score)) for r in reference]
    assert Path(report["video"]).stat().st_size > 0 and Path(report["video"]).parent == tmp_path / "out"


@pytest.mark.parametrize("name,task,episodes", [("pusht_dp", "pusht", 2), ("lift", "lift", 1)])
def test_eval_of_a_shipped_checkpoint(tmp_path, name, task, episodes) -> None:
    if task == "lift" and importlib.util.find_spec("robosuite") is None:
        pytest.skip("evaluating the Lift checkpoint needs robosuite: pip install 'rtdp[sim]'")
    ckpt = CHECKPOINTS / name / "checkpoint"
    report_path = tmp_path / "eval.json"
    assert main(["eval", f"checkpoint={ckpt}", f"episodes={episodes}", "sampler=ddim", "steps=10", "video=false",
                 "latency_calls=3", "threads=1", f"out={tmp_path / 'out'}", f"json={report_path}"]) == 0
    report = json.loads(report_path.read_text())
    _check_report(report, task, episodes)
    assert (report["sampler"], report["steps"], report["nfe_per_chunk"]) == ("ddim", 10, 10)
    assert Path(report["checkpoint"]).resolve() == ckpt.resolve()
    assert (tmp_path / "out").is_dir()  # outputs went where asked, not beside the shipped checkpoint


def test_eval_writes_the_report_contract(tmp_path, monkeypatch) -> None:
    from tests.test_train import TINY, _store
    from rtdp.workflows.train import train

    monkeypatch.chdir(tmp_path)  # default outputs land under the working directory
    train(compose("train", [f"data={_store(tmp_path / 'd.zarr')}", f"out={tmp_path / 'run'}", *TINY]))
    report_path = tmp_path / "eval.json"
    code = main(["eval", f"checkpoint={tmp_path / 'run/checkpoint'}", "episodes=2", "sampler=ddim", "steps=2",
                 "latency_calls=3", "threads=1", f"json={report_path}"])
    assert code == 0
    report = json.loads(report_path.read_text())
    assert EVAL_KEYS <= set(report)
    assert report["episodes"] == 2 and report["nfe_per_chunk"] == 2 and report["steps"] == 2
    assert report["success_ci95"][0] <= report["success_rate"] <= report["success_ci95"][1]
    assert report["ms_per_action"] == pytest.approx(report["latency_ms_p50"] / 8)
    assert report["mean_score"] == pytest.approx(np.mean([e["score"] for e in report["per_episode"]]))
    assert report["video"] and (tmp_path / "outputs/eval/run").is_dir()
    assert not (tmp_path / "run/eval").exists()  # nothing written beside the checkpoint it read


def test_eval_with_an_unknown_sampler_fails_cleanly(tmp_path, capsys) -> None:
    from tests.test_train import TINY, _store
    from rtdp.workflows.train import train

    train(compose("train", [f"data={_store(tmp_path / 'd.zarr')}", f"out={tmp_path / 'run'}", *TINY]))
    assert main(["eval", f"checkpoint={tmp_path / 'run/checkpoint'}", "episodes=1", "sampler=dpm9"]) == 2
    err = capsys.readouterr().err
    assert "unknown sampler 'dpm9'" in err and "ddim" in err
