"""The DDPM family: Diffusion Policy's discrete noise process, any network (Ho et al. 2020; Chi et al. 2023).

A network trained on a ``num_train_timesteps``-step variance-preserving
schedule to predict the noise (``epsilon``), the clean trajectory
(``sample``) or ``v``; wrapped once into the core's denoiser form
(``rtdp.core.DiscreteEpsDenoiser``), so every core sampler (DDPM, DDIM,
Euler, Heun, DPM-Solver++) runs on it. The U-Net and the transformer policy
are this family with different networks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from rtdp.core import (
    BETA_SCHEDULES,
    PREDICTION_TYPES,
    DiscreteEpsDenoiser,
    get_sampler,
    get_sigmas,
    make_alphas_cumprod,
    vp_noise_to_start,
)
from rtdp.errors import ConfigError
from rtdp.models.base import one_of, positive_int
from rtdp.policies.base import DiffusionPolicy, PolicyConfig

# Samplers whose levels fall between training steps (diffusers' Euler/Heun "linspace" spacing).
FRACTIONAL_STEP_SAMPLERS = ("euler", "euler_a", "heun")


@dataclasses.dataclass(kw_only=True)
class DdpmConfig(PolicyConfig):
    """``PolicyConfig`` plus the DDPM noise process.

    Attributes:
        num_train_timesteps: N of the DDPM training schedule.
        beta_schedule: one of ``rtdp.core.BETA_SCHEDULES``.
        clip_sample: clip predicted x0 to [-1, 1] while sampling.
        prediction_type: what the network is trained to predict, one of
            ``rtdp.core.PREDICTION_TYPES`` (diffusers' names): the noise
            (``"epsilon"``, Diffusion Policy's default), the clean trajectory
            (``"sample"``) or ``"v_prediction"``.
    """

    num_train_timesteps: int = 100
    beta_schedule: str = "squaredcos_cap_v2"
    clip_sample: bool = True
    prediction_type: str = "epsilon"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.num_train_timesteps = positive_int(self.num_train_timesteps, "num_train_timesteps")
        self.clip_sample = bool(self.clip_sample)
        one_of(self.beta_schedule, BETA_SCHEDULES, "beta_schedule")
        one_of(self.prediction_type, PREDICTION_TYPES, "prediction_type")
        if self.num_inference_steps > self.num_train_timesteps:
            raise ConfigError(
                f"num_inference_steps must be <= num_train_timesteps={self.num_train_timesteps}, "
                f"got {self.num_inference_steps}"
            )


class DdpmPolicy(DiffusionPolicy):
    """A diffusion policy on the DDPM noise process; subclasses choose the network (``_build_network``)."""

    config_class: ClassVar[type[DdpmConfig]] = DdpmConfig
    config: DdpmConfig

    def __init__(self, config: DdpmConfig) -> None:
        super().__init__(config)
        # Derived from the config, so not saved.
        self.register_buffer(
            "alphas_cumprod", make_alphas_cumprod(config.num_train_timesteps, config.beta_schedule), persistent=False
        )

    def _denoiser(self, sampler: str = "ddpm") -> DiscreteEpsDenoiser:
        # Samplers whose levels fall between training steps feed fractional timesteps interpolated as
        # diffusers does; the others visit training steps exactly.
        fractional = sampler in FRACTIONAL_STEP_SAMPLERS
        cache = self.__dict__.setdefault("_dens", {})
        den = cache.get(fractional)
        ac = self.alphas_cumprod
        if den is None or den.alphas_cumprod.device != ac.device or den.alphas_cumprod.dtype != ac.dtype:
            kwargs = {"quantize": False, "sigma_interpolation": "linear"} if fractional else {}
            den = DiscreteEpsDenoiser(
                self.model, self.alphas_cumprod, clip_x0=1.0 if self.config.clip_sample else None,
                prediction_type=self.config.prediction_type, **kwargs
            )
            # Kept out of the module tree: it wraps self.model, which must not appear twice in the state dict.
            cache[fractional] = den
        return den

    def _sigmas(self, sampler: str, steps: int) -> torch.Tensor:
        key = (sampler, steps, self.device)
        sigmas = self._sigma_cache.get(key)
        if sigmas is None:
            sigmas = get_sigmas(sampler, self.alphas_cumprod.cpu(), steps).to(self.device)
            self._sigma_cache[key] = sigmas
        return sigmas

    def compute_loss(self, batch: Mapping[str, Any], *, generator: torch.Generator | None = None) -> torch.Tensor:
        """DDPM loss on a batch of demonstrations (the target follows ``config.prediction_type``).

        Args:
            batch: ``{"obs": {key: (B, >=To, *shape)}, "action": (B, T, Da)}`` in env
                units; images uint8 or float 0..255, (B, >=To, H, W, 3).
            generator: source of the noise, timesteps and crops (default: torch's global RNG).

        Returns:
            scalar mean-squared error between the network's output and its target: the noise,
            the clean trajectory, or ``v = sqrt(abar) * noise - sqrt(1 - abar) * x0``.

        Raises:
            ConfigError: normaliser not set.
            ObservationError: bad observation keys/shapes/values.
            DatasetError: the action has the wrong shape.
        """
        cfg = self.config
        obs, x0 = self._check_batch(batch)
        bsz = x0.shape[0]
        cond = self._encode(obs, random_crop=self.training, generator=generator)
        noise = self._randn(x0.shape, generator, x0.dtype)
        gen_device = generator.device if generator is not None else self.device
        t = torch.randint(0, cfg.num_train_timesteps, (bsz,), generator=generator, device=gen_device).to(self.device)
        ac = self.alphas_cumprod[t].reshape(-1, 1, 1)
        x_t = ac.sqrt() * x0 + (1 - ac).sqrt() * noise
        kind = cfg.prediction_type
        target = noise if kind == "epsilon" else x0 if kind == "sample" else ac.sqrt() * noise - (1 - ac).sqrt() * x0
        return F.mse_loss(self.model(x_t, t, cond), target)

    def sample_trajectory(self, cond: torch.Tensor, uncond: torch.Tensor | None, *, sampler: str | None,
                          steps: int, generator: torch.Generator | None, noise: torch.Tensor | None,
                          inpaint: tuple[Any, Any] | None, **options: Any) -> torch.Tensor:
        """Any core sampler on the checkpoint's own schedule, from ``noise`` scaled to the first level."""
        if options:
            raise ConfigError(f"{', '.join(sorted(options))}: a {self.policy_type} policy takes no such option "
                              "(guidance needs a goal-conditioned EDM policy)")
        name = self.config.sampler if sampler is None else sampler
        sample_fn = get_sampler(name)
        sigmas = self._sigmas(name, steps)
        noise = self.initial_noise(cond.shape[0], generator, noise)
        den = self._denoiser(name)
        den.reset_nfe()
        x = sample_fn(self.inpainted(den, inpaint), vp_noise_to_start(noise, float(sigmas[0])), sigmas,
                      cond=cond, generator=generator)
        self.last_nfe = den.nfe
        self.last_sample_nfe = float(den.nfe)
        return x
