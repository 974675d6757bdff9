"""Block-wise adaptive caching: the scheduler against brute force, the Bubbling Union on a hand-made
case, the recorder's similarities against a hand computation, and the cache's exactness on a policy."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from rtdp.core.bac import (
    BacCalibration,
    Block,
    FeatureRecorder,
    adaptive_steps,
    bubbling_union,
    caching_error,
    schedule_score,
    uniform_steps,
)
from rtdp.core.cache import CachedNetwork
from rtdp.errors import ConfigError
from rtdp.policies.runner import Runner
from rtdp.policies.transformer import TransformerDiffusionConfig, TransformerDiffusionPolicy


def _random_similarity(k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    f = rng.normal(size=(k, 5)).cumsum(axis=0)  # a drifting feature, like a denoising trajectory
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    return f @ f.T


def _brute_force(sim: np.ndarray, budget: int) -> float:
    k = sim.shape[0]
    return max(schedule_score(sim, (0, *rest)) for rest in itertools.combinations(range(1, k), budget - 1))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("budget", [1, 2, 3, 5])
def test_scheduler_is_optimal_against_brute_force(seed, budget):
    sim = _random_similarity(9, seed)
    steps = adaptive_steps(sim, budget)
    assert steps[0] == 0 and len(steps) == budget == len(set(steps)) and steps == sorted(steps)
    assert schedule_score(sim, steps) == pytest.approx(_brute_force(sim, budget), abs=1e-12)


def test_scheduler_finds_the_phase_change_of_a_hand_made_matrix():
    # steps 0-3 look alike, steps 4-5 look alike, the two phases do not: two updates go to 0 and 4
    sim = np.full((6, 6), 0.1)
    sim[:4, :4] = 0.95
    sim[4:, 4:] = 0.95
    np.fill_diagonal(sim, 1.0)
    assert adaptive_steps(sim, 2) == [0, 4]
    assert schedule_score(sim, [0, 4]) == pytest.approx(2 * 1.0 + 4 * 0.95)
    assert caching_error(sim, [0, 4]) == pytest.approx(1 - (2 + 3.8) / 6)
    assert caching_error(sim, range(6)) == pytest.approx(0.0)
    assert uniform_steps(6, 2) == [0, 3]  # what uniform caching would do instead
    with pytest.raises(ConfigError, match="budget"):
        adaptive_steps(sim, 7)
    with pytest.raises(ConfigError, match="step 0"):
        schedule_score(sim, [1, 3])


def test_bubbling_union_adds_exactly_the_ffn_steps_at_the_same_or_deeper_layers():
    blocks = [Block(f"blocks.{i}.{k}", k, i) for i in range(3) for k in ("self_attn", "cross_attn", "ffn")]
    own = {b.name: {0} for b in blocks}
    own["blocks.0.ffn"] = {0, 5}
    own["blocks.1.ffn"] = {0, 7}
    own["blocks.2.ffn"] = {0, 9}
    own["blocks.1.self_attn"] = {0, 2}
    errors = {b.name: 0.01 for b in blocks}
    errors["blocks.1.cross_attn"] = 0.5   # the most volatile: gets the FFN steps of layers 1 and 2
    errors["blocks.0.ffn"] = 0.4          # next: the FFNs of layers 1 and 2, not its own
    out = bubbling_union(own, blocks, errors, top_k=2)
    assert out["blocks.1.cross_attn"] == {0, 7, 9}
    assert out["blocks.0.ffn"] == {0, 5, 7, 9}
    changed = {n for n in out if out[n] != own[n]}
    assert changed == {"blocks.1.cross_attn", "blocks.0.ffn"}
    assert bubbling_union(own, blocks, errors, top_k=0) == own


class _Emit(nn.Module):
    """Returns the next of a fixed list of features at each call (a block with a known trajectory)."""

    def __init__(self, feats):
        super().__init__()
        self.feats, self.i = feats, 0

    def forward(self, x):
        out = self.feats[self.i % len(self.feats)]
        self.i += 1
        return out


def test_recorder_similarity_matches_a_hand_computation():
    feats = [torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]]), torch.tensor([[0.0, 2.0]])]
    net = nn.Sequential(_Emit(feats))
    with FeatureRecorder(net, ["0"]) as rec:
        for _ in range(2):  # two chunks of three calls
            for _ in range(3):
                net(torch.zeros(1))
            rec.end_chunk()
    sim = rec.similarity()["0"]
    c = 1 / np.sqrt(2)
    np.testing.assert_allclose(sim, [[1, c, 0], [c, 1, c], [0, c, 1]], atol=1e-12)
    assert rec.chunks == 2 and rec.samples == 2
    assert not net[0]._forward_hooks  # closed: the hooks are gone


def _policy(n_layer: int = 2) -> TransformerDiffusionPolicy:
    torch.manual_seed(0)
    policy = TransformerDiffusionPolicy(TransformerDiffusionConfig(
        lowdim_shapes={"s": (3,)}, action_dim=2, n_layer=n_layer, n_emb=16, n_head=2, p_drop_attn=0.0)).eval()
    policy.set_normalizer({"s": {"min": -np.ones(3), "max": np.ones(3)},
                           "action": {"min": -np.ones(2), "max": np.ones(2)}})
    return policy


def _calibration(policy, k: int, seed: int = 0) -> BacCalibration:
    blocks = policy.model.cache_blocks()
    return BacCalibration(f"ddim-{k}", blocks, {b.name: _random_similarity(k, seed + i) for i, b in enumerate(blocks)})


def _act(runner, obs):
    runner.generator.manual_seed(0)
    noise = torch.randn(1, 16, 2, generator=torch.Generator().manual_seed(5))
    return runner.predict(obs, noise=noise)


def test_cache_is_exact_when_every_step_updates_and_skips_otherwise():
    policy = _policy()
    obs = {"s": torch.rand(1, 2, 3, generator=torch.Generator().manual_seed(1)).numpy()}
    plain = _act(Runner(policy, "ddim", 8), obs)
    cal = _calibration(policy, 8)
    for cache in ("bac8", "uniform8"):  # a budget of every call: bit-identical
        assert torch.equal(_act(Runner(policy, "ddim", 8, cache=cache, calibration=cal), obs), plain)
    cached = Runner(policy, "ddim", 8, cache="uniform2", calibration=cal)
    out = _act(cached, obs)
    assert not torch.equal(out, plain)
    net = cached.policy.model
    assert isinstance(net, CachedNetwork)
    assert {w.calls for w in net.wrapped.values()} == {2}  # steps 0 and 4 of 8, every block
    _act(cached, obs)  # the cache restarts per chunk: again twice each, not reusing the last chunk
    assert {w.calls for w in net.wrapped.values()} == {4}
    bac = Runner(policy, "ddim", 8, cache="bac3", calibration=cal)
    _act(bac, obs)
    schedule = cal.schedule(3)
    assert {n: w.calls for n, w in bac.policy.model.wrapped.items()} == {n: len(s) for n, s in schedule.items()}
    assert all(len(s) >= 3 for s in schedule.values())  # its own 3, plus any union


def test_cached_sub_blocks_replay_what_they_stored_and_skip_their_norms():
    # Reference: the plain network with forward hooks that replay each sub-block's output from its last
    # update step, a second implementation of the cache; the cached one must agree with it exactly.
    policy = _policy()
    obs = {"s": torch.rand(1, 2, 3, generator=torch.Generator().manual_seed(1)).numpy()}
    cal = _calibration(policy, 8)
    schedule = cal.schedule(3)
    step, store, handles = [-1], {}, []

    def replay(name):
        def hook(module, args, out):
            if step[0] in schedule[name] or step[0] == 0:
                store[name] = out
                return out
            return store[name]
        return hook

    for name, module in policy.model.named_modules():
        if name in schedule:
            handles.append(module.register_forward_hook(replay(name)))
    handles.append(policy.model.register_forward_pre_hook(lambda m, a: step.__setitem__(0, step[0] + 1)))
    reference = _act(Runner(policy, "ddim", 8), obs)
    for h in handles:
        h.remove()
    cached = Runner(policy, "ddim", 8, cache="bac3", calibration=cal)
    net = cached.policy.model
    norm_calls = {}
    for i, block in enumerate(net.net.blocks):
        for kind, norm in zip(("self_attn", "cross_attn", "ffn"), (block.norm1, block.norm2, block.norm3)):
            norm.register_forward_hook(lambda m, a, o, key=f"blocks.{i}.{kind}": norm_calls.update(
                {key: norm_calls.get(key, 0) + 1}))
    assert torch.equal(_act(cached, obs), reference)
    # each sub-block's norm runs exactly at that sub-block's update steps
    assert norm_calls == {n: w.calls for n, w in net.wrapped.items()}
    assert norm_calls == {n: len(s | {0}) for n, s in schedule.items()}


def test_cache_options_fail_clearly():
    policy = _policy()
    cal = _calibration(policy, 8)
    with pytest.raises(ConfigError, match="needs the BAC calibration"):
        Runner(policy, "ddim", 8, cache="bac4")
    with pytest.raises(ConfigError, match="calibration is for ddim-8"):
        Runner(policy, "ddim", 10, cache="bac4", calibration=cal)
    with pytest.raises(ConfigError, match="only 8 calls"):
        Runner(policy, "ddim", 8, cache="uniform9")
    with pytest.raises(ConfigError, match="bac<M> or uniform<M>"):
        Runner(policy, "ddim", 8, cache="bac")
    from rtdp.policies.diffusion_unet import DiffusionUnetConfig, DiffusionUnetPolicy

    unet = DiffusionUnetPolicy(DiffusionUnetConfig(lowdim_shapes={"s": (3,)}, action_dim=2, down_dims=[8, 16]))
    with pytest.raises(ConfigError, match="deepcache"):
        Runner(unet, "ddim", 8, cache="uniform2")


def test_calibration_round_trips_and_rejects_a_broken_file(tmp_path):
    policy = _policy()
    cal = _calibration(policy, 6)
    path = cal.save(tmp_path / "bac_ddim-6.json")
    again = BacCalibration.load(path)
    assert again.setting == "ddim-6" and again.blocks == cal.blocks
    assert again.schedule(3) == cal.schedule(3)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not a BAC calibration"):
        BacCalibration.load(path)


def test_calibration_from_rollouts_feeds_bench(tmp_path):
    # a tiny transformer checkpoint on PushT: calibrate by rollout, save it in the cache, bench it cached
    from rtdp.workflows.bench import bench
    from rtdp.workflows.calibrate import calibration_path

    from rtdp.cli import compose
    from rtdp.workflows.train import train
    from tests.test_transformer import _store

    store = _store(tmp_path / "d.zarr")
    train(compose("train", [f"data={store}", f"out={tmp_path / 'run'}", "policy=transformer", "policy.n_layer=2",
                            "policy.n_emb=16", "policy.n_head=2", "steps=2", "batch_size=4", "eval_episodes=0",
                            "threads=1", "warmup_steps=1"]))
    ck = tmp_path / "run/checkpoint"
    cache = tmp_path / "calibration"
    rep = bench(checkpoints=[str(ck)], size=None, task_name="pusht", configs=["ddim-4", "ddim-4+bac2", "ddim-4+uniform2"],
                episodes=0, calls=2, warmup=1, threads=1, mse_observations=2, progress=False, calibration_dir=cache)
    path = calibration_path(ck, "ddim", 4, cache)
    assert path.parent.parent == cache and not list(ck.glob("bac_*.json"))  # made in the cache, not beside the checkpoint
    cal = BacCalibration.load(path)
    assert cal.setting == "ddim-4" and cal.n_steps == 4 and cal.chunks >= 1
    for s in cal.similarity.values():
        np.testing.assert_allclose(np.diag(s), 1.0, atol=1e-9)  # a feature is itself
        assert np.all(s <= 1 + 1e-9)
    rows = {r["name"]: r for r in rep["configs"]}
    assert rows["ddim-4+bac2"]["cache"] == "bac2" and rows["ddim-4+bac2"]["action_mse_vs_plain"] > 0
    assert rows["ddim-4+uniform2"]["action_mse_vs_plain"] > 0


def test_bench_names_bac_and_uniform_configurations():
    from rtdp.workflows.bench import parse_config

    assert parse_config("ddpm-100+bac").options == {"cache": "bac10"}  # DESIGN.md's name, default budget
    assert parse_config("ddpm-100+bac20+int8dyn").options == {"cache": "bac20", "precision": "int8dyn"}
    assert parse_config("ddpm-100+uniform5").options == {"cache": "uniform5"}
    with pytest.raises(ConfigError, match="at most one"):
        parse_config("ddpm-100+bac5+uniform5")


def test_bench_reports_the_updates_a_cached_block_makes():
    from rtdp.workflows.bench import _mean_updates

    policy = _policy()
    cal = _calibration(policy, 8)
    net = Runner(policy, "ddim", 8, cache="uniform2", calibration=cal).policy.model
    assert _mean_updates(net, 8) == 2.0
    bac = Runner(policy, "ddim", 8, cache="bac3", calibration=cal).policy.model
    assert _mean_updates(bac, 8) == np.mean([len(s) for s in cal.schedule(3).values()])
    assert _mean_updates(policy.model, 8) is None


def test_a_shipped_calibration_is_read_beside_the_checkpoint_and_a_new_one_goes_to_the_cache(tmp_path):
    from rtdp.workflows.calibrate import calibration_path

    ck = tmp_path / "run" / "checkpoint"
    ck.mkdir(parents=True)
    (ck / "model.safetensors").write_bytes(b"weights one")
    made = calibration_path(ck, "ddpm", 100, tmp_path / "cache")
    assert made.parent.parent == tmp_path / "cache" and made.parent.name.startswith("run-")
    (ck / "model.safetensors").write_bytes(b"weights two")
    assert calibration_path(ck, "ddpm", 100, tmp_path / "cache") != made  # retrained weights never reuse it
    (ck / "bac_ddpm-100.json").write_text("{}")
    assert calibration_path(ck, "ddpm", 100, tmp_path / "cache") == ck / "bac_ddpm-100.json"
