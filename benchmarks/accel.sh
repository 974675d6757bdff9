#!/usr/bin/env bash
# Reproduce the acceleration-core figures (issue "Acceleration core, part 1") quoted in
# benchmarks/RESULTS.md: EDM (BESO) + streaming policies, consistency distillation, the
# goal-conditioned PushT task with classifier-free guidance, and `rtdp bench` side by side.
# Needs the demonstrations and DDPM-100 checkpoints of benchmarks/pipeline.sh in $OUT.
# Each training stage is skipped when its summary exists. Timing runs want quiet cores.
set -euo pipefail
cd "$(dirname "$0")/.."
RTDP=${RTDP:-.venv/bin/rtdp}
OUT=${OUT:-runs}
mkdir -p "$OUT"

# EDM policies (one network serves edm-3 and the streaming buffer: half the batches carry the noise ladder)
[ -f "$OUT/pusht_edm/summary.json" ] || $RTDP train policy=edm data="$OUT/pusht.zarr" out="$OUT/pusht_edm" \
    steps=10000 lr=5e-4 eval_every=2500 eval_episodes=20 checkpoint_every=500 threads=1 resume=true
[ -f "$OUT/lift_edm/summary.json" ] || $RTDP train task=lift policy=edm policy.size=medium data="$OUT/lift.zarr" \
    out="$OUT/lift_edm" steps=4000 lr=1e-4 eval_every=1000 eval_episodes=10 checkpoint_every=500 threads=1 resume=true

# Consistency policies distilled from the EDM teachers: grid loss with the EMA target (mu = 0.95) plus the
# endpoint term (cd_anchor_weight=1: one step from sigma_max against the teacher's own edm-3 answer)
[ -f "$OUT/pusht_cm/summary.json" ] || $RTDP train policy=consistency policy.teacher="$OUT/pusht_edm/checkpoint" \
    data="$OUT/pusht.zarr" out="$OUT/pusht_cm" steps=3000 lr=5e-5 warmup_steps=100 eval_every=1000 eval_episodes=20 \
    checkpoint_every=500 threads=1 resume=true
[ -f "$OUT/lift_cm/summary.json" ] || $RTDP train task=lift policy=consistency policy.teacher="$OUT/lift_edm/checkpoint" \
    data="$OUT/lift.zarr" out="$OUT/lift_cm" steps=2000 lr=5e-5 warmup_steps=100 eval_every=1000 eval_episodes=10 \
    checkpoint_every=500 threads=1 resume=true

# Goal-conditioned PushT: random goal per episode, goal dropped with p=0.1 in training
[ -d "$OUT/pusht_goal.zarr" ] || $RTDP collect task=pusht_goal episodes=300 seed=0 out="$OUT/pusht_goal.zarr"
[ -f "$OUT/pusht_goal_edm/summary.json" ] || $RTDP train task=pusht_goal policy=edm 'policy.goal_keys=[goal_keypoint]' \
    policy.ladder_prob=0 data="$OUT/pusht_goal.zarr" out="$OUT/pusht_goal_edm" steps=10000 lr=5e-4 eval_every=2500 \
    eval_episodes=20 checkpoint_every=500 threads=1 resume=true

# Side by side, 50 episodes per configuration (success, score, latency, NFE, action MSE vs ddpm-100)
$RTDP bench checkpoint="$OUT/pusht_small/checkpoint" checkpoints="[$OUT/pusht_edm/checkpoint,$OUT/pusht_cm/checkpoint]" \
    configs=[ddpm-100,ddim-10,dpmpp-8,dpmpp-5,edm-3,stream-1,stream-2,cm-1,cm-2] episodes=50 json="$OUT/bench_pusht.json"
$RTDP bench checkpoint="$OUT/lift_small/checkpoint" checkpoints="[$OUT/lift_edm/checkpoint,$OUT/lift_cm/checkpoint]" \
    configs=[ddpm-100,ddim-10,dpmpp-8,dpmpp-5,edm-3,stream-1,stream-2,cm-1,cm-2] episodes=50 json="$OUT/bench_lift.json"
$RTDP bench checkpoint="$OUT/pusht_goal_edm/checkpoint" \
    configs=[edm-3,edm-3+g0,edm-3+g2,edm-3+g2+skip0.99,edm-3+g2+skip0.9] episodes=50 json="$OUT/bench_pusht_goal.json"

# Diffusion Policy's own network sizes, freshly initialised (timing only)
$RTDP bench size=dp_lowdim configs=[ddpm-100,ddim-10,dpmpp-8,edm-3,stream-1,stream-2,cm-1] json="$OUT/bench_dp_lowdim.json"
$RTDP bench size=dp_image configs=[ddim-10,edm-3,stream-1,stream-2,cm-1] calls=50 json="$OUT/bench_dp_image.json"

# 200 episodes (seeds 100000..100199), where 50 cannot resolve a 3-point bound
$RTDP bench checkpoint="$OUT/pusht_small/checkpoint" configs=[ddpm-100,ddim-10,ddim-100,dpmpp-8] episodes=200 \
    threads=1 json="$OUT/bench_pusht_ddim_200.json"
$RTDP bench checkpoint="$OUT/pusht_small/checkpoint" configs=[dpmpp-10] episodes=200 threads=1 \
    json="$OUT/bench_pusht_dpmpp10_200.json"
$RTDP bench checkpoint="$OUT/pusht_edm/checkpoint" checkpoints="[$OUT/pusht_cm/checkpoint]" configs=[edm-3,cm-1] \
    episodes=200 threads=1 json="$OUT/bench_pusht_cm_200.json"
$RTDP bench checkpoint="$OUT/lift_small/checkpoint" configs=[ddim-10,dpmpp-10,ddpm-100] episodes=200 threads=1 \
    json="$OUT/bench_lift_ddim_200.json"
$RTDP bench checkpoint="$OUT/lift_small/checkpoint" configs=[ddpm-10,ddim-100] episodes=50 threads=1 \
    json="$OUT/bench_lift_ddpm10.json"

# The best combination: streaming at 2 NFE with int8 weights (success on the trained EDM policies, then timing)
$RTDP bench checkpoint="$OUT/pusht_edm/checkpoint" threads=1 episodes=50 calls=10 \
    configs=[stream-1,stream-1+fast,stream-1+int8,stream-1+int8dyn,stream-2+int8dyn] json="$OUT/bench_pusht_stream_combos.json"
$RTDP bench checkpoint="$OUT/lift_edm/checkpoint" threads=1 episodes=50 calls=10 configs=[stream-2+int8dyn] \
    json="$OUT/bench_lift_stream2_int8dyn.json"
$RTDP bench size=dp_lowdim configs=[ddpm-100,edm-3,stream-2,stream-2+int8dyn,stream-1+int8dyn,cm-1+int8dyn] calls=20 \
    json="$OUT/bench_dp_lowdim_best.json"
$RTDP bench size=dp_image configs=[ddpm-100,stream-2,stream-2+int8dyn] calls=5 warmup=1 json="$OUT/bench_dp_image_best.json"
$RTDP bench checkpoint="$OUT/pusht_small/checkpoint" configs=[ddpm-100+deepcache4] episodes=50 threads=1 \
    json="$OUT/bench_pusht_dc4.json"

# A second Lift DDPM network: small U-Net, batch 128, 5,000 steps (the medium one above loses 6 points with DDIM),
# epsilon and sample prediction; deterministic and stochastic few-step samplers against its DDPM-100
for pt in epsilon sample; do
    out="$OUT/lift_small_$pt"
    [ -f "$out/summary.json" ] || $RTDP train task=lift data="$OUT/lift.zarr" out="$out" steps=5000 lr=5e-4 \
        batch_size=128 eval_every=0 eval_episodes=0 checkpoint_every=500 threads=1 policy.size=small \
        policy.prediction_type=$pt resume=true
    $RTDP bench checkpoint="$out/checkpoint" configs=[ddpm-100,ddim-10,dpmpp-10,dpmpp_sde-10,ddpm-10] episodes=50 \
        threads=1 calls=10 json="$OUT/bench_lift_small_$pt.json"
done
$RTDP bench checkpoint="$OUT/lift_small_epsilon/checkpoint" configs=[ddpm-100,ddim-10,dpmpp-10] episodes=200 threads=1 \
    calls=10 json="$OUT/bench_lift_small_epsilon_200.json"

# The consistency student asked at observations moved off the demonstrations (policy.cd_obs_noise=0.05),
# distilled from the shipped PushT EDM policy; 50, 200 and 500 episodes against its teacher
[ -f "$OUT/pusht_cm_on/summary.json" ] || $RTDP train policy=consistency \
    policy.teacher=rtdp/assets/checkpoints/pusht_edm/checkpoint policy.cd_obs_noise=0.05 data="$OUT/pusht.zarr" \
    out="$OUT/pusht_cm_on" steps=3000 lr=5e-5 warmup_steps=100 eval_every=0 eval_episodes=0 checkpoint_every=500 \
    threads=1 resume=true
for n in 50 200 500; do
    $RTDP bench checkpoint=rtdp/assets/checkpoints/pusht_edm/checkpoint checkpoints="[$OUT/pusht_cm_on/checkpoint]" \
        configs=[edm-3,cm-1,cm-2] episodes=$n threads=1 json="$OUT/bench_pusht_cm_obsnoise_$n.json"
done

# DAgger for the one-step student: roll the student out on seeds outside the test set (300000.., 400000..),
# record the observation windows it acted on, and distil on, the teacher answering at those windows too
# (rtdp train anchor_obs=); each round starts from the previous student and uses every window recorded so far
mkdir -p "$OUT/dagger"
prev="$OUT/pusht_cm_on"
for r in 1 2; do
    [ -f "$OUT/dagger/obs_r$r.npz" ] || $RTDP eval checkpoint="$prev/checkpoint" episodes=200 first_seed=$((200000 + 100000 * r)) \
        record_obs="$OUT/dagger/obs_r$r.npz" threads=1 video=false json="$OUT/dagger/eval_r$r.json"
    rounds=$(seq -f "$OUT/dagger/obs_r%g.npz" -s, 1 $r)
    [ -f "$OUT/pusht_cm_dagger$r/summary.json" ] || $RTDP train policy=consistency \
        policy.teacher=rtdp/assets/checkpoints/pusht_edm/checkpoint policy.cd_obs_noise=0.05 policy.init="$prev/checkpoint" \
        anchor_obs="[$rounds]" data="$OUT/pusht.zarr" out="$OUT/pusht_cm_dagger$r" steps=1000 lr=5e-5 \
        warmup_steps=50 eval_every=0 eval_episodes=0 checkpoint_every=250 threads=1 resume=true
    $RTDP bench checkpoint=rtdp/assets/checkpoints/pusht_edm/checkpoint checkpoints="[$OUT/pusht_cm_dagger$r/checkpoint]" \
        configs=[edm-3,cm-1] episodes=500 threads=1 calls=5 json="$OUT/bench_pusht_cm_dagger${r}_500.json"
    prev="$OUT/pusht_cm_dagger$r"
done
