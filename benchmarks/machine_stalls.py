"""How often this machine stops a ready thread, with nothing of rtdp running.

A 50 Hz loop that sleeps to each deadline and then does 5 ms of work (the
control loop's shape), for ``--seconds``. Reported: start lateness p99/max,
the longest gap between two consecutive clock reads inside the work (a stall
of the thread while it was running), how many cycles would have missed their
deadline with that work, and the CPU time the hypervisor took (steal, from
/proc/stat). A control loop cannot do better than this floor.

    python benchmarks/machine_stalls.py --seconds 600 --json benchmarks/results/machine_stalls.json
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def steal_ticks() -> int:
    try:
        with open("/proc/stat") as f:
            return int(f.readline().split()[8])
    except (OSError, IndexError, ValueError):
        return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--rate", type=float, default=50.0)
    ap.add_argument("--work-ms", type=float, default=5.0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    period, work = 1.0 / args.rate, args.work_ms / 1e3
    n = int(args.seconds * args.rate)
    late, stall, end_late = np.zeros(n), np.zeros(n), np.zeros(n)
    s0 = steal_ticks()
    t0 = time.monotonic()
    for k in range(n):
        deadline = t0 + k * period
        while (left := deadline - time.monotonic()) > 3e-4:
            time.sleep(left - 3e-4)
        while time.monotonic() < deadline:
            pass
        start = last = time.monotonic()
        gap = 0.0
        while (now := time.monotonic()) - start < work:
            gap, last = max(gap, now - last), now
        late[k], stall[k], end_late[k] = start - deadline, gap, now - (deadline + period)
    ticks = steal_ticks() - s0
    report = {
        "seconds": args.seconds, "rate_hz": args.rate, "work_ms": args.work_ms, "cycles": n,
        "lateness_ms_p99": float(np.percentile(late, 99) * 1e3), "lateness_ms_max": float(late.max() * 1e3),
        "stall_ms_max": float(stall.max() * 1e3),
        "stalls_over_5ms": int((stall > 5e-3).sum()), "stalls_over_10ms": int((stall > 10e-3).sum()),
        "late_starts_over_10ms": int((late > 10e-3).sum()),
        "would_miss": int((end_late > 0).sum()),
        "steal_s": ticks / 100.0,  # USER_HZ = 100, summed over CPUs
    }
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
