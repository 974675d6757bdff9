"""Record the golden actions of every shipped checkpoint (``tests/test_golden_checkpoints.py`` reads them).

Each case runs one checkpoint with one inference setting on a fixed batch of
observations and fixed starting noise, and stores the actions. The file is
written once, from the code before a change that must not move any action,
and kept: the test compares the code of the day against it.

    .venv/bin/python tests/golden/record_checkpoints.py
    .venv/bin/python tests/golden/record_checkpoints.py --planners   # the driving planners' plans, own file

A tiny transformer policy (fresh weights, no shipped checkpoint has one) is
saved beside the goldens so its path, caching included, is pinned too.
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CHECKPOINTS = REPO / "rtdp" / "assets" / "checkpoints"
GOLDEN_FILE = HERE / "checkpoint_actions.safetensors"
TINY_TRANSFORMER = HERE / "transformer_tiny"

# (checkpoint, case name, Runner keyword arguments, calls in sequence)
CASES: list[tuple[str, str, dict, int]] = [
    ("pusht", "ddpm-100", {"sampler": "ddpm", "steps": 100}, 1),
    ("pusht", "ddim-10", {"sampler": "ddim", "steps": 10}, 1),
    ("pusht", "dpmpp-8", {"sampler": "dpmpp", "steps": 8}, 1),
    ("pusht", "heun-5", {"sampler": "heun", "steps": 5}, 1),
    ("pusht", "euler_a-10", {"sampler": "euler_a", "steps": 10}, 1),
    ("pusht", "ddim-10+fp32", {"sampler": "ddim", "steps": 10, "precision": "fp32"}, 1),
    ("pusht", "ddim-10+deepcache3", {"sampler": "ddim", "steps": 10, "deepcache": 3}, 1),
    ("pusht", "ddim-10+inpaint", {"sampler": "ddim", "steps": 10}, 1),
    ("pusht_dp", "ddim-10", {"sampler": "ddim", "steps": 10}, 1),
    ("pusht_dp", "ddpm-100", {"sampler": "ddpm", "steps": 100}, 1),
    ("lift", "ddim-10", {"sampler": "ddim", "steps": 10}, 1),
    ("lift", "ddpm-100", {"sampler": "ddpm", "steps": 100}, 1),
    ("pusht_edm", "edm-3", {"sampler": "edm", "steps": 3}, 1),
    ("pusht_edm", "edm-3+fp32", {"sampler": "edm", "steps": 3, "precision": "fp32"}, 1),
    ("pusht_edm", "heun-3", {"sampler": "heun", "steps": 3}, 1),
    ("pusht_edm", "stream-1", {"sampler": "stream", "steps": 1}, 4),
    ("pusht_edm", "stream-2", {"sampler": "stream", "steps": 2}, 3),
    ("pusht_cm", "cm-1", {"sampler": "cm", "steps": 1}, 1),
    ("pusht_cm", "cm-2", {"sampler": "cm", "steps": 2}, 1),
    ("pusht_transformer", "ddpm-100", {"sampler": "ddpm", "steps": 100}, 1),
    ("pusht_transformer", "ddpm-100+bac10", {"sampler": "ddpm", "steps": 100, "cache": "bac10",
                                             "calibration": "bac_ddpm-100.json"}, 1),
    ("transformer_tiny", "ddpm-20", {"sampler": "ddpm", "steps": 20}, 1),
    ("transformer_tiny", "ddim-10", {"sampler": "ddim", "steps": 10}, 1),
    ("transformer_tiny", "ddpm-20+uniform5", {"sampler": "ddpm", "steps": 20, "cache": "uniform5"}, 1),
]
BATCH = 2
LOSS_CHECKPOINTS = ("pusht", "pusht_edm", "transformer_tiny")
# Driving planners (not action policies): (checkpoint, case name, denoising steps); their plans live in their
# own file, recorded on their own machine (``--planners``)
PLANNER_CASES: list[tuple[str, str, int]] = [
    ("highway", "anchor-2", 2), ("highway", "anchor-1", 1),
    ("highway_diffusion_plan", "ddim-20", 20), ("highway_diffusion_plan", "ddim-2", 2),
    ("highway_regression", "regress-1", 1),
]
PLANNER_FILE = HERE / "planner_plans.safetensors"


def checkpoint_dir(name: str) -> Path:
    return TINY_TRANSFORMER if name == "transformer_tiny" else CHECKPOINTS / name / "checkpoint"


def load(name: str):
    """The policy of a case's checkpoint, knowing its folder (for files shipped beside it)."""
    from rtdp.policies import load_policy

    policy = load_policy(checkpoint_dir(name))
    policy._golden_name = name
    return policy


def policy_dir(policy) -> Path:
    return checkpoint_dir(policy._golden_name)


def machine() -> str:
    """What the goldens are bit-exact on: the CPU model and torch version."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} | torch {torch.__version__}"


def observations(policy, batch: int = BATCH, seed: int = 0) -> dict[str, np.ndarray]:
    """A fixed batch of observations inside the checkpoint's data range ({key: (B, To, *shape)}); a driving
    planner's pooled statistics are broadcast to its inputs' shapes (To = 1)."""
    cfg = policy.config
    stats = policy.normalizer.get_stats()
    rng = np.random.default_rng(seed)
    obs = {}
    for key in sorted(cfg.lowdim_shapes):
        shape = tuple(cfg.lowdim_shapes[key])
        lo, hi = (np.broadcast_to(stats[key][b], shape) for b in ("min", "max"))
        u = rng.random((batch, cfg.n_obs_steps, *shape))
        obs[key] = (lo + (hi - lo) * u).astype(np.float32)
    return obs


def run_case(policy, kwargs: dict, calls: int, seed: int = 0) -> torch.Tensor:
    """Actions of ``calls`` successive calls with one setting, stacked (calls, B, Ta, Da)."""
    from rtdp.policies.runner import Runner

    if "calibration" in kwargs:  # the BAC calibration shipped beside the checkpoint
        from rtdp.core.bac import BacCalibration

        kwargs = {**kwargs, "calibration": BacCalibration.load(policy_dir(policy) / kwargs["calibration"])}
    runner = Runner(policy, seed=seed, **kwargs)
    cfg = policy.config
    noise = torch.randn((BATCH, cfg.horizon, cfg.action_dim), generator=torch.Generator().manual_seed(seed + 1),
                        dtype=torch.float64).float()
    outs = []
    for i in range(calls):
        obs = observations(policy, seed=seed + i)
        outs.append(runner.predict(obs, noise=None if runner.name == "stream" else noise).detach().cpu().float())
    return torch.stack(outs)


def inpaint_case(policy, seed: int = 0) -> torch.Tensor:
    """DDIM-10 pulled towards committed actions at the chunk's first 3 positions (real-time chunking)."""
    from rtdp.policies.runner import Runner

    runner = Runner(policy, "ddim", 10, seed=seed)
    cfg = policy.config
    noise = torch.randn((BATCH, cfg.horizon, cfg.action_dim), generator=torch.Generator().manual_seed(seed + 1),
                        dtype=torch.float64).float()
    obs = observations(policy, seed=seed)
    stats = policy.normalizer.get_stats()["action"]
    committed = (stats["min"] + (stats["max"] - stats["min"]) * 0.4).astype(np.float32)
    committed = np.broadcast_to(committed, (BATCH, 3, cfg.action_dim)).copy()
    weights = np.array([1.0, 0.7, 0.3], dtype=np.float32)
    return runner.predict(obs, noise=noise, inpaint=(committed, weights)).detach().cpu().float()[None]


def planner_case(name: str, steps: int, seed: int = 0) -> torch.Tensor:
    """The plans (1, B, 8, 2) of a shipped planner on fixed inputs and a seeded generator."""
    from rtdp.models import load_model

    planner = load_model(checkpoint_dir(name))
    obs = observations(planner, seed=seed)
    plan = planner.plan(obs, steps=steps, generator=torch.Generator().manual_seed(seed + 1)).plan
    return plan.detach().cpu().float()[None]


def make_tiny_transformer() -> None:
    """Save a fresh 2-layer transformer policy with PushT's shapes (the golden's own checkpoint)."""
    from rtdp.policies.transformer import TransformerDiffusionConfig, TransformerDiffusionPolicy

    torch.manual_seed(0)
    cfg = TransformerDiffusionConfig(lowdim_shapes={"keypoint": (9, 2), "agent_pos": (2,)}, action_dim=2,
                                     n_layer=2, n_head=2, n_emb=32, num_train_timesteps=20,
                                     num_inference_steps=20, causal_attn=False, prediction_type="sample")
    policy = TransformerDiffusionPolicy(cfg)
    policy.set_normalizer({"keypoint": {"min": np.zeros(18), "max": np.full(18, 512.0)},
                           "agent_pos": {"min": np.zeros(2), "max": np.full(2, 512.0)},
                           "action": {"min": np.zeros(2), "max": np.full(2, 512.0)}})
    policy.save_pretrained(TINY_TRANSFORMER)


def loss_cases() -> dict[str, torch.Tensor]:
    """Training losses of the shipped DDPM/EDM checkpoints and the tiny transformer on a fixed batch."""
    from rtdp.policies import load_policy

    out = {}
    for name in LOSS_CHECKPOINTS:
        policy = load_policy(checkpoint_dir(name))
        cfg = policy.config
        obs = observations(policy, batch=4, seed=7)
        stats = policy.normalizer.get_stats()["action"]
        rng = np.random.default_rng(8)
        action = (stats["min"] + (stats["max"] - stats["min"]) * rng.random((4, cfg.horizon, cfg.action_dim)))
        policy.train()
        torch.manual_seed(10)  # dropout draws from the global generator
        loss = policy.compute_loss({"obs": obs, "action": action.astype(np.float32)},
                                   generator=torch.Generator().manual_seed(9))
        out[f"{name}/loss"] = loss.detach().float().reshape(1)
    return out


def record_all(skip: set[str] = frozenset()) -> dict[str, torch.Tensor]:
    """Every case (and the losses) whose key is not in ``skip``."""
    torch.set_num_threads(1)
    tensors: dict[str, torch.Tensor] = {}
    for name, case, kwargs, calls in CASES:
        if f"{name}/{case}" in skip:
            continue
        policy = load(name)
        if case.endswith("+inpaint"):
            tensors[f"{name}/{case}"] = inpaint_case(policy)
        else:
            tensors[f"{name}/{case}"] = run_case(policy, kwargs, calls)
    if not {f"{n}/loss" for n in LOSS_CHECKPOINTS} <= skip:
        tensors.update(loss_cases())
    return tensors


def main() -> int:
    """Record every case; ``--add`` keeps the recorded ones and records only the cases not in the file yet
    (a newly shipped checkpoint), on the machine that recorded the rest."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    if "--planners" in sys.argv:
        torch.set_num_threads(1)
        plans = {f"{n}/{c}": planner_case(n, steps) for n, c, steps in PLANNER_CASES}
        save_file(plans, str(PLANNER_FILE), metadata={"machine": machine()})
        print(f"wrote {len(plans)} planner cases to {PLANNER_FILE} ({machine()})")
        return 0
    if not TINY_TRANSFORMER.exists() or "--new-transformer" in sys.argv:
        make_tiny_transformer()
    kept: dict[str, torch.Tensor] = {}
    if "--add" in sys.argv:
        with safe_open(str(GOLDEN_FILE), framework="pt") as f:
            if f.metadata()["machine"] != machine():
                print(f"--add records on the goldens' machine ({f.metadata()['machine']}), not {machine()}")
                return 2
            kept = {k: f.get_tensor(k) for k in f.keys()}
    tensors = {**kept, **record_all(skip=set(kept))}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(GOLDEN_FILE), metadata={"machine": machine()})
    print(f"wrote {len(tensors)} golden cases to {GOLDEN_FILE} ({machine()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
