"""The image path of the caching core: a diffusers UNet2DModel trained by `rtdp image`, sampled by the
core's DDIM and cached by the same CachedNetwork the policies use."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

import copy  # noqa: E402

from rtdp.core.cache import CachedNetwork, deepcache_schedule, unet2d_deepcache_modules  # noqa: E402
from rtdp.errors import ConfigError  # noqa: E402
from rtdp.workflows.image import (  # noqa: E402
    _alphas_cumprod,
    bench_image,
    build_model,
    load_image_model,
    psnr_db,
    sample_images,
    scene_images,
    train_image_model,
)


def _v_loss(model: torch.nn.Module, images: torch.Tensor) -> float:
    """v-prediction loss of ``model`` on ``images`` at fixed noise and at timesteps spread over 0..999."""
    ac = _alphas_cumprod()
    t = torch.linspace(0, 999, len(images)).long()
    eps = torch.randn(images.shape, generator=torch.Generator().manual_seed(123))
    a, s = ac[t].sqrt().view(-1, 1, 1, 1), (1 - ac[t]).sqrt().view(-1, 1, 1, 1)
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(model(a * images + s * eps, t).sample, a * eps - s * images))


def _count_calls(modules: dict[str, torch.nn.Module]) -> tuple[dict[str, int], list]:
    counts = dict.fromkeys(modules, 0)
    handles = [m.register_forward_hook(lambda *_, n=n: counts.__setitem__(n, counts[n] + 1))
               for n, m in modules.items()]
    return counts, handles


def test_scenes_are_environment_renders_in_range():
    a = scene_images(3, 24, seed=5, progress=False)
    b = scene_images(3, 24, seed=5, progress=False)
    assert a.shape == (3, 3, 24, 24) and a.dtype == np.float32
    assert np.array_equal(a, b) and not np.array_equal(a[0], a[1])  # seeded, and the scenes differ
    assert a.min() >= -1.0 and a.max() <= 1.0


def test_psnr_against_a_hand_computation():
    a = torch.zeros(1, 3, 4, 4)
    b = torch.full((1, 3, 4, 4), 0.2)  # mse 0.04 on a peak-to-peak range of 2
    assert psnr_db(a, b) == pytest.approx(10 * math.log10(4 / 0.04))
    assert psnr_db(a, a) == float("inf")


def test_trained_model_samples_through_the_core_and_deepcache_matches_at_interval_1(tmp_path):
    meta = train_image_model(tmp_path / "m", size=16, channels=(8, 16, 16), n_images=16, steps=30, batch_size=8,
                             lr=2e-3, progress=False)
    assert meta["steps"] == 30 and len(meta["loss_curve"]) == 1  # one 50-step window of the curve
    assert (tmp_path / "m/model/diffusion_pytorch_model.safetensors").exists()
    model = load_image_model(tmp_path / "m")
    # training lowered the loss: the saved model against the initial weights (same seed) on the training
    # scenes at fixed noise (measured: 0.97 -> 0.87 after these 30 steps)
    torch.manual_seed(0)
    initial = build_model(16, (8, 16, 16)).eval()
    images = torch.from_numpy(scene_images(16, 16, seed=0, progress=False))
    assert _v_loss(model, images) < 0.95 * _v_loss(initial, images)
    noise = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    x = sample_images(model, 6, noise)
    assert x.shape == (1, 3, 16, 16) and bool(torch.isfinite(x).all()) and float(x.abs().max()) <= 1.0 + 1e-6
    rep = bench_image(tmp_path / "m", ["ddim-6", "ddim-6+deepcache1", "ddim-6+deepcache2"], calls=1, warmup=0,
                      samples=2, threads=1, grid=tmp_path / "g.png", progress=False)
    rows = {r["name"]: r for r in rep["configs"]}
    # every step updates: the same image up to float rounding (a copied network's convolutions may sum
    # in another order), > 100 dB where caching costs tens of dB
    assert rows["ddim-6+deepcache1"]["psnr_db_vs_uncached"] > 100
    assert 0 < rows["ddim-6+deepcache2"]["psnr_db_vs_uncached"] < 100  # cached: close, not equal
    cached_row = rows["ddim-6+deepcache2"]
    assert cached_row["speedup_vs_uncached"] == pytest.approx(rows["ddim-6"]["latency_ms_p50"]
                                                              / cached_row["latency_ms_p50"])
    assert (tmp_path / "g.png").stat().st_size > 0
    with pytest.raises(ConfigError, match="ddim-<steps>"):
        bench_image(tmp_path / "m", ["ddpm-6"], progress=False)
    with pytest.raises(ConfigError, match="no UNet2DModel"):
        load_image_model(tmp_path)


def test_deepcache_runs_the_deep_modules_every_other_step_and_the_shallow_path_every_step():
    """Where DeepCache's speed-up comes from, counted in module calls rather than timed."""
    torch.manual_seed(0)
    plain = build_model(16, (8, 16, 16)).eval()
    deep = unet2d_deepcache_modules(plain, 0)
    assert "mid_block" in deep and "down_blocks.0" not in deep
    noise = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    counts, handles = _count_calls({"mid_block": plain.mid_block, "shallow": plain.down_blocks[0]})
    reference = sample_images(plain, 6, noise)
    for h in handles:
        h.remove()
    assert counts == {"mid_block": 6, "shallow": 6}  # one network call per DDIM step

    cached = CachedNetwork(copy.deepcopy(plain), deepcache_schedule(deep, 7, 2))
    cached_counts, _ = _count_calls({"mid_block": cached.wrapped["mid_block"].inner,
                                     "shallow": cached.net.down_blocks[0]})
    out = sample_images(cached, 6, noise)
    assert cached_counts == {"mid_block": 3, "shallow": 6}  # steps 0, 2, 4 only
    assert cached.wrapped["mid_block"].calls == 3
    assert not torch.equal(out, reference)  # replayed features change the sample (closeness: the PSNR test above)
    again = sample_images(cached, 6, noise)  # sample_images resets the cache: the next sample repeats it
    assert torch.equal(again, out) and cached_counts["mid_block"] == 6
