#!/usr/bin/env bash
# Reproduce the packed-network figures (issue "Cheaper network evaluations") quoted in
# benchmarks/RESULTS.md: per-NFE latency of Diffusion Policy's U-Net sizes beside the memory
# floor, plain vs packed fp32 / bf16 / int8 / int8dyn, and the int8 fidelity on trained policies.
# Timing runs want quiet cores; the fidelity runs need the EDM checkpoints of benchmarks/accel.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
RTDP=${RTDP:-.venv/bin/rtdp}
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs}
mkdir -p "$OUT"

# Timing, fresh networks of Diffusion Policy's sizes (batch 1, 2 threads), each beside its floor
$RTDP bench size=dp_image calls=20 json="$OUT/bench6_dp_image.json" \
    configs=[ddim-10,ddim-10+fast,ddim-10+bf16,ddim-10+int8,ddim-10+int8dyn,cm-1,cm-1+fast,cm-1+bf16,cm-1+int8,cm-1+int8dyn,stream-1+int8dyn]
$RTDP bench size=dp_lowdim calls=20 json="$OUT/bench6_dp_lowdim.json" \
    configs=[ddpm-100,ddpm-100+fast,ddpm-100+bf16,ddpm-100+int8,ddpm-100+int8dyn,cm-1,cm-1+fast,cm-1+int8,cm-1+int8dyn,stream-1+int8dyn]

# Fidelity: success (50 episodes) and action MSE against the plain network, same noise and observations
$RTDP bench checkpoint=rtdp/assets/checkpoints/pusht_edm/checkpoint episodes=50 calls=5 \
    configs=[edm-3,edm-3+int8,edm-3+int8dyn,edm-3+fast] json="$OUT/bench6_pusht_fid.json"
$RTDP bench checkpoint="$OUT/lift_edm/checkpoint" episodes=50 calls=5 \
    configs=[edm-3,edm-3+int8,edm-3+int8dyn,edm-3+fast] json="$OUT/bench6_lift_fid.json"

# Lift, the shipped DDPM policy, int8 with the FiLM layers fp32 (one thread)
$RTDP bench checkpoint=rtdp/assets/checkpoints/lift/checkpoint episodes=50 calls=5 threads=1 \
    configs=[ddpm-100,ddpm-100+int8,ddpm-100+int8dyn,ddim-10,ddim-10+int8] json="$OUT/bench_lift_int8_film.json"

# 500 paired episodes on PushT (seeds 100000..100499): the int8 forms against fp32, then again with the
# FiLM layers kept fp32 under bf16 / int8 (the default since; the first run predates it).
# results/bench_pusht_int8_500_zen5.json is the first command run again on the AMD EPYC (Zen 5), after the FiLM default
$RTDP bench checkpoint=rtdp/assets/checkpoints/pusht_edm/checkpoint episodes=500 calls=5 threads=1 \
    configs=[edm-3,edm-3+fast,edm-3+int8,edm-3+int8dyn] json="$OUT/bench_pusht_int8_500.json"
$RTDP bench checkpoint=rtdp/assets/checkpoints/pusht_edm/checkpoint episodes=500 calls=5 threads=1 \
    configs=[edm-3,edm-3+int8,edm-3+bf16] json="$OUT/bench_pusht_int8_film_fp32_500.json"

# FiLM layers fp32 under int8: the cost at the image size, one A/B run (quiet cores)
$PY benchmarks/film_fp32_ab.py
