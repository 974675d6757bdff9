"""``rtdp eval``: success, score and latency of a checkpoint (or the expert).

Success and score come from episodes run in lockstep on the task's
evaluation seeds; latency is measured separately at batch 1, after warm-up,
with torch threads set to the physical core count, as DESIGN.md defines it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from rtdp.envs import TASKS, TaskSpec, get_task
from rtdp.errors import CheckpointError, ConfigError
from rtdp.workflows.metrics import percentiles_ms, wilson_interval
from rtdp.workflows.report import plot_eval, print_table, write_video
from rtdp.workflows.rollout import RolloutResult, rollout_expert, rollout_policy


def load_checkpoint(path: str | Path):
    """Load a policy checkpoint (any policy type) and the task it was trained on.

    Returns:
        (policy, meta): the policy in eval mode and ``meta.json``'s content
        (``{}`` when the folder has none).
    """
    from rtdp.policies import load_policy

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder {path} does not exist; pass checkpoint=<run>/checkpoint")
    policy = load_policy(path).eval()
    meta_path = path / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    return policy, meta


def _obs_keys(policy) -> list[str]:
    return [*policy.config.lowdim_shapes, *policy.config.image_shapes]


def evaluate_checkpoint_policy(
    policy,
    task: TaskSpec,
    seeds: Sequence[int],
    *,
    sampler: str | None = None,
    steps: int | None = None,
    batch: int = 50,
    record_first: bool = False,
    progress: bool = True,
    seed: int = 0,
    nfe_log: list[int] | None = None,
    obs_log: list[dict[str, np.ndarray]] | None = None,
    perturb: int | None = None,
    **options: Any,
) -> RolloutResult:
    """Roll a policy out on ``seeds`` with one inference setting (see ``rtdp.policies.runner``).

    ``nfe_log``, when given, receives the network evaluations per sample of every (batched) call;
    ``obs_log`` every (batched) observation window the policy was asked to act on; ``perturb``
    a perturbation seed (``rtdp.workflows.rollout.perturber``; None: the exact observations).
    """
    from rtdp.policies.runner import Runner

    runner = Runner(policy, sampler, steps, seed=seed, **options)

    def predict(obs: dict[str, np.ndarray], rows: np.ndarray) -> np.ndarray:
        out = runner.predict(obs, rows).detach().cpu().numpy()
        if obs_log is not None:
            obs_log.append({k: np.array(v) for k, v in obs.items()})
        if nfe_log is not None:
            nfe_log.append(runner.last_sample_nfe)
        return out

    was_training = policy.training
    policy.eval()
    try:
        return rollout_policy(
            predict, task, seeds, n_obs_steps=policy.config.n_obs_steps, obs_keys=_obs_keys(policy),
            batch=batch, record_first=record_first, progress=progress, reset=runner.reset, perturb=perturb,
        )
    finally:
        policy.train(was_training)


def measure_latency(policy, task: TaskSpec, *, sampler: str | None, steps: int | None, calls: int = 50,
                    warmup: int = 5, **options: Any) -> dict[str, Any]:
    """Wall time of one inference call at batch 1 on a real observation (after ``warmup`` calls)."""
    from rtdp.envs import make
    from rtdp.policies.runner import Runner

    env = make(task)
    try:
        obs, _ = env.reset(seed=int(task.eval_seeds[0]))
    finally:
        env.close()
    keys = _obs_keys(policy)
    batch = {k: np.stack([obs[k]] * policy.config.n_obs_steps)[None] for k in keys}
    return time_runner(Runner(policy, sampler, steps, seed=0, **options), batch, calls=calls, warmup=warmup)


def time_runner(runner, obs: dict[str, np.ndarray], *, calls: int = 50, warmup: int = 5) -> dict[str, Any]:
    """Median/p99 wall time of ``runner.predict(obs)`` over ``calls`` calls after ``warmup``, with NFE per call."""
    return time_runners([runner], obs, calls=calls, warmup=warmup)[0]


REWARM_BELOW_S = 0.05  # time_runners re-warms a runner between rounds only when its calls are shorter


def time_runners(runners: list, obs: dict[str, np.ndarray], *, calls: int = 50, warmup: int = 5,
                 rounds: int = 1, progress: bool = False) -> list[dict[str, Any]]:
    """Time several runners side by side: ``time_runner``'s keys for each, in order.

    With ``rounds`` > 1 the calls are interleaved: every runner is warmed up, then
    each round times ``calls / rounds`` consecutive calls of every runner in turn,
    after one untimed call that brings its weights back into the caches (left out
    for calls over ``REWARM_BELOW_S``, where the caches do not matter). A slow
    spell of a shared machine then falls on every runner alike instead of on
    whichever was being timed, so the ratios of the medians hold steadier.
    """
    import torch
    from tqdm.auto import tqdm

    rounds = max(1, min(int(rounds), int(calls)))
    per_round = [calls // rounds + (1 if r < calls % rounds else 0) for r in range(rounds)]
    times: list[list[float]] = [[] for _ in runners]
    nfes: list[list[int]] = [[] for _ in runners]
    bar = tqdm(total=len(runners) * (warmup + calls + rounds - 1), desc="timing", unit="call",
               disable=not progress, dynamic_ncols=True)
    with torch.no_grad(), bar:
        for runner in runners:
            for _ in range(warmup):
                runner.predict(obs)
                bar.update()
        for r, n in enumerate(per_round):
            for i, runner in enumerate(runners):
                if r > 0 and times[i][-1] < REWARM_BELOW_S:
                    runner.predict(obs)
                    bar.update()
                elif r > 0:
                    bar.total -= 1  # no re-warm call for this runner
                for _ in range(n):
                    t0 = time.perf_counter()
                    runner.predict(obs)
                    times[i].append(time.perf_counter() - t0)
                    nfes[i].append(runner.last_nfe)
                    bar.update()
    out = []
    for runner, t, n in zip(runners, times, nfes):
        p50, p99 = percentiles_ms(t)
        out.append({
            "nfe_per_chunk": int(np.median(n)),
            "latency_ms_p50": p50,
            "latency_ms_p99": p99,
            "ms_per_action": p50 / runner.n_action_steps,
            "n_action_steps": runner.n_action_steps,
            "latency_samples_ms": [x * 1e3 for x in t],
        })
    return out


def evaluate(
    checkpoint: str | Path | None,
    *,
    task_name: str | None = None,
    episodes: int = 50,
    sampler: str | None = None,
    steps: int | None = None,
    out: str | Path | None = None,
    video: bool = True,
    batch: int = 50,
    latency_calls: int = 50,
    threads: int = 2,
    seed: int = 0,
    use_expert: bool = False,
    precision: str | None = None,
    first_seed: int | None = None,
    record_obs: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate and return the report dict (DESIGN.md's keys for ``rtdp eval``).

    ``first_seed`` runs seeds first_seed, first_seed + 1, ... instead of the
    task's evaluation seeds (to roll out on states that are not the test set);
    ``record_obs`` writes every observation window the policy acted on to
    that ``.npz`` ({key: (N, To, ...)}), for ``rtdp train anchor_obs=``.
    """
    import torch

    torch.set_num_threads(threads)
    if use_expert:
        if not task_name:
            raise ConfigError(f"expert=true evaluates a task's scripted expert: name it, task=NAME "
                              f"(known: {', '.join(TASKS)})")
        task = get_task(task_name)
        policy, meta = None, {}
    else:
        if checkpoint is None:
            raise CheckpointError("rtdp eval needs checkpoint=<folder> (or expert=true task=<name>)")
        policy, meta = load_checkpoint(checkpoint)
        if not (task_name or meta.get("task")):
            raise ConfigError(f"{checkpoint} does not say which task it was trained on (no meta.json): pass task=NAME "
                              f"(known: {', '.join(TASKS)})")
        task = get_task(task_name or meta.get("task"))
    seeds = task.seeds(episodes) if first_seed is None else list(range(int(first_seed), int(first_seed) + episodes))
    if record_obs is not None and use_expert:
        raise ConfigError("record_obs records the windows a checkpoint acts on; the scripted expert reads none")
    if record_obs is not None and Path(record_obs).suffix != ".npz":
        raise ConfigError(f"record_obs must name a .npz file, got {record_obs}")
    obs_log: list[dict[str, np.ndarray]] | None = [] if record_obs is not None else None
    if out is None:  # under the working directory, never beside a checkpoint that is only read
        out = Path("outputs/eval") / (f"expert_{task.name}" if use_expert else Path(checkpoint).resolve().parent.name)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)

    if use_expert:
        result = rollout_expert(task, seeds, record_first=video)
        per_action_ms = 1e3 * result.wall_s / max(1, sum(e.length for e in result.episodes))
        lat = {"nfe_per_chunk": 0, "latency_ms_p50": per_action_ms, "latency_ms_p99": None,
               "ms_per_action": per_action_ms, "latency_samples_ms": []}
        sampler_name, steps_used = "expert", None
    else:
        from rtdp.policies.runner import Runner

        # a bad sampler, steps or precision fails here, before any episode runs; the policy's own
        # default (cm for a consistency checkpoint, edm for an EDM one) when none is given
        probe = Runner(policy, sampler, None if steps is None else int(steps), precision=precision)
        sampler_name, steps_used = probe.name, int(probe.steps)
        result = evaluate_checkpoint_policy(policy, task, seeds, sampler=sampler_name, steps=steps_used,
                                            batch=batch, record_first=video, seed=seed, precision=precision,
                                            obs_log=obs_log)
        if obs_log is not None:
            Path(record_obs).parent.mkdir(parents=True, exist_ok=True)
            np.savez(record_obs, **{k: np.concatenate([o[k] for o in obs_log]) for k in obs_log[0]})
        lat = measure_latency(policy, task, sampler=sampler_name, steps=steps_used, calls=latency_calls,
                              precision=precision)

    n_ok = result.n_success
    ci = wilson_interval(n_ok, len(result.episodes))
    video_path = None
    if video and result.frames:
        fps = task.video_fps
        video_path = str(write_video(result.frames, out_dir / f"rollout_{task.name}_seed{seeds[0]}", fps))
    plot_path = str(plot_eval(out_dir / "eval.png", [e.score for e in result.episodes],
                              [e.success for e in result.episodes], lat["latency_samples_ms"],
                              f"{task.name}: {sampler_name}-{steps_used}"))
    report = {
        "task": task.name,
        "checkpoint": str(checkpoint) if checkpoint else None,
        "sampler": sampler_name,
        "steps": steps_used,
        "precision": precision,
        "episodes": len(result.episodes),
        "success_rate": result.success_rate,
        "success_ci95": list(ci),
        "mean_score": result.mean_score,
        "nfe_per_chunk": lat["nfe_per_chunk"],
        "latency_ms_p50": lat["latency_ms_p50"],
        "latency_ms_p99": lat["latency_ms_p99"],
        "ms_per_action": lat["ms_per_action"],
        "threads": threads,
        "eval_wall_s": round(result.wall_s, 1),
        "video": video_path,
        "plot": plot_path,
        "per_episode": [e.__dict__ for e in result.episodes],
    }
    if record_obs is not None:
        report["recorded_obs"] = {"path": str(record_obs), "windows": sum(len(next(iter(o.values()))) for o in obs_log)}
    if meta:
        report["train"] = {k: meta.get(k) for k in ("n_episodes", "train_steps", "train_time_s", "data") if k in meta}
    return report


def print_report(report: dict[str, Any]) -> None:
    lo, hi = report["success_ci95"]
    rows = [
        ("task", report["task"]),
        ("policy", report["checkpoint"] or "scripted expert"),
        ("sampler", (f"{report['sampler']}-{report['steps']}" if report["steps"] else report["sampler"])
         + (f" (network {report['precision']})" if report.get("precision") else "")),
        ("episodes", str(report["episodes"])),
        ("success rate", f"{report['success_rate']:.1%}  (95% CI {lo:.1%}-{hi:.1%})"),
        ("mean score", f"{report['mean_score']:.3f}"),
        ("NFE per chunk", str(report["nfe_per_chunk"])),
    ]
    if report["latency_ms_p99"] is not None:
        rows += [("latency per chunk", f"{report['latency_ms_p50']:.1f} ms median, {report['latency_ms_p99']:.1f} ms p99"),
                 ("per executed action", f"{report['ms_per_action']:.2f} ms")]
    else:
        rows += [("per action", f"{report['ms_per_action']:.2f} ms")]
    if report.get("video"):
        rows.append(("video", report["video"]))
    rows.append(("plot", report["plot"]))
    print_table(f"rtdp eval: {report['task']}", rows)


def run(cfg) -> dict[str, Any]:
    """CLI entry: ``rtdp eval checkpoint=DIR episodes=50 sampler=ddim steps=10 json=PATH``."""
    from rtdp.cli import task_name

    if cfg.get("select") is not None:
        raise ConfigError("select= chooses among a driving planner's candidates (task=highway); an action policy "
                          "returns one chunk")
    report = evaluate(
        None if cfg.expert else cfg.checkpoint,
        task_name=task_name(cfg),
        episodes=int(cfg.episodes),
        sampler=cfg.sampler,
        steps=cfg.steps,
        out=cfg.out,
        video=bool(cfg.video),
        batch=int(cfg.batch),
        latency_calls=int(cfg.latency_calls),
        threads=int(cfg.threads),
        seed=int(cfg.seed),
        use_expert=bool(cfg.expert),
        precision=cfg.get("precision"),
        first_seed=cfg.get("first_seed"),
        record_obs=cfg.get("record_obs"),
    )
    print_report(report)
    if cfg.json:
        Path(cfg.json).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.json).write_text(json.dumps(report, indent=2))
    return report
