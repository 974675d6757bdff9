"""A fixed-rate loop on a monotonic clock.

Cycle ``k`` is due at ``t0 + k * period``. After the work of a cycle the loop
sleeps until the next deadline that is still ahead: when the work overran
one or more deadlines those cycles are skipped and counted as missed, never
run back to back to catch up (a burst of commands to a robot after a stall is
exactly what must not happen).

    loop = RateLoop(50.0)
    for tick in loop.run(duration_s=600):
        ...  # one control cycle; tick.t is its deadline, tick.start when it began
    print(loop.stats())
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from rtdp.controllers.clock import Clock, MonotonicClock
from rtdp.errors import ConfigError


@dataclass(frozen=True)
class Tick:
    """One control cycle.

    Attributes:
        index: cycle number on the deadline grid (skipped cycles leave gaps).
        t: the cycle's deadline, ``t0 + index * period``.
        start: when the cycle actually began (``>= t`` on a real clock).
        missed: deadlines skipped just before this cycle.
    """

    index: int
    t: float
    start: float
    missed: int


@dataclass
class LoopStats:
    """Timing of one run of a loop (milliseconds where named so).

    ``period_error`` is the lateness of each cycle's start against its
    deadline; ``deadline_misses`` counts deadlines at which no cycle started
    because the previous one was still running; ``utilisation`` is busy time
    over the time the loop ran.
    """

    rate_hz: float
    cycles: int
    duration_s: float
    deadline_misses: int
    period_error_ms_p50: float
    period_error_ms_p99: float
    period_error_ms_max: float
    work_ms_p50: float
    work_ms_p99: float
    utilisation: float

    def to_dict(self) -> dict[str, float | int]:
        return dict(self.__dict__)


class RateLoop:
    """Run cycles at ``rate_hz`` on ``clock``.

    Args:
        rate_hz: cycles per second.
        clock: time source; a ``FakeClock`` in tests.
        max_record: cycles whose timings are kept for statistics (preallocated).
    """

    def __init__(self, rate_hz: float, clock: Clock | None = None, *, max_record: int = 200_000) -> None:
        if not rate_hz > 0:
            raise ConfigError(f"rate_hz must be > 0, got {rate_hz!r}")
        self.rate_hz = float(rate_hz)
        self.period = 1.0 / self.rate_hz
        self.clock = clock if clock is not None else MonotonicClock()
        self.max_record = int(max_record)
        # preallocated, so recording a cycle never allocates inside the loop
        self._lateness = np.zeros(max_record)
        self._work = np.zeros(max_record)
        self._starts = np.zeros(max_record)
        self.cycles = 0
        self.misses = 0
        self._t0 = 0.0
        self._t_end = 0.0

    def run(self, *, max_cycles: int | None = None, duration_s: float | None = None,
            start_at: float | None = None) -> Iterator[Tick]:
        """Yield one ``Tick`` per cycle until ``max_cycles``, ``duration_s`` or the caller breaks.

        Args:
            start_at: deadline of the first cycle (default: now); lets a loop
                run in a chosen phase against a robot that keeps its own clock.
        """
        clock, period = self.clock, self.period
        self.cycles = self.misses = 0
        now = clock.now()
        t0 = now if start_at is None else float(start_at)
        if t0 < now:  # keep the requested phase: the first deadline still ahead on that grid
            t0 += math.ceil((now - t0) / period) * period
        self._t0 = t0
        k, missed = 0, 0
        try:
            while (max_cycles is None or self.cycles < max_cycles) and (
                duration_s is None or k * period < duration_s
            ):
                deadline = t0 + k * period
                clock.sleep_until(deadline)
                start = clock.now()
                yield Tick(k, deadline, start, missed)
                end = clock.now()
                n = self.cycles
                if n < len(self._work):
                    self._lateness[n] = start - deadline
                    self._work[n] = end - start
                    self._starts[n] = start - t0
                self.cycles += 1
                # the next deadline still ahead; the ones in between are skipped, not replayed
                nxt = k + 1
                if end > t0 + nxt * period:
                    nxt = int((end - t0) // period) + 1
                missed = nxt - (k + 1)
                self.misses += missed
                k = nxt
        finally:
            self._t_end = clock.now()

    def lateness_ms(self) -> np.ndarray:
        """Per-cycle start lateness (ms) of the last run."""
        return self._lateness[: min(self.cycles, len(self._lateness))] * 1e3

    def start_times(self) -> np.ndarray:
        """Per-cycle start times (s since the loop began) of the last run."""
        return self._starts[: min(self.cycles, len(self._starts))].copy()

    def stats(self) -> LoopStats:
        """Statistics of the last run."""
        n = min(self.cycles, len(self._work))
        late = self._lateness[:n] * 1e3
        work = self._work[:n] * 1e3
        duration = max(self._t_end - self._t0, 1e-12)

        def q(a: np.ndarray, p: float) -> float:
            return float(np.percentile(a, p)) if len(a) else 0.0

        return LoopStats(
            rate_hz=self.rate_hz, cycles=self.cycles, duration_s=float(duration), deadline_misses=int(self.misses),
            period_error_ms_p50=q(late, 50), period_error_ms_p99=q(late, 99),
            period_error_ms_max=float(late.max()) if n else 0.0,
            work_ms_p50=q(work, 50), work_ms_p99=q(work, 99),
            utilisation=float(work.sum() / 1e3 / duration),
        )


class realtime_priority:
    """Run the calling thread under ``SCHED_FIFO`` at ``priority`` while inside the block.

    On Linux's default scheduler a niced CPU hog (the inference worker) can
    still delay a waking thread by a whole scheduler slice (~3 ms): nice
    changes a task's share of the CPU, not how fast others get it back. A
    real-time priority makes the loop preempt the worker the moment its sleep
    ends. Needs CAP_SYS_NICE (root, or an rtprio limit); without it the loop
    runs at normal priority and ``applied`` says why.

    Child processes must be started before entering the block: they would
    inherit the policy.

    Args:
        priority: 1..99; 0 leaves scheduling alone.
    """

    def __init__(self, priority: int) -> None:
        if not 0 <= int(priority) <= 99:
            raise ConfigError(f"rt_priority must be in 0..99, got {priority!r}")
        self.priority = int(priority)
        self.applied = "normal"
        self._old: tuple[int, int] | None = None

    def __enter__(self) -> "realtime_priority":
        import os

        if self.priority == 0:
            return self
        if not hasattr(os, "sched_setscheduler"):
            self.applied = "normal (no SCHED_FIFO on this platform)"
            return self
        try:
            self._old = (os.sched_getscheduler(0), os.sched_getparam(0).sched_priority)
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(self.priority))
            self.applied = f"SCHED_FIFO {self.priority}"
        except (PermissionError, OSError) as exc:
            self._old = None
            self.applied = f"normal (SCHED_FIFO not permitted: {exc})"
        return self

    def __exit__(self, *exc: object) -> None:
        import os

        if self._old is not None:
            os.sched_setscheduler(0, self._old[0], os.sched_param(self._old[1]))
            self._old = None
