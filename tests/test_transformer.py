"""Diffusion Policy's transformer variant: masks, shapes, training, checkpoints, packed form."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from rtdp.cli import compose
from rtdp.core import bf16_supported, fast_network
from rtdp.errors import ConfigError
from rtdp.policies import load_policy
from rtdp.policies.transformer import TransformerDiffusionConfig, TransformerDiffusionPolicy, TransformerForDiffusion


def _net(**kw) -> TransformerForDiffusion:
    torch.manual_seed(0)
    args = dict(input_dim=2, horizon=10, n_obs_steps=3, obs_dim=6, n_layer=2, n_head=2, n_emb=16, p_drop_attn=0.0)
    args.update(kw)
    return TransformerForDiffusion(**args).eval()


def test_action_tokens_decode_causally():
    net = _net()
    x, g = torch.randn(1, 10, 2), torch.randn(1, 18)
    x2 = x.clone()
    x2[:, 6:] += 1.0  # change the future
    with torch.no_grad():
        a, b = net(x, 5, g), net(x2, 5, g)
    assert torch.allclose(a[:, :6], b[:, :6], atol=1e-6)
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_observation_tokens_are_seen_from_their_step_on():
    net = _net()
    x, g = torch.randn(1, 10, 2), torch.randn(1, 3, 6)
    g2 = g.clone()
    g2[:, 2] += 1.0  # the last observation (step 2) may only reach action tokens t >= 1
    with torch.no_grad():
        a, b = net(x, 5, g.flatten(1)), net(x, 5, g2.flatten(1))
    assert torch.allclose(a[:, :1], b[:, :1], atol=1e-6)
    assert not torch.allclose(a[:, 1:], b[:, 1:])
    # without the causal masks every token sees everything
    free = _net(causal_attn=False)
    with torch.no_grad():
        assert not torch.allclose(free(x, 5, g.flatten(1))[:, :1], free(x, 5, g2.flatten(1))[:, :1])


def test_timestep_conditions_the_output_and_bad_inputs_raise():
    net = _net()
    x, g = torch.randn(2, 10, 2), torch.randn(2, 18)
    with torch.no_grad():
        assert not torch.allclose(net(x, torch.tensor([1, 1]), g), net(x, torch.tensor([1, 90]), g))
    with pytest.raises(ConfigError, match="per position"):
        net(x, torch.zeros(2, 10), g)
    with pytest.raises(ConfigError, match="global_cond"):
        net(x, 3, torch.randn(2, 17))
    with pytest.raises(ConfigError, match="multiple of n_head"):
        TransformerDiffusionConfig(lowdim_shapes={"s": (3,)}, action_dim=2, n_emb=30, n_head=4)


def test_every_projection_packs_and_matches_in_fp32():
    net = _net(n_layer=3, n_emb=32, n_head=4)
    fast = fast_network(net, "fp32", rows_hint=10)
    assert fast.fast_skipped == []
    assert fast.fast_converted == sum(isinstance(m, nn.Linear) for m in net.modules())
    x, g = torch.randn(3, 10, 2), torch.randn(3, 18)
    with torch.no_grad():
        ref, out = net(x, torch.tensor([3, 40, 99]), g), fast(x, torch.tensor([3, 40, 99]), g)
    assert (out - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())
    if bf16_supported():
        q = fast_network(net, "int8")
        with torch.no_grad():
            rel = ((q(x, torch.tensor([3, 40, 99]), g) - ref).norm() / ref.norm()).item()
        assert 0 < rel < 0.05


def _store(path):
    from rtdp.data.replay_buffer import ReplayBuffer

    rng = np.random.default_rng(0)
    buf = ReplayBuffer.create(path)
    shapes = {"state": (5,), "keypoint": (9, 2), "action": (2,)}
    for _ in range(3):
        buf.add_episode({k: rng.uniform(0, 512, (24, *shapes[k])).astype(np.float32) for k in shapes})
    return path


def test_trains_from_the_cli_config_and_reloads_by_type(tmp_path, monkeypatch):
    from rtdp.workflows.train import train

    store = _store(tmp_path / "d.zarr")
    saved = []
    real = TransformerDiffusionPolicy.save_pretrained

    def recording(self, directory):
        saved.append(self)  # the in-memory EMA policy training checkpoints
        return real(self, directory)

    monkeypatch.setattr(TransformerDiffusionPolicy, "save_pretrained", recording)
    train(compose("train", [f"data={store}", f"out={tmp_path / 'run'}", "policy=transformer", "policy.n_layer=2",
                            "policy.n_emb=32", "steps=4", "checkpoint_every=2", "batch_size=8", "eval_episodes=0",
                            "threads=1", "warmup_steps=1"]))
    assert saved, "training wrote its checkpoint without save_pretrained"
    ema = saved[-1].eval()
    policy = load_policy(tmp_path / "run/checkpoint")
    assert isinstance(policy, TransformerDiffusionPolicy) and policy is not ema
    assert policy.config.n_layer == 2 and len(policy.model.blocks) == 2
    rng = np.random.default_rng(1)
    obs = {"keypoint": rng.uniform(0, 512, (1, 2, 9, 2)).astype(np.float32),
           "agent_pos": rng.uniform(0, 512, (1, 2, 2)).astype(np.float32)}
    noise = torch.randn(1, 16, 2, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a = policy.predict_action_chunk(obs, sampler="ddim", steps=4, noise=noise)
        b = ema.predict_action_chunk(obs, sampler="ddim", steps=4, noise=noise)
    assert a.shape == (1, 8, 2) and bool(torch.isfinite(a).all())
    assert torch.equal(a, b)  # the reloaded checkpoint acts as the EMA policy training ended with
    assert policy.last_nfe == 4
    reloaded, in_memory = policy.state_dict(), ema.state_dict()
    assert reloaded.keys() == in_memory.keys()
    assert all(torch.equal(reloaded[k], in_memory[k]) for k in in_memory)
    from safetensors.torch import load_file

    raw = load_file(str(tmp_path / "run/train_state/model.safetensors"))  # the last optimiser step's weights
    assert any(not torch.equal(raw[k], in_memory[k]) for k in raw if raw[k].is_floating_point())


def test_loss_backpropagates_to_every_parameter():
    policy = TransformerDiffusionPolicy(
        TransformerDiffusionConfig(lowdim_shapes={"s": (3,)}, action_dim=2, n_layer=1, n_emb=16, n_head=2)
    )
    policy.set_normalizer({"s": {"min": -np.ones(3), "max": np.ones(3)},
                           "action": {"min": -np.ones(2), "max": np.ones(2)}})
    batch = {"obs": {"s": torch.rand(4, 2, 3)}, "action": torch.rand(4, 16, 2)}
    loss = policy.compute_loss(batch, generator=torch.Generator().manual_seed(0))
    loss.backward()
    missing = [n for n, p in policy.model.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert not missing, missing
