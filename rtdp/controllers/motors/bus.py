"""One DYNAMIXEL Protocol 2.0 bus on ``dynamixel-sdk``: named registers, per servo or synced, with retries.

::

    bus = DynamixelBus("/dev/ttyUSB0", 1_000_000)
    bus.open()                                              # imports the SDK, opens the port
    bus.write(1, "torque_enable", 1)                        # one servo, retried until it answers
    t, values = bus.sync_read(("present_velocity", "present_position"), [1, 2, 3], retries=3)
    bus.sync_write("goal_position", {1: 2048, 2: 2100, 3: 1990}, retries=2)
    bus.close()

Registers are named as in :mod:`rtdp.controllers.motors.registers`; their
address, size and sign come from there. The SDK is imported in :meth:`open`
and described below by Protocols, so importing this module needs neither the
SDK nor pyserial.

Protocol 2.0 has no sequence numbers: after a failed transaction the bus
waits until the line has been quiet for ``resync_s`` (:meth:`resync`), so a
late reply to the failed request is flushed instead of being taken as the
answer to the retry.
"""

from __future__ import annotations

import logging
import termios
import time
from collections import Counter
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np

from rtdp.controllers.protocol2 import describe_error
from rtdp.controllers.motors.registers import REGISTERS, Register
from rtdp.controllers.motors.sdk_port import sleeping_port_handler
from rtdp.errors import (
    ConfigError,
    DeviceDisconnectedError,
    DeviceNotConnectedError,
    DriverError,
    UnknownNameError,
    require_package,
)

logger = logging.getLogger(__name__)

_COMM_SUCCESS = 0
_ERROR_NUMBER_MASK = 0x7F
# What pyserial / termios raise when the device node is gone or the pty closed.
_PORT_ERRORS = (OSError, termios.error)


# --- what is used of dynamixel-sdk --------------------------------------------


class PortHandler(Protocol):
    """``dynamixel_sdk.PortHandler``: the serial port."""

    is_using: bool  # the SDK's busy flag; left set when an exception escapes a transaction

    def openPort(self) -> bool: ...  # noqa: N802 (the SDK's names)

    def closePort(self) -> None: ...  # noqa: N802

    def setBaudRate(self, baudrate: int) -> bool: ...  # noqa: N802

    def getBytesAvailable(self) -> int: ...  # noqa: N802

    def readPort(self, length: int) -> bytes: ...  # noqa: N802


class PacketHandler(Protocol):
    """``dynamixel_sdk.PacketHandler(2.0)``: unicast transactions; each returns ``(..., result, error)``."""

    def ping(self, port: PortHandler, dxl_id: int) -> tuple[int, int, int]: ...

    def getTxRxResult(self, result: int) -> str: ...  # noqa: N802

    def getRxPacketError(self, error: int) -> str: ...  # noqa: N802

    # read1ByteTxRx / read2ByteTxRx / read4ByteTxRx(port, id, address) -> (value, result, error) and
    # write1ByteTxRx / write2ByteTxRx / write4ByteTxRx(port, id, address, value) -> (result, error)


class GroupSyncRead(Protocol):
    """``dynamixel_sdk.GroupSyncRead(port, packet_handler, address, length)``."""

    def addParam(self, dxl_id: int) -> bool: ...  # noqa: N802

    def txRxPacket(self) -> int: ...  # noqa: N802

    def isAvailable(self, dxl_id: int, address: int, length: int) -> bool: ...  # noqa: N802

    def getData(self, dxl_id: int, address: int, length: int) -> int: ...  # noqa: N802


class GroupSyncWrite(Protocol):
    """``dynamixel_sdk.GroupSyncWrite(port, packet_handler, address, length)``."""

    def addParam(self, dxl_id: int, data: list[int]) -> bool: ...  # noqa: N802

    def clearParam(self) -> None: ...  # noqa: N802

    def txPacket(self) -> int: ...  # noqa: N802


# --- the bus -------------------------------------------------------------------


class DynamixelBus:
    """Servos on one Protocol 2.0 bus, addressed by register name.

    Args:
        port: serial device, e.g. ``/dev/ttyUSB0`` (or an emulator's ``/dev/pts/N``).
        baudrate: bus bit rate; the servos must already be set to it.
        retries: extra attempts of a unicast transaction (ping, read, write)
            that got no status packet.
        resync_s: how long the line must stay quiet after a failed
            transaction before the next one. Replies later than the SDK's
            ~34 ms timeout + ``resync_s`` cannot be told from fresh ones.
        registers: the control table, by name.

    Every transaction raises DeviceNotConnectedError before :meth:`open`, and
    UnknownNameError for a register name the table does not have.

    Attributes:
        stats: counters of ``read_retries``, ``write_retries`` (sync) and ``resyncs``.
        last_tx: ``time.monotonic()`` when the last transaction started.
        lost: None, or why the port went away (a transaction or :meth:`resync`
            met a port error); cleared by :meth:`open` or :meth:`reopen_if_lost`.
    """

    def __init__(
        self,
        port: str,
        baudrate: int = 1_000_000,
        *,
        retries: int = 3,
        resync_s: float = 0.03,
        registers: Mapping[str, Register] = REGISTERS,
    ) -> None:
        self.port = port
        self.baudrate = int(baudrate)
        self.retries = retries
        self.resync_s = resync_s
        self.registers = registers
        self.stats: Counter[str] = Counter()
        self.last_tx = 0.0
        self.lost: str | None = None
        self._sdk: Any = None
        self._port: Any = None  # the SDK's PortHandler while open
        self._ph: Any = None
        self._sync_reads: dict[tuple[tuple[str, ...], tuple[int, ...]], GroupSyncRead] = {}
        self._sync_writes: dict[str, GroupSyncWrite] = {}

    @property
    def is_open(self) -> bool:
        """True from :meth:`open` to :meth:`close`, also after the port went away."""
        return self._port is not None

    def open(self) -> None:
        """Import the SDK, open the port and set its bit rate.

        Raises:
            MissingDependencyError: ``dynamixel-sdk`` is not installed.
            DriverError: the port cannot be opened or the rate is not supported.
        """
        self._sdk = require_package("dynamixel_sdk", "hw", "the Dynamixel driver")
        port = sleeping_port_handler(self._sdk)(self.port)
        try:
            opened = port.openPort()
        except _PORT_ERRORS as exc:
            raise DriverError(f"cannot open Dynamixel port {self.port}: {exc}") from exc
        if not opened:
            raise DriverError(f"cannot open Dynamixel port {self.port}")
        self._port, self._ph, self.lost = port, self._sdk.PacketHandler(2.0), None
        self._sync_reads, self._sync_writes = {}, {}
        if not port.setBaudRate(self.baudrate):
            self.close()
            raise DriverError(f"baud rate {self.baudrate} is not supported by the SDK on {self.port}")

    def close(self) -> None:
        """Close the port. Never raises; idempotent."""
        if self._port is None:
            return
        try:
            self._port.is_using = False
            self._port.closePort()
        except Exception as exc:
            logger.debug("dynamixel: closing %s: %s", self.port, exc)
        self._port = None
        self._sync_reads, self._sync_writes = {}, {}

    def reopen_if_lost(self) -> None:
        """One try to reopen a port that went away (a re-plugged adapter may be back under the same path)."""
        if not self.lost or self._port is None:
            return
        try:
            self._port.is_using = False
            self._port.openPort()
            self.lost = None
        except Exception as exc:
            logger.debug("dynamixel: reopen of %s failed: %s", self.port, exc)

    def register(self, name: str) -> Register:
        """The register called ``name``.

        Raises:
            UnknownNameError: the table has no such register.
        """
        try:
            return self.registers[name]
        except KeyError:
            raise UnknownNameError("register", name, list(self.registers)) from None

    # --- one servo, retried ---
    def ping(self, dxl_id: int) -> tuple[int, int]:
        """``(model number, error byte)`` of a servo.

        Raises:
            DriverError: no status packet after ``retries`` retries.
            DeviceDisconnectedError: the port went away.
        """
        self._require_open()
        number, _, error = self._retrying("ping", dxl_id, self._ph.ping, self._port, dxl_id)
        return number, error

    def read(self, dxl_id: int, name: str) -> int:
        """Value of one register of one servo (two's complement decoded where the register is signed).

        Raises:
            DriverError: no status packet after ``retries`` retries, or the servo refused the read.
            DeviceDisconnectedError: the port went away.
        """
        self._require_open()
        reg = self.register(name)
        fn = {1: self._ph.read1ByteTxRx, 2: self._ph.read2ByteTxRx, 4: self._ph.read4ByteTxRx}[reg.size]
        what = f"{reg.label} ({reg.address})"
        value, _, error = self._retrying(f"reading {what}", dxl_id, fn, self._port, dxl_id, reg.address)
        self._status_error(dxl_id, error, f"a read of {what}")
        return _decode(reg, value)

    def write(self, dxl_id: int, name: str, value: int) -> None:
        """Write one register of one servo and wait for its status packet.

        Raises:
            DriverError: no status packet after ``retries`` retries, or the servo refused the value.
            DeviceDisconnectedError: the port went away.
        """
        self._require_open()
        reg = self.register(name)
        fn, raw = self._write_fn(reg), _encode(reg, value)
        _, error = self._retrying(f"writing {reg.label}", dxl_id, fn, self._port, dxl_id, reg.address, raw)
        self._status_error(dxl_id, error, f"{reg.label} = {value}")

    def ensure(self, dxl_id: int, name: str, value: int) -> None:
        """Write a register only if it holds another value (EEPROM has limited write cycles)."""
        if self.read(dxl_id, name) != value:
            self.write(dxl_id, name, value)

    def write_once(self, dxl_id: int, name: str, value: int) -> str | None:
        """One write attempt that never raises: None if the servo confirmed it, else what went wrong."""
        reg = self.register(name)
        try:
            self._port.is_using = False
            result, error = self._write_fn(reg)(self._port, dxl_id, reg.address, _encode(reg, value))
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        if result != _COMM_SUCCESS:
            return self._ph.getTxRxResult(result)
        if error & _ERROR_NUMBER_MASK:
            return self._ph.getRxPacketError(error)
        return None

    # --- several servos in one packet ---
    def sync_read(self, names: Sequence[str], ids: Sequence[int], retries: int) -> tuple[float, dict[str, np.ndarray]]:
        """One sync read of adjacent registers from every servo in ``ids``, retried until each one answered.

        Values are taken only when the SDK reports every servo's data as
        available from this transaction, so a reading is never stale.

        Args:
            names: adjacent registers, in address order, e.g. ``("present_velocity", "present_position")``.
            ids: servo IDs (N,).
            retries: extra attempts after a failed one.

        Returns:
            ``(t, {name: (N,) int64})``, ``t`` the monotonic midpoint of the
            transaction that succeeded (when the servos sampled).

        Raises:
            DeviceDisconnectedError: the port went away, or no complete reply after ``retries`` retries.
        """
        self._require_open()
        regs = [self.register(n) for n in names]
        group = self._sync_reader(regs, ids)
        last = ""
        for attempt in range(1 + retries):
            if attempt:
                self.stats["read_retries"] += 1
            t0 = time.monotonic()
            result = self._transact(group.txRxPacket)
            t1 = time.monotonic()
            if result == _COMM_SUCCESS:
                values = _collect(group, regs, ids)
                if values is not None:
                    return 0.5 * (t0 + t1), values
                last = "reply incomplete (a servo's data missing or short)"
            else:
                last = self._ph.getTxRxResult(result)
            self.resync()
        raise DeviceDisconnectedError(
            f"no complete reply from servos {list(ids)} on {self.port} after {1 + retries} "
            f"attempts (last: {last}); check power and cable"
        )

    def sync_write(self, name: str, values: Mapping[int, int], retries: int) -> None:
        """One sync write of a register, ``{servo id: value}``; retried while the packet cannot be sent.

        Raises:
            DriverError: the packet could not be sent after ``retries`` retries.
            DeviceDisconnectedError: the port went away.
        """
        self._require_open()
        reg = self.register(name)
        group = self._sync_writer(reg)
        last = ""
        for attempt in range(1 + retries):
            if attempt:
                self.stats["write_retries"] += 1
            _fill(group, reg, values)
            result = self._transact(group.txPacket)
            if result == _COMM_SUCCESS:
                return
            last = self._ph.getTxRxResult(result)
        raise DriverError(
            f"could not send {reg.label} to servos {list(values)} on {self.port} after {1 + retries} attempts: {last}"
        )

    def sync_write_once(self, name: str, values: Mapping[int, int]) -> None:
        """One sync write attempt that never raises (a release path that confirms servo by servo after it)."""
        if self._port is None or self.lost:
            return
        try:
            self._port.is_using = False
            group = self._sync_writer(self.register(name))
            _fill(group, self.register(name), values)
            group.txPacket()
        except Exception as exc:
            logger.debug("dynamixel: sync write of %s on %s failed: %s", name, self.port, exc)

    # --- the line ---
    def resync(self) -> None:
        """Wait until no byte has arrived for ``resync_s``, discarding what arrives.

        Without this, a reply that came in after the SDK gave up would be
        read as the answer to the next request: a stale reading.

        Raises:
            DeviceDisconnectedError: the port went away.
        """
        self.stats["resyncs"] += 1
        start = quiet_since = time.monotonic()
        while True:
            now = time.monotonic()
            try:
                waiting = self._port.getBytesAvailable()
                if waiting:
                    self._port.readPort(waiting)
                    quiet_since = now
            except _PORT_ERRORS as exc:
                self._lose(exc)
                raise DeviceDisconnectedError(f"Dynamixel port {self.port} went away ({exc})") from exc
            if now - quiet_since >= self.resync_s or now - start > 10 * self.resync_s + 0.1:
                return
            time.sleep(0.001)

    # --- internals ---
    def _require_open(self) -> None:
        if self._port is None:
            raise DeviceNotConnectedError(f"Dynamixel bus on {self.port} is not open: call open() first")

    def _lose(self, exc: BaseException) -> None:
        self.lost = f"{type(exc).__name__}: {exc}"

    def _transact(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run one SDK transaction; a vanished port becomes DeviceDisconnectedError."""
        self.last_tx = time.monotonic()
        try:
            return fn(*args)
        except _PORT_ERRORS as exc:
            # The SDK leaves its busy flag set when an exception escapes it.
            self._port.is_using = False
            self._lose(exc)
            raise DeviceDisconnectedError(
                f"Dynamixel port {self.port} went away ({exc}); check the USB cable and adapter"
            ) from exc

    def _retrying(self, what: str, dxl_id: int, fn: Callable[..., tuple], *args: Any) -> tuple:
        """Call a unicast SDK function until it gets a status packet; returns its result tuple."""
        last = ""
        for _ in range(1 + self.retries):
            out = self._transact(fn, *args)
            result = out[-2]
            if result == _COMM_SUCCESS:
                return out
            last = self._ph.getTxRxResult(result)
            self.resync()
        raise DriverError(f"servo id {dxl_id} on {self.port}: {what} failed after {1 + self.retries} attempts: {last}")

    def _status_error(self, dxl_id: int, error: int, what: str) -> None:
        if error & _ERROR_NUMBER_MASK:
            raise DriverError(f"servo id {dxl_id} on {self.port} refused {what}: {describe_error(error)}")

    def _write_fn(self, reg: Register) -> Callable[..., tuple[int, int]]:
        return {1: self._ph.write1ByteTxRx, 2: self._ph.write2ByteTxRx, 4: self._ph.write4ByteTxRx}[reg.size]

    def _sync_reader(self, regs: Sequence[Register], ids: Sequence[int]) -> GroupSyncRead:
        key = (tuple(r.name for r in regs), tuple(ids))
        group = self._sync_reads.get(key)
        if group is None:
            if any(a.address + a.size != b.address for a, b in zip(regs, regs[1:])):
                raise ConfigError(f"sync read: registers {list(key[0])} are not adjacent in address order")
            length = regs[-1].address + regs[-1].size - regs[0].address
            group = self._sdk.GroupSyncRead(self._port, self._ph, regs[0].address, length)
            for i in ids:
                group.addParam(i)
            self._sync_reads[key] = group
        return group

    def _sync_writer(self, reg: Register) -> GroupSyncWrite:
        group = self._sync_writes.get(reg.name)
        if group is None:
            group = self._sdk.GroupSyncWrite(self._port, self._ph, reg.address, reg.size)
            self._sync_writes[reg.name] = group
        return group


def _encode(reg: Register, value: int) -> int:
    """A value as the unsigned number the SDK sends (two's complement for negative values)."""
    return int(value) & ((1 << (8 * reg.size)) - 1)


def _decode(reg: Register, value: int) -> int:
    """The unsigned number the SDK read, as the register's value."""
    if reg.signed and value >= 1 << (8 * reg.size - 1):
        value -= 1 << (8 * reg.size)
    return value


def _fill(group: GroupSyncWrite, reg: Register, values: Mapping[int, int]) -> None:
    group.clearParam()
    for i, value in values.items():
        group.addParam(i, list(_encode(reg, value).to_bytes(reg.size, "little")))


def _collect(group: GroupSyncRead, regs: Sequence[Register], ids: Sequence[int]) -> dict[str, np.ndarray] | None:
    """Every servo's values from the last sync read, or None if any servo's data is missing."""
    start = regs[0].address
    length = regs[-1].address + regs[-1].size - start
    out = {r.name: np.empty(len(ids), dtype=np.int64) for r in regs}
    for k, i in enumerate(ids):
        if not group.isAvailable(i, start, length):
            return None
        for r in regs:
            try:
                value = group.getData(i, r.address, r.size)
            except (IndexError, KeyError, TypeError):
                return None  # a status packet with less data than asked (e.g. an error reply)
            out[r.name][k] = _decode(r, value)
    return out
