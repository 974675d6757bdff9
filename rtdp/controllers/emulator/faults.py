"""Faults injected into the status packets of the bus emulator, drawn from a seeded RNG."""

from __future__ import annotations

import random
from dataclasses import dataclass

from rtdp.errors import ConfigError


@dataclass(frozen=True)
class FaultConfig:
    """Faults injected into status packets, each drawn per reply from the emulator's seeded RNG.

    Attributes:
        corrupt_crc: probability that a reply's CRC is wrong.
        drop_reply: probability that a reply is not sent.
        late_reply: probability that a reply is sent ``late_reply_s`` late.
        late_reply_s: delay of a late reply; the default is past the SDK's
            ~34 ms status timeout, so the SDK has given up when it arrives
            (and within the SDK timeout + the driver's ``resync_s``, the
            window in which the driver flushes such stragglers).
        garbage: probability of 1..``garbage_max_bytes`` random bytes before a reply.
        garbage_max_bytes: longest garbage burst. Garbage bytes never include
            0xFF, so they cannot begin a header and every reply after them is
            still decodable; header-like noise is a corrupted packet, which
            ``corrupt_crc`` covers.
    """

    corrupt_crc: float = 0.0
    drop_reply: float = 0.0
    late_reply: float = 0.0
    late_reply_s: float = 0.045
    garbage: float = 0.0
    garbage_max_bytes: int = 8

    def __post_init__(self) -> None:
        for name in ("corrupt_crc", "drop_reply", "late_reply", "garbage"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"FaultConfig.{name} must be a probability in [0, 1], got {value}")
        if self.late_reply_s < 0 or self.garbage_max_bytes < 1:
            raise ConfigError("FaultConfig.late_reply_s must be >= 0 and garbage_max_bytes >= 1")


def inject(config: FaultConfig, rng: random.Random, raw: bytes) -> tuple[bytes | None, str | None, float]:
    """At most one fault on one encoded status packet.

    Args:
        config: the fault probabilities.
        rng: the emulator's RNG; the draws are made in a fixed order, so a seed replays a run.
        raw: the status packet as it would be sent.

    Returns:
        ``(bytes to send or None when dropped, fault name or None, extra delay s)``;
        fault names: ``"corrupt_crc"``, ``"drop"``, ``"late"``, ``"garbage"``.
    """
    fc = config
    if fc.corrupt_crc and rng.random() < fc.corrupt_crc:
        return raw[:-2] + bytes([raw[-2] ^ 0xA5, raw[-1]]), "corrupt_crc", 0.0
    if fc.drop_reply and rng.random() < fc.drop_reply:
        return None, "drop", 0.0
    if fc.late_reply and rng.random() < fc.late_reply:
        return raw, "late", fc.late_reply_s
    if fc.garbage and rng.random() < fc.garbage:
        n = rng.randint(1, fc.garbage_max_bytes)
        return bytes(rng.randrange(0xFF) for _ in range(n)) + raw, "garbage", 0.0
    return raw, None, 0.0
