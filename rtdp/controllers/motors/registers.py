"""The control table of DYNAMIXEL X-series servos (Protocol 2.0), defined once.

Addresses, sizes, access and ranges are those of the ROBOTIS e-Manual pages
of the XL330-M288 and XM430-W350; the X series shares the layout, so the
driver addresses every model it knows through :data:`REGISTERS`. The bus
emulator builds each servo's control table from :data:`MODELS`, the same
registers with each model's defaults.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from enum import IntEnum
from typing import Mapping

TICKS_PER_REV = 4096  # Present Position / Goal Position ticks per shaft turn
VELOCITY_UNIT_RPM = 0.229  # one Present Velocity unit
# One Present Velocity unit in ticks per second.
TICKS_PER_S_PER_VELOCITY_UNIT = VELOCITY_UNIT_RPM / 60.0 * TICKS_PER_REV
WATCHDOG_UNIT_MS = 20  # one Bus Watchdog unit
RETURN_DELAY_UNIT_S = 2e-6  # one Return Delay Time unit
EEPROM_END = 64  # addresses below are EEPROM: written only with torque off
# Baud Rate (8) index -> bit/s, X series.
BAUD_RATES = {0: 9600, 1: 57600, 2: 115200, 3: 1_000_000, 4: 2_000_000, 5: 3_000_000, 6: 4_000_000, 7: 4_500_000}
WATCHDOG_TRIPPED = -1  # what Bus Watchdog reads after it stopped the servo

# Model numbers at address 0 (ROBOTIS e-Manual).
MODEL_NUMBERS: dict[str, int] = {
    "xl330-m077": 1190,
    "xl330-m288": 1200,
    "xl430-w250": 1060,
    "xm430-w210": 1030,
    "xm430-w350": 1020,
}


class OperatingMode(IntEnum):
    """Values of Operating Mode (11)."""

    CURRENT = 0
    VELOCITY = 1
    POSITION = 3
    EXTENDED_POSITION = 4
    CURRENT_BASED_POSITION = 5
    PWM = 16


# The modes in which the servo drives its shaft to Goal Position.
POSITION_MODES = (OperatingMode.POSITION, OperatingMode.EXTENDED_POSITION, OperatingMode.CURRENT_BASED_POSITION)


@dataclass(frozen=True)
class Register:
    """One item of the control table.

    Attributes:
        name: snake_case name of the e-Manual's data name, e.g. ``"goal_position"``.
        address, size: location in the table (bytes, little-endian).
        writable: False for read-only (R) items.
        signed: two's complement value.
        default: value after a factory reset (EEPROM) or power-up (RAM).
        low, high: accepted range for writes (inclusive); None: any value of
            the size, or a range that depends on other items (the goals).
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
        """True in the EEPROM area (kept over power cycles, locked while torque is on)."""
        return self.address < EEPROM_END

    @property
    def label(self) -> str:
        """The e-Manual's data name, e.g. ``"Goal Position"``, for messages."""
        return self.name.replace("_", " ").title()


_R = dict(writable=False)

# Defaults are the XL330-M288's; a model with others replaces them in MODELS.
X_SERIES: tuple[Register, ...] = (
    # EEPROM area
    Register("model_number", 0, 2, **_R),
    Register("model_information", 2, 4, **_R),
    Register("firmware_version", 6, 1, **_R),
    Register("id", 7, 1, default=1, low=0, high=252),
    Register("baud_rate", 8, 1, default=3, low=0, high=7),
    Register("return_delay_time", 9, 1, default=250, low=0, high=254),
    Register("drive_mode", 10, 1, default=0, low=0, high=13),
    Register("operating_mode", 11, 1, default=3, low=0, high=16),
    Register("secondary_id", 12, 1, default=255, low=0, high=255),
    Register("protocol_type", 13, 1, default=2, low=1, high=22),
    Register("homing_offset", 20, 4, signed=True, default=0, low=-1_044_479, high=1_044_479),
    Register("moving_threshold", 24, 4, default=10, low=0, high=1023),
    Register("temperature_limit", 31, 1, default=70, low=0, high=100),
    Register("max_voltage_limit", 32, 2, default=70, low=0, high=200),
    Register("min_voltage_limit", 34, 2, default=35, low=0, high=200),
    Register("pwm_limit", 36, 2, default=885, low=0, high=885),
    Register("current_limit", 38, 2, default=1750, low=0, high=1750),
    Register("velocity_limit", 44, 4, default=445, low=0, high=2047),
    Register("max_position_limit", 48, 4, default=4095, low=0, high=4095),
    Register("min_position_limit", 52, 4, default=0, low=0, high=4095),
    Register("startup_configuration", 60, 1, default=0, low=0, high=3),
    Register("shutdown", 63, 1, default=53, low=0, high=255),
    # RAM area
    Register("torque_enable", 64, 1, default=0, low=0, high=1),
    Register("led", 65, 1, default=0, low=0, high=1),
    Register("status_return_level", 68, 1, default=2, low=0, high=2),
    Register("registered_instruction", 69, 1, **_R),
    Register("hardware_error_status", 70, 1, **_R),
    Register("velocity_i_gain", 76, 2, default=1600, low=0, high=16383),
    Register("velocity_p_gain", 78, 2, default=180, low=0, high=16383),
    Register("position_d_gain", 80, 2, default=0, low=0, high=16383),
    Register("position_i_gain", 82, 2, default=0, low=0, high=16383),
    Register("position_p_gain", 84, 2, default=400, low=0, high=16383),
    Register("feedforward_2nd_gain", 88, 2, default=0, low=0, high=16383),
    Register("feedforward_1st_gain", 90, 2, default=0, low=0, high=16383),
    Register("bus_watchdog", 98, 1, signed=True, default=0, low=0, high=127),
    # Goal ranges depend on the limits (PWM, Current, Velocity, Min/Max Position Limit).
    Register("goal_pwm", 100, 2, signed=True),
    Register("goal_current", 102, 2, signed=True),
    Register("goal_velocity", 104, 4, signed=True),
    Register("profile_acceleration", 108, 4, default=0, low=0, high=32767),
    Register("profile_velocity", 112, 4, default=0, low=0, high=32767),
    Register("goal_position", 116, 4, signed=True),
    Register("realtime_tick", 120, 2, **_R),
    Register("moving", 122, 1, **_R),
    Register("moving_status", 123, 1, **_R),
    Register("present_pwm", 124, 2, signed=True, **_R),
    Register("present_current", 126, 2, signed=True, **_R),
    Register("present_velocity", 128, 4, signed=True, **_R),
    Register("present_position", 132, 4, signed=True, **_R),
    Register("velocity_trajectory", 136, 4, signed=True, **_R),
    Register("position_trajectory", 140, 4, signed=True, **_R),
    Register("present_input_voltage", 144, 2, **_R),
    Register("present_temperature", 146, 1, default=30, **_R),
)

# Every X-series register by name: what the driver reads and writes.
REGISTERS: dict[str, Register] = {r.name: r for r in X_SERIES}


@dataclass(frozen=True)
class ModelSpec:
    """A servo model: its model number, control table and datasheet constants.

    Attributes:
        name: model name, e.g. ``"xl330-m288"``.
        model_number: Model Number (0).
        firmware: Firmware Version (6).
        registers: the control table with this model's defaults.
        no_load_rpm: no-load speed; caps the emulated shaft speed.
        input_voltage: Present Input Voltage, 0.1 V.
    """

    name: str
    model_number: int
    firmware: int
    registers: tuple[Register, ...]
    no_load_rpm: float
    input_voltage: int

    def register(self, name: str) -> Register:
        """The item called ``name``; KeyError if the model has none."""
        return self._by_name[name]

    @functools.cached_property
    def _by_name(self) -> dict[str, Register]:
        return {r.name: r for r in self.registers}


def _x_series_model(
    name: str, firmware: int, *, no_load_rpm: float, input_voltage: int, defaults: Mapping[str, int] = {},
    highs: Mapping[str, int] = {},
) -> ModelSpec:
    """An X-series model: :data:`X_SERIES` with this model's defaults and upper bounds."""
    own = {"model_number": MODEL_NUMBERS[name], "firmware_version": firmware, **defaults}
    registers = tuple(
        replace(r, default=own.get(r.name, r.default), high=highs.get(r.name, r.high)) for r in X_SERIES
    )
    return ModelSpec(name, MODEL_NUMBERS[name], firmware, registers, no_load_rpm, input_voltage)


# The models with a full control table and motor constants: the ones the bus emulator serves.
MODELS: dict[str, ModelSpec] = {
    "xl330-m288": _x_series_model("xl330-m288", 46, no_load_rpm=103.0, input_voltage=50),
    "xm430-w350": _x_series_model(
        "xm430-w350", 48, no_load_rpm=46.0, input_voltage=120,
        defaults=dict(
            temperature_limit=80, max_voltage_limit=160, min_voltage_limit=95, current_limit=1193,
            velocity_limit=350, shutdown=52, velocity_i_gain=1920, velocity_p_gain=100, position_p_gain=800,
        ),
        highs=dict(current_limit=1193),  # Current Limit's range ends at the model's default
    ),
}
