"""``rtdp collect``: roll out a task's scripted expert into a zarr replay buffer.

Episodes are written in seed order, each as one crash-safe append (data
first, episode end last), so an interrupted collection keeps every episode
that was finished and ``rtdp collect`` can be run again to add more.

With ``workers > 1`` every worker process collects its own shard of the seeds
and the parent writes the episodes in seed order as they arrive. A worker that
fails, dies (killed, out of memory) or stops sending for ``stall_timeout_s``
ends the collection with a :class:`CollectError` instead of a wait that never
ends; the episodes written before it stay in the store.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import queue as queue_mod
import time
from pathlib import Path
from typing import Any

import numpy as np

from rtdp.envs import TASK_MODULES, get_task
from rtdp.errors import ConfigError, RtdpError
from rtdp.workflows.metrics import wilson_interval
from rtdp.workflows.rollout import EpisodeResult, rollout_expert

#: how often the parent checks that its workers are alive while it waits for an episode
_POLL_S = 0.5


class CollectError(RtdpError):
    """A collection worker failed, died, or stopped sending episodes."""


def _worker(task_name: str, seeds: list[int], queue, index: int = 0, module: str | None = None) -> None:
    """Collect a shard of seeds in a child process and send episodes back.

    ``module`` registers the task in this fresh process when it comes from outside rtdp (``TASK_MODULES``).
    """
    try:
        task = get_task(task_name, module)

        def send(result: EpisodeResult, data: dict[str, np.ndarray] | None) -> None:
            queue.put((result, data))

        rollout_expert(task, seeds, keep_data=True, progress=False, on_episode=send)
    except BaseException as exc:  # surface the failure in the parent
        queue.put(("error", index, f"{type(exc).__name__}: {exc}"))


def _gather(queue, capacity: int, procs: list, shards: list[list[int]], on_episode, *,
            stall_timeout_s: float) -> None:
    """Hand every episode of every shard to ``on_episode``; raise :class:`CollectError` if one cannot come.

    ``queue.get`` alone would wait forever for the episodes of a worker that
    died, so the wait is cut into short polls and between them the workers'
    exit codes are read.
    """
    expected = {seed: w for w, shard in enumerate(shards) for seed in shard}
    received: set[int] = set()
    last_item = time.monotonic()

    def take(item) -> None:
        nonlocal last_item
        if item[0] == "error":
            _, w, message = item
            raise CollectError(f"collection worker {w} (seeds {_span(shards[w])}) failed: {message}")
        result, data = item
        received.add(result.seed)
        last_item = time.monotonic()
        on_episode(result, data)

    def drain() -> None:
        # What a worker sent before it exited is still in the pipe, among at most `capacity` queued items.
        for _ in range(capacity):
            try:
                take(queue.get(timeout=_POLL_S))
            except queue_mod.Empty:
                return

    while len(received) < len(expected):
        try:
            take(queue.get(timeout=_POLL_S))
            continue
        except queue_mod.Empty:
            pass
        ended = [w for w, p in enumerate(procs) if p.exitcode is not None
                 and any(s not in received for s in shards[w])]
        if ended:
            drain()
            for w in ended:
                missing = [s for s in shards[w] if s not in received]
                if missing:
                    code = procs[w].exitcode
                    how = "ended" if code == 0 else f"died (exit code {code})"
                    raise CollectError(f"collection worker {w} {how} before sending the episodes of seeds "
                                       f"{_span(missing)}")
        elif time.monotonic() - last_item > stall_timeout_s:
            raise CollectError(f"no episode from the collection workers for {stall_timeout_s:.0f} s "
                               f"({len(received)} of {len(expected)} received); a worker is stuck")


def _span(seeds: list[int]) -> str:
    return ", ".join(map(str, seeds)) if len(seeds) <= 4 else f"{seeds[0]}, {seeds[1]}, ... {seeds[-1]}"


def collect(
    task_name: str,
    episodes: int,
    out: str | Path,
    *,
    seed: int = 0,
    keep_failed: bool = False,
    workers: int = 1,
    progress: bool = True,
    stall_timeout_s: float = 600.0,
) -> dict[str, Any]:
    """Collect ``episodes`` expert episodes on seeds ``seed .. seed+episodes-1``.

    Args:
        workers: processes collecting in parallel; episodes are written in seed order either way.
        stall_timeout_s: with ``workers > 1``, how long the workers may go without sending an
            episode before the collection is declared stuck.

    Returns:
        A summary: attempted, kept, expert success rate with its Wilson
        interval, mean score, and the store's episode/step counts.

    Raises:
        CollectError: a worker failed, died or stalled (``workers > 1``); the
            episodes written before it stay in the store, and the message says
            how to continue.
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
            capacity = 4 * workers
            queue = ctx.Queue(maxsize=capacity)
            shards = [seeds[w::workers] for w in range(workers)]
            module = TASK_MODULES.get(task.name)
            procs = [ctx.Process(target=_worker, args=(task.name, shards[w], queue, w, module), daemon=True,
                                 name=f"rtdp-collect-{w}") for w in range(workers)]
            for p in procs:
                p.start()
            pending: dict[int, tuple[EpisodeResult, dict]] = {}
            next_i = 0

            def arrived(result: EpisodeResult, data: dict) -> None:
                nonlocal next_i
                pending[result.seed] = (result, data)
                # write in seed order so a store does not depend on worker timing
                while next_i < episodes and seeds[next_i] in pending:
                    commit(*pending.pop(seeds[next_i]))
                    next_i += 1

            failed = True
            try:
                _gather(queue, capacity, procs, shards, arrived, stall_timeout_s=float(stall_timeout_s))
                failed = False
            except CollectError as exc:
                done = (f"seeds {seed}..{seeds[next_i] - 1} are done and their episodes stay in {out}"
                        if next_i else f"no episode was written to {out}")
                raise CollectError(f"{exc}; {done}; continue with seed={seeds[next_i]} "
                                   f"episodes={episodes - next_i}") from None
            finally:
                for p in procs:
                    if failed and p.is_alive():
                        p.terminate()  # the others' episodes past the gap cannot be written in order
                    p.join(timeout=5)
                    if p.is_alive():
                        p.kill()
                        p.join(timeout=5)
                queue.close()
                queue.cancel_join_thread()
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
