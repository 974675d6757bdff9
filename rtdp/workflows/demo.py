"""``rtdp demo``: the whole path on one task, with numbers, plots and a video.

1. measure the scripted expert on the evaluation seeds (the reference the
   policies are compared with);
2. take the DDPM checkpoint shipped with rtdp (produced by ``rtdp train``; the
   command that reproduces it lies beside it), or with ``train=true`` collect
   demonstrations (reused from ``out`` when present) and train one;
3. evaluate it, then the shipped fast policies (``fast=``: few-step EDM,
   streaming, one-step consistency) on the same seeds, and print one table:
   success, score and milliseconds per executed action side by side with the
   speed-up over the DDPM policy, all timed in this run;
4. drive the simulated task in real time through ``rtdp control`` (sim
   driver, inference in its own process) for a short segment and print its
   timing line.

Everything lands in ``out``: ``report.json``, ``checkpoint/``, the rollout
video, the plots and ``control/``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from rtdp.envs import get_task
from rtdp.errors import CheckpointError, ConfigError
from rtdp.workflows.metrics import paired_comparison, wilson_interval
from rtdp.workflows.report import print_table

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "checkpoints"


def shipped_checkpoint(name: str) -> Path:
    """Folder of the checkpoint rtdp ships under ``rtdp/assets/checkpoints/<name>``."""
    path = ASSETS / name / "checkpoint"
    if not (path / "model.safetensors").exists():
        known = sorted(p.name for p in ASSETS.iterdir() if (p / "checkpoint" / "model.safetensors").exists())
        raise CheckpointError(f"rtdp ships no checkpoint {name!r} (looked in {path}; shipped: {', '.join(known)}); "
                              f"for a task without one run `rtdp demo task=<name> train=true`")
    return path


def parse_shipped(entry: str) -> tuple[str, str, int]:
    """``"<asset>/<sampler>-<steps>"`` (e.g. ``pusht_edm/edm-3``) -> (asset, sampler, steps).

    Raises:
        ConfigError: not of that form, or with ``+options`` (those belong to ``rtdp bench``).
    """
    from rtdp.core.options import parse_config

    asset, sep, setting = str(entry).partition("/")
    if not sep or not asset or not setting:
        raise ConfigError(f"demo policy {entry!r} must read <checkpoint>/<sampler>-<steps>, e.g. pusht_edm/edm-3 "
                          f"(the checkpoint is a folder of {ASSETS})")
    parsed = parse_config(setting)
    if parsed.options:
        raise ConfigError(f"demo policy {entry!r}: the demo runs plain settings; compare options such as "
                          f"{setting.partition('+')[2]!r} with `rtdp bench`")
    return asset, parsed.sampler, parsed.steps


def _trained_task(checkpoint: Path) -> str | None:
    meta = checkpoint / "meta.json"
    return json.loads(meta.read_text()).get("task") if meta.exists() else None


def _train_here(cfg, out: Path) -> Path:
    from rtdp.cli import compose, task_name
    from rtdp.workflows.collect import collect
    from rtdp.workflows.train import train

    store = out / "demos.zarr"
    if not store.exists():
        collect(task_name(cfg), int(cfg.demos), store, seed=0, workers=2)
    train_cfg = compose("train", [f"task={task_name(cfg)}", f"data={store}", f"out={out / 'train'}",
                                  f"steps={int(cfg.train_steps)}", "resume=true", f"threads={int(cfg.threads)}"])
    train(train_cfg)
    return out / "train" / "checkpoint"


def _fast_policies(cfg, task_name: str) -> list[tuple[str, Path, str, int]]:
    """(label, checkpoint, sampler, steps) of each ``fast`` entry trained on ``task_name``; the others are named and skipped."""
    chosen = []
    for entry in cfg.fast or []:
        asset, sampler, steps = parse_shipped(entry)
        path = shipped_checkpoint(asset)
        trained_on = _trained_task(path)
        if trained_on != task_name:
            print(f"[demo] skipping {entry}: trained on {trained_on}, not {task_name}")
            continue
        chosen.append((f"{asset} {sampler}-{steps}", path, sampler, steps))
    return chosen


def _row(label: str, report: dict[str, Any], reference: dict[str, Any] | None) -> dict[str, Any]:
    row = {k: report[k] for k in ("checkpoint", "sampler", "steps", "episodes", "success_rate", "success_ci95",
                                  "mean_score", "nfe_per_chunk", "latency_ms_p50", "latency_ms_p99", "ms_per_action")}
    row["name"] = label
    ref = reference or report
    row["speedup_per_action"] = ref["ms_per_action"] / report["ms_per_action"]
    if reference is not None:  # episodes won and lost against the DDPM policy, seed by seed
        cmp = paired_comparison([e["success"] for e in reference["per_episode"]],
                                [e["success"] for e in report["per_episode"]])
        row.update(paired_only_reference=cmp["only_reference"], paired_only_this=cmp["only_other"],
                   paired_p=cmp["p_value"])
    return row


def print_comparison(rows: list[dict[str, Any]], expert: dict[str, Any], task: str, threads: int) -> None:
    """One table: every policy on the same seeds, with the scripted expert's line above it."""
    from rtdp.workflows.machine import device_name

    print(f"\nrtdp demo: {task}, {rows[0]['episodes']} episodes on the same seeds; {device_name()}, {threads} threads")
    print(f"{'policy':<26}{'NFE':>5}{'success (95% CI)':>20}{'score':>7}{'ms/action':>11}{'speed-up':>10}{'vs DDPM':>16}")
    def success(r: dict[str, Any]) -> str:
        lo, hi = r["success_ci95"]
        return f"{r['success_rate']:.0%} ({lo:.0%}-{hi:.0%})"

    print(f"{'scripted expert':<26}{'-':>5}{success(expert):>20}{expert['mean_score']:>7.3f}{'-':>11}{'-':>10}")
    for r in rows:
        paired = f"+{r['paired_only_this']}/-{r['paired_only_reference']} p={r['paired_p']:.2f}" if "paired_p" in r else ""
        speedup = f"{r['speedup_per_action']:.1f}x"
        print(f"{r['name']:<26}{r['nfe_per_chunk']:>5}{success(r):>20}{r['mean_score']:>7.3f}"
              f"{r['ms_per_action']:>11.2f}{speedup:>10}{paired:>16}")


def _control_segment(cfg, out: Path, task_name: str) -> dict[str, Any] | None:
    """A short real-time run of ``rtdp control`` (sim driver) with the ``control`` policy; its timing summary."""
    from rtdp.cli import compose
    from rtdp.workflows.control import run_control

    if not cfg.control or int(cfg.control_episodes) <= 0:
        return None
    asset, sampler, steps = parse_shipped(cfg.control)
    path = shipped_checkpoint(asset)
    if _trained_task(path) != task_name:
        print(f"[demo] skipping the control segment: {cfg.control} was trained on {_trained_task(path)}, not {task_name}")
        return None
    overrides = [f"checkpoint={path}", "driver=sim", f"sampler={sampler}", f"steps={steps}",
                 f"episodes={int(cfg.control_episodes)}", f"out={out / 'control'}", "live=false",
                 f"threads={int(cfg.threads)}"]
    if cfg.control_duration_s is not None:
        overrides.append(f"duration_s={float(cfg.control_duration_s)}")
    rep = run_control(compose("control", overrides))
    keys = ("rate_hz", "duration_s", "cycles", "deadline_misses", "period_error_ms_p50", "period_error_ms_p99",
            "period_error_ms_max", "inference_ms_p50", "inference_ms_p99", "chunk_ms", "idle_fraction",
            "dropped_actions", "episodes", "success_rate", "mean_score", "worker")
    return {"policy": f"{asset} {sampler}-{steps}", "report": str(out / "control" / "report.json"),
            **{k: rep[k] for k in keys}}


def control_line(c: dict[str, Any]) -> str:
    """The control segment's timing in one line."""
    return (f"real-time control ({c['policy']}, sim at {c['rate_hz']:g} Hz, {c['worker']} worker): "
            f"{c['cycles']} cycles in {c['duration_s']:.1f} s, {c['deadline_misses']} deadline misses, period error "
            f"p99 {c['period_error_ms_p99']:.2f} ms (max {c['period_error_ms_max']:.2f}), inference "
            f"p50 {c['inference_ms_p50'] or 0:.1f} / p99 {c['inference_ms_p99'] or 0:.1f} ms per {c['chunk_ms']:.0f} ms "
            f"chunk, idle cycles {c['idle_fraction']:.1%}, success {c['success_rate']:.0%} of {c['episodes']}")


def demo(cfg) -> dict[str, Any]:
    from rtdp.cli import task_name
    from rtdp.workflows.eval import evaluate, print_report
    from rtdp.workflows.rollout import rollout_expert

    task = get_task(task_name(cfg))
    out = Path(cfg.out)
    fast = _fast_policies(cfg, task.name)  # bad entries fail here, before anything runs
    if cfg.control:
        parse_shipped(cfg.control)
    out.mkdir(parents=True, exist_ok=True)
    print(f"[demo] output folder: {out.resolve()}")

    print(f"[demo] 1/4 scripted expert on {int(cfg.episodes)} evaluation seeds")
    expert = rollout_expert(task, task.seeds(int(cfg.episodes)))

    if cfg.train:
        print("[demo] 2/4 collecting demonstrations and training")
        source = _train_here(cfg, out)
    else:
        source = shipped_checkpoint(task.name)
        print(f"[demo] 2/4 using the shipped checkpoint {source} (how it was made: {source.parent / 'REPRODUCE.md'})")
    ckpt = out / "checkpoint"
    if ckpt.resolve() != source.resolve():
        if ckpt.exists():
            shutil.rmtree(ckpt)
        shutil.copytree(source, ckpt)
    for extra in ("curves.png", "REPRODUCE.md"):  # the training curve and how the checkpoint was made
        if (source.parent / extra).exists():
            shutil.copy(source.parent / extra, out / extra)

    print(f"[demo] 3/4 evaluating the policy and {len(fast)} fast ones on {int(cfg.episodes)} episodes")
    common = dict(task_name=task.name, episodes=int(cfg.episodes), threads=int(cfg.threads),
                  latency_calls=int(cfg.latency_calls))
    report = evaluate(ckpt, sampler=cfg.sampler, steps=int(cfg.steps), out=out, **common)
    rows = [_row(f"{'trained here' if cfg.train else task.name} {report['sampler']}-{report['steps']}", report, None)]
    for label, path, sampler, steps in fast:
        sub = evaluate(path, sampler=sampler, steps=steps, out=out / label.replace(" ", "_"), video=False, **common)
        rows.append(_row(label, sub, report))

    print("[demo] 4/4 real-time control segment")
    control = _control_segment(cfg, out, task.name)

    n_ok = expert.n_success
    report.update({
        "expert_success_rate": expert.success_rate,
        "expert_success_ci95": list(wilson_interval(n_ok, len(expert.episodes))),
        "expert_mean_score": expert.mean_score,
        "checkpoint": str(ckpt),
        "policies": rows,
        "control": control,
    })
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print_report(report)
    print_comparison(rows, {"success_rate": expert.success_rate, "success_ci95": report["expert_success_ci95"],
                            "mean_score": expert.mean_score}, task.name, int(cfg.threads))
    if control is not None:
        print(control_line(control))
    print(f"[demo] report: {out / 'report.json'}; checkpoint: {ckpt}; rerun the evaluation with "
          f"`rtdp eval checkpoint={ckpt}`")
    return report


def run(cfg) -> dict[str, Any]:
    """CLI entry: ``rtdp demo [out=DIR] [train=true] [fast=[...]] [control=...]``."""
    return demo(cfg)
