"""The core's truncated, anchored start (+anchor<T>) on DDPM action policies trained from pure noise."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rtdp.core import nearest_centre, sigmas_truncated, vp_noise_to_start
from rtdp.core.options import parse_config
from rtdp.data.dataset import SequenceDataset
from rtdp.data.replay_buffer import ReplayBuffer
from rtdp.errors import ConfigError
from rtdp.policies import DiffusionUnetConfig, DiffusionUnetPolicy
from rtdp.policies.runner import Runner

H, TO, TA, DA = 8, 2, 4, 2
STATS = {
    "agent_pos": {"min": np.zeros(2), "max": np.full(2, 512.0)},
    "action": {"min": np.zeros(2), "max": np.full(2, 512.0)},
}


def tiny_policy(**overrides) -> DiffusionUnetPolicy:
    cfg = DiffusionUnetConfig(lowdim_shapes={"agent_pos": (2,)}, action_dim=DA, n_obs_steps=TO, horizon=H,
                              n_action_steps=TA, down_dims=(16, 32), n_groups=4, diffusion_step_embed_dim=16,
                              **overrides)
    torch.manual_seed(0)
    policy = DiffusionUnetPolicy(cfg).eval()
    policy.set_normalizer(STATS)
    return policy


def tiny_transformer():
    from rtdp.policies.transformer import TransformerDiffusionConfig, TransformerDiffusionPolicy

    torch.manual_seed(0)
    policy = TransformerDiffusionPolicy(TransformerDiffusionConfig(
        lowdim_shapes={"agent_pos": (2,)}, action_dim=DA, n_obs_steps=TO, horizon=H, n_action_steps=TA,
        n_layer=1, n_emb=16, n_head=2)).eval()
    policy.set_normalizer(STATS)
    return policy


def obs(batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    return {"agent_pos": np.random.default_rng(seed).uniform(0, 512, (batch, TO, 2)).astype(np.float32)}


def constant_anchors(levels=(-0.8, 0.0, 0.8)) -> torch.Tensor:
    """Anchors (K, H, DA) in normalised units: constant trajectories, far apart."""
    return torch.tensor(levels, dtype=torch.float32).reshape(-1, 1, 1).expand(-1, H, DA).clone()


def env_units(policy, normalised: torch.Tensor) -> torch.Tensor:
    return policy.normalizer.unnormalize("action", normalised)


# ---------------------------------------------------------------- names


def test_parse_anchor_option():
    assert parse_config("ddim-2+anchor30").options == {"anchor_step": 30}
    assert parse_config("ddim-1+anchor").options == {"anchor_step": 30}
    assert parse_config("ddim-2+anchor20+int8").options == {"anchor_step": 20, "precision": "int8"}
    for bad in ("ddim-2+anchorx", "ddim-2+anchor2.5"):
        with pytest.raises(ConfigError, match=r"unknown option .*\+anchor<T>"):
            parse_config(bad)
    with pytest.raises(ConfigError, match="at most once"):
        parse_config("ddim-2+anchor10+anchor20")


# ---------------------------------------------------------------- sampling


@pytest.mark.parametrize("make", [tiny_policy, tiny_transformer], ids=["unet", "transformer"])
@pytest.mark.parametrize("steps", [1, 2])
def test_nfe_is_one_estimate_plus_the_steps(steps, make):
    policy = make()
    runner = Runner(policy, "ddim", steps, anchors=env_units(policy, constant_anchors()), anchor_step=30)
    act = runner.predict(obs())
    assert act.shape == (2, TA, DA) and bool(torch.isfinite(act).all())
    assert runner.last_nfe == policy.last_nfe == 1 + steps
    assert runner.last_sample_nfe == 1 + steps


def test_anchored_sample_stays_near_the_anchor_nearest_the_estimate():
    policy = tiny_policy()
    anchors = constant_anchors()
    noise = torch.randn(2, H, DA, generator=torch.Generator().manual_seed(3))
    o = obs()
    # The estimate the policy picks its anchor by, computed here by hand.
    den = policy._denoiser("ddim")
    cond, _ = policy.conditioning(o)
    top = den.sigma_max
    x0_hat = den(vp_noise_to_start(noise, top), torch.full((2,), top), cond)
    chosen = anchors[nearest_centre(x0_hat, anchors)]

    def normalised(runner):
        return policy.normalizer.normalize("action", runner.predict(o, noise=noise, n_actions=H - TO + 1))

    # T = 1 (sigma 0.04): the anchor is noised only a little and 2 DDIM steps keep the sample beside it,
    # within a few sigma (the start's noise plus what the untrained network's noise estimate removes).
    sigma = float(sigmas_truncated(policy.alphas_cumprod, 1, 2)[0])
    anchored = normalised(Runner(policy, "ddim", 2, anchors=env_units(policy, anchors), anchor_step=1))
    dist = float((anchored - chosen[:, TO - 1:]).abs().max())
    assert dist < 6 * sigma, (dist, sigma)
    # From pure noise the same untrained network lands nowhere near any anchor.
    plain = normalised(Runner(policy, "ddim", 2))
    far = min(float((plain[b] - a[TO - 1:]).abs().max()) for a in anchors for b in range(2))
    assert far > 2 * dist and far > 6 * sigma, (far, dist, sigma)


def test_start_is_the_nearest_anchor_noised_to_step_t(monkeypatch):
    """A network that always predicts one trajectory: the estimate is that trajectory, the anchor nearest it
    is the one the truncated chain starts from, at training step T."""
    policy = tiny_policy(prediction_type="sample")
    anchors = constant_anchors((-0.6, -0.1, 0.3, 0.9))
    target = torch.full((1, H, DA), 0.25)  # nearest anchor: 0.3 (index 2)
    calls = []

    def fake(x_t, t, cond):
        calls.append((x_t.clone(), torch.as_tensor(t).clone()))
        return target.expand_as(x_t).clone()

    monkeypatch.setattr(policy.model, "forward", fake)
    t_start, steps = 5, 2
    out = policy.predict_action_chunk(obs(1), sampler="ddim", steps=steps, anchors=anchors, anchor_step=t_start,
                                      generator=torch.Generator().manual_seed(0))
    assert len(calls) == 1 + steps == policy.last_nfe
    assert calls[0][1].tolist() == [policy.config.num_train_timesteps - 1]  # the estimate: top of the schedule
    assert calls[1][1].tolist() == [t_start]
    sigma = float(sigmas_truncated(policy.alphas_cumprod, t_start, steps)[0])
    ac = policy.alphas_cumprod[t_start]
    start = calls[1][0] / ac.sqrt()  # back to the VE sample x = anchor + sigma * eps
    assert nearest_centre(start, anchors).tolist() == [2]
    assert float((start - anchors[2]).abs().max()) < 5 * sigma  # anchor + sigma(T) * eps
    assert 0.5 * sigma < float((start - anchors[2]).std()) < 2 * sigma
    torch.testing.assert_close(out, env_units(policy, target[:, TO - 1:TO - 1 + TA]))


def test_anchored_start_is_reproducible_per_seed():
    policy = tiny_policy()
    anchors = env_units(policy, constant_anchors())
    a = Runner(policy, "ddim", 2, seed=7, anchors=anchors, anchor_step=30).predict(obs())
    b = Runner(policy, "ddim", 2, seed=7, anchors=anchors, anchor_step=30).predict(obs())
    assert torch.equal(a, b)


# ---------------------------------------------------------------- anchors of a checkpoint


@pytest.fixture
def buffer(tmp_path):
    buf = ReplayBuffer.create(tmp_path / "demo.zarr")
    rng = np.random.default_rng(0)
    for length in (14, 20, 9):
        start = rng.uniform(50, 450, 2)
        steps = rng.normal(0, 8, (length, 2)).cumsum(0)
        buf.add_episode({
            "agent_pos": rng.uniform(0, 512, (length, 2)).astype(np.float32),
            "action": np.clip(start + steps, 0, 512).astype(np.float32),
        })
    return tmp_path / "demo.zarr"


def test_action_windows_are_the_training_windows(buffer):
    from rtdp.workflows.calibrate import _action_windows

    policy = tiny_policy()
    store = ReplayBuffer.open(buffer)
    data = store.load(["agent_pos", "action"])
    dataset = SequenceDataset(data, store.episode_ends, obs_keys=["agent_pos"], horizon=H, n_obs_steps=TO,
                              n_action_steps=TA)
    windows = _action_windows(policy, buffer)
    assert windows.shape == (len(dataset), H, DA)
    np.testing.assert_array_equal(windows, np.stack([dataset[i]["action"] for i in range(len(dataset))]))


def test_action_anchors_reproducible_and_cached(buffer, tmp_path, monkeypatch):
    import rtdp.core
    from rtdp.workflows import bench

    policy = tiny_policy()
    ckpt = policy.save_pretrained(tmp_path / "ckpt")
    real = rtdp.core.kmeans
    count = []

    def counting(*args, **kwargs):
        count.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(rtdp.core, "kmeans", counting)
    cache = tmp_path / "cal"
    first = bench.action_anchors(policy, buffer, k=4, seed=0, checkpoint=ckpt, cache=cache)
    again = bench.action_anchors(policy, buffer, k=4, seed=0, checkpoint=ckpt, cache=cache)
    assert len(count) == 1  # the second call read the cached file
    assert first.shape == (4, H, DA) and first.dtype == torch.float32
    assert torch.equal(first, again)
    assert len(list(cache.rglob("anchors_k4_seed0_*.safetensors"))) == 1
    # The same data and seed give the same anchors without the cache; other k / seed make new files.
    assert torch.equal(bench.action_anchors(policy, buffer, k=4, seed=0), first)
    bench.action_anchors(policy, buffer, k=3, seed=0, checkpoint=ckpt, cache=cache)
    bench.action_anchors(policy, buffer, k=4, seed=1, checkpoint=ckpt, cache=cache)
    assert len(count) == 4 and len(list(cache.rglob("anchors_*.safetensors"))) == 3
    # In env units, inside the range of the demonstrated actions.
    acts = ReplayBuffer.open(buffer).get_array("action")
    assert float(first.min()) >= acts.min() - 1e-3 and float(first.max()) <= acts.max() + 1e-3
    # Retrained weights are another key.
    with torch.no_grad():
        next(policy.model.parameters()).add_(1.0)
    policy.save_pretrained(ckpt)
    bench.action_anchors(policy, buffer, k=4, seed=0, checkpoint=ckpt, cache=cache)
    assert len(count) == 5


def test_bench_row_of_an_anchored_config(buffer):
    from rtdp.workflows import bench

    policy = tiny_policy()
    anchors = bench.action_anchors(policy, buffer, k=4, seed=0)
    o = obs(1)
    gen = torch.Generator().manual_seed(0)
    noise = [torch.randn(1, H, DA, generator=gen)]
    ref_runner = Runner(policy, "ddpm", 100, seed=0)
    reference = {"policy": policy, "noise": noise, "actions": [bench._normalised_actions(ref_runner, o, noise[0])]}
    cfg = parse_config("ddim-2+anchor30")
    cfg.options["anchors"] = anchors
    row = bench.bench_config(cfg, policy, None, calls=2, warmup=0, obs_list=[o], bandwidth_gbs=10.0, episodes=0,
                             batch=1, reference=reference, progress=False)
    assert row["nfe_per_chunk"] == 3 and row["anchor_step"] == 30 and row["n_anchors"] == 4
    assert row["action_mse"] is not None and np.isfinite(row["action_mse"])
    json.dumps(row)  # the anchors themselves never reach the report


# ---------------------------------------------------------------- typed errors


def test_anchor_option_errors():
    policy = tiny_policy()
    good = env_units(policy, constant_anchors())
    with pytest.raises(ConfigError, match=r"anchors must have shape \(K, 8, 2\).*got \(3, 6, 2\)"):
        Runner(policy, "ddim", 2, anchors=good[:, :6], anchor_step=30)
    with pytest.raises(ConfigError, match=r"anchors must have shape \(K, 8, 2\)"):
        policy.predict_action_chunk(obs(), sampler="ddim", steps=2, anchors=constant_anchors()[0], anchor_step=30)
    for t in (0, 100, -3):
        with pytest.raises(ConfigError, match=rf"anchor_step .* 1\.\.99 .*T={t}"):
            Runner(policy, "ddim", 2, anchors=good, anchor_step=t)
    with pytest.raises(ConfigError, match=r"1\.\.99.*T=100"):
        policy.predict_action_chunk(obs(), sampler="ddim", steps=2, anchors=constant_anchors(), anchor_step=100)
    with pytest.raises(ConfigError, match="steps <= 4"):
        Runner(policy, "ddim", 5, anchors=good, anchor_step=3)
    with pytest.raises(ConfigError, match="needs both anchors .* got only anchor_step"):
        Runner(policy, "ddim", 2, anchor_step=30)
    with pytest.raises(ConfigError, match="got only anchors"):
        policy.predict_action_chunk(obs(), sampler="ddim", steps=2, anchors=constant_anchors())
    with pytest.raises(ConfigError, match="inpainting"):
        Runner(policy, "ddim", 2, anchors=good, anchor_step=30).predict(
            obs(), inpaint=(np.zeros((2, 2, DA), np.float32), np.ones(2)))
    with pytest.raises(ConfigError, match="DeepCache"):
        Runner(policy, "ddim", 2, anchors=good, anchor_step=30, deepcache=2)
    with pytest.raises(ConfigError, match="unknown inference options"):
        Runner(policy, "ddim", 2, anchor=30)
    assert Runner(policy, "ddim", 2, anchors=None, anchor_step=None).options == {}  # off, as when left out
    # guidance still needs a goal
    with pytest.raises(ConfigError, match="goal"):
        Runner(policy, "ddim", 2, guidance_scale=1.0)


def test_anchors_refused_by_streaming_and_other_families():
    from rtdp.policies.edm_unet import EdmUnetConfig, EdmUnetPolicy

    cfg = EdmUnetConfig(lowdim_shapes={"agent_pos": (2,)}, action_dim=DA, n_obs_steps=TO, horizon=16,
                        n_action_steps=8, down_dims=(8, 16), n_groups=4, diffusion_step_embed_dim=8,
                        stream_action_steps=5)
    edm = EdmUnetPolicy(cfg)
    edm.set_normalizer(STATS)
    anchors = torch.zeros(3, 16, DA)
    with pytest.raises(ConfigError, match="per observation"):
        Runner(edm, "stream", 1, anchors=anchors, anchor_step=30)
    with pytest.raises(ConfigError, match="DDPM"):
        Runner(edm, "edm", 2, anchors=anchors, anchor_step=30)


def test_no_anchor_data_is_a_config_error(tmp_path):
    from rtdp.workflows.bench import anchor_data_path, bench

    policy = tiny_policy()
    ckpt = policy.save_pretrained(tmp_path / "ckpt")  # no meta.json: no recorded data
    with pytest.raises(ConfigError, match=r"anchor_data=PATH.*rtdp collect task=pusht"):
        bench(checkpoints=[str(ckpt)], size=None, task_name="pusht", configs=["ddim-2+anchor30"], progress=False,
              calibration_dir=tmp_path / "cal")
    (ckpt / "meta.json").write_text(json.dumps({"task": "pusht", "data": str(tmp_path / "gone.zarr")}))
    with pytest.raises(ConfigError, match=r"gone\.zarr, which does not exist here.*anchor_data=PATH"):
        anchor_data_path(None, json.loads((ckpt / "meta.json").read_text()), "pusht")
    with pytest.raises(ConfigError, match=r"anchor_data=.*missing\.zarr does not exist"):
        anchor_data_path(tmp_path / "missing.zarr", {}, "pusht")
    # T out of range is refused before any clustering
    with pytest.raises(ConfigError, match=r"1\.\.99.*T=150"):
        bench(checkpoints=[str(ckpt)], size=None, task_name="pusht", configs=["ddim-2+anchor150"], progress=False,
              calibration_dir=tmp_path / "cal")
    with pytest.raises(ConfigError, match="core sampler"):
        bench(checkpoints=[str(ckpt)], size=None, task_name="pusht", configs=["stream-1+anchor30"], progress=False,
              calibration_dir=tmp_path / "cal")


class _Stop(Exception):
    pass


def test_bench_makes_anchors_once_per_checkpoint_and_reuses_them(buffer, tmp_path, monkeypatch):
    """rtdp bench's preparation: anchors from the buffer meta.json names, one clustering for every anchored
    configuration, none on the second run (stopped before timing: only the preparation is under test)."""
    import rtdp.core
    from rtdp.workflows import bench as bench_mod
    from rtdp.workflows import calibrate

    policy = tiny_policy()
    ckpt = policy.save_pretrained(tmp_path / "run" / "checkpoint")
    (ckpt / "meta.json").write_text(json.dumps({"task": "pusht", "data": str(buffer)}))
    real, count, seen = rtdp.core.kmeans, [], []
    monkeypatch.setattr(rtdp.core, "kmeans", lambda *a, **kw: count.append(1) or real(*a, **kw))
    real_runner = Runner

    def recording_runner(p, sampler, steps, **options):
        seen.append(options)
        return real_runner(p, sampler, steps, **options)

    monkeypatch.setattr("rtdp.policies.runner.Runner", recording_runner)

    def stop(*args, **kwargs):
        raise _Stop

    monkeypatch.setattr(bench_mod, "_bench_obs", stop)
    for _ in range(2):
        with pytest.raises(_Stop):
            bench_mod.bench(checkpoints=[str(ckpt)], size=None, task_name=None, progress=False,
                            configs=["ddim-2", "ddim-2+anchor30", "ddim-1+anchor20"], calibration_dir=tmp_path / "cal")
    assert len(count) == 1
    anchored = [o for o in seen if "anchor_step" in o]
    assert [o["anchor_step"] for o in anchored] == [30, 20, 30, 20]
    assert all(tuple(o["anchors"].shape) == (calibrate.ANCHOR_K, H, DA) for o in anchored)
    assert all(torch.equal(o["anchors"], anchored[0]["anchors"]) for o in anchored)
    assert len(list((tmp_path / "cal").rglob("anchors_k20_seed0_*.safetensors"))) == 1
