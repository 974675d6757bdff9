"""The control table of one emulated servo: its bytes, and the rules a write must pass.

The registers come from :mod:`rtdp.controllers.motors.registers`, the same
definitions the driver addresses the servos with. What a write may do is the
firmware's rule, as the e-Manual states it: read-only items and undefined
addresses answer an access error, the EEPROM area is writable only with
torque off, a value outside an item's range answers a data range error, a
goal position outside Min/Max Position Limit (52/48) a data limit error, and
a write is applied only if every item in it passes (nothing is half-applied).
"""

from __future__ import annotations

from typing import Callable, Iterable

from rtdp.controllers import protocol2 as p2
from rtdp.controllers.motors.registers import WATCHDOG_TRIPPED, ModelSpec, Register
from rtdp.controllers.protocol2 import ErrorCode

TABLE_SIZE = 228  # through Indirect Data 20 of the XL330; the emulator does not model indirect addressing
GOAL_REGISTERS = ("goal_pwm", "goal_current", "goal_velocity", "goal_position")
# The limit each goal other than Goal Position must stay within (+-).
_GOAL_LIMITS = {"goal_pwm": "pwm_limit", "goal_current": "current_limit", "goal_velocity": "velocity_limit"}

# A write that passed the checks: the registers it sets and their values.
Changes = list[tuple[Register, int]]


class ControlTable:
    """The bytes of one servo's control table (little-endian, as on the wire). Not thread-safe.

    Args:
        spec: the servo model, whose registers and defaults make the table.
    """

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.by_address = {r.address: r for r in spec.registers}
        self.data = bytearray(TABLE_SIZE)
        self.defined = bytearray(TABLE_SIZE)  # 1 where a register's byte lives
        for r in spec.registers:
            self.defined[r.address : r.address + r.size] = b"\x01" * r.size

    def get(self, name: str) -> int:
        """Value of a register by name."""
        r = self.spec.register(name)
        return p2.from_le(self.data[r.address : r.address + r.size], signed=r.signed)

    def set(self, name: str, value: int) -> None:
        """Store a value, unchecked (the firmware's own updates, or a write that passed :meth:`check_write`)."""
        r = self.spec.register(name)
        self.data[r.address : r.address + r.size] = p2.to_le(value, r.size)

    @property
    def watchdog_tripped(self) -> bool:
        """True after the bus watchdog stopped the servo, until Bus Watchdog is written 0."""
        return self.get("bus_watchdog") == WATCHDOG_TRIPPED

    def factory_reset(self, keep: Iterable[str] = ()) -> None:
        """Every register to its default, but those named in ``keep``."""
        kept = {name: self.get(name) for name in keep}
        for r in self.spec.registers:
            self.set(r.name, r.default)
        for name, value in kept.items():
            self.set(name, value)

    def reset_ram(self) -> None:
        """The RAM area to its defaults, as after power-up; EEPROM kept."""
        for r in self.spec.registers:
            if not r.eeprom:
                self.set(r.name, r.default)

    def read(self, address: int, length: int) -> tuple[int, bytes]:
        """``(error, bytes)`` of a read; any span inside the table may be read."""
        if length == 0 or address + length > TABLE_SIZE:
            return ErrorCode.ACCESS, b""
        return ErrorCode.NONE, bytes(self.data[address : address + length])

    def check_write(self, address: int, data: bytes, id_taken: Callable[[int], bool]) -> tuple[int, Changes]:
        """Validate a write; return ``(error, [(register, value), ...])`` with error 0 if it may be applied.

        Args:
            address: first byte written.
            data: the bytes written, several adjacent registers at once if they are whole.
            id_taken: whether another servo on the bus has an ID (a write to ID (7) must not make two).
        """
        if address + len(data) > TABLE_SIZE or not data:
            return ErrorCode.ACCESS, []
        changes = []
        i = 0
        while i < len(data):
            a = address + i
            r = self.by_address.get(a)
            if r is None:
                # Inside a multi-byte register (partial write) or an undefined byte.
                return (ErrorCode.DATA_LENGTH if self.defined[a] else ErrorCode.ACCESS), []
            if i + r.size > len(data):
                return ErrorCode.DATA_LENGTH, []
            if not r.writable:
                return ErrorCode.ACCESS, []
            if r.eeprom and self.get("torque_enable"):
                return ErrorCode.ACCESS, []  # EEPROM is locked while torque is on
            value = p2.from_le(data[i : i + r.size], signed=r.signed)
            error = self._check_value(r, value)
            if not error and r.name == "id" and value != self.get("id") and id_taken(value):
                error = ErrorCode.RESULT_FAIL  # two servos with one ID would make the bus unusable
            if error:
                return error, []
            changes.append((r, value))
            i += r.size
        return ErrorCode.NONE, changes

    def _check_value(self, r: Register, value: int) -> int:
        tripped = self.watchdog_tripped
        if r.name in GOAL_REGISTERS and tripped:
            return ErrorCode.DATA_RANGE  # goal values are read-only after a watchdog error
        if r.name == "bus_watchdog" and tripped and value != 0:
            return ErrorCode.DATA_RANGE  # must be cleared with 0 before it can be armed again
        if r.name == "goal_position":
            lo, hi = self.get("min_position_limit"), self.get("max_position_limit")
            return ErrorCode.DATA_LIMIT if not lo <= value <= hi else 0
        if r.name in _GOAL_LIMITS:
            bound = self.get(_GOAL_LIMITS[r.name])
            return ErrorCode.DATA_LIMIT if not -bound <= value <= bound else 0
        if r.low is not None and not r.low <= value <= r.high:
            return ErrorCode.DATA_RANGE
        return 0
