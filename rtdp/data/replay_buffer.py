"""A crash-safe zarr replay buffer in Diffusion Policy's layout.

On disk a buffer is a zarr group::

    <path>/
      data/<key>          (N, ...) one array per observation/action key
      meta/episode_ends   (E,) int64, exclusive end step of each episode

Episode ``i`` holds steps ``episode_ends[i-1]:episode_ends[i]`` (from 0 for
the first). New buffers are written in the zarr v3 format; Diffusion Policy's
own zarr v2 stores (e.g. ``pusht_cchi_v7_replay.zarr``) are read, and can be
appended to, in place.

Crash safety rests on three facts:

* zarr's ``LocalStore`` writes every file to a temporary name and renames it,
  so each chunk or metadata file is either old or new, never torn;
* :meth:`ReplayBuffer.add_episode` writes every data array first and the
  episode end last;
* the episode end becomes visible through a single file, the
  ``meta/episode_ends`` metadata: its chunk is written while the value is still
  outside the array's shape, then the shape grows by one.

So a crash loses at most the episode being written. A reader only sees steps
up to the last episode end and ignores any trailing data; opening in ``"a"``
mode trims that trailing data before appending.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from rtdp.data.zarr_io import compressor, describe_error, looks_like_zarr, node_kind, settle_reads
from rtdp.errors import CorruptStoreError, DatasetError, MissingKeyError

if TYPE_CHECKING:
    import zarr

__all__ = ["ReplayBuffer"]

SCHEMA_VERSION = 1
# Chunks of at most this many steps and about this many bytes: small enough
# that appending an episode rewrites little, large enough to compress well.
MAX_CHUNK_STEPS = 256
TARGET_CHUNK_BYTES = 8 << 20
ENDS_CHUNK = 1024
# zarr's LocalStore writes "<name>.<uuid4 hex>.partial" and renames it; a
# killed writer can leave one behind.
_PARTIAL_RE = re.compile(r"\.[0-9a-f]{32}\.partial$")
_RECOVER_HINT = "restore the store from a backup or collect the data again"


def default_chunk_steps(step_shape: tuple[int, ...], dtype: np.dtype) -> int:
    """Steps per chunk along axis 0 for an array whose steps look like ``step_shape``.

    Args:
        step_shape: shape of one step, e.g. ``(96, 96, 3)``.
        dtype: element type.

    Returns:
        ``min(256, 8 MiB // bytes per step)``, at least 1.
    """
    step_bytes = max(1, math.prod(step_shape) * np.dtype(dtype).itemsize)
    return int(min(MAX_CHUNK_STEPS, max(1, TARGET_CHUNK_BYTES // step_bytes)))


class ReplayBuffer:
    """Episodes of aligned arrays in a zarr group (Diffusion Policy's layout).

    Build one with :meth:`create` or :meth:`open`, not with the constructor.
    A buffer opened in ``"r"`` mode reads; ``"a"`` mode also appends. Only
    one process may write to a store at a time.

    Example:
        >>> buf = ReplayBuffer.create("demo.zarr")
        >>> buf.add_episode({"obs": np.zeros((10, 3), np.float32), "action": np.zeros((10, 2), np.float32)})
        >>> buf.n_episodes, buf.n_steps
        (1, 10)
    """

    def __init__(self, path: Path, mode: Literal["r", "a"], *, chunk_steps: int | None = None,
                 check_chunks: bool = True) -> None:
        self._path = Path(path)
        self._mode = mode
        self._chunk_steps = int(chunk_steps) if chunk_steps is not None else None
        self._zarr_format: int = 3
        self._root: zarr.Group
        self._data_group: zarr.Group
        self._ends_array: zarr.Array
        self._arrays: dict[str, zarr.Array] = {}
        self._ends = np.zeros(0, dtype=np.int64)
        self._load(check_chunks)
        if mode == "a":
            self._trim_uncommitted()

    # ------------------------------------------------------------------ construction

    @classmethod
    def create(cls, path: str | os.PathLike, *, overwrite: bool = False,
               chunk_steps: int | None = None) -> ReplayBuffer:
        """Create an empty buffer (zarr v3 format) at ``path`` and open it for appending.

        Args:
            path: folder to create, conventionally ending in ``.zarr``.
            overwrite: replace an existing zarr store at ``path``. A non-empty
                folder that is not a zarr store is never deleted.
            chunk_steps: steps per chunk along axis 0 for the data arrays this
                session creates; default: up to 256 steps and about 8 MiB.

        Raises:
            DatasetError: ``path`` exists and is not empty (without ``overwrite``),
                or is not a zarr store (with it), or ``chunk_steps`` < 1.
        """
        import zarr
        from zarr.storage import LocalStore

        path = Path(path)
        if chunk_steps is not None and int(chunk_steps) < 1:
            raise DatasetError(f"chunk_steps must be >= 1, got {chunk_steps}")
        if path.exists() and (path.is_file() or any(path.iterdir())):
            if not overwrite:
                raise DatasetError(
                    f"cannot create a replay buffer at {path}: something is already there; "
                    "open it with ReplayBuffer.open(path, mode='a'), pass overwrite=True to replace it, "
                    "or choose another path"
                )
            if not looks_like_zarr(path):
                raise DatasetError(
                    f"refusing to overwrite {path}: it is not a zarr store (no zarr.json or .zgroup); "
                    "remove it yourself or choose another path"
                )
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        root = zarr.open_group(
            LocalStore(path), mode="w", zarr_format=3,
            attributes={"layout": "diffusion_policy_replay_buffer", "rtdp_schema_version": SCHEMA_VERSION},
        )
        root.create_group("data")
        meta = root.create_group("meta")
        meta.create_array(
            "episode_ends", shape=(0,), chunks=(ENDS_CHUNK,), dtype="int64", fill_value=0,
            compressors=compressor(3), config={"write_empty_chunks": True},
        )
        return cls(path, "a", chunk_steps=chunk_steps)

    @classmethod
    def open(cls, path: str | os.PathLike, mode: Literal["r", "a"] = "r", *,
             check_chunks: bool = True) -> ReplayBuffer:
        """Open an existing buffer, zarr v3 or Diffusion Policy's zarr v2.

        Args:
            path: the store folder.
            mode: ``"r"`` to read; ``"a"`` to read and append (trims data a
                crashed writer left past the last episode end).
            check_chunks: verify that every chunk file holding committed steps
                exists. zarr reads a missing chunk as zeros without a word, so
                this is on by default; turn it off only for stores written
                with zarr's ``write_empty_chunks=False``.

        Raises:
            DatasetError: ``path`` does not exist or ``mode`` is invalid.
            CorruptStoreError: ``path`` is not a zarr group, or the store is
                inconsistent (see the message for what and what to do).
        """
        if mode not in ("r", "a"):
            raise DatasetError(f"mode must be 'r' or 'a', got {mode!r}")
        path = Path(path)
        if not path.exists():
            raise DatasetError(
                f"no replay buffer at {path}: the path does not exist; "
                "create one with ReplayBuffer.create(path)"
            )
        return cls(path, mode, check_chunks=check_chunks)

    def _corrupt(self, problem: str, todo: str = _RECOVER_HINT) -> CorruptStoreError:
        return CorruptStoreError(f"corrupt replay buffer {self._path}: {problem}; {todo}")

    def _load(self, check_chunks: bool) -> None:
        import zarr
        from zarr.storage import LocalStore

        path = self._path
        if not path.is_dir():
            raise self._corrupt("it is a file, not a zarr group folder",
                                "pass the folder of a zarr store in Diffusion Policy's layout")
        if (path / "zarr.json").is_file():
            fmt = 3
        elif (path / ".zgroup").is_file() or (path / ".zarray").is_file():
            fmt = 2
        else:
            raise self._corrupt("it is not a zarr group (no zarr.json or .zgroup)",
                                "pass the folder of a zarr store, or create one with ReplayBuffer.create(path)")
        if node_kind(path, fmt) == "array":
            raise self._corrupt("it is a zarr array, not a group",
                                "pass the store's root folder (the one holding data/ and meta/)")
        self._zarr_format = fmt
        store = LocalStore(path, read_only=self._mode == "r")
        try:
            root = zarr.open_group(store, mode="r" if self._mode == "r" else "r+", zarr_format=fmt)
        except Exception as exc:
            raise self._corrupt(f"its root metadata is unreadable ({describe_error(exc)})") from None
        self._root = root

        self._expect_node("data", "group")
        self._expect_node("meta", "group")
        self._data_group = self._open_node("data")
        self._expect_node("meta/episode_ends", "array")
        with self._write_config():
            self._ends_array = self._open_node("meta/episode_ends")
        ends_array = self._ends_array
        if not isinstance(ends_array, zarr.Array) or ends_array.ndim != 1 or ends_array.dtype.kind not in "iu":
            raise self._corrupt(
                f"meta/episode_ends must be a 1-D integer array, found shape {getattr(ends_array, 'shape', None)} "
                f"dtype {getattr(ends_array, 'dtype', None)}"
            )
        if check_chunks:
            self._check_chunks(ends_array, "meta/episode_ends", ends_array.shape[0])
        try:
            ends = np.asarray(ends_array[:], dtype=np.int64)
        except Exception as exc:
            settle_reads()
            raise self._corrupt(f"meta/episode_ends is unreadable ({describe_error(exc)})") from None
        if ends.size and (ends[0] < 0 or np.any(np.diff(ends) < 0)):
            bad = 0 if ends[0] < 0 else int(np.argmax(np.diff(ends) < 0)) + 1
            raise self._corrupt(
                f"meta/episode_ends decreases at episode {bad} "
                f"({int(ends[bad - 1]) if bad else 0} -> {int(ends[bad])})"
            )
        self._ends = ends
        n_steps = self.n_steps

        arrays: dict[str, zarr.Array] = {}
        for child in sorted(p for p in (path / "data").iterdir() if p.is_dir()):
            kind = node_kind(child, fmt)
            if kind is None:
                raise self._corrupt(f"data/{child.name} has no zarr metadata file")
            if kind == "group":
                raise DatasetError(
                    f"{path}: data/{child.name} is a group; a replay buffer holds only arrays under data/"
                )
            with self._write_config():
                arr = self._open_node(f"data/{child.name}")
            if arr.ndim < 1:
                raise self._corrupt(f"data/{child.name} is a scalar; data arrays have a leading step axis")
            if arr.shape[0] < n_steps:
                raise self._corrupt(
                    f"data/{child.name} has {arr.shape[0]} steps but meta/episode_ends says "
                    f"the episodes end at step {n_steps} (the array was truncated)"
                )
            if check_chunks:
                self._check_chunks(arr, f"data/{child.name}", n_steps)
            arrays[child.name] = arr
        self._arrays = arrays

    def _expect_node(self, name: str, kind: str) -> None:
        found = node_kind(self._path / name, self._zarr_format)
        if found == "unreadable":
            raise self._corrupt(f"the metadata file of {name} is unreadable")
        if found is None:
            what = "it records where each episode ends" if name.endswith("episode_ends") else (
                "a replay buffer holds data/<key> arrays and meta/episode_ends")
            raise self._corrupt(f"{name} is missing", f"{_RECOVER_HINT} ({what})")
        if found != kind:
            raise self._corrupt(f"{name} is a zarr {found}, expected a {kind}")

    def _open_node(self, name: str) -> Any:
        try:
            return self._root[name]
        except Exception as exc:
            raise self._corrupt(f"the metadata of {name} is unreadable ({describe_error(exc)})") from None

    def _write_config(self) -> Any:
        # zarr skips chunks that equal the fill value unless told otherwise; a
        # store with every chunk present lets open() tell a deleted chunk file
        # from an empty one. The option is read when an array object is made.
        import contextlib

        import zarr

        if self._mode == "r":
            return contextlib.nullcontext()
        return zarr.config.set({"array.write_empty_chunks": True})

    def _check_chunks(self, arr: Any, name: str, n_steps: int) -> None:
        if n_steps == 0:
            return
        grid = arr.shards if arr.shards is not None else arr.chunks
        counts = [math.ceil(n_steps / grid[0])]
        counts += [math.ceil(s / c) for s, c in zip(arr.shape[1:], grid[1:])]
        base = self._path / name
        for coords in itertools.product(*(range(c) for c in counts)):
            key = arr.metadata.encode_chunk_key(coords)
            if not (base / key).is_file():
                raise self._corrupt(f"chunk file {name}/{key} is missing (it holds committed steps)")

    def _trim_uncommitted(self) -> None:
        # A writer killed mid-episode leaves data arrays longer than the last
        # episode end; cut them back so the next episode starts there.
        n_steps = self.n_steps
        for arr in self._arrays.values():
            if arr.shape[0] > n_steps:
                arr.resize((n_steps, *arr.shape[1:]))
        for leftover in self._path.rglob("*.partial"):
            if _PARTIAL_RE.search(leftover.name) and leftover.is_file():
                leftover.unlink(missing_ok=True)

    # ------------------------------------------------------------------ properties

    @property
    def path(self) -> Path:
        """The store folder."""
        return self._path

    @property
    def mode(self) -> str:
        """``"r"`` or ``"a"``."""
        return self._mode

    @property
    def zarr_format(self) -> int:
        """2 for Diffusion Policy's stores, 3 for stores this class creates."""
        return self._zarr_format

    @property
    def n_episodes(self) -> int:
        """Number of committed episodes."""
        return int(self._ends.shape[0])

    @property
    def n_steps(self) -> int:
        """Number of committed steps (the last episode end; 0 when empty)."""
        return int(self._ends[-1]) if self._ends.size else 0

    @property
    def episode_ends(self) -> np.ndarray:
        """Exclusive end step of each episode, int64 of shape (E,) (a copy)."""
        return self._ends.copy()

    @property
    def episode_lengths(self) -> np.ndarray:
        """Steps in each episode, int64 of shape (E,)."""
        return np.diff(self._ends, prepend=0)

    @property
    def keys(self) -> list[str]:
        """Names of the data arrays, sorted."""
        return sorted(self._arrays)

    def step_shape(self, key: str) -> tuple[int, ...]:
        """Shape of one step of ``key``, e.g. ``(9, 2)`` for PushT keypoints."""
        return tuple(self._array(key).shape[1:])

    def dtype(self, key: str) -> np.dtype:
        """Element type of ``key``."""
        return np.dtype(self._array(key).dtype)

    def __contains__(self, key: object) -> bool:
        return key in self._arrays

    def __repr__(self) -> str:
        fields = ", ".join(
            f"{k}: {tuple(a.shape[1:])} {np.dtype(a.dtype).name}" for k, a in sorted(self._arrays.items())
        )
        return (
            f"ReplayBuffer({str(self._path)!r}, mode={self._mode!r}, zarr_format={self._zarr_format}, "
            f"n_episodes={self.n_episodes}, n_steps={self.n_steps}, keys={{{fields}}})"
        )

    # ------------------------------------------------------------------ reading

    def _array(self, key: str) -> Any:
        try:
            return self._arrays[key]
        except KeyError:
            present = ", ".join(self.keys) or "none"
            raise MissingKeyError(
                f"replay buffer {self._path} has no array {key!r}; arrays present: {present}"
            ) from None

    def _read(self, key: str, start: int, stop: int) -> np.ndarray:
        arr = self._array(key)
        try:
            return np.asarray(arr[start:stop])
        except Exception as exc:
            settle_reads()
            raise self._corrupt(
                f"data/{key} steps {start}:{stop} are unreadable, a chunk file is damaged ({describe_error(exc)})"
            ) from None

    def get_episode(self, index: int, keys: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """Read one episode.

        Args:
            index: episode number; negative counts from the end.
            keys: arrays to read; default all.

        Returns:
            ``{key: array of shape (T, ...)}`` with T the episode length.

        Raises:
            IndexError: no such episode.
            MissingKeyError: a requested key is not stored.
            CorruptStoreError: a chunk is unreadable.
        """
        n = self.n_episodes
        i = int(index)
        if not -n <= i < n:
            raise IndexError(f"episode {index} out of range: {self._path} holds {n} episodes")
        i %= n
        start = int(self._ends[i - 1]) if i > 0 else 0
        stop = int(self._ends[i])
        names = self.keys if keys is None else list(keys)
        return {k: self._read(k, start, stop) for k in names}

    def get_array(self, key: str) -> np.ndarray:
        """All committed steps of ``key``, shape (n_steps, ...); trailing uncommitted data is left out."""
        return self._read(key, 0, self.n_steps)

    def load(self, keys: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """Read all committed steps of ``keys`` (default: every array) into memory.

        Returns:
            ``{key: array of shape (n_steps, ...)}``.
        """
        names = self.keys if keys is None else list(keys)
        for k in names:
            self._array(k)  # report a missing key before reading anything
        return {k: self.get_array(k) for k in names}

    # ------------------------------------------------------------------ writing

    def add_episode(self, data: Mapping[str, np.ndarray]) -> None:
        """Append one episode; atomic with respect to crashes.

        The first episode of a buffer fixes its keys, per-step shapes and
        dtypes; later episodes must match exactly. Every data array is
        written before the episode end, so a crash leaves the buffer as it
        was before the call.

        Args:
            data: ``{key: array of shape (T, ...)}``, the same T >= 1 for all keys.

        Raises:
            DatasetError: the buffer is read-only, or the episode is malformed
                or does not match the buffer (nothing is written then).
            MissingKeyError: the episode lacks a key the buffer stores.
        """
        if self._mode != "a":
            raise DatasetError(f"{self._path} is open read-only; open it with ReplayBuffer.open(path, mode='a')")
        episode = self._validate_episode(data)
        if self.n_episodes == 0:
            self._create_arrays(episode)
        start = self.n_steps
        length = next(iter(episode.values())).shape[0]
        stop = start + length
        for key, value in episode.items():
            arr = self._arrays[key]
            arr.resize((stop, *arr.shape[1:]))
            arr[start:stop] = value
        self._commit_end(stop)

    def _validate_episode(self, data: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not isinstance(data, Mapping) or not data:
            raise DatasetError("an episode is a non-empty dict {key: array of shape (T, ...)}")
        episode: dict[str, np.ndarray] = {}
        for key, value in data.items():
            if not isinstance(key, str) or not key or "/" in key or key.startswith("."):
                raise DatasetError(f"episode key {key!r} is not a valid array name (non-empty, no '/', no leading '.')")
            arr = np.asarray(value)
            if arr.dtype.kind not in "biuf":
                raise DatasetError(f"episode[{key!r}] has dtype {arr.dtype}; store bool, integer or float arrays")
            if arr.ndim < 1:
                raise DatasetError(f"episode[{key!r}] is a scalar; every array needs a leading time axis (T, ...)")
            if not arr.dtype.isnative:
                arr = arr.astype(arr.dtype.newbyteorder("="))
            episode[key] = arr
        lengths = {k: v.shape[0] for k, v in episode.items()}
        if len(set(lengths.values())) != 1:
            raise DatasetError(f"episode arrays must all have the same length T; got {lengths}")
        if next(iter(lengths.values())) < 1:
            raise DatasetError("an episode needs at least one step (T >= 1)")
        if self.n_episodes == 0:
            return episode
        missing = sorted(set(self._arrays) - set(episode))
        if missing:
            raise MissingKeyError(
                f"episode lacks {missing}, which {self._path} stores for every episode; "
                f"episodes must have exactly the keys {self.keys}"
            )
        extra = sorted(set(episode) - set(self._arrays))
        if extra:
            raise DatasetError(
                f"episode has keys {extra} that {self._path} does not store; "
                f"episodes must have exactly the keys {self.keys}"
            )
        for key, value in episode.items():
            arr = self._arrays[key]
            if tuple(value.shape[1:]) != tuple(arr.shape[1:]):
                raise DatasetError(
                    f"episode[{key!r}] has steps of shape {tuple(value.shape[1:])}, "
                    f"but {self._path} stores {key!r} with steps of shape {tuple(arr.shape[1:])}"
                )
            if value.dtype != np.dtype(arr.dtype):
                raise DatasetError(
                    f"episode[{key!r}] has dtype {value.dtype}, but {self._path} stores {key!r} as "
                    f"{np.dtype(arr.dtype)}; cast it with .astype(np.{np.dtype(arr.dtype).name})"
                )
        return {k: episode[k] for k in sorted(episode)}

    def _create_arrays(self, episode: Mapping[str, np.ndarray]) -> None:
        # With no committed episode, whatever sits under data/ is a crashed
        # first episode: start over with this episode's keys, shapes, dtypes.
        for name in list(self._arrays):
            del self._data_group[name]
        self._arrays = {}
        fmt = self._zarr_format
        with self._write_config():
            for key in sorted(episode):
                value = episode[key]
                step_shape = tuple(value.shape[1:])
                steps = self._chunk_steps or default_chunk_steps(step_shape, value.dtype)
                self._arrays[key] = self._data_group.create_array(
                    key, shape=(0, *step_shape), chunks=(steps, *step_shape), dtype=value.dtype,
                    fill_value=0, compressors=compressor(fmt),
                )

    def _commit_end(self, end: int) -> None:
        import zarr

        ends = self._ends_array
        n = ends.shape[0]
        # Write the new end into its chunk while it is still past the array's
        # shape (invisible to readers), then grow the shape: the commit is one
        # atomic metadata write, so a reader never sees a half-written end.
        grown = zarr.Array(zarr.AsyncArray(
            metadata=ends.metadata.update_shape((n + 1,)),
            store_path=ends.store_path,
            config={"write_empty_chunks": True},
        ))
        grown[n] = end
        ends.resize((n + 1,))
        self._ends = np.append(self._ends, np.int64(end))
