"""The safety layer between a policy and a driver.

Every command passes through ``SafetyLayer.filter`` before it reaches the
robot. It

* rejects actions of the wrong shape or with NaN/Inf and holds the last safe
  command instead;
* clips to the driver's position limits and limits the change per cycle;
* holds the last command when no fresh action arrived for this cycle, and
  stops the robot (``driver.stop()``, then no more writes) when none arrived
  for ``watchdog_s``; it re-arms once fresh actions flow again.

Every intervention is counted by kind and logged.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass

import numpy as np

from rtdp.controllers.drivers.base import ActionLimits
from rtdp.errors import ConfigError

log = logging.getLogger("rtdp.safety")

EVENTS = ("rejected_shape", "rejected_nonfinite", "clipped", "rate_limited", "hold", "watchdog_stop")


@dataclass(frozen=True)
class SafeCommand:
    """What the loop should do this cycle.

    Attributes:
        action: the command to write, or None when the robot is stopped (write nothing).
        fresh: the command came from a new policy action (not a hold).
        stopped: the watchdog stopped the robot.
    """

    action: np.ndarray | None
    fresh: bool
    stopped: bool


class SafetyLayer:
    """Checks, clips and rate-limits commands; holds and stops on stale input.

    Args:
        limits: the driver's ``ActionLimits``.
        watchdog_s: longest time without a fresh action before the robot is stopped.
        initial: the command to hold before the first fresh action (e.g. the
            robot's present position); None: nothing is written until then.
    """

    def __init__(self, limits: ActionLimits, watchdog_s: float, initial: np.ndarray | None = None) -> None:
        low, high = np.asarray(limits.low, dtype=np.float64), np.asarray(limits.high, dtype=np.float64)
        if low.shape != high.shape or low.ndim != 1 or bool((low > high).any()):
            raise ConfigError(f"limits must be two (D,) arrays with low <= high, got {low} and {high}")
        if not watchdog_s > 0:
            raise ConfigError(f"watchdog_s must be > 0, got {watchdog_s!r}")
        self.low, self.high = low, high
        self.max_delta = None if limits.max_delta is None else np.asarray(limits.max_delta, dtype=np.float64)
        self.dim = low.shape[0]
        self.watchdog_s = float(watchdog_s)
        self.events: Counter[str] = Counter()
        self.reset(initial)

    def reset(self, initial: np.ndarray | None = None, now: float | None = None) -> None:
        """New episode or reconnect: hold ``initial``; the watchdog re-arms at the first fresh action."""
        self.last = None if initial is None else np.clip(np.asarray(initial, dtype=np.float64), self.low, self.high)
        self.t_fresh = None
        self.stopped = False

    def _event(self, kind: str, detail: str = "") -> None:
        self.events[kind] += 1
        n = self.events[kind]
        # every kind is logged the first time, then at 10, 100, 1000, ... so a policy that
        # clips every cycle does not flood the log (the counts are in the report)
        if kind != "hold" and (n == 1 or math.log10(n).is_integer()):
            log.warning("safety: %s%s (%d so far)", kind, f" ({detail})" if detail else "", n)

    def check(self, action: object) -> np.ndarray | None:
        """The action as a (D,) float array, or None (and an event) when it must not reach the robot."""
        try:
            a = np.asarray(action, dtype=np.float64)
        except (TypeError, ValueError):
            self._event("rejected_shape", f"not numeric: {type(action).__name__}")
            return None
        if a.shape != (self.dim,):
            self._event("rejected_shape", f"expected ({self.dim},), got {a.shape}")
            return None
        if not bool(np.isfinite(a).all()):
            self._event("rejected_nonfinite", f"{a}")
            return None
        return a

    def filter(self, action: object | None, now: float) -> SafeCommand:
        """The command to send this cycle for a policy action (None: no fresh action).

        Args:
            action: the scheduler's action for this interval, or None.
            now: current time (the loop's clock).
        """
        a = None if action is None else self.check(action)
        if a is not None:
            self.t_fresh = now
            if self.stopped:
                log.warning("safety: fresh actions again after a watchdog stop; resuming")
                self.stopped = False
            clipped = np.clip(a, self.low, self.high)
            if not np.array_equal(clipped, a):
                self._event("clipped")
            if self.max_delta is not None and self.last is not None:
                limited = np.clip(clipped, self.last - self.max_delta, self.last + self.max_delta)
                if not np.array_equal(limited, clipped):
                    self._event("rate_limited")
                clipped = limited
            self.last = clipped
            return SafeCommand(clipped.copy(), True, False)
        # the watchdog arms with the first fresh action: before it the robot has not moved
        if self.t_fresh is not None and now - self.t_fresh > self.watchdog_s:
            if not self.stopped:
                self._event("watchdog_stop", f"no fresh action for {now - self.t_fresh:.3f} s")
                self.stopped = True
            return SafeCommand(None, False, True)
        if self.stopped:
            return SafeCommand(None, False, True)
        if self.last is None:  # nothing commanded yet: nothing to hold
            return SafeCommand(None, False, False)
        self._event("hold")
        return SafeCommand(self.last.copy(), False, False)

    def counts(self) -> dict[str, int]:
        """Events by kind, every kind present."""
        return {k: int(self.events.get(k, 0)) for k in EVENTS}
