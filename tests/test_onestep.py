"""Distribution matching (rtdp.core.distill) and the one-step policy family (policy=onestep)."""

from __future__ import annotations

import json

import pytest
import torch

from rtdp.core.distill import denoising_loss, distribution_matching_loss
from rtdp.errors import ConfigError
from rtdp.policies.edm_unet import EdmUnetPolicy
from rtdp.policies.onestep import OneStepUnetConfig, OneStepUnetPolicy
from rtdp.policies.runner import Runner
from tests.test_edm import DA, H, STATS, _count_calls, _obs, _policy


def _gaussian_denoiser(mean, std):
    """The exact denoiser of N(mean, std^2) diffused to level sigma: E[x0 | x_t]."""
    def den(x, sigma, cond=None):
        s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        return mean + std**2 / (std**2 + s**2) * (x - mean)
    return den


def test_distribution_matching_drives_a_one_step_generator_to_a_gaussian_teacher():
    """Teacher N(1.5, 0.7^2); generator a + b z from N(0, 1.5^2); the fitted fake score follows it (DMD/OneDP)."""
    torch.manual_seed(0)
    m, s = 1.5, 0.7
    real = _gaussian_denoiser(torch.tensor(m), torch.tensor(s))
    gen = torch.nn.Parameter(torch.tensor([0.0, 1.5]))  # mean, std of the generator
    fake_params = torch.nn.Parameter(torch.tensor([0.0, 1.5]))  # the auxiliary Gaussian denoiser's, fitted
    opt_g = torch.optim.Adam([gen], lr=0.01)
    opt_f = torch.optim.Adam([fake_params], lr=0.05)
    g = torch.Generator().manual_seed(0)

    def sigmas(n):
        return torch.exp(torch.empty(n).uniform_(-3.0, 1.6, generator=g))

    for _ in range(1500):
        x = gen[0] + gen[1] * torch.randn(64, 8, 1, generator=g)
        for _ in range(2):  # the fake denoiser tracks the generator's current samples
            fake = _gaussian_denoiser(fake_params[0], fake_params[1].abs())
            loss_f = denoising_loss(fake, x, sigmas(64), torch.randn(64, 8, 1, generator=g))
            opt_f.zero_grad()
            loss_f.backward()
            opt_f.step()
        fake = _gaussian_denoiser(fake_params[0].detach(), fake_params[1].detach().abs())
        loss = distribution_matching_loss(x, sigmas(64), torch.randn(64, 8, 1, generator=g), real, fake)
        opt_g.zero_grad()
        loss.backward()
        opt_g.step()
    assert float(gen[0].detach()) == pytest.approx(m, abs=0.05)
    assert abs(float(gen[1].detach())) == pytest.approx(s, abs=0.05)
    assert float(fake_params[0].detach()) == pytest.approx(m, abs=0.1)


def test_matching_gradient_is_the_normalised_score_difference():
    """d loss / d x = (D_fake - D_real) / mean|x - D_real| / N, computed by hand."""
    x = torch.tensor([[[0.3], [-0.2]], [[1.0], [0.5]]], requires_grad=True)
    sigma = torch.tensor([0.5, 2.0])
    noise = torch.tensor([[[0.1], [-0.4]], [[0.2], [0.0]]])
    real, fake = _gaussian_denoiser(1.0, 0.5), _gaussian_denoiser(0.0, 1.0)
    distribution_matching_loss(x, sigma, noise, real, fake).backward()
    x_t = x.detach() + sigma[:, None, None] * noise
    d_real, d_fake = real(x_t, sigma), fake(x_t, sigma)
    scale = (x.detach() - d_real).abs().mean(dim=(1, 2), keepdim=True)
    torch.testing.assert_close(x.grad, (d_fake - d_real) / scale / x.numel())


def _student(**kw) -> tuple[OneStepUnetPolicy, EdmUnetPolicy]:
    teacher = _policy()
    data = {**teacher.config.to_dict(), "ladder_prob": 0.0, "num_inference_steps": 1, **kw}
    student = OneStepUnetPolicy(OneStepUnetConfig.from_dict(data))
    student.set_normalizer(STATS)
    student.load_state_dict(teacher.state_dict())
    return student, teacher


def test_onestep_policy_trains_against_its_teacher_and_acts_in_one_network_call():
    student, teacher = _student()
    batch = {"obs": _obs(4), "action": torch.rand(4, H, DA) * 2 - 1}
    with pytest.raises(ConfigError, match="set_teacher"):
        student.compute_loss(batch)
    student.set_teacher(teacher)
    student.train()
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    loss = student.compute_loss(batch, generator=torch.Generator().manual_seed(0))
    loss.backward()
    fake = student.__dict__["fake"]
    # the auxiliary network took one denoising step on the generator's outputs; the teacher did not move
    assert any(not torch.equal(p, teacher_before[k]) for k, p in fake.state_dict().items())
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())
    assert torch.isfinite(loss) and student.model.final_conv[1].weight.grad is not None
    assert set(student.state_dict()) == set(teacher.state_dict())  # neither helper lands in the checkpoint
    # anchor observations (DAgger) ask the same loss once more
    more = student.compute_loss({**batch, "anchor_obs": _obs(3)}, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(more)

    student.eval()
    calls = _count_calls(student)
    out = student.predict_action_chunk(_obs(2))
    assert out.shape == (2, 8, DA) and len(calls) == 1 == student.last_nfe
    runner = Runner(student)
    calls.clear()
    runner.predict(_obs())
    assert runner.name == "onestep" and len(calls) == 1 == runner.last_nfe
    # deterministic (OneDP-D): the same observation gives the same chunk whatever the noise
    torch.manual_seed(0)
    obs = _obs()
    a = student.predict_action_chunk(obs, generator=torch.Generator().manual_seed(1))
    b = student.predict_action_chunk(obs, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # at the start, the teacher's weights asked once from zero input: its posterior mean at sigma_max
    top = torch.full((1,), teacher.config.sigma_max)
    cond, _ = teacher.conditioning(obs)
    expect = teacher._denoiser()(torch.zeros(1, H, DA), top, cond)
    fresh, _ = _student()
    torch.testing.assert_close(fresh.predict_action_chunk(obs),
                               fresh.normalizer.unnormalize("action", expect[:, 1:9]))
    with pytest.raises(ConfigError, match="exactly 1 step"):
        student.predict_action_chunk(obs, steps=2)
    with pytest.raises(ConfigError, match="no denoising steps to inpaint"):
        student.predict_action_chunk(obs, inpaint=(torch.zeros(1, 2, DA), torch.ones(2)))


def test_regression_term_asks_the_teachers_own_sampler_from_the_same_input():
    for weight in (0.0, 1.0):
        student, teacher = _student(od_stochastic=True, od_regress_weight=weight)
        student.set_teacher(teacher)
        t_calls = _count_calls(teacher)
        inputs = []
        real_input = student._input
        student._input = lambda *a, **k: inputs.append(real_input(*a, **k)) or inputs[-1]
        batch = {"obs": _obs(4), "action": torch.rand(4, H, DA) * 2 - 1}
        loss = student.compute_loss(batch, generator=torch.Generator().manual_seed(0))
        # the KL term asks the teacher once; the regression runs its 3-step sampler from the generator's input
        assert torch.isfinite(loss) and len(t_calls) == 1 + (teacher.config.num_inference_steps if weight else 0)
        assert len(inputs) == 1 and float(inputs[0].std()) > 1.0  # sigma_max-scaled noise (OneDP-S)
    with pytest.raises(ConfigError, match="od_regress_weight must be >= 0"):
        _student(od_regress_weight=-1.0)


def test_stochastic_generator_draws_its_noise():
    student, _ = _student(od_stochastic=True)
    obs = _obs()
    a = student.predict_action_chunk(obs, generator=torch.Generator().manual_seed(1))
    b = student.predict_action_chunk(obs, generator=torch.Generator().manual_seed(2))
    assert not torch.equal(a, b)
    with pytest.raises(ConfigError, match="od_fake_steps must be"):
        _student(od_fake_steps=0)


def test_rtdp_train_policy_onestep_distils_a_teacher_checkpoint(tmp_path):
    from rtdp.cli import compose
    from rtdp.policies import load_policy
    from rtdp.workflows.train import train
    from tests.test_train import TINY, _store

    store = _store(tmp_path / "d.zarr")
    tiny = [t for t in TINY if not t.startswith("policy.")]
    train(compose("train", [f"data={store}", f"out={tmp_path / 'edm'}", "policy=edm", "policy.down_dims=[8,16]",
                            *tiny]))
    teacher = f"policy.teacher={tmp_path / 'edm/checkpoint'}"
    train(compose("train", [f"data={store}", f"out={tmp_path / 'od'}", "policy=onestep", teacher,
                            "policy.od_fake_steps=2", *tiny]))
    student = load_policy(tmp_path / "od/checkpoint")
    assert isinstance(student, OneStepUnetPolicy) and student.config.od_fake_steps == 2
    assert json.loads((tmp_path / "od/summary.json").read_text())["train_steps"] > 0
    with pytest.raises(ConfigError, match="policy=onestep distils an EDM policy"):
        train(compose("train", [f"data={store}", f"out={tmp_path / 'x'}", "policy=onestep", *tiny]))
    with pytest.raises(ConfigError, match="policy.init must be a policy=onestep checkpoint"):
        train(compose("train", [f"data={store}", f"out={tmp_path / 'y'}", "policy=onestep", teacher,
                                f"policy.init={tmp_path / 'edm/checkpoint'}", *tiny]))
