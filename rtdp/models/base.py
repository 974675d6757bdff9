"""The base of every trained model in rtdp: a typed config and safetensors checkpoints.

Action policies, and the planner, pose estimator and video model to come,
are a ``ModelConfig`` subclass (a keyword-only dataclass whose
``__post_init__`` validates with typed errors) and a ``Model`` subclass (a
``torch.nn.Module`` built from that config). The base writes and reads
checkpoints: ``model.safetensors`` plus ``config.json`` holding
``schema_version``, the model type and the config; nothing is pickled.

Schema versions: 1 named the type ``policy_type``; 2 names it
``model_type``. Both load. A config field that a class no longer has but
that older checkpoints of it carry is listed in the class's
``legacy_fields`` and dropped when such a checkpoint is read; any other
unknown field is an error.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from rtdp.errors import CheckpointError, ConfigError

SCHEMA_VERSION = 2
READABLE_SCHEMAS = (1, 2)
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def int_tuple(value: Any, name: str) -> tuple[int, ...]:
    """``value`` as a tuple of positive ints (lists and hydra containers accepted).

    Raises:
        ConfigError: not a sequence of positive ints.
    """
    try:
        out = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a sequence of positive ints, got {value!r}") from None
    if any(v < 1 for v in out):
        raise ConfigError(f"{name} must be a sequence of positive ints, got {value!r}")
    return out


def positive_int(value: Any, name: str) -> int:
    """``value`` as a positive int (bools refused).

    Raises:
        ConfigError: not a positive int.
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def int_in(value: Any, name: str, low: int, high: int, why: str = "") -> int:
    """``value`` as an int in ``low..high`` (bools refused); ``why`` ends the error, e.g. " (up to N)".

    Raises:
        ConfigError: not an int in the range.
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
        raise ConfigError(f"{name} must be an int in {low}..{high}{why}, got {value!r}")
    return int(value)


def positive_float(value: Any, name: str) -> float:
    """``value`` as a finite positive float.

    Raises:
        ConfigError: not a finite positive number.
    """
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a positive number, got {value!r}") from None
    if not math.isfinite(out) or out <= 0:
        raise ConfigError(f"{name} must be a positive number, got {value!r}")
    return out


def probability(value: Any, name: str) -> float:
    """``value`` as a probability in [0, 1].

    Raises:
        ConfigError: outside [0, 1].
    """
    out = float(value)
    if not 0.0 <= out <= 1.0:
        raise ConfigError(f"{name} must be a probability in [0, 1], got {value!r}")
    return out


def one_of(value: Any, choices, name: str) -> Any:
    """``value`` itself when it is one of ``choices``.

    Raises:
        ConfigError: naming the choices and the value given.
    """
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")
    return value


@dataclasses.dataclass(kw_only=True)
class ModelConfig:
    """Base of every model config: a keyword-only dataclass that validates itself.

    Subclasses add fields and extend ``__post_init__`` (calling ``super()``
    first), raising ``ConfigError`` with what was wrong and what is valid.
    """

    # Fields older checkpoints of this class carry that it no longer has; dropped on load.
    legacy_fields: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        pass

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def field_names(cls) -> list[str]:
        """Names of the config's fields, in declaration order."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, legacy: bool = False) -> "ModelConfig":
        """Build from ``to_dict`` output or a hydra node.

        Args:
            data: field values.
            legacy: drop ``legacy_fields`` (reading an older checkpoint).

        Raises:
            ConfigError: unknown keys or invalid values.
        """
        data = dict(data)
        if legacy:
            data = {k: v for k, v in data.items() if k not in cls.legacy_fields}
        known = set(cls.field_names())
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} fields {unknown}; known fields: {', '.join(sorted(known))}")
        return cls(**data)


MODEL_TYPES: dict[str, type["Model"]] = {}


def register_model_type(cls: type["Model"]) -> type["Model"]:
    """Make ``load_model`` know a model class by its ``model_type`` (usable as a class decorator)."""
    MODEL_TYPES[cls.model_type] = cls
    return cls


class Model(nn.Module):
    """Base of every trained model: built from a ``ModelConfig``, saved as safetensors + JSON.

    Subclasses set ``model_type`` (the name written into checkpoints) and
    ``config_class``.

    Args:
        config: an instance of ``config_class``.

    Raises:
        ConfigError: ``config`` is of another class.
    """

    model_type: ClassVar[str] = ""
    config_class: ClassVar[type[ModelConfig]] = ModelConfig

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if not isinstance(config, self.config_class):
            raise ConfigError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config

    @property
    def device(self) -> torch.device:
        """Device of the model's tensors (CPU for a model without any)."""
        for t in self.buffers():
            return t.device
        for t in self.parameters():
            return t.device
        return torch.device("cpu")

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``model.safetensors`` and ``config.json`` into ``directory`` (created if needed).

        Returns:
            the directory.
        """
        from safetensors.torch import save_file

        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(path / WEIGHTS_FILE), metadata={"format": "pt", "model_type": self.model_type})
        meta = {"schema_version": SCHEMA_VERSION, "model_type": self.model_type, "config": self.config.to_dict()}
        (path / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return path

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, device: str | torch.device | None = None) -> "Model":
        """Load a model written by ``save_pretrained``.

        Args:
            directory: checkpoint folder.
            device: where to put the weights (default CPU).

        Returns:
            the model, in eval mode.

        Raises:
            CheckpointError: missing folder or file, unreadable file, other
                schema version or model type, or weights that do not match the config.
        """
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(directory)
        meta = read_meta(path)
        model_type = meta["model_type"]
        if model_type != cls.model_type:
            raise CheckpointError(
                f"{path / CONFIG_FILE} is a {model_type!r} checkpoint, not {cls.model_type!r}; "
                "load it with rtdp.models.load_model(dir) (or rtdp.policies.load_policy), which picks the class"
            )
        try:
            config = cls.config_class.from_dict(meta.get("config", {}), legacy=meta["schema_version"] < SCHEMA_VERSION)
        except (ValueError, TypeError) as exc:  # ConfigError is a ValueError
            raise CheckpointError(f"{path / CONFIG_FILE} holds an invalid config: {exc}") from exc
        weights_path = path / WEIGHTS_FILE
        if not weights_path.is_file():
            raise CheckpointError(f"checkpoint {str(path)!r} has no {WEIGHTS_FILE}")
        try:
            state = load_file(str(weights_path))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"cannot read {weights_path}: {exc}") from exc
        model = cls(config)
        _check_state(model.state_dict(), state, weights_path, path / CONFIG_FILE)
        model.load_state_dict(state)
        if device is not None:
            model.to(device)
        return model.eval()


def _check_state(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], weights: Path,
                 config: Path) -> None:
    """Raise ``CheckpointError`` naming missing, unexpected and mis-shaped tensors."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)}, config {tuple(v.shape)}"
                  for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if mismatched:
            parts.append(f"{len(mismatched)} with other shapes (e.g. {'; '.join(mismatched[:3])})")
        raise CheckpointError(f"{weights} does not match {config}: tensors " + ", ".join(parts))


def read_meta(directory: str | Path) -> dict[str, Any]:
    """``config.json`` of a checkpoint, with ``model_type`` filled in for schema 1.

    Raises:
        CheckpointError: missing folder or config, unreadable JSON, or an unknown schema version.
    """
    path = Path(directory)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder {str(path)!r} does not exist")
    cfg_path = path / CONFIG_FILE
    if not cfg_path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} has no {CONFIG_FILE}; it is incomplete or not an rtdp checkpoint")
    try:
        meta = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {cfg_path}: {exc}") from exc
    if not isinstance(meta, dict):
        raise CheckpointError(f"{cfg_path} must hold a JSON object, got {type(meta).__name__}")
    version = meta.get("schema_version")
    if version not in READABLE_SCHEMAS:
        raise CheckpointError(
            f"checkpoint schema_version {version}, this rtdp reads {', '.join(map(str, READABLE_SCHEMAS))}; "
            "re-train or convert the checkpoint with a matching rtdp version"
        )
    if version == 1:  # schema 1 named the type policy_type, and a missing one meant the DDPM U-Net policy
        meta["model_type"] = meta.pop("policy_type", "diffusion_unet")
    if not isinstance(meta.get("model_type"), str):
        raise CheckpointError(f"{cfg_path} names no model_type")
    return meta


def load_model(directory: str | Path, *, device: str | torch.device | None = None) -> Model:
    """Load any rtdp checkpoint, picking the class from its ``config.json``.

    Raises:
        CheckpointError: missing folder/config, or a model type no registered class has.
    """
    meta = read_meta(directory)
    model_type = meta["model_type"]
    if model_type not in MODEL_TYPES:
        import rtdp.policies  # noqa: F401  (registers the policy families)
    if model_type not in MODEL_TYPES:
        raise CheckpointError(f"{directory}: model_type {model_type!r} is not registered; "
                              f"known: {', '.join(sorted(MODEL_TYPES))}")
    return MODEL_TYPES[model_type].from_pretrained(directory, device=device)
