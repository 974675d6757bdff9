"""Feature caching across denoising steps (rtdp.core.cache) and DeepCache on the policy U-Net."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from rtdp.core.cache import CachedNetwork, deepcache_schedule, uniform_schedule
from rtdp.errors import ConfigError
from rtdp.policies.diffusion_unet import DiffusionUnetConfig, DiffusionUnetPolicy
from rtdp.policies.runner import Runner
from rtdp.policies.unet1d import ConditionalUnet1D


def _policy(down_dims=(16, 32, 64)) -> DiffusionUnetPolicy:
    torch.manual_seed(0)
    policy = DiffusionUnetPolicy(DiffusionUnetConfig(lowdim_shapes={"s": (3,)}, action_dim=2, down_dims=down_dims))
    policy.set_normalizer({"s": {"min": -np.ones(3), "max": np.ones(3)},
                           "action": {"min": -np.ones(2), "max": np.ones(2)}})
    return policy.eval()


OBS = {"s": np.linspace(-1, 1, 6, dtype=np.float32).reshape(1, 2, 3)}


def test_interval_one_is_the_plain_network_exactly():
    policy = _policy()
    noise = torch.randn(1, 16, 2, generator=torch.Generator().manual_seed(1))
    plain = Runner(policy, "ddim", 8).predict(OBS, noise=noise)
    cached = Runner(policy, "ddim", 8, deepcache=1)
    assert torch.equal(cached.predict(OBS, noise=noise), plain)
    assert cached.policy.model is not policy.model  # the plain policy keeps its own network


def test_deep_modules_run_every_interval_and_shallow_ones_every_step():
    policy = _policy()
    runner = Runner(policy, "ddim", 10, deepcache=3)
    net = runner.policy.model
    shallow_calls = []
    net.net.final_conv.register_forward_hook(lambda *a: shallow_calls.append(1))
    runner.predict(OBS, noise=torch.randn(1, 16, 2))
    deep = policy.model.deepcache_modules(1)
    assert sorted(net.wrapped) == sorted(deep)
    # steps 0, 3, 6, 9 recompute the deep features; the shallow path runs at all 10
    assert {n: m.calls for n, m in net.wrapped.items()} == {n: 4 for n in deep}
    assert len(shallow_calls) == 10 and runner.last_nfe == 10
    # the cached steps change the result, but only a little
    plain = Runner(policy, "ddim", 10).predict(OBS, noise=torch.zeros(1, 16, 2))
    approx = runner.predict(OBS, noise=torch.zeros(1, 16, 2))
    assert not torch.equal(plain, approx)
    assert float((plain - approx).abs().max()) < 0.5


def test_cache_restarts_with_every_chunk():
    policy = _policy()
    noise_a, noise_b = torch.randn(1, 16, 2), torch.randn(1, 16, 2)
    other = {"s": -OBS["s"]}
    used = Runner(policy, "ddim", 6, deepcache=2)
    used.predict(other, noise=noise_a)
    fresh = Runner(_policy(), "ddim", 6, deepcache=2)
    assert torch.equal(used.predict(OBS, noise=noise_b), fresh.predict(OBS, noise=noise_b))


def test_deepcache_names_exist_for_every_branch():
    for dims in ((8, 16), (8, 16, 32), (8, 16, 32, 64)):
        net = ConditionalUnet1D(2, 4, 16, dims)
        modules = dict(net.named_modules())
        for branch in range(1, len(dims)):
            names = net.deepcache_modules(branch)
            assert names and all(n in modules for n in names)
        with pytest.raises(ConfigError, match="branch"):
            net.deepcache_modules(len(dims))


def test_any_output_structure_is_replayed():
    class Pair(nn.Module):
        def forward(self, x):
            return x + 1, {"sq": x * x}

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.pair = Pair()

        def forward(self, x):
            a, b = self.pair(x)
            return a + b["sq"]

    cached = CachedNetwork(Net(), uniform_schedule(["pair"], 10, 2))
    x1, x2 = torch.ones(2), 2 * torch.ones(2)
    assert torch.equal(cached(x1), torch.full((2,), 3.0))
    assert torch.equal(cached(x2), torch.full((2,), 3.0))  # step 1 replays step 0's features
    assert torch.equal(cached(x2), torch.full((2,), 7.0))  # step 2 recomputes
    assert cached.wrapped["pair"].calls == 2


def test_bad_cache_configurations_are_typed_errors():
    with pytest.raises(ConfigError, match="not submodules"):
        CachedNetwork(nn.Sequential(nn.Linear(2, 2)), {"nope": {0}})
    with pytest.raises(ConfigError, match="contain each other"):
        CachedNetwork(nn.Sequential(nn.Sequential(nn.Linear(2, 2))), {"0": {0}, "0.0": {0}})
    with pytest.raises(ConfigError, match=">= 1"):
        deepcache_schedule(["a"], 10, 0)
    policy = _policy()
    with pytest.raises(ConfigError, match=">= 2 network calls"):
        Runner(policy, "ddim", 1, deepcache=2)
    with pytest.raises(ConfigError, match="interval >= 1"):
        Runner(policy, "ddim", 4, deepcache=0)
    from rtdp.policies.edm_unet import EdmUnetConfig, EdmUnetPolicy

    edm = EdmUnetPolicy(EdmUnetConfig(lowdim_shapes={"s": (3,)}, action_dim=2, down_dims=(8, 16)))
    with pytest.raises(ConfigError, match="streaming"):
        Runner(edm, "stream", 1, deepcache=2)
    from rtdp.policies.transformer import TransformerDiffusionConfig, TransformerDiffusionPolicy

    tf = TransformerDiffusionPolicy(TransformerDiffusionConfig(lowdim_shapes={"s": (3,)}, action_dim=2, n_layer=1,
                                                               n_emb=16, n_head=2))
    with pytest.raises(ConfigError, match="needs a U-Net"):
        Runner(tf, "ddim", 4, deepcache=2)


def test_deepcache_on_a_diffusers_unet2d_shares_the_core():
    diffusers = pytest.importorskip("diffusers")
    import copy

    from rtdp.core.cache import unet2d_deepcache_modules

    torch.manual_seed(0)
    model = diffusers.UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(8, 16, 16),
                                  down_block_types=("DownBlock2D",) * 3, up_block_types=("UpBlock2D",) * 3,
                                  layers_per_block=1, norm_num_groups=4).eval()
    names = unet2d_deepcache_modules(model, 0)
    assert names == ["down_blocks.1", "down_blocks.2", "mid_block", "up_blocks.0", "up_blocks.1"]
    x = torch.randn(1, 3, 16, 16)
    exact = CachedNetwork(copy.deepcopy(model), deepcache_schedule(names, 10, 1))
    cached = CachedNetwork(copy.deepcopy(model), deepcache_schedule(names, 10, 2))
    with torch.no_grad():
        for t in (900, 600, 300, 100):
            ref = model(x, t).sample
            assert torch.equal(exact(x, t).sample, ref)
            cached(x, t)
    assert cached.wrapped["mid_block"].calls == 2  # steps 0 and 2 of 4
    with pytest.raises(ConfigError, match="branch"):
        unet2d_deepcache_modules(model, 2)
    with pytest.raises(ConfigError, match="structure"):
        unet2d_deepcache_modules(nn.Linear(2, 2))
