"""Emulators that speak real hardware protocols, so drivers are tested end to end without hardware.

``dynamixel``: DYNAMIXEL Protocol 2.0 bus with X-series servos on a pseudo-terminal
(the command line; the parts are ``control_table``, ``motor_model``, ``servo``,
``faults``, ``instructions`` and ``pty_server``).
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> the module that defines it
_EXPORTS = {
    "MODELS": "rtdp.controllers.motors.registers",
    "DynamixelBusEmulator": "rtdp.controllers.emulator.pty_server",
    "FaultConfig": "rtdp.controllers.emulator.faults",
    "LoggedPacket": "rtdp.controllers.emulator.instructions",
    "ReplyRecord": "rtdp.controllers.emulator.instructions",
    "ServoState": "rtdp.controllers.emulator.servo",
    "MotorCommand": "rtdp.controllers.emulator.motor_model",
    "MotorModel": "rtdp.controllers.emulator.motor_model",
    "FirstOrderMotor": "rtdp.controllers.emulator.motor_model",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    # Imported on first use: the package stays light, and ``python -m
    # rtdp.controllers.emulator.dynamixel`` does not find its own module already imported.
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
