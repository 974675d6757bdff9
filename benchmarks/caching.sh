#!/usr/bin/env bash
# Reproduce the caching figures quoted in benchmarks/RESULTS.md ("Block-wise caching", "Image path"):
# a transformer Diffusion Policy on PushT (rtdp's scripted demonstrations), BAC against uniform caching
# at the same budget, and a diffusers UNet2DModel trained on rendered PushT scenes, with and without
# DeepCache. Timing runs want quiet cores.
set -euo pipefail
cd "$(dirname "$0")/.."
RTDP=${RTDP:-.venv/bin/rtdp}
OUT=${OUT:-runs}
R=benchmarks/results
# BAC against uniform caching at 20, 15 and 10 updates per block, beside the uncached policy
BUDGETS=[ddpm-100,ddpm-100+bac20,ddpm-100+uniform20,ddpm-100+bac15,ddpm-100+uniform15,ddpm-100+bac10,ddpm-100+uniform10]
mkdir -p "$OUT" "$R"

# Transformer policy (8 layers, width 128, DDPM 100 steps) on 200 scripted PushT demonstrations
[ -d "$OUT/pusht.zarr" ] || $RTDP collect task=pusht episodes=200 seed=0 out="$OUT/pusht.zarr"
[ -f "$OUT/pusht_tf/summary.json" ] || $RTDP train task=pusht policy=transformer data="$OUT/pusht.zarr" \
    out="$OUT/pusht_tf" steps=6000 lr=3e-4 batch_size=64 policy.n_emb=128 weight_decay=1e-3 warmup_steps=500 \
    eval_every=3000 eval_episodes=20 checkpoint_every=500 threads=1 resume=true

# BAC (calibrated on 3 rollouts, saved beside the checkpoint) vs uniform caching, 50 episodes each
$RTDP bench checkpoint="$OUT/pusht_tf/checkpoint" \
    configs=[ddpm-100,ddpm-100+bac10,ddpm-100+uniform10,ddpm-100+bac20,ddpm-100+uniform20] episodes=50 \
    json=$R/bench_pusht_tf_bac.json

# The same transformer with non-causal attention, PushT and Lift, 10,000 steps each; BAC vs uniform at 10/15/20
# updates per block (success beside other work, then Lift's latency on quiet cores)
for task in pusht lift; do
    [ -d "$OUT/$task.zarr" ] || $RTDP collect task=$task episodes=200 seed=0 out="$OUT/$task.zarr"
    [ -f "$OUT/${task}_tfnc/summary.json" ] || $RTDP train task=$task policy=transformer data="$OUT/$task.zarr" \
        out="$OUT/${task}_tfnc" steps=10000 lr=3e-4 batch_size=64 policy.n_emb=128 policy.causal_attn=false \
        weight_decay=1e-3 warmup_steps=500 eval_every=0 eval_episodes=0 checkpoint_every=500 threads=1 resume=true
    $RTDP bench checkpoint="$OUT/${task}_tfnc/checkpoint" episodes=50 calls=10 threads=1 \
        configs=$BUDGETS \
        json=$R/bench_${task}_tfnc_bac.json
done
$RTDP bench checkpoint="$OUT/lift_tfnc/checkpoint" calls=20 json=$R/bench_lift_tfnc_timing.json \
    configs=$BUDGETS

# Image path: UNet2DModel 16/32/64/64 at 64 px on 2,000 rendered scenes, DDIM-50 with DeepCache
[ -f "$OUT/scenes64/meta.json" ] || $RTDP image out="$OUT/scenes64" size=64 channels=[16,32,64,64] steps=1500 \
    batch_size=16 lr=4e-4 threads=1
$RTDP bench image="$OUT/scenes64" configs=[ddim-50,ddim-50+deepcache2,ddim-50+deepcache3,ddim-50+deepcache4] \
    json=$R/bench_image_deepcache.json

# Can each network fit 20 demonstrations? The action error (MSE of sampled actions to the demonstrations) is
# logged at every checkpoint; the transformer run was stopped at step 1,250
[ -f "$OUT/fit20_unet/summary.json" ] || $RTDP train task=pusht data="$OUT/pusht.zarr" out="$OUT/fit20_unet" \
    max_episodes=20 steps=2000 lr=5e-4 batch_size=64 warmup_steps=200 eval_every=0 eval_episodes=0 \
    checkpoint_every=250 threads=1 policy.size=small resume=true
$RTDP train task=pusht policy=transformer data="$OUT/pusht.zarr" out="$OUT/fit20_tf" max_episodes=20 steps=2000 \
    lr=1e-3 batch_size=64 policy.n_emb=128 policy.causal_attn=false weight_decay=1e-3 warmup_steps=200 \
    eval_every=0 eval_episodes=0 checkpoint_every=250 threads=1 resume=true
$RTDP train task=pusht policy=transformer data="$OUT/pusht.zarr" out="$OUT/fit20_tf_x0" max_episodes=20 steps=2000 \
    lr=1e-3 batch_size=64 policy.n_emb=128 policy.causal_attn=false policy.prediction_type=sample weight_decay=1e-3 \
    warmup_steps=200 eval_every=0 eval_episodes=0 checkpoint_every=250 threads=2 resume=true

# The transformer trained to predict the clean actions (sample prediction), non-causal, lr 1e-3: 10,000 steps,
# then resumed to 20,000 (the cosine schedule restarts at half the peak); BAC vs uniform, then quiet timing
[ -f "$OUT/pusht_tf_x0/summary.json" ] || $RTDP train task=pusht policy=transformer data="$OUT/pusht.zarr" \
    out="$OUT/pusht_tf_x0" steps=10000 lr=1e-3 batch_size=64 policy.n_emb=128 policy.causal_attn=false \
    policy.prediction_type=sample weight_decay=1e-3 warmup_steps=500 eval_every=0 eval_episodes=0 \
    checkpoint_every=500 threads=1 resume=true
[ -d "$OUT/pusht_tf_x0_20k" ] || { cp -r "$OUT/pusht_tf_x0" "$OUT/pusht_tf_x0_20k"; rm -f "$OUT"/pusht_tf_x0_20k/checkpoint/bac_*.json; }
$RTDP train task=pusht policy=transformer data="$OUT/pusht.zarr" out="$OUT/pusht_tf_x0_20k" steps=20000 lr=1e-3 \
    batch_size=64 policy.n_emb=128 policy.causal_attn=false policy.prediction_type=sample weight_decay=1e-3 \
    warmup_steps=500 eval_every=0 eval_episodes=0 checkpoint_every=500 threads=1 resume=true
for run in pusht_tf_x0 pusht_tf_x0_20k; do
    $RTDP bench checkpoint="$OUT/$run/checkpoint" episodes=50 calls=10 threads=1 \
        configs=$BUDGETS \
        json=$R/bench_${run}_bac.json
done
$RTDP bench checkpoint="$OUT/pusht_tf_x0_20k/checkpoint" calls=20 json=$R/bench_pusht_tf_x0_20k_timing.json \
    configs=$BUDGETS

# The same transformer trained from scratch for 30,000 steps in one cosine schedule (100 min on one thread);
# BAC and uniform caching over 50 and 200 episodes, then quiet timing at 2 and 1 threads
[ -f "$OUT/pusht_tf_x0_30k/summary.json" ] || $RTDP train task=pusht policy=transformer data="$OUT/pusht.zarr" \
    out="$OUT/pusht_tf_x0_30k" steps=30000 lr=1e-3 batch_size=64 policy.n_emb=128 policy.causal_attn=false \
    policy.prediction_type=sample weight_decay=1e-3 warmup_steps=500 eval_every=0 eval_episodes=0 \
    checkpoint_every=1000 threads=1 resume=true
$RTDP bench checkpoint="$OUT/pusht_tf_x0_30k/checkpoint" episodes=50 calls=5 threads=1 configs=$BUDGETS \
    json=$R/bench_pusht_tf_x0_30k_bac.json
$RTDP bench checkpoint="$OUT/pusht_tf_x0_30k/checkpoint" episodes=200 calls=5 threads=1 \
    configs=[ddpm-100,ddpm-100+bac15,ddpm-100+bac10,ddpm-100+uniform15] json=$R/bench_pusht_tf_x0_30k_bac_200.json
$RTDP bench checkpoint="$OUT/pusht_tf_x0_30k/checkpoint" calls=20 configs=$BUDGETS json=$R/bench_pusht_tf_x0_30k_timing.json
for t in 2 1; do
    $RTDP bench checkpoint="$OUT/pusht_tf_x0_30k/checkpoint" calls=50 threads=$t configs=$BUDGETS \
        json=$R/bench_pusht_tf_x0_30k_timing_t$t.json
done
