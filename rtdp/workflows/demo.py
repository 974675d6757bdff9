"""``rtdp demo``: the whole path on one task, with numbers, plots and a video.

1. measure the scripted expert on the evaluation seeds (the reference the
   policy is compared with);
2. take the checkpoint shipped with rtdp (produced by ``rtdp train``; the
   command that reproduces it lies beside it), or with ``train=true`` collect
   demonstrations (reused from ``out`` when present) and train one;
3. evaluate the policy, write ``report.json``, ``checkpoint/``, the rollout
   video and the plots into ``out``, and print the table.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from rtdp.envs import get_task
from rtdp.errors import CheckpointError
from rtdp.workflows.metrics import wilson_interval
from rtdp.workflows.report import print_table

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "checkpoints"


def shipped_checkpoint(task: str) -> Path:
    """Folder of the checkpoint rtdp ships for ``task``."""
    path = ASSETS / task / "checkpoint"
    if not (path / "model.safetensors").exists():
        raise CheckpointError(
            f"rtdp ships no checkpoint for task {task!r} (looked in {path}); run `rtdp demo task={task} train=true`"
        )
    return path


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


def demo(cfg) -> dict[str, Any]:
    from rtdp.cli import task_name
    from rtdp.workflows.eval import evaluate, print_report
    from rtdp.workflows.rollout import rollout_expert

    task = get_task(task_name(cfg))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"[demo] output folder: {out.resolve()}")

    print(f"[demo] 1/3 scripted expert on {int(cfg.episodes)} evaluation seeds")
    seeds = task.seeds(int(cfg.episodes))
    expert = rollout_expert(task, seeds)

    if cfg.train:
        print("[demo] 2/3 collecting demonstrations and training")
        source = _train_here(cfg, out)
    else:
        source = shipped_checkpoint(task.name)
        print(f"[demo] 2/3 using the shipped checkpoint {source} (how it was made: {source.parent / 'REPRODUCE.md'})")
    ckpt = out / "checkpoint"
    if ckpt.resolve() != source.resolve():
        if ckpt.exists():
            shutil.rmtree(ckpt)
        shutil.copytree(source, ckpt)
    for extra in ("curves.png", "REPRODUCE.md"):  # the training curve and how the checkpoint was made
        if (source.parent / extra).exists():
            shutil.copy(source.parent / extra, out / extra)

    print(f"[demo] 3/3 evaluating the policy on {int(cfg.episodes)} episodes with {cfg.sampler}-{cfg.steps}")
    report = evaluate(ckpt, task_name=task.name, episodes=int(cfg.episodes), sampler=cfg.sampler,
                      steps=int(cfg.steps), out=out, threads=int(cfg.threads))
    n_ok = expert.n_success
    report.update({
        "expert_success_rate": expert.success_rate,
        "expert_success_ci95": list(wilson_interval(n_ok, len(expert.episodes))),
        "expert_mean_score": expert.mean_score,
        "checkpoint": str(ckpt),
    })
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print_report(report)
    lo, hi = report["expert_success_ci95"]
    print_table("scripted expert (same seeds)", [
        ("success rate", f"{expert.success_rate:.1%}  (95% CI {lo:.1%}-{hi:.1%})"),
        ("mean score", f"{expert.mean_score:.3f}"),
    ])
    print(f"[demo] report: {out / 'report.json'}; checkpoint: {ckpt}; rerun the evaluation with "
          f"`rtdp eval checkpoint={ckpt}`")
    return report


def run(cfg) -> dict[str, Any]:
    """CLI entry: ``rtdp demo [out=DIR] [train=true]``."""
    return demo(cfg)
