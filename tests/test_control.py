"""The control stack on a fake clock: loop timing, action scheduling, seams, safety, and the controller.

Everything here runs in simulated time (``FakeClock``), so a test can stall a
cycle or delay an inference by exactly as much as it wants. ``FakeDriver`` is
a test double (a recording robot), not a mock of a real device: the real
drivers have their own tests against the simulator and the bus emulator.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from rtdp.controllers.clock import FakeClock
from rtdp.controllers.controller import Controller
from rtdp.controllers.drivers.base import ActionLimits, DriverBase, Reading
from rtdp.controllers.workers import InlineWorker
from rtdp.controllers.loop import RateLoop
from rtdp.controllers.safety import SafetyLayer
from rtdp.controllers.schedule import ActionScheduler
from rtdp.core.inpaint import InpaintDenoiser, rtc_weights
from rtdp.errors import ConfigError

DT = 0.1


class FakeDriver(DriverBase):
    """A recording robot on the fake clock: the observation is the last command; every call is logged."""

    name = "fake"
    action_dim = 2

    def __init__(self, clock: FakeClock, low=-1e6, high=1e6, max_delta=None) -> None:
        self.clock = clock
        self.writes: list[tuple[float, np.ndarray]] = []
        self.stops: list[float] = []
        self.pos = np.zeros(2)
        self._limits = ActionLimits(np.full(2, low), np.full(2, high),
                                    None if max_delta is None else np.full(2, max_delta))

    def connect(self) -> None:
        pass

    def read(self) -> Reading:
        return Reading(self.clock.now(), {"pos": self.pos.copy()}, {})

    def write(self, action) -> None:
        self.writes.append((self.clock.now(), np.array(action)))
        self.pos = np.array(action)

    def stop(self) -> None:
        self.stops.append(self.clock.now())

    def close(self) -> None:
        pass

    @property
    def limits(self) -> ActionLimits:
        return self._limits


def ramp_policy(obs, t_obs, inpaint):
    """15 actions (8 to execute, 7 in reserve) whose action k encodes its due time: (t_obs + k * DT) * 10."""
    k = np.arange(15)
    return np.stack([(t_obs + k * DT) * 10.0] * 2, axis=1)


# ------------------------------------------------------------------- the loop


def test_loop_keeps_the_grid_on_a_fake_clock():
    clock = FakeClock(100.0)
    loop = RateLoop(50.0, clock)
    ticks = [t for t in loop.run(max_cycles=200)]
    assert [t.index for t in ticks] == list(range(200))
    assert np.allclose([t.start for t in ticks], 100.0 + np.arange(200) / 50.0)
    st = loop.stats()
    assert st.deadline_misses == 0 and st.period_error_ms_max == pytest.approx(0.0, abs=1e-9)


def test_a_three_period_stall_is_skipped_not_replayed():
    clock = FakeClock(0.0)
    loop = RateLoop(10.0, clock)
    starts = []
    for tick in loop.run(max_cycles=20):
        starts.append(tick.start)
        if tick.index == 5:
            clock.advance(3 * DT + 0.01)  # the cycle's work stalls for just over three periods
    gaps = np.diff(starts)
    # no burst: never two cycles closer than one period, and the grid resumes at the next deadline ahead
    assert gaps.min() >= DT - 1e-9
    assert starts[6] == pytest.approx(0.9)  # stall ended at 0.81; deadlines 0.6, 0.7, 0.8 were skipped
    assert loop.stats().deadline_misses == 3
    assert loop.stats().cycles == 20


def test_loop_rejects_a_bad_rate():
    with pytest.raises(ConfigError, match="rate_hz"):
        RateLoop(0.0)


# -------------------------------------------------------------- the scheduler


def test_chunk_actions_are_aligned_to_the_observation_time_and_late_ones_dropped():
    sch = ActionScheduler(DT, "switch")
    chunk = np.arange(8)[:, None] * np.ones((1, 2))
    sch.add(chunk, t_obs=1.0, now=1.3)
    assert sch.next_action(1.3)[0] == 3  # intervals 0..2 passed while inferring
    assert sch.dropped == 3
    assert sch.next_action(1.4)[0] == 4
    assert sch.remaining(1.4) == 3
    assert sch.next_action(1.8) is None  # the plan ran out: the robot would be idle


def test_switch_replaces_the_plan_and_measures_the_seam():
    sch = ActionScheduler(DT, "switch")
    sch.add(np.zeros((8, 2)), 0.0, 0.0)
    for t in (0.0, 0.1, 0.2):
        sch.next_action(t)
    sch.add(np.full((8, 2), 3.0), 0.2, 0.25)
    a = sch.next_action(0.3)
    assert np.all(a == 3.0)
    st = sch.seam_stats()
    assert st.seams == 1 and st.gap_mean == pytest.approx(math.hypot(3, 3))
    assert st.step_mean_inside == 0.0


def test_temporal_ensembling_weights_older_predictions_more():
    m = 0.5
    sch = ActionScheduler(DT, "ensemble", ensemble_m=m)
    sch.add(np.full((8, 1), 1.0), 0.0, 0.0)
    sch.add(np.full((8, 1), 5.0), 0.2, 0.2)
    a = sch.next_action(0.3)  # covered by both chunks
    w = np.exp(-m * np.arange(2))
    assert a[0] == pytest.approx((w[0] * 1.0 + w[1] * 5.0) / w.sum())
    assert sch.next_action(0.85)[0] == pytest.approx(5.0)  # only the second chunk reaches this far


def test_committed_actions_are_the_plan_on_the_new_chunks_intervals():
    sch = ActionScheduler(DT, "rtc")
    sch.add(np.arange(8, dtype=float)[:, None] * np.ones((1, 2)), 0.0, 0.0)
    got = sch.committed(0.5, 8)  # a chunk observed at 0.5 starts at the old chunk's index 5
    assert got[:, 0].tolist() == [5.0, 6.0, 7.0]


def test_unknown_seam_is_a_config_error():
    with pytest.raises(ConfigError, match="seam"):
        ActionScheduler(DT, "blend")


# ------------------------------------------------------------ the safety layer


def _safety(**kw):
    return SafetyLayer(ActionLimits(np.array([-1.0, -1.0]), np.array([1.0, 1.0]), kw.pop("max_delta", None)), **kw)


def test_safety_rejects_nonfinite_and_wrong_shapes_holding_the_last_safe_command():
    s = _safety(watchdog_s=1.0)
    assert np.allclose(s.filter([0.5, 0.5], 0.0).action, [0.5, 0.5])
    for bad in ([np.nan, 0.0], [np.inf, 0.0], [0.1, 0.2, 0.3], "go", [[0.1, 0.2]]):
        cmd = s.filter(bad, 0.1)
        assert not cmd.fresh and np.allclose(cmd.action, [0.5, 0.5])
    c = s.counts()
    assert c["rejected_nonfinite"] == 2 and c["rejected_shape"] == 3 and c["hold"] == 5


def test_safety_clips_and_limits_the_rate():
    s = _safety(watchdog_s=1.0, max_delta=np.array([0.1, 0.1]))
    assert np.allclose(s.filter([5.0, -5.0], 0.0).action, [1.0, -1.0])
    assert np.allclose(s.filter([0.0, 0.0], 0.1).action, [0.9, -0.9])
    assert s.counts()["clipped"] == 1 and s.counts()["rate_limited"] == 1


def test_safety_watchdog_stops_after_its_period_without_fresh_actions():
    s = _safety(watchdog_s=0.3)
    assert s.filter(None, 0.0).action is None  # nothing moved yet: nothing to hold, no watchdog
    s.filter([0.2, 0.2], 1.0)
    assert np.allclose(s.filter(None, 1.2).action, [0.2, 0.2])  # hold
    cmd = s.filter(None, 1.31)
    assert cmd.stopped and cmd.action is None and s.counts()["watchdog_stop"] == 1


# ----------------------------------------------------------------- controller


def _controller(clock, latency, *, seam="switch", overlap=0, driver=None, predict=ramp_policy, watchdog=0.35):
    driver = driver or FakeDriver(clock)
    worker = InlineWorker(predict, clock, latency, 8)
    worker.plan_length = 15
    loop = RateLoop(1 / DT, clock)
    ctl = Controller(driver, worker, loop, obs_keys=("pos",), n_obs_steps=2, seam=seam, overlap=overlap,
                     watchdog_s=watchdog, latency_s=latency if not callable(latency) else 0.0)
    return ctl, driver, worker


@pytest.mark.parametrize("latency", [0.02, 0.15, 0.45, 0.65])
def test_the_robot_never_waits_when_inference_is_faster_than_a_chunk(latency):
    clock = FakeClock(10.0)
    ctl, drv, worker = _controller(clock, latency)
    ep = ctl.run_episode(max_cycles=120)
    assert ep.idle_cycles == 0 and ep.chunks >= 10
    # every command written is the action planned for that interval: value/10 = its due time
    for t, a in drv.writes:
        assert a[0] / 10.0 == pytest.approx(math.floor(t / DT + 1e-9) * DT, abs=1e-6)
    assert len(drv.writes) == 120 - ep.startup_cycles


def test_late_inferences_hold_then_stop_within_the_watchdog_period():
    clock = FakeClock(0.0)
    # requests 1-3 are quick, every later one takes 10 s: the plan runs out and nothing fresh arrives
    ctl, drv, worker = _controller(clock, lambda i: 0.02 if i <= 3 else 10.0, watchdog=0.35)
    ep = ctl.run_episode(max_cycles=200)
    assert ep.stopped_by_watchdog and len(drv.stops) == 1
    fresh_times = [t for t, a in drv.writes if a[0] / 10.0 == pytest.approx(math.floor(t / DT + 1e-9) * DT, abs=1e-6)]
    t_last_fresh = max(fresh_times)
    holds = [(t, a) for t, a in drv.writes if t > t_last_fresh]
    assert holds, "the robot should hold the last command before stopping"
    assert all(np.array_equal(a, drv.writes[len(fresh_times) - 1][1]) for _, a in holds)
    assert drv.stops[0] - t_last_fresh <= 0.35 + DT + 1e-9
    assert all(t <= drv.stops[0] for t, _ in drv.writes)  # nothing written after the stop


def test_nonfinite_policy_actions_never_reach_the_driver():
    clock = FakeClock(0.0)

    def sometimes_nan(obs, t_obs, inpaint):
        a = ramp_policy(obs, t_obs, inpaint)
        if int(round(t_obs / DT)) % 3 == 1:
            a[2:5, 1] = np.nan
        return a

    ctl, drv, _ = _controller(clock, 0.02, predict=sometimes_nan, watchdog=1.0)
    ctl.run_episode(max_cycles=80)
    assert drv.writes and all(np.isfinite(a).all() for _, a in drv.writes)
    assert ctl.safety.counts()["rejected_nonfinite"] > 0


def test_rtc_requests_carry_the_committed_actions_of_the_new_chunks_intervals():
    clock = FakeClock(0.0)
    ctl, drv, worker = _controller(clock, 0.15, seam="rtc", overlap=2)
    ctl.run_episode(max_cycles=60)
    requests = [r for r in worker.inpaints if r is not None]
    assert len(requests) >= 3
    for actions, weights in requests:
        # the ramp encodes due times, so committed actions must continue the new observation's grid
        assert np.allclose(np.diff(actions[:, 0]), DT * 10.0, atol=1e-5)
        assert weights[0] == 1.0 and np.all(np.diff(weights) <= 1e-7)


def test_ensemble_and_overlap_run_without_idle():
    clock = FakeClock(0.0)
    ctl, drv, _ = _controller(clock, 0.15, seam="ensemble", overlap=2)
    ep = ctl.run_episode(max_cycles=60)
    assert ep.idle_cycles == 0 and ctl.scheduler.seam_stats().seams > 0


# --------------------------------------------------------- inpainting (core)


def test_rtc_weights_shape():
    w = rtc_weights(6, 2)
    assert w[:2].tolist() == [1.0, 1.0] and w[-1] > 0 and bool((torch.diff(w) <= 0).all())
    assert rtc_weights(3, 5).tolist() == [1.0, 1.0, 1.0]


def test_inpainting_makes_the_chunk_start_with_the_committed_actions():
    from rtdp.policies import load_policy
    from rtdp.policies.runner import Runner

    policy = load_policy(Path(__file__).resolve().parents[1] / "rtdp/assets/checkpoints/pusht/checkpoint")
    rng = np.random.default_rng(0)
    obs = {"keypoint": rng.uniform(150, 350, (1, 2, 9, 2)).astype(np.float32),
           "agent_pos": rng.uniform(150, 350, (1, 2, 2)).astype(np.float32)}
    committed = np.array([[[260.0, 240.0], [262.0, 243.0], [264.0, 246.0]]], dtype=np.float32)
    w = rtc_weights(3, 2)
    for sampler, steps in (("ddim", 10), ("ddpm", 100)):
        free = Runner(policy, sampler, steps, seed=1).predict(obs)
        out = Runner(policy, sampler, steps, seed=1).predict(obs, inpaint=(committed, w))
        assert torch.allclose(out[0, :2], torch.as_tensor(committed[0, :2]), atol=1e-3)
        assert not torch.allclose(free[0, :2], out[0, :2], atol=1.0)


def test_inpaint_denoiser_is_exact_at_weight_one_and_transparent_at_zero():
    target = torch.randn(2, 3, 4)
    den = InpaintDenoiser(lambda x, s, c: x * 0.5, target, torch.tensor([1.0, 0.0, 0.5]), start=1)
    x = torch.randn(2, 6, 4)
    out = den(x, torch.ones(2))
    assert torch.equal(out[:, 1], target[:, 0]) and torch.equal(out[:, 2], x[:, 2] * 0.5)
    assert torch.allclose(out[:, 3], 0.5 * target[:, 2] + 0.25 * x[:, 3])
    assert torch.equal(out[:, [0, 4, 5]], x[:, [0, 4, 5]] * 0.5)
    with pytest.raises(ConfigError):
        InpaintDenoiser(lambda x, s, c: x, target, torch.tensor([2.0, 0.0, 0.0]))


def test_loop_start_keeps_the_requested_phase():
    clock = FakeClock(1.0)
    loop = RateLoop(10.0, clock)
    starts = [t.start for t in loop.run(max_cycles=3, start_at=0.55)]  # 0.55 passed: next on its grid is 1.05
    assert starts == pytest.approx([1.05, 1.15, 1.25])


def test_a_chunk_that_arrives_after_all_its_intervals_is_dropped_whole():
    sch = ActionScheduler(DT, "switch")
    sch.add(np.zeros((8, 2)), t_obs=0.0, now=2.0)
    assert sch.dropped == 8 and sch.next_action(2.0) is None


def _fifo_permitted() -> bool:
    """Whether this process may use SCHED_FIFO, asked of a separate process (so this one is untouched)."""
    import subprocess
    import sys

    code = "import os; os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


@pytest.mark.skipif(not hasattr(__import__("os"), "sched_setscheduler"), reason="no sched_setscheduler here")
def test_realtime_priority_sets_fifo_when_permitted_and_says_why_not_otherwise():
    import os

    from rtdp.controllers.loop import realtime_priority

    before = (os.sched_getscheduler(0), os.sched_getparam(0).sched_priority)
    permitted = _fifo_permitted()
    with realtime_priority(10) as rt:
        now = (os.sched_getscheduler(0), os.sched_getparam(0).sched_priority)
        if permitted:
            assert rt.applied == "SCHED_FIFO 10"
            assert now == (os.SCHED_FIFO, 10)
        else:
            assert rt.applied.startswith("normal (SCHED_FIFO not permitted: "), rt.applied
            assert now == before
    assert (os.sched_getscheduler(0), os.sched_getparam(0).sched_priority) == before  # restored
    with realtime_priority(0) as rt:
        assert rt.applied == "normal"
        assert (os.sched_getscheduler(0), os.sched_getparam(0).sched_priority) == before
    with pytest.raises(ConfigError, match="0..99"):
        realtime_priority(120)


@pytest.mark.parametrize("allowed", [True, False])
def test_realtime_priority_branches_under_a_fake_scheduler(monkeypatch, allowed):
    """Both outcomes on any machine: the call made, what is reported, what is restored."""
    import os

    from rtdp.controllers.loop import realtime_priority

    calls = []

    def fake_set(pid, policy, param):
        if not allowed and policy == 1234:
            raise PermissionError(1, "Operation not permitted")
        calls.append((pid, policy, param.sched_priority))

    monkeypatch.setattr(os, "SCHED_FIFO", 1234, raising=False)
    monkeypatch.setattr(os, "sched_getscheduler", lambda pid: 7, raising=False)
    monkeypatch.setattr(os, "sched_getparam", lambda pid: os.sched_param(3), raising=False)
    monkeypatch.setattr(os, "sched_setscheduler", fake_set, raising=False)
    with realtime_priority(42) as rt:
        if allowed:
            assert rt.applied == "SCHED_FIFO 42" and calls == [(0, 1234, 42)]
        else:
            assert rt.applied == "normal (SCHED_FIFO not permitted: [Errno 1] Operation not permitted)"
            assert calls == []
    # leaving restores the old policy and priority, and only if it was changed
    assert calls == ([(0, 1234, 42), (0, 7, 3)] if allowed else [])


def test_committed_actions_leave_out_the_reserve():
    sch = ActionScheduler(DT, "rtc")
    sch.add(np.arange(15, dtype=float)[:, None] * np.ones((1, 2)), 0.0, 0.0, n_exec=8)
    assert sch.committed(0.5, 15)[:, 0].tolist() == [5.0, 6.0, 7.0]  # 8..14 are a fallback only
