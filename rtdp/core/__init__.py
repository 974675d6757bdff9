"""The acceleration core: schedules, denoiser wrappers and samplers (torch only)."""

from rtdp.core.denoiser import DiscreteEpsDenoiser
from rtdp.core.samplers import (
    SAMPLERS,
    SIGMA_SCHEDULES,
    Denoiser,
    get_sampler,
    get_sigmas,
    sample_ddim,
    sample_ddpm,
    vp_noise_to_start,
)
from rtdp.core.schedules import (
    BETA_SCHEDULES,
    alphas_cumprod_from_betas,
    leading_timesteps,
    make_alphas_cumprod,
    make_betas,
    sigma_to_alpha_cumprod,
    sigma_to_t,
    sigmas_ddim,
    sigmas_ddpm,
    sigmas_from_alphas_cumprod,
    t_to_sigma,
)

__all__ = [
    "BETA_SCHEDULES",
    "SAMPLERS",
    "SIGMA_SCHEDULES",
    "Denoiser",
    "DiscreteEpsDenoiser",
    "alphas_cumprod_from_betas",
    "get_sampler",
    "get_sigmas",
    "leading_timesteps",
    "make_alphas_cumprod",
    "make_betas",
    "sample_ddim",
    "sample_ddpm",
    "sigma_to_alpha_cumprod",
    "sigma_to_t",
    "sigmas_ddim",
    "sigmas_ddpm",
    "sigmas_from_alphas_cumprod",
    "t_to_sigma",
    "vp_noise_to_start",
]
