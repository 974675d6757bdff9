"""A policy driving a robot: the loop, the inference worker, the scheduler and the safety layer together.

Per control cycle, in this order:

1. read the newest observation (timestamped by the driver) into the history;
2. collect a finished chunk from the worker and hand it to the scheduler,
   aligned to the time its observation was taken;
3. if no inference is in flight and the plan runs out within the expected
   inference latency (plus ``overlap`` intervals), submit the history; for
   ``seam=rtc`` the request carries the actions already committed for the new
   chunk's first intervals;
4. take the action for this interval from the scheduler, pass it through the
   safety layer and write it (or hold; or stop when the watchdog fires).

The latency estimate that decides when to submit is the p99 of the warm-up
and the recent requests, with a margin, so the robot does not wait for a
chunk whenever inference is faster than a chunk.
"""

from __future__ import annotations

import gc
import logging
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from rtdp.controllers.loop import RateLoop
from rtdp.controllers.safety import SafetyLayer
from rtdp.controllers.schedule import ActionScheduler
from rtdp.core.inpaint import rtc_weights
from rtdp.errors import ConfigError

log = logging.getLogger("rtdp.control")


@dataclass
class EpisodeLog:
    """What happened in one run of the controller."""

    cycles: int = 0
    idle_cycles: int = 0          # cycles with no planned action after the first chunk (robot waiting)
    startup_cycles: int = 0       # cycles before the first chunk of the episode arrived
    chunks: int = 0
    score: float = 0.0
    success: bool = False
    done: bool = False
    stopped_by_watchdog: bool = False
    inference_ms: list[float] = field(default_factory=list)  # policy compute time per chunk
    wait_ms: list[float] = field(default_factory=list)       # submit -> chunk in the loop's hands
    inference_t: list[float] = field(default_factory=list)   # completion times (s since the run began)


class Controller:
    """Runs one policy worker against one driver.

    Args:
        driver: a connected driver.
        worker: an inference worker (``ProcessWorker``, ``ThreadWorker``, ``InlineWorker``).
        loop: the fixed-rate loop (its clock is used everywhere).
        obs_keys: observation keys the policy reads.
        n_obs_steps: observation history length To.
        seam: ``switch``, ``ensemble`` or ``rtc``.
        overlap: extra intervals the plan must still cover when the next
            inference is submitted (gives ensembling and real-time chunking
            something to blend).
        watchdog_s: safety watchdog period.
        latency_s: initial inference-latency estimate (e.g. warm-up p99).
        on_cycle: called after every cycle with the controller (live view).
    """

    def __init__(self, driver, worker, loop: RateLoop, *, obs_keys: tuple[str, ...], n_obs_steps: int,
                 seam: str = "switch", overlap: int = 0, watchdog_s: float = 0.5, latency_s: float = 0.0,
                 on_cycle: Callable[["Controller"], None] | None = None) -> None:
        if overlap < 0:
            raise ConfigError(f"overlap must be >= 0, got {overlap}")
        self.driver, self.worker, self.loop = driver, worker, loop
        self.clock = loop.clock
        self.dt = loop.period
        self.obs_keys, self.n_obs_steps = tuple(obs_keys), int(n_obs_steps)
        self.seam, self.overlap = seam, int(overlap)
        self.scheduler = ActionScheduler(self.dt, seam)
        self.safety = SafetyLayer(driver.limits, watchdog_s)
        self.on_cycle = on_cycle
        self._latencies: deque[float] = deque(maxlen=50)
        self._estimate = self.dt  # until a latency is known
        if latency_s:
            self._add_latency(latency_s)
        self.dropped_total = 0
        self.episode = EpisodeLog()
        self.history: deque[dict[str, np.ndarray]] = deque(maxlen=self.n_obs_steps)
        # where each cycle's time went (read, worker poll + submit, safety + write), over the whole run;
        # preallocated like the loop's own records
        self._phases = np.zeros((loop.max_record, 3))
        self._phase_t = np.zeros(loop.max_record)
        self._n_phases = 0

    PHASES = ("read", "infer_io", "write")

    def cycle_breakdown(self, top: int = 10) -> dict:
        """Per-phase cycle times (ms) of the run so far: p50/p99/max of each phase, and the
        ``top`` slowest cycles (``t_s`` since the first cycle) with their phases, so an overrun can be traced to what caused it."""
        n = min(self._n_phases, len(self._phases))
        ph = self._phases[:n] * 1e3
        out: dict = {}
        for j, name in enumerate(self.PHASES):
            col = ph[:, j]
            out[name] = {"p50": float(np.percentile(col, 50)) if n else 0.0,
                         "p99": float(np.percentile(col, 99)) if n else 0.0,
                         "max": float(col.max()) if n else 0.0}
        total = ph.sum(axis=1)
        worst = np.argsort(total)[::-1][:top]
        t0 = self._phase_t[0] if n else 0.0
        out["slowest"] = [{"t_s": float(self._phase_t[i] - t0), "total": float(total[i]),
                           **{name: float(ph[i, j]) for j, name in enumerate(self.PHASES)}} for i in worst]
        return out

    def latency_estimate(self) -> float:
        """Inference latency the submit decision plans for: p99 of recent compute times, +20 % and 2 ms."""
        return self._estimate

    def _add_latency(self, seconds: float) -> None:
        # the estimate changes only when a chunk arrives, so it is computed then, not every cycle
        self._latencies.append(seconds)
        self._estimate = 1.2 * float(np.percentile(np.asarray(self._latencies), 99)) + 0.002

    def lead(self) -> int:
        """Intervals the plan must still cover when the next request goes out."""
        return max(1, math.ceil(self.latency_estimate() / self.dt)) - 1 + self.overlap

    def _history(self) -> dict[str, np.ndarray]:
        return {k: np.stack([o[k] for o in self.history]) for k in self.obs_keys}

    def _submit(self, t_obs: float) -> None:
        inpaint = None
        if self.seam == "rtc" and self.scheduler.chunks:
            committed = self.scheduler.committed(t_obs, self.worker.plan_length)
            if len(committed):
                # actions that execute before the new chunk can take over are frozen; the rest fade out
                frozen = math.ceil(self.latency_estimate() / self.dt) + 1
                inpaint = (committed.astype(np.float32), rtc_weights(len(committed), frozen).numpy())
        self.worker.submit(self._history(), t_obs, inpaint)

    def run_episode(self, *, max_cycles: int | None = None, duration_s: float | None = None,
                    first: "Reading | None" = None) -> EpisodeLog:  # noqa: F821
        """Control until the driver reports the episode done, ``max_cycles`` or ``duration_s``.

        Args:
            first: the episode's first reading (the history is filled with it, as
                Diffusion Policy's wrapper repeats the first observation).
        """
        ep = self.episode = EpisodeLog()
        self.scheduler.reset()
        self.worker.reset()
        self.history.clear()
        # Python's cyclic garbage collector pauses the process for a few ms whenever it scans
        # the long-lived heap (torch's modules alone are ~10^5 objects); freezing what exists now
        # takes it out of every later scan, so the loop only pays for what it allocates itself.
        # Done before the first read: the collection itself takes ~0.1 s, a silence that trips
        # a servo bus watchdog, which the read then clears outside the loop
        gc.collect()
        gc.freeze()
        reading = first if first is not None else self.driver.read()
        for _ in range(self.n_obs_steps):
            self.history.append(reading.obs)
        self.safety.reset(None, self.clock.now())
        t_run = self.clock.now()
        seen_t = reading.t
        # a robot with its own step clock (the simulator) is read half a period after it steps,
        # so a reading is never taken in a race with the step that replaces it
        phase = getattr(self.driver, "loop_phase", None)
        start_at = None if phase is None else reading.t + float(phase) * self.dt
        phases, phase_t = self._phases, self._phase_t
        for tick in self.loop.run(max_cycles=max_cycles, duration_s=duration_s, start_at=start_at):
            now = self.clock.now()
            reading = self.driver.read()
            t_read = self.clock.now()
            if reading.t != seen_t:  # a new observation; the same one twice is not history
                self.history.append(reading.obs)
                seen_t = reading.t
            res = self.worker.poll()
            if res is not None:
                self.scheduler.add(res.actions, res.t_obs, now, self.worker.n_action_steps)
                self._add_latency(res.compute_s or res.latency_s)
                ep.inference_ms.append((res.compute_s or res.latency_s) * 1e3)
                ep.wait_ms.append(res.latency_s * 1e3)
                ep.inference_t.append(res.t_done - t_run)
                ep.chunks += 1
            if not self.worker.busy and self.scheduler.remaining(now) <= self.lead():
                self._submit(reading.t)
            t_io = self.clock.now()
            action = self.scheduler.next_action(now)
            if action is None:
                if ep.chunks == 0:
                    ep.startup_cycles += 1
                else:
                    ep.idle_cycles += 1
            cmd = self.safety.filter(action, now)
            if cmd.stopped:
                # a robot that got no fresh command for a watchdog period stays stopped: the run ends
                ep.stopped_by_watchdog = True
                log.error("watchdog: no fresh action for %.3f s; stopping the robot", self.safety.watchdog_s)
                self.driver.stop()
                ep.cycles += 1
                break
            if cmd.action is not None:
                self.driver.write(cmd.action)
            i = self._n_phases
            if i < len(phases):
                end = self.clock.now()
                phases[i, 0], phases[i, 1], phases[i, 2] = t_read - now, t_io - t_read, end - t_io
                phase_t[i] = now
            self._n_phases = i + 1
            ep.cycles += 1
            ep.score = max(ep.score, float(reading.info.get("score", 0.0)))
            ep.success = ep.success or bool(reading.info.get("is_success", False))
            if self.on_cycle is not None:
                self.on_cycle(self)
            if reading.info.get("episode_done"):
                ep.done = True
                break
        self.dropped_total += self.scheduler.dropped
        # a request still in flight belongs to this episode; wait it out so the next starts clean
        while self.worker.busy:
            if self.worker.poll() is None:
                self.clock.sleep_until(self.clock.now() + 0.001)
        return ep
