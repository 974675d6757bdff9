"""The one interface every robot driver has, simulated or real.

A driver owns the connection to one robot. The control loop calls ``read()``
once per cycle for a timestamped observation and ``write(action)`` with a
command the safety layer has already checked; ``stop()`` brings the robot to
a safe standstill and ``close()`` releases it. Both are safe to call in any
state and more than once, so every exit path can end in::

    with make_driver(...) as robot:      # connect() on enter
        ...                              # stop() and close() on exit, exception or not

Vendor SDKs are imported inside ``connect()``, never at module import.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class Reading:
    """One observation of the robot.

    Attributes:
        t: ``time.monotonic()`` at which the observation was taken (for a
            simulated robot, the moment its state was published).
        obs: observation arrays keyed as the policy's task names them, e.g.
            ``{"keypoint": (9, 2), "agent_pos": (2,)}`` or ``{"joint_pos": (N,)}``.
        info: extra per-reading facts (``score``, ``is_success``, ``episode_done``, ...).
    """

    t: float
    obs: dict[str, np.ndarray]
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ActionLimits:
    """What the safety layer enforces before a command reaches the driver.

    Attributes:
        low, high: per-dimension command bounds (D,), in the driver's units.
        max_delta: largest change of the command per control cycle (D,); None: unlimited.
    """

    low: np.ndarray
    high: np.ndarray
    max_delta: np.ndarray | None = None


@runtime_checkable
class Driver(Protocol):
    """Interface of every driver (``sim``, ``dynamixel``)."""

    name: str
    action_dim: int

    def connect(self) -> None:
        """Open the connection and check the robot is the one configured.

        Raises:
            DriverError: port missing, robot not answering, wrong model.
        """

    def read(self) -> Reading:
        """The newest observation.

        Raises:
            DeviceNotConnectedError: not connected.
            DeviceDisconnectedError: the robot went away.
        """

    def write(self, action: np.ndarray) -> None:
        """Send one command (D,) in the driver's units; returns without waiting for motion."""

    def stop(self) -> None:
        """Bring the robot to a safe standstill (hold position). Never raises."""

    def close(self) -> None:
        """Stop and release the robot (torque off for servos). Never raises; idempotent."""

    @property
    def limits(self) -> ActionLimits:
        """Command limits for the safety layer."""

    def __enter__(self) -> "Driver": ...

    def __exit__(self, *exc: object) -> None: ...


class DriverBase:
    """Context-manager plumbing shared by drivers: ``connect`` on enter, ``stop`` + ``close`` on exit."""

    name = "driver"
    action_dim = 0

    def __enter__(self):
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        finally:
            self.close()

    def connect(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def stop(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError
