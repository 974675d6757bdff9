"""The control stack on a Dynamixel bus: policy -> scheduler -> safety layer -> driver -> emulated servos.

The bus emulator speaks Protocol 2.0 on a pseudo-terminal and logs every
packet, so these tests check what actually reached the bus.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("dynamixel_sdk")

from rtdp.controllers.clock import MonotonicClock  # noqa: E402
from rtdp.controllers.controller import Controller  # noqa: E402
from rtdp.controllers.drivers.dynamixel import DynamixelDriver, write_calibration  # noqa: E402
from rtdp.controllers.emulator.dynamixel import DynamixelBusEmulator  # noqa: E402
from rtdp.controllers.workers import InlineWorker  # noqa: E402
from rtdp.controllers.loop import RateLoop  # noqa: E402

IDS = [1, 2, 3]
GOAL_POSITION = 116
TICK = 2 * np.pi / 4096
CAL = {f"joint_{i}": {"id": i, "drive_mode": 0, "homing_offset": 0, "range_min": 1024, "range_max": 3072}
       for i in IDS}


def _goal_writes(emu) -> list[dict[int, int]]:
    return [p.values(GOAL_POSITION, 4) for p in emu.log if p.values(GOAL_POSITION, 4)]


def test_bad_actions_never_reach_the_bus():
    """NaN, out-of-range and wrong-shape policy outputs: the bus sees only in-range goals."""
    good = np.array([0.3, -0.2, 0.1])

    requests = []

    def policy(obs, t_obs, inpaint):
        requests.append(t_obs)
        n = len(requests) % 4  # good, NaN, out of range, wrong shape, good, ...
        a = np.tile(good, (8, 1))
        if n == 1:
            a[2:6, 0] = np.nan
        elif n == 2:
            a[:, 1] = 50.0  # far outside the calibrated range (+-pi/2)
        elif n == 3:
            return np.zeros((8, 5))  # wrong action size
        return a

    with DynamixelBusEmulator({i: "xl330-m288" for i in IDS}) as emu:
        port = emu.port
        with DynamixelDriver(port, IDS, "xl330-m288", CAL, period_s=0.02) as robot:
            clock = MonotonicClock()
            worker = InlineWorker(policy, clock, 0.005, 8)
            ctl = Controller(robot, worker, RateLoop(50.0, clock), obs_keys=("joint_pos",), n_obs_steps=2,
                             watchdog_s=1.0)
            ctl.run_episode(duration_s=2.0)
            n_sent = len(_goal_writes(emu))
        writes = _goal_writes(emu)
        assert n_sent > 20
        events = ctl.safety.counts()
        assert events["rejected_nonfinite"] > 0 and events["rejected_shape"] > 0 and events["clipped"] > 0
        lo, hi = 1024, 3072
        for w in writes:  # single-servo writes at connect (goal := present) and the loop's sync writes
            assert all(lo <= v <= hi for v in w.values()), w
        sync = [p.values(GOAL_POSITION, 4) for p in emu.log if p.instruction == 0x83 and p.values(GOAL_POSITION, 4)]
        assert sync and all(set(w) == set(IDS) for w in sync)
        # the good action did get through (after the rate limiter walked the joints there)
        good_ticks = {i: int(round(g / TICK)) + 2048 for i, g in zip(IDS, good)}
        assert any(all(abs(w[i] - good_ticks[i]) <= 1 for i in IDS) for w in sync)


def _start_control(port: str, cal_path, out, duration: float = 60.0):
    cmd = [sys.executable, "-m", "rtdp.cli", "control", "size=small", "driver=dynamixel", f"port={port}",
           f"motors=[{','.join(map(str, IDS))}]", f"calibration={cal_path}", f"duration_s={duration}",
           f"out={out}", "worker=thread", "threads=1", "live=false", "sampler=ddim", "steps=5"]
    # started with SIGINT ignored, as a shell starts a background job: the run must stop on it all the same
    return subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))


def _wait_for_motion(proc, emu, timeout: float = 120.0) -> None:
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        if proc.poll() is not None:
            pytest.fail(f"rtdp control exited early: {proc.stderr.read()}")
        if len(_goal_writes(emu)) > 30:
            return
        time.sleep(0.1)
    pytest.fail("no goal positions reached the bus")


def test_sigint_during_motion_stops_the_robot_and_closes_the_port(tmp_path):
    cal = write_calibration(tmp_path / "cal.json", CAL)
    with DynamixelBusEmulator({i: "xl330-m288" for i in IDS}) as emu:
        port = emu.port
        proc = _start_control(port, cal, tmp_path)
        try:
            _wait_for_motion(proc, emu)
            assert all(emu.motor(i).value("torque_enable") == 1 for i in IDS)
            proc.send_signal(signal.SIGINT)
            rc = proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
        err = proc.stderr.read()
        assert rc == 130, err
        assert all(emu.motor(i).value("torque_enable") == 0 for i in IDS), "torque must be off after SIGINT"
        # the last goal sent holds position (stop) and nothing was written after torque-off
        t_off = max(p.t for p in emu.log if p.values(64, 1) and set(p.values(64, 1).values()) == {0})
        assert not [p for p in emu.log if p.values(GOAL_POSITION, 4) and p.t > t_off]


def test_sigterm_stops_the_robot_too(tmp_path):
    cal = write_calibration(tmp_path / "cal.json", CAL)
    with DynamixelBusEmulator({i: "xl330-m288" for i in IDS}) as emu:
        proc = _start_control(emu.port, cal, tmp_path)
        try:
            _wait_for_motion(proc, emu)
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
        err = proc.stderr.read()
        assert rc == 2 and "SIGTERM" in err, err
        assert all(emu.motor(i).value("torque_enable") == 0 for i in IDS)


def test_a_closed_port_mid_motion_exits_nonzero_with_a_clear_message(tmp_path):
    cal = write_calibration(tmp_path / "cal.json", CAL)
    with DynamixelBusEmulator({i: "xl330-m288" for i in IDS}) as emu:
        proc = _start_control(emu.port, cal, tmp_path)
        try:
            _wait_for_motion(proc, emu)
            emu.disconnect()  # the cable is pulled
            rc = proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
        err = proc.stderr.read()
    assert rc == 2, err
    assert "rtdp control: error:" in err and "torque-off attempted on servos [1, 2, 3]" in err, err
    # what was measured before the cable was pulled is kept
    report = json.loads((tmp_path / "report.json").read_text())
    assert "torque-off attempted" in report["error"] and report["cycles"] > 0


def _emulator_children() -> list[int]:
    """PIDs of this process's children that run the bus emulator."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == os.getpid() and b"rtdp.controllers.emulator.dynamixel" in cmd:
            found.append(int(pid))
    return found


def test_rtdp_control_with_port_emulator_runs_and_stops_the_emulator(tmp_path, capsys):
    """``rtdp control driver=dynamixel port=emulator``: the emulator starts, the loop runs, both end cleanly."""
    from rtdp.cli import compose
    from rtdp.workflows.control import run_control

    cfg = compose("control", ["size=small", "driver=dynamixel", "port=emulator", "motors=[1,2,3]", "duration_s=1",
                              f"out={tmp_path}", "worker=thread", "threads=1", "live=false", "sampler=ddim",
                              "steps=3"])
    report = run_control(cfg)
    err = capsys.readouterr().err
    assert "Dynamixel bus emulator on /dev/" in err
    assert report["driver"] == "dynamixel" and report["rate_hz"] == 50.0 and "error" not in report
    assert 25 <= report["cycles"] <= 51  # 1 s at 50 Hz, the loop's own count
    assert report["chunks"] >= 1 and report["inference_ms_p50"] is not None
    assert json.loads((tmp_path / "report.json").read_text())["cycles"] == report["cycles"]
    assert _emulator_children() == []  # the emulator process was stopped and reaped
