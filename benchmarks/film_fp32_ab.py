"""A/B at the image-size U-Net (batch 1, 2 threads): int8 with the FiLM layers fp32 (the default), int8 in every layer, int8dyn; interleaved calls, medians."""
import time

import torch

from rtdp.policies.unet1d import ConditionalUnet1D
from rtdp.core.fastnet import fast_network
torch.set_num_threads(2); torch.manual_seed(0)
net = ConditionalUnet1D(input_dim=2, global_cond_dim=2 * (512 + 2), down_dims=(512, 1024, 2048)).eval()
x, t, g = torch.randn(1, 16, 2), torch.tensor([10]), torch.randn(1, 2 * 514)
nets = {"int8 FiLM fp32": fast_network(net, "int8", rows_hint=16),
        "int8 all layers": fast_network(net, "int8", rows_hint=16, fp32_layers=()),
        "int8dyn": fast_network(net, "int8dyn", rows_hint=16)}
times = {k: [] for k in nets}
with torch.no_grad():
    for _ in range(3):
        for n in nets.values(): n(x, t, g)
    for _ in range(30):
        for k, n in nets.items():
            t0 = time.perf_counter(); n(x, t, g); times[k].append(time.perf_counter() - t0)
for k, v in times.items():
    v.sort(); print(f"{k:18s} median {v[len(v)//2]*1e3:.1f} ms  p90 {v[int(len(v)*0.9)]*1e3:.1f} ms")
