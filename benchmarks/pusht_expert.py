"""Run the scripted PushT expert on the evaluation seeds and report how well it does.

Usage::

    python benchmarks/pusht_expert.py [--episodes 50] [--json PATH]

Per episode: success = max coverage ≥ 0.95 within 300 steps, score = max over
steps of clip(coverage / 0.95, 0, 1). Prints the success rate with a 95% Wilson
interval, the mean score, the mean episode length and the wall time per
episode.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95% Wilson score interval of a success rate."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def run(episodes: int | None = None, task: str = "pusht") -> dict:
    """Roll the expert out on the task's evaluation seeds.

    Args:
        episodes: how many of the evaluation seeds to use (all when None).
        task: registered task name.

    Returns:
        The report (see the module docstring), also with per-episode rows.
    """
    import rtdp.envs as envs

    spec = envs.get_task(task)
    seeds = list(spec.eval_seeds if episodes is None else spec.eval_seeds[:episodes])
    env = envs.make(spec)
    expert = envs.expert(env)
    rows = []
    for seed in seeds:
        start = time.perf_counter()
        obs, _ = env.reset(seed=seed)
        expert.reset()
        best, steps, done = 0.0, 0, False
        while not done:
            obs, _, terminated, truncated, info = env.step(expert.act(obs))
            steps += 1
            best = max(best, info["coverage"])
            done = terminated or truncated
        rows.append(
            {
                "seed": seed,
                "success": best >= 0.95,
                "score": min(best / 0.95, 1.0),
                "max_coverage": best,
                "length": steps,
                "seconds": time.perf_counter() - start,
            }
        )
    env.close()
    n = len(rows)
    wins = sum(r["success"] for r in rows)
    return {
        "task": task,
        "expert": spec.expert,
        "episodes": n,
        "seeds": [seeds[0], seeds[-1]] if seeds else [],
        "success_rate": wins / n if n else 0.0,
        "success_ci95": list(wilson_interval(wins, n)),
        "mean_score": sum(r["score"] for r in rows) / n if n else 0.0,
        "mean_length": sum(r["length"] for r in rows) / n if n else 0.0,
        "seconds_per_episode": sum(r["seconds"] for r in rows) / n if n else 0.0,
        "machine": platform.processor() or platform.machine(),
        "per_episode": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=None, help="first N evaluation seeds (default: all 50)")
    parser.add_argument("--task", default="pusht")
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    args = parser.parse_args()
    report = run(args.episodes, args.task)
    lo, hi = report["success_ci95"]
    print(f"{'task':<22}{report['task']}")
    print(f"{'episodes':<22}{report['episodes']} (seeds {report['seeds'][0]}..{report['seeds'][1]})")
    print(f"{'success rate':<22}{report['success_rate']:.3f}  (95% CI {lo:.3f}-{hi:.3f})")
    print(f"{'mean score':<22}{report['mean_score']:.4f}")
    print(f"{'mean length':<22}{report['mean_length']:.1f} steps")
    print(f"{'s / episode':<22}{report['seconds_per_episode']:.2f}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
