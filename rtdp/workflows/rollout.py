"""Evaluation rollouts: episodes run in lockstep so the policy sees one batch.

The runner is the one place where a policy meets an environment outside the
real-time controller: ``rtdp eval``, periodic evaluation in ``rtdp train``, the
demo and the expert measurement all go through it.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from rtdp.envs import TaskSpec, expert as make_expert, make
from rtdp.errors import ConfigError

# Relative size of the observation perturbation (``perturb=``): a few float32 roundings
# (float32's machine epsilon is 1.2e-7), the size of the differences between two CPUs' arithmetic.
PERTURB_SCALE = 1e-6


@dataclass
class EpisodeResult:
    seed: int
    success: bool
    score: float
    length: int


@dataclass
class RolloutResult:
    episodes: list[EpisodeResult]
    frames: list[np.ndarray] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def success_rate(self) -> float:
        return float(np.mean([e.success for e in self.episodes])) if self.episodes else 0.0

    @property
    def mean_score(self) -> float:
        return float(np.mean([e.score for e in self.episodes])) if self.episodes else 0.0

    @property
    def n_success(self) -> int:
        return int(sum(e.success for e in self.episodes))


def _stack_history(histories: list[deque], keys: Sequence[str]) -> dict[str, np.ndarray]:
    """(B, To, ...) arrays from per-env deques of observation dicts."""
    return {k: np.stack([np.stack([o[k] for o in h]) for h in histories]) for k in keys}


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


def perturber(perturb: int | None, seed: int) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """The observation perturbation of one episode: identity, or rounding-level noise seeded by (perturb, seed).

    Float observations are multiplied by ``1 + PERTURB_SCALE * z``, z standard normal, drawn afresh
    at every step from a generator seeded by the perturbation seed and the episode's seed, so an
    episode is perturbed alike however episodes are batched. Integer observations (images) are untouched.

    Raises:
        ConfigError: a perturbation seed that is not a non-negative int.
    """
    if perturb is None:
        return lambda obs: obs
    if isinstance(perturb, bool) or not isinstance(perturb, (int, np.integer)) or perturb < 0:
        raise ConfigError(f"perturbation seeds must be non-negative ints, got {perturb!r}")
    rng = np.random.default_rng([int(perturb), int(seed)])

    def apply(obs: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for key, value in obs.items():
            arr = np.asarray(value)
            if np.issubdtype(arr.dtype, np.floating):
                arr = (arr * (1.0 + PERTURB_SCALE * rng.standard_normal(arr.shape))).astype(arr.dtype)
            out[key] = arr
        return out

    return apply


def rollout_policy(
    predict: Callable[[dict[str, np.ndarray], np.ndarray], np.ndarray],
    task: TaskSpec,
    seeds: Sequence[int],
    *,
    n_obs_steps: int,
    obs_keys: Sequence[str],
    batch: int = 50,
    record_first: bool = False,
    progress: bool = True,
    env_kwargs: dict[str, Any] | None = None,
    reset: Callable[[], None] | None = None,
    perturb: int | None = None,
) -> RolloutResult:
    """Run one episode per seed with a chunking policy, ``batch`` episodes at a time.

    Args:
        predict: ``predict(obs, rows)`` maps ``{key: (B, To, ...)}`` observations
            of the still-running episodes to ``(B, Ta, Da)`` actions in
            environment units; ``rows`` (B,) says which episodes of the current
            lockstep batch they are (a stateful policy, e.g. streaming, keeps
            one buffer per row). Every returned action is executed before the
            next call (Diffusion Policy's receding horizon).
        task: the task to run.
        seeds: one reset seed per episode.
        n_obs_steps: observation history length To; the first observation is
            repeated to fill it at reset, as Diffusion Policy's wrapper does.
        obs_keys: observation keys the policy reads.
        batch: episodes stepped in lockstep.
        record_first: keep rendered frames of the first episode for a video.
        reset: called before every lockstep batch (new episodes start).
        perturb: a perturbation seed: the policy sees observations with
            rounding-level noise (``perturber``); None (default): exactly the env's.
    """
    start = time.perf_counter()
    results: list[EpisodeResult] = []
    frames: list[np.ndarray] = []
    envs: list = []
    bar = _progress(len(seeds) * task.max_steps, f"eval {task.name}", progress)
    try:
        for b0 in range(0, len(seeds), batch):
            chunk = list(seeds[b0 : b0 + batch])
            while len(envs) < len(chunk):
                envs.append(make(task, **(env_kwargs or {})))
            hist, done = [], [False] * len(chunk)
            score, success, length = [0.0] * len(chunk), [False] * len(chunk), [0] * len(chunk)
            seen = [perturber(perturb, seed) for seed in chunk]
            for i, seed in enumerate(chunk):
                obs, _ = envs[i].reset(seed=int(seed))
                hist.append(deque([seen[i](obs)] * n_obs_steps, maxlen=n_obs_steps))
            if reset is not None:
                reset()
            record = record_first and b0 == 0
            if record:
                frames.append(envs[0].render())
            while not all(done):
                active = [i for i in range(len(chunk)) if not done[i]]
                actions = np.asarray(predict(_stack_history([hist[i] for i in active], obs_keys), np.asarray(active)))
                for k in range(actions.shape[1]):
                    for j, i in enumerate(active):
                        if done[i]:
                            continue
                        obs, _, terminated, truncated, info = envs[i].step(actions[j, k])
                        hist[i].append(seen[i](obs))
                        length[i] += 1
                        score[i] = max(score[i], float(info.get("score", 0.0)))
                        success[i] = success[i] or bool(info.get("is_success", False))
                        if record and i == 0:
                            frames.append(envs[0].render())
                        if terminated or truncated:
                            done[i] = True
                            bar.update(task.max_steps - length[i])
                        bar.update(1)
            results += [EpisodeResult(int(s), success[i], score[i], length[i]) for i, s in enumerate(chunk)]
    finally:
        bar.close()
        for env in envs:
            env.close()
    return RolloutResult(results, frames, time.perf_counter() - start)


def rollout_expert(
    task: TaskSpec,
    seeds: Sequence[int],
    *,
    record_first: bool = False,
    progress: bool = True,
    keep_data: bool = False,
    env_kwargs: dict[str, Any] | None = None,
    on_episode: Callable[[EpisodeResult, dict[str, np.ndarray] | None], None] | None = None,
) -> RolloutResult:
    """Run the task's scripted expert once per seed.

    With ``keep_data`` the observations and actions of every episode are
    handed to ``on_episode`` as ``{key: (T, ...)}`` arrays (obs keys + ``action``).
    """
    start = time.perf_counter()
    env = make(task, **(env_kwargs or {}))
    exp = make_expert(env)
    results, frames = [], []
    bar = _progress(len(seeds), f"expert {task.name}", progress)
    try:
        for n, seed in enumerate(seeds):
            obs, _ = env.reset(seed=int(seed))
            exp.reset()
            steps: list[dict[str, np.ndarray]] = []
            score, success, length = 0.0, False, 0
            record = record_first and n == 0
            if record:
                frames.append(env.render())
            while True:
                action = np.asarray(exp.act(obs), dtype=np.float32)
                if keep_data:
                    steps.append({**obs, "action": action})
                obs, _, terminated, truncated, info = env.step(action)
                length += 1
                score = max(score, float(info.get("score", 0.0)))
                success = success or bool(info.get("is_success", False))
                if record:
                    frames.append(env.render())
                if terminated or truncated:
                    break
            result = EpisodeResult(int(seed), success, score, length)
            results.append(result)
            if on_episode is not None:
                data = {k: np.stack([s[k] for s in steps]) for k in steps[0]} if keep_data else None
                on_episode(result, data)
            bar.update(1)
            bar.set_postfix(success=f"{sum(r.success for r in results)}/{len(results)}")
    finally:
        bar.close()
        env.close()
    return RolloutResult(results, frames, time.perf_counter() - start)
