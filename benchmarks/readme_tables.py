"""README.md's figure tables, as markdown, from the reports `benchmarks/readme.sh` writes.

    python benchmarks/readme_tables.py benchmarks/results/readme

Every number comes from a JSON report of this run or from a shipped checkpoint's
files (meta.json: demonstrations and training time; model.safetensors: size).
The highway reports carry their planners' training steps and time themselves.
"""

from __future__ import annotations

import json
import math
import platform
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from rtdp.envs.highway_score import SCENARIOS
from rtdp.envs.highway_score import TERMS as SCORE_TERMS
from rtdp.workflows.machine import device_name

CHECKPOINTS = Path(__file__).resolve().parents[1] / "rtdp" / "assets" / "checkpoints"


def _load(folder: Path, name: str) -> dict | None:
    path = folder / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _ci(r: dict) -> str:
    lo, hi = r["success_ci95"]
    fmt = ".1%" if r["episodes"] > 100 else ".0%"
    return f"{r['success_rate']:{fmt}} ({lo:{fmt}}–{hi:{fmt}})"


def _rows(folder: Path, names: tuple[str, ...]):
    """(report, configuration row) of every configuration in the named bench reports that exist."""
    for name in names:
        bench = _load(folder, name)
        for r in (bench or {}).get("configs", []):
            yield bench, r


def _paired(r: dict) -> str:
    """Episodes won and lost against ddpm-100 on the same seeds, with McNemar's p."""
    if "paired_p" not in r:
        return "–"
    return f"+{r['paired_only_this']}/−{r['paired_only_reference']} (p = {r['paired_p']:.2f})"


def _millions(checkpoint: Path) -> float:
    with safe_open(str(checkpoint / "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys()) / 1e6


def _shipped(checkpoint: str | None) -> str:
    """The shipped checkpoint's folder name; a fresh network (``fresh:<size>``) by its size."""
    if checkpoint and str(checkpoint).startswith("fresh:"):
        return f"fresh {str(checkpoint)[6:]}"
    return Path(checkpoint).parent.name if checkpoint else "fresh"


def _about(asset: str) -> str:
    ck = CHECKPOINTS / asset / "checkpoint"
    meta = json.loads((ck / "meta.json").read_text())
    config = json.loads((ck / "config.json").read_text())
    kind = config.get("model_type") or config.get("policy_type")
    return (f"`{asset}` ({kind}, {_millions(ck):.1f} M), {meta['n_episodes']} demos, "
            f"{meta['train_time_s'] / 60:.0f} min training")


def success_table(folder: Path) -> list[str]:
    lines = ["| task | policy | config | success (95% CI) | mean score |", "|---|---|---|---|---|"]
    for task, bench_name in (("pusht", "pusht"), ("lift", "lift")):
        expert, bench = _load(folder, f"expert_{task}"), _load(folder, bench_name)
        if expert is None or bench is None:
            continue
        lines.append(f"| {task} | scripted expert | – | {_ci(expert)}, n={expert['episodes']} | {expert['mean_score']:.3f} |")
        ref = next(r for r in bench["configs"] if r["name"] == "ddpm-100")
        lines.append(f"| {task} | {_about(_shipped(ref['checkpoint']))} | ddpm-100 | {_ci(ref)}, n={ref['episodes']} | "
                     f"{ref['mean_score']:.3f} |")
    return lines


def speed_table(folder: Path) -> list[str]:
    lines = ["| task | checkpoint | config | NFE | success (95% CI) | vs ddpm-100, same seeds | ms per action | "
             "speed-up |", "|---|---|---|---|---|---|---|---|"]
    for bench, r in _rows(folder, ("pusht", "lift")):
        paired = _paired(r)
        lines.append(f"| {bench['task']} | `{_shipped(r['checkpoint'])}` | {r['name']} | {r['nfe_per_chunk']} | "
                     f"{_ci(r)} | {paired} | {r['ms_per_action']:.2f} | {r['speedup_per_action_vs_ddpm100']:.1f}× |")
    return lines


def timing_table(folder: Path) -> list[str]:
    lines = ["| network (timing, fresh weights) | config | NFE | ms per chunk, p50 / p99 | ms per NFE | ms per action | "
             "speed-up |", "|---|---|---|---|---|---|---|"]
    labels = {"dp_lowdim": "Diffusion Policy's low-dim U-Net", "dp_image": "Diffusion Policy's image U-Net"}
    for bench, r in _rows(folder, tuple(labels)):
        lines.append(f"| {labels[bench['size']]} | {r['name']} | {r['nfe_per_chunk']} | {r['latency_ms_p50']:.1f} / "
                     f"{r['latency_ms_p99']:.1f} | {r['ms_per_nfe']:.1f} | {r['ms_per_action']:.2f} | "
                     f"{r['speedup_per_action_vs_ddpm100']:.1f}× |")
    return lines


def caching_table(folder: Path) -> list[str]:
    lines = ["| checkpoint | config | network calls per block | action MSE vs uncached | ms per chunk | speed-up | "
             "success (95% CI) | vs ddpm-100, same seeds |", "|---|---|---|---|---|---|---|---|"]
    for _, r in _rows(folder, ("pusht_transformer", "lift", "dp_lowdim")):
        if not (r["name"] == "ddpm-100" or r.get("cache") or r.get("deepcache")):
            continue
        updates = r.get("cache_updates_per_block")
        updates = f"{updates:.1f}" if updates is not None else (f"1 in {r['deepcache']}" if r.get("deepcache") else "100")
        mse = r.get("action_mse_vs_plain")
        success = _ci(r) if "success_rate" in r else "– (timing)"
        paired = _paired(r)
        lines.append(f"| `{_shipped(r['checkpoint'])}` | {r['name']} | {updates} | "
                     f"{'0' if mse is None else f'{mse:.1e}'} | {r['latency_ms_p50']:.1f} | "
                     f"{r['speedup_per_action_vs_ddpm100']:.2f}× | {success} | {paired} |")
    return lines


TERMS = ("pdms", *(t for t in SCORE_TERMS if t != "pdms"))  # PDMS first, then its terms


def _planners(folder: Path):
    """(label, row) of the expert's logged futures and every planner configuration, or nothing."""
    expert, bench = _load(folder, "highway_expert"), _load(folder, "highway")
    if expert is None or bench is None:
        return
    yield "expert's logged future", expert
    for r in bench["configs"]:
        yield f"`{_shipped(r['checkpoint'])}` ({r['policy']}) {r['name'].split(':')[-1]}", r


def highway_table(folder: Path) -> list[str]:
    lines = ["| planner | NFE / plan | ms p50 / p99 | PDMS | NC | DAC | TTC | EP | C | diversity | training |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, r in _planners(folder):
        timing = "–" if r.get("latency_ms_p50") is None else f"{r['latency_ms_p50']:.1f} / {r['latency_ms_p99']:.1f}"
        spread = f"{r['diversity']:.2f} m" if "diversity" in r else "–"
        training = (f"{r['train_steps']:,} steps, {r['train_time_s'] / 60:.0f} min" if r.get("train_time_s") else "–")
        nfe = r["nfe_per_plan"] if r.get("checkpoint") else "–"
        lines.append(f"| {label} | {nfe} | {timing} | " + " | ".join(f"{r[k]:.3f}" for k in TERMS)
                     + f" | {spread} | {training} |")
    return lines


def highway_scenario_table(folder: Path) -> list[str]:
    rows = list(_planners(folder))
    if not rows:
        return []
    counts = rows[0][1]["per_scenario"]
    lines = ["| planner | " + " | ".join(f"{s} ({counts[s]['scenes']})" for s in SCENARIOS) + " | all |",
             "|---|" + "---|" * (len(SCENARIOS) + 1)]
    for label, r in rows:
        lines.append(f"| {label} | " + " | ".join(f"{r['per_scenario'][s]['pdms']:.3f}" for s in SCENARIOS)
                     + f" | {r['pdms']:.3f} |")
    return lines


def main(folder: Path) -> None:
    reports = [r for n in ("pusht", "lift", "dp_lowdim", "dp_image", "pusht_transformer", "highway")
               if (r := _load(folder, n))]
    threads = {r["threads"] for r in reports}
    devices = sorted({r["device"] for r in reports}) or [device_name()]
    print(f"Measured by `bash benchmarks/readme.sh` on {' and '.join(devices)}, torch {torch.__version__}, "
          f"Python {platform.python_version()}, {', '.join(map(str, sorted(threads)))} threads, batch 1; "
          f"success over each task's evaluation seeds.\n")
    for title, table in (("Success of the shipped policies", success_table(folder)),
                         ("Fast policies against DDPM-100 (shipped checkpoints, same seeds, one run)", speed_table(folder)),
                         ("Diffusion Policy's network sizes", timing_table(folder)),
                         ("Caching (BAC, uniform, DeepCache)", caching_table(folder)),
                         ("Driving planners on held-out highway scenes (PDMS and its terms)", highway_table(folder)),
                         ("PDMS per scenario (scenes)", highway_scenario_table(folder))):
        if len(table) > 2:
            print(f"**{title}**\n")
            print("\n".join(table) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/readme"))
