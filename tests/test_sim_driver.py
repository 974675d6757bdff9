"""The sim driver (an environment in its own process on the wall clock) and `rtdp control` end to end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from rtdp.controllers.drivers.sim import SimDriver
from rtdp.errors import ActionError, ConfigError, DeviceNotConnectedError, UnknownNameError

REPO = Path(__file__).resolve().parents[1]
CKPT = REPO / "rtdp/assets/checkpoints/pusht_edm/checkpoint"


def test_sim_driver_serves_the_environment_it_names():
    from rtdp.envs import make

    env = make("pusht")
    ref, _ = env.reset(seed=100003)
    env.close()
    with SimDriver("pusht") as robot:
        first = robot.reset(100003)
        for k in ref:
            np.testing.assert_array_equal(first.obs[k], ref[k])  # same seed, same first observation
        # before the first command the simulator applies the task's held action: the pusher stays put
        t_end = time.monotonic() + 0.35
        while time.monotonic() < t_end:
            time.sleep(0.05)
        idle = robot.read()
        assert idle.info["step"] >= 2
        np.testing.assert_allclose(idle.obs["agent_pos"], first.obs["agent_pos"], atol=1e-6)
        target = first.obs["agent_pos"] + np.array([40.0, 0.0])
        t_end = time.monotonic() + 1.0
        seen = [first]
        while time.monotonic() < t_end:
            robot.write(target)
            r = robot.read()
            if r.t != seen[-1].t:
                seen.append(r)
            time.sleep(0.02)
        steps = [r.info["step"] for r in seen]
        assert steps == sorted(steps) and steps[-1] >= 3  # it advanced on its own clock
        assert np.all(np.diff([r.t for r in seen]) > 0)
        # the agent moved towards the commanded target
        assert seen[-1].obs["agent_pos"][0] - first.obs["agent_pos"][0] > 10.0
        with pytest.raises(ActionError):
            robot.write(np.array([np.nan, 1.0]))
        lim = robot.limits
        assert lim.low.tolist() == [0.0, 0.0] and lim.high.tolist() == [512.0, 512.0]
        proc = robot._proc
    assert not proc.is_alive()  # closed with the context


def test_sim_driver_needs_connect():
    with pytest.raises(DeviceNotConnectedError):
        SimDriver("pusht").read()


def test_sim_driver_takes_rate_and_hold_from_the_task_spec(monkeypatch):
    from rtdp.envs import TASKS, TaskSpec

    with pytest.raises(TypeError):
        SimDriver()  # the task is required: no silent PushT
    assert SimDriver("pusht").rate_hz == 10.0 and SimDriver("lift").rate_hz == 20.0
    assert SimDriver("lift", rate_hz=5).rate_hz == 5.0
    monkeypatch.setitem(TASKS, "fast", TaskSpec(name="fast", env_id="rtdp/PushT-v0", control_rate_hz=25.0,
                                                hold_action="rtdp.envs.pusht:hold_action"))
    assert SimDriver("fast").rate_hz == 25.0
    monkeypatch.setitem(TASKS, "limp", TaskSpec(name="limp", env_id="rtdp/PushT-v0"))
    with pytest.raises(ConfigError, match="no hold_action"):
        SimDriver("limp")
    with pytest.raises(ConfigError, match="rate_hz"):
        SimDriver("pusht", rate_hz=0)


def _control_cfg(**over):
    from rtdp.cli import compose

    return compose("control", [f"{k}={v}" for k, v in over.items()])


def _cpus() -> list[int]:
    import os

    return sorted(os.sched_getaffinity(0))


def test_rtdp_control_on_the_sim_driver_writes_the_report(tmp_path):
    from rtdp.workflows.control import run_control

    cfg = _control_cfg(checkpoint=str(CKPT), episodes=1, duration_s=3, out=str(tmp_path), worker="thread",
                       threads=1, live="false", json=str(tmp_path / "c.json"))
    report = run_control(cfg)
    on_disk = json.loads((tmp_path / "c.json").read_text())
    for key in ("driver", "rate_hz", "duration_s", "cycles", "deadline_misses", "period_error_ms_p50",
                "period_error_ms_p99", "period_error_ms_max", "idle_fraction", "inference_ms_p50",
                "inference_ms_p99", "dropped_actions", "safety_events", "episodes", "success_rate"):
        assert key in on_disk, key
    assert report["driver"] == "sim" and report["rate_hz"] == 10.0 and report["episodes"] == 1
    assert 25 <= report["cycles"] <= 31  # 3 s at 10 Hz, the loop's own count
    assert report["chunks"] >= 3 and report["per_episode"][0]["cycles"] == report["cycles"]
    assert (tmp_path / "timing.png").stat().st_size > 0


@pytest.mark.parametrize("over,match", [
    ({"driver": "ufo"}, "unknown driver"),
    ({"seam": "blend"}, "unknown seam"),
    ({"size": "dp_lowdim"}, "not both"),
])
def test_rtdp_control_rejects_bad_configurations(tmp_path, over, match):
    from rtdp.workflows.control import run_control

    before = _cpus()
    with pytest.raises((ConfigError, UnknownNameError), match=match):
        run_control(_control_cfg(checkpoint=str(CKPT), out=str(tmp_path), **over))
    assert _cpus() == before  # a run that fails to start leaves this process's CPUs as they were


@pytest.mark.parametrize("over,match", [
    ({"worker_cpus": "[4096]"}, "subset of this process's CPUs"),
    ({"worker": "thread", "worker_cpus": "[0]"}, "needs worker=process"),
    ({"worker_cpus": "[a]"}, "list of CPU numbers"),
])
def test_rtdp_control_rejects_bad_worker_cpus(tmp_path, over, match):
    from rtdp.workflows.control import run_control

    with pytest.raises(ConfigError, match=match):
        run_control(_control_cfg(checkpoint=str(CKPT), out=str(tmp_path), **over))


@pytest.mark.skipif(len(_cpus()) < 2, reason="pinning needs two CPUs")
def test_worker_cpus_pin_the_worker_and_leave_the_loop_the_rest(tmp_path):
    from rtdp.workflows.control import run_control

    before = _cpus()
    every = "[" + ",".join(map(str, before)) + "]"
    with pytest.raises(ConfigError, match="no CPU for the control loop"):
        run_control(_control_cfg(checkpoint=str(CKPT), out=str(tmp_path), worker_cpus=every, threads=1))
    with pytest.raises(ConfigError, match="exceeds"):
        run_control(_control_cfg(checkpoint=str(CKPT), out=str(tmp_path), worker_cpus=f"[{before[-1]}]", threads=2))
    # the default (auto): the worker on every CPU but the first, the loop (and the simulator) on the first
    report = run_control(_control_cfg(checkpoint=str(CKPT), episodes=1, duration_s=1.5, out=str(tmp_path),
                                      live="false", threads=4))
    assert report["worker_cpus"] == before[1:] and report["loop_cpus"] == before[:1]
    assert report["threads"] == len(before) - 1  # capped to the worker's CPUs
    assert _cpus() == before  # restored when the run ends


def test_rtdp_control_needs_a_policy(tmp_path):
    from rtdp.workflows.control import run_control

    with pytest.raises(ConfigError, match="checkpoint"):
        run_control(_control_cfg(out=str(tmp_path)))


def test_sigint_during_motion_stops_the_sim_and_exits_130(tmp_path):
    cmd = [sys.executable, "-m", "rtdp.cli", "control", f"checkpoint={CKPT}", "episodes=1", "duration_s=60",
           f"out={tmp_path}", "worker=thread", "threads=1", "live=false"]
    # started with SIGINT ignored, as a shell starts a background job: the run must stop on it all the same
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        line = ""
        t_end = time.monotonic() + 120
        while "starting the inference worker" not in line and time.monotonic() < t_end:
            line = proc.stderr.readline()
        time.sleep(3.0)  # in motion
        children = _children(proc.pid)
        assert children, "the sim driver should run the environment in a child process"
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = proc.stderr.read()
    assert rc == 130, err
    assert "interrupted" in err
    # the simulator process was closed with the driver: none of the children is left behind
    # (multiprocessing's resource tracker leaves a moment after its parent)
    t_end = time.monotonic() + 10
    while [p for p in children if Path(f"/proc/{p}").exists()] and time.monotonic() < t_end:
        time.sleep(0.1)
    assert not [p for p in children if Path(f"/proc/{p}").exists()]


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if f"PPid:\t{pid}\n" in (d / "status").read_text():
                    out.append(int(d.name))
            except OSError:
                pass
    return out
