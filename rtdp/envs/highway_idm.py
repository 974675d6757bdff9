"""highway-env's process-global vehicle constants, put back before every episode (``rtdp.envs.highway``)."""

from __future__ import annotations

_IDM_CONSTANTS = ("DISTANCE_WANTED", "COMFORT_ACC_MAX", "COMFORT_ACC_MIN")
_idm_defaults: dict[str, float] = {}


def restore_idm_constants() -> None:
    """Put highway-env's IDMVehicle class constants back to its own values.

    highway-env's intersection sets these on the class at every reset, and they then hold for every later
    episode of any scenario in the process: an episode depended on which episodes its process had driven
    before (with collection workers, on scheduling). Read once, at the first reset of the process.
    """
    from highway_env.vehicle.behavior import IDMVehicle

    if not _idm_defaults:
        _idm_defaults.update({k: getattr(IDMVehicle, k) for k in _IDM_CONSTANTS})
    for k, v in _idm_defaults.items():
        setattr(IDMVehicle, k, v)
