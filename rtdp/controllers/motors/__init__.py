"""The servo bus layer: DYNAMIXEL X-series registers, defined once, and the bus that reads and writes them.

``registers``: every control-table item by name (address, size, access,
EEPROM/RAM area, range), the models and their units; the bus emulator builds
its control tables from it and the driver addresses the servos through it.
``bus``: one Protocol 2.0 bus on ``dynamixel-sdk`` (imported when the port
opens): named registers read and written per servo or as one sync packet over
a set of IDs, with retries. ``calibration``: ticks <-> joint radians, in
LeRobot's calibration format. ``sdk_port``: the SDK port handler that sleeps
instead of spinning while it waits for a reply.
"""
