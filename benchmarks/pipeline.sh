#!/usr/bin/env bash
# Reproduce the pipeline figures quoted in benchmarks/RESULTS.md: scripted
# expert -> zarr -> training -> 50-episode evaluation, for PushT (keypoints),
# PushT (images, short run) and Lift. Runs for about 1.5 hours on 2 cores;
# each stage writes into $OUT and is skipped when its output exists.
set -euo pipefail
cd "$(dirname "$0")/.."
RTDP=${RTDP:-.venv/bin/rtdp}
OUT=${OUT:-runs}
mkdir -p "$OUT"

# PushT, keypoint observations (the checkpoint shipped in rtdp/assets/checkpoints/pusht)
[ -d "$OUT/pusht.zarr" ] || $RTDP collect task=pusht episodes=200 seed=0 out="$OUT/pusht.zarr" json="$OUT/pusht_collect.json"
[ -f "$OUT/pusht_small/summary.json" ] || $RTDP train task=pusht data="$OUT/pusht.zarr" out="$OUT/pusht_small" \
    steps=12000 lr=5e-4 eval_every=3000 eval_episodes=20 checkpoint_every=500 threads=1 policy.size=small resume=true
$RTDP eval checkpoint="$OUT/pusht_small/checkpoint" episodes=50 sampler=ddpm steps=100 json="$OUT/pusht_eval_ddpm100.json"
$RTDP eval expert=true task=pusht episodes=50 out="$OUT/pusht_expert_eval" json="$OUT/pusht_expert_eval.json"

# Lift, low-dim observations
[ -d "$OUT/lift.zarr" ] || $RTDP collect task=lift episodes=200 seed=0 out="$OUT/lift.zarr" json="$OUT/lift_collect.json"
[ -f "$OUT/lift_small/summary.json" ] || $RTDP train task=lift data="$OUT/lift.zarr" out="$OUT/lift_small" \
    steps=4000 lr=1e-4 eval_every=1000 eval_episodes=10 checkpoint_every=500 threads=1 policy.size=medium resume=true
$RTDP eval checkpoint="$OUT/lift_small/checkpoint" episodes=50 sampler=ddpm steps=100 json="$OUT/lift_eval_ddpm100.json"

# PushT from images: a short run that exercises the image path end to end
[ -d "$OUT/pusht_image.zarr" ] || $RTDP collect task=pusht_image episodes=40 seed=0 out="$OUT/pusht_image.zarr"
[ -f "$OUT/pusht_image_short/summary.json" ] || $RTDP train task=pusht_image data="$OUT/pusht_image.zarr" \
    out="$OUT/pusht_image_short" steps=300 batch_size=32 lr=1e-4 warmup_steps=50 checkpoint_every=100 eval_every=0 threads=1 policy.size=medium resume=true
$RTDP eval checkpoint="$OUT/pusht_image_short/checkpoint" episodes=50 sampler=ddim steps=10 json="$OUT/pusht_image_eval_ddim10.json"
