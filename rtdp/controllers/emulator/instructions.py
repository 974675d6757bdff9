"""Protocol 2.0 instructions applied to the servos of one emulated bus.

:class:`EmulatedBus` holds the servos, decides what each instruction packet
does to them and which status packets answer it, in bus order: PING, READ,
WRITE, REG_WRITE/ACTION, REBOOT, FACTORY_RESET, SYNC/BULK READ/WRITE; status
return level and return delay time; replies in the order of the IDs in the
request, each delayed by the return delay plus 10 bit times per byte at the
bus's baud rate; faults from :mod:`~rtdp.controllers.emulator.faults`.
FAST_SYNC_READ / FAST_BULK_READ are not modelled (no reply). Every decoded
instruction packet is logged (:class:`LoggedPacket`), and every status packet
produced (:class:`ReplyRecord`), so tests can check what a driver put on the
bus and what state it was told.
"""

from __future__ import annotations

import collections
import random
from dataclasses import dataclass, field
from typing import Mapping

from rtdp.controllers import protocol2 as p2
from rtdp.controllers.emulator.faults import FaultConfig, inject
from rtdp.controllers.emulator.motor_model import MotorModelFactory
from rtdp.controllers.emulator.servo import Servo
from rtdp.controllers.motors.registers import RETURN_DELAY_UNIT_S, ModelSpec
from rtdp.controllers.protocol2 import ErrorCode, Instruction

# A reply to send: (servo id, bytes or None when dropped, bus delay s, fault delay s).
Outgoing = tuple[int, "bytes | None", float, float]


@dataclass(frozen=True)
class LoggedPacket:
    """One decoded instruction packet.

    Attributes:
        seq: running number of instruction packets.
        t: ``time.monotonic()`` when it was decoded.
        id: packet ID (``0xFE`` for broadcast).
        instruction: instruction byte.
        params: parameters (unstuffed).
        writes: for WRITE / REG_WRITE / SYNC_WRITE / BULK_WRITE,
            ``{servo id: (address, data bytes)}`` as decoded from the packet
            (whether or not the servo accepted it).
        reads: for READ / SYNC_READ / BULK_READ, ``{servo id: (address, length)}``.
        raw: the packet's bytes as received (stuffed, with CRC).
    """

    seq: int
    t: float
    id: int
    instruction: int
    params: bytes
    writes: dict[int, tuple[int, bytes]] = field(default_factory=dict)
    reads: dict[int, tuple[int, int]] = field(default_factory=dict)
    raw: bytes = field(default=b"", repr=False)

    def values(self, address: int, size: int, signed: bool = True) -> dict[int, int]:
        """Decoded values written at ``address`` (``size`` bytes) per servo, for write packets."""
        out = {}
        for dxl_id, (start, data) in self.writes.items():
            offset = address - start
            if 0 <= offset and offset + size <= len(data):
                out[dxl_id] = p2.from_le(data[offset : offset + size], signed=signed)
        return out


@dataclass(frozen=True)
class ReplyRecord:
    """One status packet the emulator produced.

    Attributes:
        seq: ``seq`` of the instruction packet it answers.
        t: ``time.monotonic()`` when its data was sampled (the request was processed).
        id: servo ID.
        error: error byte.
        data: status data (for a read, the table bytes).
        fault: None, or the fault applied: ``"corrupt_crc"``, ``"drop"``, ``"late"``, ``"garbage"``.
    """

    seq: int
    t: float
    id: int
    error: int
    data: bytes
    fault: str | None = None


class EmulatedBus:
    """The servos on one bus and what instruction packets do to them. Not thread-safe: the emulator's lock guards it.

    Args:
        motors: ``{id: model spec}``.
        positions: ``{id: initial shaft position, ticks}``.
        motor_model: builds each servo's motor.
        faults: faults to inject into replies.
        seed: seed of the fault RNG.
        baudrate: bit rate used for reply timing.
        now: ``time.monotonic()`` at power-up.
        log_size: most instruction packets / replies kept.

    Attributes:
        servos: ``{id: Servo}``, rebuilt after a write to ID (7).
        log, replies: the packet log and the status packets produced, oldest first.
        fault_counts: how many replies each fault hit.
    """

    def __init__(
        self,
        motors: Mapping[int, ModelSpec],
        positions: Mapping[int, float],
        motor_model: MotorModelFactory,
        faults: FaultConfig,
        seed: int,
        baudrate: int,
        now: float,
        log_size: int,
    ) -> None:
        self.faults = faults
        self.baudrate = baudrate
        self._rng = random.Random(seed)
        self.servos: dict[int, Servo] = {}
        for dxl_id, spec in motors.items():
            motor = motor_model(dxl_id, spec, positions[dxl_id])
            self.servos[dxl_id] = Servo(dxl_id, spec, motor, now, id_taken=self.id_taken)
        self.log: collections.deque[LoggedPacket] = collections.deque(maxlen=log_size)
        self.replies: collections.deque[ReplyRecord] = collections.deque(maxlen=log_size)
        self.fault_counts: collections.Counter[str] = collections.Counter()
        self._seq = 0

    def id_taken(self, dxl_id: int) -> bool:
        return any(s.id == dxl_id for s in self.servos.values())

    def handle(self, packet: p2.Packet, now: float) -> list[Outgoing]:
        """Apply one instruction packet received at ``now``; return the replies to send, in bus order."""
        for servo in self.servos.values():
            servo.advance(now)  # state as of this packet, before it counts for the watchdog
        broadcast = packet.id == p2.BROADCAST_ID
        for servo in self.servos.values():
            if broadcast or servo.id == packet.id:
                servo.last_comm = now
        seq = self._next_seq()
        entry = LoggedPacket(seq, now, packet.id, packet.instruction, packet.params, raw=packet.raw)
        self.log.append(entry)
        try:
            return self._dispatch(packet, entry, seq, now, broadcast)
        except p2.PacketError:
            # Malformed parameters: a unicast target answers an instruction error.
            servo = self.servos.get(packet.id)
            return [self._reply(servo, seq, now, ErrorCode.INSTRUCTION)] if servo else []
        finally:
            # A write to ID (7) moves a servo to another address on the bus.
            self.servos = {s.id: s for s in self.servos.values()}

    def answer_bad(self, raw: bytes, now: float) -> list[Outgoing]:
        """The reply to a packet with a bad CRC: a servo that sees its own ID in it answers a CRC error."""
        if len(raw) < 5:
            return []
        servo = self.servos.get(raw[4])
        if servo is None:
            return []
        return [self._reply(servo, self._next_seq(), now, ErrorCode.CRC)]

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _reply(self, servo: Servo, seq: int, now: float, error: int, data: bytes = b"") -> Outgoing:
        """Encode one status packet, apply faults, record it."""
        if servo.get("hardware_error_status"):
            error |= p2.ERRBIT_ALERT
        raw = p2.encode_status(servo.id, error, data)
        delay = servo.get("return_delay_time") * RETURN_DELAY_UNIT_S + len(raw) * 10.0 / self.baudrate
        sent, fault, fault_delay = inject(self.faults, self._rng, raw)
        if fault:
            self.fault_counts[fault] += 1
        self.replies.append(ReplyRecord(seq, now, servo.id, error, bytes(data), fault))
        return servo.id, sent, delay, fault_delay

    def _dispatch(
        self, packet: p2.Packet, entry: LoggedPacket, seq: int, now: float, broadcast: bool
    ) -> list[Outgoing]:
        inst, params = packet.instruction, packet.params
        target = self.servos.get(packet.id)
        by_id = {s.id: s for s in self.servos.values()}

        def answer(servo: Servo, error: int = 0, data: bytes = b"", *, read: bool = False):
            # Status Return Level: 0 = PING only, 1 = PING + reads, 2 = all.
            level = servo.get("status_return_level")
            if inst == Instruction.PING or (read and level >= 1) or level >= 2:
                return [self._reply(servo, seq, now, error, data)]
            return []

        if inst == Instruction.PING:
            servos = sorted(self.servos.values(), key=lambda s: s.id) if broadcast else ([target] if target else [])
            out = []
            for s in servos:
                out += answer(s, 0, p2.to_le(s.get("model_number"), 2) + bytes([s.get("firmware_version")]))
            return out

        if inst == Instruction.READ:
            address, length = p2.parse_address_length(params)
            if target is None or broadcast:
                return []
            entry.reads[target.id] = (address, length)
            error, data = target.read(address, length)
            return answer(target, error, data, read=True)

        if inst in (Instruction.WRITE, Instruction.REG_WRITE):
            if len(params) < 3:
                raise p2.PacketError("write without address and data")
            address, data = p2.from_le(params[:2]), params[2:]
            servos = list(self.servos.values()) if broadcast else ([target] if target else [])
            out = []
            for s in servos:
                entry.writes[s.id] = (address, bytes(data))
                error, changes = s.check_write(address, data)
                if not broadcast:
                    # Built before applying, so a write to ID (7) is answered from the ID it was sent to.
                    out += answer(s, error)
                if not error:
                    if inst == Instruction.WRITE:
                        s.apply(changes, now)
                    else:
                        s.registered = changes
                        s.publish(now)
            return out

        if inst == Instruction.ACTION:
            servos = list(self.servos.values()) if broadcast else ([target] if target else [])
            out = []
            for s in servos:
                if s.registered is None:
                    error = ErrorCode.INSTRUCTION
                else:
                    s.apply(s.registered, now)
                    s.registered = None
                    s.publish(now)
                    error = 0
                if not broadcast:
                    out += answer(s, error)
            return out

        # sync and bulk instructions differ only in how they list (id, address, length / data)
        if inst in (Instruction.SYNC_READ, Instruction.BULK_READ):
            if inst == Instruction.SYNC_READ:
                address, length, ids = p2.parse_sync_read(params)
                blocks = [(dxl_id, address, length) for dxl_id in ids]
            else:
                blocks = p2.parse_bulk_read(params)
            out = []
            for dxl_id, address, length in blocks:
                entry.reads[dxl_id] = (address, length)
                s = by_id.get(dxl_id)
                if s is not None:
                    error, data = s.read(address, length)
                    out += answer(s, error, data, read=True)
            return out

        if inst in (Instruction.SYNC_WRITE, Instruction.BULK_WRITE):
            if inst == Instruction.SYNC_WRITE:
                address, _, by_servo = p2.parse_sync_write(params)
                blocks = [(dxl_id, address, data) for dxl_id, data in by_servo.items()]
            else:
                blocks = p2.parse_bulk_write(params)
            for dxl_id, address, data in blocks:
                entry.writes[dxl_id] = (address, data)
                s = by_id.get(dxl_id)
                if s is not None:
                    error, changes = s.check_write(address, data)
                    if not error:
                        s.apply(changes, now)
            return []

        if inst == Instruction.REBOOT:
            if target is None or broadcast:
                return []
            out = answer(target)
            target.reboot_ram()
            target.publish(now)
            return out

        if inst == Instruction.FACTORY_RESET:
            if target is None:
                return []
            option = params[0] if params else 0xFF
            out = [] if broadcast else answer(target)
            target.factory_reset(keep_id=option in (0x01, 0x02), keep_baud=option == 0x02)
            target.publish(now)
            return out

        if inst in (Instruction.FAST_SYNC_READ, Instruction.FAST_BULK_READ):
            return []  # not modelled; the caller times out

        if target is not None and not broadcast:
            return answer(target, ErrorCode.INSTRUCTION)
        return []
