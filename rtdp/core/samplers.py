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

from rtdp.core.schedules import sigmas_ddim, sigmas_ddpm, sigmas_dpmpp, sigmas_karras_discrete, sigmas_linspace
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


def _intervals(sigmas: torch.Tensor) -> list[tuple[int, float, float]]:
    # (i, sigma, sigma_next) of every step of a schedule, as Python floats
    s = sigmas.tolist()
    return [(i, s[i], s[i + 1]) for i in range(len(s) - 1)]


def _denoise(denoiser: Denoiser, x: torch.Tensor, sigma: float, cond: Any) -> torch.Tensor:
    return denoiser(x, x.new_full((x.shape[0],), sigma), cond)


def _report(callback: Callback | None, x: torch.Tensor, i: int, sigma: float, sigma_next: float,
            x0: torch.Tensor) -> None:
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_next": sigma_next, "denoised": x0})


@torch.no_grad()
def sample_ddim(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, cond: Any = None,
                generator: torch.Generator | None = None, callback: Callback | None = None) -> torch.Tensor:
    """Deterministic DDIM (Song et al. 2021, eta = 0).

    In VE form DDIM is Euler's method on the probability-flow ODE
    ``dx/dsigma = (x - x0_hat) / sigma`` (Karras et al. 2022, Eq. 4):
    ``x <- x0_hat + sigma_next / sigma * (x - x0_hat)``. Equal to diffusers'
    ``DDIMScheduler.step``; when the denoiser clips x0 the direction uses the
    clipped x0 (diffusers' ``use_clipped_model_output=True``).

    Arguments and result as ``sample_euler`` (deterministic: ``generator`` is unused).
    """
    for i, sigma, sigma_next in _intervals(sigmas):
        x0 = _denoise(denoiser, x, sigma, cond)
        x = x0 if sigma_next == 0 else x0 + (sigma_next / sigma) * (x - x0)
        _report(callback, x, i, sigma, sigma_next, x0)
    return x


@torch.no_grad()
def sample_ddpm(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, cond: Any = None,
                generator: torch.Generator | None = None, callback: Callback | None = None) -> torch.Tensor:
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
    for i, sigma, sigma_next in _intervals(sigmas):
        x0 = _denoise(denoiser, x, sigma, cond)
        if sigma_next == 0:
            x = x0
        else:
            ratio = (sigma_next / sigma) ** 2
            sigma_up = sigma_next * math.sqrt(max(sigma**2 - sigma_next**2, 0.0)) / sigma
            x = x0 + ratio * (x - x0) + sigma_up * _randn_like(x, generator)
        _report(callback, x, i, sigma, sigma_next, x0)
    return x


def _to_d(x: torch.Tensor, sigma: float, denoised: torch.Tensor) -> torch.Tensor:
    # Probability-flow ODE derivative dx/dsigma = (x - D(x, sigma)) / sigma (Karras et al. 2022, Eq. 4).
    return (x - denoised) / sigma


def _ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    # k-diffusion's get_ancestral_step: split sigma_next into a deterministic part
    # (sigma_down) and fresh noise (sigma_up), sigma_down^2 + sigma_up^2 = sigma_next^2.
    if not eta:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * math.sqrt(max(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2, 0.0)))
    sigma_down = math.sqrt(max(sigma_next**2 - sigma_up**2, 0.0))
    return sigma_down, sigma_up


@torch.no_grad()
def sample_euler(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, cond: Any = None,
                 generator: torch.Generator | None = None, callback: Callback | None = None) -> torch.Tensor:
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Alg. 2 without churn).

    ``d = (x - x0_hat) / sigma``, ``x <- x + (sigma_next - sigma) d``: first order,
    deterministic, one network evaluation per step (k-diffusion's ``sample_euler``
    with ``s_churn = 0``; diffusers' ``EulerDiscreteScheduler.step``). On the
    same sigmas it is DDIM written as an ODE step.

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
    for i, sigma, sigma_next in _intervals(sigmas):
        x0 = _denoise(denoiser, x, sigma, cond)
        x = x + _to_d(x, sigma, x0) * (sigma_next - sigma)
        _report(callback, x, i, sigma, sigma_next, x0)
    return x


@torch.no_grad()
def sample_euler_ancestral(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, cond: Any = None,
                           generator: torch.Generator | None = None, callback: Callback | None = None,
                           eta: float = 1.0) -> torch.Tensor:
    """Ancestral Euler sampling (k-diffusion's ``sample_euler_ancestral``).

    Each step is an Euler step down to ``sigma_down`` followed by fresh noise of
    scale ``sigma_up``, with ``sigma_down^2 + sigma_up^2 = sigma_next^2`` and
    ``sigma_up = eta * sigma_next * sqrt(sigma^2 - sigma_next^2) / sigma``.
    With ``eta = 1`` this is the DDPM posterior step (Ho et al. 2020) in VE form,
    i.e. diffusers' ``EulerAncestralDiscreteScheduler.step``. One ``randn`` of
    x's shape is drawn from ``generator`` per step except the last (where
    ``sigma_up = 0``); diffusers also draws one on the last step and multiplies
    it by 0, so the samples agree and only the generator's final state differs.

    Args:
        denoiser: ``denoiser(x, sigma, cond) -> x0_hat``.
        x: starting sample at ``sigmas[0]``, (B, T, D).
        sigmas: decreasing noise levels, (S + 1,), ending in 0.
        cond: conditioning passed to the denoiser.
        generator: source of the per-step noise.
        callback: called after each step with ``{"x", "i", "sigma", "sigma_next", "denoised"}``.
        eta: scale of the fresh noise; 0 gives ``sample_euler``.

    Returns:
        the sample at ``sigmas[-1]``, (B, T, D).
    """
    for i, sigma, sigma_next in _intervals(sigmas):
        x0 = _denoise(denoiser, x, sigma, cond)
        sigma_down, sigma_up = _ancestral_step(sigma, sigma_next, eta)
        x = x + _to_d(x, sigma, x0) * (sigma_down - sigma)
        if sigma_next > 0:
            x = x + _randn_like(x, generator) * sigma_up
        _report(callback, x, i, sigma, sigma_next, x0)
    return x


@torch.no_grad()
def sample_heun(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, cond: Any = None,
                generator: torch.Generator | None = None, callback: Callback | None = None) -> torch.Tensor:
    """Heun's second-order method on the probability-flow ODE (Karras et al. 2022, Alg. 1; Alg. 2 without churn).

    An Euler step to ``sigma_next`` is corrected with the slope there:
    ``x <- x + (sigma_next - sigma) (d + d') / 2``. The last interval, which ends
    at sigma = 0 where the slope is undefined, is a plain Euler step, so S steps
    cost ``2 S - 1`` network evaluations (k-diffusion's ``sample_heun`` with
    ``s_churn = 0``; diffusers' ``HeunDiscreteScheduler``, which lists every inner
    sigma twice).

    Args:
        denoiser: ``denoiser(x, sigma, cond) -> x0_hat``.
        x: starting sample at ``sigmas[0]``, (B, T, D).
        sigmas: decreasing noise levels, (S + 1,), ending in 0.
        cond: conditioning passed to the denoiser.
        generator: unused (deterministic), accepted for a uniform signature.
        callback: called after each step with ``{"x", "i", "sigma", "sigma_next", "denoised"}``
            (``denoised`` from the first evaluation of the step).

    Returns:
        the sample at ``sigmas[-1]``, (B, T, D).
    """
    for i, sigma, sigma_next in _intervals(sigmas):
        x0 = _denoise(denoiser, x, sigma, cond)
        d = _to_d(x, sigma, x0)
        dt = sigma_next - sigma
        if sigma_next == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            x0_2 = _denoise(denoiser, x_2, sigma_next, cond)
            d_2 = _to_d(x_2, sigma_next, x0_2)
            x = x + (d + d_2) / 2 * dt
        _report(callback, x, i, sigma, sigma_next, x0)
    return x


@torch.no_grad()
def sample_dpmpp_2m(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, cond: Any = None,
                    generator: torch.Generator | None = None, callback: Callback | None = None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2; k-diffusion's ``sample_dpmpp_2m``).

    A multistep exponential integrator in ``lambda = -log sigma``: with
    ``h = log(sigma / sigma_next)``, ``x <- (sigma_next / sigma) x + (1 - e^-h) D``
    where ``D`` is the current ``x0_hat`` on the first step and on the step to
    sigma = 0, and otherwise the second-order extrapolation
    ``D = (1 + 1/(2r)) x0_hat - 1/(2r) x0_hat_prev`` with ``r = h_prev / h``.
    One network evaluation per step. Equal to diffusers'
    ``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
    solver_type="midpoint")``, which also takes a first-order last step when the
    final sigma is 0.

    Args:
        denoiser: ``denoiser(x, sigma, cond) -> x0_hat``.
        x: starting sample at ``sigmas[0]``, (B, T, D).
        sigmas: decreasing noise levels, (S + 1,), ending in 0; all inner levels > 0.
        cond: conditioning passed to the denoiser.
        generator: unused (deterministic), accepted for a uniform signature.
        callback: called after each step with ``{"x", "i", "sigma", "sigma_next", "denoised"}``.

    Returns:
        the sample at ``sigmas[-1]``, (B, T, D).
    """
    return _dpmpp_2m(denoiser, x, sigmas, 0.0, cond, generator, callback)


@torch.no_grad()
def sample_dpmpp_2m_sde(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, cond: Any = None,
                        generator: torch.Generator | None = None, callback: Callback | None = None) -> torch.Tensor:
    """DPM-Solver++(2M) SDE (k-diffusion's ``sample_dpmpp_2m_sde``, eta = 1, midpoint).

    The second-order multistep solver of ``sample_dpmpp_2m`` applied to the
    reverse SDE instead of the probability-flow ODE: each step keeps
    ``e^-2h`` of the current sample's distance from the estimate and replaces
    the rest with fresh noise,
    ``x <- (sigma_next / sigma) e^-h x + (1 - e^-2h)(D + D1 / 2) + sigma_next sqrt(1 - e^-2h) z``
    with ``h = log(sigma / sigma_next)``, ``D`` the current ``x0_hat`` and
    ``D1 = (x0_hat - x0_hat_prev) / r`` (``r = h_prev / h``; zero on the first
    step). The stochastic term corrects, step by step, the drift a network's
    errors give a deterministic solver. Equal to diffusers'
    ``DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++",
    solver_order=2, solver_type="midpoint")``, which also lands on ``x0_hat``
    at sigma = 0; one ``randn`` of x's shape is drawn from ``generator`` per
    step, the last included, as diffusers draws it.

    Args:
        denoiser: ``denoiser(x, sigma, cond) -> x0_hat``.
        x: starting sample at ``sigmas[0]``, (B, T, D).
        sigmas: decreasing noise levels, (S + 1,), ending in 0; all inner levels > 0.
        cond: conditioning passed to the denoiser.
        generator: source of the per-step noise.
        callback: called after each step with ``{"x", "i", "sigma", "sigma_next", "denoised"}``.

    Returns:
        the sample at ``sigmas[-1]``, (B, T, D).
    """
    return _dpmpp_2m(denoiser, x, sigmas, 1.0, cond, generator, callback)


def _dpmpp_2m(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, eta: float, cond: Any,
              generator: torch.Generator | None, callback: Callback | None) -> torch.Tensor:
    # k-diffusion's sample_dpmpp_2m_sde with its eta: 0 is the ODE solver (no noise drawn), 1 the SDE one.
    old_x0: torch.Tensor | None = None
    h_last = 0.0
    for i, sigma, sigma_next in _intervals(sigmas):
        x0 = _denoise(denoiser, x, sigma, cond)
        z = _randn_like(x, generator) if eta else None  # one draw per step, the last included (diffusers)
        if sigma_next == 0:
            # lambda_next = inf: the exponential integrator lands on x0_hat.
            x = x0
        else:
            h = math.log(sigma / sigma_next)
            eh = eta * h
            d = x0 if old_x0 is None else x0 + (0.5 * h / h_last) * (x0 - old_x0)
            x = (sigma_next / sigma) * math.exp(-eh) * x - math.expm1(-h - eh) * d
            if z is not None:
                x = x + sigma_next * math.sqrt(-math.expm1(-2 * eh)) * z
            h_last = h
        old_x0 = x0
        _report(callback, x, i, sigma, sigma_next, x0)
    return x


Sampler = Callable[..., torch.Tensor]

# Open registries: other modules add their samplers and schedules here. Default
# schedules are what the matching diffusers scheduler does by default for a
# discrete (DDPM-trained) model.
SAMPLERS: dict[str, Sampler] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "euler": sample_euler,
    "euler_a": sample_euler_ancestral,
    "heun": sample_heun,
    "dpmpp": sample_dpmpp_2m,
    "dpmpp_sde": sample_dpmpp_2m_sde,
}
SIGMA_SCHEDULES: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
    "ddpm": sigmas_ddpm,  # "leading" spacing
    "ddim": sigmas_ddim,  # "leading" spacing
    "euler": sigmas_linspace,  # "linspace" spacing, sigma linear in t
    "euler_a": sigmas_linspace,
    "heun": sigmas_linspace,
    "dpmpp": sigmas_dpmpp,  # "linspace" over steps + 1 points, rounded to training steps
    "dpmpp_sde": sigmas_dpmpp,
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


def get_sigmas(name: str, alphas_cumprod: torch.Tensor, steps: int, *, karras: bool = False) -> torch.Tensor:
    """Default sigma schedule of sampler ``name`` for ``steps`` inference steps.

    Args:
        name: a key of ``SIGMA_SCHEDULES``.
        alphas_cumprod: training schedule, (N,).
        steps: number of inference steps (nonzero levels), 1..N (1..N-1 for "dpmpp").
        karras: use Karras et al.'s levels between the smallest and largest
            training sigma instead (diffusers' ``use_karras_sigmas=True``); they
            fall between training steps, so pair them with a ``quantize=False`` denoiser.

    Returns:
        decreasing sigmas, (steps + 1,), float64, ending in 0.

    Raises:
        UnknownNameError: no schedule registered under ``name``.
        ConfigError: ``steps`` out of range.
    """
    try:
        fn = SIGMA_SCHEDULES[name]
    except KeyError:
        raise UnknownNameError("sampler", name, list(SIGMA_SCHEDULES)) from None
    if karras:
        return sigmas_karras_discrete(alphas_cumprod, steps)
    return fn(alphas_cumprod, steps)


@torch.no_grad()
def sample_consistency(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, cond: Any = None,
                       generator: torch.Generator | None = None, callback: Callback | None = None,
                       sigma_min: float = 0.002) -> torch.Tensor:
    """Multistep consistency sampling (Song et al. 2023, "Consistency Models", Algorithm 1).

    The consistency function maps a sample at any level straight to the clean
    trajectory: one evaluation at ``sigmas[0]`` gives the answer; each further
    level re-noises that answer to ``sigma`` (with ``sqrt(sigma^2 -
    sigma_min^2)``, since the function is the identity at ``sigma_min``) and
    evaluates again. One network evaluation per level.

    Args:
        denoiser: a consistency function in denoiser form, ``f(x, sigma, cond) -> x0_hat``.
        x: starting sample at ``sigmas[0]``, (B, T, D).
        sigmas: the levels visited, decreasing, (S,), with no trailing 0.
        cond: conditioning passed to the denoiser.
        generator: source of the re-noising noise.
        callback: called after each evaluation with ``{"x", "i", "sigma", "denoised"}``.
        sigma_min: the boundary level where the consistency function is the identity.

    Returns:
        the clean sample, (B, T, D).
    """
    batch = x.shape[0]
    x0 = denoiser(x, sigmas[0].expand(batch), cond)
    if callback is not None:
        callback({"x": x, "i": 0, "sigma": float(sigmas[0]), "denoised": x0})
    for i, sigma in enumerate(sigmas[1:], start=1):
        x = x0 + (sigma**2 - sigma_min**2).clamp_min(0).sqrt() * _randn_like(x0, generator)
        x0 = denoiser(x, sigma.expand(batch), cond)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": float(sigma), "denoised": x0})
    return x0
