"""The DDPM family: Diffusion Policy's discrete noise process, any network (Ho et al. 2020; Chi et al. 2023).

A network trained on a ``num_train_timesteps``-step variance-preserving
schedule to predict the noise (``epsilon``), the clean trajectory
(``sample``) or ``v``; wrapped once into the core's denoiser form
(``rtdp.core.DiscreteEpsDenoiser``), so every core sampler (DDPM, DDIM,
Euler, Heun, DPM-Solver++) runs on it. The U-Net and the transformer policy
are this family with different networks.

Any of these policies also samples from the core's truncated, anchored start
(DiffusionDrive's, ``rtdp.core.anchors``) although it was trained from pure
noise: given k-means anchors of the training actions, one network call at the
top of the schedule estimates the chunk from the drawn noise, the nearest
anchor is noised to a small training step T, and the sampler takes its steps
from there (``sample_trajectory(..., anchors=..., anchor_step=T)``).
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from rtdp.core import (
    BETA_SCHEDULES,
    PREDICTION_TYPES,
    DiscreteEpsDenoiser,
    anchored_start_rows,
    get_sampler,
    get_sigmas,
    make_alphas_cumprod,
    nearest_centre,
    sigmas_truncated,
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

    def anchor_sigmas(self, anchor_step: Any, steps: int) -> torch.Tensor:
        """Schedule of an anchored start: ``sigmas_truncated(alphas_cumprod, anchor_step, steps)``.

        Args:
            anchor_step: T, the training step the anchor is noised to, 1..num_train_timesteps - 1.
            steps: sampler steps from there, 1..T + 1.

        Returns:
            sigmas, (steps + 1,), on the policy's device: sigma(T) first, 0 last.

        Raises:
            ConfigError: T outside 1..num_train_timesteps - 1, or more steps than training steps in [0, T].
        """
        n = self.config.num_train_timesteps
        if isinstance(anchor_step, bool) or not isinstance(anchor_step, numbers.Integral) \
                or not 1 <= int(anchor_step) <= n - 1:
            raise ConfigError(f"anchor_step (+anchor<T>) must be an int in 1..{n - 1} for this {self.policy_type} "
                              f"policy (num_train_timesteps={n}), got T={anchor_step!r}")
        t_start = int(anchor_step)
        if steps > t_start + 1:
            raise ConfigError(f"{steps} steps from anchor_step T={t_start} would visit a training step twice: "
                              f"use steps <= {t_start + 1} or a larger T")
        key = (f"anchor{t_start}", steps, self.device)
        sigmas = self._sigma_cache.get(key)
        if sigmas is None:
            sigmas = sigmas_truncated(self.alphas_cumprod.cpu(), t_start, steps).to(self.device)
            self._sigma_cache[key] = sigmas
        return sigmas

    def check_anchors(self, anchors: Any) -> torch.Tensor:
        """Anchors (K, horizon, action_dim) in normalised action units, on the policy's device and dtype.

        Raises:
            ConfigError: not an array of that shape with K >= 1, or not finite.
        """
        cfg = self.config
        try:
            value = torch.as_tensor(anchors)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ConfigError(f"anchors must be an array (K, {cfg.horizon}, {cfg.action_dim}): {exc}") from None
        if value.ndim != 3 or value.shape[0] < 1 or tuple(value.shape[1:]) != (cfg.horizon, cfg.action_dim):
            raise ConfigError(f"anchors must have shape (K, {cfg.horizon}, {cfg.action_dim}) = (K >= 1, horizon, "
                              f"action_dim), got {tuple(value.shape)}")
        value = value.to(device=self.device, dtype=self.dtype)
        if not bool(torch.isfinite(value).all()):
            raise ConfigError("anchors contain NaN or Inf")
        return value

    def sample_trajectory(self, cond: torch.Tensor, uncond: torch.Tensor | None, *, sampler: str | None,
                          steps: int, generator: torch.Generator | None, noise: torch.Tensor | None,
                          inpaint: tuple[Any, Any] | None, **options: Any) -> torch.Tensor:
        """Any core sampler on the checkpoint's own schedule, from ``noise`` scaled to the first level.

        Options:
            anchors: (K, T, Da) anchors in normalised action units, with ``anchor_step``: start
                near the anchor nearest to a one-call estimate of the chunk instead of from
                pure noise (``_sample_anchored``); 1 + the sampler's calls per chunk.
            anchor_step: T of the anchored start, 1..num_train_timesteps - 1.

        Raises:
            ConfigError: an unknown option, one of anchors / anchor_step without the other, bad
                anchors or T, or inpainting together with anchors.
        """
        anchors, anchor_step = options.pop("anchors", None), options.pop("anchor_step", None)
        if options:
            raise ConfigError(f"{', '.join(sorted(options))}: a {self.policy_type} policy takes no such option "
                              "(guidance needs a goal-conditioned EDM policy)")
        name = self.config.sampler if sampler is None else sampler
        sample_fn = get_sampler(name)
        anchored = anchors is not None or anchor_step is not None
        if anchored:
            if anchors is None or anchor_step is None:
                raise ConfigError(f"an anchored start needs both anchors (K, {self.config.horizon}, "
                                  f"{self.config.action_dim}) in normalised action units and anchor_step T; got only "
                                  f"{'anchors' if anchor_step is None else 'anchor_step'}")
            if inpaint is not None:
                raise ConfigError("inpainting (real-time chunking) and an anchored start both decide where the chunk "
                                  "starts; use one of them")
            anchors = self.check_anchors(anchors)
            sigmas = self.anchor_sigmas(anchor_step, steps)
        else:
            sigmas = self._sigmas(name, steps)
        noise = self.initial_noise(cond.shape[0], generator, noise)
        den = self._denoiser(name)
        den.reset_nfe()
        if anchored:
            x = self._sample_anchored(den, sample_fn, cond, noise, anchors, sigmas, generator)
        else:
            x = sample_fn(self.inpainted(den, inpaint), vp_noise_to_start(noise, float(sigmas[0])), sigmas,
                          cond=cond, generator=generator)
        self.last_nfe = den.nfe
        self.last_sample_nfe = float(den.nfe)
        return x

    def _sample_anchored(self, den: DiscreteEpsDenoiser, sample_fn: Any, cond: torch.Tensor, noise: torch.Tensor,
                         anchors: torch.Tensor, sigmas: torch.Tensor,
                         generator: torch.Generator | None) -> torch.Tensor:
        """Truncated sampling from the anchor nearest to a one-call estimate (normalised units, (B, T, Da)).

        The network was trained from pure noise and has no anchor classifier (DiffusionDrive
        scores its anchors with a trained head), so the anchor is chosen by the x0 the network
        predicts at the top of its schedule from ``noise``. At that level the input is almost
        all noise, so the estimate is close to the mean chunk given the observation, moved a
        little by the noise: where the demonstrations are multimodal it can fall between
        modes, and the anchor nearest to it is then the one the truncated chain refines.
        """
        top = den.sigma_max  # training step N - 1, where the chain from pure noise starts
        x0_hat = den(vp_noise_to_start(noise, top), noise.new_full((noise.shape[0],), top), cond)
        index = nearest_centre(x0_hat, anchors)
        x = anchored_start_rows(anchors, index, sigmas[0], generator=generator)
        return sample_fn(den, x, sigmas, cond=cond, generator=generator)
