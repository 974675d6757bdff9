"""``rtdp bench``: latency, NFE, fidelity and (optionally) success of inference configurations.

Every configuration is named ``<sampler>-<steps>[+<option>...]`` (DESIGN.md):
``ddpm-100``, ``ddim-10``, ``dpmpp-8``, ``edm-3``, ``stream-1``, ``cm-1``,
``edm-3+g0`` (guidance scale 0), ``edm-3+skip0.95`` (guidance skipping at
cosine 0.95). Each runs on the checkpoint that can serve it: ``cm`` on a
consistency checkpoint, ``edm`` / ``stream`` on an EDM checkpoint, core
samplers on a DDPM (epsilon) checkpoint, or the EDM one if there is none.

Timing follows DESIGN.md: batch 1, torch threads = physical cores, warm-up
excluded, median and p99 over ``calls`` calls, all configurations measured
side by side in one process, their calls interleaved over ``rounds`` rounds
(``time_runners``). ``floor_ms_per_nfe`` is the time to stream the
network's weights once from memory at the bandwidth measured on the spot:
a batch-1 evaluation cannot be faster than that on this machine.
``action_mse`` compares each configuration's actions with ``ddpm-100`` of the
same checkpoint from the same noise and observations (normalised units).

With no checkpoint, ``size=dp_lowdim`` / ``size=dp_image`` (or small/medium)
times freshly initialised policies of that U-Net size for the task's
observation shapes: timing only, no success and no fidelity.

``+anchor<T>`` (e.g. ``ddim-2+anchor30``) starts a DDPM checkpoint from the
nearest of its k-means action anchors noised to training step T
(``rtdp.policies.ddpm``). The anchors come from the replay buffer
``anchor_data`` (default: the ``data`` the checkpoint's ``meta.json`` names),
made once by ``action_anchors`` and cached beside the BAC calibrations.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

from rtdp.envs import TaskSpec, get_task
from rtdp.errors import ConfigError, UnknownNameError
from rtdp.core.options import BenchConfig, parse_config  # noqa: F401  (the names rtdp bench reads)
from rtdp.workflows.calibrate import action_anchors, anchor_data_path  # noqa: F401  (rtdp bench's +anchor<T>)
from rtdp.workflows.machine import device_name, memory_bandwidth_gbs, physical_cores
from rtdp.workflows.metrics import paired_comparison, wilson_interval

log = logging.getLogger("rtdp.bench")

def _fresh_policies(task: TaskSpec, size: str) -> list:
    """One fresh policy of every family with U-Net sizes, randomly initialised, for timing.

    They share the same weights (the network is the same U-Net): their timings differ only by the sampler.
    """
    from rtdp.envs import make
    from rtdp.policies.registry import FAMILIES, fresh_policy

    env = make(task)
    try:
        obs, _ = env.reset(seed=int(task.eval_seeds[0]))
        low, high = env.action_space.low, env.action_space.high
    finally:
        env.close()
    policies = []
    for name in [n for n, f in FAMILIES.items() if f.unet_sizes]:
        policy = fresh_policy(name, size, lowdim_shapes={k: np.shape(obs[k]) for k in task.lowdim_keys},
                              image_shapes={k: np.shape(obs[k]) for k in task.image_keys},
                              action_low=-np.ones(task.action_dim), action_high=np.ones(task.action_dim))
        if policies:
            policy.load_state_dict(policies[0].state_dict())
        policies.append(policy)
    return policies


def _serving_policy(cfg: BenchConfig, policies: list):
    """The policy a configuration runs on: one whose family serves its sampler (a named setting first; for a
    core sampler, a family built on the core samplers alone before one with settings of its own)."""
    from rtdp.policies.registry import family_of
    from rtdp.policies.runner import known_samplers

    if cfg.sampler not in known_samplers():
        raise UnknownNameError("sampler", cfg.sampler, known_samplers())
    fams = [(p, family_of(p)) for p in policies]
    if "cache" in cfg.options:  # block-wise caching needs a network with blocks
        fams = [(p, f) for p, f in fams if hasattr(p.model, "cache_blocks")]
    if "anchor_step" in cfg.options:  # an anchored start runs a core sampler on the DDPM family's schedule
        from rtdp.core import SAMPLERS
        from rtdp.policies.ddpm import DdpmPolicy

        if cfg.sampler not in SAMPLERS:
            raise ConfigError(f"configuration {cfg.name!r}: +anchor<T> starts a core sampler "
                              f"({', '.join(sorted(SAMPLERS))}) from an anchor on a DDPM checkpoint; "
                              f"{cfg.sampler} is not one")
        fams = [(p, f) for p, f in fams if isinstance(p, DdpmPolicy)]
    ranked = sorted((not bool(f.settings), i) for i, (p, f) in enumerate(fams)
                    if cfg.sampler in f.settings)
    ranked += sorted((bool(f.settings), i) for i, (p, f) in enumerate(fams)
                     if cfg.sampler not in f.settings and f.serves(cfg.sampler))
    if ranked:
        return fams[ranked[0][1]][0]
    from rtdp.policies.registry import FAMILIES

    wanted = [f"policy={f.name}" for f in FAMILIES.values() if f.serves(cfg.sampler)]
    have = ", ".join(sorted({f"policy={family_of(p).name}" for p in policies}))
    raise ConfigError(f"configuration {cfg.name!r} needs a {' or '.join(wanted) or 'known'} checkpoint"
                      f"{' with transformer blocks' if 'cache' in cfg.options else ''}"
                      f"{' of the DDPM family (policy=unet or transformer)' if 'anchor_step' in cfg.options else ''}"
                      f"; given: {have}")


def _bench_obs(task: TaskSpec, policy, n: int) -> list[dict[str, np.ndarray]]:
    """Batch-1 observations (To copies of a reset observation) of the first ``n`` eval seeds."""
    from rtdp.envs import make

    keys = [*policy.config.lowdim_shapes, *policy.config.image_shapes]
    env = make(task)
    out = []
    try:
        for seed in task.seeds(n):
            obs, _ = env.reset(seed=int(seed))
            out.append({k: np.stack([obs[k]] * policy.config.n_obs_steps)[None] for k in keys})
    finally:
        env.close()
    return out


def _mean_updates(net, n_calls: int) -> float | None:
    from rtdp.core.cache import CachedNetwork

    if not isinstance(net, CachedNetwork) or not net.schedule:
        return None
    return float(np.mean([sum(1 for k in s if k < n_calls) for s in net.schedule.values()]))


def _normalised_actions(runner, obs, noise) -> np.ndarray:
    policy = runner.policy
    runner.reset()
    runner.generator.manual_seed(0)
    act = runner.predict(obs, noise=noise)
    return policy.normalizer.normalize("action", act).detach().cpu().numpy()


def bench_config(cfg: BenchConfig, policy, task: TaskSpec, *, obs_list, bandwidth_gbs: float,
                 episodes: int, batch: int, reference: dict | None, progress: bool,
                 fidelity: bool = True, calls: int = 50, warmup: int = 5, runner=None,
                 timing: dict[str, Any] | None = None, perturb: list[int] | None = None) -> dict[str, Any]:
    """Measure one configuration; returns DESIGN.md's per-configuration keys.

    ``runner`` and ``timing`` (``time_runners``' entry for it) come from a side-by-side
    timing of every configuration; without them the configuration is timed alone
    over ``calls`` calls after ``warmup``.

    With a packed or cached network (``precision``, ``deepcache``, ``cache``) and ``fidelity``, also
    ``action_mse_vs_plain``: its actions against the plain network's for the same
    configuration, noise and observations (normalised units).

    ``perturb``: perturbation seeds; the episodes then run once per seed with rounding-level noise on
    the observations (``rtdp.workflows.rollout.perturber``), pooled in ``episode_success`` and
    listed one by one in ``perturbations``.
    """
    from rtdp.policies.runner import Runner
    from rtdp.workflows.eval import evaluate_checkpoint_policy, time_runner

    if runner is None:
        runner = Runner(policy, cfg.sampler, cfg.steps, seed=0, **cfg.options)
    if timing is None:
        timing = time_runner(runner, obs_list[0], calls=calls, warmup=warmup)
    p50, p99, nfe = timing["latency_ms_p50"], timing["latency_ms_p99"], timing["nfe_per_chunk"]
    from rtdp.core import weight_bytes as network_bytes

    weight_bytes = network_bytes(runner.policy.model)
    row: dict[str, Any] = {
        "name": cfg.name,
        "sampler": cfg.sampler,
        "steps": cfg.steps,
        "precision": cfg.options.get("precision"),
        "deepcache": cfg.options.get("deepcache"),
        "cache": cfg.options.get("cache"),
        "compile": bool(cfg.options.get("compile", False)),
        "anchor_step": cfg.options.get("anchor_step"),
        "n_anchors": None if cfg.options.get("anchors") is None else int(len(cfg.options["anchors"])),
        # block-wise caching: network calls per chunk at which a cached block runs, mean over blocks
        "cache_updates_per_block": _mean_updates(runner.policy.model, nfe),
        "checkpoint": getattr(policy, "_bench_source", None),
        "policy_type": policy.policy_type,
        "nfe_per_chunk": nfe,
        "n_action_steps": runner.n_action_steps,
        "latency_ms_p50": p50,
        "latency_ms_p99": p99,
        "ms_per_action": p50 / runner.n_action_steps,
        "ms_per_nfe": p50 / max(1, nfe),
        "floor_ms_per_nfe": weight_bytes / (bandwidth_gbs * 1e9) * 1e3,
        "weight_mb": weight_bytes / 2**20,
        "action_mse": None,
    }
    if reference is not None and reference["policy"] is policy:
        diffs = []
        for o, noise, ref in zip(obs_list, reference["noise"], reference["actions"]):
            act = _normalised_actions(runner, o, noise)
            k = min(act.shape[1], ref.shape[1])
            diffs.append(float(np.mean((act[:, :k] - ref[:, :k]) ** 2)))
        row["action_mse"] = float(np.mean(diffs))
    network_opts = ("precision", "deepcache", "cache", "calibration", "compile")
    if any(cfg.options.get(k) is not None for k in network_opts) and fidelity:
        # The packed / cached network against the plain one, same configuration, noise and observations.
        import torch

        plain = Runner(policy, cfg.sampler, cfg.steps, seed=0,
                       **{k: v for k, v in cfg.options.items() if k not in network_opts})
        gen = torch.Generator().manual_seed(4321)
        diffs = []
        for o in obs_list:
            noise = torch.randn((1, policy.config.horizon, policy.config.action_dim), generator=gen)
            diffs.append(float(np.mean((_normalised_actions(runner, o, noise) - _normalised_actions(plain, o, noise)) ** 2)))
        row["action_mse_vs_plain"] = float(np.mean(diffs))
    if episodes > 0:
        seeds = task.seeds(episodes)
        nfe_log: list[int] = []
        runs = []
        for p in perturb or [None]:
            res = evaluate_checkpoint_policy(policy, task, seeds, sampler=cfg.sampler, steps=cfg.steps, batch=batch,
                                             progress=progress, nfe_log=nfe_log, perturb=p, **cfg.options)
            runs.append((p, res))
        episodes_all = [e for _, res in runs for e in res.episodes]
        n_success = sum(e.success for e in episodes_all)
        row.update({
            # Per episode and chunk; differs from nfe_per_chunk where NFE depends on the observation
            # (guidance skipping) or on the episode's start (streaming's first call builds the ladder).
            "nfe_per_chunk_rollout_mean": float(np.mean(nfe_log)) if nfe_log else None,
            "episodes": len(episodes_all),
            "success_rate": n_success / len(episodes_all),
            "success_ci95": list(wilson_interval(n_success, len(episodes_all))),
            "mean_score": float(np.mean([e.score for e in episodes_all])),
            # in seed order, task.seeds(episodes), once per perturbation seed in turn
            "episode_success": [bool(e.success) for e in episodes_all],
        })
        if perturb:
            row["perturbations"] = [{
                "perturb": p, "episodes": len(res.episodes), "success_rate": res.success_rate,
                "success_ci95": list(wilson_interval(res.n_success, len(res.episodes))),
                "episode_success": [bool(e.success) for e in res.episodes]} for p, res in runs]
    return row


def add_paired_comparisons(rows: list[dict[str, Any]]) -> None:
    """Compare every configuration's episodes with the reference's, seed by seed (in place).

    The reference is ``ddpm-100`` when it ran episodes, else the first
    configuration that did. Adds ``paired_vs``, ``paired_only_reference``,
    ``paired_only_this`` and ``paired_p`` (McNemar's exact test) to the others.
    """
    with_episodes = [r for r in rows if "episode_success" in r]
    ref = next((r for r in with_episodes if r["name"] == "ddpm-100"), with_episodes[0] if with_episodes else None)
    for r in with_episodes:
        if r is ref or len(r["episode_success"]) != len(ref["episode_success"]):
            continue
        # pooled over perturbation seeds when there are some, and per seed in each `perturbations` entry
        for mine, theirs in [(r, ref), *zip(r.get("perturbations", []), ref.get("perturbations", []))]:
            cmp = paired_comparison(theirs["episode_success"], mine["episode_success"])
            mine.update({"paired_vs": ref["name"], "paired_only_reference": cmp["only_reference"],
                         "paired_only_this": cmp["only_other"], "paired_p": cmp["p_value"]})


def bench(
    *,
    checkpoints: list[str],
    size: str | None,
    task_name: str | None,
    configs: list[str] | None,
    episodes: int = 0,
    calls: int = 50,
    warmup: int = 5,
    rounds: int = 5,
    threads: int | None = None,
    batch: int = 50,
    mse_observations: int = 8,
    progress: bool = True,
    fresh_tasks: dict[str, str] | None = None,
    calibration_dir: str | Path = "outputs/calibration",
    anchor_data: str | Path | None = None,
    perturb: list[int] | None = None,
) -> dict[str, Any]:
    """Run every configuration and return the report dict (DESIGN.md's ``rtdp bench`` keys).

    ``perturb``: perturbation seeds the episodes are repeated under (``bench_config``); [] or None: once, exact.

    ``anchor_data``: the replay buffer the anchors of ``+anchor<T>`` configurations come from
    (None: the ``data`` each checkpoint's meta.json records).
    """
    import torch

    from rtdp.policies.runner import Runner
    from rtdp.workflows.eval import load_checkpoint

    threads = physical_cores() if threads is None else int(threads)
    torch.set_num_threads(threads)
    if not checkpoints and size is None:
        raise ConfigError("rtdp bench needs checkpoint=<dir> (or checkpoints=[...]) or size=dp_lowdim|dp_image")
    if checkpoints and size is not None:
        raise ConfigError("give either checkpoints (trained policies) or size (fresh policies for timing), not both")
    perturb = [int(p) for p in perturb or []]
    if any(p < 0 for p in perturb) or len(set(perturb)) != len(perturb):
        raise ConfigError(f"perturb takes distinct non-negative seeds, e.g. [0,1,2]; got {perturb}")
    if perturb and not episodes:
        raise ConfigError("perturb repeats the episodes under observation noise: give episodes= too")
    policies, metas = [], []
    for path in checkpoints:
        policy, meta = load_checkpoint(path)
        policy._bench_source = str(path)
        policies.append(policy)
        metas.append(meta)
    if size is not None:
        if not task_name and not fresh_tasks:
            raise ConfigError("fresh networks take a task's observation shapes: pass task=NAME")
        task = get_task(task_name or fresh_tasks["image" if size == "dp_image" else "lowdim"])
        policies = _fresh_policies(task, size)
        for p in policies:
            p._bench_source = f"fresh:{size}"
        if episodes:
            raise ConfigError("episodes need trained checkpoints; size= benchmarks time freshly initialised networks")
    else:
        if not (task_name or metas[0].get("task")):
            raise ConfigError(f"{checkpoints[0]} does not say which task it was trained on (no meta.json): pass task=NAME")
        task = get_task(task_name or metas[0].get("task"))
    if configs is None:
        names: list[str] = []
        from rtdp.policies.registry import family_of

        for p in policies:
            names += [n for n in family_of(p).bench_configs if n not in names]
        def runs_ddpm100(p) -> bool:  # the reference of action_mse, where the checkpoint has 100+ training steps
            return not family_of(p).settings and getattr(p.config, "num_train_timesteps", 0) >= 100

        if any(runs_ddpm100(p) for p in policies) or size is not None:
            names = ["ddpm-100"] + [n for n in names if n != "ddpm-100"]
    else:
        names = list(configs)
    parsed = [parse_config(n) for n in names]
    plan = [(c, _serving_policy(c, policies)) for c in parsed]
    needs_calibration = [str(c.options.get("cache", "")).startswith("bac") for c, _ in plan]
    anchored = ["anchor_step" in c.options for c, _ in plan]
    for (c, p), bac, anc in zip(plan, needs_calibration, anchored):  # everything is validated before timing
        if anc:
            p.anchor_sigmas(c.options["anchor_step"], c.steps)  # T fits this checkpoint, before any clustering
        elif not bac:
            Runner(p, c.sampler, c.steps, **c.options)
    anchor_sets: dict[int, tuple[Any, str]] = {}
    meta_of = {id(p): m for p, m in zip(policies, metas)} if size is None else {}
    for (c, p), anc in zip(plan, anchored):  # anchored starts take the checkpoint's k-means action anchors
        if not anc:
            continue
        if id(p) not in anchor_sets:
            data = anchor_data_path(anchor_data, meta_of.get(id(p), {}), task.name)
            source = getattr(p, "_bench_source", None)
            fresh = source is None or source.startswith("fresh:")
            anchor_sets[id(p)] = (action_anchors(p, data, checkpoint=None if fresh else source,
                                                 cache=calibration_dir), str(data))
        c.options["anchors"] = anchor_sets[id(p)][0]
        Runner(p, c.sampler, c.steps, **c.options)
    for (c, p), bac in zip(plan, needs_calibration):  # BAC's schedules come from the checkpoint's calibration
        if bac:
            from rtdp.workflows.calibrate import bac_calibration

            source = getattr(p, "_bench_source", None)
            c.options["calibration"] = bac_calibration(
                p, None if source is None or source.startswith("fresh:") else source, task, c.sampler, c.steps,
                progress=progress, cache=calibration_dir)
            Runner(p, c.sampler, c.steps, **c.options)

    obs_list = _bench_obs(task, policies[0], max(1, mse_observations))
    bandwidth = memory_bandwidth_gbs()
    # Reference actions: ddpm-100 on each checkpoint that has one, from fixed noise.
    references = {}
    # Fresh networks are for timing only: their actions mean nothing, so no fidelity is measured.
    for p in policies if size is None else []:
        try:
            ref_runner = Runner(p, "ddpm", 100, seed=0)
        except (ConfigError, ValueError):
            continue
        gen = torch.Generator().manual_seed(1234)
        noise = [torch.randn((1, p.config.horizon, p.config.action_dim), generator=gen) for _ in obs_list]
        acts = [_normalised_actions(ref_runner, o, n) for o, n in zip(obs_list, noise)]
        references[id(p)] = {"policy": p, "noise": noise, "actions": acts}

    # Timing first, every configuration side by side, interleaved over `rounds`.
    from rtdp.workflows.eval import time_runners

    runners = [Runner(p, c.sampler, c.steps, seed=0, **c.options) for c, p in plan]
    timings = time_runners(runners, obs_list[0], calls=calls, warmup=warmup, rounds=rounds, progress=progress)

    rows = []
    from tqdm.auto import tqdm

    for (c, p), runner, timing in tqdm(list(zip(plan, runners, timings)), desc="bench", disable=not progress,
                                       dynamic_ncols=True):
        rows.append(bench_config(c, p, task, runner=runner, timing=timing, obs_list=obs_list,
                                 bandwidth_gbs=bandwidth, episodes=int(episodes), batch=batch,
                                 reference=references.get(id(p)), progress=progress, fidelity=size is None,
                                 perturb=perturb))
        if "anchor_step" in c.options:
            rows[-1]["anchor_data"] = anchor_sets[id(p)][1]
    add_paired_comparisons(rows)
    base = next((r for r in rows if r["name"] == "ddpm-100"), None)
    for r in rows:
        r["speedup_per_action_vs_ddpm100"] = (base["ms_per_action"] / r["ms_per_action"]) if base else None
    shapes = sorted({p.size_label() for p in policies})
    return {
        "device": device_name(),
        "threads": threads,
        "policy": sorted({p.policy_type for p in policies}),
        "size": size or (shapes[0] if len(shapes) == 1 else shapes),
        "task": task.name,
        "checkpoints": [str(c) for c in checkpoints],
        "memory_bandwidth_gbs": bandwidth,
        "calls": calls,
        "rounds": rounds,
        "perturb": perturb,
        "configs": rows,
    }


def plot_bench(report: dict[str, Any], path: Path) -> Path:
    """Latency per executed action vs success (one point per configuration); latency bars without episodes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["configs"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if all("success_rate" in r for r in rows):
        for r in rows:
            lo, hi = r["success_ci95"]
            y = r["success_rate"]
            ax.errorbar(r["ms_per_action"], y, yerr=[[y - lo], [hi - y]], fmt="o", capsize=3)
            ax.annotate(r["name"], (r["ms_per_action"], y), textcoords="offset points", xytext=(5, 5), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("latency per executed action, ms (median, batch 1)")
        ax.set_ylabel(f"success rate ({rows[0]['episodes']} episodes, 95% CI)")
        ax.set_ylim(0, 1.05)
    else:
        names = [r["name"] for r in rows]
        ax.barh(names, [r["latency_ms_p50"] for r in rows])
        ax.set_xscale("log")
        ax.set_xlabel("latency per chunk, ms (median, batch 1)")
    ax.set_title(f"rtdp bench: {report['task']}, {report['threads']} threads, {report['size']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def print_bench(report: dict[str, Any]) -> None:
    """Human table of the report."""
    print(f"rtdp bench: {report['task']}  size {report['size']}  {report['device']}  threads {report['threads']}  "
          f"memory bandwidth {report['memory_bandwidth_gbs']:.1f} GB/s")
    header = (f"{'config':<18}{'NFE':>5}{'p50 ms':>10}{'p99 ms':>10}{'ms/act':>9}{'ms/NFE':>9}{'floor':>8}"
              f"{'mse':>10}{'mse/plain':>10}{'x ddpm100':>11}{'success':>22}{'paired':>18}")
    print(header)
    for r in report["configs"]:
        mse = "-" if r["action_mse"] is None else f"{r['action_mse']:.2e}"
        mse_plain = f"{r['action_mse_vs_plain']:.2e}" if r.get("action_mse_vs_plain") is not None else "-"
        sp = "-" if r["speedup_per_action_vs_ddpm100"] is None else f"{r['speedup_per_action_vs_ddpm100']:.1f}"
        succ = "-"
        if "success_rate" in r:
            lo, hi = r["success_ci95"]
            succ = f"{r['success_rate']:.0%} ({lo:.0%}-{hi:.0%}) n={r['episodes']}"
        # episodes won and lost against the reference on the same seeds, and McNemar's p
        paired = f"+{r['paired_only_this']}/-{r['paired_only_reference']} p={r['paired_p']:.2f}" if "paired_p" in r else ""
        print(f"{r['name']:<18}{r['nfe_per_chunk']:>5}{r['latency_ms_p50']:>10.1f}{r['latency_ms_p99']:>10.1f}"
              f"{r['ms_per_action']:>9.2f}{r['ms_per_nfe']:>9.2f}{r['floor_ms_per_nfe']:>8.2f}{mse:>10}{mse_plain:>10}{sp:>11}"
              f"{succ:>22}{paired:>18}")
        for q in r.get("perturbations", []):
            lo, hi = q["success_ci95"]
            paired = f"+{q['paired_only_this']}/-{q['paired_only_reference']} p={q['paired_p']:.2f}" if "paired_p" in q else ""
            succ = f"{q['success_rate']:.0%} ({lo:.0%}-{hi:.0%}) n={q['episodes']}"
            print(f"{'  perturb ' + str(q['perturb']):<{len(header) - 40}}{succ:>22}{paired:>18}")


def run(cfg) -> dict[str, Any]:
    """CLI entry: ``rtdp bench checkpoint=DIR [checkpoints=[...]] [size=dp_lowdim] [configs=[...]] json=PATH``."""
    from rtdp.cli import task_name

    if cfg.get("image"):
        return _run_image(cfg)
    checkpoints = [str(c) for c in (cfg.checkpoints or [])]
    if cfg.checkpoint:
        checkpoints.insert(0, str(cfg.checkpoint))
    report = bench(
        checkpoints=checkpoints,
        size=cfg.size,
        task_name=task_name(cfg),
        configs=None if cfg.configs is None else [str(c) for c in cfg.configs],
        episodes=int(cfg.episodes),
        calls=int(cfg.calls),
        warmup=int(cfg.warmup),
        rounds=int(cfg.get("rounds") or 1),
        threads=cfg.threads,
        batch=int(cfg.batch),
        mse_observations=int(cfg.mse_observations),
        fresh_tasks={"lowdim": str(cfg.fresh_task), "image": str(cfg.fresh_image_task)},
        calibration_dir=str(cfg.calibration_dir),
        anchor_data=None if cfg.get("anchor_data") is None else str(cfg.anchor_data),
        perturb=list(cfg.get("perturb") or []),
    )
    print_bench(report)
    if cfg.json:
        path = Path(cfg.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2))
        report["plot"] = str(plot_bench(report, path.with_suffix(".png")))
        print(f"report: {path}, plot: {report['plot']}")
    return report


def _run_image(cfg) -> dict[str, Any]:
    """``rtdp bench image=DIR``: the image model through the same caching core (speed-up and PSNR)."""
    from rtdp.workflows.image import bench_image

    if cfg.checkpoint or cfg.checkpoints or cfg.size:
        raise ConfigError("image= benchmarks an image model on its own: drop checkpoint/checkpoints/size")
    configs = [str(c) for c in (cfg.configs or ["ddim-50", "ddim-50+deepcache2", "ddim-50+deepcache3"])]
    grid = Path(cfg.json).with_suffix(".png") if cfg.json else None
    report = bench_image(cfg.image, configs, calls=min(int(cfg.calls), 10), warmup=min(int(cfg.warmup), 2),
                         threads=cfg.threads, grid=grid)
    print(f"rtdp bench image: {report['model']}  {report['sample_size']} px  threads {report['threads']}  "
          f"PSNR over {report['samples']} samples")
    print(f"{'config':<22}{'p50 ms':>10}{'p99 ms':>10}{'speed-up':>10}{'PSNR dB':>10}{'min':>8}")
    for r in report["configs"]:
        psnr = ("-", "-") if r["psnr_db_vs_uncached"] is None else (f"{r['psnr_db_vs_uncached']:.1f}",
                                                                     f"{r['psnr_db_min']:.1f}")
        sp = "-" if r["speedup_vs_uncached"] is None else f"{r['speedup_vs_uncached']:.2f}x"
        print(f"{r['name']:<22}{r['latency_ms_p50']:>10.0f}{r['latency_ms_p99']:>10.0f}{sp:>10}{psnr[0]:>10}{psnr[1]:>8}")
    if cfg.json:
        path = Path(cfg.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2))
        print(f"report: {path}, samples: {report.get('grid')}")
    return report
