"""The servo bus layer: registers defined once for emulator and driver, named bus operations, the motor-model seam.

References: the ROBOTIS e-Manual's X-series control table (addresses and
sizes), and the emulator's packet log, which records what was on the bus.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from rtdp.controllers import protocol2 as p2
from rtdp.controllers.emulator.control_table import ControlTable
from rtdp.controllers.emulator.dynamixel import DynamixelBusEmulator, MotorCommand, MotorModel
from rtdp.controllers.motors.registers import MODELS, REGISTERS, TICKS_PER_S_PER_VELOCITY_UNIT
from rtdp.errors import ConfigError, DeviceNotConnectedError, DriverError, UnknownNameError

pytest.importorskip("dynamixel_sdk")

from rtdp.controllers.drivers.dynamixel import RAD_PER_TICK, RAD_S_PER_VELOCITY_UNIT, DynamixelDriver  # noqa: E402
from rtdp.controllers.motors.bus import DynamixelBus  # noqa: E402

# (address, size, signed, writable, EEPROM) of X-series items, from the e-Manual.
EMANUAL = {
    "id": (7, 1, False, True, True),
    "homing_offset": (20, 4, True, True, True),
    "max_position_limit": (48, 4, False, True, True),
    "min_position_limit": (52, 4, False, True, True),
    "torque_enable": (64, 1, False, True, False),
    "bus_watchdog": (98, 1, True, True, False),
    "goal_position": (116, 4, True, True, False),
    "present_velocity": (128, 4, True, False, False),
    "present_position": (132, 4, True, False, False),
}


@pytest.mark.parametrize("name", sorted(EMANUAL))
def test_register_matches_the_emanual(name):
    r = REGISTERS[name]
    assert (r.address, r.size, r.signed, r.writable, r.eeprom) == EMANUAL[name]


@pytest.mark.parametrize("model", sorted(MODELS))
def test_the_emulated_control_table_is_built_from_the_shared_registers(model):
    spec = MODELS[model]
    table = ControlTable(spec)
    assert [r.name for r in spec.registers] == list(REGISTERS)
    for r in spec.registers:
        shared = REGISTERS[r.name]
        assert (r.address, r.size, r.signed, r.writable) == (shared.address, shared.size, shared.signed, shared.writable)
        assert table.by_address[shared.address].name == r.name
    # a value stored by name sits at the shared address, little-endian
    table.set("goal_position", 3000)
    goal = REGISTERS["goal_position"]
    assert bytes(table.data[goal.address : goal.address + goal.size]) == p2.to_le(3000, 4)


def test_driver_and_emulator_meet_at_the_same_addresses():
    """What the driver writes by name lands in the emulator's register of that name."""
    with DynamixelBusEmulator({1: "xl330-m288", 2: "xl330-m288"}, timing=False) as emu:
        drv = DynamixelDriver(emu.port, [1, 2], watchdog_ms=100)
        assert drv.bus.registers is REGISTERS
        with drv:
            drv.write(np.array([0.25, -0.25]))
            deadline = time.monotonic() + 2.0
            while emu.log[-1].instruction != p2.Instruction.SYNC_WRITE and time.monotonic() < deadline:
                time.sleep(0.002)
            goal = REGISTERS["goal_position"]
            sent = emu.log[-1].values(goal.address, goal.size)
            want = {1: 2048 + round(0.25 / RAD_PER_TICK), 2: 2048 - round(0.25 / RAD_PER_TICK)}
            assert sent == want
            assert {i: emu.motor(i).value("goal_position") for i in (1, 2)} == want
            assert all(emu.motor(i).value("bus_watchdog") == 5 for i in (1, 2))
        table = ControlTable(MODELS["xl330-m288"])
        written = {table.by_address[a].name for p in emu.log if p.instruction == p2.Instruction.WRITE
                   for a, _ in p.writes.values()}
        assert {"torque_enable", "bus_watchdog", "goal_position", "return_delay_time"} <= written
        reads = {(a, n) for p in emu.log if p.instruction == p2.Instruction.SYNC_READ for a, n in p.reads.values()}
        assert reads == {(REGISTERS["present_velocity"].address, 8)}


def test_bus_reads_and_writes_named_registers_and_refuses_what_the_servo_refuses():
    with DynamixelBusEmulator({1: "xl330-m288", 3: "xm430-w350"}, timing=False, initial_position=1000) as emu:
        bus = DynamixelBus(emu.port, retries=0, resync_s=0.005)
        with pytest.raises(DeviceNotConnectedError, match="not open"):
            bus.read(1, "present_position")
        bus.open()
        try:
            assert bus.ping(3) == (MODELS["xm430-w350"].model_number, 0)
            bus.write(1, "homing_offset", -300)  # signed, EEPROM, torque off
            assert bus.read(1, "homing_offset") == -300
            assert emu.log[-2].writes == {1: (20, p2.to_le(-300, 4))}
            t, values = bus.sync_read(("present_velocity", "present_position"), [1, 3], retries=0)
            assert values["present_position"].tolist() == [700, 1000] and values["present_velocity"].tolist() == [0, 0]
            assert emu.log[-1].t <= t <= time.monotonic()
            with pytest.raises(DriverError, match="refused Present Position = 5"):
                bus.write(1, "present_position", 5)  # read-only: the servo answers an access error
            with pytest.raises(UnknownNameError, match="unknown register 'goal_positon'"):
                bus.write(1, "goal_positon", 2048)
            with pytest.raises(ConfigError, match="not adjacent"):
                bus.sync_read(("goal_position", "present_position"), [1, 3], retries=0)
        finally:
            bus.close()
        assert not bus.is_open


class SaggingJoint:
    """A test-local motor model: a driven joint sits ``SAG`` ticks below its goal and reports a fixed speed."""

    SAG = 20
    SPEED = 3 * TICKS_PER_S_PER_VELOCITY_UNIT  # 3 Present Velocity units

    def __init__(self, position: float) -> None:
        self.position = position
        self.velocity = 0.0
        self.current = 0.0
        self.commands: list[tuple[MotorCommand, float]] = []
        self.halts = 0

    def step(self, command: MotorCommand, dt: float) -> None:
        self.commands.append((command, dt))
        if command.driven:
            self.position = command.goal_position - self.SAG
            self.velocity = self.SPEED

    def halt(self) -> None:
        self.halts += 1
        self.velocity = 0.0

    def place(self, position: float) -> None:
        self.position, self.velocity = position, 0.0


def test_a_motor_model_plugged_into_the_emulator_drives_what_the_driver_reads():
    motors: dict[int, SaggingJoint] = {}

    def make(dxl_id, spec, position):
        motors[dxl_id] = SaggingJoint(position)
        return motors[dxl_id]

    cal = {"a": {"id": 1, "homing_offset": 0, "range_min": 1000, "range_max": 3000},
           "b": {"id": 2, "homing_offset": 100, "range_min": 1000, "range_max": 3000}}
    with DynamixelBusEmulator({1: "xl330-m288", 2: "xl330-m288"}, motor_model=make, timing=False) as emu:
        assert all(isinstance(m, MotorModel) for m in motors.values())
        with DynamixelDriver(emu.port, [1, 2], calibration=cal, watchdog_ms=0) as drv:
            target = np.array([0.5, -0.25])
            drv.write(target)
            time.sleep(0.01)
            reading = drv.read()
        goal = np.rint(2048 + target / RAD_PER_TICK)
        # Present Position = shaft + homing offset = (goal - homing offset - SAG) + homing offset
        np.testing.assert_allclose(reading.obs["joint_pos"], (goal - SaggingJoint.SAG - 2048) * RAD_PER_TICK)
        np.testing.assert_allclose(reading.obs["joint_vel"], 3 * RAD_S_PER_VELOCITY_UNIT)
        command, dt = next((c, dt) for c, dt in reversed(motors[2].commands) if c.goal_position == goal[1] - 100)
        assert command.driven and dt > 0 and command.max_speed > 0
        assert all(m.halts >= 1 for m in motors.values())  # torque off at close halts the shaft
        assert not emu.motor(1).torque_enabled
