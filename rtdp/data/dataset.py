"""Training windows over episodes, with Diffusion Policy's sampling and padding.

:class:`SequenceDataset` yields every window of ``horizon`` steps that lies
inside one episode once it is padded by ``n_obs_steps - 1`` steps before and
``n_action_steps - 1`` after, the padding repeating the episode's first or
last step (Diffusion Policy's ``SequenceSampler``). The observation is the
first ``n_obs_steps`` steps of the window, the action target all ``horizon``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from rtdp.errors import ConfigError, DatasetError, MissingKeyError

if TYPE_CHECKING:
    from rtdp.data.replay_buffer import ReplayBuffer

__all__ = ["SequenceDataset", "compute_stats", "load_arrays", "sequence_index", "train_val_split"]

# float64 work space per block when computing statistics, so that a 2.8 GB
# image array is never copied whole.
_STATS_BLOCK_BYTES = 64 << 20


def _check_episode_ends(episode_ends: np.ndarray, n_steps: int | None = None) -> np.ndarray:
    ends = np.asarray(episode_ends)
    if ends.ndim != 1 or (ends.size and ends.dtype.kind not in "iu"):
        raise DatasetError(f"episode_ends must be a 1-D integer array, got shape {ends.shape} dtype {ends.dtype}")
    ends = ends.astype(np.int64)
    if ends.size and (ends[0] < 0 or np.any(np.diff(ends) < 0)):
        raise DatasetError(f"episode_ends must be non-decreasing and >= 0, got {ends[:10].tolist()}...")
    if n_steps is not None and ends.size and ends[-1] > n_steps:
        raise DatasetError(f"episode_ends reach step {int(ends[-1])} but the arrays hold only {n_steps} steps")
    return ends


def sequence_index(
    episode_ends: np.ndarray,
    horizon: int,
    pad_before: int = 0,
    pad_after: int = 0,
    episode_mask: np.ndarray | None = None,
) -> np.ndarray:
    """Table of every padded window, as Diffusion Policy's ``create_indices`` enumerates them.

    For an episode of length L the windows start at ``s = -pad_before ..
    L - horizon + pad_after`` (relative to the episode), which is
    ``max(0, L - horizon + pad_before + pad_after + 1)`` windows.

    Args:
        episode_ends: exclusive episode ends, shape (E,).
        horizon: window length.
        pad_before: steps a window may start before its episode.
        pad_after: steps a window may end after its episode.
        episode_mask: bool (E,), episodes to include; default all.

    Returns:
        int64 (N, 3): per window the episode's first step, its last step
        (inclusive) and the window's first step, all absolute; the window
        covers steps ``clip(start + arange(horizon), first, last)``.
    """
    ends = _check_episode_ends(episode_ends)
    starts = np.concatenate([[0], ends[:-1]]) if ends.size else ends
    lengths = ends - starts
    if episode_mask is None:
        keep = np.ones(ends.shape[0], dtype=bool)
    else:
        keep = np.asarray(episode_mask, dtype=bool)
        if keep.shape != ends.shape:
            raise DatasetError(f"episode_mask has shape {keep.shape}, expected {ends.shape} (one entry per episode)")
    counts = np.where(keep, np.maximum(0, lengths - horizon + pad_before + pad_after + 1), 0)
    ep = np.repeat(np.arange(ends.shape[0]), counts)
    # position of each window within its episode's run of windows
    offset = np.arange(ep.shape[0]) - np.repeat(np.cumsum(counts) - counts, counts)
    table = np.empty((ep.shape[0], 3), dtype=np.int64)
    table[:, 0] = starts[ep]
    table[:, 1] = ends[ep] - 1
    table[:, 2] = starts[ep] - pad_before + offset
    return table


class SequenceDataset(torch.utils.data.Dataset):
    """Padded windows of observations and actions from in-memory episodes.

    Args:
        arrays: ``{key: array of shape (N, ...)}`` for every key in
            ``obs_keys`` and ``action_key``, all steps of all episodes.
        episode_ends: exclusive episode ends, int (E,).
        obs_keys: observation keys to return.
        action_key: the action array: (N, Da), or (N, *shape) for a target that is
            itself a trajectory (a driving planner's plan, (N, 8, 2)).
        horizon: window length T (Diffusion Policy's ``horizon``).
        n_obs_steps: To, observation steps at the start of the window.
        n_action_steps: Ta, actions executed per chunk; sets the end padding.
        episode_mask: bool (E,), episodes to draw from (e.g. a train/val
            split); default all.

    Items are ``{"obs": {key: (To, ...)}, "action": (T, Da)}``; observations
    stay uint8 when stored as uint8 (images) and are float32 otherwise.
    """

    def __init__(
        self,
        arrays: Mapping[str, np.ndarray],
        episode_ends: np.ndarray,
        obs_keys: Sequence[str],
        action_key: str = "action",
        horizon: int = 16,
        n_obs_steps: int = 2,
        n_action_steps: int = 8,
        episode_mask: np.ndarray | None = None,
    ) -> None:
        horizon, n_obs_steps, n_action_steps = int(horizon), int(n_obs_steps), int(n_action_steps)
        if horizon < 1:
            raise ConfigError(f"horizon must be >= 1, got {horizon}")
        if not 1 <= n_obs_steps <= horizon:
            raise ConfigError(f"n_obs_steps must be in [1, horizon={horizon}], got {n_obs_steps}")
        if not 1 <= n_action_steps <= horizon:
            raise ConfigError(f"n_action_steps must be in [1, horizon={horizon}], got {n_action_steps}")
        if isinstance(obs_keys, str):
            raise ConfigError(f"obs_keys must be a list of keys, got the string {obs_keys!r}")
        obs_keys = list(obs_keys)
        if not obs_keys:
            raise ConfigError("obs_keys is empty; name at least one observation key")
        for key in [*obs_keys, action_key]:
            if key not in arrays:
                raise MissingKeyError(
                    f"the dataset needs {key!r}, but the arrays hold only {sorted(arrays)}; "
                    "load it (load_arrays with an alias) or change the task's keys"
                )
        n_steps = min(int(np.shape(arrays[k])[0]) for k in [*obs_keys, action_key])
        ends = _check_episode_ends(episode_ends, n_steps)

        self.obs_keys = obs_keys
        self.action_key = action_key
        self.horizon = horizon
        self.n_obs_steps = n_obs_steps
        self.n_action_steps = n_action_steps
        self.episode_ends = ends
        self.pad_before = n_obs_steps - 1
        self.pad_after = n_action_steps - 1
        # uint8 images stay compact; everything else is converted once here
        # rather than per sample
        self._obs = {
            k: np.ascontiguousarray(arrays[k] if np.asarray(arrays[k]).dtype == np.uint8 else
                                    np.asarray(arrays[k], dtype=np.float32))
            for k in obs_keys
        }
        action = np.ascontiguousarray(np.asarray(arrays[action_key], dtype=np.float32))
        if action.ndim < 2:
            raise DatasetError(f"{action_key!r} must have shape (N, Da) or (N, *shape), got {action.shape}")
        self._action = action
        self._index = sequence_index(ends, horizon, self.pad_before, self.pad_after, episode_mask)
        self._window = np.arange(horizon, dtype=np.int64)

    def __len__(self) -> int:
        return int(self._index.shape[0])

    def __repr__(self) -> str:
        return (
            f"SequenceDataset(len={len(self)}, episodes={self.episode_ends.shape[0]}, obs_keys={self.obs_keys}, "
            f"action_key={self.action_key!r}, horizon={self.horizon}, n_obs_steps={self.n_obs_steps}, "
            f"n_action_steps={self.n_action_steps})"
        )

    def _steps(self, indices: np.ndarray) -> np.ndarray:
        """Absolute step numbers (B, T) of windows ``indices``, edge steps repeated as padding."""
        rows = self._index[indices]
        steps = rows[:, 2:3] + self._window[None, :]
        return np.clip(steps, rows[:, 0:1], rows[:, 1:2])

    def _check_indices(self, indices: np.ndarray) -> np.ndarray:
        n = len(self)
        if indices.size and (indices.min() < -n or indices.max() >= n):
            raise IndexError(f"window index out of range for a dataset of {n} windows")
        return np.where(indices < 0, indices + n, indices)

    def __getitem__(self, index: int) -> dict:
        """One window: ``{"obs": {key: (To, ...)}, "action": (T, Da)}`` as numpy arrays."""
        idx = self._check_indices(np.asarray([int(index)], dtype=np.int64))
        steps = self._steps(idx)[0]
        obs_steps = steps[: self.n_obs_steps]
        return {
            "obs": {k: v[obs_steps] for k, v in self._obs.items()},
            "action": self._action[steps],
        }

    def sample_batch(self, indices: np.ndarray | Sequence[int] | torch.Tensor) -> dict:
        """A batch of windows, gathered in one vectorised step.

        Args:
            indices: window numbers, int (B,).

        Returns:
            ``{"obs": {key: tensor (B, To, ...)}, "action": tensor (B, T, Da)}``
            on the CPU; float32, or uint8 for uint8 observations.
        """
        if isinstance(indices, torch.Tensor):
            indices = indices.cpu().numpy()
        idx = self._check_indices(np.asarray(indices, dtype=np.int64).reshape(-1))
        steps = self._steps(idx)
        obs_steps = steps[:, : self.n_obs_steps]
        return {
            "obs": {k: torch.from_numpy(v[obs_steps]) for k, v in self._obs.items()},
            "action": torch.from_numpy(self._action[steps]),
        }

    @classmethod
    def from_buffer(
        cls,
        buffer: ReplayBuffer,
        obs_keys: Sequence[str],
        action_key: str = "action",
        aliases: Mapping[str, tuple[str, int, int]] | None = None,
        **kwargs,
    ) -> SequenceDataset:
        """Load ``obs_keys`` and ``action_key`` from a replay buffer and build the dataset.

        Args:
            buffer: an open :class:`~rtdp.data.replay_buffer.ReplayBuffer`.
            obs_keys, action_key: as for the constructor.
            aliases: see :func:`load_arrays`.
            **kwargs: ``horizon``, ``n_obs_steps``, ``n_action_steps``, ``episode_mask``.
        """
        arrays = load_arrays(buffer, [*obs_keys, action_key], aliases)
        return cls(arrays, buffer.episode_ends, obs_keys, action_key, **kwargs)


def load_arrays(
    buffer: ReplayBuffer,
    keys: Sequence[str],
    aliases: Mapping[str, tuple[str, int, int]] | None = None,
) -> dict[str, np.ndarray]:
    """Load ``keys`` (all committed steps), deriving absent ones from aliases.

    Args:
        buffer: an open replay buffer.
        keys: arrays the policy needs.
        aliases: ``{key: (source_key, start, stop)}``: a key the buffer lacks
            is ``source[:, start:stop]``, e.g. PushT's ``agent_pos`` is
            ``state[:, 0:2]`` in Diffusion Policy's dataset.

    Returns:
        ``{key: array of shape (n_steps, ...)}`` for every key in ``keys``.

    Raises:
        MissingKeyError: a key is neither stored nor derivable.
    """
    aliases = dict(aliases or {})
    present = set(buffer.keys)
    sources: dict[str, str] = {}
    for key in keys:
        if key in present:
            sources[key] = key
            continue
        alias = aliases.get(key)
        if alias is None:
            raise MissingKeyError(
                f"the policy needs {key!r}, but {buffer.path} has only {sorted(present)} "
                "and no alias defines it; add an alias {key: (source, start, stop)} or collect data with that key"
            )
        source, start, stop = alias
        if source not in present:
            raise MissingKeyError(
                f"the policy needs {key!r}, but {buffer.path} has only {sorted(present)}; "
                f"the alias {key!r} = {source}[:, {start}:{stop}] needs {source!r}, which is absent too"
            )
        sources[key] = source
    loaded = buffer.load(sorted(set(sources.values())))
    out: dict[str, np.ndarray] = {}
    for key in keys:
        src = loaded[sources[key]]
        if sources[key] == key:
            out[key] = src
            continue
        _, start, stop = aliases[key]
        if src.ndim < 2 or not 0 <= start < stop <= src.shape[1]:
            raise DatasetError(
                f"alias {key!r} = {sources[key]}[:, {start}:{stop}] does not fit {sources[key]!r} "
                f"of shape {src.shape}"
            )
        out[key] = np.ascontiguousarray(src[:, start:stop])
    return out


def compute_stats(arrays: Mapping[str, np.ndarray], keys: Sequence[str] | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Per-element min, max, mean and std over all steps.

    Args:
        arrays: ``{key: array of shape (N, ...)}``.
        keys: which keys; default all.

    Returns:
        ``{key: {"min", "max", "mean", "std"}}``, each float32 shaped like one
        step (e.g. (9, 2) for PushT keypoints); ``std`` is the population
        standard deviation (ddof=0).

    Raises:
        MissingKeyError: a key is not in ``arrays``.
        DatasetError: an array has no steps.
    """
    names = list(arrays) if keys is None else list(keys)
    stats: dict[str, dict[str, np.ndarray]] = {}
    for key in names:
        if key not in arrays:
            raise MissingKeyError(f"cannot compute statistics of {key!r}: the arrays hold only {sorted(arrays)}")
        data = np.asarray(arrays[key])
        if data.ndim < 1 or data.shape[0] == 0:
            raise DatasetError(f"cannot compute statistics of {key!r}: it has no steps (shape {data.shape})")
        step_size = max(1, int(np.prod(data.shape[1:])))
        block = max(1, _STATS_BLOCK_BYTES // (8 * step_size))
        # Chan et al.'s pairwise merge of block means and squared deviations:
        # accurate in float64 without holding a float64 copy of the array.
        count = 0
        mean = np.zeros(data.shape[1:], dtype=np.float64)
        m2 = np.zeros(data.shape[1:], dtype=np.float64)
        lo = hi = None
        for i in range(0, data.shape[0], block):
            x = data[i : i + block].astype(np.float64)
            n_b = x.shape[0]
            mean_b = x.mean(axis=0)
            m2_b = ((x - mean_b) ** 2).sum(axis=0)
            delta = mean_b - mean
            total = count + n_b
            mean = mean + delta * (n_b / total)
            m2 = m2 + m2_b + delta**2 * (count * n_b / total)
            count = total
            lo = x.min(axis=0) if lo is None else np.minimum(lo, x.min(axis=0))
            hi = x.max(axis=0) if hi is None else np.maximum(hi, x.max(axis=0))
        stats[key] = {
            "min": np.asarray(lo, dtype=np.float32),
            "max": np.asarray(hi, dtype=np.float32),
            "mean": mean.astype(np.float32),
            "std": np.sqrt(m2 / count).astype(np.float32),
        }
    return stats


def train_val_split(episode_ends: np.ndarray, val_ratio: float, seed: int = 42) -> tuple[np.ndarray, np.ndarray]:
    """Split episodes into training and validation sets.

    Follows Diffusion Policy's ``get_val_mask``: with ``val_ratio > 0`` at
    least one episode is held out and at least one is kept for training,
    and the same seed picks the same episodes.

    Args:
        episode_ends: exclusive episode ends, shape (E,).
        val_ratio: fraction of episodes for validation, in [0, 1).
        seed: random seed.

    Returns:
        ``(train_mask, val_mask)``, bool (E,), complementary.
    """
    n = int(_check_episode_ends(episode_ends).shape[0])
    if not 0.0 <= float(val_ratio) < 1.0:
        raise ConfigError(f"val_ratio must be in [0, 1), got {val_ratio}")
    val = np.zeros(n, dtype=bool)
    if val_ratio > 0 and n > 1:
        n_val = min(max(1, round(n * float(val_ratio))), n - 1)
        val[np.random.default_rng(seed=seed).choice(n, size=n_val, replace=False)] = True
    return ~val, val
