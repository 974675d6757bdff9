"""Dynamixel stack end to end: Protocol 2.0 codec, the pty bus emulator, and the SDK-based driver.

References: the worked packets of the ROBOTIS e-Manual (Protocol 2.0 page),
the official dynamixel-sdk (it builds and parses every packet on the pty),
and the emulator's own packet/reply log, which records what was on the bus.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time

import numpy as np
import pytest

from rtdp.controllers import protocol2 as p2
from rtdp.controllers.emulator.dynamixel import DynamixelBusEmulator, FaultConfig
from rtdp.errors import ActionError, ConfigError, DeviceDisconnectedError, DeviceNotConnectedError, DriverError

sdk = pytest.importorskip("dynamixel_sdk")

from rtdp.controllers.drivers.dynamixel import (  # noqa: E402  (after the skip: the module itself needs no SDK)
    RAD_PER_TICK,
    RAD_S_PER_VELOCITY_UNIT,
    DynamixelDriver,
    load_calibration,
    make_dynamixel_driver,
    write_calibration,
)
from rtdp.controllers.motors.sdk_port import sleeping_port_handler  # noqa: E402

IDS = [1, 2, 3, 4, 5, 6]
CAL = {
    f"joint_{i}": {"id": i, "drive_mode": i % 2, "homing_offset": 10 * i, "range_min": 1024 + i, "range_max": 3072 - i}
    for i in IDS
}


@pytest.fixture
def make_emu():
    """Factory of started emulators, all stopped at teardown."""
    made = []

    def make(motors=None, **kw):
        emu = DynamixelBusEmulator(motors or {i: "xl330-m288" for i in IDS}, **kw)
        emu.start()
        made.append(emu)
        return emu

    yield make
    for emu in made:
        emu.stop()


@pytest.fixture
def bus(make_emu):
    """An emulator with three servos and an SDK port on it: (emu, port, packet handler)."""
    emu = make_emu({1: "xl330-m288", 2: "xl330-m288", 3: "xm430-w350"})
    port = sdk.PortHandler(emu.port)
    assert port.openPort() and port.setBaudRate(1_000_000)
    yield emu, port, sdk.PacketHandler(2.0)
    port.closePort()


def wait_until(condition, timeout: float = 2.0) -> bool:
    """Poll for something the emulator thread does asynchronously (a sync write has no reply)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True


def driver(emu, **kw) -> DynamixelDriver:
    kw.setdefault("calibration", CAL)
    ids = kw.pop("ids", IDS)
    return DynamixelDriver(emu.port, ids, "xl330-m288", **kw)


# --- codec --------------------------------------------------------------------

# Worked examples of the e-Manual's Protocol 2.0 page.
EMANUAL_PACKETS = {
    "ping id 1": (p2.encode_ping(1), "FF FF FD 00 01 03 00 01 19 4E"),
    "ping status, model 1030 fw 38": (
        p2.encode_status(1, 0, bytes([0x06, 0x04, 0x26])),
        "FF FF FD 00 01 07 00 55 00 06 04 26 65 5D",
    ),
    "read 132, 4 bytes": (p2.encode_read(1, 132, 4), "FF FF FD 00 01 07 00 02 84 00 04 00 1D 15"),
    "write 116 = 512": (p2.encode_write(1, 116, p2.to_le(512, 4)), "FF FF FD 00 01 09 00 03 74 00 00 02 00 00 CA 89"),
    "sync read 132, ids 1 2": (p2.encode_sync_read(132, 4, [1, 2]), "FF FF FD 00 FE 09 00 82 84 00 04 00 01 02 CE FA"),
    "sync write 116": (
        p2.encode_sync_write(116, 4, {1: p2.to_le(150, 4), 2: p2.to_le(170, 4)}),
        "FF FF FD 00 FE 11 00 83 74 00 04 00 01 96 00 00 00 02 AA 00 00 00 82 87",
    ),
    "reboot id 1": (p2.encode_packet(1, p2.Instruction.REBOOT), "FF FF FD 00 01 03 00 08 2F 4E"),
}


def test_crc16_matches_emanual_vector():
    # The e-Manual's PING: FF FF FD 00 01 03 00 01 has CRC 19 4E (0x4E19, sent low byte first).
    assert p2.crc16(bytes.fromhex("FFFFFD0001030001")) == 0x4E19
    # Running CRC over two chunks equals the CRC of the whole.
    assert p2.crc16(bytes.fromhex("030001"), p2.crc16(bytes.fromhex("FFFFFD0001"))) == 0x4E19


@pytest.mark.parametrize("name", sorted(EMANUAL_PACKETS))
def test_encode_matches_emanual_packets(name):
    got, want = EMANUAL_PACKETS[name]
    assert got == bytes.fromhex(want)
    decoded = p2.decode_packet(got)
    assert p2.encode_packet(decoded.id, decoded.instruction, decoded.params) == got


def test_crc_and_stuffing_agree_with_the_sdk():
    ph = sdk.PacketHandler(2.0)
    rng = random.Random(1)
    for _ in range(300):
        params = bytearray(rng.randrange(256) for _ in range(rng.randrange(30)))
        if rng.random() < 0.5:
            at = rng.randrange(len(params) + 1)
            params[at:at] = b"\xff\xff\xfd"
        assert p2.crc16(params) == ph.updateCRC(0, params, len(params))
        # The SDK stuffs and CRCs a packet in place; ours must produce the same bytes.
        length = len(params) + 3
        pkt = [0xFF, 0xFF, 0xFD, 0x00, 7, length & 0xFF, length >> 8, p2.Instruction.WRITE, *params, 0, 0]
        pkt = ph.addStuffing(pkt)
        n = pkt[5] | (pkt[6] << 8)
        crc = ph.updateCRC(0, pkt, n + 5)
        sdk_bytes = bytes(pkt[: n + 5]) + bytes([crc & 0xFF, crc >> 8])
        assert p2.encode_packet(7, p2.Instruction.WRITE, bytes(params)) == sdk_bytes


def test_codec_round_trip_with_byte_stuffing():
    data = b"\xff\xff\xfd\xff"  # -131073 as int32: the bytes FF FF FD need stuffing
    raw = p2.encode_write(1, 20, data)
    assert b"\xff\xff\xfd\xfd" in raw[7:]
    assert raw[5] | (raw[6] << 8) == len(raw) - 7  # length counts the stuffing byte
    assert p2.crc16(raw[:-2]) == raw[-2] | (raw[-1] << 8)  # CRC over the stuffed bytes
    pkt = p2.decode_packet(raw)
    assert (pkt.id, pkt.instruction, pkt.params) == (1, p2.Instruction.WRITE, b"\x14\x00" + data)
    assert p2.from_le(pkt.params[2:], signed=True) == -131073
    for body in (b"", b"\xff\xff\xfd", b"\xff\xff\xfd\xfd", b"\xff\xff\xfd" * 3, b"a\xff\xff\xfd\xff\xff\xfdb"):
        assert p2.unstuff(p2.stuff(body)) == body
    status = p2.decode_packet(p2.encode_status(3, p2.ErrorCode.DATA_LIMIT | p2.ERRBIT_ALERT, data))
    assert status.is_status and status.error == 0x86 and status.data == data
    assert "limit" in p2.describe_error(status.error) and "hardware" in p2.describe_error(status.error)


def test_decode_rejects_bad_packets():
    good = p2.encode_ping(1)
    with pytest.raises(p2.PacketError, match="CRC"):
        p2.decode_packet(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(p2.PacketError, match="length"):
        p2.decode_packet(good + b"\x00")
    with pytest.raises(p2.PacketError):
        p2.decode_packet(b"\x00" + good[1:])


def test_stream_parser_skips_garbage_and_bad_packets():
    a = p2.encode_write(1, 116, p2.to_le(-131073, 4))  # stuffed
    b = p2.encode_status(2, 0, b"\x01\x02")
    bad = bytearray(p2.encode_read(3, 132, 4))
    bad[-1] ^= 0xFF
    stream = b"\x00\x13\xff\xfe" + a + b"\xff\xff\xfd" + bytes(bad) + b"\xff\xff" + b + b"\xff"
    rejected = []
    parser = p2.PacketParser(on_bad=lambda raw, why: rejected.append(why))
    rng = random.Random(0)
    got, i = [], 0
    while i < len(stream):  # arbitrary chunking, as bytes trickle in from a serial port
        n = rng.randint(1, 5)
        got += parser.feed(stream[i : i + n])
        i += n
    assert [(g.id, g.instruction, g.params) for g in got] == [
        (1, p2.Instruction.WRITE, b"\x74\x00\xff\xff\xfd\xff"),
        (2, p2.Instruction.STATUS, b"\x00\x01\x02"),
    ]
    assert parser.bad_packets == 1 and "CRC" in rejected[0]
    assert parser.skipped_bytes > 0


# --- protocol: the official SDK against the emulator ---------------------------


def test_sdk_ping_read_write(bus):
    emu, port, ph = bus
    model, result, error = ph.ping(port, 1)
    assert (model, result, error) == (1200, sdk.COMM_SUCCESS, 0)
    assert ph.ping(port, 3)[0] == 1020  # the XM430-W350
    assert ph.ping(port, 9)[1] == sdk.COMM_RX_TIMEOUT  # nobody at id 9
    entry = emu.log[-3]
    assert (entry.id, entry.instruction, entry.params) == (1, p2.Instruction.PING, b"")

    value, result, error = ph.read4ByteTxRx(port, 2, 132)
    assert (result, error) == (sdk.COMM_SUCCESS, 0)
    assert value == emu.motor(2).present_position == 2048
    assert emu.log[-1].reads == {2: (132, 4)} and emu.log[-1].instruction == p2.Instruction.READ

    assert ph.write4ByteTxRx(port, 1, 116, 2500) == (sdk.COMM_SUCCESS, 0)
    entry = emu.log[-1]
    assert (entry.id, entry.instruction) == (1, p2.Instruction.WRITE)
    assert entry.writes == {1: (116, p2.to_le(2500, 4))} and entry.values(116, 4) == {1: 2500}
    assert emu.motor(1).goal_position == 2500


def test_write_and_read_back_a_value_that_needs_byte_stuffing(bus):
    emu, port, ph = bus
    # Homing Offset -131073 is 0xFFFDFFFF: little-endian bytes FF FF FD FF.
    value = -131073
    assert ph.write4ByteTxRx(port, 1, 20, value & 0xFFFFFFFF) == (sdk.COMM_SUCCESS, 0)
    entry = emu.log[-1]
    assert (entry.id, entry.instruction, entry.params) == (1, p2.Instruction.WRITE, b"\x14\x00\xff\xff\xfd\xff")
    assert emu.motor(1).value("homing_offset") == value
    # The status packet of a read is stuffed by the emulator and unstuffed by the SDK.
    data, result, error = ph.readTxRx(port, 1, 20, 4)
    assert (result, error, bytes(data)) == (sdk.COMM_SUCCESS, 0, b"\xff\xff\xfd\xff")
    assert b"\xff\xff\xfd\xfd" in p2.encode_status(1, 0, bytes(data))
    # dynamixel-sdk 4.1.0 puts that write on the wire unstuffed (its txPacket drops the new list
    # addStuffing returns when stuffing lengthens a packet); a conformant sender stuffs it:
    stuffed = p2.encode_write(2, 20, p2.to_le(value, 4))
    assert b"\xff\xff\xfd\xfd" in stuffed
    port.clearPort()
    port.writePort(stuffed)
    parser, got, deadline = p2.PacketParser(), [], time.monotonic() + 2.0
    while not got and time.monotonic() < deadline:
        got = parser.feed(port.readPort(64))
    assert [(g.id, g.error) for g in got] == [(2, 0)]
    assert emu.log[-1].raw == stuffed and emu.log[-1].params == b"\x14\x00\xff\xff\xfd\xff"
    assert emu.motor(2).value("homing_offset") == value


def test_sdk_sync_read_and_sync_write(bus):
    emu, port, ph = bus
    for i in (1, 2, 3):
        emu.set_position(i, 1000 + 100 * i)
    reader = sdk.GroupSyncRead(port, ph, 132, 4)
    for i in (1, 2, 3):
        reader.addParam(i)
    assert reader.txRxPacket() == sdk.COMM_SUCCESS
    assert [reader.getData(i, 132, 4) for i in (1, 2, 3)] == [1100, 1200, 1300]
    entry = emu.log[-1]
    assert (entry.id, entry.instruction) == (p2.BROADCAST_ID, p2.Instruction.SYNC_READ)
    assert entry.reads == {1: (132, 4), 2: (132, 4), 3: (132, 4)}
    assert [r.id for r in emu.replies[-3:]] == [1, 2, 3]  # answers in the requested order

    writer = sdk.GroupSyncWrite(port, ph, 116, 4)
    for i, goal in ((1, 1500), (2, 1600), (3, 1700)):
        writer.addParam(i, list(p2.to_le(goal, 4)))
    assert writer.txPacket() == sdk.COMM_SUCCESS
    assert wait_until(lambda: emu.log[-1].instruction == p2.Instruction.SYNC_WRITE)
    entry = emu.log[-1]
    assert (entry.id, entry.instruction) == (p2.BROADCAST_ID, p2.Instruction.SYNC_WRITE)
    assert entry.values(116, 4) == {1: 1500, 2: 1600, 3: 1700}
    assert [emu.motor(i).goal_position for i in (1, 2, 3)] == [1500, 1600, 1700]


def test_control_table_access_rules(bus):
    emu, port, ph = bus
    E = p2.ErrorCode
    assert ph.write4ByteTxRx(port, 1, 52, 1000) == (sdk.COMM_SUCCESS, 0)  # EEPROM with torque off: fine
    assert ph.write4ByteTxRx(port, 1, 48, 3000) == (sdk.COMM_SUCCESS, 0)
    assert ph.write1ByteTxRx(port, 1, 64, 1) == (sdk.COMM_SUCCESS, 0)
    assert ph.write4ByteTxRx(port, 1, 52, 500)[1] == E.ACCESS  # EEPROM locked with torque on
    assert ph.write4ByteTxRx(port, 1, 132, 7)[1] == E.ACCESS  # read-only Present Position
    assert ph.write1ByteTxRx(port, 1, 14, 0)[1] == E.ACCESS  # undefined address
    assert ph.write1ByteTxRx(port, 1, 64, 2)[1] == E.DATA_RANGE  # torque enable is 0..1
    assert ph.write2ByteTxRx(port, 1, 116, 2000)[1] == E.DATA_LENGTH  # half of a 4-byte field
    assert ph.write4ByteTxRx(port, 1, 116, 3500)[1] == E.DATA_LIMIT  # beyond Max Position Limit ...
    assert emu.motor(1).goal_position == 2048  # ... and not applied
    assert emu.motor(1).value("min_position_limit") == 1000
    assert ph.read1ByteTxRx(port, 1, 7) == (1, sdk.COMM_SUCCESS, 0)  # ID
    assert ph.readTxRx(port, 1, 220, 20)[1:] == (sdk.COMM_SUCCESS, E.ACCESS)  # past the end of the table


def test_emulated_motion_is_consistent_with_units(bus):
    emu, port, ph = bus
    ph.write1ByteTxRx(port, 1, 64, 1)
    # Profile Velocity 100 (units of 0.229 rpm, below the velocity limit): the 1,952-tick move takes
    # ~1.25 s, so a loaded machine that oversleeps still catches the servo mid-ramp.
    ph.write4ByteTxRx(port, 1, 112, 100)
    ph.write4ByteTxRx(port, 1, 116, 4000)
    t_goal = emu.log[-1].t
    time.sleep(0.1)
    s = emu.motor(1)
    # Far from the goal the servo runs at its speed cap, so the position is a ramp at that speed
    # from the moment the goal arrived.
    assert s.value("present_velocity") == 100 and s.value("moving") == 1
    assert s.present_position == pytest.approx(2048 + 100 * 0.229 / 60 * 4096 * (s.t - t_goal), abs=1.01)
    deadline = time.monotonic() + 10.0
    while abs(emu.motor(1).present_position - 4000) > 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    s = emu.motor(1)
    assert abs(s.present_position - 4000) <= 2 and s.value("moving") == 0
    assert s.t - t_goal > 1952 / (100 * 0.229 / 60 * 4096)  # it could not have arrived sooner


def test_emulator_bus_watchdog_stops_and_flags_minus_one(bus):
    emu, port, ph = bus
    assert ph.write1ByteTxRx(port, 1, 64, 1) == (sdk.COMM_SUCCESS, 0)
    assert ph.write1ByteTxRx(port, 1, 98, 3) == (sdk.COMM_SUCCESS, 0)  # 60 ms
    assert ph.write4ByteTxRx(port, 1, 116, 4000) == (sdk.COMM_SUCCESS, 0)  # start a long move
    time.sleep(0.15)  # no packets for longer than the window
    s = emu.motor(1)
    assert s.watchdog_tripped and s.bus_watchdog == -1 and s.velocity == 0
    assert 2048 < s.present_position < 2800  # stopped where it was ~60 ms into the move
    # The SDK sees -1 too; goals are refused (data range error) until it is cleared.
    assert ph.read1ByteTxRx(port, 1, 98)[0] == 0xFF
    assert ph.write4ByteTxRx(port, 1, 116, 3000)[1] == p2.ErrorCode.DATA_RANGE
    assert ph.write1ByteTxRx(port, 1, 98, 3)[1] == p2.ErrorCode.DATA_RANGE  # cannot re-arm without clearing
    time.sleep(0.05)
    assert emu.motor(1).present_position == s.present_position  # holding
    assert ph.write1ByteTxRx(port, 1, 98, 0) == (sdk.COMM_SUCCESS, 0)  # clear
    assert ph.write1ByteTxRx(port, 1, 98, 3) == (sdk.COMM_SUCCESS, 0)  # re-arm
    assert ph.write4ByteTxRx(port, 1, 116, 3000) == (sdk.COMM_SUCCESS, 0)
    assert not emu.motor(1).watchdog_tripped
    # Servo 2 had torque off: its watchdog never armed, whatever the silence.
    assert emu.motor(2).bus_watchdog == 0


def test_standalone_emulator_prints_port_and_serves():
    proc = subprocess.Popen(
        [sys.executable, "-m", "rtdp.controllers.emulator.dynamixel", "--motors", "1,2", "--model", "xm430-w350"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        path = proc.stdout.readline().strip()
        assert path.startswith("/dev/")
        port = sdk.PortHandler(path)
        assert port.openPort()
        assert sdk.PacketHandler(2.0).ping(port, 2)[:2] == (1020, sdk.COMM_SUCCESS)
        port.closePort()
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0


# --- driver -------------------------------------------------------------------


def test_driver_module_does_not_import_the_sdk():
    code = "import sys, rtdp.controllers.drivers.dynamixel; print('dynamixel_sdk' in sys.modules, 'serial' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_connect_configures_servos_and_close_turns_torque_off(make_emu):
    emu = make_emu()
    drv = driver(emu, watchdog_ms=100)
    with pytest.raises(DeviceNotConnectedError):
        drv.read()
    assert emu.motor(1).value("return_delay_time") == 250  # the factory 500 us
    drv.connect()
    for i, (name, c) in zip(IDS, CAL.items()):
        s = emu.motor(i)
        assert s.torque_enabled and s.bus_watchdog == 5  # 100 ms in 20 ms units
        assert s.value("return_delay_time") == 0  # answer at once: a sync read is not N x 500 us longer
        assert s.value("min_position_limit") == c["range_min"] and s.value("max_position_limit") == c["range_max"]
        assert s.value("homing_offset") == c["homing_offset"] and s.value("operating_mode") == 3
    r = drv.read()
    assert set(r.obs) == {"joint_pos", "joint_vel"} and r.obs["joint_pos"].shape == (6,) and r.info == {}
    # Present Position = 2048 + homing offset; drive_mode 1 flips the sign.
    sign = np.array([-1 if i % 2 else 1 for i in IDS])
    np.testing.assert_allclose(r.obs["joint_pos"], sign * 10 * np.array(IDS) * RAD_PER_TICK)
    assert drv.limits.low.shape == (6,) and np.all(drv.limits.low < drv.limits.high)
    np.testing.assert_allclose(drv.limits.max_delta, 3.0 * 0.02)
    drv.close()
    drv.close()  # idempotent
    assert all(not emu.motor(i).torque_enabled and emu.motor(i).bus_watchdog == 0 for i in IDS)
    assert [i for i, ok, _ in drv.torque_off_log] == IDS and all(ok for _, ok, _ in drv.torque_off_log)
    with pytest.raises(DeviceNotConnectedError):
        drv.write(np.zeros(6))


def test_connect_rejects_wrong_model(make_emu):
    emu = make_emu({1: "xl330-m288", 2: "xm430-w350"})
    drv = DynamixelDriver(emu.port, [1, 2], "xl330-m288")
    with pytest.raises(DriverError, match=r"id 2 is model number 1020 \(xm430-w350\), expected 1200 \(xl330-m288\)"):
        drv.connect()
    assert not emu.motor(1).torque_enabled and not drv.connected


def test_connect_rejects_missing_servo(make_emu):
    emu = make_emu({1: "xl330-m288", 2: "xl330-m288"})
    drv = DynamixelDriver(emu.port, [1, 2, 7], "xl330-m288", connect_retries=1, resync_s=0.005)
    with pytest.raises(DriverError, match="no servo answers at id 7"):
        drv.connect()
    with pytest.raises(DriverError, match="cannot open Dynamixel port /dev/nonexistent"):
        DynamixelDriver("/dev/nonexistent", [1]).connect()


def test_connect_refuses_a_joint_outside_its_range(make_emu):
    emu = make_emu({1: "xl330-m288"}, initial_position=500)
    drv = DynamixelDriver(emu.port, [1], calibration={"j": {"id": 1, "range_min": 1000, "range_max": 3000}})
    with pytest.raises(DriverError, match="rests at 500 ticks, outside its calibrated range"):
        drv.connect()
    assert not emu.motor(1).torque_enabled


def test_write_converts_clips_and_moves(make_emu):
    emu = make_emu()
    with driver(emu) as drv:
        target = np.array([0.3, -0.3, 0.2, -0.2, 0.1, 10.0])  # the last is far beyond its range
        drv.write(target)
        assert wait_until(lambda: emu.log[-1].instruction == p2.Instruction.SYNC_WRITE)
        sent = emu.log[-1].values(116, 4)
        sign = np.array([-1 if i % 2 else 1 for i in IDS])
        want = np.clip(np.rint(2048 + sign * target / RAD_PER_TICK), [1024 + i for i in IDS], [3072 - i for i in IDS])
        assert [sent[i] for i in IDS] == want.astype(int).tolist()
        for _ in range(25):  # a control loop keeps the bus watchdog fed while the arm moves
            r = drv.read()
            time.sleep(0.02)
        np.testing.assert_allclose(r.obs["joint_pos"][:5], target[:5], atol=3 * RAD_PER_TICK)
        assert abs(emu.motor(6).present_position - (3072 - 6)) <= 2  # stopped at range_max


def test_invalid_actions_never_reach_the_bus(make_emu):
    emu = make_emu()
    with driver(emu) as drv:
        good = np.full(6, 0.25)
        drv.write(good)
        assert wait_until(lambda: emu.log[-1].instruction == p2.Instruction.SYNC_WRITE)
        before = len(emu.log)
        bad_actions = [
            np.array([0.1, np.nan, 0.1, 0.1, 0.1, 0.1]),
            np.array([np.inf, 0, 0, 0, 0, 0]),
            np.full(6, -np.inf),
            np.zeros(5),
            np.zeros((6, 1)),
            np.zeros((1, 6)),
            [0.1] * 7,
            "a string",
            [0.1, "x", 0, 0, 0, 0],
        ]
        for action in bad_actions:
            with pytest.raises(ActionError):
                drv.write(action)
        time.sleep(0.05)
        assert len(emu.log) == before  # not a single packet for the rejected actions
        drv.write(good * 2)
        time.sleep(0.05)
    goal_writes = [e.values(116, 4) for e in emu.log if e.instruction == p2.Instruction.SYNC_WRITE and e.values(116, 4)]
    sign = np.array([-1 if i % 2 else 1 for i in IDS])
    valid = [np.rint(2048 + sign * a / RAD_PER_TICK).astype(int).tolist() for a in (good, good * 2)]
    sent = [[w[i] for i in IDS] for w in goal_writes]
    # Only the two valid targets, plus stop()'s hold at the end (goal := present position).
    assert sent[:2] == valid and len(sent) == 3


def _moving_reads(drv, emu, n, check):
    """n read/write cycles on a triangle wave, so consecutive readings differ; checks each one."""
    raised = 0
    amplitude, step = 0.8, 0.05
    phase = 0.0
    for k in range(n):
        phase = (phase + step) % (4 * amplitude)
        target = np.full(6, abs(phase - 2 * amplitude) - amplitude)
        t0 = time.monotonic()
        try:
            reading = drv.read()
        except DeviceDisconnectedError:
            raised += 1
            continue
        t1 = time.monotonic()
        check(reading, t0, t1)
        drv.write(target)
    return raised


def _fresh_reply_checker(emu, drv):
    """A check that a reading equals the state of one sync read sent during that read() call.

    The emulator records every sync read it received (time, seq) and the data
    it answered per servo. A reading is fresh and consistent only if some
    sync read issued inside [t0, t1] has, for every servo, exactly the
    reading's ticks and velocity. A reading reused from an earlier call, or
    stitched from two transactions, fails: the motors move, so older replies
    hold other values.
    """
    sign = np.array([c.sign for c in drv.calibration])
    stats = {"checked": 0, "changed": 0}
    previous = [None]

    def check(reading, t0, t1):
        ticks = np.rint(reading.obs["joint_pos"] / (sign * RAD_PER_TICK) + 2048).astype(int)
        units = np.rint(reading.obs["joint_vel"] / (sign * RAD_S_PER_VELOCITY_UNIT)).astype(int)
        want = {i: p2.to_le(int(u), 4) + p2.to_le(int(t), 4) for i, u, t in zip(IDS, units, ticks)}
        log, replies = emu.log, emu.replies
        seqs = [e.seq for e in log if e.instruction == p2.Instruction.SYNC_READ and t0 <= e.t <= t1]
        assert seqs, "no sync read reached the bus during read()"
        by_seq = {}
        for r in replies:
            if r.seq in seqs:
                by_seq.setdefault(r.seq, {})[r.id] = r.data
        assert any(by_seq.get(s) == want for s in seqs), "reading does not match any reply of this call"
        stats["checked"] += 1
        if previous[0] is not None and not np.array_equal(previous[0], ticks):
            stats["changed"] += 1
        previous[0] = ticks

    return check, stats


def test_reads_are_never_stale_under_crc_errors_and_dropped_replies(make_emu):
    faults = FaultConfig(corrupt_crc=0.01, drop_reply=0.01, garbage=0.01)
    emu = make_emu(faults=faults, seed=3, timing=False)
    with driver(emu, resync_s=0.01, read_retries=3, watchdog_ms=500) as drv:
        check, stats = _fresh_reply_checker(emu, drv)
        raised = _moving_reads(drv, emu, 300, check)
    assert emu.fault_counts["corrupt_crc"] >= 10 and emu.fault_counts["drop"] >= 10 and emu.fault_counts["garbage"] >= 10
    assert drv.stats["read_retries"] >= 10  # the faults hit reads and were retried
    assert stats["checked"] + raised == 300 and raised <= 3
    assert stats["changed"] >= 0.9 * stats["checked"]  # the motion makes stale readings detectable


def test_port_sleeps_while_waiting_for_a_reply(make_emu):
    # The SDK's own handler polls a timeout-0 port; ours waits in select, so a bus
    # transaction leaves the core to the inference worker and the (emulated) servos.
    emu = make_emu({1: "xl330-m288"})
    port = sleeping_port_handler(sdk)(emu.port)
    assert port.openPort() and port.setBaudRate(1_000_000)
    ph = sdk.PacketHandler(2.0)
    try:
        assert ph.ping(port, 1)[1:] == (0, 0)  # answered: model number, COMM_SUCCESS, no error
        wall, cpu = time.monotonic(), time.thread_time()
        results = [ph.ping(port, 42)[1] for _ in range(5)]  # nobody answers: the SDK's packet timeout
        wall, cpu = time.monotonic() - wall, time.thread_time() - cpu
    finally:
        port.closePort()
    assert results == [sdk.COMM_RX_TIMEOUT] * 5
    assert wall > 5 * 0.02  # the timeouts were waited out ...
    assert cpu < 0.2 * wall  # ... asleep, not spinning


def test_reads_are_never_stale_with_late_replies(make_emu):
    # A late reply arrives after the SDK's timeout, i.e. while the driver retries.
    emu = make_emu(faults=FaultConfig(late_reply=0.02), seed=5, timing=False)
    with driver(emu, watchdog_ms=500) as drv:
        check, stats = _fresh_reply_checker(emu, drv)
        raised = _moving_reads(drv, emu, 120, check)
    assert emu.fault_counts["late"] >= 5 and drv.stats["resyncs"] >= 5
    assert stats["checked"] + raised == 120 and raised <= 2


def test_disconnect_is_detected_within_one_cycle_and_close_still_tries_every_servo(make_emu):
    emu = make_emu()
    drv = driver(emu, watchdog_ms=60, period_s=0.05)
    drv.connect()
    drv.write(np.full(6, 0.5))
    drv.read()
    emu.disconnect()  # cable pulled mid-motion
    t0 = time.monotonic()
    with pytest.raises(DeviceDisconnectedError, match=emu.port):
        drv.read()
    assert time.monotonic() - t0 < drv.period_s  # within one control cycle
    with pytest.raises(DeviceDisconnectedError, match="went away"):
        drv.write(np.zeros(6))
    drv.stop()  # never raises
    drv.close()  # never raises
    attempted = {i for i, ok, _ in drv.torque_off_log}
    assert attempted == set(IDS) and not any(ok for _, ok, _ in drv.torque_off_log)
    assert len(drv.torque_off_log) == len(IDS) * (1 + drv.close_retries)
    # Nothing reaches the servos any more: their own bus watchdog stops them.
    time.sleep(0.12)
    assert all(emu.motor(i).watchdog_tripped and emu.motor(i).velocity == 0 for i in IDS)


def test_write_detects_a_vanished_port(make_emu):
    emu = make_emu()
    drv = driver(emu)
    drv.connect()
    emu.disconnect()
    with pytest.raises(DeviceDisconnectedError, match=f"port {emu.port} went away"):
        drv.write(np.zeros(6))
    drv.close()
    assert {i for i, _, _ in drv.torque_off_log} == set(IDS)


def test_exception_inside_with_leaves_torque_off(make_emu):
    emu = make_emu()
    with pytest.raises(RuntimeError, match="policy crashed"):
        with driver(emu) as drv:
            drv.write(np.full(6, 0.2))
            assert all(emu.motor(i).torque_enabled for i in IDS)
            raise RuntimeError("policy crashed")
    assert all(not emu.motor(i).torque_enabled for i in IDS)
    assert not drv.connected


def test_driver_recovers_from_a_bus_watchdog_trip(make_emu):
    emu = make_emu({1: "xl330-m288", 2: "xl330-m288"})
    with DynamixelDriver(emu.port, [1, 2], watchdog_ms=60, period_s=0.02) as drv:
        drv.write(np.full(2, 0.5))
        time.sleep(0.15)  # the host stalls longer than the window
        assert emu.motor(1).watchdog_tripped and emu.motor(1).bus_watchdog == -1
        held = emu.motor(1).present_position
        drv.read()  # notices the silence, clears and re-arms, holding where the servo stopped
        assert drv.stats["watchdog_recoveries"] == 2
        assert not emu.motor(1).watchdog_tripped and emu.motor(1).bus_watchdog == 3
        assert emu.motor(1).goal_position == held
        drv.write(np.full(2, -0.5))
        assert wait_until(lambda: emu.motor(1).goal_position == 2048 - round(0.5 / RAD_PER_TICK))


def test_calibration_file_round_trip_and_errors(tmp_path):
    path = write_calibration(tmp_path / "arm" / "calibration.json", CAL)
    on_disk = json.loads(path.read_text())
    assert on_disk["joint_3"] == {"id": 3, "drive_mode": 1, "homing_offset": 30, "range_min": 1027, "range_max": 3069}
    cal = load_calibration(path)
    assert list(cal) == list(CAL) and cal["joint_2"].range_max == 3070
    assert load_calibration({3: {"range_min": 10, "range_max": 20}})["motor_3"].id == 3
    with pytest.raises(ConfigError, match="cannot read"):
        load_calibration(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_calibration(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="range_min < range_max"):
        load_calibration({"a": {"id": 1, "range_min": 3000, "range_max": 1000}})
    with pytest.raises(ConfigError, match="unknown keys"):
        load_calibration({"a": {"id": 1, "homing": 3}})
    with pytest.raises(ConfigError, match="both use servo id 1"):
        load_calibration({"a": {"id": 1}, "b": {"id": 1}})
    with pytest.raises(ConfigError, match="no entry for servo id"):
        DynamixelDriver("/dev/null", [1, 9], calibration={"a": {"id": 1}})
    with pytest.raises(ConfigError, match="must exceed the control period"):
        DynamixelDriver("/dev/null", [1], watchdog_ms=20, period_s=0.05)
    drv = make_dynamixel_driver("/dev/null", "1, 2,3", rate_hz=100.0, max_joint_speed=2.0)
    assert drv.motor_ids == [1, 2, 3] and drv.period_s == 0.01
    np.testing.assert_allclose(drv.limits.max_delta, 0.02)
