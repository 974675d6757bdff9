"""CUDA graph capture of a denoising network for the GPU path.

At batch 1 a GPU spends most of a network call launching kernels. A CUDA
graph records the kernels of one call once and replays them with a single
launch. ``CudaGraphNetwork`` captures one graph per input signature (tensor
shapes and dtypes plus the non-tensor arguments) the first time it sees it,
after a few warm-up calls on a side stream, and afterwards copies the inputs
into the graph's static buffers, replays, and returns a copy of the static
output. Outputs are identical to the eager network up to the kernels' own
nondeterminism.

Only tensors on one CUDA device are supported; a CPU network gets a typed
error at construction, so a configuration that cannot work fails before a
run starts.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rtdp.errors import ConfigError

__all__ = ["CudaGraphNetwork"]


def _signature(args: tuple[Any, ...]) -> tuple:
    return tuple((tuple(a.shape), a.dtype) if torch.is_tensor(a) else ("value", a) for a in args)


class CudaGraphNetwork(nn.Module):
    """``net`` replayed from CUDA graphs, one per input signature.

    Args:
        net: a network whose parameters are on a CUDA device; called positionally,
            returning one tensor.
        warmup: eager calls on a side stream before each capture.

    Raises:
        ConfigError: CUDA is not available or the network is not on a CUDA device.
    """

    def __init__(self, net: nn.Module, warmup: int = 3) -> None:
        super().__init__()
        if not torch.cuda.is_available():
            raise ConfigError("CUDA graphs need a CUDA GPU; this machine has none (run without cuda_graph)")
        devices = {p.device for p in net.parameters()}
        if len(devices) != 1 or next(iter(devices)).type != "cuda":
            raise ConfigError(f"CUDA graphs need the network on one CUDA device, its parameters are on {devices}")
        self.net = net
        self.warmup = int(warmup)
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list, torch.Tensor]] = {}

    def _capture(self, args: tuple[Any, ...]):
        static = [a.clone() if torch.is_tensor(a) else a for a in args]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(self.warmup):
                self.net(*static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.net(*static)
        if not torch.is_tensor(out):
            raise ConfigError(f"CUDA graph capture needs a network returning one tensor, got {type(out).__name__}")
        return graph, static, out

    @torch.no_grad()
    def forward(self, *args: Any) -> torch.Tensor:
        key = _signature(args)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = self._capture(args)
        graph, static, out = entry
        for buf, a in zip(static, args):
            if torch.is_tensor(a):
                buf.copy_(a)
        graph.replay()
        return out.clone()
