"""``rtdp train``: train a diffusion policy from a zarr replay buffer.

One loop for every policy and task: AdamW with linear warm-up and cosine
decay, an EMA copy of the weights (Diffusion Policy's power-0.75 schedule),
periodic evaluation rollouts, the EMA policy's action error on fixed
training windows at every checkpoint, and checkpoints that resume bit for bit
(weights, EMA, optimiser moments, step and every RNG state are saved as
safetensors + JSON; nothing is pickled).
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import numpy as np

from rtdp.envs import TaskSpec, get_task
from rtdp.errors import CheckpointError, ConfigError, DatasetError

STATE_DIR = "train_state"


# what a checkpoint's error on fixed training windows is logged as: an action policy's MSE, a planner's distance
ERROR_KEYS = {"action_mse", "plan_ade_m"}


def lr_at(step: int, base_lr: float, warmup: int, total: int) -> float:
    """Linear warm-up then cosine decay to zero (diffusers' cosine schedule)."""
    if step < warmup:
        return base_lr * (step + 1) / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def ema_decay(step: int, power: float = 0.75, max_decay: float = 0.9999) -> float:
    """Diffusion Policy's EMA warm-up: 1 - (1 + step)^-power, clipped."""
    if step <= 0:
        return 0.0
    return float(min(max_decay, max(0.0, 1.0 - (1.0 + step) ** -power)))


def build_policy(task: TaskSpec | None, policy_cfg, arrays: dict[str, np.ndarray], stats: dict | None):
    """A freshly initialised policy of the family ``policy_cfg.name`` (``rtdp.policies.registry``) for the data's
    shapes; a distilled family (``policy=consistency``) starts from its teacher, which fixes them."""
    from omegaconf import DictConfig, OmegaConf

    from rtdp.policies.registry import build_policy as build_family_policy

    node = OmegaConf.to_container(policy_cfg, resolve=True) if isinstance(policy_cfg, DictConfig) else dict(policy_cfg)
    return build_family_policy(
        str(node["name"]), node,
        lowdim_shapes={k: tuple(arrays[k].shape[1:]) for k in (task.lowdim_keys if task else ())},
        image_shapes={k: tuple(arrays[k].shape[1:]) for k in (task.image_keys if task else ())},
        action_dim=int(arrays["action"].shape[-1]) if "action" in arrays else 0, stats=stats)


def _save_state(path: Path, model, ema, opt, step: int, np_rng: np.random.Generator, extra: dict) -> None:
    """Everything needed to continue bit for bit, as safetensors + JSON."""
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, str(path / "ema.safetensors"))
    opt_tensors: dict[str, Any] = {}
    for idx, st in opt.state_dict()["state"].items():
        for name, value in st.items():
            opt_tensors[f"{idx}.{name}"] = torch.as_tensor(value).contiguous()
    opt_tensors["__torch_rng__"] = torch.get_rng_state()
    save_file(opt_tensors, str(path / "optim.safetensors"))
    meta = {
        "step": step,
        "param_groups": opt.state_dict()["param_groups"],
        "numpy_rng": np_rng.bit_generator.state,
        **extra,
    }
    tmp = path / "state.json.tmp"
    tmp.write_text(json.dumps(meta, default=int))
    tmp.replace(path / "state.json")  # the state file lands last, atomically


def _load_state(path: Path, model, ema, opt, np_rng: np.random.Generator) -> dict:
    import torch
    from safetensors.torch import load_file

    if not (path / "state.json").exists():
        raise CheckpointError(f"resume=true but {path}/state.json does not exist; train without resume first")
    meta = json.loads((path / "state.json").read_text())
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    ema.load_state_dict(load_file(str(path / "ema.safetensors")))
    tensors = load_file(str(path / "optim.safetensors"))
    torch.set_rng_state(tensors.pop("__torch_rng__"))
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    np_rng.bit_generator.state = meta["numpy_rng"]
    return meta


def action_error(policy, batch: dict, sampler: str | None = None, steps: int | None = None, seed: int = 0) -> float:
    """Mean squared error of sampled actions against the demonstrated ones, normalised units.

    Diffusion Policy's ``train_action_mse_error``: how far the policy's
    actions for recorded observations are from what the demonstrator did. The
    denoising loss cannot show this (it falls for any network that models the
    noise well at most levels); a policy whose actions miss the
    demonstrations by much more than another's fails in closed loop.

    Args:
        policy: a trained rtdp policy.
        batch: ``SequenceDataset.sample_batch`` output (obs (B, To, ...), action (B, T, Da)).
        sampler, steps: the inference setting (default: the policy's own; a
            streaming setting falls back to the default, as windows are independent).
        seed: seed of the sampling noise, so two calls on one policy agree.

    Returns:
        the mean over windows, executed actions and action dimensions.
    """
    import torch

    from rtdp.policies.runner import Runner

    from rtdp.policies.registry import family_of

    if sampler in family_of(policy).per_observation:
        sampler, steps = None, None
    runner = Runner(policy, sampler, steps, seed=seed)
    pred = runner.predict(batch["obs"])
    start = policy.config.n_obs_steps - 1
    target = batch["action"][:, start : start + pred.shape[1]].to(pred.dtype)
    norm = policy.normalizer
    with torch.no_grad():
        return float(((norm.normalize("action", pred) - norm.normalize("action", target)) ** 2).mean())


def load_anchor_obs(paths: str | Path | Sequence[str | Path], obs_keys: list[str]) -> dict[str, np.ndarray]:
    """Observation windows recorded by ``rtdp eval record_obs=PATH`` ({key: (N, To, ...)}).

    ``paths`` is one recording or a list of them (DAgger's aggregate over
    rounds); their windows are concatenated.
    """
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not paths:
        raise DatasetError("anchor_obs=[] names no recording; give one or more rtdp eval record_obs= files")
    parts = [_load_one_anchor(Path(p), obs_keys) for p in paths]
    for path, part in zip(paths[1:], parts[1:]):
        for k in obs_keys:
            if part[k].shape[1:] != parts[0][k].shape[1:]:
                raise DatasetError(f"anchor_obs={path}: {k} windows are {part[k].shape[1:]}, "
                                   f"{paths[0]} has {parts[0][k].shape[1:]}; record both with the same task and policy")
    return {k: np.concatenate([part[k] for part in parts]) for k in obs_keys}


def _load_one_anchor(path: Path, obs_keys: list[str]) -> dict[str, np.ndarray]:
    if not path.exists():
        raise DatasetError(f"anchor_obs={path} does not exist; record one with rtdp eval checkpoint=... record_obs={path}")
    with np.load(path, allow_pickle=False) as data:
        windows = {k: np.asarray(data[k]) for k in data.files}
    missing = [k for k in obs_keys if k not in windows]
    if missing:
        raise DatasetError(f"anchor_obs={path} lacks observation keys {missing} (has {sorted(windows)})")
    sizes = {len(windows[k]) for k in obs_keys}
    if len(sizes) != 1 or 0 in sizes:
        raise DatasetError(f"anchor_obs={path}: keys {obs_keys} hold different or zero window counts {sorted(sizes)}")
    return {k: windows[k] for k in obs_keys}


def _plot_curves(out: Path, log: list[dict], threads: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = [r for r in log if "loss" in r]
    evals = [r for r in log if "eval_score" in r]
    errors = [r for r in log if "action_mse" in r]
    plan_errors = [r for r in log if "plan_ade_m" in r]
    fig, axes = plt.subplots(1, 2 if evals else 1, figsize=(11 if evals else 6, 4), squeeze=False)
    ax = axes[0, 0]
    if losses:
        steps = np.array([r["step"] for r in losses])
        vals = np.array([r["loss"] for r in losses])
        ax.plot(steps, vals, alpha=0.35, label="loss")
        k = max(1, len(vals) // 30)
        if k > 1 and len(vals) > k:
            ax.plot(steps[k - 1 :], np.convolve(vals, np.ones(k) / k, mode="valid"), label=f"loss (mean of {k})")
        ax.set_yscale("log")
        ax.set_xlabel("optimiser step")
        ax.set_ylabel("denoising loss")
        if errors:
            twin = ax.twinx()
            twin.plot([r["step"] for r in errors], [r["action_mse"] for r in errors], "k.-",
                      label="action error (MSE to demos)")
            twin.set_yscale("log")
            twin.set_ylabel("action error, normalised units")
            twin.legend(loc="upper right")
        if plan_errors:
            twin = ax.twinx()
            twin.plot([r["step"] for r in plan_errors], [r["plan_ade_m"] for r in plan_errors], "k.-",
                      label="plan error (m to the expert)")
            twin.set_ylabel("plan error, metres")
            twin.legend(loc="upper right")
        ax.legend(loc="upper left")
    if evals:
        ax = axes[0, 1]
        ax.plot([r["time_s"] / 60 for r in evals], [r["eval_score"] for r in evals], "o-", label="mean score")
        ax.plot([r["time_s"] / 60 for r in evals], [r["eval_success"] for r in evals], "s--", label="success rate")
        ax.set_xlabel(f"training time (min, {threads} torch thread{'s' if threads > 1 else ''})")
        ax.set_ylim(0, 1.02)
        ax.legend()
        ax.set_title("evaluation during training")
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)


def train(cfg) -> dict[str, Any]:
    """Train from ``cfg.data`` into ``cfg.out``; returns a summary dict."""
    import torch
    from tqdm.auto import tqdm

    from rtdp.data.dataset import SequenceDataset, compute_stats, load_arrays
    from rtdp.data.replay_buffer import ReplayBuffer
    from rtdp.policies.runner import Runner
    from rtdp.workflows.eval import evaluate_checkpoint_policy

    torch.set_num_threads(int(cfg.threads))
    task = get_task(cfg.task.name)
    out = Path(cfg.out)
    state_dir = out / STATE_DIR
    if state_dir.exists() and not cfg.resume:
        raise ConfigError(f"{out} already holds a training run; pass resume=true to continue it or choose another out=")
    out.mkdir(parents=True, exist_ok=True)

    buffer = ReplayBuffer.open(cfg.data, mode="r")
    keys = [*task.lowdim_keys, *task.image_keys, "action"]
    episode_ends = np.asarray(buffer.episode_ends)
    if cfg.max_episodes is not None:
        episode_ends = episode_ends[: int(cfg.max_episodes)]
    arrays = load_arrays(buffer, keys, task.dataset_aliases)
    n_steps = int(episode_ends[-1])
    arrays = {k: v[:n_steps] for k, v in arrays.items()}
    stats = compute_stats(arrays, [*task.lowdim_keys, "action"])

    torch.manual_seed(int(cfg.seed))
    np_rng = np.random.default_rng(int(cfg.seed))
    model = build_policy(task, cfg.policy, arrays, stats)
    if hasattr(model, "from_data") and not (cfg.resume and state_dir.exists()):
        model.from_data(arrays, int(cfg.seed))  # data-derived parts of the model (a planner's k-means anchors)
    policy_config = model.config
    # The EMA copy only samples (evaluation, action error, checkpoints): eval mode, so dropout is off there.
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    betas = tuple(float(b) for b in cfg.betas)
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ConfigError(f"betas must be two numbers in [0, 1), e.g. [0.95, 0.999], got {list(cfg.betas)!r}")
    opt = torch.optim.AdamW(model.parameters(), lr=float(cfg.lr), betas=betas, weight_decay=float(cfg.weight_decay))
    dataset = SequenceDataset(
        arrays,
        episode_ends,
        obs_keys=[*task.lowdim_keys, *task.image_keys],
        horizon=policy_config.horizon,
        n_obs_steps=policy_config.n_obs_steps,
        n_action_steps=policy_config.n_action_steps,
    )
    anchor = None
    if cfg.get("anchor_obs"):
        if not hasattr(model, "set_teacher"):
            raise ConfigError("anchor_obs gives a distilled student its own states to be taught at (DAgger); "
                              f"policy={cfg.policy.name} has no teacher: train with policy=consistency or "
                              "policy=onestep, or drop anchor_obs")
        spec = cfg.anchor_obs
        anchor = load_anchor_obs(spec if isinstance(spec, str) else [str(p) for p in spec],
                                 [*task.lowdim_keys, *task.image_keys])
    run_info = {
        "task": task.name,
        "data": str(cfg.data),
        **({"anchor_obs": cfg.anchor_obs if isinstance(cfg.anchor_obs, str) else [str(p) for p in cfg.anchor_obs],
            "anchor_windows": len(next(iter(anchor.values())))} if anchor else {}),
        "n_episodes": int(len(episode_ends)),
        "n_steps": n_steps,
        "command": "rtdp train " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["train"] else None,
    }
    step, train_time, log = 0, 0.0, []
    if cfg.resume and state_dir.exists():
        meta = _load_state(state_dir, model, ema, opt, np_rng)
        step, train_time, log = meta["step"], meta["train_time_s"], meta["log"]
        if meta["run"]["data"] != run_info["data"] or meta["run"]["n_steps"] != n_steps:
            raise CheckpointError(
                f"resume=true but {state_dir} was trained on {meta['run']['data']} ({meta['run']['n_steps']} steps), "
                f"not {run_info['data']} ({n_steps} steps); use the same data= or a new out="
            )

    total = int(cfg.steps)
    bar = tqdm(total=total, initial=step, desc=f"train {task.name}", dynamic_ncols=True)
    loss_acc, loss_n = 0.0, 0
    t_last = time.perf_counter()

    def save_weights(folder: Path, **extra: Any) -> None:
        ema.save_pretrained(folder)
        (folder / "meta.json").write_text(
            json.dumps({**run_info, "train_steps": step, "train_time_s": round(train_time, 1), **extra}, indent=2)
        )

    # Fixed training windows for the action error, drawn from their own RNG so
    # the training batches (and a resumed run) are the same with or without them.
    n_err = min(int(cfg.get("action_error_windows", 0) or 0), len(dataset))
    err_batch = None
    if n_err > 0:
        err_idx = np.random.default_rng(int(cfg.seed) + 1).choice(len(dataset), size=n_err, replace=False)
        err_batch = dataset.sample_batch(err_idx)

    def checkpoint() -> None:
        # once per step: the final evaluation checkpoints again at the step the loop just saved
        if err_batch is not None and not any(r.get("step") == step and ERROR_KEYS & set(r) for r in log[-3:]):
            if hasattr(ema, "plan_error"):  # a planner: mean distance of its plans to the expert's, metres
                err = ema.plan_error(err_batch)
                log.append({"step": step, "time_s": round(train_time, 1), "plan_ade_m": err})
                bar.write(f"step {step}: plan error {err:.2f} m (mean distance to the expert's poses, "
                          f"{n_err} training scenes)")
            else:
                err = action_error(ema, err_batch, cfg.eval_sampler,
                                   None if cfg.eval_steps is None else int(cfg.eval_steps), seed=int(cfg.seed))
                log.append({"step": step, "time_s": round(train_time, 1), "action_mse": err})
                bar.write(f"step {step}: action error {err:.3e} (MSE to the demonstrations, {n_err} training windows)")
        save_weights(out / "checkpoint")
        _save_state(state_dir, model, ema, opt, step, np_rng, {"train_time_s": train_time, "log": log, "run": run_info})
        _plot_curves(out, log, int(cfg.threads))

    def evaluate() -> None:
        seeds = task.seeds(int(cfg.eval_episodes))
        runner = Runner(ema, cfg.eval_sampler, None if cfg.eval_steps is None else int(cfg.eval_steps))
        res = evaluate_checkpoint_policy(ema, task, seeds, sampler=runner.name, steps=runner.steps, progress=False)
        log.append({"step": step, "time_s": round(train_time, 1), "eval_score": res.mean_score, "eval_success": res.success_rate})
        if cfg.get("keep_checkpoints", False):
            # the evaluated weights, kept so the best and the last few can be re-evaluated later
            save_weights(out / "history" / f"step_{step:07d}", eval_score=res.mean_score,
                         eval_success=res.success_rate)
        bar.write(f"step {step}: eval ({len(seeds)} episodes, {runner.name}-{runner.steps}) "
                  f"score {res.mean_score:.3f}, success {res.success_rate:.0%}")

    try:
        model.train()
        while step < total:
            lr = lr_at(step, float(cfg.lr), int(cfg.warmup_steps), total)
            for group in opt.param_groups:
                group["lr"] = lr
            idx = np_rng.integers(0, len(dataset), size=int(cfg.batch_size))
            batch = dataset.sample_batch(idx)
            if anchor is not None:
                rows = np_rng.integers(0, len(next(iter(anchor.values()))), size=int(cfg.batch_size))
                batch["anchor_obs"] = {k: v[rows] for k, v in anchor.items()}
            loss = model.compute_loss(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            decay = ema_decay(step, float(cfg.ema_power))
            with torch.no_grad():
                for pe, pm in zip(ema.parameters(), model.parameters()):
                    pe.mul_(decay).add_(pm.detach(), alpha=1.0 - decay)
                for be, bm in zip(ema.buffers(), model.buffers()):
                    be.copy_(bm)
            loss_acc += float(loss.detach())
            loss_n += 1
            now = time.perf_counter()
            train_time += now - t_last
            t_last = now
            bar.update(1)
            if step % 50 == 0 or step == total:
                log.append({"step": step, "loss": loss_acc / loss_n, "lr": lr, "time_s": round(train_time, 1)})
                bar.set_postfix(loss=f"{loss_acc / loss_n:.4f}", lr=f"{lr:.1e}")
                loss_acc, loss_n = 0.0, 0
            if int(cfg.eval_every) > 0 and step % int(cfg.eval_every) == 0 and step < total:
                evaluate()
                t_last = time.perf_counter()  # evaluation time is not training time
            if step % int(cfg.checkpoint_every) == 0 or step == total:
                checkpoint()
                t_last = time.perf_counter()
    finally:
        bar.close()
    evaluated_last = bool(log) and log[-1].get("step") == step and "eval_score" in log[-1]
    if int(cfg.eval_every) > 0 and int(cfg.eval_episodes) > 0 and not evaluated_last:
        evaluate()
        checkpoint()
    summary = {**run_info, "train_steps": step, "train_time_s": round(train_time, 1), "checkpoint": str(out / "checkpoint")}
    for key in ERROR_KEYS:
        errors = [r[key] for r in log if key in r]
        if errors:
            summary[key] = errors[-1]
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"trained {step} steps in {train_time / 60:.1f} min on {run_info['n_episodes']} episodes; "
          f"checkpoint: {out / 'checkpoint'}, curves: {out / 'curves.png'}")
    return summary


def run(cfg) -> dict[str, Any]:
    """CLI entry: ``rtdp train task=... data=PATH out=DIR``."""
    return train(cfg)
