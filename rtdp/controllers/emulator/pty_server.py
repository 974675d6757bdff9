"""The bus emulator served on a pseudo-terminal: what a program opening the port talks to.

The emulator opens a pty pair; its slave path (``/dev/pts/N``) is what
``dynamixel_sdk.PortHandler`` or any serial program opens, exactly like a
U2D2 adapter's ``/dev/ttyUSB0``. A background thread reads instruction
packets from the master side with :class:`~rtdp.controllers.protocol2.PacketParser`,
hands them to the :class:`~rtdp.controllers.emulator.instructions.EmulatedBus`
and writes its status packets back, each after the previous one with the bus's
timing and faults. :meth:`DynamixelBusEmulator.disconnect` closes the pty
under a connected program, as a pulled cable does.
"""

from __future__ import annotations

import errno
import os
import select
import threading
import time
import tty
from typing import Mapping

from rtdp.controllers import protocol2 as p2
from rtdp.controllers.emulator.faults import FaultConfig
from rtdp.controllers.emulator.instructions import EmulatedBus, LoggedPacket, Outgoing, ReplyRecord
from rtdp.controllers.emulator.motor_model import FirstOrderMotor, MotorModelFactory
from rtdp.controllers.emulator.servo import ServoState
from rtdp.controllers.motors.registers import MODELS
from rtdp.errors import ConfigError


class DynamixelBusEmulator:
    """Several X-series servos on one Protocol 2.0 bus, served on a pty.

    Args:
        motors: ``{id: model name}``, model names as in :data:`MODELS`
            (``"xl330-m288"``, ``"xm430-w350"``).
        faults: faults to inject into replies; None: none.
        seed: seed of the fault RNG.
        baudrate: bit rate used for reply timing (a pty itself has no rate).
        timing: delay replies like a real bus (return delay + 10 bits/byte);
            False answers as fast as possible.
        initial_position: actual shaft position at start, ticks; one value or ``{id: ticks}``.
        time_constant_s: time constant of the default motor model's position response.
        log_size: most instruction packets / replies kept in :attr:`log` / :attr:`replies`.
        motor_model: builds the motor behind each servo (see
            :mod:`~rtdp.controllers.emulator.motor_model`); None:
            :class:`~rtdp.controllers.emulator.motor_model.FirstOrderMotor`
            with ``time_constant_s``.

    Example::

        with DynamixelBusEmulator({1: "xl330-m288", 2: "xl330-m288"}) as emu:
            port = emu.port          # "/dev/pts/N"
            ...                      # drive it with dynamixel_sdk
            emu.motor(1).present_position
    """

    def __init__(
        self,
        motors: Mapping[int, str],
        faults: FaultConfig | None = None,
        seed: int = 0,
        *,
        baudrate: int = 1_000_000,
        timing: bool = True,
        initial_position: float | Mapping[int, float] = 2048.0,
        time_constant_s: float = 0.05,
        log_size: int = 200_000,
        motor_model: MotorModelFactory | None = None,
    ) -> None:
        if not motors:
            raise ConfigError("DynamixelBusEmulator needs at least one motor, e.g. {1: 'xl330-m288'}")
        for dxl_id, model in motors.items():
            if not 0 <= int(dxl_id) <= p2.MAX_ID:
                raise ConfigError(f"servo ID must be 0..{p2.MAX_ID}, got {dxl_id}")
            if model not in MODELS:
                raise ConfigError(f"unknown Dynamixel model {model!r}; known models: {', '.join(sorted(MODELS))}")
        if baudrate <= 0 or time_constant_s <= 0:
            raise ConfigError("baudrate and time_constant_s must be positive")
        self.faults = faults or FaultConfig()
        self.baudrate = int(baudrate)
        self.timing = timing
        self._lock = threading.RLock()
        positions = {
            int(i): float(initial_position[i] if isinstance(initial_position, Mapping) else initial_position)
            for i in motors
        }
        self._bus = EmulatedBus(
            {int(i): MODELS[m] for i, m in motors.items()}, positions,
            motor_model or FirstOrderMotor.factory(time_constant_s), self.faults, seed, self.baudrate,
            time.monotonic(), log_size,
        )
        self.fault_counts = self._bus.fault_counts
        self.bad_packets = 0
        self._parser = p2.PacketParser(on_bad=self._on_bad_packet)
        self._pending_bad: list[bytes] = []
        self._master: int | None = None
        self._slave: int | None = None
        self._wake_r: int | None = None
        self._wake_w: int | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._closed = threading.Event()
        self.port: str | None = None

    # --- lifecycle ---
    def start(self) -> str:
        """Open the pty and serve it in a background thread; returns the slave path to open."""
        if self._thread is not None:
            raise RuntimeError("emulator already started")
        master, slave = os.openpty()
        # Raw mode: no echo, no line editing, no CR/LF translation; the SDK's
        # pyserial would set this too, but a plain program may not.
        tty.setraw(slave)
        # Non-blocking master: if the program on the slave side stops reading,
        # replies are dropped (as on a bus nobody listens to) instead of
        # blocking the serving thread on a full pty buffer.
        os.set_blocking(master, False)
        self._master, self._slave = master, slave
        # Keeping our own slave fd open means the master never reads EIO
        # between a client's close and its next open.
        self._wake_r, self._wake_w = os.pipe()
        self.port = os.ttyname(slave)
        self._stop.clear()
        self._closed.clear()
        self._thread = threading.Thread(target=self._serve, name=f"dxl-emulator {self.port}", daemon=True)
        self._thread.start()
        return self.port

    def disconnect(self) -> None:
        """Close the pty now, as a pulled cable would: the connected program's next read/write fails.

        The emulator's state stays inspectable; it does not serve again.
        """
        self._stop.set()
        if self._wake_w is not None:
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._closed.wait(timeout=2.0 + self.faults.late_reply_s)

    def stop(self) -> None:
        """Stop serving and close the pty (idempotent)."""
        self.disconnect()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2.0 + self.faults.late_reply_s)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> "DynamixelBusEmulator":
        if self._thread is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- inspection ---
    @property
    def log(self) -> list[LoggedPacket]:
        """Every decoded instruction packet, oldest first (a copy)."""
        with self._lock:
            return list(self._bus.log)

    @property
    def replies(self) -> list[ReplyRecord]:
        """Every status packet produced (including ones a fault dropped), oldest first (a copy)."""
        with self._lock:
            return list(self._bus.replies)

    def clear_log(self) -> None:
        with self._lock:
            self._bus.log.clear()
            self._bus.replies.clear()

    @property
    def ids(self) -> list[int]:
        with self._lock:
            return sorted(self._bus.servos)

    def motor(self, dxl_id: int) -> ServoState:
        """Snapshot of one servo, with its motion integrated up to now."""
        with self._lock:
            return self._bus.servos[dxl_id].snapshot(time.monotonic())

    def set_position(self, dxl_id: int, ticks: float) -> None:
        """Move a servo's shaft by hand (as a person backdriving it would), torque off or on."""
        with self._lock:
            self._bus.servos[dxl_id].move_by_hand(ticks, time.monotonic())

    # --- serving ---
    def _serve(self) -> None:
        assert self._master is not None and self._wake_r is not None
        try:
            while not self._stop.is_set():
                try:
                    ready, _, _ = select.select([self._master, self._wake_r], [], [], 0.05)
                except (OSError, ValueError):
                    break
                if self._stop.is_set():
                    break
                if self._master not in ready:
                    continue
                try:
                    data = os.read(self._master, 4096)
                except OSError as exc:
                    if exc.errno in (errno.EIO, errno.EAGAIN):
                        time.sleep(0.005)
                        continue
                    raise
                if not data:
                    continue
                with self._lock:
                    packets = self._parser.feed(data)
                    bad, self._pending_bad = self._pending_bad, []
                for raw in bad:
                    self._send(self._answer_bad(raw))
                for packet in packets:
                    self._send(self._handle(packet))
                    if self._stop.is_set():
                        break
        finally:
            self._close_fds()
            self._closed.set()

    def _close_fds(self) -> None:
        for name in ("_master", "_slave", "_wake_r", "_wake_w"):
            fd = getattr(self, name)
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
                setattr(self, name, None)

    def _on_bad_packet(self, raw: bytes, reason: str) -> None:
        # Called by the parser under the lock; answered after the good packets are parsed.
        self.bad_packets += 1
        self._pending_bad.append(raw)

    def _answer_bad(self, raw: bytes) -> list[Outgoing]:
        with self._lock:
            return self._bus.answer_bad(raw, time.monotonic())

    def _handle(self, packet: p2.Packet) -> list[Outgoing]:
        now = time.monotonic()
        with self._lock:
            return self._bus.handle(packet, now)

    def _send(self, replies: list[Outgoing]) -> None:
        """Write status packets one after another, with bus timing and faults."""
        # Each reply follows the previous one on the bus; sleeping to absolute
        # deadlines keeps sleep overshoot from adding up over a sync read.
        deadline = time.monotonic()
        for dxl_id, raw, bus_delay, fault_delay in replies:
            if self._stop.is_set() or self._master is None:
                return
            deadline += (bus_delay if self.timing else 0.0) + fault_delay
            pause = deadline - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            if raw is None:
                continue  # dropped by a fault
            try:
                os.write(self._master, raw)
            except BlockingIOError:
                continue
            except OSError:
                return
