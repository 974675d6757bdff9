"""DiffusionUnetPolicy: training signal, inference shapes, checkpoints and typed errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rtdp.errors import CheckpointError, ConfigError, MissingKeyError, ObservationError, UnknownNameError
from rtdp.models.base import SCHEMA_VERSION
from rtdp.policies import SIZES, DiffusionUnetConfig, DiffusionUnetPolicy
from rtdp.policies.unet1d import ConditionalUnet1D

pytest.importorskip("safetensors")

TINY = dict(down_dims=(16, 32), n_groups=4, diffusion_step_embed_dim=16, horizon=8, n_action_steps=4)
STATS = {
    "agent_pos": {"min": np.array([0.0, 10.0]), "max": np.array([512.0, 500.0])},
    "keypoint": {"min": np.zeros((3, 2)), "max": np.full((3, 2), 96.0)},
    "action": {"min": np.array([0.0, -1.0]), "max": np.array([512.0, 1.0])},
}


def lowdim_policy(**overrides) -> DiffusionUnetPolicy:
    shapes = {"agent_pos": (2,), "keypoint": (3, 2)}
    cfg = DiffusionUnetConfig(lowdim_shapes=shapes, action_dim=2, **{**TINY, **overrides})
    torch.manual_seed(0)
    policy = DiffusionUnetPolicy(cfg)
    policy.set_normalizer({k: STATS[k] for k in ("agent_pos", "keypoint", "action")})
    return policy


def image_policy() -> DiffusionUnetPolicy:
    cfg = DiffusionUnetConfig(
        lowdim_shapes={"agent_pos": (2,)},
        image_shapes={"image": (32, 32, 3)},
        action_dim=2,
        crop_shape=(28, 28),
        **TINY,
    )
    torch.manual_seed(0)
    policy = DiffusionUnetPolicy(cfg)
    policy.set_normalizer({k: STATS[k] for k in ("agent_pos", "action")})
    return policy


def lowdim_obs(batch: int = 1, steps: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "agent_pos": rng.uniform(0, 512, (batch, steps, 2)).astype(np.float32),
        "keypoint": rng.uniform(0, 96, (batch, steps, 3, 2)).astype(np.float32),
    }


def test_unet_shapes_and_sizes():
    net = ConditionalUnet1D(
        input_dim=3, global_cond_dim=10, diffusion_step_embed_dim=16, down_dims=(16, 32, 64), n_groups=4
    )
    out = net(torch.randn(2, 16, 3), torch.tensor([0, 99]), torch.randn(2, 10))
    assert out.shape == (2, 16, 3)
    # A scalar timestep broadcasts over the batch.
    scalar_t = net(torch.zeros(2, 16, 3), 5, torch.zeros(2, 10))[0]
    torch.testing.assert_close(scalar_t, net(torch.zeros(1, 16, 3), torch.tensor([5]), torch.zeros(1, 10))[0])
    assert set(SIZES) == {"small", "medium", "dp_lowdim", "dp_image"}
    assert SIZES["dp_lowdim"] == (256, 512, 1024) and SIZES["dp_image"] == (512, 1024, 2048)


def test_config_validation_messages():
    with pytest.raises(ConfigError, match="sampler must be one of ddim, ddpm, dpmpp, dpmpp_sde, euler, euler_a, heun, got 'nosuch'"):
        DiffusionUnetConfig(lowdim_shapes={"s": (2,)}, action_dim=2, sampler="nosuch")
    with pytest.raises(ConfigError, match="prediction_type must be one of epsilon, sample, v_prediction, got 'x0'"):
        DiffusionUnetConfig(lowdim_shapes={"s": (2,)}, action_dim=2, prediction_type="x0")
    with pytest.raises(ConfigError, match="beta_schedule must be one of"):
        DiffusionUnetConfig(lowdim_shapes={"s": (2,)}, action_dim=2, beta_schedule="cosine")
    with pytest.raises(ConfigError, match="down_dims must be a tuple of ints or one of small, medium, dp_lowdim, dp_image"):
        DiffusionUnetConfig(lowdim_shapes={"s": (2,)}, action_dim=2, down_dims="huge")
    with pytest.raises(ConfigError, match="horizon must be a multiple of 4"):
        DiffusionUnetConfig(lowdim_shapes={"s": (2,)}, action_dim=2, horizon=18, n_action_steps=8)
    with pytest.raises(ConfigError, match="crop_shape"):
        DiffusionUnetConfig(image_shapes={"im": (64, 64, 3)}, action_dim=2)
    with pytest.raises(ConfigError, match="at least one observation"):
        DiffusionUnetConfig(action_dim=2)
    cfg = DiffusionUnetConfig(lowdim_shapes={"s": [2]}, action_dim=2, down_dims="dp_lowdim")
    assert cfg.down_dims == SIZES["dp_lowdim"] and cfg.lowdim_shapes == {"s": (2,)}
    assert DiffusionUnetConfig.from_dict(cfg.to_dict()) == cfg


def test_normalizer_round_trip_and_range():
    policy = lowdim_policy()
    norm = policy.normalizer
    x = torch.tensor([[0.0, 10.0], [512.0, 500.0], [256.0, 255.0]])
    y = norm.normalize("agent_pos", x)
    torch.testing.assert_close(y[:2], torch.tensor([[-1.0, -1.0], [1.0, 1.0]]))
    torch.testing.assert_close(norm.unnormalize("agent_pos", y), x)
    stats = policy.normalizer.get_stats()
    np.testing.assert_allclose(stats["keypoint"]["max"], STATS["keypoint"]["max"])
    # A constant dimension is shifted, not divided by zero.
    policy.set_normalizer({**STATS, "action": {"min": np.array([3.0, 0.0]), "max": np.array([3.0, 1.0])}})
    a = torch.tensor([[3.0, 0.5]])
    assert torch.isfinite(norm.normalize("action", a)).all()
    torch.testing.assert_close(norm.unnormalize("action", norm.normalize("action", a)), a)
    with pytest.raises(MissingKeyError, match="'keypoint'"):
        policy.set_normalizer({k: STATS[k] for k in ("agent_pos", "action")})


def test_unset_normalizer_raises():
    cfg = DiffusionUnetConfig(lowdim_shapes={"agent_pos": (2,), "keypoint": (3, 2)}, action_dim=2, **TINY)
    policy = DiffusionUnetPolicy(cfg)
    with pytest.raises(ConfigError, match="normaliser statistics are not set"):
        policy.predict_action_chunk(lowdim_obs())
    with pytest.raises(ConfigError, match="normaliser statistics are not set"):
        policy.compute_loss({"obs": lowdim_obs(), "action": np.zeros((1, 8, 2))})


def test_loss_decreases_on_tiny_dataset():
    policy = lowdim_policy()
    rng = np.random.default_rng(1)
    obs = lowdim_obs(batch=32, steps=8, seed=1)
    # Actions are a smooth function of the observation, so there is something to learn.
    ramp = np.linspace(0, 1, 8)[None, :, None]
    push = obs["agent_pos"][:, :1, :1] + 50 * ramp
    grip = np.tanh(obs["keypoint"][:, :1, :1, 0] / 48 - 1) + 0 * ramp
    action = np.concatenate([push, grip], -1)
    action = action + rng.normal(0, 1, action.shape)
    batch = {"obs": obs, "action": action.astype(np.float32)}

    def held_out_loss() -> float:
        # Noise and timesteps never used in training: the drop is learning, not memorised noise.
        with torch.no_grad():
            losses = [policy.compute_loss(batch, generator=torch.Generator().manual_seed(1000 + i)) for i in range(4)]
            return float(torch.stack(losses).mean())

    before = held_out_loss()
    opt = torch.optim.Adam(policy.parameters(), lr=3e-3)
    for step in range(40):
        loss = policy.compute_loss(batch, generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert np.isfinite(loss.item())
    assert held_out_loss() < 0.7 * before


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_prediction_types_train_and_sample_what_they_name(prediction_type):
    # Demonstrations that are one fixed trajectory c: an oracle that outputs exactly the quantity the
    # prediction type names (diffusers' definitions, from x_t and the known c) has zero loss, and the
    # samplers turn its outputs back into c. A target or a denoiser wired to the wrong type fails both.
    policy = lowdim_policy(prediction_type=prediction_type)
    c_env = np.stack([np.full(8, 384.0), np.linspace(-0.5, 0.5, 8)], -1).astype(np.float32)  # (T, Da)
    c = policy.normalizer.normalize("action", torch.from_numpy(c_env))
    ac = policy.alphas_cumprod

    class Oracle(torch.nn.Module):
        def forward(self, x_t, t, cond):
            abar = ac[torch.as_tensor(t).long()].reshape(-1, 1, 1)
            a, s = abar.sqrt(), (1 - abar).sqrt()
            eps = (x_t - a * c) / s
            return {"epsilon": eps, "sample": c.expand_as(x_t), "v_prediction": a * eps - s * c}[prediction_type]

    policy.model = Oracle()
    obs = lowdim_obs(batch=4, steps=2, seed=3)
    batch = {"obs": obs, "action": np.broadcast_to(c_env, (4, 8, 2)).copy()}
    loss = policy.compute_loss(batch, generator=torch.Generator().manual_seed(0))
    assert loss.item() < 1e-10
    for sampler, steps in (("ddim", 5), ("ddpm", 10), ("dpmpp", 5)):
        with torch.no_grad():
            out = policy.predict_action_chunk(obs, sampler=sampler, steps=steps, generator=torch.Generator().manual_seed(1))
        np.testing.assert_allclose(out.numpy(), np.broadcast_to(c_env[1:5], (4, 4, 2)), atol=1e-3)


@pytest.mark.parametrize("sampler, steps", [("ddpm", None), ("ddim", 10)])
def test_predict_lowdim_shapes_and_nfe(sampler, steps):
    policy = lowdim_policy().eval()
    obs = lowdim_obs(batch=3)
    actions = policy.predict_action_chunk(obs, sampler=sampler, steps=steps, generator=torch.Generator().manual_seed(0))
    assert actions.shape == (3, 4, 2)
    assert policy.last_nfe == (steps or 100)
    # Clipped samples stay inside the action limits the normaliser was set with.
    assert (actions[..., 0] >= -1e-3).all() and (actions[..., 0] <= 512 + 1e-3).all()
    # torch tensors work as well as numpy arrays; fixed noise makes the result repeatable.
    noise = torch.randn(3, 8, 2, generator=torch.Generator().manual_seed(5))
    obs_t = {k: torch.from_numpy(v) for k, v in obs.items()}
    a1 = policy.predict_action_chunk(obs_t, sampler="ddim", steps=5, noise=noise)
    a2 = policy.predict_action_chunk(obs, sampler="ddim", steps=5, noise=noise)
    torch.testing.assert_close(a1, a2)


def test_predict_returns_horizon_slice():
    policy = lowdim_policy(n_obs_steps=3, horizon=12, n_action_steps=5)
    noise = torch.randn(1, 12, 2, generator=torch.Generator().manual_seed(0))
    seen = {}
    from rtdp.core import samplers

    original = samplers.SAMPLERS["ddim"]

    def recording(den, x, sigmas, **kw):
        seen["x"] = original(den, x, sigmas, **kw)
        return seen["x"]

    samplers.SAMPLERS["record"] = recording
    samplers.SIGMA_SCHEDULES["record"] = samplers.SIGMA_SCHEDULES["ddim"]
    try:
        actions = policy.predict_action_chunk(lowdim_obs(steps=3), sampler="record", steps=4, noise=noise)
    finally:
        del samplers.SAMPLERS["record"], samplers.SIGMA_SCHEDULES["record"]
    expected = policy.normalizer.unnormalize("action", seen["x"][:, 2:7])
    torch.testing.assert_close(actions, expected)


def test_predict_image_policy_shapes():
    policy = image_policy().eval()
    rng = np.random.default_rng(0)
    obs = {
        "agent_pos": rng.uniform(0, 512, (2, 2, 2)).astype(np.float32),
        "image": rng.integers(0, 256, (2, 2, 32, 32, 3), dtype=np.uint8),
    }
    actions = policy.predict_action_chunk(obs, sampler="ddim", steps=3)
    assert actions.shape == (2, 4, 2)
    assert policy.last_nfe == 3
    # Float images in 0..255 are accepted and equal uint8 ones.
    noise = torch.randn(2, 8, 2, generator=torch.Generator().manual_seed(1))
    a_uint8 = policy.predict_action_chunk(obs, sampler="ddim", steps=3, noise=noise)
    float_obs = {**obs, "image": obs["image"].astype(np.float32)}
    a_float = policy.predict_action_chunk(float_obs, sampler="ddim", steps=3, noise=noise)
    torch.testing.assert_close(a_uint8, a_float)
    policy.train()
    loss = policy.compute_loss({"obs": obs, "action": rng.uniform(0, 1, (2, 8, 2))})
    loss.backward()
    assert policy.image_encoders[0].backbone.stem[0].weight.grad is not None


def test_save_load_gives_identical_actions(tmp_path):
    policy = lowdim_policy().eval()
    obs = lowdim_obs(batch=2)
    noise = torch.randn(2, 8, 2, generator=torch.Generator().manual_seed(3))
    kw = dict(sampler="ddpm", steps=20, noise=noise)
    before = policy.predict_action_chunk(obs, **kw, generator=torch.Generator().manual_seed(4))
    policy.save_pretrained(tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert meta["schema_version"] == SCHEMA_VERSION and meta["config"]["down_dims"] == [16, 32]
    loaded = DiffusionUnetPolicy.from_pretrained(tmp_path / "ckpt")
    after = loaded.predict_action_chunk(obs, **kw, generator=torch.Generator().manual_seed(4))
    assert torch.equal(before, after)
    assert loaded.config == policy.config


def test_checkpoint_errors(tmp_path):
    policy = lowdim_policy()
    ckpt = policy.save_pretrained(tmp_path / "ckpt")
    cfg_file = ckpt / "config.json"
    meta = json.loads(cfg_file.read_text())

    cfg_file.write_text(json.dumps({**meta, "schema_version": 7}))
    with pytest.raises(CheckpointError, match="checkpoint schema_version 7, this rtdp reads 1, 2; re-train or convert"):
        DiffusionUnetPolicy.from_pretrained(ckpt)

    # Config and weights disagree: a clear CheckpointError, not a torch RuntimeError.
    cfg_file.write_text(json.dumps({**meta, "config": {**meta["config"], "down_dims": [16, 64]}}))
    with pytest.raises(CheckpointError, match="does not match"):
        DiffusionUnetPolicy.from_pretrained(ckpt)

    cfg_file.write_text(json.dumps({**meta, "config": {**meta["config"], "sampler": "nope"}}))
    with pytest.raises(CheckpointError, match="invalid config"):
        DiffusionUnetPolicy.from_pretrained(ckpt)

    cfg_file.write_text(json.dumps(meta))
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        DiffusionUnetPolicy.from_pretrained(ckpt)
    cfg_file.unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        DiffusionUnetPolicy.from_pretrained(ckpt)
    with pytest.raises(CheckpointError, match="does not exist"):
        DiffusionUnetPolicy.from_pretrained(tmp_path / "nowhere")


def test_observation_errors():
    policy = lowdim_policy().eval()
    obs = lowdim_obs()
    msg = r"observation 'keypoint' must have shape \(1, 2, 3, 2\).*got \(1, 2, 6\)"
    with pytest.raises(ObservationError, match=msg):
        policy.predict_action_chunk({**obs, "keypoint": obs["keypoint"].reshape(1, 2, 6)}, steps=2)
    with pytest.raises(ObservationError, match=r"observation 'agent_pos' must have shape \(B, 2, 2\).*got \(1, 3, 2\)"):
        policy.predict_action_chunk({**obs, "agent_pos": np.zeros((1, 3, 2))}, steps=2)
    with pytest.raises(ObservationError, match="'keypoint' is missing"):
        policy.predict_action_chunk({"agent_pos": obs["agent_pos"]}, steps=2)
    bad = obs["agent_pos"].copy()
    bad[0, 1, 0] = np.nan
    with pytest.raises(ObservationError, match="'agent_pos' contains NaN/Inf"):
        policy.predict_action_chunk({**obs, "agent_pos": bad}, steps=2)
    with pytest.raises(UnknownNameError, match="unknown sampler 'nosuch'"):
        policy.predict_action_chunk(obs, sampler="nosuch")
    with pytest.raises(ConfigError, match="steps must be an int in 1..100"):
        policy.predict_action_chunk(obs, steps=0)
    with pytest.raises(ConfigError, match="noise must have shape"):
        policy.predict_action_chunk(obs, steps=2, noise=torch.zeros(1, 4, 2))


def test_reset_keeps_nothing_between_chunks():
    """The U-Net policy holds no per-episode state: after reset it answers exactly as before and as a copy
    that never ran."""
    import copy

    policy = lowdim_policy().eval()
    never_ran = copy.deepcopy(policy)
    obs = lowdim_obs(seed=3)

    def seeded() -> torch.Generator:  # DDPM draws noise at every step, all of it from this generator
        return torch.Generator().manual_seed(1)

    with torch.no_grad():
        before = policy.predict_action_chunk(obs, sampler="ddpm", steps=3, generator=seeded())
        policy.predict_action_chunk(lowdim_obs(seed=4), steps=3)  # an unrelated call in between
        weights = {k: v.clone() for k, v in policy.state_dict().items()}
        policy.reset()
        after = policy.predict_action_chunk(obs, sampler="ddpm", steps=3, generator=seeded())
        fresh = never_ran.predict_action_chunk(obs, sampler="ddpm", steps=3, generator=seeded())
    assert torch.equal(after, before) and torch.equal(after, fresh)
    assert all(torch.equal(v, policy.state_dict()[k]) for k, v in weights.items())
