"""Policies: diffusion agents mapping observation dicts to action chunks."""

from __future__ import annotations

import json
from pathlib import Path

from rtdp.errors import CheckpointError
from rtdp.policies.consistency import ConsistencyUnetConfig, ConsistencyUnetPolicy
from rtdp.policies.diffusion_unet import SIZES, DiffusionUnetConfig, DiffusionUnetPolicy, LimitsNormalizer
from rtdp.policies.edm_unet import EdmUnetConfig, EdmUnetPolicy
from rtdp.policies.transformer import TransformerDiffusionConfig, TransformerDiffusionPolicy
from rtdp.policies.unet1d import ConditionalUnet1D

# Open registry: checkpoint "policy_type" -> class with from_pretrained.
POLICY_TYPES: dict[str, type] = {
    DiffusionUnetPolicy.policy_type: DiffusionUnetPolicy,
    EdmUnetPolicy.policy_type: EdmUnetPolicy,
    ConsistencyUnetPolicy.policy_type: ConsistencyUnetPolicy,
    TransformerDiffusionPolicy.policy_type: TransformerDiffusionPolicy,
}


def read_config(directory: str | Path) -> dict:
    """The policy config of a checkpoint (``config.json``'s ``config``), without building the network.

    Raises:
        CheckpointError: missing folder or unreadable config.
    """
    cfg_path = Path(directory) / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{str(directory)!r} is not an rtdp checkpoint folder (no config.json)")
    try:
        data = json.loads(cfg_path.read_text())
        return dict(data["config"])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"cannot read the policy config in {cfg_path}: {exc}") from exc


def load_policy(directory: str | Path, *, device=None):
    """Load any rtdp policy checkpoint, picking the class from its ``config.json``.

    Raises:
        CheckpointError: missing folder/config, or an unknown policy type.
    """
    path = Path(directory)
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{str(path)!r} is not an rtdp checkpoint folder (no config.json)")
    try:
        policy_type = json.loads(cfg_path.read_text()).get("policy_type", DiffusionUnetPolicy.policy_type)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
        raise CheckpointError(f"cannot read {cfg_path}: {exc}") from exc
    if policy_type not in POLICY_TYPES:
        raise CheckpointError(f"{cfg_path} has policy_type {policy_type!r}; known: {', '.join(sorted(POLICY_TYPES))}")
    return POLICY_TYPES[policy_type].from_pretrained(path, device=device)


__all__ = [
    "POLICY_TYPES",
    "SIZES",
    "ConditionalUnet1D",
    "ConsistencyUnetConfig",
    "ConsistencyUnetPolicy",
    "DiffusionUnetConfig",
    "DiffusionUnetPolicy",
    "EdmUnetConfig",
    "EdmUnetPolicy",
    "LimitsNormalizer",
    "TransformerDiffusionConfig",
    "TransformerDiffusionPolicy",
    "load_policy",
    "read_config",
]
