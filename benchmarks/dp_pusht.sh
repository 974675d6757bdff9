#!/usr/bin/env bash
# Reproduce rtdp's figures on Diffusion Policy's own PushT demonstrations (issue "Reproduce Diffusion
# Policy's PushT results"): train the CNN policy on pusht_cchi_v7_replay.zarr as it is (keypoint
# observations), keep the weights of every evaluation, then apply Diffusion Policy's protocol
# (seeds 100000..100049, 300 steps, score = max coverage / 0.95 clipped to 1) to the best and the last
# checkpoints. About 1.7 hours of training on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
RTDP=${RTDP:-.venv/bin/rtdp}
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs}
DATA=${DATA:-../shared/data/pusht_cchi_v7_replay.zarr}
mkdir -p "$OUT"

[ -f "$OUT/dp_pusht_kp/summary.json" ] || $RTDP train task=pusht data="$DATA" out="$OUT/dp_pusht_kp" \
    policy.size=medium steps=18000 lr=5e-4 eval_every=1500 eval_episodes=50 eval_sampler=ddim eval_steps=10 \
    checkpoint_every=500 keep_checkpoints=true threads=2 resume=true
$PY benchmarks/dp_pusht_report.py "$OUT/dp_pusht_kp" --samplers ddpm-100 --last 3 \
    --json benchmarks/results/dp_pusht_kp.json
