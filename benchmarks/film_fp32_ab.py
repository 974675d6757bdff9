"""What keeping the FiLM layers fp32 costs under int8, at Diffusion Policy's image-size U-Net.

Batch 1, 2 threads, the network `rtdp bench size=dp_image` times (fresh weights): int8 with
the FiLM layers fp32 (the default), int8 in every layer, and int8dyn, called in turn so the
three share the machine's state; medians and p90 of 30 calls each.
"""

import time

import torch

from rtdp.core.fastnet import fast_network
from rtdp.envs import get_task
from rtdp.workflows.bench import _fresh_policies


def main() -> None:
    torch.set_num_threads(2)
    policy = _fresh_policies(get_task("pusht_image"), "dp_image")[0]
    net, horizon = policy.model, policy.config.horizon
    x = torch.randn(1, horizon, policy.config.action_dim)
    t = torch.tensor([10])
    g = torch.randn(1, net.global_cond_dim)
    nets = {
        "int8 FiLM fp32": fast_network(net, "int8", rows_hint=horizon),
        "int8 all layers": fast_network(net, "int8", rows_hint=horizon, fp32_layers=()),
        "int8dyn": fast_network(net, "int8dyn", rows_hint=horizon),
    }
    times: dict[str, list[float]] = {k: [] for k in nets}
    with torch.no_grad():
        for _ in range(3):
            for n in nets.values():
                n(x, t, g)
        for _ in range(30):
            for k, n in nets.items():
                t0 = time.perf_counter()
                n(x, t, g)
                times[k].append(time.perf_counter() - t0)
    for k, v in times.items():
        v.sort()
        print(f"{k:18s} median {v[len(v) // 2] * 1e3:.1f} ms  p90 {v[int(len(v) * 0.9)] * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
