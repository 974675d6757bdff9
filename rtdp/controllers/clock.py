"""Clocks for real-time loops: the monotonic wall clock, and a fake one for tests.

A loop asks its clock for ``now()`` and ``sleep_until(t)`` and nothing else,
so a unit test can run hours of control cycles in milliseconds and inject a
stall exactly where it wants one.
"""

from __future__ import annotations

import time
from typing import Callable, Protocol


class Clock(Protocol):
    """Time source of a loop, in seconds."""

    def now(self) -> float:
        """Current time; never goes backwards."""

    def sleep_until(self, t: float) -> None:
        """Return at (or as soon as possible after) time ``t``."""


class MonotonicClock:
    """``time.monotonic`` with a sleep that lands on time.

    ``time.sleep`` on Linux wakes ~50-100 µs late and, on a loaded machine,
    up to a scheduler tick late; so the clock sleeps until ``spin_s`` before
    the target and polls the remaining time. The spin costs CPU only for that
    last fraction of a millisecond per cycle.

    Args:
        spin_s: how long before the target to stop sleeping and poll.
    """

    def __init__(self, spin_s: float = 0.0003) -> None:
        self.spin_s = float(spin_s)

    def now(self) -> float:
        # monotonic, not time.time(): a wall-clock adjustment must never make the loop go backwards
        return time.monotonic()

    def sleep_until(self, t: float) -> None:
        remaining = t - time.monotonic()
        if remaining > self.spin_s:
            time.sleep(remaining - self.spin_s)
        while time.monotonic() < t:
            pass


class FakeClock:
    """A clock that moves only when slept on or advanced (unit tests).

    Args:
        start: initial time.
        on_sleep: called with the time slept to, after the clock moved (a test
            can step a simulated robot or worker there).
    """

    def __init__(self, start: float = 0.0, on_sleep: Callable[[float], None] | None = None) -> None:
        self.t = float(start)
        self.on_sleep = on_sleep

    def now(self) -> float:
        return self.t

    def sleep_until(self, t: float) -> None:
        self.t = max(self.t, float(t))
        if self.on_sleep is not None:
            self.on_sleep(self.t)

    def advance(self, dt: float) -> None:
        """Let ``dt`` seconds pass, as work inside a cycle (or a stall) would."""
        self.t += float(dt)
