"""DYNAMIXEL X-series arm driver (Protocol 2.0): joint radians in, joint radians out.

One driver owns one bus (a U2D2 or any USB-serial adapter) with N servos in
position control mode, through :class:`~rtdp.controllers.motors.bus.DynamixelBus`.
Per control cycle it does one sync read of Present Velocity + Present
Position (address 128, 8 bytes) and one sync write of Goal Position (116, 4
bytes); everything else happens in ``connect()`` and ``close()``::

    drv = DynamixelDriver("/dev/ttyUSB0", [1, 2, 3, 4, 5, 6], "xl330-m288", "calibration.json")
    with drv:                                   # ping + model check, limits, watchdog, torque on
        r = drv.read()                          # r.obs["joint_pos"] (6,) rad, r.obs["joint_vel"] (6,) rad/s
        drv.write(r.obs["joint_pos"] + 0.01)    # (6,) target joint positions, rad
    # stop() holds position, close() turns torque off on every servo, even after an exception

The calibration (LeRobot's JSON format, ticks <-> radians) is described in
:mod:`rtdp.controllers.motors.calibration`; ``load_calibration``,
``write_calibration`` and ``MotorCalibration`` are importable from here too.

Reads never return stale data: a sync read that fails (timeout, CRC error,
a servo missing from the reply) is retried after the line has gone quiet, up
to ``read_retries`` times, and then raises; values are taken only when the
SDK reports every servo's data as available from this transaction.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any, Mapping, Sequence

import numpy as np

from rtdp.controllers.drivers.base import ActionLimits, DriverBase, Reading
from rtdp.controllers.motors.bus import DynamixelBus
from rtdp.controllers.motors.calibration import (
    CENTER_TICKS,
    MAX_ID,
    RAD_PER_TICK,
    RAD_S_PER_VELOCITY_UNIT,
    MotorCalibration,
    load_calibration,
    write_calibration,
)
from rtdp.controllers.motors.registers import MODEL_NUMBERS, WATCHDOG_TRIPPED, WATCHDOG_UNIT_MS, OperatingMode
from rtdp.controllers.protocol2 import ERRBIT_ALERT
from rtdp.errors import ActionError, ConfigError, DeviceDisconnectedError, DeviceNotConnectedError, DriverError

__all__ = [
    "DynamixelDriver", "MotorCalibration", "load_calibration", "make_dynamixel_driver", "write_calibration",
    "MODEL_NUMBERS", "RAD_PER_TICK", "RAD_S_PER_VELOCITY_UNIT",
]

logger = logging.getLogger(__name__)

# A servo resting this far outside its calibrated range at connect is
# brought to the limit on torque-on (sensor noise at a hard stop); further
# out, connect refuses rather than swing the joint.
LIMIT_TOLERANCE_TICKS = 32
# Present Velocity (128) and Present Position (132) are adjacent: one 8-byte sync read.
_STATE = ("present_velocity", "present_position")


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
        bus: the :class:`~rtdp.controllers.motors.bus.DynamixelBus` it talks through (open from
            ``connect()`` to ``close()``).
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
        if len(set(ids)) != len(ids) or not all(0 <= i <= MAX_ID for i in ids):
            raise ConfigError(f"DynamixelDriver: motor_ids must be distinct IDs in 0..{MAX_ID}, got {ids}")
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
        self.close_retries = close_retries
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

        self.bus = DynamixelBus(port, self.baudrate, retries=connect_retries, resync_s=resync_s)
        self._connected = False
        self._last_ticks: np.ndarray | None = None  # Present Position of the last good read
        self._verified: list[int] = []  # IDs that answered with the right model: the ones close() may write to
        self.torque_off_log: list[tuple[int, bool, str]] = []
        self.stats = self.bus.stats  # the bus counts retries and resyncs, the driver watchdog recoveries

    # --- public interface ---
    @property
    def limits(self) -> ActionLimits:
        """Joint-position bounds (rad) from the calibration and the per-cycle step ``max_joint_speed * period_s``."""
        return self._limits

    @property
    def connected(self) -> bool:
        return self._connected and not self.bus.lost

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
        if self.connected:
            return
        if self.bus.is_open:
            self._release()  # a session that lost its port and was never closed
        bus = self.bus
        bus.open()
        self._verified, self._last_ticks = [], None
        try:
            self._check_servos()
            for i, cal in zip(self.motor_ids, self.calibration):
                bus.write(i, "torque_enable", 0)
                if bus.read(i, "bus_watchdog") != 0:
                    bus.write(i, "bus_watchdog", 0)  # clears a trip of an earlier session
                bus.ensure(i, "operating_mode", OperatingMode.POSITION)
                if self.return_delay_units is not None:
                    bus.ensure(i, "return_delay_time", self.return_delay_units)
                bus.ensure(i, "homing_offset", cal.homing_offset)
                # Min before max would fail if the new min exceeds the old max; widen first, then narrow.
                bus.ensure(i, "max_position_limit", bus.register("max_position_limit").high)
                bus.ensure(i, "min_position_limit", cal.range_min)
                bus.ensure(i, "max_position_limit", cal.range_max)
            for i, cal, name in zip(self.motor_ids, self.calibration, self.joint_names):
                present = bus.read(i, "present_position")
                if not cal.range_min - LIMIT_TOLERANCE_TICKS <= present <= cal.range_max + LIMIT_TOLERANCE_TICKS:
                    raise DriverError(
                        f"servo id {i} ({name}) on {self.port} rests at {present} ticks, outside its calibrated "
                        f"range [{cal.range_min}, {cal.range_max}]: move the joint into range by hand or recalibrate"
                    )
                # Torque-on drives to Goal Position: make that where the joint already is.
                bus.write(i, "goal_position", int(np.clip(present, cal.range_min, cal.range_max)))
            if self.watchdog_units:
                for i in self.motor_ids:
                    bus.write(i, "bus_watchdog", self.watchdog_units)
            for i in self.motor_ids:
                bus.write(i, "torque_enable", 1)
            self._connected = True
        except BaseException:
            self._release()
            raise
        logger.info("dynamixel: connected %d servos %s on %s", len(self.motor_ids), self.motor_ids, self.port)

    def read(self) -> Reading:
        """One sync read of Present Velocity + Present Position.

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
        t, values = self.bus.sync_read(_STATE, self.motor_ids, retries=self.read_retries)
        ticks = values["present_position"]
        self._last_ticks = ticks
        pos = self._sign * (ticks - CENTER_TICKS) * RAD_PER_TICK
        vel = self._sign * values["present_velocity"] * RAD_S_PER_VELOCITY_UNIT
        return Reading(t, {"joint_pos": pos, "joint_vel": vel}, {})

    def write(self, action: np.ndarray) -> None:
        """Send target joint positions (N,) rad as one sync write of Goal Position.

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
        if not self.connected:
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
        if not self.bus.is_open:
            return
        self._connected = False
        try:
            self._release()
        except Exception as exc:  # pragma: no cover - _release already guards each step
            logger.error("dynamixel: close() failed on %s: %s", self.port, exc)

    # --- internals ---
    def _require_connected(self) -> None:
        if self.bus.lost:
            raise DeviceDisconnectedError(
                f"Dynamixel port {self.port} went away ({self.bus.lost}); close() and connect() again"
            )
        if not self._connected:
            raise DeviceNotConnectedError(
                f"DynamixelDriver on {self.port} is not connected: call connect() or use 'with driver:'"
            )

    def _send_goal(self, ticks: np.ndarray) -> None:
        self.bus.sync_write("goal_position", dict(zip(self.motor_ids, ticks)), retries=self.write_retries)

    def _check_servos(self) -> None:
        problems = []
        for i, model in zip(self.motor_ids, self.models):
            try:
                number, error = self.bus.ping(i)
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
            if error & ERRBIT_ALERT:
                status = self.bus.read(i, "hardware_error_status")
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
        if time.monotonic() - self.bus.last_tx < 0.8 * self.watchdog_units * WATCHDOG_UNIT_MS / 1000.0:
            return
        bus = self.bus
        for i, cal in zip(self.motor_ids, self.calibration):
            if bus.read(i, "bus_watchdog") != WATCHDOG_TRIPPED:
                continue
            logger.warning("dynamixel: servo id %d on %s stopped on a bus watchdog timeout; re-arming", i, self.port)
            self.stats["watchdog_recoveries"] += 1
            bus.write(i, "bus_watchdog", 0)
            present = bus.read(i, "present_position")
            bus.write(i, "goal_position", int(np.clip(present, cal.range_min, cal.range_max)))
            bus.write(i, "bus_watchdog", self.watchdog_units)

    def _release(self) -> None:
        """Torque off on every servo (best effort), disarm the watchdog, close the port."""
        bus = self.bus
        self._connected = False
        if not bus.is_open:
            return
        bus.reopen_if_lost()
        # Only servos that proved to be the configured model are written to:
        # address 64 need not be Torque Enable on anything else.
        ids = [i for i in self.motor_ids if i in self._verified]
        if ids:
            # One sync write first turns all our servos off at once ...
            bus.sync_write_once("torque_enable", {i: 0 for i in ids})
        # ... then each servo is confirmed one by one, whatever happened to the others.
        for i in ids:
            ok = False
            for _ in range(1 + self.close_retries):
                problem = bus.write_once(i, "torque_enable", 0)
                ok, detail = problem is None, problem or "torque off"
                self.torque_off_log.append((i, ok, detail))
                if ok:
                    break
            if ok:
                bus.write_once(i, "bus_watchdog", 0)  # disarm for whoever uses the bus next
            else:
                logger.error("dynamixel: could not turn torque off on servo id %d (%s): %s", i, self.port, detail)
        bus.close()
        self._verified = []


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
