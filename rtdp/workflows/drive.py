"""``rtdp collect / eval / bench task=highway``: driving scenes, the PDM score, planners side by side.

A driving planner is trained and scored on *scenes* (``rtdp.envs.highway``),
not on episodes: ``rtdp collect task=highway scenes=N`` drives the scripted
expert on seeds ``seed, seed+1, ...`` and appends each episode's scenes to
the zarr replay buffer as one episode; ``rtdp eval`` scores a planner's plans
with NAVSIM's PDM score (``rtdp.envs.highway_score``) on the held-out scenes
of the evaluation seeds (100000..., never used for training), generated on
the spot and kept under ``outputs/scenes``; ``rtdp bench`` times and scores
several planners on the same scenes.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import time
from pathlib import Path
from typing import Any

import numpy as np

from rtdp.envs import get_task
from rtdp.errors import ConfigError, DatasetError

SCENE_CACHE = Path("outputs/scenes")


def _episode_scenes(args: tuple[str, int]) -> tuple[int, list[dict[str, np.ndarray]]]:
    """Scenes of one expert episode (worker side)."""
    import warnings

    from rtdp.envs.highway import HighwayEnv, expert_episode

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    scenario, seed = args
    env = _ENVS.get(scenario)
    if env is None:
        env = _ENVS[scenario] = HighwayEnv(scenario)
    return seed, expert_episode(env, seed)


_ENVS: dict[str, Any] = {}  # one environment per scenario and process, reused across episodes


def _stack(scenes: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    from rtdp.envs.highway import SCENE_KEYS

    return {k: np.stack([s[k] for s in scenes]).astype(np.float32) for k in SCENE_KEYS}


def iter_episodes(seeds: list[int], scenario: str = "mixed", workers: int = 1):
    """Yield ``(seed, scenes)`` in seed order, episodes driven in ``workers`` processes."""
    jobs = [(scenario, int(s)) for s in seeds]
    if workers <= 1:
        for job in jobs:
            yield _episode_scenes(job)
        return
    with mp.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(_episode_scenes, jobs)


def collect_scenes(out: str | Path, scenes: int, *, seed: int = 0, scenario: str = "mixed", workers: int = 1,
                   progress: bool = True) -> dict[str, Any]:
    """Append expert episodes' scenes to the zarr store ``out`` until it holds ``scenes`` more.

    Each episode is one crash-safe append, so an interrupted run keeps what it wrote.

    Returns:
        a summary: ``task``, ``out``, ``episodes``, ``scenes``, ``seeds`` ([first, last]), ``per_scenario``.
    """
    from tqdm.auto import tqdm

    from rtdp.data.replay_buffer import ReplayBuffer
    from rtdp.envs.highway import SCENARIOS, scenario_of

    scenario_of(scenario)
    if int(scenes) < 1:
        raise ConfigError(f"scenes must be a positive number of scenes to log, got {scenes!r}")
    out = Path(out)
    buffer = ReplayBuffer.open(out, mode="a") if out.exists() else ReplayBuffer.create(out)
    got, episodes, counts = 0, 0, {s: 0 for s in SCENARIOS}
    bar = tqdm(total=int(scenes), desc="collect highway scenes", unit="scene", disable=not progress)
    next_seed = int(seed)
    last_seed = next_seed - 1
    try:
        while got < int(scenes):
            batch = list(range(next_seed, next_seed + 8 * max(1, workers)))
            next_seed = batch[-1] + 1
            for s, ep in iter_episodes(batch, scenario, workers):
                if got >= int(scenes):
                    break
                last_seed = s
                if not ep:
                    continue
                buffer.add_episode(_stack(ep))
                got += len(ep)
                episodes += 1
                counts[SCENARIOS[int(ep[0]["scenario"][0])]] += len(ep)
                bar.update(len(ep))
    finally:
        bar.close()
    return {"task": "highway", "out": str(out), "episodes": episodes, "scenes": got, "seeds": [int(seed), last_seed],
            "per_scenario": {k: v for k, v in counts.items() if v}, "store_episodes": buffer.n_episodes,
            "store_steps": buffer.n_steps}


def held_out_scenes(n: int, *, first_seed: int, scenario: str = "mixed", workers: int = 1,
                    cache: Path | None = SCENE_CACHE) -> dict[str, np.ndarray]:
    """The first ``n`` scenes of the expert episodes on seeds ``first_seed, first_seed + 1, ...``, batched.

    Kept in ``cache`` (one zarr store per scenario, first seed and count) so
    that every planner is scored on the same scenes without driving them again.
    """
    import shutil

    from rtdp.data.replay_buffer import ReplayBuffer

    if cache is None:
        got: list[dict[str, np.ndarray]] = []
        for _, ep in iter_episodes(list(range(int(first_seed), int(first_seed) + 10 * n)), scenario, 1):
            got += ep
            if len(got) >= n:
                break
        return _stack(got[:n])
    path = Path(cache) / f"highway-{scenario}-from{int(first_seed)}-{int(n)}.zarr"
    if not path.exists():
        tmp = path.with_suffix(".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        collect_scenes(tmp, n, seed=first_seed, scenario=scenario, workers=workers)
        tmp.rename(path)  # complete stores only
    data = ReplayBuffer.open(path, mode="r").load()
    return {k: v[:n] for k, v in data.items()}


def run_collect(cfg) -> dict[str, Any]:
    """CLI entry: ``rtdp collect task=highway scenes=N out=PATH [seed=0] [scenario=mixed] [workers=1]``."""
    if cfg.get("scenes") is None:
        raise ConfigError("task=highway logs scenes: pass scenes=N (e.g. scenes=8000) instead of episodes=")
    summary = collect_scenes(cfg.out, int(cfg.scenes), seed=int(cfg.seed), scenario=str(cfg.get("scenario", "mixed")),
                             workers=int(cfg.workers))
    print(f"logged {summary['scenes']} scenes from {summary['episodes']} expert episodes "
          f"(seeds {summary['seeds'][0]}..{summary['seeds'][1]}; {summary['per_scenario']}); "
          f"{summary['out']} now holds {summary['store_steps']} scenes")
    if cfg.get("json"):
        Path(cfg.json).write_text(json.dumps(summary, indent=2))
    return summary
