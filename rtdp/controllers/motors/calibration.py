"""Joint calibration of DYNAMIXEL servos: ticks <-> joint radians, in LeRobot's format.

One JSON object per joint (a LeRobot calibration file for a Dynamixel arm
loads as is)::

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
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from rtdp.controllers.motors.registers import REGISTERS, TICKS_PER_REV, VELOCITY_UNIT_RPM
from rtdp.errors import ConfigError

MAX_ID = REGISTERS["id"].high
CENTER_TICKS = TICKS_PER_REV // 2
RAD_PER_TICK = 2.0 * math.pi / TICKS_PER_REV
RAD_S_PER_VELOCITY_UNIT = VELOCITY_UNIT_RPM * 2.0 * math.pi / 60.0  # Present Velocity unit: 0.229 rev/min


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
        if not 0 <= self.id <= MAX_ID:
            raise ConfigError(f"calibration: servo id must be 0..{MAX_ID}, got {self.id}")
        if self.drive_mode not in (0, 1):
            raise ConfigError(f"calibration of id {self.id}: drive_mode must be 0 or 1, got {self.drive_mode}")
        offset = REGISTERS["homing_offset"]
        if not offset.low <= self.homing_offset <= offset.high:
            raise ConfigError(f"calibration of id {self.id}: homing_offset {self.homing_offset} outside ±{offset.high:,}")
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
