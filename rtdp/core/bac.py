"""Block-wise Adaptive Caching (BAC, Ji et al. 2025): a cache schedule per transformer block.

A transformer denoiser is a stack of blocks (self-attention, cross-attention,
feed-forward). Their outputs change across the denoising steps of one chunk at
different speeds and at different moments. BAC measures that once and turns it
into a schedule that :class:`rtdp.core.cache.CachedNetwork` runs:

1. **Calibration** (:class:`FeatureRecorder`): over a few calibration chunks,
   every block's output at every step is recorded, and per block the step-by-step
   cosine similarity matrix ``S[i, j]`` (mean over chunks and samples) is kept.
2. **Adaptive Caching Scheduler** (:func:`adaptive_steps`): with a budget of M
   update steps, a block computed at step u and replayed at steps u+1 .. v-1
   scores ``S[u, u] + ... + S[u, v-1]``; dynamic programming picks the M steps
   (step 0 always) that maximise the total over all K steps.
3. **Bubbling Union** (:func:`bubbling_union`): a stale feature in an upstream
   block propagates into every later block, and feed-forward blocks amplify it.
   For the ``top_k`` upstream blocks with the largest caching error, the update
   steps of every FFN block at the same or a deeper layer are added to their own,
   so an FFN that recomputes never reads a stale upstream feature from those blocks.

The schedule depends on the sampler and step count; it is stored beside the
checkpoint (:meth:`BacCalibration.save`) and reused. The cache itself restarts
with every chunk. Everything here imports only torch and numpy.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rtdp.errors import ConfigError

__all__ = ["BacCalibration", "Block", "FeatureRecorder", "adaptive_steps", "bubbling_union", "caching_error",
           "schedule_score", "uniform_block_schedule", "uniform_steps"]

KINDS = ("self_attn", "cross_attn", "ffn")


@dataclass(frozen=True)
class Block:
    """One cacheable sub-block: its module name, kind (``self_attn``, ``cross_attn``, ``ffn``) and layer."""

    name: str
    kind: str
    layer: int


def _check_sim(sim: np.ndarray) -> np.ndarray:
    sim = np.asarray(sim, dtype=np.float64)
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1] or sim.shape[0] < 1:
        raise ConfigError(f"a similarity matrix must be square (K, K), got shape {sim.shape}")
    return sim


def _check_budget(budget: int, k: int) -> int:
    if isinstance(budget, bool) or int(budget) != budget or not 1 <= int(budget) <= k:
        raise ConfigError(f"the cache budget must be an int in 1..{k} (update steps per chunk), got {budget!r}")
    return int(budget)


def schedule_score(sim: np.ndarray, steps: Iterable[int]) -> float:
    """Sum over steps k of ``sim[u(k), k]``, u(k) the latest update step <= k (step 0 must update)."""
    sim = _check_sim(sim)
    ups = sorted(set(int(s) for s in steps))
    if not ups or ups[0] != 0:
        raise ConfigError(f"a schedule must update at step 0, got {ups}")
    total, j = 0.0, 0
    for k in range(sim.shape[0]):
        while j + 1 < len(ups) and ups[j + 1] <= k:
            j += 1
        total += sim[ups[j], k]
    return float(total)


def caching_error(sim: np.ndarray, steps: Iterable[int]) -> float:
    """Mean ``1 - similarity`` between the feature a schedule serves and the one it stands for."""
    sim = _check_sim(sim)
    return 1.0 - schedule_score(sim, steps) / sim.shape[0]


def adaptive_steps(sim: np.ndarray, budget: int) -> list[int]:
    """The Adaptive Caching Scheduler: ``budget`` update steps maximising :func:`schedule_score`.

    ``best[m, v]`` is the best score of steps 0..v-1 covered by m segments, the
    last one ending at v - 1; a segment [u, v) updated at u scores
    ``sum(sim[u, u:v])`` (prefix sums make each O(1)). O(M K^2).

    Args:
        sim: (K, K) similarity of step i's feature to step j's.
        budget: update steps M, 1..K.

    Returns:
        the sorted update steps, starting at 0, exactly ``budget`` of them.
    """
    sim = _check_sim(sim)
    k = sim.shape[0]
    m_steps = _check_budget(budget, k)
    # seg[u, v] = sum_{j=u}^{v-1} sim[u, j], for v > u
    prefix = np.concatenate([np.zeros((k, 1)), np.cumsum(sim, axis=1)], axis=1)  # (K, K+1)
    seg = prefix - prefix[np.arange(k), np.arange(k)][:, None]  # seg[u, v] = prefix[u, v] - prefix[u, u]
    neg = -np.inf
    best = np.full((m_steps + 1, k + 1), neg)
    arg = np.zeros((m_steps + 1, k + 1), dtype=np.int64)
    best[1, 1:] = seg[0, 1:]  # one segment: [0, v)
    for m in range(2, m_steps + 1):
        for v in range(m, k + 1):
            # last segment [u, v) with u in m-1 .. v-1; the first m-1 segments cover [0, u)
            u = np.arange(m - 1, v)
            cand = best[m - 1, u] + seg[u, v]
            i = int(np.argmax(cand))
            best[m, v], arg[m, v] = cand[i], u[i]
    steps, v = [], k
    for m in range(m_steps, 1, -1):
        u = int(arg[m, v])
        steps.append(u)
        v = u
    return [0] + sorted(steps)


def uniform_steps(n_steps: int, budget: int) -> list[int]:
    """``budget`` update steps spread evenly over ``n_steps`` (the comparison BAC is measured against)."""
    m = _check_budget(budget, int(n_steps))
    return sorted({int(round(i * n_steps / m)) for i in range(m)})


def uniform_block_schedule(names: Iterable[str], n_steps: int, budget: int) -> dict[str, set[int]]:
    """Every block in ``names`` updated at the same :func:`uniform_steps`."""
    steps = uniform_steps(n_steps, budget)
    return {n: set(steps) for n in names}


def bubbling_union(steps: Mapping[str, Iterable[int]], blocks: Sequence[Block], errors: Mapping[str, float],
                   top_k: int) -> dict[str, set[int]]:
    """Add to each of the ``top_k`` most error-prone blocks the update steps of every FFN block
    at the same or a deeper layer (not the block itself).

    Args:
        steps: each block's own update steps (from :func:`adaptive_steps`).
        blocks: the blocks in execution order.
        errors: each block's caching error under its own steps (:func:`caching_error`).
        top_k: how many upstream blocks get the union (0: none).

    Returns:
        new update steps per block.
    """
    out = {b.name: set(int(s) for s in steps[b.name]) for b in blocks}
    if top_k < 0:
        raise ConfigError(f"bubbling top_k must be >= 0, got {top_k}")
    ranked = sorted(blocks, key=lambda b: (-errors[b.name], b.layer))[: int(top_k)]
    for up in ranked:
        for b in blocks:
            if b.kind == "ffn" and b.layer >= up.layer and b.name != up.name:
                out[up.name] |= set(int(s) for s in steps[b.name])
    return out


class FeatureRecorder:
    """Records the outputs of named blocks over the steps of each chunk and accumulates, per
    block, the mean step-by-step cosine similarity matrix.

    Use: install it, run chunks, call :meth:`end_chunk` after each one. Each
    chunk must make the same number of network calls. The features of one chunk
    are kept only until its end, so memory is one chunk's worth.

    Args:
        net: the network (hooks go on its submodules).
        names: module names of the blocks.
    """

    def __init__(self, net: nn.Module, names: Sequence[str]) -> None:
        modules = dict(net.named_modules())
        unknown = [n for n in names if n not in modules]
        if unknown:
            raise ConfigError(f"cannot record {unknown}: not submodules of {type(net).__name__}")
        self.names = list(names)
        self._feats: dict[str, list[torch.Tensor]] = {n: [] for n in self.names}
        self._sum: dict[str, np.ndarray] = {}
        self.chunks = 0
        self.samples = 0
        self._hooks = [modules[n].register_forward_hook(self._hook(n)) for n in self.names]

    def _hook(self, name: str):
        def record(module, args, output):
            out = output[0] if isinstance(output, (tuple, list)) else output
            self._feats[name].append(out.detach().reshape(out.shape[0], -1).to(torch.float64))
        return record

    def end_chunk(self) -> None:
        """Fold the chunk just run into the similarity sums."""
        counts = {len(v) for v in self._feats.values()}
        if counts == {0}:
            return
        if len(counts) != 1:
            raise ConfigError(f"blocks ran different numbers of times in one chunk: {sorted(counts)}")
        for name, feats in self._feats.items():
            f = torch.stack(feats, dim=1)  # (B, K, D)
            f = f / f.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            gram = (f @ f.transpose(1, 2)).sum(0).numpy()  # (K, K), summed over the batch
            if name in self._sum and self._sum[name].shape != gram.shape:
                raise ConfigError(f"chunks made different numbers of network calls ({self._sum[name].shape[0]} "
                                  f"then {gram.shape[0]}): calibrate one sampler setting at a time")
            self._sum[name] = self._sum.get(name, 0.0) + gram
            batch = f.shape[0]
            feats.clear()
        self.chunks += 1
        self.samples += batch

    def similarity(self) -> dict[str, np.ndarray]:
        """Per block, the (K, K) mean cosine similarity over the samples recorded so far."""
        if not self.samples:
            raise ConfigError("no chunk recorded: run the policy (and end_chunk) before asking for similarities")
        return {n: s / self.samples for n, s in self._sum.items()}

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def __enter__(self) -> "FeatureRecorder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class BacCalibration:
    """What calibration measured for one sampler setting, and the schedules made from it.

    Attributes:
        setting: the sampler setting it belongs to, e.g. ``ddpm-100``.
        blocks: the blocks, in execution order.
        similarity: block name -> (K, K) mean cosine similarity.
        episodes, chunks: how much was recorded.
    """

    setting: str
    blocks: list[Block]
    similarity: dict[str, np.ndarray]
    episodes: int = 0
    chunks: int = 0

    @property
    def n_steps(self) -> int:
        return next(iter(self.similarity.values())).shape[0]

    def schedule(self, budget: int, top_k: int = 2) -> dict[str, set[int]]:
        """BAC's schedule for ``budget`` updates per block: the scheduler, then the Bubbling Union
        over the ``top_k`` most error-prone blocks. Each of those takes on the update steps of up to
        every deeper FFN, so a large ``top_k`` spends most of the budget saved."""
        own = {b.name: adaptive_steps(self.similarity[b.name], budget) for b in self.blocks}
        errors = {b.name: caching_error(self.similarity[b.name], own[b.name]) for b in self.blocks}
        return bubbling_union(own, self.blocks, errors, int(top_k))

    def uniform(self, budget: int) -> dict[str, set[int]]:
        """Every block updated at the same ``budget`` evenly spaced steps."""
        return uniform_block_schedule([b.name for b in self.blocks], self.n_steps, budget)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        doc = {"setting": self.setting, "episodes": self.episodes, "chunks": self.chunks,
               "blocks": [{"name": b.name, "kind": b.kind, "layer": b.layer} for b in self.blocks],
               "similarity": {n: np.round(s, 7).tolist() for n, s in self.similarity.items()}}
        path.write_text(json.dumps(doc))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "BacCalibration":
        path = Path(path)
        try:
            doc = json.loads(path.read_text())
            blocks = [Block(str(b["name"]), str(b["kind"]), int(b["layer"])) for b in doc["blocks"]]
            sim = {str(n): _check_sim(np.asarray(s)) for n, s in doc["similarity"].items()}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path} is not a BAC calibration file ({exc}); delete it to calibrate again") from exc
        missing = [b.name for b in blocks if b.name not in sim]
        if missing:
            raise ConfigError(f"{path} has no similarity for blocks {missing}; delete it to calibrate again")
        return cls(str(doc["setting"]), blocks, sim, int(doc.get("episodes", 0)), int(doc.get("chunks", 0)))
