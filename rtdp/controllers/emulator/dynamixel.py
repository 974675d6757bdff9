"""A DYNAMIXEL Protocol 2.0 bus with X-series servos, served on a pseudo-terminal: overview and command line.

The emulator opens a pty pair; its slave path (``/dev/pts/N``) is what
``dynamixel_sdk.PortHandler`` or any serial program opens, exactly like a
U2D2 adapter's ``/dev/ttyUSB0``. A background thread reads instruction
packets from the master side with :class:`~rtdp.controllers.protocol2.PacketParser`,
applies them to one control table per servo and answers with status packets.

The parts: :mod:`.control_table` (the bytes and their access rules, from the
register definitions of :mod:`rtdp.controllers.motors.registers`),
:mod:`.motor_model` (what the shaft does; a seam another model can fill),
:mod:`.servo` (the firmware between table and motor), :mod:`.faults`,
:mod:`.instructions` (what each packet does on the bus, the packet log) and
:mod:`.pty_server` (:class:`DynamixelBusEmulator`); this module re-exports the
public names and is the command line.

What is modelled (addresses and sizes from the ROBOTIS e-Manual pages of the
XL330-M288 and XM430-W350):

* the control table bytes, with access rules: read-only fields and undefined
  addresses answer an access error, the EEPROM area (addresses < 64) is
  writable only with torque off, values outside a field's range answer a
  data range error, a goal position outside Min/Max Position Limit (52/48)
  answers a data limit error; a write is applied only if every field in it
  passes (nothing is half-applied);
* position control: with torque on, the shaft follows Goal Position (with
  the default motor model, as a first-order system with a velocity cap (Velocity Limit, Profile Velocity
  and the model's no-load speed), integrated exactly in wall-clock time), so
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
import signal
import sys
import threading

from rtdp.controllers.emulator.faults import FaultConfig
from rtdp.controllers.emulator.instructions import LoggedPacket, ReplyRecord
from rtdp.controllers.emulator.motor_model import FirstOrderMotor, MotorCommand, MotorModel
from rtdp.controllers.emulator.pty_server import DynamixelBusEmulator
from rtdp.controllers.emulator.servo import ServoState
from rtdp.controllers.motors.registers import MODELS
from rtdp.errors import ConfigError

__all__ = [
    "MODELS", "DynamixelBusEmulator", "FaultConfig", "FirstOrderMotor", "LoggedPacket", "MotorCommand", "MotorModel",
    "ReplyRecord", "ServoState", "main",
]


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
