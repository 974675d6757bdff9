"""The motor behind an emulated servo's control table: what the shaft does under the firmware's command.

The servo firmware (:mod:`~rtdp.controllers.emulator.servo`) turns its
control table into a :class:`MotorCommand` and asks a :class:`MotorModel` to
advance by ``dt``; the model's position, velocity and current become Present
Position, Present Velocity and Present Current. Any object with the
Protocol's members can stand in, e.g. a simulated twin of the arm: pass
``motor_model=`` to :class:`~rtdp.controllers.emulator.DynamixelBusEmulator`.

:class:`FirstOrderMotor`, the default, follows Goal Position as a first-order
system with a velocity cap, integrated exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol, runtime_checkable

from rtdp.controllers.motors.registers import TICKS_PER_S_PER_VELOCITY_UNIT, ModelSpec


@dataclass(frozen=True)
class MotorCommand:
    """What the firmware asks of the shaft; constant over one step.

    Attributes:
        driven: torque on, the bus watchdog not tripped and a position-control
            operating mode; False: the shaft is not driven.
        goal_position: target, ticks of the shaft (Goal Position - Homing Offset).
        max_speed: speed cap, ticks/s (from Velocity Limit, Profile Velocity
            and the model's no-load speed).
    """

    driven: bool
    goal_position: float
    max_speed: float


@runtime_checkable
class MotorModel(Protocol):
    """The shaft of one servo.

    ``position`` is in ticks of the shaft before Homing Offset (4096 per
    turn), ``velocity`` in ticks/s, ``current`` in Present Current units.
    Called under the emulator's lock, with ``dt > 0`` in wall-clock seconds.
    """

    @property
    def position(self) -> float: ...

    @property
    def velocity(self) -> float: ...

    @property
    def current(self) -> float: ...

    def step(self, command: MotorCommand, dt: float) -> None:
        """Advance the shaft by ``dt`` seconds under ``command``."""

    def halt(self) -> None:
        """The firmware stopped driving the shaft (torque off, watchdog trip, reboot): velocity 0 where it is."""

    def place(self, position: float) -> None:
        """Move the shaft to ``position`` ticks by hand, at rest."""


# Builds the motor of one servo: (servo id, model spec, initial shaft position in ticks) -> MotorModel.
MotorModelFactory = Callable[[int, ModelSpec, float], MotorModel]


class FirstOrderMotor:
    """A shaft that follows the goal as ``theta' = clip(k (goal - theta), -vmax, vmax)``, ``k = 1 / time_constant_s``.

    The step is solved exactly (a constant-speed leg while saturated, then an
    exponential approach), so Present Position and Present Velocity are
    consistent with each other whenever they are read.

    Args:
        position: initial shaft position, ticks.
        time_constant_s: time constant of the approach once below the speed cap.
    """

    def __init__(self, position: float, time_constant_s: float) -> None:
        self.gain = 1.0 / time_constant_s
        self.position = float(position)
        self.velocity = 0.0

    @classmethod
    def factory(cls, time_constant_s: float) -> MotorModelFactory:
        """A :data:`MotorModelFactory` of first-order motors with this time constant."""
        return lambda dxl_id, spec, position: cls(position, time_constant_s)

    @property
    def current(self) -> float:
        """A rough load proportional to speed (2 units per Present Velocity unit), so the field is not constant zero."""
        return 2 * int(round(self.velocity / TICKS_PER_S_PER_VELOCITY_UNIT))

    def step(self, command: MotorCommand, dt: float) -> None:
        if not command.driven:
            self.velocity = 0.0
            return
        target, k, vmax = command.goal_position, self.gain, command.max_speed
        e = target - self.position
        if abs(e) * k > vmax:
            t_sat = (abs(e) - vmax / k) / vmax
            direction = math.copysign(1.0, e)
            if dt <= t_sat:
                self.position += direction * vmax * dt
                self.velocity = direction * vmax
                return
            self.position += direction * (abs(e) - vmax / k)
            dt -= t_sat
            e = target - self.position
        e_end = e * math.exp(-k * dt)
        self.position = target - e_end
        self.velocity = k * e_end

    def halt(self) -> None:
        self.velocity = 0.0

    def place(self, position: float) -> None:
        self.position = float(position)
        self.velocity = 0.0
