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

    Kept in ``cache`` (one zarr store per scene format, scenario, first seed
    and count) so that every planner is scored on the same scenes without
    driving them again, and a new ``SCENE_FORMAT`` never reads old scenes.
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
    from rtdp.envs.highway import SCENE_FORMAT

    path = Path(cache) / f"highway-v{SCENE_FORMAT}-{scenario}-from{int(first_seed)}-{int(n)}.zarr"
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


# ---------------------------------------------------------------------------------------------- scoring


def _rows(scenes: dict[str, np.ndarray], rows) -> dict[str, np.ndarray]:
    return {k: v[rows] for k, v in scenes.items()}


def load_planner(checkpoint: str | Path):
    """A planner checkpoint (``policy=anchor | diffusion_plan | regression``).

    Raises:
        ConfigError: the checkpoint holds another kind of model.
    """
    from rtdp.models.base import load_model

    model = load_model(checkpoint)
    if not hasattr(model, "plan"):
        raise ConfigError(f"{checkpoint} holds a {type(model).__name__}, not a driving planner; task=highway scores "
                          "planners trained with policy=anchor, diffusion_plan or regression")
    return model.eval()


def plan_batch(planner, scenes: dict[str, np.ndarray], *, steps: int | None, generator=None,
               n_candidates: int | None = None, select: str | None = None) -> dict[str, Any]:
    """Plan every scene of ``scenes`` (batched planner inputs; with ``select`` also ``route``): plans (B, 8, 2),
    candidates (B, K, 8, 2) or None, scores (B, K) or None, nfe. ``select="pdm"``: the plan is chosen among the
    candidates by ``rtdp.envs.plan_selection`` (vanilla diffusion then samples ``SELECT_SAMPLES``)."""
    from rtdp.envs.highway import OBS_KEYS
    from rtdp.envs.plan_selection import candidates_to_sample

    n_candidates = candidates_to_sample(select, n_candidates)
    res = planner.plan({k: scenes[k][:, None] for k in OBS_KEYS}, steps=steps, generator=generator,
                       n_candidates=n_candidates)
    plan = res.plan.float().cpu().numpy()
    cands = None if res.candidates is None else res.candidates.float().cpu().numpy()
    scores = None if res.scores is None else res.scores.float().cpu().numpy()
    if select is not None and cands is not None:
        from rtdp.envs.plan_selection import select as choose

        idx, _ = choose(cands, scenes, scores)
        plan = cands[np.arange(len(idx)), idx]
    return {"plans": plan, "candidates": cands, "scores": scores, "nfe": int(res.nfe)}


def plan_scenes(planner, scenes: dict[str, np.ndarray], *, steps: int | None, seed: int = 0, batch: int = 100,
                n_candidates: int | None = None, select: str | None = None) -> dict[str, Any]:
    """Plans (N, 8, 2), candidates (N, K, 8, 2) or None, scores (N, K) or None and network calls per plan
    (``plan_batch`` over batches of scenes)."""
    import torch

    n = len(scenes["action"])
    gen = torch.Generator().manual_seed(int(seed))
    parts = [plan_batch(planner, _rows(scenes, slice(start, min(n, start + batch))), steps=steps, generator=gen,
                        n_candidates=n_candidates, select=select) for start in range(0, n, batch)]
    joined = {k: None if parts[0][k] is None else np.concatenate([p[k] for p in parts])
              for k in ("plans", "candidates", "scores")}
    return {**joined, "nfe": parts[-1]["nfe"]}


DIVERSITY_TOP_K = 5


def diversity(candidates: np.ndarray | None, scores: np.ndarray | None = None, k: int = DIVERSITY_TOP_K) -> float:
    """Mode diversity: mean pairwise distance (m) between the final (4 s) poses of the top-k candidates.

    Args:
        candidates: (N, K, 8, 2), or None (a single-mode planner: 0).
        scores: (N, K) scores ranking them (the anchored planner's classifier); None takes the first k
            (independent samples of a vanilla diffusion planner are unranked).
        k: how many candidates per scene.

    Returns:
        the mean over scenes; 0 with fewer than two candidates.
    """
    if candidates is None or candidates.shape[1] < 2:
        return 0.0
    k = min(int(k), candidates.shape[1])
    if scores is not None:
        top = np.argsort(-scores, axis=1)[:, :k]
        candidates = np.take_along_axis(candidates, top[:, :, None, None], 1)
    end = candidates[:, :k, -1, :]
    d = np.linalg.norm(end[:, :, None] - end[:, None], axis=-1)
    return float((d.sum(axis=(1, 2)) / (k * (k - 1))).mean())


def plan_latency(planner, scenes: dict[str, np.ndarray], *, steps: int | None, calls: int = 50,
                 warmup: int = 5, select: str | None = None) -> dict[str, float]:
    """Wall time of one batch-1 plan (``plan_batch``, the selection included) after warm-up, over ``calls``
    different scenes (median, p99, ms)."""
    import torch

    n = len(scenes["action"])
    gen = torch.Generator().manual_seed(0)
    times = []
    for i in range(warmup + calls):
        one = _rows(scenes, slice(i % n, i % n + 1))
        t = time.perf_counter()
        plan_batch(planner, one, steps=steps, generator=gen, select=select)
        if i >= warmup:
            times.append((time.perf_counter() - t) * 1e3)
    return {"latency_ms_p50": float(np.median(times)), "latency_ms_p99": float(np.percentile(times, 99))}


def _setting(planner, sampler: str | None, steps: int | None) -> tuple[str, int]:
    from rtdp.policies.registry import family_of

    family = family_of(planner)
    name = sampler or family.default_sampler(planner)
    if not family.serves(name):
        raise ConfigError(f"policy={family.name} plans with {', '.join(family.settings)}, not sampler={name!r}")
    return name, int(steps if steps is not None else planner.config.num_inference_steps)


def bev_picture(scene: dict[str, np.ndarray], path: Path, *, plan: np.ndarray | None = None,
                candidates: np.ndarray | None = None, scores: np.ndarray | None = None,
                anchors: np.ndarray | None = None, title: str = "") -> Path:
    """Bird's-eye view of one scene: lanes, agents (now and their logged 4 s), anchors, candidates, plan, expert."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Polygon

    from rtdp.envs.highway_score import EGO_LENGTH, EGO_WIDTH

    def box(x, y, h, length, width, **kw):
        c, s = np.cos(h), np.sin(h)
        corners = np.array([[length, width], [length, -width], [-length, -width], [-length, width]]) / 2
        pts = corners @ np.array([[c, s], [-s, c]]) + [x, y]
        return Polygon(pts[:, ::-1] * [-1, 1], closed=True, **kw)  # drawn with x up, y to the left

    def xy(a):  # ego frame (x forward, y left) -> picture (right, up)
        a = np.asarray(a)
        return -a[..., 1], a[..., 0]

    fig, ax = plt.subplots(figsize=(5, 6.5))
    for lane in scene["lanes"]:
        ok = lane[:, 3] > 0
        if ok.sum() > 1:
            ax.plot(*xy(lane[ok, :2]), color="0.8", lw=max(1.0, float(lane[ok, 2].mean()) * 7), solid_capstyle="butt",
                    zorder=0)
            ax.plot(*xy(lane[ok, :2]), color="0.6", lw=0.5, ls=":", zorder=1)
    for agent, fut, valid in zip(scene["agents"], scene["agent_future"], scene["agent_future_valid"]):
        if agent[8] <= 0:
            continue
        ax.add_patch(box(agent[0], agent[1], np.arctan2(agent[3], agent[2]), agent[6], agent[7], fc="tab:blue",
                         ec="k", alpha=0.8, zorder=3))
        ok = valid > 0
        ax.plot(*xy(fut[ok, :2]), color="tab:blue", lw=1, alpha=0.5, zorder=2)
    ax.add_patch(box(0, 0, 0, EGO_LENGTH, EGO_WIDTH, fc="tab:orange", ec="k", zorder=4))
    if anchors is not None:
        for a in anchors:
            ax.plot(*xy(np.vstack([[0, 0], a])), color="0.5", lw=0.7, ls="--", zorder=2)
    if candidates is not None:
        order = np.argsort(scores) if scores is not None else np.arange(len(candidates))
        for rank, k in enumerate(order):
            ax.plot(*xy(np.vstack([[0, 0], candidates[k]])), color=plt.cm.viridis(rank / max(1, len(order) - 1)),
                    lw=1, alpha=0.7, zorder=5)
    ax.plot(*xy(np.vstack([[0, 0], scene["action"]])), "k--", lw=2, label="expert", zorder=6)
    if plan is not None:
        ax.plot(*xy(np.vstack([[0, 0], plan])), color="tab:red", lw=2.5, label="plan", zorder=7)
    ax.set_aspect("equal")
    ax.set_xlim(-30, 30)
    ax.set_ylim(-20, 80)
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def evaluate_planner(checkpoint: str | Path | None, *, scenes: int = 1000, sampler: str | None = None,
                     steps: int | None = None, first_seed: int = 100000, scenario: str = "mixed", seed: int = 0,
                     calls: int = 50, threads: int = 2, bev: int = 6, out: str | Path | None = None,
                     use_expert: bool = False, workers: int = 1, select: str | None = None) -> dict[str, Any]:
    """PDM score of a planner (or of the expert's logged future) on held-out scenes; see ``run_eval``."""
    import torch

    from rtdp.envs.highway_score import TERMS, score_plans, summarize

    torch.set_num_threads(int(threads))
    data = held_out_scenes(int(scenes), first_seed=int(first_seed), scenario=scenario, workers=workers)
    out_dir = Path(out) if out else Path("outputs/eval") / ("expert_highway" if use_expert else
                                                             Path(str(checkpoint)).resolve().parent.name)
    if use_expert:
        planned = {"plans": data["action"], "candidates": None, "scores": None, "nfe": 0}
        setting, n_steps, lat, planner = "expert", 0, {"latency_ms_p50": None, "latency_ms_p99": None}, None
    else:
        planner = load_planner(checkpoint)
        setting, n_steps = _setting(planner, sampler, steps)
        planned = plan_scenes(planner, data, steps=n_steps, seed=seed, select=select)
        lat = plan_latency(planner, data, steps=n_steps, calls=calls, select=select)
    scores = score_plans(planned["plans"], data)
    summary = summarize(scores, data["scenario"][:, 0].astype(int))
    pictures = []
    anchors = planner.anchor_trajectories() if hasattr(planner, "anchor_trajectories") else None
    for i in range(min(int(bev), len(data["action"]))):
        cands = None if planned["candidates"] is None else planned["candidates"][i]
        sc = None if planned["scores"] is None else planned["scores"][i]
        terms = ", ".join(f"{t} {scores[t][i]:.2f}" for t in TERMS)
        pictures.append(str(bev_picture(_rows(data, i), out_dir / f"bev_{i:03d}.png", plan=planned["plans"][i],
                                        candidates=cands, scores=sc, anchors=anchors,
                                        title=f"scene {i}: {terms}")))
    return {
        "task": "highway",
        "checkpoint": None if use_expert else str(checkpoint),
        "sampler": setting,
        "steps": n_steps,
        "select": select,
        **summary,
        "nfe_per_plan": planned["nfe"],
        **lat,
        "diversity_m": diversity(planned["candidates"], planned["scores"]),
        "first_seed": int(first_seed),
        "bev": pictures,
    }


def _print_drive(report: dict[str, Any]) -> None:
    from rtdp.workflows.report import print_table

    rows = [("scenes", str(report["scenes"])), ("planner", f"{report['sampler']}-{report['steps']}"),
            ("NFE per plan", str(report["nfe_per_plan"]))]
    if report.get("latency_ms_p50") is not None:
        rows.append(("latency ms p50 / p99", f"{report['latency_ms_p50']:.2f} / {report['latency_ms_p99']:.2f}"))
    for name, part in [("all", report), *report["per_scenario"].items()]:
        rows.append((f"{name} ({part['scenes']} scenes)", "PDMS {pdms:.3f}  NC {nc:.3f}  DAC {dac:.3f}  TTC {ttc:.3f}  "
                     "EP {ep:.3f}  C {comfort:.3f}".format(**part)))
    print_table(f"rtdp eval: highway {report['checkpoint'] or 'expert'}", rows)


def run_eval(cfg) -> dict[str, Any]:
    """CLI entry: ``rtdp eval task=highway checkpoint=DIR [scenes=1000] [steps=N] json=PATH`` (or ``expert=true``)."""
    from rtdp.workflows.machine import physical_cores

    if not cfg.expert and not cfg.checkpoint:
        raise ConfigError("rtdp eval task=highway needs checkpoint=<planner folder> or expert=true")
    for key in ("precision", "record_obs"):  # action-policy keys: refuse rather than ignore them
        if cfg.get(key) is not None:
            raise ConfigError(f"{key}= applies to action policies; task=highway scores planners on scenes without it")
    report = evaluate_planner(
        None if cfg.expert else cfg.checkpoint, scenes=int(cfg.get("scenes") or 1000), sampler=cfg.sampler,
        steps=cfg.steps, first_seed=int(cfg.first_seed if cfg.get("first_seed") is not None else 100000),
        scenario=str(cfg.get("scenario") or "mixed"), seed=int(cfg.seed), calls=int(cfg.latency_calls),
        threads=int(cfg.threads), bev=int(cfg.get("bev", 6)), out=cfg.out, use_expert=bool(cfg.expert),
        workers=physical_cores(),  # the held-out scenes are driven once, before anything is timed
        select=cfg.get("select"))
    _print_drive(report)
    if cfg.json:
        Path(cfg.json).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.json).write_text(json.dumps(report, indent=2))
    return report


def bench_planners(checkpoints: list[str], *, configs: list[str] | None = None, scenes: int = 1000,
                   first_seed: int = 100000, calls: int = 50, threads: int = 2, seed: int = 0,
                   n_candidates: int = DIVERSITY_TOP_K) -> dict[str, Any]:
    """Every planner and inference setting side by side on the same held-out scenes (see ``run_bench``)."""
    import torch

    from rtdp.core.options import parse_config
    from rtdp.envs.highway_score import score_plans, summarize
    from rtdp.policies.registry import family_of

    from rtdp.workflows.machine import physical_cores

    torch.set_num_threads(int(threads))
    data = held_out_scenes(int(scenes), first_seed=int(first_seed), workers=physical_cores())  # before any timing
    rows = []
    for ckpt in checkpoints:
        planner = load_planner(ckpt)
        family = family_of(planner)
        meta_path = Path(ckpt) / "meta.json"
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        names = [c for c in (configs or family.bench_configs) if family.serves(parse_config(c).sampler)]
        for name in names:
            bc = parse_config(name)
            if set(bc.options) - {"select"}:
                raise ConfigError(f"configuration {name!r}: planners take <setting>-<steps>[+pdm] only")
            sel = bc.options.get("select")
            planned = plan_scenes(planner, data, steps=bc.steps, seed=seed, select=sel)
            summary = summarize(score_plans(planned["plans"], data), data["scenario"][:, 0].astype(int))
            spread = plan_scenes(planner, data, steps=bc.steps, seed=seed + 1, n_candidates=n_candidates)
            rows.append({
                "name": f"{family.name}:{name}", "policy": family.name, "checkpoint": str(ckpt), "sampler": bc.sampler,
                "steps": bc.steps, "nfe_per_plan": planned["nfe"],
                **plan_latency(planner, data, steps=bc.steps, calls=calls, select=sel),
                **{k: summary[k] for k in ("pdms", "nc", "dac", "ttc", "ep", "comfort")},
                "per_scenario": summary["per_scenario"],
                "diversity": diversity(spread["candidates"], spread["scores"]),
                "train_time_s": meta.get("train_time_s"), "train_steps": meta.get("train_steps"),
            })
    from rtdp.workflows.machine import device_name

    return {"task": "highway", "device": device_name(), "threads": int(threads),
            "scenes": len(data["action"]), "first_seed": int(first_seed),
            "diversity_definition": f"mean pairwise distance (m) between the 4 s poses of the top-{n_candidates} "
                                    "candidates per scene (anchored: ranked by its scores; vanilla diffusion: "
                                    f"{n_candidates} independent samples; regression: 0)",
            "configs": rows}


def run_bench(cfg) -> dict[str, Any]:
    """CLI entry: ``rtdp bench task=highway checkpoint=A checkpoints=[B,C] [configs=[...]] [scenes=1000] json=PATH``."""
    from rtdp.workflows.report import print_table

    checkpoints = [str(c) for c in (cfg.checkpoints or [])]
    if cfg.checkpoint:
        checkpoints.insert(0, str(cfg.checkpoint))
    if not checkpoints:
        raise ConfigError("rtdp bench task=highway needs checkpoint=<planner> (and checkpoints=[...] to compare)")
    for key in ("size", "image", "anchor_data"):  # action-policy and image keys: refuse rather than ignore them
        if cfg.get(key):
            raise ConfigError(f"{key}= does not apply to task=highway, which benches trained planners on scenes")
    if int(cfg.get("episodes") or 0) > 0:
        raise ConfigError("task=highway scores planners on scenes: pass scenes=N instead of episodes=N")
    threads = int(cfg.threads) if cfg.threads else 2
    report = bench_planners(checkpoints, configs=None if cfg.configs is None else [str(c) for c in cfg.configs],
                            scenes=int(cfg.get("scenes") or 1000), calls=int(cfg.calls), threads=threads)
    rows = [(r["name"], f"NFE {r['nfe_per_plan']:>2}  {r['latency_ms_p50']:6.2f} / {r['latency_ms_p99']:6.2f} ms  "
             f"PDMS {r['pdms']:.3f} (NC {r['nc']:.3f} DAC {r['dac']:.3f} TTC {r['ttc']:.3f} EP {r['ep']:.3f} "
             f"C {r['comfort']:.3f})  diversity {r['diversity']:.2f} m") for r in report["configs"]]
    print_table(f"rtdp bench: highway, {report['scenes']} held-out scenes, {threads} threads", rows)
    if cfg.json:
        Path(cfg.json).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.json).write_text(json.dumps(report, indent=2))
    return report


# ------------------------------------------------------------------------------------------ closed loop


def drive_closed_loop(planner, scenario: str, seeds: list[int], *, steps: int | None = None, replan_hz: float = 2.0,
                      seed: int = 0, video: Path | None = None, progress: bool = True, select: str | None = None) -> dict[str, Any]:
    """The planner drives the ego in highway-env: replans at ``replan_hz``, tracked at 10 Hz; or the expert.

    Args:
        planner: a planner, or None for the scripted expert (the reference).
        scenario: one of ``SCENARIOS``.
        seeds: one episode per seed.
        steps: the planner's denoising steps (default its own).
        replan_hz: plans per second; the tracker follows the last plan in between.
        select: ``"pdm"``: choose each plan among the candidates by predicted PDM score (``plan_batch``).
        video: write the first episode's rollout here (``.mp4``/``.gif``).

    Returns:
        ``episodes``, ``collision_rate``, ``offroad_rate``, ``completion_rate`` (neither), ``progress_m``
        (mean distance driven along the ego's heading), ``plan_ms_p50``/``p99``, ``per_episode``.
    """
    import torch
    from tqdm.auto import tqdm

    from rtdp.controllers.plan_tracker import PlanTracker
    from rtdp.envs.highway import SIM_HZ, HighwayEnv, HighwayExpert

    every = max(1, int(round(SIM_HZ / float(replan_hz))))
    env = HighwayEnv(scenario, observe=False, render_mode="rgb_array" if video else None)
    tracker = PlanTracker()
    gen = torch.Generator().manual_seed(int(seed))
    per_episode, plan_ms, frames = [], [], []
    for n, s in enumerate(tqdm(seeds, desc=f"closed loop {scenario}", disable=not progress)):
        env.reset(seed=int(s))
        tracker.reset()
        expert = HighwayExpert(env) if planner is None else None
        k = 0
        while True:
            ego = env.ego
            t = k / SIM_HZ
            if expert is not None:
                action = expert.act(None)
            else:
                if k % every == 0:
                    scene = {key: v[None] for key, v in env.scene_inputs().items()}
                    t0 = time.perf_counter()
                    plan = plan_batch(planner, scene, steps=steps, generator=gen, select=select)["plans"][0]
                    plan_ms.append((time.perf_counter() - t0) * 1e3)
                    tracker.set_plan(plan, np.array(ego.position), float(ego.heading), t)
                action = tracker.command(np.array(ego.position), float(ego.heading), float(ego.speed), t)
            _, _, terminated, truncated, info = env.step(action)
            if video and n == 0:
                frames.append(env.render())
            k += 1
            if terminated or truncated:
                break
        per_episode.append({"seed": int(s), "crashed": bool(info["crashed"]), "offroad": bool(info["offroad"]),
                            "progress_m": float(info["progress_m"]), "duration_s": k / SIM_HZ})
    env.close()
    if video and frames:
        from rtdp.workflows.report import write_video

        write_video(frames, Path(video), SIM_HZ)
    n = max(1, len(per_episode))
    crashed = sum(e["crashed"] for e in per_episode)
    offroad = sum(e["offroad"] and not e["crashed"] for e in per_episode)
    return {
        "scenario": scenario, "episodes": len(per_episode), "collision_rate": crashed / n, "offroad_rate": offroad / n,
        "completion_rate": (len(per_episode) - crashed - offroad) / n,
        "progress_m": float(np.mean([e["progress_m"] for e in per_episode])) if per_episode else 0.0,
        "plan_ms_p50": float(np.median(plan_ms)) if plan_ms else None,
        "plan_ms_p99": float(np.percentile(plan_ms, 99)) if plan_ms else None,
        "per_episode": per_episode,
    }


def run_control(cfg) -> dict[str, Any]:
    """CLI entry: ``rtdp control task=highway checkpoint=DIR driver=sim episodes=100 [scenario=...] json=PATH``.

    ``checkpoint=expert`` drives the scripted expert (the reference). Episodes
    run on the evaluation seeds 100000.. of every scenario (or of ``scenario``).
    """
    import torch

    from rtdp.envs.highway import SCENARIOS
    from rtdp.workflows.metrics import wilson_interval
    from rtdp.workflows.report import print_table

    if cfg.driver != "sim":
        raise ConfigError(f"task=highway drives in highway-env: driver=sim, got driver={cfg.driver}")
    if not cfg.checkpoint:
        raise ConfigError("rtdp control task=highway needs checkpoint=<planner folder> (or checkpoint=expert)")
    torch.set_num_threads(int(cfg.threads))
    planner = None if str(cfg.checkpoint) == "expert" else load_planner(cfg.checkpoint)
    scenarios = [str(cfg.scenario)] if cfg.get("scenario") else list(SCENARIOS)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = list(range(100000, 100000 + int(cfg.episodes)))
    results = {}
    for sc in scenarios:
        results[sc] = drive_closed_loop(planner, sc, seeds, steps=cfg.steps, replan_hz=float(cfg.get("rate_hz") or 2.0),
                                        seed=int(cfg.seed), video=out / f"drive_{sc}.mp4" if cfg.get("video", True)
                                        else None, select=cfg.get("select"))
    rows = []
    for sc, r in results.items():
        lo, hi = wilson_interval(round(r["collision_rate"] * r["episodes"]), r["episodes"])
        rows.append((f"{sc} ({r['episodes']} episodes)",
                     f"collisions {r['collision_rate']:.1%} ({lo:.2f}-{hi:.2f})  off road {r['offroad_rate']:.1%}  "
                     f"progress {r['progress_m']:.0f} m" + (f"  plan {r['plan_ms_p50']:.1f} ms p50"
                                                             if r["plan_ms_p50"] is not None else "")))
    print_table(f"rtdp control: highway, {'expert' if planner is None else cfg.checkpoint}", rows)
    report = {"task": "highway", "driver": "sim", "checkpoint": str(cfg.checkpoint),
              "replan_hz": float(cfg.get("rate_hz") or 2.0), "select": cfg.get("select"), "per_scenario": results}
    if cfg.json:
        Path(cfg.json).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.json).write_text(json.dumps(report, indent=2))
    return report
