#!/usr/bin/env bash
# Reproduce the driving-planner figures (issue: DiffusionDrive on highway scenes): 8,000 training scenes
# from the scripted expert, three planners on one encoder (anchored diffusion, vanilla diffusion,
# regression), the PDM score of each on 1,000 held-out scenes side by side with NFE, latency and mode
# diversity, and closed-loop driving in highway-env. Training and timing want quiet cores: nothing else
# may run on the machine meanwhile. Each step is skipped when its output exists.
set -euo pipefail
cd "$(dirname "$0")/.."
RTDP=${RTDP:-.venv/bin/rtdp}
OUT=${OUT:-runs}
R=${R:-benchmarks/results/highway}
STEPS=${STEPS:-4000}            # optimiser steps per planner
ANCHOR_STEPS=${ANCHOR_STEPS:-10000}  # the anchored planner continues to this many
EPISODES=${EPISODES:-20}        # closed-loop episodes per scenario (the issue asks for 100: EPISODES=100)
mkdir -p "$OUT" "$R"

# 1. scenes: expert episodes on seeds 0.. (training); held-out scenes come from seeds 100000.. (rtdp eval/bench)
[ -d "$OUT/highway_train.zarr" ] || $RTDP collect task=highway scenes=8000 seed=0 workers=2 \
    out="$OUT/highway_train.zarr" json="$R/collect.json"

# 2. three planners, the same encoder, data, batch and learning rate; the anchored planner trains for
#    ANCHOR_STEPS (each of its K anchors' regressors learns only from the scenes whose nearest anchor it is),
#    the two baselines for STEPS
train() {  # policy steps
    [ -f "$OUT/highway_$1/summary.json" ] || $RTDP train task=highway policy=$1 data="$OUT/highway_train.zarr" \
        out="$OUT/highway_$1" steps=$2 batch_size=64 lr=5e-4 warmup_steps=500 weight_decay=1e-4 betas=[0.9,0.999] \
        checkpoint_every=1000 threads=2 resume=true
    cp "$OUT/highway_$1/summary.json" "$R/train_$1.json"
}
train anchor $ANCHOR_STEPS
train diffusion_plan $STEPS
train regression $STEPS

# 3. the scorer's check: the expert's logged futures on the held-out scenes
$RTDP eval task=highway expert=true scenes=1000 bev=0 json="$R/expert.json"

# 4. side by side: anchor-2, vanilla ddim-20 and ddim-2, regression; PDMS, NFE, latency, diversity
$RTDP bench task=highway checkpoint="$OUT/highway_anchor/checkpoint" \
    checkpoints=["$OUT/highway_diffusion_plan/checkpoint","$OUT/highway_regression/checkpoint"] \
    scenes=1000 calls=100 json="$R/bench.json"

# 5. the shipped planner's headline (what REPRODUCE.md beside it quotes), with BEV pictures
$RTDP eval task=highway checkpoint="$OUT/highway_anchor/checkpoint" scenes=1000 latency_calls=200 bev=8 \
    out="$R/eval_anchor" json="$R/eval_anchor.json"

# 6. closed loop: every planner and the expert drive EPISODES episodes per scenario, replanning at 2 Hz
for who in expert anchor regression diffusion_plan; do
    ckpt=$([ $who = expert ] && echo expert || echo "$OUT/highway_$who/checkpoint")
    [ -f "$R/control_$who.json" ] || $RTDP control task=highway checkpoint="$ckpt" driver=sim \
        episodes=$EPISODES rate_hz=2 out="$R/control_$who" json="$R/control_$who.json"
done

# 7. the core's anchored start on a PushT action policy that was not trained for it: k-means action anchors
#    of its training data, the nearest to a one-call estimate noised to step T, then DDIM (NFE 1 + steps)
[ -d "$OUT/pusht.zarr" ] || $RTDP collect task=pusht episodes=200 seed=0 workers=2 out="$OUT/pusht.zarr"
$RTDP bench checkpoint=rtdp/assets/checkpoints/pusht/checkpoint 'configs=[ddim-3,ddim-2,ddim-2+anchor30,ddim-1+anchor20]' \
    episodes=50 calls=20 anchor_data="$OUT/pusht.zarr" json=benchmarks/results/pusht_anchor.json
