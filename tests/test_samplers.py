"""Golden tests of rtdp.core against diffusers' DDPM/DDIM schedulers."""

from __future__ import annotations

import pytest
import torch

from rtdp.core import (
    SAMPLERS,
    DiscreteEpsDenoiser,
    get_sampler,
    get_sigmas,
    make_alphas_cumprod,
    make_betas,
    sample_ddim,
    sample_ddpm,
    sigma_to_t,
    sigmas_ddim,
    sigmas_ddpm,
    sigmas_from_alphas_cumprod,
    t_to_sigma,
    vp_noise_to_start,
)
from rtdp.errors import ConfigError, UnknownNameError



def _diffusers():
    # Only the golden comparisons need diffusers (a dev extra); the rest run without it.
    return pytest.importorskip("diffusers")

N_TRAIN = 100
BATCH = 3
MU = torch.tensor([0.3, -0.5])
SD = 0.4


def make_eps_model(alphas_cumprod: torch.Tensor):
    """Optimal noise predictor for data ~ N(MU, SD^2) plus a mild nonlinearity.

    A model with a real data distribution keeps samples in a sane range, so
    float32 rounding differences stay small and the comparison is meaningful.
    """

    def eps_model(x_t: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        a = alphas_cumprod.to(x_t.dtype)[torch.as_tensor(t).long()].reshape(-1, 1, 1)
        e = (x_t - a.sqrt() * MU.to(x_t.dtype)) * (1 - a).sqrt() / (a * SD**2 + 1 - a)
        return e + 0.05 * torch.tanh(x_t)

    return eps_model


def _to_float64(scheduler) -> None:
    # Run diffusers with float64 tables too, so the comparison is free of its float32 cancellation.
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
    scheduler.one = torch.tensor(1.0, dtype=torch.float64)
    if hasattr(scheduler, "final_alpha_cumprod"):
        scheduler.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)


def _noise(dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(BATCH, 16, 2, generator=torch.Generator().manual_seed(0)).to(dtype)


def _run_diffusers_ddim(steps, dtype, clip, eps_model):
    sch = _diffusers().DDIMScheduler(
        num_train_timesteps=N_TRAIN,
        beta_schedule="squaredcos_cap_v2",
        clip_sample=clip,
        set_alpha_to_one=True,
        steps_offset=0,
        prediction_type="epsilon",
    )
    if dtype == torch.float64:
        _to_float64(sch)
    sch.set_timesteps(steps)
    x = _noise(dtype)
    for t in sch.timesteps:
        x = sch.step(eps_model(x, t.expand(BATCH)), t, x, use_clipped_model_output=clip).prev_sample
    return x


def _run_diffusers_ddpm(steps, dtype, clip, eps_model, seed):
    sch = _diffusers().DDPMScheduler(
        num_train_timesteps=N_TRAIN,
        beta_schedule="squaredcos_cap_v2",
        clip_sample=clip,
        variance_type="fixed_small",
        prediction_type="epsilon",
    )
    if dtype == torch.float64:
        _to_float64(sch)
    sch.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed)
    x = _noise(dtype)
    for t in sch.timesteps:
        x = sch.step(eps_model(x, t.expand(BATCH)), t, x, generator=gen).prev_sample
    return x


@pytest.mark.parametrize("schedule", ["squaredcos_cap_v2", "linear"])
def test_tables_match_diffusers(schedule):
    sch = _diffusers().DDPMScheduler(num_train_timesteps=N_TRAIN, beta_schedule=schedule)
    assert torch.equal(make_betas(N_TRAIN, schedule), sch.betas)
    assert torch.equal(make_alphas_cumprod(N_TRAIN, schedule), sch.alphas_cumprod)


def test_unknown_beta_schedule():
    with pytest.raises(ConfigError, match="beta_schedule must be one of"):
        make_betas(10, "cosine")


@pytest.mark.parametrize("steps", [1, 10, 16, 100])
def test_sigma_schedules_follow_leading_spacing(steps):
    ac = make_alphas_cumprod(N_TRAIN)
    sch = _diffusers().DDIMScheduler(num_train_timesteps=N_TRAIN, beta_schedule="squaredcos_cap_v2")
    sch.set_timesteps(steps)
    expected = sigmas_from_alphas_cumprod(ac)[sch.timesteps]
    for sigmas in (sigmas_ddpm(ac, steps), sigmas_ddim(ac, steps)):
        assert sigmas.shape == (steps + 1,)
        assert sigmas[-1] == 0
        assert torch.allclose(sigmas[:-1], expected)
        assert (sigmas[1:] < sigmas[:-1]).all()
    with pytest.raises(ConfigError):
        sigmas_ddpm(ac, N_TRAIN + 1)


def test_sigma_t_round_trip():
    ac = make_alphas_cumprod(N_TRAIN)
    t = torch.arange(N_TRAIN)
    sigma = t_to_sigma(t, ac)
    assert torch.allclose(sigma, sigmas_from_alphas_cumprod(ac))
    assert torch.equal(sigma_to_t(sigma, ac), t)
    # Definition: sigma = sqrt((1 - abar) / abar).
    assert torch.allclose(sigma**2, (1 - ac.double()) / ac.double())
    frac = torch.tensor([0.25, 10.5, 42.75, 98.9], dtype=torch.float64)
    assert torch.allclose(sigma_to_t(t_to_sigma(frac, ac), ac, quantize=False), frac, atol=1e-9)
    # float32 sigmas (what a sampler hands the denoiser) still find their step.
    assert torch.equal(sigma_to_t(sigma.float(), ac), t)


def test_ddim_matches_diffusers_float32():
    ac = make_alphas_cumprod(N_TRAIN)
    eps_model = make_eps_model(ac)
    ref = _run_diffusers_ddim(10, torch.float32, False, eps_model)
    den = DiscreteEpsDenoiser(eps_model, ac, clip_x0=None)
    sigmas = sigmas_ddim(ac, 10)
    out = sample_ddim(den, vp_noise_to_start(_noise(torch.float32), sigmas[0]), sigmas)
    assert den.nfe == 10
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("clip", [False, True])
def test_ddim_matches_diffusers_float64(clip):
    ac = make_alphas_cumprod(N_TRAIN).double()
    eps_model = make_eps_model(ac)
    ref = _run_diffusers_ddim(10, torch.float64, clip, eps_model)
    den = DiscreteEpsDenoiser(eps_model, ac, clip_x0=1.0 if clip else None)
    sigmas = sigmas_ddim(ac, 10)
    out = sample_ddim(den, vp_noise_to_start(_noise(torch.float64), sigmas[0]), sigmas)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)


def test_ddpm_matches_diffusers_float32():
    ac = make_alphas_cumprod(N_TRAIN)
    eps_model = make_eps_model(ac)
    ref = _run_diffusers_ddpm(100, torch.float32, True, eps_model, seed=1)
    den = DiscreteEpsDenoiser(eps_model, ac, clip_x0=1.0)
    sigmas = sigmas_ddpm(ac, 100)
    x = vp_noise_to_start(_noise(torch.float32), sigmas[0])
    out = sample_ddpm(den, x, sigmas, generator=torch.Generator().manual_seed(1))
    assert den.nfe == 100
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("steps", [10, 100])
def test_ddpm_matches_diffusers_float64(steps):
    ac = make_alphas_cumprod(N_TRAIN).double()
    eps_model = make_eps_model(ac)
    ref = _run_diffusers_ddpm(steps, torch.float64, True, eps_model, seed=2)
    den = DiscreteEpsDenoiser(eps_model, ac, clip_x0=1.0)
    sigmas = sigmas_ddpm(ac, steps)
    x = vp_noise_to_start(_noise(torch.float64), sigmas[0])
    out = sample_ddpm(den, x, sigmas, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)


def test_samplers_reach_the_data_distribution():
    # With the optimal denoiser of N(MU, SD^2), full-length chains reach that mean and spread.
    ac = make_alphas_cumprod(N_TRAIN).double()
    eps_model = make_eps_model(ac)
    den = DiscreteEpsDenoiser(lambda x, t, c: eps_model(x, t) - 0.05 * torch.tanh(x), ac, clip_x0=None)
    noise = torch.randn(256, 16, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for name, steps in (("ddim", 100), ("ddpm", 100)):
        sigmas = get_sigmas(name, ac, steps)
        x = vp_noise_to_start(noise, sigmas[0])
        out = get_sampler(name)(den, x, sigmas, generator=torch.Generator().manual_seed(4))
        assert torch.allclose(out.mean((0, 1)), MU.double(), atol=0.02), name
        assert torch.allclose(out.std((0, 1)), torch.full((2,), SD, dtype=torch.float64), atol=0.03), name


def test_denoiser_per_position_sigma_and_callback():
    ac = make_alphas_cumprod(N_TRAIN)
    seen = {}

    def model(x_t, t, cond):
        seen["t"] = t
        return torch.zeros_like(x_t)

    den = DiscreteEpsDenoiser(model, ac, clip_x0=None)
    x = torch.randn(2, 4, 2)
    table = sigmas_from_alphas_cumprod(ac).float()
    sigma = table[torch.tensor([[0, 10, 50, 99], [5, 5, 5, 5]])]
    x0 = den(x, sigma)
    assert torch.equal(seen["t"], torch.tensor([[0, 10, 50, 99], [5, 5, 5, 5]]))
    torch.testing.assert_close(x0, x)  # zero predicted noise: x0 = x at every level
    # Per-trajectory sigma (B,) matches the per-position form with a constant row.
    eps_model = make_eps_model(ac)
    den = DiscreteEpsDenoiser(lambda x_t, t, c: eps_model(x_t, t.reshape(-1)[:1].expand(x_t.shape[0])), ac)
    s = table[[30, 30]]
    torch.testing.assert_close(den(x, s), den(x, s[:, None].expand(2, 4)))

    steps = []
    sigmas = sigmas_ddim(ac, 5)
    sample_ddim(den, vp_noise_to_start(x, sigmas[0]), sigmas, callback=steps.append)
    assert [c["i"] for c in steps] == list(range(5))
    assert den.nfe == 2 + 5
    den.reset_nfe()
    assert den.nfe == 0


def test_registry():
    assert set(SAMPLERS) >= {"ddpm", "ddim"}
    assert get_sampler("ddpm") is sample_ddpm
    with pytest.raises(UnknownNameError, match="unknown sampler 'euler'; known samplers: ddim, ddpm"):
        get_sampler("euler")
    with pytest.raises(UnknownNameError):
        get_sigmas("euler", make_alphas_cumprod(N_TRAIN), 10)
