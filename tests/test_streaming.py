"""Streaming Diffusion Policy: the buffer ladder, shift and re-noising on known sequences."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rtdp.errors import ConfigError
from rtdp.policies.edm_unet import EdmUnetConfig, EdmUnetPolicy, ladder_levels, ladder_rungs
from rtdp.policies.streaming import StreamingPolicy, StreamState, init_state, make_ladder, shift_state, stream_step

H, TO, DA = 16, 2, 2


def _config(**kw) -> EdmUnetConfig:
    base = dict(lowdim_shapes={"s": (3,)}, action_dim=DA, n_obs_steps=TO, horizon=H, n_action_steps=8,
                down_dims=(8, 16), n_groups=4, diffusion_step_embed_dim=8, stream_action_steps=5)
    base.update(kw)
    return EdmUnetConfig(**base)


class RecordingDenoiser:
    """Returns a fixed clean sequence; records every (x, sigma) it was called with."""

    def __init__(self, target: torch.Tensor) -> None:
        self.target = target
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, x, sigma, cond=None):
        self.calls.append((x.clone(), sigma.clone()))
        return self.target.expand_as(x).clone()


def test_ladder_geometry():
    cfg = _config()
    # Position p holds step p - (To - 1); 15 future positions in rungs of 5, the past action in rung 0.
    assert ladder_rungs(cfg).tolist() == [0] * 6 + [1] * 5 + [2] * 5
    levels = ladder_levels(cfg, 2)
    assert levels.shape == (3 * 2 + 1,) and levels[0] == 0
    assert torch.all(levels[1:] > levels[:-1])
    assert levels[-1] == pytest.approx(cfg.sigma_max) and levels[1] == pytest.approx(cfg.sigma_min)


def test_shift_and_renoise_on_a_known_sequence():
    cfg = _config()
    ladder = make_ladder(cfg, 1, dtype=torch.float64)
    seq = torch.arange(H, dtype=torch.float64).reshape(1, H, 1).expand(1, H, DA).clone()
    levels = ladder.levels
    # State right after an observation's denoising: rung r at level index r (rung 0 clean).
    index = ladder_rungs(cfg).unsqueeze(0).clone()
    state = StreamState(seq.clone(), index)
    noise = torch.randn(1, H, DA, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    new = shift_state(state, ladder, noise)
    s = cfg.stream_action_steps
    ready = ladder.ready_index()
    # Every position lands at its ready level (what the network was trained on).
    assert new.level_index[0].tolist() == ready.tolist()
    expected = torch.empty_like(seq)
    for p in range(H):
        old = p + s
        if old < H:
            lvl_before = levels[index[0, old]]
            add = torch.sqrt(levels[ready[p]] ** 2 - lvl_before**2)
            expected[0, p] = seq[0, old] + add * noise[0, p]
        else:
            expected[0, p] = levels[-1] * noise[0, p]  # fresh positions: pure noise at the top level
    torch.testing.assert_close(new.buffer, expected, rtol=0, atol=1e-12)
    # The re-noising is written back: the clean past action (old position 5) now carries rung 0's level ...
    assert not torch.equal(new.buffer[0, 0], seq[0, s])
    # ... while positions that arrive at their ready level keep their values exactly.
    torch.testing.assert_close(new.buffer[0, 1:H - s], seq[0, 1 + s:], rtol=0, atol=0)


def test_stream_step_denoises_first_rung_and_continues_from_the_written_back_buffer():
    cfg = _config()
    ladder = make_ladder(cfg, 1, dtype=torch.float64)
    target = torch.linspace(-1, 1, H, dtype=torch.float64).reshape(1, H, 1).expand(1, H, DA)
    den = RecordingDenoiser(target)
    gen = torch.Generator().manual_seed(1)
    state = init_state(torch.randn(1, H, DA, generator=gen, dtype=torch.float64), ladder)
    fresh = torch.randn(1, H, DA, generator=gen, dtype=torch.float64)
    actions, state2 = stream_step(den, state, ladder, None, fresh)
    # First observation: (n_rungs - 1) evaluations to build the ladder, then one per observation.
    assert len(den.calls) == cfg.n_rungs - 1 + 1
    torch.testing.assert_close(actions, target[:, TO - 1 : TO - 1 + 5])
    fresh2 = torch.randn(1, H, DA, generator=gen, dtype=torch.float64)
    den.calls.clear()
    stream_step(den, state2, ladder, None, fresh2)
    assert len(den.calls) == 1
    # The network sees exactly the buffer the previous observation wrote back, at the ladder's levels.
    x_seen, sigma_seen = den.calls[0]
    torch.testing.assert_close(x_seen, state2.buffer, rtol=0, atol=0)
    torch.testing.assert_close(sigma_seen[0], ladder.levels[ladder.ready_index()], rtol=0, atol=0)


@pytest.mark.parametrize("steps_per_obs", [1, 2, 3])
def test_streaming_nfe_counted_by_network_calls(steps_per_obs):
    cfg = _config()
    policy = EdmUnetPolicy(cfg).eval()
    policy.set_normalizer({"s": {"min": np.zeros(3), "max": np.ones(3)}, "action": {"min": -np.ones(2), "max": np.ones(2)}})
    calls = []
    inner = policy.model.forward

    def counting(*args, **kwargs):
        calls.append(args[1].shape)
        return inner(*args, **kwargs)

    policy.model.forward = counting
    stream = StreamingPolicy(policy, steps_per_obs)
    obs = {"s": torch.rand(2, TO, 3)}
    gen = torch.Generator().manual_seed(0)
    stream.predict_action_chunk(obs, generator=gen)
    first = len(calls)
    assert first == (cfg.n_rungs - 1) * steps_per_obs + steps_per_obs
    for _ in range(3):
        calls.clear()
        out = stream.predict_action_chunk(obs, generator=gen)
        assert len(calls) == steps_per_obs == stream.last_nfe
        assert out.shape == (2, cfg.stream_action_steps, DA)
    # The network received one noise level per position.
    assert all(shape == (2, H) for shape in calls)


def test_per_position_noise_levels_reach_the_network():
    # Changing one position's noise level changes the output at that position (and the
    # FiLM conditioning there), so per-position levels are not collapsed to one value.
    torch.manual_seed(0)
    cfg = _config()
    policy = EdmUnetPolicy(cfg).eval()
    den = policy._denoiser()
    x = torch.randn(1, H, DA)
    cond = torch.randn(1, policy.model.global_cond_dim)
    sigma = torch.full((1, H), 0.5)
    base = den(x, sigma, cond)
    moved = sigma.clone()
    moved[0, 12] = 3.0
    out = den(x, moved, cond)
    assert (out - base)[0, 12].abs().max() > 1e-3
    # A level per trajectory equals the same level at every position.
    torch.testing.assert_close(den(x, torch.full((1,), 0.5), cond), base, rtol=1e-5, atol=1e-5)
    # ... and the network's raw output differs between a ladder and its mean level.
    ladder = torch.linspace(0.05, 5.0, H).reshape(1, H)
    collapsed = ladder.mean().expand(1, H)
    assert (den.network(x, ladder, cond) - den.network(x, collapsed, cond)).abs().max() > 1e-3


def test_streaming_errors():
    cfg = _config()
    policy = EdmUnetPolicy(cfg).eval()
    policy.set_normalizer({"s": {"min": np.zeros(3), "max": np.ones(3)}, "action": {"min": -np.ones(2), "max": np.ones(2)}})
    stream = StreamingPolicy(policy, 1)
    with pytest.raises(ConfigError, match=r"streaming buffer must have shape \(B, 16, 2\)"):
        stream.set_state(StreamState(torch.zeros(1, 12, 2), torch.zeros(1, 12, dtype=torch.long)))
    with pytest.raises(ConfigError, match="steps per observation must be an int >= 1"):
        StreamingPolicy(policy, 0)
    with pytest.raises(ConfigError, match="stream_action_steps must divide"):
        _config(stream_action_steps=4)
    no_ladder = EdmUnetPolicy(_config(ladder_prob=0.0))
    with pytest.raises(ConfigError, match="trained without the streaming noise ladder"):
        StreamingPolicy(no_ladder, 1)
    stream.predict_action_chunk({"s": torch.rand(2, TO, 3)})
    with pytest.raises(ConfigError, match="streaming buffer holds 2 episodes"):
        stream.predict_action_chunk({"s": torch.rand(3, TO, 3)})
    # Rows let a subset of episodes continue.
    out = stream.predict_action_chunk({"s": torch.rand(1, TO, 3)}, rows=torch.tensor([1]))
    assert out.shape == (1, 5, 2)


def test_reset_starts_every_episode_afresh_like_a_new_stream():
    torch.manual_seed(0)
    policy = EdmUnetPolicy(_config()).eval()
    policy.set_normalizer({"s": {"min": np.zeros(3), "max": np.ones(3)}, "action": {"min": -np.ones(2), "max": np.ones(2)}})
    obs = {"s": torch.rand(2, TO, 3, generator=torch.Generator().manual_seed(1))}

    def seeded() -> torch.Generator:
        return torch.Generator().manual_seed(5)

    stream = StreamingPolicy(policy, 1)
    first = stream.predict_action_chunk(obs, generator=seeded())
    stream.predict_action_chunk(obs, generator=seeded())
    # without a reset the same seed continues from the old buffer and gives other actions
    assert not torch.equal(stream.predict_action_chunk(obs, generator=seeded()), first)
    stream.reset()
    assert stream.state is None
    again = stream.predict_action_chunk(obs, generator=seeded())
    fresh = StreamingPolicy(policy, 1).predict_action_chunk(obs, generator=seeded())
    assert torch.equal(again, first) and torch.equal(again, fresh)
    # a reset also lets a batch of another size start (without it: "buffer holds 2 episodes")
    stream.reset()
    assert stream.predict_action_chunk({"s": torch.rand(3, TO, 3)}).shape == (3, 5, DA)
