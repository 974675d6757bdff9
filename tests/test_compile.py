"""torch.compile as an inference option: same actions as the plain network, and the combinations
that cannot work are refused when the run is configured."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rtdp.errors import ConfigError
from rtdp.policies.diffusion_unet import DiffusionUnetConfig, DiffusionUnetPolicy
from rtdp.policies.runner import Runner
from rtdp.workflows.bench import parse_config


def _policy() -> DiffusionUnetPolicy:
    torch.manual_seed(0)
    policy = DiffusionUnetPolicy(DiffusionUnetConfig(lowdim_shapes={"s": (3,)}, action_dim=2, down_dims=[8, 16])).eval()
    policy.set_normalizer({"s": {"min": -np.ones(3), "max": np.ones(3)},
                           "action": {"min": -np.ones(2), "max": np.ones(2)}})
    return policy


def test_compile_with_a_cache_is_refused_at_configuration():
    policy = _policy()
    with pytest.raises(ConfigError, match="do not combine"):
        Runner(policy, "ddim", 4, deepcache=2, compile=True)
    with pytest.raises(ConfigError, match="cannot lower"):
        Runner(policy, "ddim", 4, precision="fp32", compile=True)
    assert parse_config("ddim-10+compile+int8dyn").options == {"compile": True, "precision": "int8dyn"}


@pytest.mark.slow
def test_compiled_network_gives_the_plain_actions():
    policy = _policy()
    obs = {"s": np.random.default_rng(0).uniform(-1, 1, (1, 2, 3)).astype(np.float32)}
    noise = torch.randn(1, 16, 2, generator=torch.Generator().manual_seed(1))
    plain = Runner(policy, "ddim", 4).predict(obs, noise=noise)
    runner = Runner(policy, "ddim", 4, compile=True)
    compiled = runner.predict(obs, noise=noise)
    assert type(runner.policy.model).__name__ == "OptimizedModule"
    torch.testing.assert_close(compiled, plain, rtol=1e-4, atol=1e-5)


def test_cuda_graph_needs_a_gpu_and_the_plain_network():
    policy = _policy()
    with pytest.raises(ConfigError, match="does not combine"):
        Runner(policy, "ddim", 4, precision="fp32", cuda_graph=True)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA GPU"):
            Runner(policy, "ddim", 4, cuda_graph=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_cuda_graph_replays_the_eager_actions():
    policy = _policy().to("cuda")
    obs = {"s": np.random.default_rng(0).uniform(-1, 1, (1, 2, 3)).astype(np.float32)}
    noise = torch.randn(1, 16, 2, generator=torch.Generator().manual_seed(1)).cuda()
    eager = Runner(policy, "ddim", 4).predict(obs, noise=noise)
    runner = Runner(policy, "ddim", 4, cuda_graph=True)
    first, again = runner.predict(obs, noise=noise), runner.predict(obs, noise=noise)
    torch.testing.assert_close(first, eager, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(again, eager, rtol=1e-4, atol=1e-5)
    assert len(runner.policy.model._graphs) == 1  # captured once, replayed after
