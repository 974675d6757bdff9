"""``rtdp collect``: roll out a task's scripted expert into a zarr replay buffer.

Episodes are written in seed order, each as one crash-safe append (data
first, episode end last), so an interrupted collection keeps every episode
that was finished and ``rtdp collect`` can be run again to add more.
"""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path
from typing import Any

import numpy as np

from rtdp.envs import get_task
from rtdp.errors import ConfigError
from rtdp.workflows.metrics import wilson_interval
from rtdp.workflows.rollout import EpisodeResult, rollout_expert


def _worker(task_name: str, seeds: list[int], queue) -> None:
    """Collect a shard of seeds in a child process and send episodes back."""
    task = get_task(task_name)

    def send(result: EpisodeResult, data: dict[str, np.ndarray] | None) -> None:
        queue.put((result, data))

    try:
        rollout_expert(task, seeds, keep_data=True, progress=False, on_episode=send)
    except BaseException as exc:  # surface the failure in the parent
        queue.put(("error", repr(exc)))


def collect(
    task_name: str,
    episodes: int,
    out: str | Path,
    *,
    seed: int = 0,
    keep_failed: bool = False,
    workers: int = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """Collect ``episodes`` expert episodes on seeds ``seed .. seed+episodes-1``.

    Returns a summary: attempted, kept, expert success rate with its Wilson
    interval, mean score, and the store's episode/step counts.
    """
    from tqdm.auto import tqdm

    from rtdp.data.replay_buffer import ReplayBuffer

    task = get_task(task_name)
    if episodes < 1:
        raise ConfigError(f"episodes must be >= 1, got {episodes}")
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    out = Path(out)
    buffer = ReplayBuffer.open(out, mode="a") if out.exists() else ReplayBuffer.create(out)
    seeds = list(range(seed, seed + episodes))
    results: list[EpisodeResult] = []
    bar = tqdm(total=episodes, desc=f"collect {task.name}", disable=not progress, dynamic_ncols=True)

    def commit(result: EpisodeResult, data: dict[str, np.ndarray]) -> None:
        results.append(result)
        if result.success or keep_failed:
            buffer.add_episode(data)
        bar.update(1)
        bar.set_postfix(kept=buffer.n_episodes, success=f"{sum(r.success for r in results)}/{len(results)}")

    try:
        if workers == 1:
            rollout_expert(task, seeds, keep_data=True, progress=False, on_episode=commit)
        else:
            ctx = mp.get_context("spawn")
            queue = ctx.Queue(maxsize=4 * workers)
            procs = [ctx.Process(target=_worker, args=(task.name, seeds[w::workers], queue)) for w in range(workers)]
            for p in procs:
                p.start()
            pending: dict[int, tuple[EpisodeResult, dict]] = {}
            next_i = 0
            try:
                for _ in range(episodes):
                    item = queue.get()
                    if item[0] == "error":
                        raise RuntimeError(f"a collection worker failed: {item[1]}")
                    result, data = item
                    pending[result.seed] = (result, data)
                    # write in seed order so a store does not depend on worker timing
                    while next_i < episodes and seeds[next_i] in pending:
                        commit(*pending.pop(seeds[next_i]))
                        next_i += 1
            finally:
                for p in procs:
                    p.join(timeout=5)
                    if p.is_alive():
                        p.terminate()
    finally:
        bar.close()
    n_ok = sum(r.success for r in results)
    return {
        "task": task.name,
        "out": str(out),
        "attempted": len(results),
        "expert_success_rate": n_ok / max(1, len(results)),
        "expert_success_ci95": list(wilson_interval(n_ok, len(results))),
        "expert_mean_score": float(np.mean([r.score for r in results])) if results else 0.0,
        "mean_length": float(np.mean([r.length for r in results])) if results else 0.0,
        "store_episodes": buffer.n_episodes,
        "store_steps": buffer.n_steps,
    }


def run(cfg) -> dict[str, Any]:
    """CLI entry: ``rtdp collect task=... episodes=N out=PATH``."""
    summary = collect(
        cfg.task.name,
        int(cfg.episodes),
        cfg.out,
        seed=int(cfg.seed),
        keep_failed=bool(cfg.keep_failed),
        workers=int(cfg.workers),
    )
    print(
        f"collected {summary['attempted']} episodes of {summary['task']}: expert success "
        f"{summary['expert_success_rate']:.1%} (95% CI {summary['expert_success_ci95'][0]:.2f}-"
        f"{summary['expert_success_ci95'][1]:.2f}), mean score {summary['expert_mean_score']:.3f}; "
        f"store {summary['out']} now holds {summary['store_episodes']} episodes, {summary['store_steps']} steps"
    )
    if cfg.get("json"):
        Path(cfg.json).write_text(json.dumps(summary, indent=2))
    return summary
