"""SequenceDataset against a loop-by-loop reference of Diffusion Policy's SequenceSampler."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import dp_pusht_store
import torch

from rtdp.data import dataset as dataset_module
from rtdp.data.dataset import SequenceDataset, compute_stats, load_arrays, sequence_index, train_val_split
from rtdp.errors import ConfigError, DatasetError, MissingKeyError

PUSHT = dp_pusht_store()  # None when the dataset is absent


def reference_windows(ends, horizon, pad_before, pad_after):
    """Diffusion Policy's create_indices + sample_sequence, written as plain loops.

    Yields, per window, the absolute step read at each of its ``horizon`` positions.
    """
    start = 0
    for end in ends:
        length = end - start
        for idx in range(-pad_before, length - horizon + pad_after + 1):
            buf_start = max(idx, 0) + start
            buf_end = min(idx + horizon, length) + start
            sample_start = buf_start - (idx + start)
            sample_end = horizon - ((idx + horizon + start) - buf_end)
            steps = [None] * horizon
            for j in range(sample_start, sample_end):
                steps[j] = buf_start + (j - sample_start)
            for j in range(sample_start):  # pad by repeating the first step read
                steps[j] = buf_start
            for j in range(sample_end, horizon):  # and the last
                steps[j] = buf_end - 1
            yield steps
        start = end


def _episodes(lengths, seed=0):
    rng = np.random.default_rng(seed)
    ends = np.cumsum(lengths).astype(np.int64)
    n = int(ends[-1])
    episode_id = np.repeat(np.arange(len(lengths)), lengths)
    arrays = {
        # column 0 is the step number, column 1 the episode: windows are checkable by value
        "agent_pos": np.stack([np.arange(n), episode_id], axis=1).astype(np.float64),
        "image": rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8),
        "keypoint": rng.standard_normal((n, 9, 2)).astype(np.float32),
        "action": rng.standard_normal((n, 2)).astype(np.float32),
    }
    return arrays, ends


@pytest.mark.parametrize(
    "lengths,horizon,n_obs,n_act",
    [
        ([30, 17, 40], 16, 2, 8),   # Diffusion Policy's PushT setting
        ([5, 1, 12, 3], 16, 2, 8),  # episodes shorter than the horizon
        ([9, 9], 10, 1, 1),         # no padding
        ([7, 20, 2], 4, 4, 4),      # obs fill the window
        ([1, 1, 1], 3, 2, 2),
    ],
)
def test_windows_match_diffusion_policys_sampler(lengths, horizon, n_obs, n_act) -> None:
    arrays, ends = _episodes(lengths)
    ds = SequenceDataset(arrays, ends, ["agent_pos", "image", "keypoint"], horizon=horizon,
                         n_obs_steps=n_obs, n_action_steps=n_act)
    ref = list(reference_windows(ends.tolist(), horizon, n_obs - 1, n_act - 1))
    expected_len = sum(max(0, n - horizon + (n_obs - 1) + (n_act - 1) + 1) for n in lengths)
    assert len(ds) == len(ref) == expected_len
    for i, steps in enumerate(ref):
        item = ds[i]
        np.testing.assert_array_equal(item["action"], arrays["action"][steps])
        for key in ("agent_pos", "image", "keypoint"):
            np.testing.assert_array_equal(item["obs"][key], arrays[key][steps[:n_obs]].astype(item["obs"][key].dtype))
    batch = ds.sample_batch(np.arange(len(ds)))
    for i, steps in enumerate(ref):
        np.testing.assert_array_equal(batch["action"][i].numpy(), arrays["action"][steps])
        np.testing.assert_array_equal(batch["obs"]["image"][i].numpy(), arrays["image"][steps[:n_obs]])


def test_padding_repeats_the_edge_steps_and_windows_stay_in_their_episode() -> None:
    arrays, ends = _episodes([30, 25, 40])
    ds = SequenceDataset(arrays, ends, ["agent_pos"], action_key="agent_pos", horizon=16, n_obs_steps=2,
                         n_action_steps=8)
    batch = ds.sample_batch(np.arange(len(ds)))["action"].numpy()  # agent_pos as the target: (step, episode)
    step, episode = batch[..., 0], batch[..., 1]
    assert (episode == episode[:, :1]).all()  # never crosses an episode boundary
    starts = np.concatenate([[0], ends[:-1]])
    for e, (s, t) in enumerate(zip(starts, ends)):
        rows = step[episode[:, 0] == e]
        assert rows.min() == s and rows.max() == t - 1
        first, last = rows[0], rows[-1]
        # the first window starts pad_before=1 step early: the first step twice
        np.testing.assert_array_equal(first[:3], [s, s, s + 1])
        # the last window runs pad_after=7 steps past the end: the last step 8 times
        np.testing.assert_array_equal(last[-8:], [t - 1] * 8)
        assert last[-9] == t - 2
        # consecutive steps inside, no gaps
        assert (np.diff(rows, axis=1) >= 0).all() and (np.diff(rows, axis=1) <= 1).all()


def test_item_and_batch_types() -> None:
    arrays, ends = _episodes([20, 20])
    ds = SequenceDataset(arrays, ends, ["agent_pos", "image"], horizon=16, n_obs_steps=2, n_action_steps=8)
    item = ds[-1]
    assert item["obs"]["agent_pos"].dtype == np.float32 and item["obs"]["agent_pos"].shape == (2, 2)
    assert item["obs"]["image"].dtype == np.uint8 and item["obs"]["image"].shape == (2, 4, 4, 3)
    assert item["action"].dtype == np.float32 and item["action"].shape == (16, 2)
    batch = ds.sample_batch(torch.tensor([0, 3, 5]))
    assert batch["obs"]["agent_pos"].dtype == torch.float32 and batch["obs"]["agent_pos"].shape == (3, 2, 2)
    assert batch["obs"]["image"].dtype == torch.uint8 and batch["obs"]["image"].shape == (3, 2, 4, 4, 3)
    assert batch["action"].shape == (3, 16, 2)
    with pytest.raises(IndexError):
        ds[len(ds)]
    with pytest.raises(IndexError):
        ds.sample_batch([0, len(ds)])
    assert len(list(iter(ds))) == len(ds)


def test_episode_mask_keeps_only_chosen_episodes() -> None:
    arrays, ends = _episodes([20, 30, 25])
    mask = np.array([False, True, False])
    ds = SequenceDataset(arrays, ends, ["agent_pos"], episode_mask=mask)
    assert len(ds) == 30 - 16 + 1 + 7 + 1
    assert (ds.sample_batch(np.arange(len(ds)))["obs"]["agent_pos"][..., 1] == 1).all()
    with pytest.raises(DatasetError, match="episode_mask"):
        SequenceDataset(arrays, ends, ["agent_pos"], episode_mask=mask[:2])


def test_bad_configuration_is_a_typed_error() -> None:
    arrays, ends = _episodes([20])
    with pytest.raises(ConfigError, match="n_obs_steps"):
        SequenceDataset(arrays, ends, ["agent_pos"], horizon=4, n_obs_steps=5)
    with pytest.raises(ConfigError, match="n_action_steps"):
        SequenceDataset(arrays, ends, ["agent_pos"], horizon=4, n_action_steps=0)
    with pytest.raises(ConfigError, match="list"):
        SequenceDataset(arrays, ends, "agent_pos")
    with pytest.raises(MissingKeyError, match="'object'.*agent_pos"):
        SequenceDataset(arrays, ends, ["object"])
    with pytest.raises(DatasetError, match="only 20 steps"):
        SequenceDataset(arrays, np.array([10, 25]), ["agent_pos"])
    with pytest.raises(DatasetError, match="non-decreasing"):
        SequenceDataset(arrays, np.array([10, 5]), ["agent_pos"])


def test_sequence_index_counts_follow_diffusion_policys_formula() -> None:
    ends = np.array([5, 5, 40, 41])  # includes an empty and a one-step episode
    table = sequence_index(ends, horizon=16, pad_before=1, pad_after=7)
    # max(0, L - horizon + pad_before + pad_after + 1) per episode: 0, 0, 28, 0
    assert table.shape == (28, 3)
    np.testing.assert_array_equal(table[0], [5, 39, 4])
    np.testing.assert_array_equal(table[-1], [5, 39, 5 + 35 - 16 + 7])


# ---------------------------------------------------------------------------- loading from a replay buffer


@pytest.fixture
def pusht_like_buffer(tmp_path: Path):
    pytest.importorskip("zarr")
    from rtdp.data.replay_buffer import ReplayBuffer

    buf = ReplayBuffer.create(tmp_path / "b.zarr")
    rng = np.random.default_rng(0)
    for length in (12, 20):
        buf.add_episode({
            "state": rng.uniform(0, 512, (length, 5)).astype(np.float32),
            "keypoint": rng.uniform(0, 512, (length, 9, 2)).astype(np.float32),
            "action": rng.uniform(0, 512, (length, 2)).astype(np.float32),
        })
    return ReplayBuffer.open(tmp_path / "b.zarr")


def test_load_arrays_builds_aliases(pusht_like_buffer) -> None:
    buf = pusht_like_buffer
    out = load_arrays(buf, ["keypoint", "agent_pos", "action"], {"agent_pos": ("state", 0, 2)})
    state = buf.get_array("state")
    np.testing.assert_array_equal(out["agent_pos"], state[:, 0:2])
    assert out["agent_pos"].flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(out["keypoint"], buf.get_array("keypoint"))
    # a stored key wins over its alias
    assert load_arrays(buf, ["state"], {"state": ("action", 0, 1)})["state"].shape == (32, 5)


def test_load_arrays_missing_key_names_the_key_the_keys_present_and_the_alias(pusht_like_buffer) -> None:
    buf = pusht_like_buffer
    with pytest.raises(MissingKeyError, match=r"'object'.*\['action', 'keypoint', 'state'\]"):
        load_arrays(buf, ["object"], {"agent_pos": ("state", 0, 2)})
    with pytest.raises(MissingKeyError, match=r"'agent_pos'.*obs\[:, 0:2\].*'obs'") as info:
        load_arrays(buf, ["agent_pos"], {"agent_pos": ("obs", 0, 2)})
    assert "keypoint" in str(info.value)
    with pytest.raises(DatasetError, match="does not fit"):
        load_arrays(buf, ["agent_pos"], {"agent_pos": ("state", 3, 9)})


def test_from_buffer(pusht_like_buffer) -> None:
    ds = SequenceDataset.from_buffer(pusht_like_buffer, ["agent_pos", "keypoint"],
                                     aliases={"agent_pos": ("state", 0, 2)}, horizon=8, n_obs_steps=2,
                                     n_action_steps=4)
    assert len(ds) == (12 - 8 + 4 + 1) + (20 - 8 + 4 + 1)
    assert ds.sample_batch([0])["obs"]["keypoint"].shape == (1, 2, 9, 2)


@pytest.mark.skipif(PUSHT is None, reason="Diffusion Policy's PushT data is not in ../shared/data")
def test_pusht_dataset_length_matches_diffusion_policy() -> None:
    from rtdp.data.replay_buffer import ReplayBuffer

    buf = ReplayBuffer.open(PUSHT)
    arrays = load_arrays(buf, ["keypoint", "agent_pos", "action"], {"agent_pos": ("state", 0, 2)})
    ds = SequenceDataset(arrays, buf.episode_ends, ["keypoint", "agent_pos"])
    assert len(ds) == int(np.sum(np.maximum(0, buf.episode_lengths - 16 + 1 + 7 + 1)))
    stats = compute_stats(arrays, ["keypoint", "agent_pos", "action"])
    assert stats["keypoint"]["min"].shape == (9, 2) and stats["agent_pos"]["max"].shape == (2,)
    assert (stats["action"]["min"] >= 0).all() and (stats["action"]["max"] <= 512).all()


# ---------------------------------------------------------------------------- statistics and splits


def test_compute_stats_matches_numpy(monkeypatch) -> None:
    arrays, _ = _episodes([50, 70, 33])
    arrays["keypoint"] = arrays["keypoint"] * 100 + 3e4  # large offset: a naive sum of squares loses digits
    monkeypatch.setattr(dataset_module, "_STATS_BLOCK_BYTES", 8 * 18 * 7)  # blocks of 7 steps
    stats = compute_stats(arrays, ["keypoint", "image"])
    for key in ("keypoint", "image"):
        x = arrays[key].astype(np.float64)
        got = stats[key]
        assert got["mean"].shape == x.shape[1:] and got["mean"].dtype == np.float32
        np.testing.assert_array_equal(got["min"], x.min(0).astype(np.float32))
        np.testing.assert_array_equal(got["max"], x.max(0).astype(np.float32))
        np.testing.assert_allclose(got["mean"], x.mean(0), rtol=1e-6)
        np.testing.assert_allclose(got["std"], x.std(0), rtol=1e-5)
    assert set(compute_stats(arrays)) == set(arrays)
    with pytest.raises(MissingKeyError):
        compute_stats(arrays, ["object"])
    with pytest.raises(DatasetError, match="no steps"):
        compute_stats({"a": np.zeros((0, 2))})


def test_train_val_split_follows_diffusion_policys_rule() -> None:
    ends = np.cumsum(np.full(206, 10))
    train, val = train_val_split(ends, 0.02, seed=42)
    assert val.sum() == round(206 * 0.02) and (train ^ val).all()
    # the same draw as Diffusion Policy's get_val_mask for the same seed
    expected = np.zeros(206, dtype=bool)
    expected[np.random.default_rng(seed=42).choice(206, size=4, replace=False)] = True
    np.testing.assert_array_equal(val, expected)
    np.testing.assert_array_equal(train_val_split(ends, 0.02, seed=42)[1], val)
    assert not np.array_equal(train_val_split(ends, 0.02, seed=1)[1], val)
    assert train_val_split(ends, 0.0, seed=0)[1].sum() == 0
    assert train_val_split(ends[:3], 0.001, seed=0)[1].sum() == 1  # at least one held out
    assert train_val_split(ends[:3], 0.9, seed=0)[0].sum() == 1  # at least one kept
    with pytest.raises(ConfigError):
        train_val_split(ends, 1.0, seed=0)
