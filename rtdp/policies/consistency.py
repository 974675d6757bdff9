"""One-step consistency policy distilled from an EDM policy (Consistency Policy, Prasad et al. 2024).

Consistency distillation (Song et al. 2023, Alg. 2): on a Karras grid of
``cd_scales`` noise levels, a noisy action ``x_{n+1} = x0 + sigma_{n+1} z``
is moved one ODE step to ``sigma_n`` by the frozen EDM teacher (Heun, as in
Song et al.'s EDM experiments), and the student is trained so that its
one-step answers from both points agree:
``|| f(x_{n+1}, sigma_{n+1}) - f_target(x_hat_n, sigma_n) ||^2``. The
target network is an EMA of the student (``cd_target_ema`` = 0.95, Song et
al.'s CD setting); with 0 it is the student itself under stop-gradient (the
``mu = 0`` target of "Improved techniques for training consistency models"),
which on PushT drifted away from the teacher (see benchmarks/RESULTS.md).
The target is rebuilt from the student on resume.

The grid loss alone ties the one-step answer from ``sigma_max`` to the
teacher only through the chain of the grid's short jumps (17 at the default
18 levels), each learnt approximately;
the errors add up at the jump the policy actually takes. An endpoint term
(weight ``cd_anchor_weight``) closes the chain as Consistency Trajectory
Models' long jumps do: from fresh noise at ``sigma_max``, the teacher runs
its own sampler to the end (its default: 3 Euler steps) and the student's
single evaluation from the same noise is regressed onto that answer. The
policy then reproduces the teacher as the teacher acts, per noise draw.
With ``cd_obs_noise`` > 0 the endpoint term is asked at observations moved
off the demonstrations (Gaussian noise of that standard deviation on the
normalised low-dim features, the same for teacher and student), so the
student follows the teacher in the states a closed loop drifts into, not
only on the demonstrated ones. Observations the student met in its own
closed-loop rollouts can be given too (``rtdp train anchor_obs=PATH``): the
endpoint term is then also asked there, the teacher labelling the student's
states as in DAgger (Ross et al. 2011).

The student uses the consistency parametrisation (``f(x, sigma_min) = x``
exactly) and starts from the teacher's weights. It acts with one network
evaluation: ``x0 = f(sigma_max z, sigma_max)``; with ``steps > 1`` it
re-noises the answer to lower levels and evaluates again (multistep
consistency sampling, Alg. 1).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from rtdp.core import get_sampler, sample_consistency
from rtdp.core.edm import EDMDenoiser
from rtdp.core.schedules import sigmas_karras
from rtdp.errors import ConfigError
from rtdp.policies.edm_unet import EdmUnetConfig, EdmUnetPolicy

POLICY_TYPE = "consistency_unet"
MAX_STEPS = 8


@dataclass(kw_only=True)
class ConsistencyUnetConfig(EdmUnetConfig):
    """``EdmUnetConfig`` plus consistency-distillation settings.

    Attributes:
        cd_scales: noise levels of the distillation grid (N in Song et al.).
        cd_sigma_min: boundary level where f(x, sigma) = x.
        cd_target_ema: EMA rate mu of the target network (Song et al.'s CD: 0.95);
            0 makes the target the student itself under stop-gradient.
        cd_anchor_weight: weight of the endpoint term (student's one step from
            sigma_max against the teacher's own sampler from the same noise); 0 disables it.
        cd_obs_noise: standard deviation of the noise on the normalised low-dim
            observation features at which the endpoint term is asked (0: the
            demonstrated observations only).
    """

    sampler: str = "euler"
    num_inference_steps: int = 1
    ladder_prob: float = 0.0
    cd_scales: int = 18
    cd_sigma_min: float = 0.002
    cd_target_ema: float = 0.95
    cd_anchor_weight: float = 1.0
    cd_obs_noise: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if int(self.cd_scales) < 2:
            raise ConfigError(f"cd_scales must be >= 2, got {self.cd_scales}")
        self.cd_scales = int(self.cd_scales)
        self.cd_sigma_min = float(self.cd_sigma_min)
        self.cd_target_ema = float(self.cd_target_ema)
        if not 0.0 <= self.cd_target_ema < 1.0:
            raise ConfigError(f"cd_target_ema must be in [0, 1), got {self.cd_target_ema}")
        self.cd_anchor_weight = float(self.cd_anchor_weight)
        if not self.cd_anchor_weight >= 0.0:
            raise ConfigError(f"cd_anchor_weight must be >= 0, got {self.cd_anchor_weight}")
        self.cd_obs_noise = float(self.cd_obs_noise)
        if not self.cd_obs_noise >= 0.0:
            raise ConfigError(f"cd_obs_noise must be >= 0, got {self.cd_obs_noise}")
        if self.cd_obs_noise > 0.0 and not set(self.lowdim_shapes) - set(self.goal_keys):
            raise ConfigError("cd_obs_noise perturbs low-dim observations, and this policy has none besides goals; "
                              "set policy.cd_obs_noise=0")
        if not 0 < self.cd_sigma_min < self.sigma_max:
            raise ConfigError(f"cd_sigma_min must be in (0, sigma_max={self.sigma_max}), got {self.cd_sigma_min}")
        if self.num_inference_steps > MAX_STEPS:
            raise ConfigError(f"a consistency policy acts in 1..{MAX_STEPS} steps, got num_inference_steps={self.num_inference_steps}")


class ConsistencyUnetPolicy(EdmUnetPolicy):
    """Consistency policy: one network evaluation per action chunk.

    Args:
        config: a validated ``ConsistencyUnetConfig``.
    """

    model_type = POLICY_TYPE
    config_class = ConsistencyUnetConfig
    config: ConsistencyUnetConfig

    def __init__(self, config: ConsistencyUnetConfig) -> None:
        super().__init__(config)
        # The teacher is attached for distillation only; it is not part of the state dict.
        self.__dict__["teacher"] = None

    def set_teacher(self, teacher: EdmUnetPolicy) -> None:
        """Attach a frozen EDM teacher for ``compute_loss``."""
        if not isinstance(teacher, EdmUnetPolicy) or isinstance(teacher, ConsistencyUnetPolicy):
            raise ConfigError(f"the teacher must be an EDM policy (policy=edm), got {type(teacher).__name__}")
        self.__dict__["teacher"] = teacher.eval().requires_grad_(False)
        self.__dict__["target"] = None

    @torch.no_grad()
    def _target(self) -> "ConsistencyUnetPolicy":
        """The target network, moved towards the student by one EMA step per loss evaluation."""
        mu = self.config.cd_target_ema
        if mu == 0.0:
            return self
        target = self.__dict__.get("target")
        if target is None:
            target = ConsistencyUnetPolicy(self.config).to(self.device).eval().requires_grad_(False)
            target.load_state_dict(self.state_dict())
            self.__dict__["target"] = target
        else:
            for pt, ps in zip(target.parameters(), self.parameters()):
                pt.mul_(mu).add_(ps.detach(), alpha=1.0 - mu)
        return target

    def _denoiser(self, sampler: str = "") -> EDMDenoiser:
        # One denoiser for every sampler: the network is continuous in sigma.
        den = self.__dict__.get("_den")
        if den is None:
            den = EDMDenoiser(
                self._net,
                self.config.sigma_data,
                consistency_sigma_min=self.config.cd_sigma_min,
                clip_x0=None,
            )
            self.__dict__["_den"] = den
        return den

    def _check_steps(self, steps: Any) -> int:
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
            raise ConfigError(f"a consistency policy acts in 1..{MAX_STEPS} steps, got {steps!r}")
        return steps

    def _grid(self) -> torch.Tensor:
        cfg = self.config
        return sigmas_karras(cfg.cd_scales, cfg.cd_sigma_min, cfg.sigma_max, cfg.rho)[:-1].flip(0).to(self.device)

    def compute_loss(self, batch: Mapping[str, Any], *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Consistency-distillation loss against the attached teacher.

        ``batch["anchor_obs"]`` (optional): more observation windows, e.g. the
        states the student itself visited (``rtdp eval record_obs=PATH``),
        at which only the endpoint term is asked: DAgger for the one-step
        policy, where the teacher labels the student's own states.

        Raises:
            ConfigError: no teacher attached (``set_teacher``).
        """
        cfg = self.config
        teacher = self.__dict__.get("teacher")
        if teacher is None:
            raise ConfigError("a consistency policy trains by distillation: call set_teacher(edm_policy) first "
                              "(rtdp train policy=consistency policy.teacher=<edm checkpoint>)")
        obs, x0 = self._check_batch(batch)
        bsz = x0.shape[0]
        gdev = generator.device if generator is not None else self.device
        cond, keep = self._training_cond(obs, bsz, generator)
        with torch.no_grad():
            t_cond = teacher._encode(teacher._check_obs(batch["obs"], exact_steps=False), random_crop=False,
                                     keep_goal=keep)
        grid = self._grid().to(x0.dtype)
        n = torch.randint(0, cfg.cd_scales - 1, (bsz,), generator=generator, device=gdev).to(self.device)
        s_hi, s_lo = grid[n + 1], grid[n]
        z = self._randn(x0.shape, generator, x0.dtype)
        x_hi = x0 + s_hi[:, None, None] * z
        with torch.no_grad():
            # One Heun step of the teacher's probability-flow ODE from s_hi to s_lo.
            tden = teacher._denoiser()
            d_hi = (x_hi - tden(x_hi, s_hi, t_cond)) / s_hi[:, None, None]
            x_euler = x_hi + (s_lo - s_hi)[:, None, None] * d_hi
            d_lo = (x_euler - tden(x_euler, s_lo, t_cond)) / s_lo[:, None, None]
            x_lo = x_hi + (s_lo - s_hi)[:, None, None] * 0.5 * (d_hi + d_lo)
            tgt = self._target()
            tgt_cond = cond.detach() if tgt is self else tgt._encode(obs, random_crop=False, keep_goal=keep)
            target = tgt._denoiser()(x_lo, s_lo, tgt_cond)
        pred = self._denoiser()(x_hi, s_hi, cond)
        loss = F.mse_loss(pred, target)
        if cfg.cd_anchor_weight > 0.0:
            loss = loss + cfg.cd_anchor_weight * self._endpoint_loss(cond, t_cond, x0.shape, generator)
            extra = batch.get("anchor_obs")
            if extra is not None:
                # observations the student met in its own rollouts (DAgger): the teacher answers there too
                a_obs = self._check_obs(extra, exact_steps=False)
                a_bsz = next(iter(a_obs.values())).shape[0]
                a_cond, a_keep = self._training_cond(a_obs, a_bsz, generator)
                with torch.no_grad():
                    a_t_cond = teacher._encode(teacher._check_obs(extra, exact_steps=False), random_crop=False,
                                               keep_goal=a_keep)
                loss = loss + cfg.cd_anchor_weight * self._endpoint_loss(
                    a_cond, a_t_cond, (a_bsz, *x0.shape[1:]), generator)
        return loss

    def _endpoint_loss(self, cond: torch.Tensor, t_cond: torch.Tensor, shape: tuple[int, ...],
                       generator: torch.Generator | None) -> torch.Tensor:
        """The student's one step from sigma_max against the teacher's own sampler, same noise and observation."""
        cfg = self.config
        teacher = self.__dict__["teacher"]
        x_top = self._randn(tuple(shape), generator, cond.dtype) * cfg.sigma_max
        if cfg.cd_obs_noise > 0.0:
            shift = self._obs_shift(cond.shape, generator, cond.dtype)
            cond, t_cond = cond + shift, t_cond + shift
        with torch.no_grad():
            name, steps = teacher.config.sampler, teacher.config.num_inference_steps
            answer = get_sampler(name)(teacher._denoiser(), x_top, teacher._sigmas(name, steps).to(cond.dtype),
                                       cond=t_cond, generator=generator)
        top = torch.full((shape[0],), cfg.sigma_max, device=self.device, dtype=cond.dtype)
        return F.mse_loss(self._denoiser()(x_top, top, cond), answer)

    def _obs_shift(self, shape: torch.Size, generator: torch.Generator | None, dtype: torch.dtype) -> torch.Tensor:
        """Noise of std ``cd_obs_noise`` on the conditioning's non-goal low-dim columns, zero elsewhere."""
        cfg = self.config
        per_step = shape[1] // cfg.n_obs_steps
        mask = torch.zeros(per_step, device=self.device, dtype=dtype)
        for key, cols in self._feature_slices().items():
            if key not in cfg.goal_keys:
                mask[cols] = 1.0
        return self._randn(tuple(shape), generator, dtype) * cfg.cd_obs_noise * mask.repeat(cfg.n_obs_steps)

    def sample_trajectory(self, cond: torch.Tensor, uncond: torch.Tensor | None, *, sampler: str | None,
                          steps: int, generator: torch.Generator | None, noise: torch.Tensor | None,
                          inpaint: tuple[Any, Any] | None, guidance_scale: float | None = None,
                          guidance_skip_cos: float | None = None) -> torch.Tensor:
        """Act in ``steps`` consistency evaluations (``rtdp.core.sample_consistency``); ``sampler`` is ignored.

        The levels are a Karras schedule from sigma_max; the answer is clipped to [-1, 1] with ``clip_sample``.
        """
        cfg = self.config
        den, _ = self.guided_denoiser(cond, uncond, guidance_scale, guidance_skip_cos)
        den = self.inpainted(den, inpaint)
        levels = sigmas_karras(steps, max(cfg.sigma_min, cfg.cd_sigma_min), cfg.sigma_max, cfg.rho)[:-1]
        levels = levels.to(self.device, cond.dtype)
        base = self._denoiser()
        base.reset_nfe()
        x = self.initial_noise(cond.shape[0], generator, noise) * levels[0]
        x0 = sample_consistency(den, x, levels, cond=cond, generator=generator, sigma_min=cfg.cd_sigma_min)
        x0 = x0.clamp(-1, 1) if cfg.clip_sample else x0
        self.last_nfe = base.nfe
        self.last_sample_nfe = float(base.nfe)
        return x0
