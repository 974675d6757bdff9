"""Discrete DDPM noise schedules and their sigma (VE) view.

A discrete-time DDPM model is trained on ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``
for integer ``t`` in ``[0, N)``. Dividing by ``sqrt(abar_t)`` gives the
variance-exploding form ``x = x0 + sigma_t eps`` with
``sigma_t = sqrt((1 - abar_t) / abar_t)`` (Karras et al. 2022, k-diffusion),
which is the form every rtdp sampler works in. The tables here reproduce
diffusers' ``DDPMScheduler`` / ``DDIMScheduler`` bit for bit so that a model
trained with diffusers (or with Diffusion Policy) samples identically here.
"""

from __future__ import annotations

import math

import torch

from rtdp.errors import ConfigError

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def _cosine_alpha_bar(t: float) -> float:
    # Nichol & Dhariwal 2021 (improved DDPM), offset s = 0.008.
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def make_betas(
    num_train_timesteps: int,
    beta_schedule: str = "squaredcos_cap_v2",
    *,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    max_beta: float = 0.999,
) -> torch.Tensor:
    """DDPM beta table as diffusers builds it.

    Args:
        num_train_timesteps: number of discrete training steps N.
        beta_schedule: one of ``BETA_SCHEDULES``.
        beta_start: first beta of the linear schedules.
        beta_end: last beta of the linear schedules.
        max_beta: cap of the cosine schedule (its last beta would otherwise be 1).

    Returns:
        betas, shape (N,), float32.

    Raises:
        ConfigError: unknown schedule name or non-positive N.
    """
    if int(num_train_timesteps) < 1:
        raise ConfigError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
    n = int(num_train_timesteps)
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, n, dtype=torch.float32)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float32) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        # Computed in Python floats and rounded once to float32, as diffusers does.
        betas = [
            min(1 - _cosine_alpha_bar((i + 1) / n) / _cosine_alpha_bar(i / n), max_beta) for i in range(n)
        ]
        return torch.tensor(betas, dtype=torch.float32)
    raise ConfigError(f"beta_schedule must be one of {', '.join(BETA_SCHEDULES)}, got {beta_schedule!r}")


def alphas_cumprod_from_betas(betas: torch.Tensor) -> torch.Tensor:
    """Cumulative product abar_t = prod_{s<=t} (1 - beta_s).

    Args:
        betas: shape (N,).

    Returns:
        abar, shape (N,), same dtype as ``betas`` (float32 keeps parity with diffusers).
    """
    return torch.cumprod(1.0 - betas, dim=0)


def make_alphas_cumprod(num_train_timesteps: int, beta_schedule: str = "squaredcos_cap_v2", **kwargs) -> torch.Tensor:
    """Shortcut for ``alphas_cumprod_from_betas(make_betas(...))``; shape (N,), float32."""
    return alphas_cumprod_from_betas(make_betas(num_train_timesteps, beta_schedule, **kwargs))


def sigmas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """sigma_t = sqrt((1 - abar_t) / abar_t) for every training step.

    Args:
        alphas_cumprod: shape (N,).

    Returns:
        sigmas, shape (N,), float64 (increasing in t).
    """
    ac = alphas_cumprod.double()
    return ((1 - ac) / ac).sqrt()


def sigma_to_alpha_cumprod(sigma: torch.Tensor) -> torch.Tensor:
    """Inverse of the sigma map: abar = 1 / (1 + sigma^2). Any shape."""
    return 1.0 / (1.0 + sigma**2)


def t_to_sigma(t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Noise level of (possibly fractional) timesteps.

    Integer ``t`` reads the table; fractional ``t`` interpolates log-sigma
    linearly between neighbours (k-diffusion's ``DiscreteSchedule.t_to_sigma``).

    Args:
        t: timesteps in [0, N-1], any shape.
        alphas_cumprod: shape (N,).

    Returns:
        sigma, shape of ``t``, float64.
    """
    log_sigmas = sigmas_from_alphas_cumprod(alphas_cumprod).log().to(t.device)
    t = t.double().clamp(0, log_sigmas.numel() - 1)
    low = t.floor().long()
    high = (low + 1).clamp(max=log_sigmas.numel() - 1)
    w = t - low
    return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()


def sigma_to_t(sigma: torch.Tensor, alphas_cumprod: torch.Tensor, *, quantize: bool = True) -> torch.Tensor:
    """Timestep of a noise level.

    Args:
        sigma: noise levels, any shape, > 0.
        alphas_cumprod: shape (N,).
        quantize: return the nearest integer step (in log-sigma) as int64;
            otherwise a float64 step interpolated in log-sigma.

    Returns:
        t, shape of ``sigma``.
    """
    log_sigmas = sigmas_from_alphas_cumprod(alphas_cumprod).log().to(sigma.device)
    return _sigma_to_t_log(sigma, log_sigmas, quantize)


def _sigma_to_t_log(sigma: torch.Tensor, log_sigmas: torch.Tensor, quantize: bool) -> torch.Tensor:
    log_sigma = sigma.to(log_sigmas.dtype).clamp_min(1e-30).log()
    dists = log_sigma.unsqueeze(-1) - log_sigmas
    if quantize:
        return dists.abs().argmin(dim=-1)
    # Interpolate between the two table entries that bracket log_sigma.
    low = (dists >= 0).cumsum(dim=-1).argmax(dim=-1).clamp(max=log_sigmas.numel() - 2)
    high = low + 1
    lo, hi = log_sigmas[low], log_sigmas[high]
    w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
    return (1 - w) * low + w * high


def leading_timesteps(num_train_timesteps: int, steps: int, steps_offset: int = 0) -> torch.Tensor:
    """diffusers' default ("leading") inference timesteps, decreasing.

    Args:
        num_train_timesteps: N.
        steps: number of inference steps, 1..N.
        steps_offset: added to every timestep (diffusers' ``steps_offset``).

    Returns:
        timesteps, shape (steps,), int64, e.g. N=100, steps=10 -> [90, 80, ..., 0].

    Raises:
        ConfigError: steps outside 1..N.
    """
    if not 1 <= int(steps) <= int(num_train_timesteps):
        raise ConfigError(f"steps must be between 1 and num_train_timesteps={num_train_timesteps}, got {steps}")
    ratio = int(num_train_timesteps) // int(steps)
    return torch.arange(int(steps), dtype=torch.int64).flip(0) * ratio + int(steps_offset)


def _sigmas_for_timesteps(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    sig = sigmas_from_alphas_cumprod(alphas_cumprod)[timesteps]
    # The step after t=0 lands on abar = 1 (diffusers' `one` / set_alpha_to_one), i.e. sigma = 0.
    return torch.cat([sig, sig.new_zeros(1)])


def sigmas_ddpm(alphas_cumprod: torch.Tensor, steps: int, *, steps_offset: int = 0) -> torch.Tensor:
    """Decreasing sigma schedule of diffusers' ``DDPMScheduler`` with ``steps`` inference steps.

    Args:
        alphas_cumprod: shape (N,).
        steps: inference steps, 1..N ("leading" spacing).
        steps_offset: diffusers' ``steps_offset``.

    Returns:
        sigmas, shape (steps + 1,), float64, last entry 0.
    """
    return _sigmas_for_timesteps(alphas_cumprod, leading_timesteps(alphas_cumprod.numel(), steps, steps_offset))


def sigmas_ddim(alphas_cumprod: torch.Tensor, steps: int, *, steps_offset: int = 0) -> torch.Tensor:
    """Decreasing sigma schedule of diffusers' ``DDIMScheduler`` (``set_alpha_to_one=True``).

    With "leading" spacing DDIM's previous timestep ``t - N // steps`` is the
    next entry of the DDPM list, so the two schedules coincide.

    Args:
        alphas_cumprod: shape (N,).
        steps: inference steps, 1..N.
        steps_offset: diffusers' ``steps_offset``.

    Returns:
        sigmas, shape (steps + 1,), float64, last entry 0.
    """
    return sigmas_ddpm(alphas_cumprod, steps, steps_offset=steps_offset)


def sigmas_karras(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022) noise levels, Eq. 5, with a trailing zero.

    ``sigma_i = (sigma_max^(1/rho) + i / (steps - 1) * (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``
    for ``i = 0 .. steps - 1`` (k-diffusion's ``get_sigmas_karras``).

    Args:
        steps: number of nonzero levels (= sampler steps for first-order samplers), >= 1.
        sigma_min: last nonzero level, > 0.
        sigma_max: first level, >= sigma_min.
        rho: curvature; 7 concentrates steps at low noise.

    Returns:
        decreasing sigmas, shape (steps + 1,), float64, last entry 0. With
        ``steps == 1`` the only nonzero level is ``sigma_max``.

    Raises:
        ConfigError: steps < 1 or an invalid range.
    """
    if isinstance(steps, bool) or int(steps) != steps or int(steps) < 1:
        raise ConfigError(f"steps must be a positive int, got {steps!r}")
    if not 0 < float(sigma_min) <= float(sigma_max):
        raise ConfigError(f"need 0 < sigma_min <= sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    n = int(steps)
    ramp = torch.linspace(0, 1, n, dtype=torch.float64) if n > 1 else torch.zeros(1, dtype=torch.float64)
    lo, hi = float(sigma_min) ** (1 / rho), float(sigma_max) ** (1 / rho)
    sig = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sig, sig.new_zeros(1)])


# --------------------------------------------------------------------------------------
# Schedules of diffusers' Karras-style schedulers (Euler, Euler ancestral, Heun, DPM-Solver)


def _check_steps(steps: int, max_steps: int, why: str = "") -> int:
    """``steps`` as an int in 1..max_steps, or a ConfigError that says the range."""
    try:
        is_int = not isinstance(steps, (bool, str)) and int(steps) == steps
    except (TypeError, ValueError, OverflowError):
        is_int = False
    if not is_int:
        raise ConfigError(f"steps must be an int between 1 and {max_steps}{why}, got {steps!r}")
    if not 1 <= int(steps) <= int(max_steps):
        raise ConfigError(f"steps must be between 1 and {max_steps}{why}, got {steps}")
    return int(steps)


def t_to_sigma_linear(t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Noise level of fractional timesteps, sigma interpolated linearly in t.

    This is diffusers' ``np.interp(t, arange(N), sigmas)`` in ``EulerDiscreteScheduler``,
    ``EulerAncestralDiscreteScheduler`` and ``HeunDiscreteScheduler`` (``t_to_sigma``
    interpolates log-sigma instead, as k-diffusion does); both read the table at integers.

    Args:
        t: timesteps in [0, N-1], any shape.
        alphas_cumprod: shape (N,).

    Returns:
        sigma, shape of ``t``, float64.
    """
    table = sigmas_from_alphas_cumprod(alphas_cumprod).to(t.device)
    if table.numel() == 1:
        return table.expand(t.shape).clone()
    t = t.double().clamp(0, table.numel() - 1)
    low = t.floor().long().clamp(max=table.numel() - 2)
    w = t - low
    return (1 - w) * table[low] + w * table[low + 1]


def sigma_to_t_linear(sigma: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Inverse of ``t_to_sigma_linear``: the fractional timestep diffusers' Euler/Heun feed for ``sigma``.

    Args:
        sigma: noise levels, any shape; clamped to the table's range.
        alphas_cumprod: shape (N,).

    Returns:
        t, shape of ``sigma``, float64.
    """
    return _sigma_to_t_lin(sigma, sigmas_from_alphas_cumprod(alphas_cumprod).to(sigma.device))


def _sigma_to_t_lin(sigma: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    # table: increasing sigmas (N,), float64.
    if table.numel() == 1:
        return torch.zeros(sigma.shape, dtype=table.dtype, device=sigma.device)
    s = sigma.to(table.dtype)
    low = (torch.searchsorted(table, s.contiguous(), right=True) - 1).clamp(0, table.numel() - 2)
    lo, hi = table[low], table[low + 1]
    w = ((s - lo) / (hi - lo)).clamp(0, 1)
    return low + w


def linspace_timesteps(num_train_timesteps: int, steps: int) -> torch.Tensor:
    """diffusers' "linspace" timesteps of the Euler / Euler-ancestral / Heun schedulers, decreasing.

    ``np.linspace(0, N - 1, steps, dtype=np.float32)[::-1]``: fractional for most
    ``steps``, first entry ``N - 1``, last entry 0. They are rounded to float32
    as diffusers rounds them. One difference: for ``steps == 1`` diffusers gets
    ``[0]`` (one step from the *smallest* noise level, which cannot denoise
    anything); this returns ``[N - 1]``, as k-diffusion's ``linspace(t_max, 0, 1)``.

    Args:
        num_train_timesteps: N.
        steps: number of inference steps, 1..N.

    Returns:
        timesteps, shape (steps,), float64 holding float32 values,
        e.g. N=100, steps=4 -> [99, 66, 33, 0].

    Raises:
        ConfigError: steps outside 1..N.
    """
    n = int(num_train_timesteps)
    k = _check_steps(steps, n, f" (num_train_timesteps={n})")
    if k == 1:
        return torch.tensor([n - 1], dtype=torch.float64)
    # np.linspace computes i * ((stop - start) / (num - 1)) in float64 and sets the end point exactly.
    delta = (n - 1) / (k - 1)
    t = [i * delta for i in range(k - 1)] + [float(n - 1)]
    return torch.tensor(t, dtype=torch.float64).float().double().flip(0)


def sigmas_linspace(alphas_cumprod: torch.Tensor, steps: int) -> torch.Tensor:
    """Default sigmas of diffusers' ``EulerDiscreteScheduler``, ``EulerAncestralDiscreteScheduler``
    and ``HeunDiscreteScheduler`` for a discrete model.

    Timesteps ``linspace_timesteps(N, steps)`` ("linspace" spacing, from N-1
    down to 0), sigma interpolated linearly in t between training levels
    (``t_to_sigma_linear``), then a final 0 (``final_sigmas_type="zero"``).
    The inner levels fall between training steps: a denoiser that should
    reproduce diffusers feeds fractional timesteps
    (``DiscreteEpsDenoiser(quantize=False, sigma_interpolation="linear")``).

    Args:
        alphas_cumprod: shape (N,).
        steps: number of nonzero levels, 1..N.

    Returns:
        decreasing sigmas, shape (steps + 1,), float64, first entry sigma_max,
        last nonzero entry sigma_min (for steps > 1), last entry 0.

    Raises:
        ConfigError: steps outside 1..N.
    """
    t = linspace_timesteps(alphas_cumprod.numel(), steps)
    sig = t_to_sigma_linear(t, alphas_cumprod)
    return torch.cat([sig, sig.new_zeros(1)])


def dpmpp_timesteps(num_train_timesteps: int, steps: int) -> torch.Tensor:
    """diffusers' "linspace" timesteps of ``DPMSolverMultistepScheduler``, decreasing.

    ``np.linspace(0, N - 1, steps + 1).round()[::-1][:-1]``: integer training
    steps from N-1 down to about (N-1)/steps (t = 0 is replaced by the final
    sigma 0). numpy rounds half to even; so does Python's ``round``.

    Args:
        num_train_timesteps: N.
        steps: number of inference steps, 1..N-1; with ``steps == N`` the
            rounded grid repeats a timestep, which gives DPM-Solver a zero
            step and a division by zero.

    Returns:
        timesteps, shape (steps,), int64, e.g. N=100, steps=10 -> [99, 89, 79, 69, 59, 50, 40, 30, 20, 10].

    Raises:
        ConfigError: steps outside 1..N-1.
    """
    n = int(num_train_timesteps)
    k = _check_steps(steps, max(n - 1, 1), f" for DPM-Solver (num_train_timesteps={n}: more steps repeat a timestep)")
    delta = (n - 1) / k
    t = [round(i * delta) for i in range(k)] + [n - 1]
    return torch.tensor(t[1:][::-1], dtype=torch.int64)


def sigmas_dpmpp(alphas_cumprod: torch.Tensor, steps: int) -> torch.Tensor:
    """Default sigmas of diffusers' ``DPMSolverMultistepScheduler`` for a discrete model.

    Training levels at ``dpmpp_timesteps(N, steps)`` (integer steps, so
    ``quantize=True`` feeds the network exactly what diffusers feeds it), then a
    final 0 (``final_sigmas_type="zero"``).

    Args:
        alphas_cumprod: shape (N,).
        steps: number of nonzero levels, 1..N-1.

    Returns:
        decreasing sigmas, shape (steps + 1,), float64, last entry 0.

    Raises:
        ConfigError: steps outside 1..N-1.
    """
    return _sigmas_for_timesteps(alphas_cumprod, dpmpp_timesteps(alphas_cumprod.numel(), steps))


def sigmas_karras_discrete(alphas_cumprod: torch.Tensor, steps: int, rho: float = 7.0) -> torch.Tensor:
    """Karras sigmas spanning a discrete training schedule (diffusers' ``use_karras_sigmas=True``).

    ``sigmas_karras(steps, sigma_min, sigma_max, rho)`` with the smallest and
    largest training levels, as diffusers' ``_convert_to_karras`` picks them.
    The levels fall between training steps: use a denoiser with ``quantize=False``.

    Args:
        alphas_cumprod: shape (N,).
        steps: number of nonzero levels, 1..N.
        rho: Karras' curvature.

    Returns:
        decreasing sigmas, shape (steps + 1,), float64, last entry 0.

    Raises:
        ConfigError: steps outside 1..N.
    """
    n = alphas_cumprod.numel()
    k = _check_steps(steps, n, f" (num_train_timesteps={n})")
    table = sigmas_from_alphas_cumprod(alphas_cumprod)
    return sigmas_karras(k, float(table[0]), float(table[-1]), rho)
