"""DYNAMIXEL X-series arm driver (Protocol 2.0) on the official ``dynamixel-sdk``.

One driver owns one bus (a U2D2 or any USB-serial adapter) with N servos in
position control mode. Per control cycle it does one GroupSyncRead of
Present Velocity + Present Position (address 128, 8 bytes) and one
GroupSyncWrite of Goal Position (116, 4 bytes); everything else happens in
``connect()`` and ``close()``::

    drv = DynamixelDriver("/dev/ttyUSB0", [1, 2, 3, 4, 5, 6], "xl330-m288", "calibration.json")
    with drv:                                   # ping + model check, limits, watchdog, torque on
        r = drv.read()                          # r.obs["joint_pos"] (6,) rad, r.obs["joint_vel"] (6,) rad/s
        drv.write(r.obs["joint_pos"] + 0.01)    # (6,) target joint positions, rad
    # stop() holds position, close() turns torque off on every servo, even after an exception

Calibration, one JSON object per joint, in LeRobot's format (a LeRobot
calibration file for a Dynamixel arm loads as is)::

    {
      "shoulder_pan": {"id": 1, "drive_mode": 0, "homing_offset": -1024, "range_min": 1024, "range_max": 3072},
      ...
    }

* ``homing_offset`` (ticks) is written to the servo's Homing Offset (20), so
  Present Position = actual position + homing offset, as LeRobot does;
* ``range_min`` / ``range_max`` (ticks of Present Position, 0..4095) are
  written to Min/Max Position Limit (52/48): the servo itself refuses goals
  outside them, and they are the driver's action limits;
* ``drive_mode`` 1 reverses the joint's direction; it is applied in
  software (the servo's own Drive Mode register is left as it is).

Joint angle in radians: ``sign * (ticks - 2048) * 2*pi / 4096`` with
``sign`` = +1 for drive_mode 0 and -1 for drive_mode 1: tick 2048, half a
turn, is zero, which is where LeRobot's calibration puts the middle of each
joint's range. Velocity: ``sign * units * 0.229 rev/min`` in rad/s.

Reads never return stale data: a sync read that fails (timeout, CRC error,
a servo missing from the reply) is retried after the line has gone quiet, up
to ``read_retries`` times, and then raises; values are taken only when the
SDK reports every servo's data as available from this transaction.
"""

from __future__ import annotations

import json
import logging
import math
import os
import select
import termios
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from rtdp.controllers.drivers.base import ActionLimits, DriverBase, Reading
from rtdp.controllers.protocol2 import describe_error
from rtdp.errors import (
    ActionError,
    ConfigError,
    DeviceDisconnectedError,
    DeviceNotConnectedError,
    DriverError,
    require_package,
)

logger = logging.getLogger(__name__)

# Model numbers at address 0 (ROBOTIS e-Manual).
MODEL_NUMBERS: dict[str, int] = {
    "xl330-m077": 1190,
    "xl330-m288": 1200,
    "xl430-w250": 1060,
    "xm430-w210": 1030,
    "xm430-w350": 1020,
}

# Control table of the X series (Protocol 2.0): (address, size).
ADDR_RETURN_DELAY_TIME = (9, 1)  # 2 us units
ADDR_OPERATING_MODE = (11, 1)
ADDR_HOMING_OFFSET = (20, 4)
ADDR_MAX_POSITION_LIMIT = (48, 4)
ADDR_MIN_POSITION_LIMIT = (52, 4)
ADDR_TORQUE_ENABLE = (64, 1)
ADDR_HARDWARE_ERROR_STATUS = (70, 1)
ADDR_BUS_WATCHDOG = (98, 1)
ADDR_GOAL_POSITION = (116, 4)
ADDR_PRESENT_VELOCITY = (128, 4)
ADDR_PRESENT_POSITION = (132, 4)

POSITION_CONTROL_MODE = 3
TICKS_PER_REV = 4096
CENTER_TICKS = 2048
RAD_PER_TICK = 2.0 * math.pi / TICKS_PER_REV
RAD_S_PER_VELOCITY_UNIT = 0.229 * 2.0 * math.pi / 60.0  # Present Velocity unit: 0.229 rev/min
WATCHDOG_UNIT_MS = 20
# A servo resting this far outside its calibrated range at connect is
# brought to the limit on torque-on (sensor noise at a hard stop); further
# out, connect refuses rather than swing the joint.
LIMIT_TOLERANCE_TICKS = 32

_COMM_SUCCESS = 0
_ERROR_NUMBER_MASK = 0x7F
_ALERT_BIT = 0x80
# What pyserial / termios raise when the device node is gone or the pty closed.
_PORT_ERRORS = (OSError, termios.error)


def _sleeping_port_handler(sdk: Any) -> type:
    """``dynamixel_sdk.PortHandler`` whose reads sleep until bytes arrive instead of spinning.

    The SDK opens the port with ``timeout=0`` and polls it in a loop until the
    reply is complete or the packet times out, which keeps one core busy for
    the whole bus transaction (a third of the cycle at 50 Hz with three
    servos). That core is the one the inference worker needs. This handler
    returns what is already there or else waits in ``select`` until the first
    byte arrives or the SDK's packet deadline passes; the SDK's loop, its
    timeouts and its results are unchanged.
    """

    class SleepingPortHandler(sdk.PortHandler):
        def readPort(self, length):  # noqa: N802 (the SDK's name)
            data = self.ser.read(length)
            if data or self.packet_timeout <= 0:
                return data
            wait_s = (self.packet_timeout - self.getTimeSinceStart()) / 1e3
            if wait_s > 0:
                try:
                    select.select([self.ser.fileno()], [], [], wait_s)
                except ValueError as exc:  # the descriptor is gone (port closed under us)
                    raise OSError(f"port closed: {exc}") from exc
                data = self.ser.read(length)
            return data

    return SleepingPortHandler


# --- calibration -------------------------------------------------------------


@dataclass(frozen=True)
class MotorCalibration:
    """Calibration of one joint (LeRobot's ``MotorCalibration`` fields).

    Attributes:
        id: servo ID on the bus.
        drive_mode: 0: joint angle grows with the servo's ticks; 1: reversed.
        homing_offset: ticks written to Homing Offset (20).
        range_min, range_max: allowed Present Position range, ticks (0..4095).
    """

    id: int
    drive_mode: int = 0
    homing_offset: int = 0
    range_min: int = 0
    range_max: int = TICKS_PER_REV - 1

    def __post_init__(self) -> None:
        if not 0 <= self.id <= 252:
            raise ConfigError(f"calibration: servo id must be 0..252, got {self.id}")
        if self.drive_mode not in (0, 1):
            raise ConfigError(f"calibration of id {self.id}: drive_mode must be 0 or 1, got {self.drive_mode}")
        if not -1_044_479 <= self.homing_offset <= 1_044_479:
            raise ConfigError(f"calibration of id {self.id}: homing_offset {self.homing_offset} outside ±1,044,479")
        if not 0 <= self.range_min < self.range_max <= TICKS_PER_REV - 1:
            raise ConfigError(
                f"calibration of id {self.id}: need 0 <= range_min < range_max <= 4095, "
                f"got range_min={self.range_min}, range_max={self.range_max}"
            )

    @property
    def sign(self) -> int:
        return -1 if self.drive_mode else 1

    def to_radians(self, ticks: np.ndarray | int) -> np.ndarray | float:
        return self.sign * (np.asarray(ticks, dtype=np.float64) - CENTER_TICKS) * RAD_PER_TICK

    def to_ticks(self, radians: np.ndarray | float) -> np.ndarray | float:
        return CENTER_TICKS + self.sign * np.asarray(radians, dtype=np.float64) / RAD_PER_TICK


_CALIBRATION_KEYS = {"id", "drive_mode", "homing_offset", "range_min", "range_max"}


def _motor_calibration(name: str, entry: Any, source: str) -> MotorCalibration:
    if isinstance(entry, MotorCalibration):
        return entry
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{source}: entry {name!r} must be an object with {sorted(_CALIBRATION_KEYS)}, got {entry!r}")
    unknown = set(entry) - _CALIBRATION_KEYS
    if unknown:
        raise ConfigError(f"{source}: entry {name!r} has unknown keys {sorted(unknown)}; known: {sorted(_CALIBRATION_KEYS)}")
    fields = dict(entry)
    if "id" not in fields:
        if isinstance(name, int) or str(name).isdigit():
            fields["id"] = int(name)  # a dict keyed by servo id
        else:
            raise ConfigError(f"{source}: entry {name!r} has no 'id'")
    for key, value in fields.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {name!r}.{key} must be an integer, got {value!r}")
    return MotorCalibration(**fields)


def load_calibration(source: str | os.PathLike | Mapping[Any, Any]) -> dict[str, MotorCalibration]:
    """Read a calibration: a JSON file path, or a dict in the same form.

    Args:
        source: path of a JSON file ``{joint name: {"id", "drive_mode",
            "homing_offset", "range_min", "range_max"}}`` (LeRobot's format),
            or such a dict; values may also be :class:`MotorCalibration`, and
            keys may be servo IDs (then ``"id"`` may be left out).

    Returns:
        ``{joint name: MotorCalibration}`` in file order.

    Raises:
        ConfigError: missing/unreadable file, bad JSON, bad or duplicate entries.
    """
    if isinstance(source, Mapping):
        data, where = source, "calibration"
    else:
        path = Path(source)
        where = f"calibration file {path}"
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read {where}: {exc.strerror or exc}") from exc
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{where} must hold a JSON object keyed by joint name, got {type(data).__name__}")
    if not data:
        raise ConfigError(f"{where} holds no joints")
    out: dict[str, MotorCalibration] = {}
    seen: dict[int, str] = {}
    for name, entry in data.items():
        cal = _motor_calibration(name, entry, where)
        joint = str(name) if not isinstance(name, int) else f"motor_{name}"
        if cal.id in seen:
            raise ConfigError(f"{where}: joints {seen[cal.id]!r} and {joint!r} both use servo id {cal.id}")
        seen[cal.id] = joint
        out[joint] = cal
    return out


def write_calibration(path: str | os.PathLike, calibration: Mapping[Any, Any]) -> Path:
    """Write a calibration as JSON in LeRobot's format (validated first).

    Args:
        path: file to write; parent folders are created.
        calibration: anything :func:`load_calibration` accepts as a dict.

    Returns:
        The path written.
    """
    cal = load_calibration(calibration)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    # Write then rename, so a crash never leaves a half-written calibration.
    tmp.write_text(json.dumps({name: asdict(c) for name, c in cal.items()}, indent=4) + "\n")
    os.replace(tmp, path)
    return path


# --- driver ------------------------------------------------------------------


class DynamixelDriver(DriverBase):
    """N DYNAMIXEL X-series servos on one Protocol 2.0 bus, commanded in joint radians.

    Args:
        port: serial device, e.g. ``/dev/ttyUSB0`` (or an emulator's ``/dev/pts/N``).
        motor_ids: servo IDs in action order (N,).
        model: expected model name (see :data:`MODEL_NUMBERS`), one for all
            servos or one per servo; connect checks each servo's model number.
        calibration: JSON path or dict (see :func:`load_calibration`) with an
            entry for every ID; None: full range 0..4095, no offset, for bench
            tests only.
        baudrate: bus bit rate; the servos must already be set to it.
        period_s: control period; with ``max_joint_speed`` it sets ``limits.max_delta``.
        max_joint_speed: largest joint speed the safety layer should allow, rad/s.
        watchdog_ms: Bus Watchdog window armed at connect (20 ms steps,
            20..2540); a servo that hears nothing for this long stops and
            holds. 0 disables it. Must exceed ``period_s``.
        read_retries: extra attempts of a failed sync read before raising.
        write_retries: extra attempts of a goal write that could not be sent.
        connect_retries: extra attempts of each ping/read/write during connect and recovery.
        close_retries: extra torque-off attempts per servo in ``close()``.
        return_delay_us: Return Delay Time written at connect (EEPROM, 2 us
            steps, 0..508). Each servo waits this long before it answers, so
            a sync read of N servos takes N times longer; the factory 500 us
            costs 3 ms per read of 6 servos. 0 (as LeRobot configures its
            arms) answers at once; None leaves the servos' setting alone.
        resync_s: after a failed transaction, how long the line must stay
            quiet before the next one, so a late reply to the failed request
            is flushed instead of being taken as the answer to the retry
            (Protocol 2.0 has no sequence numbers). Replies later than the
            SDK's ~34 ms timeout + ``resync_s`` cannot be told from fresh ones.

    Attributes:
        torque_off_log: every torque-off attempt of ``close()``: ``(id, ok, detail)``.
        stats: counters of retries, resyncs and watchdog recoveries.
    """

    name = "dynamixel"

    def __init__(
        self,
        port: str,
        motor_ids: Sequence[int],
        model: str | Sequence[str] = "xl330-m288",
        calibration: str | os.PathLike | Mapping[Any, Any] | None = None,
        *,
        baudrate: int = 1_000_000,
        period_s: float = 0.02,
        max_joint_speed: float = 3.0,
        watchdog_ms: int = 100,
        read_retries: int = 3,
        write_retries: int = 2,
        connect_retries: int = 3,
        close_retries: int = 3,
        resync_s: float = 0.03,
        return_delay_us: int | None = 0,
    ) -> None:
        if not isinstance(port, str) or not port:
            raise ConfigError(f"DynamixelDriver: port must be a device path such as /dev/ttyUSB0, got {port!r}")
        try:
            ids = [int(i) for i in motor_ids]
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"DynamixelDriver: motor_ids must be a sequence of integers, got {motor_ids!r}") from exc
        if not ids:
            raise ConfigError("DynamixelDriver: motor_ids is empty")
        if len(set(ids)) != len(ids) or not all(0 <= i <= 252 for i in ids):
            raise ConfigError(f"DynamixelDriver: motor_ids must be distinct IDs in 0..252, got {ids}")
        models = [model] * len(ids) if isinstance(model, str) else list(model)
        if len(models) != len(ids):
            raise ConfigError(f"DynamixelDriver: {len(models)} models given for {len(ids)} motor ids")
        for m in models:
            if m not in MODEL_NUMBERS:
                raise ConfigError(f"DynamixelDriver: unknown model {m!r}; known models: {', '.join(sorted(MODEL_NUMBERS))}")
        if baudrate <= 0:
            raise ConfigError(f"DynamixelDriver: baudrate must be positive, got {baudrate}")
        if not period_s > 0 or not max_joint_speed > 0:
            raise ConfigError(
                f"DynamixelDriver: period_s and max_joint_speed must be > 0, got {period_s}, {max_joint_speed}"
            )
        if watchdog_ms and not (WATCHDOG_UNIT_MS <= watchdog_ms <= 127 * WATCHDOG_UNIT_MS):
            raise ConfigError(f"DynamixelDriver: watchdog_ms must be 0 (off) or 20..2540, got {watchdog_ms}")
        if watchdog_ms and watchdog_ms <= period_s * 1000:
            raise ConfigError(
                f"DynamixelDriver: watchdog_ms={watchdog_ms} must exceed the control period "
                f"({period_s * 1000:.0f} ms), or the servos stop between cycles"
            )
        for name, value in (("read_retries", read_retries), ("write_retries", write_retries),
                            ("connect_retries", connect_retries), ("close_retries", close_retries)):
            if value < 0:
                raise ConfigError(f"DynamixelDriver: {name} must be >= 0, got {value}")
        if resync_s < 0:
            raise ConfigError(f"DynamixelDriver: resync_s must be >= 0, got {resync_s}")
        if return_delay_us is not None and not 0 <= int(return_delay_us) <= 508:
            raise ConfigError(f"DynamixelDriver: return_delay_us must be 0..508 (or None), got {return_delay_us}")

        if calibration is None:
            cal = {f"motor_{i}": MotorCalibration(id=i) for i in ids}
        else:
            cal = load_calibration(calibration)
        by_id = {c.id: (name, c) for name, c in cal.items()}
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise ConfigError(f"DynamixelDriver: calibration has no entry for servo id(s) {missing}")

        self.port = port
        self.motor_ids = ids
        self.models = models
        self.joint_names = [by_id[i][0] for i in ids]
        self.calibration = [by_id[i][1] for i in ids]
        self.baudrate = int(baudrate)
        self.period_s = float(period_s)
        self.max_joint_speed = float(max_joint_speed)
        # Rounded up to the servo's 20 ms unit, never shorter than asked.
        self.watchdog_units = math.ceil(watchdog_ms / WATCHDOG_UNIT_MS) if watchdog_ms else 0
        self.read_retries = read_retries
        self.write_retries = write_retries
        self.return_delay_units = None if return_delay_us is None else int(return_delay_us) // 2
        self.connect_retries = connect_retries
        self.close_retries = close_retries
        self.resync_s = resync_s
        self.action_dim = len(ids)

        self._sign = np.array([c.sign for c in self.calibration], dtype=np.float64)
        self._tick_min = np.array([c.range_min for c in self.calibration], dtype=np.int64)
        self._tick_max = np.array([c.range_max for c in self.calibration], dtype=np.int64)
        lo = self._sign * (self._tick_min - CENTER_TICKS) * RAD_PER_TICK
        hi = self._sign * (self._tick_max - CENTER_TICKS) * RAD_PER_TICK
        self._limits = ActionLimits(
            low=np.minimum(lo, hi),
            high=np.maximum(lo, hi),
            max_delta=np.full(len(ids), self.max_joint_speed * self.period_s),
        )

        self._sdk: Any = None
        self._port: Any = None  # dynamixel_sdk.PortHandler while open
        self._ph: Any = None
        self._sync_read: Any = None
        self._sync_write: Any = None
        self._connected = False
        self._port_lost: str | None = None
        self._last_tx = 0.0
        self._last_ticks: np.ndarray | None = None  # Present Position of the last good read
        self._verified: list[int] = []  # IDs that answered with the right model: the ones close() may write to
        self.torque_off_log: list[tuple[int, bool, str]] = []
        self.stats: Counter[str] = Counter()

    # --- public interface ---
    @property
    def limits(self) -> ActionLimits:
        """Joint-position bounds (rad) from the calibration and the per-cycle step ``max_joint_speed * period_s``."""
        return self._limits

    @property
    def connected(self) -> bool:
        return self._connected

    def connect(self) -> None:
        """Open the port, check every servo, configure it and enable torque.

        Steps: open port and set baud; ping each servo and compare its model
        number; torque off; clear a tripped bus watchdog; set position control
        mode, return delay time, homing offset and position limits (EEPROM, written only when
        different); goal := present position; arm the bus watchdog; torque on.

        Raises:
            DriverError: port cannot be opened, a servo does not answer, has
                the wrong model, reports a hardware error, refuses a setting,
                or rests outside its calibrated range.
        """
        if self._connected:
            return
        if self._port is not None:
            self._release()  # a session that lost its port and was never closed
        self._sdk = require_package("dynamixel_sdk", "hw", "the Dynamixel driver")
        sdk = self._sdk
        port = _sleeping_port_handler(sdk)(self.port)
        try:
            opened = port.openPort()
        except _PORT_ERRORS as exc:
            raise DriverError(f"cannot open Dynamixel port {self.port}: {exc}") from exc
        if not opened:
            raise DriverError(f"cannot open Dynamixel port {self.port}")
        self._port, self._ph, self._port_lost = port, sdk.PacketHandler(2.0), None
        self._verified, self._last_ticks = [], None
        try:
            if not port.setBaudRate(self.baudrate):
                raise DriverError(f"baud rate {self.baudrate} is not supported by the SDK on {self.port}")
            self._check_servos()
            for i, cal in zip(self.motor_ids, self.calibration):
                self._write(i, ADDR_TORQUE_ENABLE, 0, "Torque Enable")
                if self._read(i, ADDR_BUS_WATCHDOG, signed=True) != 0:
                    self._write(i, ADDR_BUS_WATCHDOG, 0, "Bus Watchdog")  # clears a trip of an earlier session
                self._ensure(i, ADDR_OPERATING_MODE, POSITION_CONTROL_MODE, "Operating Mode")
                if self.return_delay_units is not None:
                    self._ensure(i, ADDR_RETURN_DELAY_TIME, self.return_delay_units, "Return Delay Time")
                self._ensure(i, ADDR_HOMING_OFFSET, cal.homing_offset, "Homing Offset", signed=True)
                # Min before max would fail if the new min exceeds the old max; widen first, then narrow.
                self._ensure(i, ADDR_MAX_POSITION_LIMIT, TICKS_PER_REV - 1, "Max Position Limit")
                self._ensure(i, ADDR_MIN_POSITION_LIMIT, cal.range_min, "Min Position Limit")
                self._ensure(i, ADDR_MAX_POSITION_LIMIT, cal.range_max, "Max Position Limit")
            for i, cal, name in zip(self.motor_ids, self.calibration, self.joint_names):
                present = self._read(i, ADDR_PRESENT_POSITION, signed=True)
                if not cal.range_min - LIMIT_TOLERANCE_TICKS <= present <= cal.range_max + LIMIT_TOLERANCE_TICKS:
                    raise DriverError(
                        f"servo id {i} ({name}) on {self.port} rests at {present} ticks, outside its calibrated "
                        f"range [{cal.range_min}, {cal.range_max}]: move the joint into range by hand or recalibrate"
                    )
                # Torque-on drives to Goal Position: make that where the joint already is.
                self._write(i, ADDR_GOAL_POSITION, int(np.clip(present, cal.range_min, cal.range_max)), "Goal Position")
            if self.watchdog_units:
                for i in self.motor_ids:
                    self._write(i, ADDR_BUS_WATCHDOG, self.watchdog_units, "Bus Watchdog")
            for i in self.motor_ids:
                self._write(i, ADDR_TORQUE_ENABLE, 1, "Torque Enable")
            # Present Velocity (128) and Present Position (132) are adjacent: one 8-byte read.
            self._sync_read = sdk.GroupSyncRead(port, self._ph, ADDR_PRESENT_VELOCITY[0], 8)
            for i in self.motor_ids:
                self._sync_read.addParam(i)
            self._sync_write = sdk.GroupSyncWrite(port, self._ph, *ADDR_GOAL_POSITION)
            self._connected = True
        except BaseException:
            self._release()
            raise
        logger.info("dynamixel: connected %d servos %s on %s", len(self.motor_ids), self.motor_ids, self.port)

    def read(self) -> Reading:
        """One GroupSyncRead of Present Velocity + Present Position.

        Returns:
            ``Reading(t, {"joint_pos": (N,) rad, "joint_vel": (N,) rad/s}, {})``,
            ``t`` the monotonic midpoint of the transaction (when the servos sampled).

        Raises:
            DeviceNotConnectedError: not connected.
            DeviceDisconnectedError: the port went away, or no complete reply
                after ``read_retries`` retries.
        """
        self._require_connected()
        self._recover_watchdog_if_due()
        last = ""
        for attempt in range(1 + self.read_retries):
            if attempt:
                self.stats["read_retries"] += 1
            t0 = time.monotonic()
            result = self._transact(self._sync_read.txRxPacket)
            t1 = time.monotonic()
            if result == _COMM_SUCCESS:
                values = self._collect()
                if values is not None:
                    vel_units, ticks = values
                    self._last_ticks = ticks
                    pos = self._sign * (ticks - CENTER_TICKS) * RAD_PER_TICK
                    vel = self._sign * vel_units * RAD_S_PER_VELOCITY_UNIT
                    return Reading(0.5 * (t0 + t1), {"joint_pos": pos, "joint_vel": vel}, {})
                last = "reply incomplete (a servo's data missing or short)"
            else:
                last = self._ph.getTxRxResult(result)
            self._resync()
        raise DeviceDisconnectedError(
            f"no complete reply from servos {self.motor_ids} on {self.port} after {1 + self.read_retries} "
            f"attempts (last: {last}); check power and cable"
        )

    def write(self, action: np.ndarray) -> None:
        """Send target joint positions (N,) rad as one GroupSyncWrite of Goal Position.

        Targets are converted through the calibration and clipped to the
        calibrated range; the call returns without waiting for motion.

        Raises:
            ActionError: wrong shape or non-finite values (nothing is sent).
            DeviceNotConnectedError: not connected.
            DeviceDisconnectedError: the port went away.
            DriverError: the packet could not be sent after ``write_retries`` retries.
        """
        try:
            target = np.asarray(action, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ActionError(f"dynamixel: action must be a ({self.action_dim},) array of radians: {exc}") from exc
        if target.shape != (self.action_dim,):
            raise ActionError(
                f"dynamixel: action must have shape ({self.action_dim},) (one target per joint "
                f"{self.joint_names}), got {target.shape}"
            )
        if not np.all(np.isfinite(target)):
            raise ActionError(f"dynamixel: action has non-finite values {target.tolist()}; nothing was sent")
        self._require_connected()
        ticks = np.rint(CENTER_TICKS + self._sign * target / RAD_PER_TICK)
        ticks = np.clip(ticks, self._tick_min, self._tick_max).astype(np.int64)
        self._recover_watchdog_if_due()
        self._send_goal(ticks)

    def stop(self) -> None:
        """Hold: Goal Position := present position (a fresh read, else the last one). Never raises."""
        if not self._connected or self._port_lost:
            return
        try:
            try:
                self.read()
            except DriverError as exc:
                logger.warning("dynamixel: stop() could not read the present position (%s); holding the last one", exc)
            if self._last_ticks is None:
                logger.error("dynamixel: stop() has no present position to hold on %s", self.port)
                return
            self._send_goal(np.clip(self._last_ticks, self._tick_min, self._tick_max))
        except Exception as exc:  # stop() runs on every exit path and must not mask the original error
            logger.error("dynamixel: stop() failed on %s: %s", self.port, exc)

    def close(self) -> None:
        """Torque off on every servo (each attempted, with retries), then close the port.

        Idempotent, never raises; failures are logged and recorded in ``torque_off_log``.
        """
        if self._port is None:
            return
        self._connected = False
        try:
            self._release()
        except Exception as exc:  # pragma: no cover - _release already guards each step
            logger.error("dynamixel: close() failed on %s: %s", self.port, exc)

    # --- internals ---
    def _require_connected(self) -> None:
        if self._port_lost:
            raise DeviceDisconnectedError(
                f"Dynamixel port {self.port} went away ({self._port_lost}); close() and connect() again"
            )
        if not self._connected:
            raise DeviceNotConnectedError(
                f"DynamixelDriver on {self.port} is not connected: call connect() or use 'with driver:'"
            )

    def _transact(self, fn, *args):
        """Run one SDK transaction; a vanished port becomes DeviceDisconnectedError."""
        self._last_tx = time.monotonic()
        try:
            return fn(*args)
        except _PORT_ERRORS as exc:
            # The SDK leaves its busy flag set when an exception escapes it.
            self._port.is_using = False
            self._port_lost = f"{type(exc).__name__}: {exc}"
            self._connected = False
            raise DeviceDisconnectedError(
                f"Dynamixel port {self.port} went away ({exc}); check the USB cable and adapter"
            ) from exc

    def _collect(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Velocities and positions of every servo from the last sync read, or None if any is missing."""
        g = self._sync_read
        vel = np.empty(len(self.motor_ids), dtype=np.float64)
        pos = np.empty(len(self.motor_ids), dtype=np.int64)
        for k, i in enumerate(self.motor_ids):
            if not g.isAvailable(i, ADDR_PRESENT_VELOCITY[0], 8):
                return None
            try:
                v = g.getData(i, ADDR_PRESENT_VELOCITY[0], 4)
                p = g.getData(i, ADDR_PRESENT_POSITION[0], 4)
            except (IndexError, KeyError, TypeError):
                return None  # a status packet with less data than asked (e.g. an error reply)
            vel[k] = _signed32(v)
            pos[k] = _signed32(p)
        return vel, pos

    def _send_goal(self, ticks: np.ndarray) -> None:
        g = self._sync_write
        last = ""
        for attempt in range(1 + self.write_retries):
            if attempt:
                self.stats["write_retries"] += 1
            g.clearParam()
            for i, t in zip(self.motor_ids, ticks):
                g.addParam(i, list(int(t).to_bytes(4, "little", signed=True)))
            result = self._transact(g.txPacket)
            if result == _COMM_SUCCESS:
                return
            last = self._ph.getTxRxResult(result)
        raise DriverError(f"could not send goal positions on {self.port} after {1 + self.write_retries} attempts: {last}")

    def _resync(self) -> None:
        """Wait until no byte has arrived for ``resync_s``, discarding what arrives.

        Without this, a reply that came in after the SDK gave up would be
        read as the answer to the next request: a stale reading.
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
                self._port_lost = f"{type(exc).__name__}: {exc}"
                self._connected = False
                raise DeviceDisconnectedError(f"Dynamixel port {self.port} went away ({exc})") from exc
            if now - quiet_since >= self.resync_s or now - start > 10 * self.resync_s + 0.1:
                return
            time.sleep(0.001)

    def _retrying(self, what: str, dxl_id: int, fn, *args):
        """Call a unicast SDK function until it gets a status packet; returns its result tuple."""
        last = ""
        for attempt in range(1 + self.connect_retries):
            out = self._transact(fn, *args)
            result = out[-2]
            if result == _COMM_SUCCESS:
                return out
            last = self._ph.getTxRxResult(result)
            self._resync()
        raise DriverError(
            f"servo id {dxl_id} on {self.port}: {what} failed after {1 + self.connect_retries} attempts: {last}"
        )

    def _status_error(self, dxl_id: int, error: int, what: str) -> None:
        if error & _ERROR_NUMBER_MASK:
            raise DriverError(f"servo id {dxl_id} on {self.port} refused {what}: {describe_error(error)}")

    def _read(self, dxl_id: int, addr: tuple[int, int], signed: bool = False) -> int:
        address, size = addr
        fn = {1: self._ph.read1ByteTxRx, 2: self._ph.read2ByteTxRx, 4: self._ph.read4ByteTxRx}[size]
        value, _, error = self._retrying(f"reading address {address}", dxl_id, fn, self._port, dxl_id, address)
        self._status_error(dxl_id, error, f"a read of address {address}")
        if signed and value >= 1 << (8 * size - 1):
            value -= 1 << (8 * size)
        return value

    def _write(self, dxl_id: int, addr: tuple[int, int], value: int, what: str) -> None:
        address, size = addr
        fn = {1: self._ph.write1ByteTxRx, 2: self._ph.write2ByteTxRx, 4: self._ph.write4ByteTxRx}[size]
        raw = int(value) & ((1 << (8 * size)) - 1)
        _, error = self._retrying(f"writing {what}", dxl_id, fn, self._port, dxl_id, address, raw)
        self._status_error(dxl_id, error, f"{what} = {value}")

    def _ensure(self, dxl_id: int, addr: tuple[int, int], value: int, what: str, signed: bool = False) -> None:
        # EEPROM has limited write cycles: write only what differs.
        if self._read(dxl_id, addr, signed=signed) != value:
            self._write(dxl_id, addr, value, what)

    def _check_servos(self) -> None:
        problems = []
        for i, model in zip(self.motor_ids, self.models):
            try:
                number, _, error = self._retrying("ping", i, self._ph.ping, self._port, i)
            except DeviceDisconnectedError:
                raise
            except DriverError:
                problems.append(
                    f"no servo answers at id {i} ({self.baudrate} bit/s); check its id, baud rate, power and cable"
                )
                continue
            expected = MODEL_NUMBERS[model]
            if number != expected:
                found = next((n for n, v in MODEL_NUMBERS.items() if v == number), "unknown model")
                problems.append(f"servo id {i} is model number {number} ({found}), expected {expected} ({model})")
                continue
            self._verified.append(i)
            if error & _ALERT_BIT:
                status = self._read(i, ADDR_HARDWARE_ERROR_STATUS)
                problems.append(
                    f"servo id {i} reports a hardware error (Hardware Error Status {status:#04x}); "
                    "power-cycle or reboot it"
                )
        if problems:
            raise DriverError(f"Dynamixel bus {self.port}: " + "; ".join(problems))

    def _recover_watchdog_if_due(self) -> None:
        """After a silence long enough to trip the bus watchdog, clear and re-arm it where it tripped.

        A tripped servo holds position and ignores goals. Its goal is set to
        the present position before clearing, so clearing never resumes an
        old motion.
        """
        if not self.watchdog_units:
            return
        if time.monotonic() - self._last_tx < 0.8 * self.watchdog_units * WATCHDOG_UNIT_MS / 1000.0:
            return
        for i, cal in zip(self.motor_ids, self.calibration):
            if self._read(i, ADDR_BUS_WATCHDOG, signed=True) != -1:
                continue
            logger.warning("dynamixel: servo id %d on %s stopped on a bus watchdog timeout; re-arming", i, self.port)
            self.stats["watchdog_recoveries"] += 1
            self._write(i, ADDR_BUS_WATCHDOG, 0, "Bus Watchdog")
            present = self._read(i, ADDR_PRESENT_POSITION, signed=True)
            self._write(i, ADDR_GOAL_POSITION, int(np.clip(present, cal.range_min, cal.range_max)), "Goal Position")
            self._write(i, ADDR_BUS_WATCHDOG, self.watchdog_units, "Bus Watchdog")

    def _release(self) -> None:
        """Torque off on every servo (best effort), disarm the watchdog, close the port."""
        port, ph = self._port, self._ph
        self._connected = False
        if port is None:
            return
        if self._port_lost:
            # A re-plugged adapter may be back under the same path: one try to reopen.
            try:
                port.is_using = False
                port.openPort()
                self._port_lost = None
            except Exception as exc:
                logger.debug("dynamixel: reopen of %s failed: %s", self.port, exc)
        # Only servos that proved to be the configured model are written to:
        # address 64 need not be Torque Enable on anything else.
        ids = [i for i in self.motor_ids if i in self._verified]
        if ids and self._sdk is not None and not self._port_lost:
            # One sync write first turns all our servos off at once ...
            try:
                port.is_using = False
                g = self._sdk.GroupSyncWrite(port, ph, *ADDR_TORQUE_ENABLE)
                for i in ids:
                    g.addParam(i, [0])
                g.txPacket()
            except Exception as exc:
                logger.debug("dynamixel: sync torque-off on %s failed: %s", self.port, exc)
        # ... then each servo is confirmed one by one, whatever happened to the others.
        for i in ids:
            ok = False
            for _ in range(1 + self.close_retries):
                ok, detail = self._torque_off_once(i)
                self.torque_off_log.append((i, ok, detail))
                if ok:
                    break
            if ok:
                try:
                    port.is_using = False
                    ph.write1ByteTxRx(port, i, ADDR_BUS_WATCHDOG[0], 0)  # disarm for whoever uses the bus next
                except Exception:
                    pass
            else:
                logger.error("dynamixel: could not turn torque off on servo id %d (%s): %s", i, self.port, detail)
        try:
            port.is_using = False
            port.closePort()
        except Exception as exc:
            logger.debug("dynamixel: closing %s: %s", self.port, exc)
        self._port = None
        self._sync_read = self._sync_write = None
        self._verified = []

    def _torque_off_once(self, dxl_id: int) -> tuple[bool, str]:
        try:
            self._port.is_using = False
            result, error = self._ph.write1ByteTxRx(self._port, dxl_id, ADDR_TORQUE_ENABLE[0], 0)
        except Exception as exc:
            return False, f"{type(exc).__name__}: {exc}"
        if result != _COMM_SUCCESS:
            return False, self._ph.getTxRxResult(result)
        if error & _ERROR_NUMBER_MASK:
            return False, self._ph.getRxPacketError(error)
        return True, "torque off"


def _signed32(value: int) -> int:
    return value - (1 << 32) if value >= 1 << 31 else value


def make_dynamixel_driver(
    port: str,
    ids: Sequence[int] | str,
    model: str = "xl330-m288",
    calibration: str | os.PathLike | Mapping[Any, Any] | None = None,
    *,
    baudrate: int = 1_000_000,
    rate_hz: float = 50.0,
    max_joint_speed: float = 3.0,
    watchdog_ms: int = 100,
    read_retries: int = 3,
) -> DynamixelDriver:
    """Build a :class:`DynamixelDriver` from plain values (what a config or the CLI holds).

    Args:
        port: serial device path.
        ids: servo IDs, a sequence or a string such as ``"1,2,3"``.
        model: expected model of every servo.
        calibration: JSON path or dict; None only for bench tests.
        baudrate: bus bit rate.
        rate_hz: control rate; sets the period behind ``limits.max_delta``.
        max_joint_speed: rad/s allowed by the safety layer.
        watchdog_ms: bus watchdog window (0 = off).
        read_retries: extra attempts of a failed read.
    """
    if isinstance(ids, str):
        try:
            ids = [int(x) for x in ids.replace(" ", "").split(",") if x]
        except ValueError as exc:
            raise ConfigError(f"dynamixel: ids must be a comma-separated list of integers, got {ids!r}") from exc
    if not rate_hz > 0:
        raise ConfigError(f"dynamixel: rate_hz must be > 0, got {rate_hz}")
    return DynamixelDriver(
        port, list(ids), model, calibration, baudrate=baudrate, period_s=1.0 / rate_hz,
        max_joint_speed=max_joint_speed, watchdog_ms=watchdog_ms, read_retries=read_retries,
    )
