"""Policies: diffusion agents mapping observation dicts to action chunks."""

from rtdp.policies.diffusion_unet import SIZES, DiffusionUnetConfig, DiffusionUnetPolicy, LimitsNormalizer
from rtdp.policies.unet1d import ConditionalUnet1D

__all__ = ["SIZES", "ConditionalUnet1D", "DiffusionUnetConfig", "DiffusionUnetPolicy", "LimitsNormalizer"]
