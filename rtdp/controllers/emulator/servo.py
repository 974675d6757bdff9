"""One emulated X-series servo: its control table, its motor, and the firmware between them.

The firmware parts modelled: position control (Goal Position, less Homing
Offset, drives the motor at most at the speed of Velocity Limit, Profile
Velocity and the model's no-load speed; ``Present Position = shaft position +
Homing Offset``), torque on/off, REG_WRITE's registered instruction, reboot
and factory reset, and the bus watchdog (98, unit 20 ms): with torque on and
the watchdog armed, a servo that receives no instruction packet within the
window stops, holds its present position and reads -1 at address 98; goal
writes then answer a data range error until the watchdog is written 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

from rtdp.controllers import protocol2 as p2
from rtdp.controllers.emulator.control_table import Changes, ControlTable
from rtdp.controllers.emulator.motor_model import MotorCommand, MotorModel
from rtdp.controllers.motors.registers import (
    POSITION_MODES,
    TICKS_PER_S_PER_VELOCITY_UNIT,
    VELOCITY_UNIT_RPM,
    WATCHDOG_TRIPPED,
    WATCHDOG_UNIT_MS,
    ModelSpec,
    Register,
)

_WATCHDOG_UNIT_S = WATCHDOG_UNIT_MS / 1000


@dataclass(frozen=True)
class ServoState:
    """A snapshot of one emulated servo (see :meth:`DynamixelBusEmulator.motor`)."""

    id: int
    model: str
    t: float  # time.monotonic() of the snapshot
    table: bytes
    position: float  # actual shaft position, ticks (before homing offset)
    velocity: float  # ticks/s
    watchdog_tripped: bool
    spec: ModelSpec = field(repr=False)

    def value(self, name: str) -> int:
        """Value of a control-table item by its snake_case name, e.g. ``"present_position"``."""
        r = self.spec.register(name)
        return p2.from_le(self.table[r.address : r.address + r.size], signed=r.signed)

    @property
    def torque_enabled(self) -> bool:
        return bool(self.value("torque_enable"))

    @property
    def present_position(self) -> int:
        return self.value("present_position")

    @property
    def goal_position(self) -> int:
        return self.value("goal_position")

    @property
    def bus_watchdog(self) -> int:
        return self.value("bus_watchdog")


class Servo:
    """Control table, motor and firmware of one servo. Not thread-safe: the emulator's lock guards it.

    Args:
        dxl_id: its ID on the bus.
        spec: its model.
        motor: the shaft it drives.
        now: ``time.monotonic()`` at power-up.
        id_taken: whether another servo on the bus has an ID.
    """

    def __init__(
        self,
        dxl_id: int,
        spec: ModelSpec,
        motor: MotorModel,
        now: float,
        id_taken: Callable[[int], bool] = lambda i: False,
    ) -> None:
        self.spec = spec
        self.table = ControlTable(spec)
        self.motor = motor
        self.id_taken = id_taken
        self.t = now  # the motor's state is as of this time
        self.t0 = now
        self.last_comm = now
        self.registered: Changes | None = None
        self.factory_reset(keep_id=False)
        self.table.set("id", dxl_id)
        self.table.set("goal_position", self.present_position())

    @property
    def id(self) -> int:
        return self.table.get("id")

    @property
    def tripped(self) -> bool:
        return self.table.watchdog_tripped

    def get(self, name: str) -> int:
        return self.table.get(name)

    def snapshot(self, now: float) -> ServoState:
        """Its state as of ``now`` (motion integrated up to then)."""
        self.advance(now)
        return ServoState(
            id=self.id, model=self.spec.name, t=now, table=bytes(self.table.data), position=self.motor.position,
            velocity=self.motor.velocity, watchdog_tripped=self.tripped, spec=self.spec,
        )

    # --- power ---
    def factory_reset(self, keep_id: bool = True, keep_baud: bool = False) -> None:
        self.table.factory_reset(keep=[name for name, kept in (("id", keep_id), ("baud_rate", keep_baud)) if kept])
        self.reboot_ram()

    def reboot_ram(self) -> None:
        """RAM area back to its defaults, as after power-up; EEPROM kept."""
        self.table.reset_ram()  # also clears a tripped watchdog
        self.registered = None
        self.motor.halt()
        self.table.set("goal_position", self.present_position())

    # --- motion ---
    def present_position(self) -> int:
        return int(round(self.motor.position)) + self.table.get("homing_offset")

    def speed_cap(self) -> float:
        """Largest shaft speed, ticks/s."""
        units = [self.table.get("velocity_limit"), self.spec.no_load_rpm / VELOCITY_UNIT_RPM]
        profile = self.table.get("profile_velocity")
        if profile > 0:
            units.append(profile)
        return max(min(units), 1.0) * TICKS_PER_S_PER_VELOCITY_UNIT

    def active(self) -> bool:
        t = self.table
        return bool(t.get("torque_enable")) and not t.watchdog_tripped and t.get("operating_mode") in POSITION_MODES

    def advance(self, now: float) -> None:
        """Integrate the motion up to ``now`` and trip the bus watchdog if its window has passed."""
        wd = self.table.get("bus_watchdog")
        if self.active() and 1 <= wd <= 127 and now - self.last_comm > wd * _WATCHDOG_UNIT_S:
            t_trip = self.last_comm + wd * _WATCHDOG_UNIT_S
            self._integrate(t_trip)
            self._trip()
        self._integrate(now)
        self.publish(now)

    def move_by_hand(self, ticks: float, now: float) -> None:
        """The shaft moved to ``ticks`` by hand (as a person backdriving it would)."""
        self.advance(now)
        self.motor.place(ticks)
        self.publish(now)

    def _trip(self) -> None:
        # The servo stops and holds where it is; the watchdog reads -1 until cleared.
        self.motor.halt()
        self.table.set("bus_watchdog", WATCHDOG_TRIPPED)
        self.table.set("goal_position", self.present_position())

    def _integrate(self, t1: float) -> None:
        dt = t1 - self.t
        if dt <= 0:
            return
        self.t = t1
        goal = self.table.get("goal_position") - self.table.get("homing_offset")
        self.motor.step(MotorCommand(self.active(), goal, self.speed_cap()), dt)

    def publish(self, now: float) -> None:
        """The Present values of the table from the motor's state."""
        t, motor = self.table, self.motor
        units = int(round(motor.velocity / TICKS_PER_S_PER_VELOCITY_UNIT))
        t.set("present_position", self.present_position())
        t.set("present_velocity", units)
        t.set("velocity_trajectory", units)
        t.set("position_trajectory", t.get("goal_position"))
        t.set("moving", int(abs(units) > t.get("moving_threshold")))
        t.set("moving_status", 0x01 if abs(t.get("goal_position") - self.present_position()) <= 1 else 0)
        limit = t.get("current_limit")
        t.set("present_current", int(max(-limit, min(limit, motor.current))) if self.active() else 0)
        t.set("present_pwm", 0)
        t.set("realtime_tick", int((now - self.t0) * 1000) % 32768)
        t.set("present_input_voltage", self.spec.input_voltage)
        t.set("registered_instruction", int(self.registered is not None))

    # --- instructions ---
    def check_write(self, address: int, data: bytes) -> tuple[int, Changes]:
        """Validate a write; return ``(error, [(register, value), ...])`` with error 0 if it may be applied."""
        return self.table.check_write(address, data, self.id_taken)

    def apply(self, changes: Iterable[tuple[Register, int]], now: float) -> None:
        """Store a checked write, with what it sets in motion."""
        for r, value in changes:
            if r.name == "torque_enable" and not value:
                self.motor.halt()
            if r.name == "bus_watchdog":
                self.last_comm = now  # writing 0 also clears a trip
            self.table.set(r.name, value)
        self.publish(now)

    def read(self, address: int, length: int) -> tuple[int, bytes]:
        return self.table.read(address, length)
