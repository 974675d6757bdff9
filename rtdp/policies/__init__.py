"""Policies: diffusion agents mapping observation dicts to action chunks.

Each family is one module (its config, model class and sampling) and one
line in ``rtdp.policies.registry``; checkpoints name their model type and
``load_policy`` picks the class.
"""

from __future__ import annotations

from pathlib import Path

from rtdp.data.normalizer import LimitsNormalizer
from rtdp.errors import CheckpointError
from rtdp.models.base import MODEL_TYPES, load_model, read_meta, register_model_type
from rtdp.policies.base import DiffusionPolicy, PolicyConfig
from rtdp.policies.consistency import ConsistencyUnetConfig, ConsistencyUnetPolicy
from rtdp.policies.diffusion_unet import SIZES, DiffusionUnetConfig, DiffusionUnetPolicy
from rtdp.policies.edm_unet import EdmUnetConfig, EdmUnetPolicy
from rtdp.policies.registry import FAMILIES, PolicyFamily, get_family, register_family
from rtdp.policies.transformer import TransformerDiffusionConfig, TransformerDiffusionPolicy
from rtdp.policies.unet1d import ConditionalUnet1D

# Checkpoint model type -> class (the model registry of rtdp.models, which every family fills).
POLICY_TYPES = MODEL_TYPES
for _cls in (DiffusionUnetPolicy, EdmUnetPolicy, ConsistencyUnetPolicy, TransformerDiffusionPolicy):
    register_model_type(_cls)


def read_config(directory: str | Path) -> dict:
    """The policy config of a checkpoint (``config.json``'s ``config``), without building the network.

    Raises:
        CheckpointError: missing folder or unreadable config.
    """
    try:
        return dict(read_meta(directory)["config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"cannot read the policy config in {Path(directory) / 'config.json'}: {exc}") from exc


def load_policy(directory: str | Path, *, device=None) -> DiffusionPolicy:
    """Load any rtdp policy checkpoint, picking the class from its ``config.json``.

    Raises:
        CheckpointError: missing folder/config, an unknown model type, or a checkpoint that is no policy.
    """
    model = load_model(directory, device=device)
    if not isinstance(model, DiffusionPolicy):
        raise CheckpointError(f"{directory} holds a {model.model_type!r} model, not an action policy")
    return model


__all__ = [
    "FAMILIES",
    "POLICY_TYPES",
    "SIZES",
    "ConditionalUnet1D",
    "ConsistencyUnetConfig",
    "ConsistencyUnetPolicy",
    "DiffusionPolicy",
    "DiffusionUnetConfig",
    "DiffusionUnetPolicy",
    "EdmUnetConfig",
    "EdmUnetPolicy",
    "LimitsNormalizer",
    "PolicyConfig",
    "PolicyFamily",
    "TransformerDiffusionConfig",
    "TransformerDiffusionPolicy",
    "get_family",
    "load_policy",
    "read_config",
    "register_family",
]
