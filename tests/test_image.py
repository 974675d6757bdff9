"""The image path of the caching core: a diffusers UNet2DModel trained by `rtdp image`, sampled by the
core's DDIM and cached by the same CachedNetwork the policies use."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from rtdp.errors import ConfigError  # noqa: E402
from rtdp.workflows.image import bench_image, load_image_model, psnr_db, sample_images, scene_images, train_image_model  # noqa: E402


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
                             progress=False)
    assert meta["loss_last_100"] < meta["loss_first_100"] or meta["steps"] < 100  # the curve is recorded
    assert (tmp_path / "m/model/diffusion_pytorch_model.safetensors").exists()
    model = load_image_model(tmp_path / "m")
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
    assert rows["ddim-6"]["speedup_vs_uncached"] == 1.0 and rows["ddim-6+deepcache2"]["speedup_vs_uncached"] > 0
    assert (tmp_path / "g.png").stat().st_size > 0
    with pytest.raises(ConfigError, match="ddim-<steps>"):
        bench_image(tmp_path / "m", ["ddpm-6"], progress=False)
    with pytest.raises(ConfigError, match="no UNet2DModel"):
        load_image_model(tmp_path)
