"""One-step policy distilled by distribution matching (One-Step Diffusion Policy, Wang et al. 2025).

The generator is the EDM teacher's network asked once, at the top noise
level: ``a = D_theta(sigma_max * z, sigma_max, obs)``. In the deterministic
variant (OneDP-D, the default) ``z = 0``, so the policy is a plain function of
the observation; in the stochastic one (``od_stochastic``, OneDP-S) ``z`` is
standard normal, as for the teacher. The generator starts from the teacher's
weights, where it answers the teacher's posterior mean from pure noise.

Training minimises the reverse KL divergence between the generator's actions
and the teacher's, diffused to noise levels drawn from the teacher's own
training distribution (``rtdp.core.distill.distribution_matching_loss``): the
teacher's score pulls each generated chunk towards its modes, the score of an
auxiliary network fitted to the generator's current outputs pushes it away
from where the generator already is. The auxiliary network (OneDP's
"generator score network") starts as a copy of the teacher and is fitted by
denoising score matching to the generator's outputs, ``od_fake_steps``
updates per generator update with its own AdamW optimiser (learning rate
``od_fake_lr``); it is part of training only, not of the checkpoint, and is
rebuilt from the teacher when a run resumes.

With ``od_regress_weight`` > 0 the loss also regresses the generator's
answer onto the teacher's own sampler run from the same input (DMD's
regression loss, Yin et al. 2024; in OneDP-D the teacher then starts from
the zero input too). The KL term alone only asks that the student's actions
be likely under the teacher; the regression ties each noise draw to the
chunk the teacher would act with, as the consistency student's endpoint term does.

Observations the student met in its own closed-loop rollouts
(``rtdp train anchor_obs=PATH``, recorded by ``rtdp eval record_obs=PATH``)
are asked the same question: the teacher's score there is the label, as in
DAgger (Ross et al. 2011).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from rtdp.core import get_sampler
from rtdp.core.distill import denoising_loss, distribution_matching_loss
from rtdp.core.edm import EDMDenoiser, sample_log_normal_sigma
from rtdp.errors import ConfigError
from rtdp.models.base import positive_float, positive_int
from rtdp.policies.edm_unet import EdmUnetConfig, EdmUnetPolicy

POLICY_TYPE = "onestep_unet"


@dataclass(kw_only=True)
class OneStepUnetConfig(EdmUnetConfig):
    """``EdmUnetConfig`` plus the distribution-matching settings.

    Attributes:
        od_stochastic: the generator takes standard-normal noise (OneDP-S); false:
            zero input, one action chunk per observation (OneDP-D).
        od_fake_steps: auxiliary score-network updates per generator update.
        od_fake_lr: learning rate of the auxiliary score network's AdamW.
        od_regress_weight: weight of the regression onto the teacher's own sampler
            from the same input (DMD's regression loss); 0: the KL term alone (OneDP).
    """

    sampler: str = "euler"  # unused: the generator has no sampler (kept a core name, as PolicyConfig requires)
    num_inference_steps: int = 1
    ladder_prob: float = 0.0
    od_stochastic: bool = False
    od_fake_steps: int = 1
    od_fake_lr: float = 1e-4
    od_regress_weight: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.od_stochastic = bool(self.od_stochastic)
        self.od_fake_steps = positive_int(self.od_fake_steps, "od_fake_steps")
        self.od_fake_lr = positive_float(self.od_fake_lr, "od_fake_lr")
        self.od_regress_weight = float(self.od_regress_weight)
        if not self.od_regress_weight >= 0.0:
            raise ConfigError(f"od_regress_weight must be >= 0, got {self.od_regress_weight}")
        if self.num_inference_steps != 1:
            raise ConfigError(f"a one-step policy acts in 1 network evaluation, got num_inference_steps="
                              f"{self.num_inference_steps}")


class OneStepUnetPolicy(EdmUnetPolicy):
    """One network evaluation per action chunk, trained by distribution matching against an EDM teacher.

    Args:
        config: a validated ``OneStepUnetConfig``.
    """

    model_type = POLICY_TYPE
    config_class = OneStepUnetConfig
    config: OneStepUnetConfig

    def __init__(self, config: OneStepUnetConfig) -> None:
        super().__init__(config)
        # Teacher and auxiliary network serve distillation only; neither is part of the state dict.
        self.__dict__["teacher"] = None
        self.__dict__["fake"] = None

    def set_teacher(self, teacher: EdmUnetPolicy) -> None:
        """Attach a frozen EDM teacher; the auxiliary score network starts as its copy at the first loss."""
        if type(teacher) is not EdmUnetPolicy:
            raise ConfigError(f"the teacher must be an EDM policy (policy=edm), got {type(teacher).__name__}")
        self.__dict__["teacher"] = teacher.eval().requires_grad_(False)
        self.__dict__["fake"] = None

    def _check_steps(self, steps: Any) -> int:
        if isinstance(steps, bool) or steps != 1:
            raise ConfigError(f"a one-step policy acts in exactly 1 step, got {steps!r}")
        return 1

    def _fake(self) -> tuple[EdmUnetPolicy, EDMDenoiser, torch.optim.Optimizer, EDMDenoiser]:
        """The auxiliary network, its unclipped denoiser and optimiser, and the teacher's unclipped denoiser."""
        fake = self.__dict__.get("fake")
        if fake is None:
            teacher = self.__dict__["teacher"]
            fake = EdmUnetPolicy(teacher.config).to(self.device)
            fake.load_state_dict(teacher.state_dict())
            fake.train()
            den = EDMDenoiser(fake._net, fake.config.sigma_data, clip_x0=None)
            opt = torch.optim.AdamW(fake.parameters(), lr=self.config.od_fake_lr, betas=(0.0, 0.999),
                                    weight_decay=0.0)
            self.__dict__["fake"] = fake
            # both scores unclipped: clipping x0 would bend the teacher's score near the action limits
            real = EDMDenoiser(teacher._net, teacher.config.sigma_data, clip_x0=None)
            self.__dict__["_fake_parts"] = (den, opt, real)
        return (fake, *self.__dict__["_fake_parts"])

    def _input(self, bsz: int, generator: torch.Generator | None, dtype: torch.dtype,
               noise: torch.Tensor | None = None) -> torch.Tensor:
        """The generator's input at sigma_max: zeros (deterministic) or scaled standard-normal noise."""
        cfg = self.config
        if not cfg.od_stochastic:
            return torch.zeros((bsz, cfg.horizon, cfg.action_dim), device=self.device, dtype=dtype)
        return self.initial_noise(bsz, generator, noise).to(dtype) * cfg.sigma_max

    def generate(self, cond: torch.Tensor, generator: torch.Generator | None = None,
                 x_in: torch.Tensor | None = None) -> torch.Tensor:
        """Action trajectories (B, T, Da), normalised and unclipped, with the generator's graph.

        ``x_in``: the input at sigma_max (default: drawn by ``_input``).
        """
        den = self.__dict__.get("_den_train")
        if den is None:
            den = EDMDenoiser(self._net, self.config.sigma_data, clip_x0=None)
            self.__dict__["_den_train"] = den
        if x_in is None:
            x_in = self._input(cond.shape[0], generator, cond.dtype)
        top = torch.full((cond.shape[0],), self.config.sigma_max, device=self.device, dtype=cond.dtype)
        return den(x_in, top, cond)

    def compute_loss(self, batch: Mapping[str, Any], *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Distribution-matching loss against the attached teacher; one auxiliary update (or more) first.

        ``batch["anchor_obs"]`` (optional): observation windows the student met in
        its own rollouts, where the same loss is asked (DAgger).

        Raises:
            ConfigError: no teacher attached (``set_teacher``).
        """
        teacher = self.__dict__.get("teacher")
        if teacher is None:
            raise ConfigError("a one-step policy trains by distillation: call set_teacher(edm_policy) first "
                              "(rtdp train policy=onestep policy.teacher=<edm checkpoint>)")
        obs, _ = self._check_batch(batch)
        windows = [obs]
        if batch.get("anchor_obs") is not None:
            windows.append(self._check_obs(batch["anchor_obs"], exact_steps=False))
        loss = torch.zeros((), device=self.device)
        for window in windows:
            loss = loss + self._matching_loss(teacher, window, generator)
        return loss

    def _matching_loss(self, teacher: EdmUnetPolicy, obs: dict[str, torch.Tensor],
                       generator: torch.Generator | None) -> torch.Tensor:
        cfg = self.config
        bsz = next(iter(obs.values())).shape[0]
        cond, keep = self._training_cond(obs, bsz, generator)
        x_in = self._input(bsz, generator, cond.dtype)
        x = self.generate(cond, x_in=x_in)
        fake, fake_den, fake_opt, real_den = self._fake()
        with torch.no_grad():  # neither encoder trains here: the conditioning is built once, without a graph
            t_cond = teacher._encode(obs, random_crop=False, keep_goal=keep)
            f_cond = fake._encode(obs, random_crop=False, keep_goal=keep)
        for _ in range(cfg.od_fake_steps):
            # the auxiliary network follows the generator (its samples, no gradient into them)
            sigma = self._sigmas_for(bsz, generator)
            noise = self._randn(tuple(x.shape), generator, x.dtype)
            fake_loss = denoising_loss(fake_den, x, sigma, noise, f_cond, cfg.sigma_data)
            fake_opt.zero_grad(set_to_none=True)
            fake_loss.backward()
            fake_opt.step()
        sigma = self._sigmas_for(bsz, generator)
        noise = self._randn(tuple(x.shape), generator, x.dtype)
        loss = distribution_matching_loss(x, sigma, noise, real_den, fake_den, t_cond, fake_cond=f_cond)
        if cfg.od_regress_weight > 0.0:
            with torch.no_grad():
                name, steps = teacher.config.sampler, teacher.config.num_inference_steps
                answer = get_sampler(name)(teacher._denoiser(), x_in, teacher._sigmas(name, steps).to(x.dtype),
                                           cond=t_cond, generator=generator)
            loss = loss + cfg.od_regress_weight * F.mse_loss(x, answer)
        return loss

    def _sigmas_for(self, bsz: int, generator: torch.Generator | None) -> torch.Tensor:
        """(B,) levels where the two distributions are compared: the teacher's training distribution."""
        cfg = self.config
        return sample_log_normal_sigma((bsz,), cfg.p_mean, cfg.p_std, sigma_min=cfg.sigma_min,
                                       sigma_max=cfg.sigma_max, generator=generator, device=self.device)

    def sample_trajectory(self, cond: torch.Tensor, uncond: torch.Tensor | None, *, sampler: str | None,
                          steps: int, generator: torch.Generator | None, noise: torch.Tensor | None,
                          inpaint: tuple[Any, Any] | None, guidance_scale: float | None = None,
                          guidance_skip_cos: float | None = None) -> torch.Tensor:
        """One evaluation of the generator at sigma_max (``sampler`` is ignored), clipped with ``clip_sample``.

        Inpainting has no denoising steps to act in; it is refused.

        Raises:
            ConfigError: ``inpaint`` given.
        """
        cfg = self.config
        if inpaint is not None:
            raise ConfigError("a one-step policy has no denoising steps to inpaint committed actions into; "
                              "use seam=switch or seam=ensemble")
        den, _ = self.guided_denoiser(cond, uncond, guidance_scale, guidance_skip_cos)
        base = self._denoiser()
        base.reset_nfe()
        x_in = self._input(cond.shape[0], generator, cond.dtype, noise)
        top = torch.full((cond.shape[0],), cfg.sigma_max, device=self.device, dtype=cond.dtype)
        x0 = den(x_in, top, cond)
        x0 = x0.clamp(-1, 1) if cfg.clip_sample else x0
        self.last_nfe = base.nfe
        self.last_sample_nfe = float(base.nfe)
        return x0
