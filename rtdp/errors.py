"""Typed errors for everything a user can get wrong.

Each error says what was wrong and what to do about it. Library code raises
these instead of letting a traceback escape from deep inside torch or zarr.
"""

from __future__ import annotations


class RtdpError(Exception):
    """Base class of every error rtdp raises on purpose."""


class ConfigError(RtdpError, ValueError):
    """A configuration value is invalid (unknown name, bad size, bad combination)."""


class UnknownNameError(ConfigError, KeyError):
    """A task, sampler, policy or driver name is not registered."""

    def __init__(self, kind: str, name: str, known: list[str] | tuple[str, ...]) -> None:
        self.kind, self.name, self.known = kind, name, sorted(known)
        super().__init__(f"unknown {kind} {name!r}; known {kind}s: {', '.join(self.known)}")

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class CheckpointError(RtdpError):
    """A checkpoint folder is missing, incomplete or from an incompatible schema."""


class DatasetError(RtdpError):
    """A replay buffer / dataset cannot be used as asked."""


class MissingKeyError(DatasetError, KeyError):
    """A dataset lacks an array the policy or task needs."""

    def __str__(self) -> str:
        return self.args[0]


class CorruptStoreError(DatasetError):
    """A zarr store is unreadable or internally inconsistent."""


class ObservationError(RtdpError, ValueError):
    """An observation has the wrong keys, shape, or non-finite values."""


class ActionError(RtdpError, ValueError):
    """An action has the wrong shape or non-finite values."""


class MissingDependencyError(RtdpError, ImportError):
    """An optional dependency (an extra) is not installed."""


def require_package(module: str, extra: str, purpose: str):
    """Import an optional module or raise with an install hint.

    Args:
        module: module name to import, e.g. ``"robosuite"``.
        extra: the rtdp extra that provides it, e.g. ``"sim"``; ``""`` for a
            core dependency.
        purpose: what needs it, for the message.
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        target = f"'rtdp[{extra}]'" if extra else "rtdp"
        raise MissingDependencyError(
            f"{purpose} needs the '{module}' package, which is not installed: "
            f"pip install {target} (or bash scripts/setup.sh, which installs every extra)"
        ) from exc


class DriverError(RtdpError):
    """A robot driver cannot do what was asked (bad port, wrong model, bus fault)."""


class DeviceNotConnectedError(DriverError):
    """A driver method that talks to the robot was called before ``connect()`` or after ``close()``."""


class DeviceDisconnectedError(DriverError):
    """The robot or its bus went away while connected (port closed, cable pulled, no replies)."""
