"""Training: resume continues bit for bit; checkpoints load; bad data is a typed error."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from rtdp.cli import compose
from rtdp.data.replay_buffer import ReplayBuffer
from rtdp.errors import CheckpointError, ConfigError, MissingKeyError
from rtdp.workflows.train import action_error, ema_decay, lr_at, train

TINY = ["steps=6", "checkpoint_every=3", "batch_size=8", "policy.down_dims=[8,16]", "eval_episodes=0", "threads=1",
        "warmup_steps=2"]


def _store(path, keys=("state", "keypoint", "action"), episodes=3, length=24):
    """A Diffusion-Policy-layout PushT store: agent_pos comes from state[:, :2]."""
    rng = np.random.default_rng(0)
    buf = ReplayBuffer.create(path)
    shapes = {"state": (5,), "keypoint": (9, 2), "action": (2,)}
    for _ in range(episodes):
        buf.add_episode({k: rng.uniform(0, 512, (length, *shapes[k])).astype(np.float32) for k in keys})
    return path


def test_lr_and_ema_schedules() -> None:
    assert lr_at(0, 1.0, 10, 100) == pytest.approx(0.1)
    assert lr_at(10, 1.0, 10, 100) == pytest.approx(1.0)
    assert lr_at(100, 1.0, 10, 100) == pytest.approx(0.0, abs=1e-12)
    assert ema_decay(0) == 0.0 and 0.0 < ema_decay(10) < ema_decay(1000) <= 0.9999


def test_resume_continues_bit_for_bit(tmp_path, monkeypatch) -> None:
    store = _store(tmp_path / "d.zarr")
    train(compose("train", [f"data={store}", f"out={tmp_path / 'a'}", *TINY]))

    # the same run, killed after its first checkpoint, then resumed
    from rtdp.policies.diffusion_unet import DiffusionUnetPolicy

    real = DiffusionUnetPolicy.compute_loss
    calls = {"n": 0}

    def crash_after_four(self, batch):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(self, batch)

    monkeypatch.setattr(DiffusionUnetPolicy, "compute_loss", crash_after_four)
    with pytest.raises(KeyboardInterrupt):
        train(compose("train", [f"data={store}", f"out={tmp_path / 'b'}", *TINY]))
    monkeypatch.setattr(DiffusionUnetPolicy, "compute_loss", real)
    assert json.loads((tmp_path / "b/train_state/state.json").read_text())["step"] == 3
    train(compose("train", [f"data={store}", f"out={tmp_path / 'b'}", *TINY, "resume=true"]))

    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(str(tmp_path / "a/train_state" / name))
        b = load_file(str(tmp_path / "b/train_state" / name))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}:{k} differs after resume"
    assert (tmp_path / "a/curves.png").stat().st_size > 0


def test_second_run_into_same_folder_needs_resume(tmp_path) -> None:
    store = _store(tmp_path / "d.zarr")
    cfg = compose("train", [f"data={store}", f"out={tmp_path / 'a'}", *TINY])
    train(cfg)
    with pytest.raises(ConfigError, match="resume=true"):
        train(cfg)


def _record_saved_policies(monkeypatch, cls) -> list:
    """Every policy object ``cls.save_pretrained`` is called on during a run, in order (the in-memory EMA)."""
    saved = []
    real = cls.save_pretrained

    def recording(self, directory):
        saved.append(self)
        return real(self, directory)

    monkeypatch.setattr(cls, "save_pretrained", recording)
    return saved


def test_checkpoint_reloads_with_the_actions_of_the_in_memory_ema_policy(tmp_path, monkeypatch) -> None:
    from rtdp.policies.diffusion_unet import DiffusionUnetPolicy
    from rtdp.workflows.eval import load_checkpoint

    store = _store(tmp_path / "d.zarr")
    saved = _record_saved_policies(monkeypatch, DiffusionUnetPolicy)
    train(compose("train", [f"data={store}", f"out={tmp_path / 'a'}", *TINY]))
    assert saved, "training wrote its checkpoint without save_pretrained"
    ema = saved[-1]  # the EMA policy object as training left it (last checkpoint, at the final step)
    policy, meta = load_checkpoint(tmp_path / "a/checkpoint")
    assert policy is not ema and meta["task"] == "pusht" and meta["n_episodes"] == 3 and meta["train_steps"] == 6
    rng = np.random.default_rng(1)
    obs = {"keypoint": rng.uniform(0, 512, (1, 2, 9, 2)).astype(np.float32),
           "agent_pos": rng.uniform(0, 512, (1, 2, 2)).astype(np.float32)}
    noise = torch.randn(1, 16, 2, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a = policy.predict_action_chunk(obs, sampler="ddim", steps=5, noise=noise)
        b = ema.eval().predict_action_chunk(obs, sampler="ddim", steps=5, noise=noise)
    assert a.shape == (1, 8, 2)
    assert torch.equal(a, b)
    reloaded, in_memory = policy.state_dict(), ema.state_dict()
    assert reloaded.keys() == in_memory.keys()
    for k in in_memory:
        assert torch.equal(reloaded[k], in_memory[k]), k
    # the checkpoint holds the averaged weights, not the last optimiser step's
    raw = load_file(str(tmp_path / "a/train_state/model.safetensors"))
    assert any(not torch.equal(raw[k], in_memory[k]) for k in raw if raw[k].is_floating_point())


def test_dataset_missing_a_key_the_policy_needs(tmp_path) -> None:
    store = _store(tmp_path / "d.zarr", keys=("state", "action"))
    with pytest.raises(MissingKeyError, match="keypoint"):
        train(compose("train", [f"data={store}", f"out={tmp_path / 'a'}", *TINY]))


def test_resume_without_a_run_is_a_checkpoint_error(tmp_path) -> None:
    store = _store(tmp_path / "d.zarr")
    (tmp_path / "a/train_state").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="state.json"):
        train(compose("train", [f"data={store}", f"out={tmp_path / 'a'}", *TINY, "resume=true"]))


def test_action_error_logged_at_checkpoints_in_normalised_units(tmp_path) -> None:
    from rtdp.data.dataset import SequenceDataset, load_arrays
    from rtdp.policies.runner import Runner
    from rtdp.workflows.eval import load_checkpoint

    store = _store(tmp_path / "d.zarr")
    summary = train(compose("train", [f"data={store}", f"out={tmp_path / 'a'}", *TINY, "action_error_windows=5"]))
    log = json.loads((tmp_path / "a/train_state/state.json").read_text())["log"]
    errors = {r["step"]: r["action_mse"] for r in log if "action_mse" in r}
    assert sorted(errors) == [3, 6]  # one per checkpoint
    assert summary["action_mse"] == errors[6]

    # The same error from the saved EMA weights, with the action range computed here from the raw store.
    policy, _ = load_checkpoint(tmp_path / "a/checkpoint")
    buffer = ReplayBuffer.open(store, mode="r")
    arrays = load_arrays(buffer, ["keypoint", "agent_pos", "action"], {"agent_pos": ("state", 0, 2)})
    dataset = SequenceDataset(arrays, np.asarray(buffer.episode_ends), obs_keys=["keypoint", "agent_pos"],
                              horizon=16, n_obs_steps=2, n_action_steps=8)
    batch = dataset.sample_batch(np.arange(4))
    pred = Runner(policy, seed=0).predict(batch["obs"]).numpy()
    lo, hi = arrays["action"].min(0), arrays["action"].max(0)
    unit = lambda a: 2 * (a - lo) / (hi - lo) - 1  # noqa: E731 - Diffusion Policy's "limits" normalisation
    expected = np.mean((unit(pred) - unit(batch["action"][:, 1:9].numpy())) ** 2)
    assert action_error(policy, batch) == pytest.approx(expected, rel=1e-5)
    assert expected > 0

    # the closing evaluation checkpoints again at the last step: the error is still logged once per step
    overrides = [o for o in TINY if not o.startswith("eval_episodes")]
    train(compose("train", [f"data={store}", f"out={tmp_path / 'c'}", *overrides, "eval_every=6", "eval_episodes=1",
                            "eval_sampler=ddim", "eval_steps=2", "action_error_windows=5"]))
    log = json.loads((tmp_path / "c/train_state/state.json").read_text())["log"]
    assert [r["step"] for r in log if "action_mse" in r] == [3, 6]
    assert [r["step"] for r in log if "eval_score" in r] == [6]

    # 0 turns it off
    summary = train(compose("train", [f"data={store}", f"out={tmp_path / 'b'}", *TINY, "action_error_windows=0"]))
    log = json.loads((tmp_path / "b/train_state/state.json").read_text())["log"]
    assert "action_mse" not in summary and not any("action_mse" in r for r in log)


def test_bad_betas_are_a_config_error(tmp_path) -> None:
    store = _store(tmp_path / "d.zarr")
    with pytest.raises(ConfigError, match="betas must be two numbers"):
        train(compose("train", [f"data={store}", f"out={tmp_path / 'a'}", *TINY, "betas=[0.9,1.5]"]))
    assert not (tmp_path / "a/train_state").exists()  # nothing written before the check


def test_anchor_obs_list_concatenates_rounds_and_rejects_mismatched_windows(tmp_path) -> None:
    from rtdp.errors import DatasetError
    from rtdp.workflows.train import load_anchor_obs

    rng = np.random.default_rng(0)
    r1 = {"agent_pos": rng.normal(size=(3, 2, 2)), "keypoint": rng.normal(size=(3, 2, 9, 2))}
    r2 = {"agent_pos": rng.normal(size=(5, 2, 2)), "keypoint": rng.normal(size=(5, 2, 9, 2))}
    np.savez(tmp_path / "r1.npz", **r1)
    np.savez(tmp_path / "r2.npz", **r2)
    both = load_anchor_obs([tmp_path / "r1.npz", str(tmp_path / "r2.npz")], ["agent_pos", "keypoint"])
    for k in r1:
        assert np.array_equal(both[k], np.concatenate([r1[k], r2[k]]))
    assert np.array_equal(load_anchor_obs(tmp_path / "r2.npz", ["agent_pos"])["agent_pos"], r2["agent_pos"])
    np.savez(tmp_path / "r3.npz", agent_pos=rng.normal(size=(4, 3, 2)), keypoint=rng.normal(size=(4, 3, 9, 2)))
    with pytest.raises(DatasetError, match="agent_pos windows are"):
        load_anchor_obs([tmp_path / "r1.npz", tmp_path / "r3.npz"], ["agent_pos", "keypoint"])
    with pytest.raises(DatasetError, match="names no recording"):
        load_anchor_obs([], ["agent_pos"])


def test_dagger_round_trains_the_student_at_its_own_recorded_observations(tmp_path, monkeypatch) -> None:
    """rtdp eval record_obs= -> rtdp train policy=consistency policy.init= anchor_obs=: the windows reach the loss."""
    from rtdp.errors import DatasetError
    from rtdp.policies.consistency import ConsistencyUnetPolicy
    from rtdp.workflows.eval import evaluate

    store = _store(tmp_path / "d.zarr")
    tiny = [t for t in TINY if not t.startswith("policy.")]
    train(compose("train", [f"data={store}", f"out={tmp_path / 'edm'}", "policy=edm", "policy.down_dims=[8,16]",
                            *tiny]))
    teacher = f"policy.teacher={tmp_path / 'edm/checkpoint'}"
    train(compose("train", [f"data={store}", f"out={tmp_path / 'cm'}", "policy=consistency", teacher, *tiny]))
    # the student's own closed-loop windows, on seeds away from the evaluation seeds
    rec = tmp_path / "obs.npz"
    report = evaluate(tmp_path / "cm/checkpoint", episodes=2, first_seed=7000, record_obs=rec, video=False,
                      latency_calls=1, threads=1, out=tmp_path / "ev")
    assert report["sampler"] == "cm" and [e["seed"] for e in report["per_episode"]] == [7000, 7001]
    windows = np.load(rec)
    n = sum(-(-e["length"] // 8) for e in report["per_episode"])  # one window per 8 executed actions
    assert report["recorded_obs"]["windows"] == n
    assert windows["keypoint"].shape == (n, 2, 9, 2) and windows["agent_pos"].shape == (n, 2, 2)
    # the first window of an episode is its reset observation, repeated To times
    assert np.array_equal(windows["agent_pos"][0, 0], windows["agent_pos"][0, 1])

    seen = []
    real = ConsistencyUnetPolicy.compute_loss

    def recording(self, batch, **kw):
        seen.append(batch.get("anchor_obs"))
        return real(self, batch, **kw)

    monkeypatch.setattr(ConsistencyUnetPolicy, "compute_loss", recording)
    out = tmp_path / "cm_dagger"
    train(compose("train", [f"data={store}", f"out={out}", "policy=consistency", teacher,
                            f"policy.init={tmp_path / 'cm/checkpoint'}", f"anchor_obs={rec}", *tiny]))
    assert len(seen) == 6
    recorded = {tuple(row.ravel()) for row in windows["agent_pos"]}
    for anchor in seen:
        assert anchor["agent_pos"].shape == (8, 2, 2)  # batch_size windows per step
        assert all(tuple(row.ravel()) in recorded for row in anchor["agent_pos"])
    assert json.loads((out / "summary.json").read_text())["anchor_windows"] == n
    # policy.init starts from the earlier student, not from the teacher
    monkeypatch.setattr(ConsistencyUnetPolicy, "compute_loss", real)
    from rtdp.workflows.train import build_policy
    student = build_policy(None, compose("train", [f"data={store}", f"out={tmp_path / 'u'}", "policy=consistency",
                                                   teacher, f"policy.init={tmp_path / 'cm/checkpoint'}"]).policy, {}, {})
    ref = load_file(str(tmp_path / "cm/checkpoint/model.safetensors"))
    for k, v in student.state_dict().items():
        assert torch.equal(v, ref[k]), k

    with pytest.raises(ConfigError, match="anchor_obs gives a distilled student"):
        train(compose("train", [f"data={store}", f"out={tmp_path / 'x'}", f"anchor_obs={rec}", *TINY]))
    with pytest.raises(DatasetError, match="does not exist"):
        train(compose("train", [f"data={store}", f"out={tmp_path / 'y'}", "policy=consistency", teacher,
                                f"anchor_obs={tmp_path / 'none.npz'}", *tiny]))
    with pytest.raises(ConfigError, match="policy.init must be a policy=consistency checkpoint"):
        train(compose("train", [f"data={store}", f"out={tmp_path / 'z'}", "policy=consistency", teacher,
                                f"policy.init={tmp_path / 'edm/checkpoint'}", *tiny]))
