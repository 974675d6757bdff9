"""Acceleration of any denoising network by configuration.

``accelerate(net, ...)`` returns an inference form of a network without
knowing which model holds it: the 1-D policy U-Net, the policy transformer,
a diffusers ``UNet2DModel`` and any later network get the same options.

* ``precision``: packed weights (``rtdp.core.fastnet``): ``"fp32"``,
  ``"bf16"``, ``"int8"``, ``"int8dyn"``;
* ``deepcache``: DeepCache (``rtdp.core.cache``): the deep features are
  recomputed every ``deepcache`` calls; the network names its deep modules
  (``deepcache_modules(branch)``), or the caller passes ``deep_modules``;
* ``cache_schedule``: any other caching schedule, ``{module: calls at which
  it runs}`` (block-wise adaptive caching, ``rtdp.core.bac``);
* ``compile``: ``torch.compile`` of the plain network;
* ``cuda_graph``: replay from CUDA graphs (``rtdp.core.cudagraph``).

Guidance skipping (``rtdp.core.guidance``) and inpainting
(``rtdp.core.inpaint``) wrap the denoiser rather than the network and
combine with all of these.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from rtdp.core.cache import CachedNetwork, deepcache_schedule
from rtdp.core.fastnet import fast_network
from rtdp.errors import ConfigError


def check_options(*, precision: str | None = None, deepcache: int | None = None,
                  cache_schedule: Mapping[str, Iterable[int]] | None = None, compile: bool = False,
                  cuda_graph: bool = False) -> None:
    """Raise ``ConfigError`` for options that do not combine, saying why."""
    if cuda_graph and (compile or deepcache is not None or cache_schedule is not None or precision is not None):
        raise ConfigError("cuda_graph replays the plain network as recorded: it does not combine with compile, "
                          "a cache (which skips blocks per call) or a packed CPU precision")
    if deepcache is not None and cache_schedule is not None:
        raise ConfigError("give deepcache or cache_schedule, not both: each names the modules it caches")
    if compile and precision is not None:
        raise ConfigError(f"torch.compile and precision={precision!r} do not combine: the packed layers call "
                          "oneDNN/fbgemm kernels on prepacked weights, which inductor cannot lower (measured: "
                          "LoweringException); compile the plain network or use the packed one")
    if compile and (deepcache is not None or cache_schedule is not None):
        raise ConfigError("torch.compile and feature caching do not combine: the cache decides per call, in "
                          "Python, which blocks run, so the compiled graph would be rebuilt or bypassed at "
                          "every step; use one of them")


def accelerate(net: nn.Module, *, precision: str | None = None, deepcache: int | None = None,
               deepcache_branch: int = 1, deepcache_calls: int = 201, deep_modules: Iterable[str] | None = None,
               cache_schedule: Mapping[str, Iterable[int]] | None = None, compile: bool = False,
               cuda_graph: bool = False, rows_hint: int = 8) -> nn.Module:
    """An inference form of ``net`` with the named options; ``net`` itself is left as it is.

    Args:
        net: the plain network.
        precision: None (plain weights), ``"fp32"``, ``"bf16"``, ``"int8"`` or ``"int8dyn"``.
        deepcache: DeepCache interval (deep features recomputed every ``deepcache`` calls); None: off.
        deepcache_branch: level whose skip feature the shallow path still computes
            (read by ``net.deepcache_modules``).
        deepcache_calls: calls the DeepCache schedule covers (at least the calls of one sample).
        deep_modules: the modules DeepCache reuses, for a network without ``deepcache_modules``
            (e.g. ``rtdp.core.cache.unet2d_deepcache_modules(unet)``).
        cache_schedule: ``{module name: calls at which it runs}``; not with ``deepcache``.
        compile: wrap the plain network in ``torch.compile`` (not with packing or caching).
        cuda_graph: replay the network from CUDA graphs (plain network on a CUDA device).
        rows_hint: rows per product the packed weights are laid out for (the trajectory length).

    Returns:
        ``net`` when every option is off, otherwise a new module; a cache
        restarts with ``reset()`` before every sample.

    Raises:
        ConfigError: options that do not combine, an unknown precision or one
            this CPU cannot run, or DeepCache on a network without deep modules.
    """
    check_options(precision=precision, deepcache=deepcache, cache_schedule=cache_schedule, compile=compile,
                  cuda_graph=cuda_graph)
    if deepcache is not None:
        if isinstance(deepcache, bool) or int(deepcache) != deepcache or int(deepcache) < 1:
            raise ConfigError(f"deepcache must be an interval >= 1, got {deepcache!r}")
        if deep_modules is None:
            if not hasattr(net, "deepcache_modules"):
                raise ConfigError(f"DeepCache needs a U-Net; {type(net).__name__} has no skip branch to cut at")
            deep_modules = net.deepcache_modules(deepcache_branch)
    out = fast_network(net, precision, rows_hint=rows_hint)
    if deepcache is not None or cache_schedule is not None:
        schedule = (deepcache_schedule(list(deep_modules), deepcache_calls, int(deepcache)) if deepcache is not None
                    else {str(n): set(int(s) for s in v) for n, v in cache_schedule.items()})
        # the cache replaces submodules of what it wraps: a copy, so the plain network stays whole
        out = CachedNetwork(out if precision is not None else copy.deepcopy(net).eval(), schedule)
    if compile:
        out = torch.compile(out, dynamic=False)  # a wrapper: the plain network stays as it is
    if cuda_graph:
        from rtdp.core.cudagraph import CudaGraphNetwork

        out = CudaGraphNetwork(out)
    return out
