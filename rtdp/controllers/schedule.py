"""Timestamped action chunks and how consecutive chunks are stitched together.

A chunk predicted from an observation taken at ``t_obs`` holds actions for
the control intervals ``[t_obs + k * dt, t_obs + (k + 1) * dt)``, k = 0..Ta-1
(Diffusion Policy's real-robot convention: action k belongs to the k-th step
after the observation). Inference takes time, so by the time a chunk arrives
its first intervals have passed; those actions are dropped and counted,
never executed late.

Seams between chunks (``seam=``):

* ``switch``: the newest chunk replaces the plan from the current interval on.
* ``ensemble``: ACT's temporal ensembling; every chunk that covers an interval
  votes, weighted ``exp(-m * i)`` with i = 0 for the oldest prediction.
* ``rtc``: real-time chunking; the new chunk was inpainted at request time so
  that its first actions agree with the committed ones (``committed()`` gives
  them), then it replaces the plan as in ``switch``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from rtdp.errors import ConfigError

SEAMS = ("switch", "ensemble", "rtc")
# A reading taken up to this fraction of a period after its control tick still
# belongs to that tick: drivers read right after the tick, never exactly on it.
_INDEX_TOLERANCE = 0.25


@dataclass
class Chunk:
    """Actions predicted from one observation.

    Attributes:
        t_obs: time of the observation (monotonic seconds).
        actions: (Ta, D) in the driver's units.
        t_ready: when the chunk became available to the loop.
        seq: running number of the chunk within the run.
        n_exec: actions meant to be executed (Ta); the rest of ``actions`` is a
            reserve used only while the next chunk is late.
    """

    t_obs: float
    actions: np.ndarray
    t_ready: float = 0.0
    seq: int = 0
    n_exec: int = 0
    sent: int = field(default=0, init=False)  # actions of this chunk executed so far

    def index_at(self, t: float, dt: float) -> int:
        """Index of the action whose interval contains time ``t`` (may be < 0 or >= Ta)."""
        return int(math.floor((t - self.t_obs) / dt + _INDEX_TOLERANCE))


@dataclass
class SeamStats:
    """Continuity of executed actions (driver units).

    Attributes:
        seams: chunk switches that happened while the previous chunk still had actions.
        gap_mean: mean norm of (new chunk's action - old chunk's action) for the
            same interval at each seam: how much the plan jumped.
        step_mean_seam: mean norm of the change of executed action across a seam.
        step_mean_inside: mean norm of the change of executed action between
            consecutive intervals of the same chunk.
    """

    seams: int
    gap_mean: float
    step_mean_seam: float
    step_mean_inside: float

    def to_dict(self) -> dict[str, float | int]:
        return dict(self.__dict__)


class ActionScheduler:
    """Picks the action for the current control interval from the chunks received.

    Args:
        dt: control period (s).
        seam: one of ``SEAMS``.
        ensemble_m: temporal-ensembling decay (ACT uses 0.01).
    """

    def __init__(self, dt: float, seam: str = "switch", *, ensemble_m: float = 0.01) -> None:
        if seam not in SEAMS:
            raise ConfigError(f"seam must be one of {', '.join(SEAMS)}, got {seam!r}")
        if not dt > 0:
            raise ConfigError(f"dt must be > 0, got {dt!r}")
        self.dt, self.seam, self.ensemble_m = float(dt), seam, float(ensemble_m)
        self.reset()

    def reset(self) -> None:
        """Forget every chunk (new episode)."""
        self.chunks: list[Chunk] = []  # oldest first; switch/rtc act on the newest, ensemble on all
        self.dropped = 0
        self.n_chunks = 0
        self._last_sent: np.ndarray | None = None
        self._last_source = -1
        self._gaps: list[float] = []
        self._seam_steps: list[float] = []
        self._inside_steps: list[float] = []

    def add(self, actions: np.ndarray, t_obs: float, now: float, n_exec: int | None = None) -> Chunk:
        """Add a chunk predicted from the observation taken at ``t_obs``; returns it.

        Args:
            actions: (L, D).
            n_exec: actions of it meant to be executed (default all); the
                others are a reserve for when the next chunk is late.
        """
        actions = np.asarray(actions, dtype=np.float64)
        n_exec = len(actions) if n_exec is None else min(int(n_exec), len(actions))
        chunk = Chunk(float(t_obs), actions, float(now), self.n_chunks, n_exec)
        # intervals that passed while the chunk was being computed are dropped, never executed late
        self.dropped += min(max(chunk.index_at(now, self.dt), 0), len(actions))
        self.n_chunks += 1
        self.chunks.append(chunk)
        return chunk

    def _covering(self, t: float, exec_only: bool = False) -> list[tuple[Chunk, int]]:
        out = []
        for c in self.chunks:
            k = c.index_at(t, self.dt)
            if 0 <= k < (c.n_exec if exec_only else len(c.actions)):
                out.append((c, k))
        return out

    def remaining(self, t: float) -> int:
        """Intervals after the one containing ``t`` left to execute (the reserve not counted)."""
        best = 0
        for c in self.chunks:
            best = max(best, c.n_exec - 1 - max(c.index_at(t, self.dt), -1))
        return max(best, 0)

    def committed(self, t_obs: float, n: int) -> np.ndarray:
        """The plan's actions for the first ``n`` intervals of a chunk observed at ``t_obs``.

        Only actions the plan means to execute count; a chunk's reserve beyond
        its ``n_exec`` actions is a fallback, not a commitment.

        Returns:
            (K, D) with K <= n: the leading intervals the current plan covers.
        """
        out = []
        for k in range(n):
            a = self._value_at(t_obs + (k + 0.5) * self.dt, exec_only=True)
            if a is None:
                break
            out.append(a)
        return np.stack(out) if out else np.zeros((0, 0))

    def _value_at(self, t: float, exec_only: bool = False) -> np.ndarray | None:
        cover = self._covering(t, exec_only)
        if not cover:
            return None
        if self.seam != "ensemble" or len(cover) == 1:
            c, k = cover[-1]
            return c.actions[k]
        # only predictions of the same shape can vote; a malformed chunk is left to the safety layer
        shape = cover[-1][0].actions.shape[1:]
        cover = [(c, k) for c, k in cover if c.actions.shape[1:] == shape]
        w = np.exp(-self.ensemble_m * np.arange(len(cover)))  # oldest prediction weighs most (ACT)
        vals = np.stack([c.actions[k] for c, k in cover])
        return (w[:, None] * vals).sum(0) / w.sum()

    def next_action(self, now: float) -> np.ndarray | None:
        """The action for the interval containing ``now``; None when no chunk covers it (robot idle)."""
        # chunks with nothing left at or after now are finished; so are chunks
        # older than the newest one that acts, unless they vote (ensemble) or
        # are the source of the last action (seam statistics)
        self.chunks = [c for c in self.chunks if c.index_at(now, self.dt) < len(c.actions)]
        cover = self._covering(now)
        if not cover:
            return None
        newest, k = cover[-1]
        newest.sent += 1
        action = self._value_at(now)
        if (self._last_sent is not None and action.shape == self._last_sent.shape
                and np.isfinite(action).all() and np.isfinite(self._last_sent).all()):
            step = float(np.linalg.norm(action - self._last_sent))
            if newest.seq != self._last_source and self._last_source >= 0:
                old = [c for c in self.chunks if c.seq == self._last_source]
                if (old and 0 <= old[0].index_at(now, self.dt) < len(old[0].actions)
                        and old[0].actions.shape[1:] == newest.actions.shape[1:]):
                    self._gaps.append(float(np.linalg.norm(newest.actions[k] - old[0].actions[old[0].index_at(now, self.dt)])))
                self._seam_steps.append(step)
            else:
                self._inside_steps.append(step)
        self._last_sent, self._last_source = action, newest.seq
        if self.seam != "ensemble":
            self.chunks = [c for c in self.chunks if c.seq >= newest.seq]
        return action

    def seam_stats(self) -> SeamStats:
        def mean(v: list[float]) -> float:
            return float(np.mean(v)) if v else 0.0

        return SeamStats(len(self._seam_steps), mean(self._gaps), mean(self._seam_steps), mean(self._inside_steps))
