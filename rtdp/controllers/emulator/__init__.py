"""Emulators that speak real hardware protocols, so drivers are tested end to end without hardware.

``dynamixel``: DYNAMIXEL Protocol 2.0 bus with X-series servos on a pseudo-terminal.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = ("MODELS", "DynamixelBusEmulator", "FaultConfig", "LoggedPacket", "ReplyRecord", "ServoState")
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    # Imported on first use, so ``python -m rtdp.controllers.emulator.dynamixel``
    # does not find its own module already imported by the package.
    if name in _EXPORTS:
        from rtdp.controllers.emulator import dynamixel

        return getattr(dynamixel, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
