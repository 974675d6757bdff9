"""Stateless samplers over a denoiser.

Each sampler is a plain function ``sample_<name>(denoiser, x, sigmas, *, cond,
generator, callback)``: the schedule is a tensor passed in and all state lives
in local variables, so one denoiser can serve two loops at once. ``x`` is the
variance-exploding sample ``x0 + sigma * eps`` (see ``rtdp.core.schedules``);
``vp_noise_to_start`` turns standard-normal noise into the starting ``x``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Protocol

import torch

from rtdp.core.schedules import sigmas_ddim, sigmas_ddpm
from rtdp.errors import UnknownNameError


class Denoiser(Protocol):
    """``denoiser(x, sigma, cond) -> x0_hat``; x (B, T, D), sigma (B,) or (B, T)."""

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any = None) -> torch.Tensor: ...


Callback = Callable[[dict[str, Any]], None]


def vp_noise_to_start(noise: torch.Tensor, sigma_max: float | torch.Tensor) -> torch.Tensor:
    """Starting VE sample for a schedule that begins at ``sigma_max``.

    A DDPM chain starts from ``x_T = noise`` in VP space; the VE sample is
    ``x_T / sqrt(abar_T) = noise * sqrt(1 + sigma_max^2)``.

    Args:
        noise: standard normal, (B, T, D).
        sigma_max: first entry of the sigma schedule.

    Returns:
        x, (B, T, D), dtype of ``noise``.
    """
    return noise * math.sqrt(1.0 + float(sigma_max) ** 2)


def _randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    # Draw on the generator's device and move, like diffusers' randn_tensor, so a
    # CPU generator gives the same numbers whatever device x lives on.
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


@torch.no_grad()
def sample_ddim(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    cond: Any = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Deterministic DDIM (Song et al. 2021, eta = 0).

    In VE form DDIM is Euler's method on the probability-flow ODE
    ``dx/dsigma = (x - x0_hat) / sigma`` (Karras et al. 2022, Eq. 4):
    ``x <- x0_hat + sigma_next / sigma * (x - x0_hat)``. Equal to diffusers'
    ``DDIMScheduler.step``; when the denoiser clips x0 the direction uses the
    clipped x0 (diffusers' ``use_clipped_model_output=True``).

    Args:
        denoiser: ``denoiser(x, sigma, cond) -> x0_hat``.
        x: starting sample at ``sigmas[0]``, (B, T, D).
        sigmas: decreasing noise levels, (S + 1,), ending in 0.
        cond: conditioning passed to the denoiser.
        generator: unused (deterministic), accepted for a uniform signature.
        callback: called after each step with ``{"x", "i", "sigma", "sigma_next", "denoised"}``.

    Returns:
        the sample at ``sigmas[-1]``, (B, T, D).
    """
    s = sigmas.tolist()
    batch = x.shape[0]
    for i in range(len(s) - 1):
        sigma, sigma_next = s[i], s[i + 1]
        x0 = denoiser(x, x.new_full((batch,), sigma), cond)
        x = x0 if sigma_next == 0 else x0 + (sigma_next / sigma) * (x - x0)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_next": sigma_next, "denoised": x0})
    return x


@torch.no_grad()
def sample_ddpm(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    cond: Any = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Ancestral DDPM sampling (Ho et al. 2020, Eq. 6-7, "fixed_small" variance).

    The posterior ``q(x_prev | x, x0_hat)`` in VE form is
    ``x_prev = x0_hat + (s'^2 / s^2)(x - x0_hat) + (s' sqrt(s^2 - s'^2) / s) z``
    for ``s = sigma``, ``s' = sigma_next`` (k-diffusion's Euler-ancestral step
    with eta = 1). Equal to diffusers' ``DDPMScheduler.step`` with
    ``variance_type="fixed_small"``; one ``randn`` of x's shape is drawn from
    ``generator`` per step except the last, in the same order as diffusers.

    Args:
        denoiser: ``denoiser(x, sigma, cond) -> x0_hat``.
        x: starting sample at ``sigmas[0]``, (B, T, D).
        sigmas: decreasing noise levels, (S + 1,), ending in 0.
        cond: conditioning passed to the denoiser.
        generator: source of the per-step noise.
        callback: called after each step with ``{"x", "i", "sigma", "sigma_next", "denoised"}``.

    Returns:
        the sample at ``sigmas[-1]``, (B, T, D).
    """
    s = sigmas.tolist()
    batch = x.shape[0]
    for i in range(len(s) - 1):
        sigma, sigma_next = s[i], s[i + 1]
        x0 = denoiser(x, x.new_full((batch,), sigma), cond)
        if sigma_next == 0:
            x = x0
        else:
            ratio = (sigma_next / sigma) ** 2
            sigma_up = sigma_next * math.sqrt(max(sigma**2 - sigma_next**2, 0.0)) / sigma
            x = x0 + ratio * (x - x0) + sigma_up * _randn_like(x, generator)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_next": sigma_next, "denoised": x0})
    return x


Sampler = Callable[..., torch.Tensor]

# Open registries: other modules add their samplers and schedules here.
SAMPLERS: dict[str, Sampler] = {"ddpm": sample_ddpm, "ddim": sample_ddim}
SIGMA_SCHEDULES: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
    "ddpm": sigmas_ddpm,
    "ddim": sigmas_ddim,
}


def get_sampler(name: str) -> Sampler:
    """Sampler function registered under ``name``.

    Raises:
        UnknownNameError: ``name`` is not in ``SAMPLERS``.
    """
    try:
        return SAMPLERS[name]
    except KeyError:
        raise UnknownNameError("sampler", name, list(SAMPLERS)) from None


def get_sigmas(name: str, alphas_cumprod: torch.Tensor, steps: int) -> torch.Tensor:
    """Default sigma schedule of sampler ``name`` for ``steps`` inference steps.

    Args:
        name: a key of ``SIGMA_SCHEDULES``.
        alphas_cumprod: training schedule, (N,).
        steps: number of inference steps.

    Returns:
        decreasing sigmas, (steps + 1,), ending in 0.

    Raises:
        UnknownNameError: no schedule registered under ``name``.
        ConfigError: ``steps`` out of range.
    """
    try:
        fn = SIGMA_SCHEDULES[name]
    except KeyError:
        raise UnknownNameError("sampler", name, list(SIGMA_SCHEDULES)) from None
    return fn(alphas_cumprod, steps)
