"""EDM / BESO policy, classifier-free guidance, consistency policy, inference runner and bench parsing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rtdp.core.edm import EDMDenoiser
from rtdp.core.guidance import GuidedDenoiser
from rtdp.core.samplers import sample_euler, sample_heun
from rtdp.core.schedules import sigmas_karras
from rtdp.errors import ConfigError, UnknownNameError
from rtdp.policies.consistency import ConsistencyUnetConfig, ConsistencyUnetPolicy
from rtdp.policies.edm_unet import EdmUnetConfig, EdmUnetPolicy
from rtdp.policies.runner import Runner
from rtdp.workflows.bench import parse_config

H, TO, DA = 16, 2, 2
SMALL = dict(n_obs_steps=TO, horizon=H, n_action_steps=8, down_dims=(8, 16), n_groups=4, diffusion_step_embed_dim=8)
STATS = {"s": {"min": np.zeros(3), "max": np.ones(3)}, "g": {"min": np.zeros(2), "max": np.ones(2)},
         "action": {"min": -np.ones(2), "max": np.ones(2)}}


def _policy(cls=EdmUnetPolicy, cfg_cls=EdmUnetConfig, **kw):
    torch.manual_seed(0)
    cfg = cfg_cls(lowdim_shapes={"s": (3,), "g": (2,)}, action_dim=DA, **SMALL, **kw)
    policy = cls(cfg).eval()
    policy.set_normalizer(STATS)
    return policy


def _count_calls(policy):
    calls = []
    inner = policy.model.forward

    def counting(*args, **kwargs):
        calls.append(1)
        return inner(*args, **kwargs)

    policy.model.forward = counting
    return calls


def _obs(b=1):
    return {"s": torch.rand(b, TO, 3), "g": torch.rand(b, TO, 2)}


def test_edm_scalings_reference_values():
    # Karras et al. 2022, Table 1: c_skip, c_out, c_in, c_noise for sigma_data = 0.5.
    den = EDMDenoiser(lambda x, s, c: torch.zeros_like(x), 0.5)
    sigma = torch.tensor([0.002, 0.5, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = den.scalings(sigma)
    sd = 0.5
    torch.testing.assert_close(c_skip, sd**2 / (sigma**2 + sd**2))
    torch.testing.assert_close(c_out, sigma * sd / (sigma**2 + sd**2).sqrt())
    torch.testing.assert_close(c_in, 1 / (sigma**2 + sd**2).sqrt())
    torch.testing.assert_close(c_noise, sigma.log() / 4)
    # The consistency parametrisation is the identity at its sigma_min (boundary condition).
    cm = EDMDenoiser(lambda x, s, c: torch.randn_like(x), 0.5, consistency_sigma_min=0.002)
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    torch.testing.assert_close(cm(x, torch.full((2,), 0.002, dtype=torch.float64)), x)


def test_training_target_equals_weighted_edm_loss():
    # MSE on F against training_target == lambda(sigma) * ||D - x0||^2 with lambda = 1 / c_out^2 (EDM Eq. 8).
    torch.manual_seed(0)
    net_out = torch.randn(3, 5, 2, dtype=torch.float64)
    den = EDMDenoiser(lambda x, s, c: net_out, 0.5)
    x0 = torch.randn(3, 5, 2, dtype=torch.float64)
    sigma = torch.tensor([0.1, 1.0, 7.0], dtype=torch.float64)
    x = x0 + sigma[:, None, None] * torch.randn(3, 5, 2, dtype=torch.float64)
    lhs = ((den.network(x, sigma) - den.training_target(x0, x, sigma)) ** 2).mean((1, 2))
    _, c_out, _, _ = den.scalings(sigma)
    rhs = ((den(x, sigma) - x0) ** 2).mean((1, 2)) / c_out**2
    torch.testing.assert_close(lhs, rhs)


def test_optimal_edm_denoiser_follows_the_probability_flow_ode():
    # With the exact denoiser of N(mu, s^2), Heun (second order) and Euler (first order) on a
    # Karras schedule approach the exact probability-flow map x_T -> mu + (x_T - mu) s / sqrt(s^2 + sigma_max^2).
    mu, s = 0.3, 0.4

    def exact(x, sigma, cond=None):
        var = sigma.reshape(-1, 1, 1) ** 2
        return (mu * var + x * s**2) / (var + s**2)

    x = torch.randn(4000, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errors = {}
    for n in (40, 80):
        sigmas = sigmas_karras(n, 0.002, 80.0)
        x_t = x * sigmas[0]
        expected = mu + (x_t - mu) * s / (s**2 + 80.0**2) ** 0.5
        errors[n] = [float((fn(exact, x_t, sigmas) - expected).abs().max()) for fn in (sample_heun, sample_euler)]
    assert errors[80][0] < 5e-3
    # Doubling the steps divides Heun's error by ~4 (second order) and Euler's by ~2 (first order).
    assert 3.5 < errors[40][0] / errors[80][0] < 4.5
    assert 1.7 < errors[40][1] / errors[80][1] < 2.3


def test_edm_policy_loss_and_nfe_by_counting_calls():
    policy = _policy(ladder_prob=0.5)
    policy.train()
    batch = {"obs": _obs(8), "action": torch.rand(8, H, DA) * 2 - 1}
    loss = policy.compute_loss(batch, generator=torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in policy.model.parameters())
    policy.eval()
    calls = _count_calls(policy)
    for sampler, steps, nfe in (("euler", 3, 3), ("heun", 3, 5), ("dpmpp", 4, 4), ("euler_a", 2, 2)):
        calls.clear()
        out = policy.predict_action_chunk(_obs(), sampler=sampler, steps=steps)
        assert out.shape == (1, 8, DA)
        assert len(calls) == nfe == policy.last_nfe, sampler


def test_edm_policy_round_trip(tmp_path):
    policy = _policy(goal_keys=("g",))
    policy.save_pretrained(tmp_path / "ckpt")
    from rtdp.policies import load_policy

    loaded = load_policy(tmp_path / "ckpt")
    assert type(loaded) is EdmUnetPolicy and loaded.config == policy.config
    noise = torch.randn(1, H, DA)
    obs = _obs()
    torch.testing.assert_close(loaded.predict_action_chunk(obs, noise=noise), policy.predict_action_chunk(obs, noise=noise))


def test_classifier_free_guidance_and_skipping():
    policy = _policy(goal_keys=("g",))
    obs = _obs()
    noise = torch.randn(1, H, DA)
    cond, uncond = policy.conditioning(obs)
    assert not torch.equal(cond, uncond)
    # Scale 1 = the conditional model alone (one evaluation per step), 0 = the goal-free model.
    calls = _count_calls(policy)
    a1 = policy.predict_action_chunk(obs, noise=noise, guidance_scale=1.0)
    assert len(calls) == 3
    calls.clear()
    a0 = policy.predict_action_chunk(obs, noise=noise, guidance_scale=0.0)
    assert len(calls) == 3
    # The goal-free policy does not depend on the goal at all.
    other = {**obs, "g": torch.rand(1, TO, 2)}
    torch.testing.assert_close(policy.predict_action_chunk(other, noise=noise, guidance_scale=0.0), a0)
    assert not torch.allclose(a0, a1)
    # Scale 2: two evaluations per step, x0 = x0_u + 2 (x0_c - x0_u) at every step.
    calls.clear()
    policy.predict_action_chunk(obs, noise=noise, guidance_scale=2.0)
    assert len(calls) == 6 == policy.last_nfe
    # Skipping with threshold -1 (always agree) stops the unconditional pass after the first step.
    calls.clear()
    policy.predict_action_chunk(obs, noise=noise, guidance_scale=2.0, guidance_skip_cos=-1.0)
    assert len(calls) == 2 + 1 + 1 and policy.last_guidance.skipped
    # GuidedDenoiser arithmetic on a known pair of predictions.
    def const(x, sigma, c):
        return x * 0 + c.reshape(-1, 1, 1)

    g = GuidedDenoiser(const, torch.tensor([3.0]), torch.tensor([1.0]), 1.5)
    torch.testing.assert_close(g(torch.zeros(1, 2, 1), torch.ones(1)), torch.full((1, 2, 1), 1.0 + 1.5 * 2.0))
    # Per-sample skipping: sample 0's predictions agree (cos 1) and stop being guided, sample 1's do not.
    calls = []
    g = GuidedDenoiser(lambda x, s, c: calls.append(x.shape[0]) or const(x, s, c), torch.tensor([1.0, 1.0]),
                       torch.tensor([1.0, -1.0]), 2.0, skip_cos=0.5)
    for _ in range(3):
        out = g(torch.zeros(2, 2, 1), torch.ones(2))
    assert calls == [2, 2, 2, 1, 2, 1] and g.sample_nfe.tolist() == [4, 6] and not g.skipped
    torch.testing.assert_close(out[:, 0, 0], torch.tensor([1.0, -1.0 + 2.0 * 2.0]))
    with pytest.raises(ConfigError, match="guidance_scale needs a goal-conditioned policy"):
        _policy().predict_action_chunk(obs, guidance_scale=0.0)


def test_consistency_policy_distils_and_acts_in_one_call():
    teacher = _policy()
    data = {**teacher.config.to_dict(), "ladder_prob": 0.0, "num_inference_steps": 1}
    student = ConsistencyUnetPolicy(ConsistencyUnetConfig.from_dict(data))
    student.load_state_dict(teacher.state_dict())
    batch = {"obs": _obs(4), "action": torch.rand(4, H, DA) * 2 - 1}
    with pytest.raises(ConfigError, match="set_teacher"):
        student.compute_loss(batch)
    student.set_teacher(teacher)
    student.train()
    t_calls = _count_calls(teacher)
    loss = student.compute_loss(batch, generator=torch.Generator().manual_seed(0))
    loss.backward()
    # one Heun step of the teacher on the grid, then the teacher's own sampler for the endpoint term
    assert torch.isfinite(loss) and len(t_calls) == 2 + teacher.config.num_inference_steps
    assert teacher.model.final_conv[1].weight.grad is None
    # The endpoint term adds weight x (its MSE) to the grid loss, from the same draws.
    losses = {}
    for w in (0.0, 1.0, 2.0):
        student.config.cd_anchor_weight = w
        t_calls.clear()
        with torch.no_grad():
            losses[w] = float(student.compute_loss(batch, generator=torch.Generator().manual_seed(1)))
        assert len(t_calls) == 2 + (teacher.config.num_inference_steps if w else 0)
    endpoint = losses[1.0] - losses[0.0]
    assert endpoint > 0 and losses[2.0] - losses[0.0] == pytest.approx(2 * endpoint, rel=1e-4)
    student.config.cd_anchor_weight = 1.0
    student.eval()
    calls = _count_calls(student)
    for steps in (1, 2, 3):
        calls.clear()
        out = student.predict_action_chunk(_obs(), steps=steps)
        assert out.shape == (1, 8, DA) and len(calls) == steps == student.last_nfe
    with pytest.raises(ConfigError, match="acts in 1..8 steps"):
        student.predict_action_chunk(_obs(), steps=0)


def test_runner_and_bench_names_give_typed_errors():
    edm = _policy()
    with pytest.raises(UnknownNameError, match="unknown sampler 'nosuch'"):
        Runner(edm, "nosuch", 3)
    with pytest.raises(ConfigError, match="steps must be an int in 1..100"):
        Runner(edm, "edm", 0)
    with pytest.raises(ConfigError, match="steps must be an int in 1..100"):
        Runner(edm, "euler", 101)
    with pytest.raises(ConfigError, match="needs a policy=consistency checkpoint"):
        Runner(edm, "cm", 1)
    with pytest.raises(ConfigError, match="need a goal-conditioned EDM checkpoint"):
        Runner(edm, "edm", 3, guidance_scale=0.0)
    assert Runner(edm).name == "edm" and Runner(edm, "stream", 1).n_action_steps == 5
    assert parse_config("edm-3+g0+skip0.9").options == {"guidance_scale": 0.0, "guidance_skip_cos": 0.9}
    assert parse_config("ddpm-100").steps == 100
    for bad, msg in (("ddpm", "must read"), ("ddpm-0", "steps must be >= 1"), ("edm-3+int9", "unknown option")):
        with pytest.raises(ConfigError, match=msg):
            parse_config(bad)


@pytest.mark.parametrize("sampler,steps", [("ddim", 10), ("dpmpp", 5), ("edm", 3), ("stream", 2), ("cm", 2)])
def test_observations_encoded_once_per_chunk(sampler, steps):
    from rtdp.policies.diffusion_unet import DiffusionUnetConfig, DiffusionUnetPolicy

    common = dict(image_shapes={"img": (16, 16, 3)}, lowdim_shapes={"s": (3,)}, action_dim=DA, crop_shape=None,
                  image_feature_dim=8, num_keypoints=4, **SMALL)
    stats = {"s": STATS["s"], "action": STATS["action"]}
    if sampler in ("ddim", "dpmpp"):
        policy = DiffusionUnetPolicy(DiffusionUnetConfig(**common))
    elif sampler == "cm":
        policy = ConsistencyUnetPolicy(ConsistencyUnetConfig(**common))
    else:
        policy = EdmUnetPolicy(EdmUnetConfig(**common))
    policy.eval().set_normalizer(stats)
    encoder_calls = []
    policy.image_encoders[0].register_forward_hook(lambda *a: encoder_calls.append(1))
    net_calls = _count_calls(policy)
    runner = Runner(policy, sampler, steps)
    obs = {"img": torch.randint(0, 255, (1, TO, 16, 16, 3), dtype=torch.uint8), "s": torch.rand(1, TO, 3)}
    for _ in range(2):
        encoder_calls.clear()
        net_calls.clear()
        runner.predict(obs)
        assert len(encoder_calls) == 1  # the ResNet runs once per chunk, for all To frames at once
    assert len(net_calls) == runner.last_nfe == steps


def _record_conds(policy):
    conds = []
    inner = policy.model.forward

    def recording(sample, timestep, global_cond=None):
        conds.append(global_cond.detach().clone())
        return inner(sample, timestep, global_cond)

    policy.model.forward = recording
    return conds


def test_consistency_endpoint_term_at_moved_observations():
    # Goal key "g" (2 columns) plus the goal flag stay put; only the state "s" (3 columns per step) moves.
    teacher = _policy(goal_keys=("g",), goal_dropout=0.0)
    data = {**teacher.config.to_dict(), "ladder_prob": 0.0, "num_inference_steps": 1, "cd_obs_noise": 0.1}
    student = ConsistencyUnetPolicy(ConsistencyUnetConfig.from_dict(data))
    student.set_normalizer(STATS)
    student.load_state_dict(teacher.state_dict())
    student.set_teacher(teacher)
    t_conds, s_conds = _record_conds(teacher), _record_conds(student)
    batch = {"obs": _obs(6), "action": torch.rand(6, H, DA) * 2 - 1}
    with torch.no_grad():
        student.compute_loss(batch, generator=torch.Generator().manual_seed(0))
    clean = t_conds[0]
    n_grid = 2
    endpoint_teacher = t_conds[n_grid:]
    assert len(endpoint_teacher) == teacher.config.num_inference_steps
    # the student's calls: its grid prediction (clean) and its endpoint step (moved); the target network is separate
    torch.testing.assert_close(s_conds[0], clean)
    moved = s_conds[-1]
    for c in endpoint_teacher:
        torch.testing.assert_close(c, moved)  # teacher and student answer at the same moved observation
    shift = (moved - clean).reshape(6, TO, -1)
    # per-step features: g (2 columns, sorted first), s (3), the goal flag (1)
    assert student._feature_slices() == {"g": slice(0, 2), "s": slice(2, 5)} and shift.shape[-1] == 6
    assert torch.all(shift[..., :2] == 0) and torch.all(shift[..., 5] == 0)
    assert torch.all(shift[..., 2:5] != 0) and 0.05 < float(shift[..., 2:5].std()) < 0.2
    with pytest.raises(ConfigError, match="cd_obs_noise must be >= 0"):
        ConsistencyUnetConfig.from_dict({**data, "cd_obs_noise": -1.0})


def test_consistency_endpoint_term_also_at_anchor_observations():
    teacher = _policy()
    data = {**teacher.config.to_dict(), "ladder_prob": 0.0, "num_inference_steps": 1}
    student = ConsistencyUnetPolicy(ConsistencyUnetConfig.from_dict(data))
    student.set_normalizer(STATS)
    student.load_state_dict(teacher.state_dict())
    student.set_teacher(teacher)
    batch = {"obs": _obs(4), "action": torch.rand(4, H, DA) * 2 - 1}
    anchor = _obs(3)
    with torch.no_grad():
        base = float(student.compute_loss(batch, generator=torch.Generator().manual_seed(2)))
        t_conds = _record_conds(teacher)
        s_conds = _record_conds(student)
        more = float(student.compute_loss({**batch, "anchor_obs": anchor}, generator=torch.Generator().manual_seed(2)))
    steps = teacher.config.num_inference_steps
    # grid Heun step (2), the endpoint on the demonstrations (steps), then again at the anchor windows (steps)
    assert len(t_conds) == 2 + 2 * steps
    expected = teacher._encode(teacher._check_obs(anchor, exact_steps=False), random_crop=False)
    for c in t_conds[2 + steps:]:
        torch.testing.assert_close(c, expected)
    torch.testing.assert_close(s_conds[-1], expected)  # the student answers at the same windows
    # the same draws up to the anchor term, which adds its (positive) MSE
    assert more > base


def test_shipped_pusht_student_answers_like_its_teacher_in_one_call():
    """The shipped one-step student against the shipped EDM teacher, same noise, at the test seeds' first states."""
    from pathlib import Path

    from rtdp.envs import make
    from rtdp.policies import load_policy

    root = Path(__file__).resolve().parents[1] / "rtdp/assets/checkpoints"
    student, teacher = load_policy(root / "pusht_cm/checkpoint"), load_policy(root / "pusht_edm/checkpoint")
    assert type(student) is ConsistencyUnetPolicy and type(teacher) is EdmUnetPolicy
    env = make("pusht")
    firsts = [env.reset(seed=100000 + i)[0] for i in range(16)]
    env.close()
    obs = {k: torch.as_tensor(np.stack([np.stack([o[k]] * TO) for o in firsts]), dtype=torch.float32)
           for k in firsts[0]}
    noise = torch.randn(16, H, DA, generator=torch.Generator().manual_seed(0))
    calls = _count_calls(student)
    with torch.no_grad():
        a_s = student.predict_action_chunk(obs, noise=noise)
        a_t = teacher.predict_action_chunk(obs, noise=noise)  # edm-3, its own default
        a_other = teacher.predict_action_chunk({k: v.flip(0) for k, v in obs.items()}, noise=noise)
    assert len(calls) == 1 and a_s.shape == a_t.shape == (16, 8, DA)
    norm = student.normalizer
    mse = float(((norm.normalize("action", a_s) - norm.normalize("action", a_t)) ** 2).mean())
    baseline = float(((norm.normalize("action", a_other) - norm.normalize("action", a_t)) ** 2).mean())
    # the student's one step lands on the teacher's three (2e-4 when shipped); the teacher's answers to other states
    # are ~0.2 away, so the bound separates a distilled student from one that ignores its observation
    assert mse < 1e-3 and baseline > 0.05, (mse, baseline)
