"""Diffusion Policy with a 1-D temporal CNN (Chi et al. 2023, "Diffusion Policy", CNN variant).

Observations of the last ``n_obs_steps`` steps (low-dimensional vectors and
camera images) are encoded once per chunk into a global conditioning vector;
a ``ConditionalUnet1D`` trained with the DDPM objective denoises a
``horizon``-step action trajectory, sampled through ``rtdp.core``; the policy
returns the ``n_action_steps`` actions starting at the current step.

``UnetFields`` are the U-Net's own settings; the EDM and consistency
families reuse them with their own noise process.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from torch import nn

from rtdp.data.normalizer import LimitsNormalizer
from rtdp.errors import ConfigError
from rtdp.models.base import int_tuple, positive_int
from rtdp.policies.ddpm import DdpmConfig, DdpmPolicy
from rtdp.policies.unet1d import ConditionalUnet1D

POLICY_TYPE = "diffusion_unet"

# U-Net channel widths: "small" (1.4 M parameters) and "medium" (4.6 M) train on
# two CPU cores in tens of minutes; "dp_lowdim" and "dp_image" are Diffusion
# Policy's published sizes for low-dim and image tasks.
SIZES: dict[str, tuple[int, ...]] = {
    "small": (32, 64, 128),
    "medium": (64, 128, 256),
    "dp_lowdim": (256, 512, 1024),
    "dp_image": (512, 1024, 2048),
}


@dataclasses.dataclass(kw_only=True)
class UnetFields:
    """The 1-D conditional U-Net's settings (mixed into a policy config).

    Attributes:
        down_dims: U-Net channels per level, or a name in ``SIZES``.
        kernel_size: U-Net temporal kernel size (odd).
        n_groups: GroupNorm groups of the U-Net.
        diffusion_step_embed_dim: width of the step embedding.
    """

    down_dims: tuple[int, ...] | str = SIZES["small"]
    kernel_size: int = 5
    n_groups: int = 8
    diffusion_step_embed_dim: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.down_dims, str):
            if self.down_dims not in SIZES:
                raise ConfigError(
                    f"down_dims must be a tuple of ints or one of {', '.join(SIZES)}, got {self.down_dims!r}"
                )
            self.down_dims = SIZES[self.down_dims]
        self.down_dims = int_tuple(self.down_dims, "down_dims")
        for name in ("kernel_size", "n_groups", "diffusion_step_embed_dim"):
            setattr(self, name, positive_int(getattr(self, name), name))
        factor = 2 ** (len(self.down_dims) - 1)
        if self.horizon % factor:
            raise ConfigError(
                f"horizon must be a multiple of {factor} (the U-Net halves it {len(self.down_dims) - 1} times), "
                f"got {self.horizon}"
            )
        if self.kernel_size % 2 == 0:
            raise ConfigError(f"kernel_size must be odd, got {self.kernel_size}")
        bad = [d for d in self.down_dims if d % self.n_groups]
        if bad:
            raise ConfigError(f"down_dims entries must be multiples of n_groups={self.n_groups}, got {bad}")
        if self.diffusion_step_embed_dim % 2 or self.diffusion_step_embed_dim < 4:
            raise ConfigError(f"diffusion_step_embed_dim must be even and >= 4, got {self.diffusion_step_embed_dim}")


def build_unet(config) -> ConditionalUnet1D:
    """The U-Net of a config with ``UnetFields``: ``model(sample (B, T, Da), timestep, global_cond (B, To * F))``."""
    return ConditionalUnet1D(
        input_dim=config.action_dim,
        global_cond_dim=config.obs_feature_dim * config.n_obs_steps,
        diffusion_step_embed_dim=config.diffusion_step_embed_dim,
        down_dims=config.down_dims,
        kernel_size=config.kernel_size,
        n_groups=config.n_groups,
    )


@dataclasses.dataclass(kw_only=True)
class DiffusionUnetConfig(UnetFields, DdpmConfig):
    """Configuration of ``DiffusionUnetPolicy``: ``PolicyConfig`` + ``DdpmConfig`` + ``UnetFields``."""


class DiffusionUnetPolicy(DdpmPolicy):
    """Diffusion Policy (CNN): obs (B, To, ...) -> action chunk (B, Ta, Da).

    Args:
        config: a validated ``DiffusionUnetConfig``.
    """

    model_type = POLICY_TYPE
    config_class: ClassVar[type[DiffusionUnetConfig]] = DiffusionUnetConfig

    def _build_network(self, config: DiffusionUnetConfig) -> nn.Module:
        return build_unet(config)


__all__ = ["SIZES", "DiffusionUnetConfig", "DiffusionUnetPolicy", "LimitsNormalizer", "UnetFields", "build_unet"]
