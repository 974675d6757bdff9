"""Golden tests of rtdp.core against diffusers' schedulers.

DDPM/DDIM, Euler, Euler ancestral, Heun, DPM-Solver++(2M) and its SDE form each run the same
dummy network as the matching diffusers scheduler, from the same start and with
the same noise, and must give the same sample.
"""

from __future__ import annotations

import pytest
import torch

from rtdp.core import (
    SAMPLERS,
    SIGMA_SCHEDULES,
    DiscreteEpsDenoiser,
    dpmpp_timesteps,
    get_sampler,
    get_sigmas,
    linspace_timesteps,
    make_alphas_cumprod,
    make_betas,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
    sigma_to_t,
    sigma_to_t_linear,
    sigmas_ddim,
    sigmas_ddpm,
    sigmas_from_alphas_cumprod,
    t_to_sigma,
    t_to_sigma_linear,
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


def _abar_at(alphas_cumprod: torch.Tensor, t) -> torch.Tensor:
    """abar of the dummy network at timesteps t, shape (B,).

    Integer steps read the table. Fractional steps (Euler/Heun feed them) take
    sigma linearly interpolated in t, as diffusers' schedulers place them, so
    abar is continuous in t and the same whichever way a sampler rounds t.
    """
    t = torch.as_tensor(t)
    if not t.is_floating_point():
        return alphas_cumprod[t]
    n = alphas_cumprod.numel()
    tc = t.to(alphas_cumprod.dtype).clamp(0, n - 1)
    low = tc.floor().long().clamp(max=n - 2)
    w = tc - low
    sig = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()
    s = (1 - w) * sig[low] + w * sig[low + 1]
    return torch.where(tc == tc.round(), alphas_cumprod[tc.round().long()], 1 / (1 + s**2))


def make_eps_model(alphas_cumprod: torch.Tensor):
    """Optimal noise predictor for data ~ N(MU, SD^2) plus a mild nonlinearity.

    A model with a real data distribution keeps samples in a sane range, so
    float32 rounding differences stay small and the comparison is meaningful.
    """

    def eps_model(x_t: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        a = _abar_at(alphas_cumprod.to(x_t.dtype), t).reshape(-1, 1, 1)
        e = (x_t - a.sqrt() * MU.to(x_t.dtype)) * (1 - a).sqrt() / (a * SD**2 + 1 - a)
        return e + 0.05 * torch.tanh(x_t)

    return eps_model


def make_model(alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon"):
    """The dummy network of ``make_eps_model`` re-expressed as a sample or v predictor.

    With ``a = sqrt(abar_t)``, ``s = sqrt(1 - abar_t)``: ``x0 = (x_t - s eps) / a``
    and ``v = a eps - s x0`` (diffusers' definitions), so all three describe one model.
    """
    eps_model = make_eps_model(alphas_cumprod)
    if prediction_type == "epsilon":
        return eps_model

    def model(x_t: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        abar = _abar_at(alphas_cumprod.to(x_t.dtype), t).reshape(-1, 1, 1)
        a, s = abar.sqrt(), (1 - abar).sqrt()
        eps = eps_model(x_t, t)
        x0 = (x_t - s * eps) / a
        return x0 if prediction_type == "sample" else a * eps - s * x0

    return model


def _to_float64(scheduler) -> None:
    # Run diffusers with float64 tables too, so the comparison is free of its float32 cancellation.
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
    scheduler.one = torch.tensor(1.0, dtype=torch.float64)
    if hasattr(scheduler, "final_alpha_cumprod"):
        scheduler.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)


def _noise(dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(BATCH, 16, 2, generator=torch.Generator().manual_seed(0)).to(dtype)


def _run_diffusers_ddim(steps, dtype, clip, eps_model, prediction_type="epsilon"):
    sch = _diffusers().DDIMScheduler(
        num_train_timesteps=N_TRAIN,
        beta_schedule="squaredcos_cap_v2",
        clip_sample=clip,
        set_alpha_to_one=True,
        steps_offset=0,
        prediction_type=prediction_type,
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
    assert set(SAMPLERS) >= {"ddpm", "ddim", "euler", "euler_a", "heun", "dpmpp"}
    assert set(SIGMA_SCHEDULES) >= set(SAMPLERS)
    assert get_sampler("ddpm") is sample_ddpm
    assert get_sampler("euler") is sample_euler
    assert get_sampler("euler_a") is sample_euler_ancestral
    assert get_sampler("heun") is sample_heun
    assert get_sampler("dpmpp") is sample_dpmpp_2m
    with pytest.raises(UnknownNameError, match="unknown sampler 'nosuch'; known samplers: ddim, ddpm, "):
        get_sampler("nosuch")
    with pytest.raises(UnknownNameError):
        get_sigmas("nosuch", make_alphas_cumprod(N_TRAIN), 10)


# ------------------------------------------------ Euler, Euler ancestral, Heun, DPM-Solver++(2M)

SAMPLER_FNS = {"euler": sample_euler, "euler_a": sample_euler_ancestral, "heun": sample_heun, "dpmpp": sample_dpmpp_2m,
               "dpmpp_sde": sample_dpmpp_2m_sde}

# diffusers' scheduler for each sampler, with the settings the rtdp sampler implements.
DIFFUSERS_SCHEDULERS = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpmpp": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
}
DPM_SOLVERS = ("dpmpp", "dpmpp_sde")  # levels on training steps, started from the VP noise

# Two training schedules (beta 1e-4..0.02 for "linear"):
# - "linear": sigma in [0.01, 1.32], well conditioned: samples stay near the data.
# - "squaredcos_cap_v2" (Diffusion Policy's): its last level has sigma = 2029
#   (abar = 2.4e-7), where diffusers' "linspace" spacing starts. The dummy network's
#   0.05 tanh error becomes an x0 error of ~100 there, so few-step samples land far
#   from the data (|x| up to 1e4 for Heun, whose corrector amplifies it) and float32
#   rounding grows with them: that case is compared to 1e-5 of max |reference|.
GOLDEN_BETAS = ("linear", "squaredcos_cap_v2")


def _make_den(name: str, model, ac: torch.Tensor, prediction_type: str = "epsilon", karras: bool = False):
    """Denoiser that feeds the network the timesteps diffusers' scheduler feeds it.

    DPM-Solver's default levels are training steps (integer t); Euler/Heun's
    "linspace" levels fall between them, and diffusers feeds the fractional t
    of its np.interp (sigma linear in t); with Karras sigmas diffusers maps
    sigma to t by log-sigma interpolation (its ``_sigma_to_t``).
    """
    if name in DPM_SOLVERS and not karras:
        return DiscreteEpsDenoiser(model, ac, clip_x0=None, prediction_type=prediction_type)
    interp = "log" if karras else "linear"
    return DiscreteEpsDenoiser(
        model, ac, clip_x0=None, quantize=False, prediction_type=prediction_type, sigma_interpolation=interp
    )


def _run_diffusers(name, beta_schedule, steps, model, prediction_type="epsilon", seed=0, dtype=torch.float32, **cfg):
    """Run diffusers' scheduler the way its pipelines do; returns (start x in VE form, final sample).

    ``cfg`` goes to the scheduler, except ``sigmas64``: float64 levels that replace its own.
    """
    cls_name, kwargs = DIFFUSERS_SCHEDULERS[name]
    sigmas64 = cfg.pop("sigmas64", None)
    sch = getattr(_diffusers(), cls_name)(
        num_train_timesteps=N_TRAIN,
        beta_schedule=beta_schedule,
        beta_start=1e-4,
        beta_end=0.02,
        prediction_type=prediction_type,
        **kwargs,
        **cfg,
    )
    sch.set_timesteps(steps)
    if sigmas64 is not None:
        # Only Heun's step runs in the sample's dtype (the others upcast to float32):
        # hand it float64 levels so that it computes in float64 throughout.
        sch.sigmas = sigmas64
    noise = _noise(dtype)
    # Euler/Heun start at sigma_max * noise (VE); DPM-Solver starts at the VP noise itself.
    x = noise * sch.init_noise_sigma
    start = x.clone() if name not in DPM_SOLVERS else vp_noise_to_start(noise, float(sch.sigmas[0]))
    gen = torch.Generator().manual_seed(seed)
    for t in sch.timesteps:
        out = model(sch.scale_model_input(x, t), t.expand(BATCH))
        step_kwargs = {} if name == "heun" else {"generator": gen}
        x = sch.step(out, t, x, **step_kwargs).prev_sample
    return start, x


def _golden_atol(ref: torch.Tensor, atol: float) -> float:
    return atol * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("beta_schedule", GOLDEN_BETAS)
@pytest.mark.parametrize("steps", [4, 10])
@pytest.mark.parametrize("name", list(SAMPLER_FNS))
def test_samplers_match_diffusers_float32(name, steps, beta_schedule):
    ac = make_alphas_cumprod(N_TRAIN, beta_schedule)
    model = make_eps_model(ac)
    start, ref = _run_diffusers(name, beta_schedule, steps, model, seed=7)
    sigmas = get_sigmas(name, ac, steps)
    den = _make_den(name, model, ac)
    out = SAMPLER_FNS[name](den, start, sigmas, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(out, ref, atol=_golden_atol(ref, 1e-5), rtol=0)


@pytest.mark.parametrize("prediction_type", ["sample", "v_prediction"])
@pytest.mark.parametrize("name", list(SAMPLER_FNS))
def test_prediction_types_match_diffusers(name, prediction_type):
    if name == "euler_a" and prediction_type == "sample":
        pytest.skip("diffusers' EulerAncestralDiscreteScheduler raises NotImplementedError for 'sample'")
    ac = make_alphas_cumprod(N_TRAIN, "linear")
    model = make_model(ac, prediction_type)
    start, ref = _run_diffusers(name, "linear", 8, model, prediction_type=prediction_type, seed=8)
    den = _make_den(name, model, ac, prediction_type)
    out = SAMPLER_FNS[name](den, start, get_sigmas(name, ac, 8), generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("prediction_type", ["sample", "v_prediction"])
def test_ddim_prediction_types_match_diffusers(prediction_type):
    ac = make_alphas_cumprod(N_TRAIN).double()
    model = make_model(ac, prediction_type)
    ref = _run_diffusers_ddim(10, torch.float64, False, model, prediction_type=prediction_type)
    den = DiscreteEpsDenoiser(model, ac, clip_x0=None, prediction_type=prediction_type)
    sigmas = sigmas_ddim(ac, 10)
    out = sample_ddim(den, vp_noise_to_start(_noise(torch.float64), sigmas[0]), sigmas)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_prediction_types_give_the_same_samples(name):
    # One network written as epsilon, sample and v predictor: the wrapper undoes the
    # parametrisation, so every sampler gives the same sample to float64 rounding.
    if name not in ("ddpm", "ddim", *SAMPLER_FNS):
        pytest.skip(f"{name} is registered elsewhere")
    ac = make_alphas_cumprod(N_TRAIN).double()
    sigmas = get_sigmas(name, ac, 10)
    x = vp_noise_to_start(_noise(torch.float64), sigmas[0])
    outs = {}
    for pt in ("epsilon", "sample", "v_prediction"):
        model = make_model(ac, pt)
        if name in ("ddpm", "ddim"):
            den = DiscreteEpsDenoiser(model, ac, clip_x0=None, prediction_type=pt)
        else:
            den = _make_den(name, model, ac, pt)
        outs[pt] = get_sampler(name)(den, x, sigmas, generator=torch.Generator().manual_seed(9))
    atol = _golden_atol(outs["epsilon"], 1e-10)
    torch.testing.assert_close(outs["sample"], outs["epsilon"], atol=atol, rtol=0)
    torch.testing.assert_close(outs["v_prediction"], outs["epsilon"], atol=atol, rtol=0)


@pytest.mark.parametrize("beta_schedule", GOLDEN_BETAS)
def test_heun_matches_diffusers_float64(beta_schedule):
    # diffusers' Heun step keeps the sample's dtype, so it can run in float64 on our levels.
    ac = make_alphas_cumprod(N_TRAIN, beta_schedule).double()
    model = make_eps_model(ac)
    sigmas = get_sigmas("heun", ac, 10)
    levels = torch.cat([sigmas[:1], sigmas[1:-1].repeat_interleave(2), sigmas[-1:]])
    start, ref = _run_diffusers("heun", beta_schedule, 10, model, dtype=torch.float64, sigmas64=levels)
    out = sample_heun(_make_den("heun", model, ac), start, sigmas)
    torch.testing.assert_close(out, ref, atol=_golden_atol(ref, 1e-10), rtol=0)


def test_euler_is_ddim_and_euler_ancestral_is_ddpm_float64():
    # diffusers' Euler, Euler-ancestral and DPM-Solver steps upcast to float32, so the
    # float64 checks go through identities instead: on the same levels Euler is DDIM
    # and Euler ancestral (eta = 1) is the DDPM posterior step, and both of those match
    # diffusers' DDIM/DDPM to 1e-10 in float64 (tests above).
    ac = make_alphas_cumprod(N_TRAIN).double()
    den = DiscreteEpsDenoiser(make_eps_model(ac), ac, clip_x0=None)
    for steps in (10, 100):
        sigmas = sigmas_ddpm(ac, steps)
        x = vp_noise_to_start(_noise(torch.float64), sigmas[0])
        torch.testing.assert_close(sample_euler(den, x, sigmas), sample_ddim(den, x, sigmas), atol=1e-10, rtol=0)
        a = sample_euler_ancestral(den, x, sigmas, generator=torch.Generator().manual_seed(3))
        b = sample_ddpm(den, x, sigmas, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def _k_diffusion_dpmpp_2m(model, x, sigmas):
    """k-diffusion's ``sample_dpmpp_2m`` (v0.1.1), verbatim apart from the signature."""
    s_in = x.new_ones([x.shape[0]])
    sigma_fn = lambda t: t.neg().exp()  # noqa: E731
    t_fn = lambda sigma: sigma.log().neg()  # noqa: E731
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
        h = t_next - t
        if old_denoised is None or sigmas[i + 1] == 0:
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * denoised
        else:
            h_last = t - t_fn(sigmas[i - 1])
            r = h_last / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
    return x


@pytest.mark.parametrize("steps", [2, 10, 50])
def test_dpmpp_matches_k_diffusion_float64(steps):
    ac = make_alphas_cumprod(N_TRAIN).double()
    den = DiscreteEpsDenoiser(make_eps_model(ac), ac, clip_x0=None)
    sigmas = get_sigmas("dpmpp", ac, steps)
    x = vp_noise_to_start(_noise(torch.float64), sigmas[0])
    ref = _k_diffusion_dpmpp_2m(den, x, sigmas)
    torch.testing.assert_close(sample_dpmpp_2m(den, x, sigmas), ref, atol=_golden_atol(ref, 1e-12), rtol=0)


@pytest.mark.parametrize("steps", [4, 10])
def test_euler_karras_matches_diffusers(steps):
    ac = make_alphas_cumprod(N_TRAIN, "linear")
    model = make_eps_model(ac)
    start, ref = _run_diffusers("euler", "linear", steps, model, use_karras_sigmas=True)
    sigmas = get_sigmas("euler", ac, steps, karras=True)
    out = sample_euler(_make_den("euler", model, ac, karras=True), start, sigmas)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("beta_schedule", GOLDEN_BETAS)
@pytest.mark.parametrize("steps", [2, 3, 7, 10, 33, 99, 100])
def test_default_schedules_match_diffusers(steps, beta_schedule):
    d = _diffusers()
    ac = make_alphas_cumprod(N_TRAIN, beta_schedule)
    for cls in (d.EulerDiscreteScheduler, d.EulerAncestralDiscreteScheduler, d.HeunDiscreteScheduler):
        sch = cls(num_train_timesteps=N_TRAIN, beta_schedule=beta_schedule, beta_start=1e-4, beta_end=0.02)
        sch.set_timesteps(steps)
        t = sch.timesteps if cls is not d.HeunDiscreteScheduler else sch.timesteps[::2]
        assert torch.equal(linspace_timesteps(N_TRAIN, steps), t.double())
        sigmas = get_sigmas("euler", ac, steps)
        # Heun lists every inner level twice.
        ref = sch.sigmas if cls is not d.HeunDiscreteScheduler else sch.sigmas[[0, *range(1, 2 * steps, 2)]]
        # diffusers builds its table in float32 and rounds the levels to float32.
        torch.testing.assert_close(sigmas, ref.double(), rtol=1e-6, atol=0)
        assert torch.equal(get_sigmas("euler_a", ac, steps), sigmas)
        assert torch.equal(get_sigmas("heun", ac, steps), sigmas)
    sch = d.DPMSolverMultistepScheduler(num_train_timesteps=N_TRAIN, beta_schedule=beta_schedule)
    if steps < N_TRAIN:
        sch.set_timesteps(steps)
        assert torch.equal(dpmpp_timesteps(N_TRAIN, steps), sch.timesteps)
        torch.testing.assert_close(get_sigmas("dpmpp", ac, steps), sch.sigmas.double(), rtol=1e-6, atol=0)
        if steps >= 2:
            karras = d.EulerDiscreteScheduler(
                num_train_timesteps=N_TRAIN, beta_schedule=beta_schedule, use_karras_sigmas=True
            )
            karras.set_timesteps(steps)
            for name in SAMPLER_FNS:
                got = get_sigmas(name, ac, steps, karras=True)
                torch.testing.assert_close(got, karras.sigmas.double(), rtol=1e-5, atol=0)


def test_one_step_schedules_start_at_sigma_max():
    # Documented difference: for steps=1 diffusers' "linspace" gives t=[0], one step
    # from the *smallest* level; rtdp (like k-diffusion) starts at the largest.
    d = _diffusers()
    ac = make_alphas_cumprod(N_TRAIN)
    sch = d.EulerDiscreteScheduler(num_train_timesteps=N_TRAIN, beta_schedule="squaredcos_cap_v2")
    sch.set_timesteps(1)
    assert sch.timesteps.tolist() == [0.0]
    table = sigmas_from_alphas_cumprod(ac)
    for name in SAMPLER_FNS:
        assert get_sigmas(name, ac, 1).tolist() == [table[-1].item(), 0.0], name
        karras = get_sigmas(name, ac, 1, karras=True)
        torch.testing.assert_close(karras, torch.stack([table[-1], table.new_zeros(())]), rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", sorted(SIGMA_SCHEDULES))
@pytest.mark.parametrize("karras", [False, True])
def test_get_sigmas_rejects_bad_steps(name, karras):
    ac = make_alphas_cumprod(N_TRAIN)
    for steps in (0, -1, N_TRAIN + 1):
        with pytest.raises(ConfigError, match="steps"):
            get_sigmas(name, ac, steps, karras=karras)
    sigmas = get_sigmas(name, ac, 7, karras=karras)
    assert sigmas.shape == (8,) and sigmas[-1] == 0 and (sigmas[1:] < sigmas[:-1]).all()


def test_dpmpp_rejects_as_many_steps_as_training_steps():
    # linspace(0, N-1, N+1) rounded repeats a timestep: a zero step and r = h_last / 0.
    ac = make_alphas_cumprod(N_TRAIN)
    with pytest.raises(ConfigError, match="between 1 and 99"):
        get_sigmas("dpmpp", ac, N_TRAIN)
    assert get_sigmas("dpmpp", ac, N_TRAIN - 1).shape == (N_TRAIN,)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_nfe_counts_network_calls(name):
    if name not in ("ddpm", "ddim", *SAMPLER_FNS):
        pytest.skip(f"{name} is registered elsewhere")
    ac = make_alphas_cumprod(N_TRAIN)
    eps_model = make_eps_model(ac)
    calls = []

    def counted(x_t, t, cond):
        calls.append(t)
        return eps_model(x_t, t)

    steps = 6
    sigmas = get_sigmas(name, ac, steps)
    den = DiscreteEpsDenoiser(counted, ac, clip_x0=None, quantize=name in ("ddpm", "ddim", *DPM_SOLVERS))
    seen = []
    get_sampler(name)(den, vp_noise_to_start(_noise(torch.float32), sigmas[0]), sigmas, callback=seen.append)
    expected = 2 * steps - 1 if name == "heun" else steps
    assert len(calls) == den.nfe == expected
    assert [c["i"] for c in seen] == list(range(steps))
    assert set(seen[0]) == {"x", "i", "sigma", "sigma_next", "denoised"}


def test_samplers_reach_the_data_distribution_karras_family():
    ac = make_alphas_cumprod(N_TRAIN).double()
    eps_model = make_eps_model(ac)
    den = DiscreteEpsDenoiser(
        lambda x, t, c: eps_model(x, t) - 0.05 * torch.tanh(x), ac, clip_x0=None, quantize=False
    )
    noise = torch.randn(256, 16, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for name, steps in (("euler", 50), ("euler_a", 100), ("heun", 25), ("dpmpp", 25), ("dpmpp_sde", 50)):
        sigmas = get_sigmas(name, ac, steps)
        x = vp_noise_to_start(noise, sigmas[0])
        out = get_sampler(name)(den, x, sigmas, generator=torch.Generator().manual_seed(4))
        assert torch.allclose(out.mean((0, 1)), MU.double(), atol=0.02), name
        assert torch.allclose(out.std((0, 1)), torch.full((2,), SD, dtype=torch.float64), atol=0.03), name


def test_linear_sigma_interpolation_and_denoiser_options():
    ac = make_alphas_cumprod(N_TRAIN)
    t = torch.tensor([0.0, 0.25, 10.5, 42.75, 98.9, 99.0], dtype=torch.float64)
    sig = t_to_sigma_linear(t, ac)
    table = sigmas_from_alphas_cumprod(ac)
    assert torch.allclose(sig[2], (table[10] + table[11]) / 2)
    assert torch.allclose(sigma_to_t_linear(sig, ac), t, atol=1e-9)
    # Per-position levels (B, T) map like per-trajectory ones.
    seen = {}

    def model(x_t, t, cond):
        seen["t"] = t
        return torch.zeros_like(x_t)

    den = DiscreteEpsDenoiser(model, ac, clip_x0=None, quantize=False, sigma_interpolation="linear")
    den(torch.randn(2, 3, 2), sig[:6].reshape(2, 3).float())
    assert seen["t"].shape == (2, 3)
    assert torch.allclose(seen["t"].flatten(), t, atol=1e-4)
    with pytest.raises(ConfigError, match="prediction_type must be one of epsilon, sample, v_prediction"):
        DiscreteEpsDenoiser(model, ac, prediction_type="eps")
    with pytest.raises(ConfigError, match="sigma_interpolation must be one of"):
        DiscreteEpsDenoiser(model, ac, quantize=False, sigma_interpolation="cubic")
    with pytest.raises(ConfigError, match="quantize=False"):
        DiscreteEpsDenoiser(model, ac, sigma_interpolation="linear")
