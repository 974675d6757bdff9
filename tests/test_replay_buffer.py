"""Replay buffer: round trips, Diffusion Policy's zarr v2 stores, crash safety, corrupt stores."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import dp_pusht_store

zarr = pytest.importorskip("zarr")

from rtdp.data.replay_buffer import ReplayBuffer  # noqa: E402
from rtdp.errors import CorruptStoreError, DatasetError, MissingKeyError  # noqa: E402

PUSHT = dp_pusht_store()  # None when the dataset is absent
REPO = Path(__file__).resolve().parents[1]


def make_episode(i: int) -> dict[str, np.ndarray]:
    """Deterministic episode ``i``; the crash test's writer process uses it too."""
    length = 3 + (i * 7) % 23
    rng = np.random.default_rng(i)
    return {
        "obs": np.arange(length * 4, dtype=np.float32).reshape(length, 4) + np.float32(1000 * i),
        "img": rng.integers(0, 256, size=(length, 6, 5, 3), dtype=np.uint8),
        "action": rng.standard_normal((length, 2)),
    }


def _filled(path: Path, n: int, chunk_steps: int = 8) -> ReplayBuffer:
    buf = ReplayBuffer.create(path, chunk_steps=chunk_steps)
    for i in range(n):
        buf.add_episode(make_episode(i))
    return buf


def _assert_episodes_exact(buf: ReplayBuffer, n: int) -> None:
    assert buf.n_episodes == n
    for i in range(n):
        got, want = buf.get_episode(i), make_episode(i)
        assert sorted(got) == sorted(want)
        for k in want:
            assert got[k].dtype == want[k].dtype
            np.testing.assert_array_equal(got[k], want[k])


def _snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------- round trips


def test_round_trip_is_exact(tmp_path: Path) -> None:
    _filled(tmp_path / "b.zarr", 5)
    buf = ReplayBuffer.open(tmp_path / "b.zarr")
    lengths = [make_episode(i)["obs"].shape[0] for i in range(5)]
    assert buf.keys == ["action", "img", "obs"]
    assert buf.n_steps == sum(lengths)
    np.testing.assert_array_equal(buf.episode_lengths, lengths)
    np.testing.assert_array_equal(buf.episode_ends, np.cumsum(lengths))
    assert buf.episode_ends.dtype == np.int64
    _assert_episodes_exact(buf, 5)
    np.testing.assert_array_equal(buf.get_episode(-1)["obs"], make_episode(4)["obs"])
    whole = buf.load(["obs", "img"])
    np.testing.assert_array_equal(whole["obs"], np.concatenate([make_episode(i)["obs"] for i in range(5)]))
    np.testing.assert_array_equal(buf.get_array("img"), whole["img"])
    assert buf.step_shape("img") == (6, 5, 3) and buf.dtype("action") == np.float64
    assert "n_episodes=5" in repr(buf) and f"n_steps={buf.n_steps}" in repr(buf)
    with pytest.raises(IndexError):
        buf.get_episode(5)


def test_store_has_diffusion_policy_layout(tmp_path: Path) -> None:
    _filled(tmp_path / "b.zarr", 3)
    root = zarr.open_group(tmp_path / "b.zarr", mode="r")
    assert root.metadata.zarr_format == 3
    ends = root["meta/episode_ends"]
    assert ends.dtype == np.int64 and ends.shape == (3,)
    assert root["data/obs"].shape == (int(ends[-1]), 4)
    assert root["data/obs"].chunks == (8, 4)
    codec = root["data/img"].compressors[0]
    assert type(codec).__name__ == "BloscCodec" and codec.cname.value == "zstd"


def test_default_chunks_are_a_few_hundred_steps(tmp_path: Path) -> None:
    buf = ReplayBuffer.create(tmp_path / "b.zarr")
    buf.add_episode({"state": np.zeros((3, 5), np.float32), "img": np.zeros((3, 96, 96, 3), np.float32)})
    root = zarr.open_group(tmp_path / "b.zarr", mode="r")
    assert root["data/state"].chunks == (256, 5)
    assert 16 <= root["data/img"].chunks[0] <= 256


def test_empty_buffer(tmp_path: Path) -> None:
    ReplayBuffer.create(tmp_path / "b.zarr")
    buf = ReplayBuffer.open(tmp_path / "b.zarr")
    assert (buf.n_episodes, buf.n_steps, buf.keys) == (0, 0, [])
    assert buf.episode_ends.shape == (0,)


def test_create_refuses_an_existing_path(tmp_path: Path) -> None:
    _filled(tmp_path / "b.zarr", 1)
    with pytest.raises(DatasetError, match="already there"):
        ReplayBuffer.create(tmp_path / "b.zarr")
    assert ReplayBuffer.create(tmp_path / "b.zarr", overwrite=True).n_episodes == 0
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(DatasetError, match="not a zarr store"):
        ReplayBuffer.create(other, overwrite=True)
    assert (other / "keep.txt").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    assert ReplayBuffer.create(tmp_path / "empty").n_episodes == 0


@pytest.mark.parametrize(
    "change,error",
    [
        (lambda e: e.pop("img"), MissingKeyError),
        (lambda e: e.update(extra=np.zeros(len(e["obs"]))), DatasetError),
        (lambda e: e.update(obs=np.zeros((len(e["obs"]), 5), np.float32)), DatasetError),
        (lambda e: e.update(obs=e["obs"].astype(np.float64)), DatasetError),
        (lambda e: e.update(action=e["action"][:-1]), DatasetError),
        (lambda e: e.update({k: v[:0] for k, v in e.items()}), DatasetError),
        (lambda e: e.update(obs=np.float32(1.0)), DatasetError),
        (lambda e: e.update(obs=np.array(["a"] * len(e["obs"]))), DatasetError),
    ],
    ids=["missing-key", "extra-key", "shape", "dtype", "length", "empty", "scalar", "strings"],
)
def test_mismatched_episode_writes_nothing(tmp_path: Path, change, error) -> None:
    buf = _filled(tmp_path / "b.zarr", 2)
    before = _snapshot(tmp_path / "b.zarr")
    episode = make_episode(2)
    change(episode)
    with pytest.raises(error):
        buf.add_episode(episode)
    assert _snapshot(tmp_path / "b.zarr") == before
    buf.add_episode(make_episode(2))
    _assert_episodes_exact(ReplayBuffer.open(tmp_path / "b.zarr"), 3)


def test_read_only_buffer_refuses_to_append(tmp_path: Path) -> None:
    _filled(tmp_path / "b.zarr", 1)
    with pytest.raises(DatasetError, match="read-only"):
        ReplayBuffer.open(tmp_path / "b.zarr").add_episode(make_episode(1))


def test_missing_key_lists_the_keys_present(tmp_path: Path) -> None:
    buf = _filled(tmp_path / "b.zarr", 1)
    with pytest.raises(MissingKeyError, match="agent_pos.*action, img, obs"):
        buf.get_array("agent_pos")
    with pytest.raises(MissingKeyError, match="agent_pos"):
        buf.load(["obs", "agent_pos"])


# ---------------------------------------------------------------------------- crash safety


def test_reader_ignores_trailing_data_and_append_trims_it(tmp_path: Path) -> None:
    path = tmp_path / "b.zarr"
    n_steps = _filled(path, 2).n_steps
    # what a writer killed mid-episode leaves: data arrays longer than the last end
    root = zarr.open_group(path, mode="r+")
    for key in ("obs", "img"):
        arr = root[f"data/{key}"]
        arr.resize((n_steps + 7, *arr.shape[1:]))
        arr[n_steps:] = 7
    buf = ReplayBuffer.open(path)
    assert buf.n_steps == n_steps and buf.get_array("obs").shape[0] == n_steps
    _assert_episodes_exact(buf, 2)
    buf = ReplayBuffer.open(path, mode="a")
    assert zarr.open_group(path, mode="r")["data/obs"].shape[0] == n_steps
    buf.add_episode(make_episode(2))
    _assert_episodes_exact(ReplayBuffer.open(path), 3)


class _Killed(BaseException):
    """Stands in for the process dying at a chosen point."""


def test_crash_before_the_episode_end_loses_only_that_episode(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "b.zarr"
    buf = _filled(path, 3)

    def die(self, end):
        raise _Killed

    monkeypatch.setattr(ReplayBuffer, "_commit_end", die)
    with pytest.raises(_Killed):
        buf.add_episode(make_episode(3))
    monkeypatch.undo()
    _assert_episodes_exact(ReplayBuffer.open(path), 3)
    buf = ReplayBuffer.open(path, mode="a")
    buf.add_episode(make_episode(3))
    _assert_episodes_exact(ReplayBuffer.open(path), 4)


def test_crash_between_end_chunk_and_end_shape(tmp_path: Path) -> None:
    # the end value is already in its chunk but the shape has not grown yet
    path = tmp_path / "b.zarr"
    buf = _filled(path, 3)

    class DieOnResize:
        def __init__(self, arr):
            self._arr = arr

        def __getattr__(self, name):
            return getattr(self._arr, name)

        def resize(self, shape):
            raise _Killed

    buf._ends_array = DieOnResize(buf._ends_array)
    with pytest.raises(_Killed):
        buf.add_episode(make_episode(3))
    _assert_episodes_exact(ReplayBuffer.open(path), 3)
    ReplayBuffer.open(path, mode="a").add_episode(make_episode(3))
    _assert_episodes_exact(ReplayBuffer.open(path), 4)


def test_crash_during_the_first_episode(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "b.zarr"
    buf = ReplayBuffer.create(path)
    monkeypatch.setattr(ReplayBuffer, "_commit_end", lambda self, end: (_ for _ in ()).throw(_Killed()))
    with pytest.raises(_Killed):
        buf.add_episode({"other": np.ones((4, 2))})
    monkeypatch.undo()
    assert ReplayBuffer.open(path).n_steps == 0
    buf = ReplayBuffer.open(path, mode="a")
    buf.add_episode(make_episode(0))  # different keys: the crashed first episode fixed nothing
    _assert_episodes_exact(ReplayBuffer.open(path), 1)


_WRITER = """
import sys
sys.path.insert(0, {tests!r})
from test_replay_buffer import make_episode
from rtdp.data.replay_buffer import ReplayBuffer
buf = ReplayBuffer.open({path!r}, mode="a")
i = buf.n_episodes
print("ready", flush=True)
while True:
    buf.add_episode(make_episode(i))
    i += 1
    print(i, flush=True)
"""


def test_sigkill_mid_write_keeps_every_committed_episode(tmp_path: Path) -> None:
    path = tmp_path / "b.zarr"
    _filled(path, 1, chunk_steps=16)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rng = random.Random(0)
    delays = [rng.uniform(0.05, 0.5) for _ in range(4)]
    for trial, delay in enumerate(delays):
        before = ReplayBuffer.open(path).n_episodes
        proc = subprocess.Popen(
            [sys.executable, "-c", _WRITER.format(tests=str(Path(__file__).parent), path=str(path))],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        try:
            assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        reported = [int(x) for x in proc.stdout.read().split()]
        acknowledged = reported[-1] if reported else before
        buf = ReplayBuffer.open(path)
        # every acknowledged episode is there; at most the one in flight got committed unacknowledged
        assert acknowledged <= buf.n_episodes <= acknowledged + 1, (trial, acknowledged, buf.n_episodes)
        assert buf.n_episodes > before or delay < 0.1
        _assert_episodes_exact(buf, buf.n_episodes)
        buf = ReplayBuffer.open(path, mode="a")
        n = buf.n_episodes
        buf.add_episode(make_episode(n))
        _assert_episodes_exact(ReplayBuffer.open(path), n + 1)
    assert not list(path.rglob("*.partial"))


# ---------------------------------------------------------------------------- Diffusion Policy's zarr v2 stores


def _dp_v2_store(path: Path) -> dict[str, np.ndarray]:
    from numcodecs import Blosc

    rng = np.random.default_rng(0)
    ends = np.array([23, 50, 61], dtype=np.int64)
    n = int(ends[-1])
    data = {
        "state": rng.uniform(0, 512, (n, 5)).astype(np.float32),
        "action": rng.uniform(0, 512, (n, 2)).astype(np.float32),
        "keypoint": rng.uniform(0, 512, (n, 9, 2)).astype(np.float32),
        "img": rng.integers(0, 256, (n, 96, 96, 3)).astype(np.float32),
    }
    blosc = Blosc(cname="zstd", clevel=5, shuffle=Blosc.BITSHUFFLE)
    root = zarr.open_group(path, mode="w", zarr_format=2)
    group = root.create_group("data")
    for key, value in data.items():
        arr = group.create_array(key, shape=value.shape, chunks=(20, *value.shape[1:]), dtype=value.dtype,
                                 compressors=blosc)
        arr[:] = value
    meta = root.create_group("meta")
    meta.create_array("episode_ends", shape=ends.shape, chunks=ends.shape, dtype=np.int64, compressors=blosc)[:] = ends
    return {**data, "episode_ends": ends}


def test_reads_a_diffusion_policy_zarr_v2_store(tmp_path: Path) -> None:
    path = tmp_path / "dp.zarr"
    want = _dp_v2_store(path)
    assert (path / ".zgroup").is_file() and (path / "data" / "img" / ".zarray").is_file()
    buf = ReplayBuffer.open(path)
    assert buf.zarr_format == 2
    assert buf.keys == ["action", "img", "keypoint", "state"]
    np.testing.assert_array_equal(buf.episode_ends, want["episode_ends"])
    for key in buf.keys:
        np.testing.assert_array_equal(buf.get_array(key), want[key])
    ep = buf.get_episode(1)
    np.testing.assert_array_equal(ep["keypoint"], want["keypoint"][23:50])
    assert ep["img"].shape == (27, 96, 96, 3) and ep["img"].dtype == np.float32


def test_appends_to_a_diffusion_policy_zarr_v2_store_in_its_format(tmp_path: Path) -> None:
    path = tmp_path / "dp.zarr"
    want = _dp_v2_store(path)
    buf = ReplayBuffer.open(path, mode="a")
    extra = {k: want[k][:4] + 1 for k in ("state", "action", "keypoint", "img")}
    buf.add_episode(extra)
    assert not (path / "zarr.json").exists()
    buf = ReplayBuffer.open(path)
    assert buf.n_episodes == 4 and buf.n_steps == 65
    for key, value in extra.items():
        np.testing.assert_array_equal(buf.get_episode(3)[key], value)
        np.testing.assert_array_equal(buf.get_array(key)[:61], want[key])


@pytest.mark.skipif(PUSHT is None, reason="Diffusion Policy's PushT data is not in ../shared/data")
def test_opens_diffusion_policys_pusht_dataset() -> None:
    buf = ReplayBuffer.open(PUSHT)
    assert (buf.n_episodes, buf.n_steps, buf.zarr_format) == (206, 25650, 2)
    assert buf.keys == ["action", "img", "keypoint", "n_contacts", "state"]
    assert buf.step_shape("keypoint") == (9, 2) and buf.step_shape("img") == (96, 96, 3)
    ep = buf.get_episode(0, keys=["state", "action"])
    assert ep["state"].shape == (int(buf.episode_ends[0]), 5) and np.isfinite(ep["state"]).all()


# ---------------------------------------------------------------------------- corrupt stores


def _garbage(p: Path) -> None:
    p.write_bytes(b"\x13\x37 not a blosc frame \xff" * 3)


def _rewrite_ends(path: Path, ends: list[int]) -> None:
    arr = zarr.open_group(path, mode="r+")["meta/episode_ends"]
    arr[:] = np.array(ends, dtype=np.int64)


OPEN_FAILURES = {
    "missing-episode-ends": (lambda p: __import__("shutil").rmtree(p / "meta" / "episode_ends"), "meta/episode_ends is missing"),
    "truncated-data": (lambda p: zarr.open_group(p, mode="r+")["data/obs"].resize((5, 4)), "truncated"),
    "deleted-data-chunk": (lambda p: (p / "data/obs/c/1/0").unlink(), "chunk file data/obs/c/1/0 is missing"),
    "deleted-ends-chunk": (lambda p: (p / "meta/episode_ends/c/0").unlink(), "missing"),
    "garbage-ends-chunk": (lambda p: _garbage(p / "meta/episode_ends/c/0"), "episode_ends is unreadable"),
    "garbage-array-metadata": (lambda p: _garbage(p / "data/obs/zarr.json"), "data/obs"),
    "empty-array-metadata": (lambda p: (p / "data/img/zarr.json").write_bytes(b""), "data/img"),
    "garbage-root-metadata": (lambda p: _garbage(p / "zarr.json"), "root metadata"),
    "garbage-group-metadata": (lambda p: _garbage(p / "meta/zarr.json"), "meta"),
    "deleted-array-metadata": (lambda p: (p / "data/obs/zarr.json").unlink(), "data/obs has no zarr metadata"),
    "decreasing-ends": (lambda p: _rewrite_ends(p, [10, 5, 40]), "decreases at episode 1"),
}


@pytest.mark.parametrize("name", list(OPEN_FAILURES))
@pytest.mark.parametrize("mode", ["r", "a"])
def test_corrupt_store_fails_to_open_with_a_typed_error(tmp_path: Path, name: str, mode: str) -> None:
    path = tmp_path / "b.zarr"
    _filled(path, 3)
    damage, message = OPEN_FAILURES[name]
    damage(path)
    with pytest.raises(CorruptStoreError, match=message) as info:
        ReplayBuffer.open(path, mode=mode)
    assert str(path) in str(info.value)
    # no zarr/numcodecs traceback rides along
    assert info.value.__cause__ is None and (info.value.__context__ is None or info.value.__suppress_context__)


def test_garbage_in_a_data_chunk_fails_on_read(tmp_path: Path) -> None:
    path = tmp_path / "b.zarr"
    _filled(path, 3)
    _garbage(path / "data/img/c/1/0/0/0")  # steps 8..15: episode 0 is 3 steps, episode 1 is 10
    buf = ReplayBuffer.open(path)
    np.testing.assert_array_equal(buf.get_episode(0)["img"], make_episode(0)["img"])
    for read in (lambda: buf.get_array("img"), lambda: buf.get_episode(1), lambda: buf.load()):
        with pytest.raises(CorruptStoreError, match="data/img steps .* unreadable") as info:
            read()
        assert str(path) in str(info.value)


_READ_AND_REPORT = """
import sys
from rtdp.data.replay_buffer import ReplayBuffer
from rtdp.errors import RtdpError
try:
    ReplayBuffer.open(sys.argv[1]).load()
except RtdpError as exc:
    print(f"rtdp: error: {exc}", file=sys.stderr)
    sys.exit(2)
"""


def _all_chunks_garbage(path: Path) -> int:
    # many chunks, so that many reads are still in flight when the first one fails
    buf = ReplayBuffer.create(path)
    rng = np.random.default_rng(0)
    for _ in range(200):
        buf.add_episode({"state": rng.uniform(size=(300, 5)).astype(np.float32),
                         "keypoint": rng.uniform(size=(300, 9, 2)).astype(np.float32),
                         "action": rng.uniform(size=(300, 2)).astype(np.float32)})
    chunks = [f for f in (path / "data").rglob("*") if f.is_file() and "c" in f.relative_to(path / "data").parts]
    for f in chunks:
        _garbage(f)
    return len(chunks)


def test_a_damaged_store_exits_with_one_line_every_time(tmp_path: Path) -> None:
    # zarr reads chunks concurrently; the reads still in flight when one fails must not print
    # "Task was destroyed but it is pending!" under the error (it did about one run in ten)
    path = tmp_path / "damaged.zarr"
    assert _all_chunks_garbage(path) > 600
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for _ in range(20):
        run = subprocess.run([sys.executable, "-c", _READ_AND_REPORT, str(path)], capture_output=True, text=True,
                             env=env, timeout=120)
        assert run.returncode == 2
        lines = run.stderr.splitlines()
        assert len(lines) == 1 and "unreadable, a chunk file is damaged" in lines[0], run.stderr[:2000]
    # and through the command line
    run = subprocess.run([sys.executable, "-m", "rtdp.cli", "train", f"data={path}", f"out={tmp_path / 'run'}",
                          "steps=1"], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 2 and run.stderr.startswith("rtdp train: error: corrupt replay buffer")
    assert len(run.stderr.splitlines()) == 1, run.stderr[:2000]


def test_garbage_in_a_v2_metadata_file(tmp_path: Path) -> None:
    path = tmp_path / "dp.zarr"
    _dp_v2_store(path)
    _garbage(path / "data" / "state" / ".zarray")
    with pytest.raises(CorruptStoreError, match="data/state"):
        ReplayBuffer.open(path)


def test_paths_that_are_not_replay_buffers(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.txt").write_text("x")
    with pytest.raises(CorruptStoreError, match="not a zarr group"):
        ReplayBuffer.open(folder)
    (tmp_path / "file.zarr").write_text("x")
    with pytest.raises(CorruptStoreError, match="file"):
        ReplayBuffer.open(tmp_path / "file.zarr")
    zarr.open_array(tmp_path / "array.zarr", mode="w", shape=(3,), dtype="f4")
    with pytest.raises(CorruptStoreError, match="array, not a group"):
        ReplayBuffer.open(tmp_path / "array.zarr")
    with pytest.raises(DatasetError, match="does not exist") as info:
        ReplayBuffer.open(tmp_path / "nowhere.zarr")
    assert not isinstance(info.value, CorruptStoreError)
    with pytest.raises(DatasetError, match="mode"):
        ReplayBuffer.open(folder, mode="w")


def test_damaged_store_message_is_json_free(tmp_path: Path) -> None:
    # the message names the store and the problem, not a zarr internals dump
    path = tmp_path / "b.zarr"
    _filled(path, 2)
    (path / "data/obs/zarr.json").write_text(json.dumps({"node_type": "array"}))
    with pytest.raises(CorruptStoreError) as info:
        ReplayBuffer.open(path)
    assert "corrupt replay buffer" in str(info.value) and "\n" not in str(info.value)
