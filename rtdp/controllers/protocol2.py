"""DYNAMIXEL Protocol 2.0 packets: encode, decode and find them in a byte stream.

Pure Python, no SDK: the bus emulator speaks the protocol with this module, and
the tests check it against the worked examples of the ROBOTIS e-Manual
(https://emanual.robotis.com/docs/en/dxl/protocol2/).

Wire format of every packet::

    FF FF FD 00 | ID | LEN_L LEN_H | INST | PARAM ... | CRC_L CRC_H
    header        id   length        instruction       CRC-16 (0x8005)

``LEN`` counts the bytes after itself (instruction, parameters, CRC). A status
packet is an instruction packet with instruction ``0x55`` whose first
parameter is the error byte. Because ``FF FF FD`` marks the start of a packet,
any ``FF FF FD`` inside the instruction + parameter region is sent as
``FF FF FD FD`` (byte stuffing); the length field counts the stuffed bytes and
the CRC is computed over the stuffed packet, header included.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Callable, Iterable, Mapping

from rtdp.errors import RtdpError

HEADER = b"\xff\xff\xfd\x00"
BROADCAST_ID = 0xFE
MAX_ID = 0xFC
# The SDK refuses status packets longer than this; the parser uses the same
# bound so a corrupted length field cannot make it wait for megabytes.
MAX_PACKET_LENGTH = 1024


class Instruction(IntEnum):
    """Instruction byte of a Protocol 2.0 packet."""

    PING = 0x01
    READ = 0x02
    WRITE = 0x03
    REG_WRITE = 0x04
    ACTION = 0x05
    FACTORY_RESET = 0x06
    REBOOT = 0x08
    CLEAR = 0x10
    CONTROL_TABLE_BACKUP = 0x20
    STATUS = 0x55
    SYNC_READ = 0x82
    SYNC_WRITE = 0x83
    FAST_SYNC_READ = 0x8A
    BULK_READ = 0x92
    BULK_WRITE = 0x93
    FAST_BULK_READ = 0x9A


class ErrorCode(IntEnum):
    """Error number in bits 0-6 of a status packet's error byte."""

    NONE = 0x00
    RESULT_FAIL = 0x01
    INSTRUCTION = 0x02
    CRC = 0x03
    DATA_RANGE = 0x04
    DATA_LENGTH = 0x05
    DATA_LIMIT = 0x06
    ACCESS = 0x07


# Bit 7 of the error byte: the device has a hardware error (see its Hardware
# Error Status field); it is set together with, or without, an error number.
ERRBIT_ALERT = 0x80

_ERROR_TEXT = {
    ErrorCode.RESULT_FAIL: "failed to process the instruction",
    ErrorCode.INSTRUCTION: "undefined instruction, or ACTION without REG_WRITE",
    ErrorCode.CRC: "CRC of the instruction packet does not match",
    ErrorCode.DATA_RANGE: "data out of range for the address",
    ErrorCode.DATA_LENGTH: "data shorter than the field at the address",
    ErrorCode.DATA_LIMIT: "data outside the limit value (e.g. a position limit)",
    ErrorCode.ACCESS: "read-only/undefined address, or EEPROM written with torque on",
}


class PacketError(RtdpError, ValueError):
    """Bytes that are not a valid Protocol 2.0 packet (header, length or CRC)."""


def describe_error(error: int) -> str:
    """Human-readable text of a status packet's error byte (``""`` for no error)."""
    parts = []
    number = error & ~ERRBIT_ALERT
    if number:
        try:
            parts.append(_ERROR_TEXT[ErrorCode(number)])
        except ValueError:
            parts.append(f"unknown error number {number}")
    if error & ERRBIT_ALERT:
        parts.append("hardware alert (read Hardware Error Status)")
    return "; ".join(parts)


def _make_crc_table() -> tuple[int, ...]:
    # MSB-first CRC-16 with polynomial x^16 + x^15 + x^2 + 1 (0x8005), initial
    # value 0, no reflection, no final XOR: the algorithm of the e-Manual's
    # update_crc(). One table entry per value of the top byte.
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x8005) if crc & 0x8000 else (crc << 1)
        table.append(crc & 0xFFFF)
    return tuple(table)


_CRC_TABLE = _make_crc_table()


def crc16(data: bytes | bytearray | Iterable[int], crc: int = 0) -> int:
    """CRC-16 of Protocol 2.0 (e-Manual ``update_crc``).

    Args:
        data: bytes from the first header byte up to the last parameter.
        crc: running value, to continue a CRC over several chunks.

    Returns:
        The 16-bit CRC; it is sent little-endian (low byte first).
    """
    for b in data:
        crc = ((crc << 8) ^ _CRC_TABLE[((crc >> 8) ^ b) & 0xFF]) & 0xFFFF
    return crc


def stuff(body: bytes) -> bytes:
    """Add byte stuffing: every ``FF FF FD`` in ``body`` becomes ``FF FF FD FD``.

    Args:
        body: the instruction byte and parameters (the stuffed region).
    """
    out = bytearray()
    for b in body:
        out.append(b)
        if b == 0xFD and len(out) >= 3 and out[-3] == 0xFF and out[-2] == 0xFF:
            # A stuffed FD is never the start of a new FF FF FD, so matching on
            # the output (not the input) is what the receiver undoes.
            out.append(0xFD)
    return bytes(out)


def unstuff(body: bytes) -> bytes:
    """Remove byte stuffing: every ``FF FF FD FD`` becomes ``FF FF FD``."""
    out = bytearray()
    i = 0
    while i < len(body):
        b = body[i]
        out.append(b)
        if b == 0xFD and len(out) >= 3 and out[-3] == 0xFF and out[-2] == 0xFF:
            if i + 1 < len(body) and body[i + 1] == 0xFD:
                i += 1  # drop the stuffing byte
        i += 1
    return bytes(out)


@dataclass(frozen=True)
class Packet:
    """One decoded packet (byte stuffing removed).

    Attributes:
        id: device ID (0..252) or ``BROADCAST_ID``.
        instruction: instruction byte; ``Instruction.STATUS`` for a status packet.
        params: parameters after the instruction byte, unstuffed (for a status
            packet, the error byte followed by the data).
        raw: the packet as it was on the wire (stuffed, with CRC); empty if
            the packet was built in memory.
    """

    id: int
    instruction: int
    params: bytes
    raw: bytes = field(default=b"", repr=False, compare=False)

    @property
    def is_status(self) -> bool:
        return self.instruction == Instruction.STATUS

    @property
    def error(self) -> int:
        """Error byte of a status packet."""
        if not self.is_status or not self.params:
            raise PacketError("only a status packet has an error byte")
        return self.params[0]

    @property
    def data(self) -> bytes:
        """Data of a status packet (parameters after the error byte)."""
        if not self.is_status or not self.params:
            raise PacketError("only a status packet has a data field")
        return self.params[1:]


def encode_packet(dxl_id: int, instruction: int, params: bytes = b"") -> bytes:
    """Encode one packet: header, ID, length, stuffed instruction + params, CRC.

    Args:
        dxl_id: 0..252, or ``BROADCAST_ID``.
        instruction: instruction byte (``Instruction.STATUS`` for a status packet).
        params: parameters, not stuffed.
    """
    if not (0 <= dxl_id <= MAX_ID or dxl_id == BROADCAST_ID):
        raise PacketError(f"ID must be 0..252 or 254 (broadcast), got {dxl_id}")
    if not 0 <= instruction <= 0xFF:
        raise PacketError(f"instruction must be one byte, got {instruction}")
    body = stuff(bytes([instruction]) + bytes(params))
    length = len(body) + 2  # + CRC
    if length + 7 > MAX_PACKET_LENGTH:
        raise PacketError(f"packet of {length + 7} bytes exceeds {MAX_PACKET_LENGTH}")
    head = HEADER + bytes([dxl_id, length & 0xFF, length >> 8])
    crc = crc16(head + body)
    return head + body + bytes([crc & 0xFF, crc >> 8])


def encode_status(dxl_id: int, error: int = 0, data: bytes = b"") -> bytes:
    """Encode a status packet with its error byte and data."""
    return encode_packet(dxl_id, Instruction.STATUS, bytes([error & 0xFF]) + bytes(data))


def decode_packet(raw: bytes) -> Packet:
    """Decode exactly one complete packet.

    Raises:
        PacketError: bad header, length field not matching, or CRC mismatch.
    """
    raw = bytes(raw)
    if len(raw) < 10 or raw[:4] != HEADER:
        raise PacketError(f"not a Protocol 2.0 packet: {raw[:8].hex(' ')}")
    length = raw[5] | (raw[6] << 8)
    if length < 3 or len(raw) != length + 7:
        raise PacketError(f"length field {length} does not match {len(raw)} bytes")
    crc = raw[-2] | (raw[-1] << 8)
    if crc16(raw[:-2]) != crc:
        raise PacketError(f"CRC mismatch: got {crc:#06x}, computed {crc16(raw[:-2]):#06x}")
    body = unstuff(raw[7:-2])
    return Packet(id=raw[4], instruction=body[0], params=body[1:], raw=raw)


# --- parameters of the common instructions --------------------------------


def to_le(value: int, size: int) -> bytes:
    """``value`` as ``size`` little-endian bytes; negative values as two's complement."""
    return (int(value) & ((1 << (8 * size)) - 1)).to_bytes(size, "little")


def from_le(data: bytes, signed: bool = False) -> int:
    """Little-endian bytes to an int (two's complement when ``signed``)."""
    return int.from_bytes(bytes(data), "little", signed=signed)


def encode_ping(dxl_id: int) -> bytes:
    return encode_packet(dxl_id, Instruction.PING)


def encode_read(dxl_id: int, address: int, length: int) -> bytes:
    return encode_packet(dxl_id, Instruction.READ, to_le(address, 2) + to_le(length, 2))


def encode_write(dxl_id: int, address: int, data: bytes) -> bytes:
    return encode_packet(dxl_id, Instruction.WRITE, to_le(address, 2) + bytes(data))


def encode_sync_read(address: int, length: int, ids: Iterable[int]) -> bytes:
    return encode_packet(BROADCAST_ID, Instruction.SYNC_READ, to_le(address, 2) + to_le(length, 2) + bytes(ids))


def encode_sync_write(address: int, length: int, data: Mapping[int, bytes]) -> bytes:
    params = bytearray(to_le(address, 2) + to_le(length, 2))
    for dxl_id, d in data.items():
        if len(d) != length:
            raise PacketError(f"sync write to ID {dxl_id}: {len(d)} bytes, expected {length}")
        params += bytes([dxl_id]) + bytes(d)
    return encode_packet(BROADCAST_ID, Instruction.SYNC_WRITE, bytes(params))


def parse_address_length(params: bytes) -> tuple[int, int]:
    """``(address, length)`` from the first four parameters of READ / SYNC_READ / SYNC_WRITE."""
    if len(params) < 4:
        raise PacketError(f"expected address and length (4 bytes), got {len(params)} bytes")
    return from_le(params[0:2]), from_le(params[2:4])


def parse_sync_read(params: bytes) -> tuple[int, int, list[int]]:
    """``(address, length, ids)`` of a SYNC_READ."""
    address, length = parse_address_length(params)
    return address, length, list(params[4:])


def parse_sync_write(params: bytes) -> tuple[int, int, dict[int, bytes]]:
    """``(address, length, {id: data})`` of a SYNC_WRITE."""
    address, length = parse_address_length(params)
    rest = params[4:]
    if length == 0 or len(rest) % (length + 1):
        raise PacketError(f"sync write: {len(rest)} bytes do not split into (ID + {length} data) blocks")
    blocks = {}
    for i in range(0, len(rest), length + 1):
        blocks[rest[i]] = bytes(rest[i + 1 : i + 1 + length])
    return address, length, blocks


def parse_bulk_read(params: bytes) -> list[tuple[int, int, int]]:
    """``[(id, address, length), ...]`` of a BULK_READ."""
    if len(params) % 5:
        raise PacketError(f"bulk read: {len(params)} bytes do not split into 5-byte blocks")
    return [(params[i], from_le(params[i + 1 : i + 3]), from_le(params[i + 3 : i + 5])) for i in range(0, len(params), 5)]


def parse_bulk_write(params: bytes) -> list[tuple[int, int, bytes]]:
    """``[(id, address, data), ...]`` of a BULK_WRITE."""
    out = []
    i = 0
    while i < len(params):
        if i + 5 > len(params):
            raise PacketError("bulk write: truncated block header")
        dxl_id, address, length = params[i], from_le(params[i + 1 : i + 3]), from_le(params[i + 3 : i + 5])
        data = params[i + 5 : i + 5 + length]
        if len(data) != length:
            raise PacketError(f"bulk write: block for ID {dxl_id} truncated")
        out.append((dxl_id, address, bytes(data)))
        i += 5 + length
    return out


class PacketParser:
    """Finds packets in a byte stream that may hold garbage and corrupted packets.

    Feed it bytes as they arrive; it returns every complete packet with a valid
    CRC, in order. Bytes before a header are skipped. A candidate packet with
    an impossible length or a CRC mismatch is dropped by skipping one byte and
    searching again, so a real packet that started inside the bad one is still
    found.

    Args:
        on_bad: called with ``(raw_bytes, reason)`` for each candidate packet
            that failed its CRC or length check (the emulator answers a CRC
            error like a real servo does).

    Attributes:
        skipped_bytes: bytes discarded outside any valid packet.
        bad_packets: candidates dropped for a CRC or length error.
    """

    def __init__(self, on_bad: Callable[[bytes, str], None] | None = None) -> None:
        self._buf = bytearray()
        self._on_bad = on_bad
        self.skipped_bytes = 0
        self.bad_packets = 0

    def reset(self) -> None:
        """Forget buffered bytes (counters are kept)."""
        self._buf.clear()

    def feed(self, data: bytes) -> list[Packet]:
        """Add bytes; return the packets completed by them."""
        self._buf += data
        out: list[Packet] = []
        buf = self._buf
        while True:
            start = buf.find(HEADER)
            if start < 0:
                # Keep a tail that may be the beginning of a header.
                keep = next((n for n, tail in ((3, b"\xff\xff\xfd"), (2, b"\xff\xff"), (1, b"\xff")) if buf.endswith(tail)), 0)
                self.skipped_bytes += len(buf) - keep
                del buf[: len(buf) - keep]
                break
            if start:
                self.skipped_bytes += start
                del buf[:start]
            if len(buf) < 7:
                break
            length = buf[5] | (buf[6] << 8)
            if length < 3 or length + 7 > MAX_PACKET_LENGTH:
                self._bad(bytes(buf[:7]), f"impossible length {length}")
                continue
            if len(buf) < length + 7:
                break
            raw = bytes(buf[: length + 7])
            try:
                packet = decode_packet(raw)
            except PacketError as exc:
                self._bad(raw, str(exc))
                continue
            del buf[: length + 7]
            out.append(packet)
        return out

    def _bad(self, raw: bytes, reason: str) -> None:
        self.bad_packets += 1
        self.skipped_bytes += 1
        del self._buf[:1]
        if self._on_bad is not None:
            self._on_bad(raw, reason)
