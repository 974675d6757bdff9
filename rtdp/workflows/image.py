"""Image diffusion on the shared acceleration core: a diffusers ``UNet2DModel`` trained on rendered scenes.

The same pieces that run the action policies run an image model here: the
network is wrapped in ``rtdp.core.DiscreteEpsDenoiser``, sampled with
``rtdp.core.sample_ddim``, and cached with ``rtdp.core.cache.CachedNetwork``
(DeepCache's modules of a ``UNet2DModel`` come from
``unet2d_deepcache_modules``). Nothing in the caching code knows it is an image.

* ``train_image_model``: trains a small ``UNet2DModel`` (v-prediction by
  default, diffusers' default 1000-step linear schedule) on procedurally generated
  PushT scenes: the environment reset at random seeds, rendered and resized.
  It is saved with ``save_pretrained`` (safetensors) with ``meta.json``
  holding the command, the training time and the loss curve.
* ``bench_image``: per configuration (``ddim-50``, ``ddim-50+deepcache3``,
  ...), latency per image at batch 1, the speed-up against the uncached
  model at the same steps, and the PSNR of the cached image against the
  uncached one from the same noise.
"""

from __future__ import annotations

import functools
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rtdp.core import DiscreteEpsDenoiser, make_alphas_cumprod, sample_ddim, sigmas_ddim, vp_noise_to_start
from rtdp.core.accelerate import accelerate
from rtdp.core.cache import CachedNetwork, unet2d_deepcache_modules
from rtdp.core.options import parse_config
from rtdp.errors import ConfigError, require_package

TRAIN_TIMESTEPS = 1000  # diffusers' DDPMScheduler default (linear betas 1e-4 .. 0.02)
# A small model trained briefly to predict epsilon misses the near-identity at high noise (measured: eps error
# 0.02 where x_t itself gives 5e-5), so x0 = (x_t - s eps) / a is garbage there and DDIM returns noise.
# Predicting v = a eps - s x0 asks for the image at high noise and for the noise at low noise: well posed at both ends.
PREDICTION_TYPE = "v_prediction"


@functools.lru_cache(maxsize=1)
def _alphas_cumprod() -> torch.Tensor:
    """The training schedule's abar table (built once, not per sample)."""
    return make_alphas_cumprod(TRAIN_TIMESTEPS, "linear")


def scene_images(n: int, size: int, *, seed: int = 0, progress: bool = True) -> np.ndarray:
    """``n`` PushT scenes (the environment reset at seeds ``seed..seed+n-1``), (n, 3, size, size) in [-1, 1]."""
    from tqdm.auto import tqdm

    from rtdp.envs import make

    env = make("pusht_image")
    out = np.empty((n, 3, size, size), dtype=np.float32)
    try:
        for i in tqdm(range(n), desc="render scenes", disable=not progress, dynamic_ncols=True):
            obs, _ = env.reset(seed=int(seed + i))
            img = torch.from_numpy(np.ascontiguousarray(obs["img"])).permute(2, 0, 1)[None].float() / 127.5 - 1.0
            out[i] = torch.nn.functional.interpolate(img, size=(size, size), mode="area")[0].numpy()
    finally:
        env.close()
    return out


def build_model(size: int, channels: tuple[int, ...]) -> nn.Module:
    """A plain-convolution ``UNet2DModel`` (no attention), one resnet per level."""
    diffusers = require_package("diffusers", "dev", "the image model")
    n = len(channels)
    return diffusers.UNet2DModel(sample_size=size, in_channels=3, out_channels=3, block_out_channels=tuple(channels),
                                 down_block_types=("DownBlock2D",) * n, up_block_types=("UpBlock2D",) * n,
                                 layers_per_block=1, norm_num_groups=min(8, channels[0]))


class _Eps(nn.Module):
    """``UNet2DModel`` in the core's ``model(x_t, t, cond) -> eps`` form."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        return self.unet(x, t).sample


def train_image_model(out: str | Path, *, size: int = 64, channels: tuple[int, ...] = (32, 64, 128, 128),
                      n_images: int = 2000, steps: int = 2000, batch_size: int = 16, lr: float = 2e-4,
                      seed: int = 0, threads: int = 1, prediction_type: str = PREDICTION_TYPE, command: str = "",
                      progress: bool = True) -> dict[str, Any]:
    """Train the scene model and save it in ``out``; returns the summary written to ``out/meta.json``."""
    from tqdm.auto import tqdm

    if prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise ConfigError(f"prediction_type must be epsilon, v_prediction or sample, got {prediction_type!r}")
    if steps < 1 or batch_size < 1 or n_images < batch_size:
        raise ConfigError(f"need steps >= 1 and n_images >= batch_size >= 1, got {steps}, {n_images}, {batch_size}")
    torch.set_num_threads(int(threads))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = torch.from_numpy(scene_images(n_images, size, seed=seed, progress=progress))
    torch.manual_seed(seed)
    model = build_model(size, tuple(channels))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-6)
    ac = _alphas_cumprod()
    gen = torch.Generator().manual_seed(seed)
    losses, t0 = [], time.monotonic()
    model.train()
    bar = tqdm(range(steps), desc="train image model", disable=not progress, dynamic_ncols=True)
    for step in bar:
        idx = torch.randint(0, len(data), (batch_size,), generator=gen)
        x0 = data[idx]
        if torch.rand((), generator=gen) < 0.5:
            x0 = x0.flip(-1)  # mirrored scenes: twice the data
        t = torch.randint(0, TRAIN_TIMESTEPS, (batch_size,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        a = ac[t].sqrt().view(-1, 1, 1, 1)
        s = (1 - ac[t]).sqrt().view(-1, 1, 1, 1)
        target = {"epsilon": eps, "v_prediction": a * eps - s * x0, "sample": x0}[prediction_type]
        loss = torch.nn.functional.mse_loss(model(a * x0 + s * eps, t).sample, target)
        for g in opt.param_groups:  # linear warm-up, then cosine decay
            g["lr"] = lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / steps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    model.eval()
    model.save_pretrained(str(out / "model"), safe_serialization=True)
    meta = {"size": size, "channels": list(channels), "n_images": n_images, "steps": steps, "batch_size": batch_size,
            "lr": lr, "seed": seed, "threads": threads, "prediction_type": prediction_type,
            "train_time_s": time.monotonic() - t0,
            "loss_first_100": float(np.mean(losses[:100])), "loss_last_100": float(np.mean(losses[-100:])),
            "loss_curve": [float(np.mean(losses[i:i + 50])) for i in range(0, len(losses), 50)],
            "command": command}
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    return meta


def load_image_model(path: str | Path) -> nn.Module:
    """The ``UNet2DModel`` saved by ``train_image_model`` (``path`` or ``path/model``); what it predicts is
    ``model.prediction_type``, read from ``meta.json`` beside it (epsilon when there is none)."""
    diffusers = require_package("diffusers", "dev", "the image model")
    path = Path(path)
    folder = path / "model" if (path / "model").is_dir() else path
    if not (folder / "config.json").exists():
        raise ConfigError(f"{path} holds no UNet2DModel (no config.json): train one with `rtdp image out={path}`")
    model = diffusers.UNet2DModel.from_pretrained(str(folder)).eval()
    meta = folder.parent / "meta.json"
    model.prediction_type = json.loads(meta.read_text()).get("prediction_type", "epsilon") if meta.exists() else "epsilon"
    return model


def sample_images(unet: nn.Module, steps: int, noise: torch.Tensor) -> torch.Tensor:
    """DDIM with the core's sampler, for what the model predicts; a ``CachedNetwork`` is restarted first."""
    prediction = getattr(unet, "prediction_type", "epsilon")
    if isinstance(unet, CachedNetwork):
        unet.reset()
        prediction = getattr(unet.net, "prediction_type", "epsilon")
    ac = _alphas_cumprod()
    den = DiscreteEpsDenoiser(_Eps(unet), ac, clip_x0=1.0, prediction_type=prediction)
    sigmas = sigmas_ddim(ac, int(steps)).to(noise.dtype)
    with torch.no_grad():
        return sample_ddim(den, vp_noise_to_start(noise, sigmas[0]), sigmas)


def psnr_db(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR of ``a`` against ``b`` for images in [-1, 1] (peak-to-peak 2)."""
    mse = float(((a.clamp(-1, 1) - b.clamp(-1, 1)) ** 2).mean())
    return float("inf") if mse == 0 else 10.0 * math.log10(4.0 / mse)


def _parse(name: str) -> tuple[int, int | None]:
    """``ddim-<steps>[+deepcache<N>]`` in the configuration grammar of ``rtdp bench`` (``rtdp.core.options``)."""
    cfg = parse_config(name)
    if cfg.sampler != "ddim" or set(cfg.options) - {"deepcache"}:
        raise ConfigError(f"image configuration {name!r} must read ddim-<steps>[+deepcache<N>], e.g. ddim-50+deepcache3")
    return cfg.steps, cfg.options.get("deepcache")


def bench_image(model_dir: str | Path, configs: list[str], *, calls: int = 5, warmup: int = 1, samples: int = 4,
                branch: int = 0, threads: int | None = None, grid: str | Path | None = None,
                progress: bool = True) -> dict[str, Any]:
    """Latency, speed-up and PSNR of each configuration against the uncached model at the same steps."""
    from tqdm.auto import tqdm

    from rtdp.workflows.machine import physical_cores

    threads = physical_cores() if threads is None else int(threads)
    torch.set_num_threads(threads)
    plain = load_image_model(model_dir)
    parsed = [(c, *_parse(c)) for c in configs]
    size = int(plain.config.sample_size)
    gen = torch.Generator().manual_seed(2024)
    noise = [torch.randn(1, 3, size, size, generator=gen) for _ in range(samples)]
    reference: dict[int, list[torch.Tensor]] = {}
    rows, shown = [], []
    for name, steps, interval in tqdm(parsed, desc="bench image", disable=not progress, dynamic_ncols=True):
        net = plain
        if interval is not None:
            net = accelerate(plain, deepcache=interval, deep_modules=unet2d_deepcache_modules(plain, branch),
                             deepcache_calls=steps + 1)
        times = []
        for i in range(warmup + calls):
            t0 = time.perf_counter()
            sample_images(net, steps, noise[0])
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        if steps not in reference:
            reference[steps] = [sample_images(plain, steps, n) for n in noise]
        images = reference[steps] if net is plain else [sample_images(net, steps, n) for n in noise]
        psnr = [psnr_db(x, r) for x, r in zip(images, reference[steps])]
        shown.append((name, images))
        p50 = float(np.median(times)) * 1e3
        rows.append({"name": name, "sampler": "ddim", "steps": steps, "deepcache": interval, "nfe_per_chunk": steps,
                     "latency_ms_p50": p50, "latency_ms_p99": float(np.percentile(times, 99)) * 1e3,
                     "ms_per_nfe": p50 / steps, "floor_ms_per_nfe": None, "ms_per_action": None, "action_mse": None,
                     "psnr_db_vs_uncached": float(np.mean(psnr)) if interval is not None else None,
                     "psnr_db_min": float(np.min(psnr)) if interval is not None else None})
    for r in rows:
        base = next((b for b in rows if b["steps"] == r["steps"] and b["deepcache"] is None), None)
        r["speedup_vs_uncached"] = base["latency_ms_p50"] / r["latency_ms_p50"] if base else None
    from rtdp.workflows.machine import device_name

    report = {"device": device_name(), "threads": threads, "policy": ["unet2d"], "size": f"{size}px "
              + "/".join(str(c) for c in plain.config.block_out_channels), "model": str(model_dir),
              "sample_size": size, "samples": samples,
              "branch": branch, "calls": calls, "configs": rows}
    if grid is not None:
        report["grid"] = str(_save_grid(shown, Path(grid)))
    return report


def _save_grid(shown: list[tuple[str, list[torch.Tensor]]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = len(shown), len(shown[0][1])
    fig, axes = plt.subplots(rows, cols, figsize=(1.8 * cols, 1.9 * rows), squeeze=False)
    for i, (name, images) in enumerate(shown):
        for j, img in enumerate(images):
            ax = axes[i][j]
            ax.imshow(((img[0].clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(name, fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run(cfg) -> dict[str, Any]:
    """CLI entry: ``rtdp image out=DIR [steps=...] [size=64]`` trains the scene model."""
    meta = train_image_model(cfg.out, size=int(cfg.size), channels=tuple(int(c) for c in cfg.channels),
                             n_images=int(cfg.n_images), steps=int(cfg.steps), batch_size=int(cfg.batch_size),
                             lr=float(cfg.lr), seed=int(cfg.seed), threads=int(cfg.threads),
                             prediction_type=str(cfg.prediction_type), command=" ".join(["rtdp", *sys.argv[1:]]))
    print(f"image model: {cfg.out}/model, loss {meta['loss_first_100']:.4f} -> {meta['loss_last_100']:.4f} "
          f"in {meta['train_time_s'] / 60:.1f} min")
    return meta
