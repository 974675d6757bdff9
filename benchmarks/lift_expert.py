"""Success rate, episode length and speed of the scripted Lift expert.

Runs ``rtdp.envs.lift.LiftExpert`` on the Lift evaluation seeds (100000..100049)
and prints a table; ``--json PATH`` also writes the figures as one JSON object.

    python benchmarks/lift_expert.py --json outputs/lift_expert.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from rtdp.workflows.metrics import wilson_interval


def run(seeds: list[int], max_steps: int | None = None) -> dict[str, Any]:
    """Roll the expert out once per seed.

    Args:
        seeds: episode seeds, in order.
        max_steps: step limit per episode; None uses the task's (400).

    Returns:
        The report (see the keys written by :func:`main`).
    """
    import rtdp.envs

    spec = rtdp.envs.get_task("lift")
    max_steps = spec.max_steps if max_steps is None else max_steps
    t0 = time.perf_counter()
    env = rtdp.envs.make("lift", max_episode_steps=max_steps)
    expert = rtdp.envs.expert(env)
    make_s = time.perf_counter() - t0

    successes, lengths, episode_s = [], [], []
    step_s, act_s, n_steps = 0.0, 0.0, 0
    for seed in seeds:
        t_ep = time.perf_counter()
        obs, info = env.reset(seed=seed)
        expert.reset()
        length, success = 0, False
        while True:
            t = time.perf_counter()
            action = expert.act(obs)
            t_act = time.perf_counter()
            obs, _, terminated, truncated, info = env.step(action)
            step_s += time.perf_counter() - t_act
            act_s += t_act - t
            length += 1
            success = success or bool(info["is_success"])
            if terminated or truncated:
                break
        n_steps += length
        successes.append(success)
        lengths.append(length)
        episode_s.append(time.perf_counter() - t_ep)
    env.close()

    n, k = len(seeds), int(sum(successes))
    low, high = wilson_interval(k, n)
    return {
        "task": spec.name,
        "env_id": spec.env_id,
        "expert": spec.expert,
        "episodes": n,
        "seeds": [int(seeds[0]), int(seeds[-1])] if seeds else [],
        "max_steps": max_steps,
        "successes": k,
        "success_rate": k / n,
        "success_ci95": [low, high],
        "mean_score": k / n,
        "mean_length": float(np.mean(lengths)),
        "mean_length_success": float(np.mean([l for l, s in zip(lengths, successes) if s])) if k else None,
        "max_length": int(max(lengths)),
        "s_per_episode": float(np.mean(episode_s)),
        "env_steps_per_s": n_steps / step_s,
        "expert_ms_per_action": 1e3 * act_s / n_steps,
        "make_s": make_s,
        "failed_seeds": [int(s) for s, ok in zip(seeds, successes) if not ok],
        "machine": platform.processor() or platform.machine(),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command-line entry point; returns the report it printed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--start", type=int, default=100000, help="first seed (default: 100000)")
    parser.add_argument("--episodes", type=int, default=50, help="number of consecutive seeds (default: 50)")
    parser.add_argument("--max-steps", type=int, default=None, help="step limit (default: the task's, 400)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the report here")
    args = parser.parse_args(argv)
    if args.episodes <= 0:
        parser.error("--episodes must be positive")

    report = run(list(range(args.start, args.start + args.episodes)), args.max_steps)
    low, high = report["success_ci95"]
    rows = [
        ("episodes", f"{report['episodes']} (seeds {report['seeds'][0]}..{report['seeds'][1]})"),
        ("success rate", f"{report['success_rate']:.3f}  95% CI [{low:.3f}, {high:.3f}]"),
        ("mean length", f"{report['mean_length']:.1f} steps (max {report['max_length']})"),
        ("s / episode", f"{report['s_per_episode']:.3f}"),
        ("env steps / s", f"{report['env_steps_per_s']:.0f}"),
        ("expert ms / action", f"{report['expert_ms_per_action']:.3f}"),
        ("failed seeds", ", ".join(map(str, report["failed_seeds"])) or "none"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
