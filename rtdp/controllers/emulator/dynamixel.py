"""A DYNAMIXEL Protocol 2.0 bus with X-series servos, served on a pseudo-terminal.

The emulator opens a pty pair; its slave path (``/dev/pts/N``) is what
``dynamixel_sdk.PortHandler`` or any serial program opens, exactly like a
U2D2 adapter's ``/dev/ttyUSB0``. A background thread reads instruction
packets from the master side with :class:`~rtdp.controllers.protocol2.PacketParser`,
applies them to one control table per servo and answers with status packets.

What is modelled (addresses and sizes from the ROBOTIS e-Manual pages of the
XL330-M288 and XM430-W350):

* the control table bytes, with access rules: read-only fields and undefined
  addresses answer an access error, the EEPROM area (addresses < 64) is
  writable only with torque off, values outside a field's range answer a
  data range error, a goal position outside Min/Max Position Limit (52/48)
  answers a data limit error; a write is applied only if every field in it
  passes (nothing is half-applied);
* position control: with torque on, the shaft follows Goal Position as a
  first-order system with a velocity cap (Velocity Limit, Profile Velocity
  and the model's no-load speed), integrated exactly in wall-clock time, so
  Present Position (ticks, 4096/rev) and Present Velocity (0.229 rev/min per
  unit) are consistent with each other whenever they are read;
  ``Present Position = actual position + Homing Offset`` as on the servo;
* the bus watchdog (98, unit 20 ms): with torque on and the watchdog armed,
  a servo that receives no instruction packet (addressed to its ID, or
  broadcast) within the window stops, holds its present position, and reads
  -1 (0xFF) at address 98; goal writes then answer a data range error until
  the watchdog is written 0, after which it can be armed again;
* status return level, return delay time, REG_WRITE/ACTION, REBOOT,
  FACTORY_RESET, SYNC/BULK READ/WRITE; replies in the order of the IDs in
  the request, each after the previous one, delayed by the return delay
  plus 10 bit times per byte at the configured baud rate (``timing=True``);
* faults drawn from a seeded RNG (:class:`FaultConfig`): corrupted CRC,
  dropped reply, late reply (after the SDK's ~34 ms timeout), garbage bytes
  before a reply; and :meth:`DynamixelBusEmulator.disconnect`, which closes
  the pty under a connected program as a pulled cable does.

Not modelled: Drive Mode's reverse bit (stored, motion unaffected),
operating modes other than position control (velocity/current/PWM goals are
range-checked and stored but do not move the shaft), multi-turn, load,
temperature, FAST_SYNC_READ / FAST_BULK_READ (ignored, no reply).

Every decoded instruction packet is appended to :attr:`DynamixelBusEmulator.log`
and every status packet sent (or withheld by a fault) to
:attr:`DynamixelBusEmulator.replies`, so tests can check what a driver put on
the bus and what state it was told.

Run standalone::

    python -m rtdp.controllers.emulator.dynamixel --motors 1,2,3,4,5,6 --model xl330-m288

prints the port path on one line and serves until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import gc
import collections
import errno
import functools
import math
import os
import random
import select
import signal
import sys
import threading
import time
import tty
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

from rtdp.controllers import protocol2 as p2
from rtdp.controllers.protocol2 import ErrorCode, Instruction
from rtdp.errors import ConfigError

TICKS_PER_REV = 4096
VELOCITY_UNIT_RPM = 0.229
# One Present Velocity unit in ticks per second.
TICKS_PER_S_PER_VELOCITY_UNIT = VELOCITY_UNIT_RPM / 60.0 * TICKS_PER_REV
TABLE_SIZE = 228  # through Indirect Data 20 of the XL330; the emulator does not model indirect addressing
EEPROM_END = 64
# Baud Rate (8) index -> bit/s, X series.
BAUD_RATES = {0: 9600, 1: 57600, 2: 115200, 3: 1_000_000, 4: 2_000_000, 5: 3_000_000, 6: 4_000_000, 7: 4_500_000}


@dataclass(frozen=True)
class FieldSpec:
    """One item of a control table.

    Attributes:
        name: snake_case name of the e-Manual's data name.
        address, size: location in the table (bytes, little-endian).
        writable: False for read-only (R) items.
        signed: two's complement value.
        default: initial value.
        low, high: accepted range for writes (inclusive); None: any value of the size.
    """

    name: str
    address: int
    size: int
    writable: bool = True
    signed: bool = False
    default: int = 0
    low: int | None = None
    high: int | None = None

    @property
    def eeprom(self) -> bool:
        return self.address < EEPROM_END


@dataclass(frozen=True)
class ModelSpec:
    """A servo model: its model number, control table and motor constants."""

    name: str
    model_number: int
    firmware: int
    fields: tuple[FieldSpec, ...]
    no_load_rpm: float  # caps the emulated shaft speed
    input_voltage: int  # Present Input Voltage, 0.1 V

    def field(self, name: str) -> FieldSpec:
        """The item called ``name``; KeyError if the model has none."""
        return self._by_name[name]

    @functools.cached_property
    def _by_name(self) -> dict[str, FieldSpec]:
        return {f.name: f for f in self.fields}


def _x_series_fields(model_number: int, firmware: int, **defaults: int) -> tuple[FieldSpec, ...]:
    d = {
        "temperature_limit": 70, "max_voltage_limit": 70, "min_voltage_limit": 35, "current_limit": 1750,
        "velocity_limit": 445, "shutdown": 53, "velocity_i_gain": 1600, "velocity_p_gain": 180,
        "position_p_gain": 400,
    }
    d.update(defaults)
    R = dict(writable=False)
    return (
        # EEPROM area
        FieldSpec("model_number", 0, 2, default=model_number, **R),
        FieldSpec("model_information", 2, 4, **R),
        FieldSpec("firmware_version", 6, 1, default=firmware, **R),
        FieldSpec("id", 7, 1, default=1, low=0, high=252),
        FieldSpec("baud_rate", 8, 1, default=3, low=0, high=7),
        FieldSpec("return_delay_time", 9, 1, default=250, low=0, high=254),
        FieldSpec("drive_mode", 10, 1, default=0, low=0, high=13),
        FieldSpec("operating_mode", 11, 1, default=3, low=0, high=16),
        FieldSpec("secondary_id", 12, 1, default=255, low=0, high=255),
        FieldSpec("protocol_type", 13, 1, default=2, low=1, high=22),
        FieldSpec("homing_offset", 20, 4, signed=True, default=0, low=-1_044_479, high=1_044_479),
        FieldSpec("moving_threshold", 24, 4, default=10, low=0, high=1023),
        FieldSpec("temperature_limit", 31, 1, default=d["temperature_limit"], low=0, high=100),
        FieldSpec("max_voltage_limit", 32, 2, default=d["max_voltage_limit"], low=0, high=200),
        FieldSpec("min_voltage_limit", 34, 2, default=d["min_voltage_limit"], low=0, high=200),
        FieldSpec("pwm_limit", 36, 2, default=885, low=0, high=885),
        FieldSpec("current_limit", 38, 2, default=d["current_limit"], low=0, high=d["current_limit"]),
        FieldSpec("velocity_limit", 44, 4, default=d["velocity_limit"], low=0, high=2047),
        FieldSpec("max_position_limit", 48, 4, default=4095, low=0, high=4095),
        FieldSpec("min_position_limit", 52, 4, default=0, low=0, high=4095),
        FieldSpec("startup_configuration", 60, 1, default=0, low=0, high=3),
        FieldSpec("shutdown", 63, 1, default=d["shutdown"], low=0, high=255),
        # RAM area
        FieldSpec("torque_enable", 64, 1, default=0, low=0, high=1),
        FieldSpec("led", 65, 1, default=0, low=0, high=1),
        FieldSpec("status_return_level", 68, 1, default=2, low=0, high=2),
        FieldSpec("registered_instruction", 69, 1, **R),
        FieldSpec("hardware_error_status", 70, 1, **R),
        FieldSpec("velocity_i_gain", 76, 2, default=d["velocity_i_gain"], low=0, high=16383),
        FieldSpec("velocity_p_gain", 78, 2, default=d["velocity_p_gain"], low=0, high=16383),
        FieldSpec("position_d_gain", 80, 2, default=0, low=0, high=16383),
        FieldSpec("position_i_gain", 82, 2, default=0, low=0, high=16383),
        FieldSpec("position_p_gain", 84, 2, default=d["position_p_gain"], low=0, high=16383),
        FieldSpec("feedforward_2nd_gain", 88, 2, default=0, low=0, high=16383),
        FieldSpec("feedforward_1st_gain", 90, 2, default=0, low=0, high=16383),
        FieldSpec("bus_watchdog", 98, 1, signed=True, default=0, low=0, high=127),
        # Goal ranges depend on the limits; checked in _check_value.
        FieldSpec("goal_pwm", 100, 2, signed=True),
        FieldSpec("goal_current", 102, 2, signed=True),
        FieldSpec("goal_velocity", 104, 4, signed=True),
        FieldSpec("profile_acceleration", 108, 4, default=0, low=0, high=32767),
        FieldSpec("profile_velocity", 112, 4, default=0, low=0, high=32767),
        FieldSpec("goal_position", 116, 4, signed=True),
        FieldSpec("realtime_tick", 120, 2, **R),
        FieldSpec("moving", 122, 1, **R),
        FieldSpec("moving_status", 123, 1, **R),
        FieldSpec("present_pwm", 124, 2, signed=True, **R),
        FieldSpec("present_current", 126, 2, signed=True, **R),
        FieldSpec("present_velocity", 128, 4, signed=True, **R),
        FieldSpec("present_position", 132, 4, signed=True, **R),
        FieldSpec("velocity_trajectory", 136, 4, signed=True, **R),
        FieldSpec("position_trajectory", 140, 4, signed=True, **R),
        FieldSpec("present_input_voltage", 144, 2, **R),
        FieldSpec("present_temperature", 146, 1, default=30, **R),
    )


MODELS: dict[str, ModelSpec] = {
    "xl330-m288": ModelSpec("xl330-m288", 1200, 46, _x_series_fields(1200, 46), no_load_rpm=103.0, input_voltage=50),
    "xm430-w350": ModelSpec(
        "xm430-w350", 1020, 48,
        _x_series_fields(
            1020, 48, temperature_limit=80, max_voltage_limit=160, min_voltage_limit=95, current_limit=1193,
            velocity_limit=350, shutdown=52, velocity_i_gain=1920, velocity_p_gain=100, position_p_gain=800,
        ),
        no_load_rpm=46.0, input_voltage=120,
    ),
}

# A reply to send: (servo id, bytes or None when dropped, bus delay s, fault delay s).
_Outgoing = tuple[int, "bytes | None", float, float]
_GOAL_FIELDS = ("goal_pwm", "goal_current", "goal_velocity", "goal_position")
_WATCHDOG_ERROR = -1


@dataclass(frozen=True)
class FaultConfig:
    """Faults injected into status packets, each drawn per reply from the emulator's seeded RNG.

    Attributes:
        corrupt_crc: probability that a reply's CRC is wrong.
        drop_reply: probability that a reply is not sent.
        late_reply: probability that a reply is sent ``late_reply_s`` late.
        late_reply_s: delay of a late reply; the default is past the SDK's
            ~34 ms status timeout, so the SDK has given up when it arrives
            (and within the SDK timeout + the driver's ``resync_s``, the
            window in which the driver flushes such stragglers).
        garbage: probability of 1..``garbage_max_bytes`` random bytes before a reply.
        garbage_max_bytes: longest garbage burst. Garbage bytes never include
            0xFF, so they cannot begin a header and every reply after them is
            still decodable; header-like noise is a corrupted packet, which
            ``corrupt_crc`` covers.
    """

    corrupt_crc: float = 0.0
    drop_reply: float = 0.0
    late_reply: float = 0.0
    late_reply_s: float = 0.045
    garbage: float = 0.0
    garbage_max_bytes: int = 8

    def __post_init__(self) -> None:
        for name in ("corrupt_crc", "drop_reply", "late_reply", "garbage"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"FaultConfig.{name} must be a probability in [0, 1], got {value}")
        if self.late_reply_s < 0 or self.garbage_max_bytes < 1:
            raise ConfigError("FaultConfig.late_reply_s must be >= 0 and garbage_max_bytes >= 1")


@dataclass(frozen=True)
class LoggedPacket:
    """One decoded instruction packet.

    Attributes:
        seq: running number of instruction packets.
        t: ``time.monotonic()`` when it was decoded.
        id: packet ID (``0xFE`` for broadcast).
        instruction: instruction byte.
        params: parameters (unstuffed).
        writes: for WRITE / REG_WRITE / SYNC_WRITE / BULK_WRITE,
            ``{servo id: (address, data bytes)}`` as decoded from the packet
            (whether or not the servo accepted it).
        reads: for READ / SYNC_READ / BULK_READ, ``{servo id: (address, length)}``.
        raw: the packet's bytes as received (stuffed, with CRC).
    """

    seq: int
    t: float
    id: int
    instruction: int
    params: bytes
    writes: dict[int, tuple[int, bytes]] = field(default_factory=dict)
    reads: dict[int, tuple[int, int]] = field(default_factory=dict)
    raw: bytes = field(default=b"", repr=False)

    def values(self, address: int, size: int, signed: bool = True) -> dict[int, int]:
        """Decoded values written at ``address`` (``size`` bytes) per servo, for write packets."""
        out = {}
        for dxl_id, (start, data) in self.writes.items():
            offset = address - start
            if 0 <= offset and offset + size <= len(data):
                out[dxl_id] = p2.from_le(data[offset : offset + size], signed=signed)
        return out


@dataclass(frozen=True)
class ReplyRecord:
    """One status packet the emulator produced.

    Attributes:
        seq: ``seq`` of the instruction packet it answers.
        t: ``time.monotonic()`` when its data was sampled (the request was processed).
        id: servo ID.
        error: error byte.
        data: status data (for a read, the table bytes).
        fault: None, or the fault applied: ``"corrupt_crc"``, ``"drop"``, ``"late"``, ``"garbage"``.
    """

    seq: int
    t: float
    id: int
    error: int
    data: bytes
    fault: str | None = None


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
        f = self.spec.field(name)
        return p2.from_le(self.table[f.address : f.address + f.size], signed=f.signed)

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


class _Servo:
    """Control table and motion of one servo. Not thread-safe: the emulator's lock guards it."""

    def __init__(
        self,
        dxl_id: int,
        spec: ModelSpec,
        position: float,
        time_constant_s: float,
        now: float,
        id_taken: Callable[[int], bool] = lambda i: False,
    ) -> None:
        self.spec = spec
        self.id_taken = id_taken
        self.by_address = {f.address: f for f in spec.fields}
        self.table = bytearray(TABLE_SIZE)
        self.defined = bytearray(TABLE_SIZE)  # 1 where a field's byte lives
        for f in spec.fields:
            self.defined[f.address : f.address + f.size] = b"\x01" * f.size
        self.gain = 1.0 / time_constant_s
        self.theta = float(position)
        self.velocity = 0.0
        self.t = now
        self.t0 = now
        self.last_comm = now
        self.tripped = False
        self.registered: list[tuple[FieldSpec, int]] | None = None
        self.factory_reset(keep_id=False)
        self.set("id", dxl_id)
        self.set("goal_position", self.present_position())

    # --- table access ---
    def get(self, name: str) -> int:
        f = self.spec.field(name)
        return p2.from_le(self.table[f.address : f.address + f.size], signed=f.signed)

    def set(self, name: str, value: int) -> None:
        f = self.spec.field(name)
        self.table[f.address : f.address + f.size] = p2.to_le(value, f.size)

    @property
    def id(self) -> int:
        return self.table[7]

    def factory_reset(self, keep_id: bool = True, keep_baud: bool = False) -> None:
        dxl_id, baud = self.table[7], self.table[8]
        for f in self.spec.fields:
            self.set(f.name, f.default)
        if keep_id:
            self.table[7] = dxl_id
        if keep_baud:
            self.table[8] = baud
        self.reboot_ram()

    def reboot_ram(self) -> None:
        """RAM area back to its defaults, as after power-up; EEPROM kept."""
        for f in self.spec.fields:
            if not f.eeprom:
                self.set(f.name, f.default)
        self.tripped = False
        self.registered = None
        self.velocity = 0.0
        self.set("goal_position", self.present_position())

    # --- motion ---
    def present_position(self) -> int:
        return int(round(self.theta)) + self.get("homing_offset")

    def speed_cap(self) -> float:
        """Largest shaft speed, ticks/s."""
        units = [self.get("velocity_limit"), self.spec.no_load_rpm / VELOCITY_UNIT_RPM]
        profile = self.get("profile_velocity")
        if profile > 0:
            units.append(profile)
        return max(min(units), 1.0) * TICKS_PER_S_PER_VELOCITY_UNIT

    def active(self) -> bool:
        return bool(self.get("torque_enable")) and not self.tripped and self.get("operating_mode") in (3, 4, 5)

    def advance(self, now: float) -> None:
        """Integrate the motion up to ``now`` and trip the bus watchdog if its window has passed."""
        wd = self.get("bus_watchdog")
        if self.active() and 1 <= wd <= 127 and now - self.last_comm > wd * 0.020:
            t_trip = self.last_comm + wd * 0.020
            self._integrate(t_trip)
            self._trip()
        self._integrate(now)
        self._publish(now)

    def _trip(self) -> None:
        # The servo stops and holds where it is; the watchdog reads -1 until cleared.
        self.tripped = True
        self.velocity = 0.0
        self.set("bus_watchdog", _WATCHDOG_ERROR)
        self.set("goal_position", self.present_position())

    def _integrate(self, t1: float) -> None:
        dt = t1 - self.t
        if dt <= 0:
            return
        self.t = t1
        if not self.active():
            self.velocity = 0.0
            return
        # theta' = clip(k (target - theta), -vmax, vmax), solved exactly: a
        # constant-speed leg while saturated, then an exponential approach.
        target = self.get("goal_position") - self.get("homing_offset")
        k, vmax = self.gain, self.speed_cap()
        e = target - self.theta
        if abs(e) * k > vmax:
            t_sat = (abs(e) - vmax / k) / vmax
            direction = math.copysign(1.0, e)
            if dt <= t_sat:
                self.theta += direction * vmax * dt
                self.velocity = direction * vmax
                return
            self.theta += direction * (abs(e) - vmax / k)
            dt -= t_sat
            e = target - self.theta
        e_end = e * math.exp(-k * dt)
        self.theta = target - e_end
        self.velocity = k * e_end

    def _publish(self, now: float) -> None:
        units = int(round(self.velocity / TICKS_PER_S_PER_VELOCITY_UNIT))
        self.set("present_position", self.present_position())
        self.set("present_velocity", units)
        self.set("velocity_trajectory", units)
        self.set("position_trajectory", self.get("goal_position"))
        self.set("moving", int(abs(units) > self.get("moving_threshold")))
        self.set("moving_status", 0x01 if abs(self.get("goal_position") - self.present_position()) <= 1 else 0)
        # Rough proportional load so the field is not constant zero.
        current = int(max(-self.get("current_limit"), min(self.get("current_limit"), units * 2)))
        self.set("present_current", current if self.active() else 0)
        self.set("present_pwm", 0)
        self.set("realtime_tick", int((now - self.t0) * 1000) % 32768)
        self.set("present_input_voltage", self.spec.input_voltage)
        self.set("registered_instruction", int(self.registered is not None))

    # --- instruction semantics ---
    def check_write(self, address: int, data: bytes) -> tuple[int, list[tuple[FieldSpec, int]]]:
        """Validate a write; return ``(error, [(field, value), ...])`` with error 0 if it may be applied."""
        if address + len(data) > TABLE_SIZE or not data:
            return ErrorCode.ACCESS, []
        changes = []
        i = 0
        while i < len(data):
            a = address + i
            f = self.by_address.get(a)
            if f is None:
                # Inside a multi-byte field (partial write) or an undefined byte.
                return (ErrorCode.DATA_LENGTH if self.defined[a] else ErrorCode.ACCESS), []
            if i + f.size > len(data):
                return ErrorCode.DATA_LENGTH, []
            if not f.writable:
                return ErrorCode.ACCESS, []
            if f.eeprom and self.get("torque_enable"):
                return ErrorCode.ACCESS, []  # EEPROM is locked while torque is on
            value = p2.from_le(data[i : i + f.size], signed=f.signed)
            error = self._check_value(f, value)
            if not error and f.name == "id" and value != self.id and self.id_taken(value):
                error = ErrorCode.RESULT_FAIL  # two servos with one ID would make the bus unusable
            if error:
                return error, []
            changes.append((f, value))
            i += f.size
        return ErrorCode.NONE, changes

    def _check_value(self, f: FieldSpec, value: int) -> int:
        if f.name in _GOAL_FIELDS and self.tripped:
            return ErrorCode.DATA_RANGE  # goal values are read-only after a watchdog error
        if f.name == "bus_watchdog" and self.tripped and value != 0:
            return ErrorCode.DATA_RANGE  # must be cleared with 0 before it can be armed again
        if f.name == "goal_position":
            lo, hi = self.get("min_position_limit"), self.get("max_position_limit")
            return ErrorCode.DATA_LIMIT if not lo <= value <= hi else 0
        limits = {"goal_pwm": "pwm_limit", "goal_current": "current_limit", "goal_velocity": "velocity_limit"}
        if f.name in limits:
            bound = self.get(limits[f.name])
            return ErrorCode.DATA_LIMIT if not -bound <= value <= bound else 0
        if f.low is not None and not f.low <= value <= f.high:
            return ErrorCode.DATA_RANGE
        return 0

    def apply(self, changes: Iterable[tuple[FieldSpec, int]], now: float) -> None:
        for f, value in changes:
            if f.name == "torque_enable" and not value:
                self.velocity = 0.0
            if f.name == "bus_watchdog":
                if value == 0:
                    self.tripped = False
                self.last_comm = now
            self.set(f.name, value)
        self._publish(now)

    def read(self, address: int, length: int) -> tuple[int, bytes]:
        if length == 0 or address + length > TABLE_SIZE:
            return ErrorCode.ACCESS, b""
        return ErrorCode.NONE, bytes(self.table[address : address + length])


class DynamixelBusEmulator:
    """Several X-series servos on one Protocol 2.0 bus, served on a pty.

    Args:
        motors: ``{id: model name}``, model names as in :data:`MODELS`
            (``"xl330-m288"``, ``"xm430-w350"``).
        faults: faults to inject into replies; None: none.
        seed: seed of the fault RNG.
        baudrate: bit rate used for reply timing (a pty itself has no rate).
        timing: delay replies like a real bus (return delay + 10 bits/byte);
            False answers as fast as possible.
        initial_position: actual shaft position at start, ticks; one value or ``{id: ticks}``.
        time_constant_s: time constant of the position response.
        log_size: most instruction packets / replies kept in :attr:`log` / :attr:`replies`.

    Example::

        with DynamixelBusEmulator({1: "xl330-m288", 2: "xl330-m288"}) as emu:
            port = emu.port          # "/dev/pts/N"
            ...                      # drive it with dynamixel_sdk
            emu.motor(1).present_position
    """

    def __init__(
        self,
        motors: Mapping[int, str],
        faults: FaultConfig | None = None,
        seed: int = 0,
        *,
        baudrate: int = 1_000_000,
        timing: bool = True,
        initial_position: float | Mapping[int, float] = 2048.0,
        time_constant_s: float = 0.05,
        log_size: int = 200_000,
    ) -> None:
        if not motors:
            raise ConfigError("DynamixelBusEmulator needs at least one motor, e.g. {1: 'xl330-m288'}")
        for dxl_id, model in motors.items():
            if not 0 <= int(dxl_id) <= p2.MAX_ID:
                raise ConfigError(f"servo ID must be 0..{p2.MAX_ID}, got {dxl_id}")
            if model not in MODELS:
                raise ConfigError(f"unknown Dynamixel model {model!r}; known models: {', '.join(sorted(MODELS))}")
        if baudrate <= 0 or time_constant_s <= 0:
            raise ConfigError("baudrate and time_constant_s must be positive")
        self.faults = faults or FaultConfig()
        self.baudrate = int(baudrate)
        self.timing = timing
        self._rng = random.Random(seed)
        self._lock = threading.RLock()
        now = time.monotonic()
        self._servos: dict[int, _Servo] = {}
        for dxl_id, model in motors.items():
            pos = initial_position[dxl_id] if isinstance(initial_position, Mapping) else initial_position
            self._servos[int(dxl_id)] = _Servo(
                int(dxl_id), MODELS[model], float(pos), time_constant_s, now, id_taken=self._id_taken
            )
        self._log: collections.deque[LoggedPacket] = collections.deque(maxlen=log_size)
        self._replies: collections.deque[ReplyRecord] = collections.deque(maxlen=log_size)
        self._seq = 0
        self.fault_counts: collections.Counter[str] = collections.Counter()
        self.bad_packets = 0
        self._parser = p2.PacketParser(on_bad=self._on_bad_packet)
        self._pending_bad: list[bytes] = []
        self._master: int | None = None
        self._slave: int | None = None
        self._wake_r: int | None = None
        self._wake_w: int | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._closed = threading.Event()
        self.port: str | None = None

    # --- lifecycle ---
    def start(self) -> str:
        """Open the pty and serve it in a background thread; returns the slave path to open."""
        if self._thread is not None:
            raise RuntimeError("emulator already started")
        master, slave = os.openpty()
        # Raw mode: no echo, no line editing, no CR/LF translation; the SDK's
        # pyserial would set this too, but a plain program may not.
        tty.setraw(slave)
        # Non-blocking master: if the program on the slave side stops reading,
        # replies are dropped (as on a bus nobody listens to) instead of
        # blocking the serving thread on a full pty buffer.
        os.set_blocking(master, False)
        self._master, self._slave = master, slave
        # Keeping our own slave fd open means the master never reads EIO
        # between a client's close and its next open.
        self._wake_r, self._wake_w = os.pipe()
        self.port = os.ttyname(slave)
        self._stop.clear()
        self._closed.clear()
        self._thread = threading.Thread(target=self._serve, name=f"dxl-emulator {self.port}", daemon=True)
        self._thread.start()
        return self.port

    def disconnect(self) -> None:
        """Close the pty now, as a pulled cable would: the connected program's next read/write fails.

        The emulator's state stays inspectable; it does not serve again.
        """
        self._stop.set()
        if self._wake_w is not None:
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._closed.wait(timeout=2.0 + self.faults.late_reply_s)

    def stop(self) -> None:
        """Stop serving and close the pty (idempotent)."""
        self.disconnect()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2.0 + self.faults.late_reply_s)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> "DynamixelBusEmulator":
        if self._thread is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- inspection ---
    @property
    def log(self) -> list[LoggedPacket]:
        """Every decoded instruction packet, oldest first (a copy)."""
        with self._lock:
            return list(self._log)

    @property
    def replies(self) -> list[ReplyRecord]:
        """Every status packet produced (including ones a fault dropped), oldest first (a copy)."""
        with self._lock:
            return list(self._replies)

    def clear_log(self) -> None:
        with self._lock:
            self._log.clear()
            self._replies.clear()

    @property
    def ids(self) -> list[int]:
        with self._lock:
            return sorted(self._servos)

    def motor(self, dxl_id: int) -> ServoState:
        """Snapshot of one servo, with its motion integrated up to now."""
        with self._lock:
            servo = self._servos[dxl_id]
            now = time.monotonic()
            servo.advance(now)
            return ServoState(
                id=dxl_id, model=servo.spec.name, t=now, table=bytes(servo.table), position=servo.theta,
                velocity=servo.velocity, watchdog_tripped=servo.tripped, spec=servo.spec,
            )

    def set_position(self, dxl_id: int, ticks: float) -> None:
        """Move a servo's shaft by hand (as a person backdriving it would), torque off or on."""
        with self._lock:
            servo = self._servos[dxl_id]
            servo.advance(time.monotonic())
            servo.theta = float(ticks)
            servo.velocity = 0.0
            servo._publish(time.monotonic())

    # --- serving ---
    def _serve(self) -> None:
        assert self._master is not None and self._wake_r is not None
        try:
            while not self._stop.is_set():
                try:
                    ready, _, _ = select.select([self._master, self._wake_r], [], [], 0.05)
                except (OSError, ValueError):
                    break
                if self._stop.is_set():
                    break
                if self._master not in ready:
                    continue
                try:
                    data = os.read(self._master, 4096)
                except OSError as exc:
                    if exc.errno in (errno.EIO, errno.EAGAIN):
                        time.sleep(0.005)
                        continue
                    raise
                if not data:
                    continue
                with self._lock:
                    packets = self._parser.feed(data)
                    bad, self._pending_bad = self._pending_bad, []
                for raw in bad:
                    self._send(self._answer_bad(raw))
                for packet in packets:
                    self._send(self._handle(packet))
                    if self._stop.is_set():
                        break
        finally:
            self._close_fds()
            self._closed.set()

    def _close_fds(self) -> None:
        for name in ("_master", "_slave", "_wake_r", "_wake_w"):
            fd = getattr(self, name)
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
                setattr(self, name, None)

    def _on_bad_packet(self, raw: bytes, reason: str) -> None:
        # Called by the parser under the lock; answered after the good packets are parsed.
        self.bad_packets += 1
        self._pending_bad.append(raw)

    def _answer_bad(self, raw: bytes) -> list[_Outgoing]:
        # A servo that sees its own ID in a packet with a bad CRC answers a CRC error.
        if len(raw) < 5:
            return []
        with self._lock:
            servo = self._servos.get(raw[4])
            if servo is None:
                return []
            seq = self._next_seq()
            return [self._reply(servo, seq, time.monotonic(), ErrorCode.CRC)]

    def _id_taken(self, dxl_id: int) -> bool:
        return any(s.id == dxl_id for s in self._servos.values())

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _send(self, replies: list[_Outgoing]) -> None:
        """Write status packets one after another, with bus timing and faults."""
        # Each reply follows the previous one on the bus; sleeping to absolute
        # deadlines keeps sleep overshoot from adding up over a sync read.
        deadline = time.monotonic()
        for dxl_id, raw, bus_delay, fault_delay in replies:
            if self._stop.is_set() or self._master is None:
                return
            deadline += (bus_delay if self.timing else 0.0) + fault_delay
            pause = deadline - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            if raw is None:
                continue  # dropped by a fault
            try:
                os.write(self._master, raw)
            except BlockingIOError:
                continue
            except OSError:
                return

    def _reply(self, servo: _Servo, seq: int, now: float, error: int, data: bytes = b"") -> _Outgoing:
        """Encode one status packet, apply faults, record it."""
        if servo.get("hardware_error_status"):
            error |= p2.ERRBIT_ALERT
        raw = p2.encode_status(servo.id, error, data)
        delay = servo.get("return_delay_time") * 2e-6 + len(raw) * 10.0 / self.baudrate
        fault, fault_delay = None, 0.0
        fc, rng = self.faults, self._rng
        if fc.corrupt_crc and rng.random() < fc.corrupt_crc:
            fault = "corrupt_crc"
            raw = raw[:-2] + bytes([raw[-2] ^ 0xA5, raw[-1]])
        elif fc.drop_reply and rng.random() < fc.drop_reply:
            fault = "drop"
            raw = None
        elif fc.late_reply and rng.random() < fc.late_reply:
            fault = "late"
            fault_delay = fc.late_reply_s
        elif fc.garbage and rng.random() < fc.garbage:
            fault = "garbage"
            n = rng.randint(1, fc.garbage_max_bytes)
            raw = bytes(rng.randrange(0xFF) for _ in range(n)) + raw
        if fault:
            self.fault_counts[fault] += 1
        self._replies.append(ReplyRecord(seq, now, servo.id, error, bytes(data), fault))
        return servo.id, raw, delay, fault_delay

    def _handle(self, packet: p2.Packet) -> list[_Outgoing]:
        """Apply one instruction packet; return the replies to send, in bus order."""
        now = time.monotonic()
        with self._lock:
            for servo in self._servos.values():
                servo.advance(now)  # state as of this packet, before it counts for the watchdog
            broadcast = packet.id == p2.BROADCAST_ID
            for servo in self._servos.values():
                if broadcast or servo.id == packet.id:
                    servo.last_comm = now
            seq = self._next_seq()
            entry = LoggedPacket(seq, now, packet.id, packet.instruction, packet.params, raw=packet.raw)
            self._log.append(entry)
            try:
                return self._dispatch(packet, entry, seq, now, broadcast)
            except p2.PacketError:
                # Malformed parameters: a unicast target answers an instruction error.
                servo = self._servos.get(packet.id)
                return [self._reply(servo, seq, now, ErrorCode.INSTRUCTION)] if servo else []
            finally:
                # A write to ID (7) moves a servo to another address on the bus.
                self._servos = {s.id: s for s in self._servos.values()}

    def _dispatch(
        self, packet: p2.Packet, entry: LoggedPacket, seq: int, now: float, broadcast: bool
    ) -> list[_Outgoing]:
        inst, params = packet.instruction, packet.params
        target = self._servos.get(packet.id)
        by_id = {s.id: s for s in self._servos.values()}

        def answer(servo: _Servo, error: int = 0, data: bytes = b"", *, read: bool = False):
            # Status Return Level: 0 = PING only, 1 = PING + reads, 2 = all.
            level = servo.get("status_return_level")
            if inst == Instruction.PING or (read and level >= 1) or level >= 2:
                return [self._reply(servo, seq, now, error, data)]
            return []

        if inst == Instruction.PING:
            servos = sorted(self._servos.values(), key=lambda s: s.id) if broadcast else ([target] if target else [])
            out = []
            for s in servos:
                out += answer(s, 0, p2.to_le(s.get("model_number"), 2) + bytes([s.get("firmware_version")]))
            return out

        if inst == Instruction.READ:
            address, length = p2.parse_address_length(params)
            if target is None or broadcast:
                return []
            entry.reads[target.id] = (address, length)
            error, data = target.read(address, length)
            return answer(target, error, data, read=True)

        if inst in (Instruction.WRITE, Instruction.REG_WRITE):
            if len(params) < 3:
                raise p2.PacketError("write without address and data")
            address, data = p2.from_le(params[:2]), params[2:]
            servos = list(self._servos.values()) if broadcast else ([target] if target else [])
            out = []
            for s in servos:
                entry.writes[s.id] = (address, bytes(data))
                error, changes = s.check_write(address, data)
                if not broadcast:
                    # Built before applying, so a write to ID (7) is answered from the ID it was sent to.
                    out += answer(s, error)
                if not error:
                    if inst == Instruction.WRITE:
                        s.apply(changes, now)
                    else:
                        s.registered = changes
                        s._publish(now)
            return out

        if inst == Instruction.ACTION:
            servos = list(self._servos.values()) if broadcast else ([target] if target else [])
            out = []
            for s in servos:
                if s.registered is None:
                    error = ErrorCode.INSTRUCTION
                else:
                    s.apply(s.registered, now)
                    s.registered = None
                    s._publish(now)
                    error = 0
                if not broadcast:
                    out += answer(s, error)
            return out

        # sync and bulk instructions differ only in how they list (id, address, length / data)
        if inst in (Instruction.SYNC_READ, Instruction.BULK_READ):
            if inst == Instruction.SYNC_READ:
                address, length, ids = p2.parse_sync_read(params)
                blocks = [(dxl_id, address, length) for dxl_id in ids]
            else:
                blocks = p2.parse_bulk_read(params)
            out = []
            for dxl_id, address, length in blocks:
                entry.reads[dxl_id] = (address, length)
                s = by_id.get(dxl_id)
                if s is not None:
                    error, data = s.read(address, length)
                    out += answer(s, error, data, read=True)
            return out

        if inst in (Instruction.SYNC_WRITE, Instruction.BULK_WRITE):
            if inst == Instruction.SYNC_WRITE:
                address, _, by_servo = p2.parse_sync_write(params)
                blocks = [(dxl_id, address, data) for dxl_id, data in by_servo.items()]
            else:
                blocks = p2.parse_bulk_write(params)
            for dxl_id, address, data in blocks:
                entry.writes[dxl_id] = (address, data)
                s = by_id.get(dxl_id)
                if s is not None:
                    error, changes = s.check_write(address, data)
                    if not error:
                        s.apply(changes, now)
            return []

        if inst == Instruction.REBOOT:
            if target is None or broadcast:
                return []
            out = answer(target)
            target.reboot_ram()
            target._publish(now)
            return out

        if inst == Instruction.FACTORY_RESET:
            if target is None:
                return []
            option = params[0] if params else 0xFF
            out = [] if broadcast else answer(target)
            target.factory_reset(keep_id=option in (0x01, 0x02), keep_baud=option == 0x02)
            target._publish(now)
            return out

        if inst in (Instruction.FAST_SYNC_READ, Instruction.FAST_BULK_READ):
            return []  # not modelled; the caller times out

        if target is not None and not broadcast:
            return answer(target, ErrorCode.INSTRUCTION)
        return []


def _parse_ids(text: str) -> list[int]:
    ids = []
    for part in text.split(","):
        part = part.strip()
        if "-" in part:
            a, b = part.split("-", 1)
            ids.extend(range(int(a), int(b) + 1))
        elif part:
            ids.append(int(part))
    return ids


def main(argv: list[str] | None = None) -> int:
    """Serve an emulated bus until SIGINT/SIGTERM; prints the port path on one line."""
    parser = argparse.ArgumentParser(
        prog="python -m rtdp.controllers.emulator.dynamixel",
        description="Emulate DYNAMIXEL X-series servos (Protocol 2.0) on a pseudo-terminal.",
    )
    parser.add_argument("--motors", default="1,2,3,4,5,6", help="servo IDs, e.g. 1,2,3 or 1-6")
    parser.add_argument("--model", default="xl330-m288", choices=sorted(MODELS))
    parser.add_argument("--baudrate", type=int, default=1_000_000, help="bit rate used for reply timing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--corrupt-crc", type=float, default=0.0, help="probability of a corrupted reply CRC")
    parser.add_argument("--drop-reply", type=float, default=0.0, help="probability of a dropped reply")
    parser.add_argument("--late-reply", type=float, default=0.0, help="probability of a reply after the SDK timeout")
    parser.add_argument("--garbage", type=float, default=0.0, help="probability of garbage bytes before a reply")
    parser.add_argument("--log-size", type=int, default=2000,
                        help="packets and replies kept in the log (a long log makes Python's garbage "
                             "collector pause the emulator for tens of ms, which looks like a late servo)")
    parser.add_argument("--rt-priority", type=int, default=0,
                        help="serve under SCHED_FIFO at this priority (real servos are not on the CPU; "
                             "an emulator that waits for the scheduler would make a real-time loop look late)")
    args = parser.parse_args(argv)
    try:
        ids = _parse_ids(args.motors)
        faults = FaultConfig(
            corrupt_crc=args.corrupt_crc, drop_reply=args.drop_reply, late_reply=args.late_reply, garbage=args.garbage
        )
        emu = DynamixelBusEmulator({i: args.model for i in ids}, faults, seed=args.seed, baudrate=args.baudrate,
                                   log_size=args.log_size)
    except (ValueError, ConfigError) as exc:
        parser.error(str(exc))
    done = threading.Event()

    def _on_signal(signum: int, frame: object) -> None:
        done.set()

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    from rtdp.controllers.loop import realtime_priority

    rt = realtime_priority(max(0, min(99, args.rt_priority)))
    with rt, emu:  # the serving thread inherits the priority
        # what exists now lives for the whole run: keep it out of every later collection
        gc.collect()
        gc.freeze()
        print(emu.port, flush=True)
        while not done.is_set() and emu.running:
            done.wait(0.2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
