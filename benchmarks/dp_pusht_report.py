"""Diffusion Policy's PushT protocol on a run trained from pusht_cchi_v7_replay.zarr.

Reads ``<run>/history/step_*/`` (written by ``rtdp train ... keep_checkpoints=true``:
the EMA weights of every evaluation during training, each with its 50-episode
score on seeds 100000..100049), then

* plots score and strict success against training time;
* re-evaluates the best checkpoint (by the during-training score) and the last
  ``--last`` checkpoints with every sampler in ``--samplers`` on the same 50 seeds;
* reports the best checkpoint and the mean over the last checkpoints, as
  Diffusion Policy's paper does (it averages its last 10), with Wilson intervals.

Usage::

    python benchmarks/dp_pusht_report.py runs/dp_pusht_kp --samplers ddpm-100 --json benchmarks/results/dp_pusht_kp.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from rtdp.envs import get_task
from rtdp.workflows.eval import evaluate_checkpoint_policy, load_checkpoint
from rtdp.workflows.metrics import wilson_interval

PAPER = {"dp_cnn_state": (0.95, 0.91), "dp_cnn_image": (0.91, 0.84), "lerobot_image_success": 0.638}


def _eval(path: Path, sampler: str, steps: int, seeds: list[int]) -> dict:
    policy, meta = load_checkpoint(path)
    task = get_task(meta.get("task") or "pusht")
    res = evaluate_checkpoint_policy(policy, task, seeds, sampler=sampler, steps=steps, progress=False)
    lo, hi = wilson_interval(res.n_success, len(res.episodes))
    return {"checkpoint": str(path), "train_steps": meta.get("train_steps"), "train_time_s": meta.get("train_time_s"),
            "sampler": f"{sampler}-{steps}", "episodes": len(res.episodes), "mean_score": res.mean_score,
            "success_rate": res.success_rate, "success_ci95": [lo, hi]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--samplers", default="ddpm-100",
                    help="samplers to re-evaluate with; the during-training evaluations are reported as they are")
    ap.add_argument("--last", type=int, default=5)
    ap.add_argument("--episodes", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    snaps = sorted((args.run / "history").glob("step_*"))
    if not snaps:
        raise SystemExit(f"{args.run}/history has no checkpoints; train with keep_checkpoints=true")
    metas = [json.loads((s / "meta.json").read_text()) for s in snaps]
    seeds = list(get_task(metas[0]["task"]).eval_seeds)[: args.episodes]
    curve = [{"step": m["train_steps"], "train_time_s": m["train_time_s"], "score": m["eval_score"],
              "success_rate": m["eval_success"]} for m in metas]
    best_i = int(np.argmax([m["eval_score"] for m in metas]))
    last = snaps[-args.last:]

    report = {"run": str(args.run), "data": metas[0]["data"], "n_episodes": metas[0]["n_episodes"],
              "protocol": f"seeds {seeds[0]}..{seeds[-1]}, score = max over the episode of clip(coverage/0.95, 0, 1)",
              "curve": curve, "paper": PAPER, "best": {}, "last": {},
              "training_evals": {"best": curve[best_i], "last_mean_score": float(np.mean([c["score"] for c in curve[-args.last:]])),
                                 "last_mean_success": float(np.mean([c["success_rate"] for c in curve[-args.last:]]))}}
    te = report["training_evals"]
    print(f"during training: best (step {te['best']['step']}) score {te['best']['score']:.3f}, success "
          f"{te['best']['success_rate']:.0%}; mean of last {args.last}: score {te['last_mean_score']:.3f}, "
          f"success {te['last_mean_success']:.0%}")
    for spec in filter(None, args.samplers.split(",")):
        sampler, steps = spec.rsplit("-", 1)
        best = _eval(snaps[best_i], sampler, int(steps), seeds)
        lasts = [_eval(s, sampler, int(steps), seeds) for s in last]
        report["best"][spec] = best
        report["last"][spec] = {
            "checkpoints": [r["checkpoint"] for r in lasts],
            "mean_score": float(np.mean([r["mean_score"] for r in lasts])),
            "success_rate": float(np.mean([r["success_rate"] for r in lasts])),
            "per_checkpoint": lasts,
        }
        print(f"{spec:>9}: best (step {best['train_steps']}, {best['train_time_s'] / 60:.0f} min) score "
              f"{best['mean_score']:.3f}, success {best['success_rate']:.0%} "
              f"({best['success_ci95'][0]:.0%}-{best['success_ci95'][1]:.0%}); "
              f"mean of last {len(lasts)}: score {report['last'][spec]['mean_score']:.3f}, "
              f"success {report['last'][spec]['success_rate']:.0%}")

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    plot = args.plot or (args.json.with_suffix(".png") if args.json else args.run / "dp_protocol.png")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    t = [c["train_time_s"] / 60 for c in curve]
    ax.plot(t, [c["score"] for c in curve], "o-", label="mean score (DDIM-10, 50 episodes)")
    ax.plot(t, [c["success_rate"] for c in curve], "s--", label="strict success (coverage >= 0.95)")
    ax.axhline(PAPER["dp_cnn_state"][0], color="gray", ls=":", label="Diffusion Policy CNN, state: best 0.95")
    ax.axhline(0.85, color="red", ls=":", lw=0.8, label="0.85")
    ax.set_xlabel("training time, min (2 CPU cores)")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"PushT from Diffusion Policy's {metas[0]['n_episodes']} human demonstrations")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(plot, dpi=110)
    print(f"plot: {plot}")


if __name__ == "__main__":
    main()
