"""A ``dynamixel_sdk.PortHandler`` whose reads sleep until bytes arrive instead of spinning."""

from __future__ import annotations

import select
from typing import Any


def sleeping_port_handler(sdk: Any) -> type:
    """``dynamixel_sdk.PortHandler`` whose reads sleep until bytes arrive instead of spinning.

    The SDK opens the port with ``timeout=0`` and polls it in a loop until the
    reply is complete or the packet times out, which keeps one core busy for
    the whole bus transaction (a third of the cycle at 50 Hz with three
    servos). That core is the one the inference worker needs. This handler
    returns what is already there or else waits in ``select`` until the first
    byte arrives or the SDK's packet deadline passes; the SDK's loop, its
    timeouts and its results are unchanged.

    Args:
        sdk: the imported ``dynamixel_sdk`` module (the caller imports it, so
            this module never does).
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
