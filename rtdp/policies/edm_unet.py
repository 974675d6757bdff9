"""Few-step score policy with EDM preconditioning (BESO, Reuss et al. 2023).

The same conditional 1-D U-Net as Diffusion Policy, trained as an EDM
denoiser (Karras et al. 2022): sigma_data = 0.5, log-normal training noise,
preconditioned so that the network's target has unit variance at every noise
level. Sampling runs any core sampler on a Karras schedule; the default is 3
Euler steps (BESO's few-step setting), i.e. 3 network evaluations per chunk.

Two options ride on the same network:

* **Goal conditioning with classifier-free guidance.** ``goal_keys`` name
  observation keys that hold the goal; in training they are dropped
  (zeroed, with a "goal present" flag) with probability ``goal_dropout``, so
  one network is both the goal-conditioned and the goal-free policy.
  ``guidance_scale`` mixes the two (0: goal-free, 1: conditional) and
  ``guidance_skip_cos`` stops the unconditional pass once both agree.
* **Streaming** (Høeg et al. 2024, Streaming Diffusion Policy). A fraction
  ``ladder_prob`` of training samples carries one noise level per action,
  laid out as the noise ladder that ``rtdp.policies.streaming`` keeps in its
  action buffer, so the network has seen the states it meets while
  streaming. The rest have one level per trajectory.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from rtdp.core import get_sampler
from rtdp.core.edm import EDMDenoiser, sample_log_normal_sigma
from rtdp.core.guidance import GuidedDenoiser
from rtdp.core.schedules import sigmas_karras
from rtdp.errors import ConfigError
from rtdp.models.base import int_tuple, positive_float, positive_int, probability
from rtdp.policies.base import DiffusionPolicy, PolicyConfig
from rtdp.policies.diffusion_unet import UnetFields, build_unet

POLICY_TYPE = "edm_unet"
# c_noise = ln(sigma) / 4 spans about [-1.6, 1.1]; scaled, it covers the range
# of diffusion steps the U-Net's sinusoidal step embedding is built for.
NOISE_EMBED_SCALE = 100.0


@dataclass(kw_only=True)
class EdmUnetConfig(UnetFields, PolicyConfig):
    """``PolicyConfig`` + ``UnetFields`` plus EDM, guidance and streaming settings.

    Attributes:
        num_train_timesteps: caps the sampler steps (the network itself is continuous in sigma).
        clip_sample: clip the denoised trajectory to [-1, 1] while sampling.
        sigma_data: data standard deviation of normalised actions (BESO: 0.5).
        sigma_min: smallest noise level of sampling schedules.
        sigma_max: largest noise level; sampling starts from N(0, sigma_max^2).
            EDM's 80 suits 18+ steps; with 3 steps a Karras schedule from 80
            spends its first step on pure noise and leaves the last at a level
            where the output is already fixed, so few-step sampling starts at
            5 (ten times sigma_data), where the sample is still noise-dominated.
        rho: Karras schedule curvature.
        p_mean: mean of ln(sigma) in training (EDM: -1.2).
        p_std: standard deviation of ln(sigma) in training (EDM: 1.2).
        goal_keys: low-dim observation keys holding the goal (empty: no goal).
        goal_dropout: probability of dropping the goal in training.
        guidance_scale: default classifier-free guidance scale.
        guidance_skip_cos: default adaptive-guidance threshold (None: off).
        ladder_prob: fraction of training samples with a streaming noise ladder.
        stream_action_steps: actions executed per observation while streaming
            (the ladder's rung width); ``horizon - (n_obs_steps - 1)`` must be a
            multiple of it so fresh noise enters exactly at the top rung.
        stream_steps_per_obs: denoising steps per observation the ladder is
            trained for (network evaluations per observation while streaming).
    """

    # written by older versions, which derived this config from the DDPM one; unused by EDM
    legacy_fields: ClassVar[tuple[str, ...]] = ("beta_schedule", "prediction_type")

    sampler: str = "euler"
    num_inference_steps: int = 3
    num_train_timesteps: int = 100
    clip_sample: bool = True
    sigma_data: float = 0.5
    sigma_min: float = 0.05
    sigma_max: float = 5.0
    rho: float = 7.0
    p_mean: float = -1.2
    p_std: float = 1.2
    goal_keys: tuple[str, ...] = ()
    goal_dropout: float = 0.1
    guidance_scale: float = 1.0
    guidance_skip_cos: float | None = None
    ladder_prob: float = 0.5
    stream_action_steps: int = 5
    stream_steps_per_obs: tuple[int, ...] = (1, 2)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.num_train_timesteps = positive_int(self.num_train_timesteps, "num_train_timesteps")
        self.clip_sample = bool(self.clip_sample)
        if self.num_inference_steps > self.num_train_timesteps:
            raise ConfigError(f"num_inference_steps must be <= num_train_timesteps={self.num_train_timesteps}, "
                              f"got {self.num_inference_steps}")
        for name in ("sigma_data", "sigma_min", "sigma_max", "rho", "p_std"):
            setattr(self, name, positive_float(getattr(self, name), name))
        self.p_mean = float(self.p_mean)
        if self.sigma_min > self.sigma_max:
            raise ConfigError(f"sigma_min ({self.sigma_min}) must be <= sigma_max ({self.sigma_max})")
        self.goal_keys = tuple(str(k) for k in self.goal_keys)
        missing = [k for k in self.goal_keys if k not in self.lowdim_shapes]
        if missing:
            raise ConfigError(f"goal_keys {missing} must be low-dim observation keys; have {sorted(self.lowdim_shapes)}")
        for name in ("goal_dropout", "ladder_prob"):
            setattr(self, name, probability(getattr(self, name), name))
        self.guidance_scale = float(self.guidance_scale)
        if self.guidance_skip_cos is not None:
            self.guidance_skip_cos = float(self.guidance_skip_cos)
        self.stream_action_steps = int(self.stream_action_steps)
        self.stream_steps_per_obs = int_tuple(self.stream_steps_per_obs, "stream_steps_per_obs")
        if not self.stream_steps_per_obs:
            raise ConfigError("stream_steps_per_obs must list at least one value, e.g. [1, 2]")
        span = self.horizon - (self.n_obs_steps - 1)
        if self.stream_action_steps < 1 or span % self.stream_action_steps:
            valid = [d for d in range(1, span + 1) if span % d == 0]
            raise ConfigError(
                f"stream_action_steps must divide horizon - (n_obs_steps - 1) = {span} so fresh noise enters at the "
                f"top rung of the ladder; got {self.stream_action_steps}, valid values: {valid}"
            )

    @property
    def extra_feature_dim(self) -> int:
        """One "goal present" flag per step when the policy has goal keys."""
        return 1 if self.goal_keys else 0

    @property
    def n_rungs(self) -> int:
        """Rungs of the streaming ladder (chunks of ``stream_action_steps`` future actions)."""
        return (self.horizon - (self.n_obs_steps - 1)) // self.stream_action_steps


def ladder_rungs(config: EdmUnetConfig, device: torch.device | str = "cpu") -> torch.Tensor:
    """Rung of every buffer position, (T,) int64.

    Position ``p`` holds the action for step ``p - (n_obs_steps - 1)`` relative
    to the current one; past positions share rung 0 with the next
    ``stream_action_steps`` actions (they are clean once the chunk is).
    """
    future = torch.arange(config.horizon, device=device) - (config.n_obs_steps - 1)
    return (future.clamp_min(0) // config.stream_action_steps).long()


def ladder_levels(config: EdmUnetConfig, steps_per_obs: int, sigma_min: float | None = None,
                  sigma_max: float | None = None) -> torch.Tensor:
    """Ascending noise levels of the ladder, (n_rungs * steps_per_obs + 1,), first entry 0.

    Rung ``r`` sits at level index ``(r + 1) * steps_per_obs`` before an
    observation's denoising and at ``r * steps_per_obs`` after it.
    """
    n = config.n_rungs * int(steps_per_obs)
    lo = config.sigma_min if sigma_min is None else sigma_min
    hi = config.sigma_max if sigma_max is None else sigma_max
    return sigmas_karras(n, lo, hi, config.rho).flip(0)


class EdmUnetPolicy(DiffusionPolicy):
    """BESO / EDM score policy: obs (B, To, ...) -> action chunk (B, Ta, Da) in few steps.

    Args:
        config: a validated ``EdmUnetConfig``.
    """

    model_type = POLICY_TYPE
    config_class = EdmUnetConfig
    config: EdmUnetConfig

    # -------------------------------------------------------------- internals

    def _build_network(self, config: EdmUnetConfig) -> nn.Module:
        return build_unet(config)

    def _net(self, x_in: torch.Tensor, c_noise: torch.Tensor, cond: Any) -> torch.Tensor:
        return self.model(x_in, c_noise * NOISE_EMBED_SCALE, cond)

    def _denoiser(self, sampler: str = "") -> EDMDenoiser:
        # One denoiser for every sampler: the network is continuous in sigma.
        den = self.__dict__.get("_den")
        if den is None:
            den = EDMDenoiser(
                self._net, self.config.sigma_data, clip_x0=1.0 if self.config.clip_sample else None
            )
            # Kept out of the module tree: it wraps self.model, which must not appear twice in the state dict.
            self.__dict__["_den"] = den
        return den

    def _encode_steps(self, obs, random_crop, generator=None, keep_goal: torch.Tensor | None = None):
        """Per-step features; with goal keys, the goal columns times ``keep_goal`` (B,) and a presence flag."""
        return self._with_goal(super()._encode_steps(obs, random_crop, generator), keep_goal)

    def _with_goal(self, feats: torch.Tensor, keep_goal: torch.Tensor | None) -> torch.Tensor:
        """Observation features (B, To, F) with the goal columns scaled by ``keep_goal`` (0/1, default 1) and the flag."""
        if not self.config.goal_keys:
            return feats
        b, to = feats.shape[:2]
        keep = feats.new_ones(b) if keep_goal is None else keep_goal.to(feats.dtype)
        slices = self._feature_slices()
        mask = feats.new_ones(feats.shape[-1])
        for key in self.config.goal_keys:
            mask[slices[key]] = 0.0
        # Goal columns scaled by keep (0 or 1), everything else untouched.
        goal_part = feats * (1 - mask)
        feats = feats * mask + goal_part * keep.reshape(b, 1, 1)
        return torch.cat([feats, keep.reshape(b, 1, 1).expand(b, to, 1)], dim=-1)

    def _encode(self, obs, random_crop, generator=None, keep_goal: torch.Tensor | None = None):
        return self._encode_steps(obs, random_crop, generator, keep_goal).flatten(1)

    def _training_cond(self, obs, bsz: int, generator: torch.Generator | None):
        """Training conditioning with the goal dropped at rate ``goal_dropout``; (cond, keep mask or None)."""
        keep = None
        if self.config.goal_keys:
            gdev = generator.device if generator is not None else self.device
            keep = (torch.rand(bsz, generator=generator, device=gdev) >= self.config.goal_dropout).to(self.device)
        return self._encode(obs, random_crop=self.training, generator=generator, keep_goal=keep), keep

    def _training_sigmas(self, bsz: int, generator: torch.Generator | None) -> torch.Tensor:
        """(B, T) noise levels: log-normal per trajectory, or a jittered streaming ladder."""
        cfg = self.config
        dev = self.device
        gdev = generator.device if generator is not None else dev
        flat = sample_log_normal_sigma(
            (bsz,), cfg.p_mean, cfg.p_std, sigma_min=1e-3, sigma_max=cfg.sigma_max, generator=generator, device=dev
        )
        sigma = flat[:, None].expand(bsz, cfg.horizon).clone()
        if cfg.ladder_prob == 0.0:
            return sigma
        use_ladder = (torch.rand(bsz, generator=generator, device=gdev) < cfg.ladder_prob).to(dev)
        rungs = ladder_rungs(cfg, dev)
        m_choice = torch.randint(0, len(cfg.stream_steps_per_obs), (bsz,), generator=generator, device=gdev).to(dev)
        u_phase = torch.rand(bsz, generator=generator, device=gdev).to(dev)
        u_preroll = torch.rand(bsz, generator=generator, device=gdev).to(dev)
        jitter = torch.randn(bsz, cfg.n_rungs, generator=generator, device=gdev).to(dev)
        for i, m in enumerate(cfg.stream_steps_per_obs):
            rows = torch.nonzero(use_ladder & (m_choice == i)).flatten()
            if rows.numel() == 0:
                continue
            levels = ladder_levels(cfg, m).to(dev, sigma.dtype)
            top = cfg.n_rungs * m
            # Steady state: rung r at index (r + 1) m - phase, phase in 0..m-1 (sub-step within an observation).
            phase = (u_phase[rows] * m).long().clamp(max=m - 1)
            idx = (rungs[None, :] + 1) * m - phase[:, None]
            # One in five: the start of an episode, upper rungs still descending from the top.
            preroll = u_preroll[rows] < 0.2
            if (cfg.n_rungs - 1) * m > 0:
                s = (u_phase[rows] * (cfg.n_rungs - 1) * m).long()
                idx_pre = torch.maximum(top - s[:, None], (rungs[None, :] + 1) * m)
                idx = torch.where(preroll[:, None], idx_pre, idx)
            lev = levels[idx.clamp(1, top)]
            # Jitter each rung's level (x e^{0.2 z}) so nearby schedules are covered too.
            lev = lev * torch.exp(0.2 * jitter[rows][:, rungs])
            sigma[rows] = lev.clamp(1e-3, cfg.sigma_max)
        return sigma

    def _sigmas(self, sampler: str, steps: int) -> torch.Tensor:
        key = (sampler, steps, self.device)
        sigmas = self._sigma_cache.get(key)
        if sigmas is None:
            cfg = self.config
            sigmas = sigmas_karras(steps, cfg.sigma_min, cfg.sigma_max, cfg.rho).to(self.device)
            self._sigma_cache[key] = sigmas
        return sigmas

    # ----------------------------------------------------------------- public

    def compute_loss(self, batch: Mapping[str, Any], *, generator: torch.Generator | None = None) -> torch.Tensor:
        """EDM denoising loss (preconditioned, unit-weighted in F).

        Args:
            batch: ``{"obs": {key: (B, >=To, *shape)}, "action": (B, T, Da)}`` in env units.
            generator: source of noise, noise levels, goal dropout and crops.

        Returns:
            scalar loss.
        """
        cfg = self.config
        obs, x0 = self._check_batch(batch)
        bsz = x0.shape[0]
        cond, _ = self._training_cond(obs, bsz, generator)
        sigma = self._training_sigmas(bsz, generator)
        if cfg.ladder_prob == 0.0:
            sigma = sigma[:, 0]  # one level per trajectory: the cheaper (B,) path of the network
        noise = self._randn(x0.shape, generator, x0.dtype)
        x = x0 + noise * (sigma[:, :, None] if sigma.ndim == 2 else sigma[:, None, None])
        den = self._denoiser()
        return F.mse_loss(den.network(x, sigma, cond), den.training_target(x0, x, sigma))

    def conditioning(self, obs: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Encode observations once per chunk: (cond, cond without the goal or None)."""
        checked = self._check_obs(obs, exact_steps=True)
        if not self.config.goal_keys:
            return self._encode(checked, random_crop=False), None
        # The encoders (e.g. ResNets) run once; dropping the goal only touches its columns and the flag.
        feats = DiffusionPolicy._encode_steps(self, checked, random_crop=False)
        cond = self._with_goal(feats, None).flatten(1)
        uncond = self._with_goal(feats, feats.new_zeros(feats.shape[0])).flatten(1)
        return cond, uncond

    def guided_denoiser(self, cond, uncond, guidance_scale: float | None = None,
                        guidance_skip_cos: float | None = None):
        """The denoiser a sampler calls: plain, or with classifier-free guidance when the policy has a goal."""
        den = self._denoiser()
        scale = self.config.guidance_scale if guidance_scale is None else float(guidance_scale)
        skip = self.config.guidance_skip_cos if guidance_skip_cos is None else guidance_skip_cos
        if uncond is None:
            if scale != 1.0:
                raise ConfigError("guidance_scale needs a goal-conditioned policy (goal_keys); this policy has none")
            return den, None
        guided = GuidedDenoiser(den, cond, uncond, scale, skip)
        return guided, guided

    def sample_trajectory(self, cond: torch.Tensor, uncond: torch.Tensor | None, *, sampler: str | None,
                          steps: int, generator: torch.Generator | None, noise: torch.Tensor | None,
                          inpaint: tuple[Any, Any] | None, guidance_scale: float | None = None,
                          guidance_skip_cos: float | None = None) -> torch.Tensor:
        """Any core sampler on a Karras schedule (default Euler, 3 steps), with guidance when the policy has a goal.

        Args:
            guidance_scale: classifier-free guidance scale (goal-conditioned policies).
            guidance_skip_cos: adaptive-guidance threshold (None: config default).

        Raises:
            UnknownNameError: unknown sampler.
            ConfigError: guidance on a goal-free policy.
        """
        name = self.config.sampler if sampler is None else sampler
        sample_fn = get_sampler(name)
        sigmas = self._sigmas(name, steps)
        den, guided = self.guided_denoiser(cond, uncond, guidance_scale, guidance_skip_cos)
        den = self.inpainted(den, inpaint)
        x = self.initial_noise(cond.shape[0], generator, noise) * sigmas[0].to(cond.dtype)
        base = self._denoiser()
        base.reset_nfe()
        x = sample_fn(den, x, sigmas, cond=cond, generator=generator)
        self.last_nfe = base.nfe
        self.last_guidance = guided
        # Evaluations per sample (differs from network calls when guidance skipping stops some samples early).
        self.last_sample_nfe = float(guided.sample_nfe.float().mean()) if guided is not None else float(base.nfe)
        return x
