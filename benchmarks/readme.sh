#!/usr/bin/env bash
# Rebuild every figure table of README.md from the checkpoints rtdp ships (and fresh networks for the rows
# marked "timing, fresh weights"), then print the tables as markdown with the CPU and torch version in the
# caption. README.md's tables are pasted from benchmarks/results/readme/README_tables.md.
#
#   bash benchmarks/readme.sh            # Lift rows need the sim extra (robosuite), driving rows the drive extra
#   LIFT=0 HIGHWAY=0 bash benchmarks/readme.sh   # without the Lift (robosuite) or driving (highway-env) rows
#
# Every step writes a JSON report (rtdp's json=PATH contract) under benchmarks/results/readme/ and is skipped
# when that report exists, so an interrupted run resumes; delete the folder to measure again. Nothing else
# may run on the machine meanwhile: the timings are medians of batch-1 calls on all physical cores.
set -euo pipefail
cd "$(dirname "$0")/.."
RTDP="${RTDP:-.venv/bin/rtdp}"
PY="${PY:-.venv/bin/python}"
R="${OUT:-benchmarks/results/readme}"
C=rtdp/assets/checkpoints
mkdir -p "$R"
T=$($PY -c "from rtdp.workflows.machine import physical_cores; print(physical_cores())")
EP="${EPISODES:-50}"
N="${CALLS:-}"   # timed calls per configuration (default per step below); EPISODES=2 CALLS=2 OUT=/tmp/x: a smoke run

run() {  # run <report.json> <command...>: once per report
    local out=$1; shift
    [ -f "$out" ] && { echo "readme.sh: $out exists, skipped"; return; }
    echo "readme.sh: $*"
    "$@"
}

# 1. The scripted experts and the shipped DDPM policies on the evaluation seeds; the fast policies on the same
#    seeds, timed side by side in one run (speed-up per executed action against ddpm-100).
run $R/expert_pusht.json $RTDP eval expert=true task=pusht episodes=$EP video=false out=outputs/readme/expert_pusht \
    json=$R/expert_pusht.json
run $R/pusht.json $RTDP bench checkpoint=$C/pusht/checkpoint checkpoints=[$C/pusht_edm/checkpoint,$C/pusht_cm/checkpoint] \
    configs=[ddpm-100,edm-3,stream-1,stream-2+int8dyn,cm-1] episodes=$EP calls=${N:-20} threads=$T json=$R/pusht.json

# 2. Block-wise caching on the shipped PushT transformer (its calibration ships beside it).
run $R/pusht_transformer.json $RTDP bench checkpoint=$C/pusht_transformer/checkpoint \
    configs=[ddpm-100,ddpm-100+bac10,ddpm-100+uniform10] episodes=$EP calls=${N:-20} threads=$T json=$R/pusht_transformer.json

# 3. Diffusion Policy's own network sizes, fresh weights (timing only; their actions mean nothing).
run $R/dp_lowdim.json $RTDP bench size=dp_lowdim configs=[ddpm-100,ddpm-100+deepcache3,edm-3,stream-1,stream-2+int8dyn] \
    calls=${N:-10} warmup=2 threads=$T json=$R/dp_lowdim.json
# bf16 and weight-only int8 (bf16 activations) need native bfloat16 (AVX512-BF16 or AMX); other CPUs leave them out
BF16=$($PY -c "from rtdp.core.fastnet import bf16_supported; print(',ddim-10+bf16,ddim-10+int8' if bf16_supported() else '')")
run $R/dp_image.json $RTDP bench size=dp_image \
    configs=[ddpm-100,edm-3,stream-1,stream-2+int8dyn,ddim-10,ddim-10+fast$BF16,ddim-10+int8dyn] \
    calls=${N:-5} warmup=2 threads=$T json=$R/dp_image.json

# 4. Lift (robosuite): the shipped DDPM policy, with and without DeepCache, and its scripted expert.
if [ "${LIFT:-1}" = 0 ]; then
    echo "readme.sh: LIFT=0: the Lift rows are left out"
elif $PY -c "import robosuite" 2>/dev/null; then
    run $R/expert_lift.json $RTDP eval expert=true task=lift episodes=$EP video=false out=outputs/readme/expert_lift \
        json=$R/expert_lift.json
    run $R/lift.json $RTDP bench checkpoint=$C/lift/checkpoint configs=[ddpm-100,ddpm-100+deepcache3] \
        episodes=$EP calls=${N:-10} threads=$T json=$R/lift.json
else
    echo "readme.sh: robosuite is not installed (pip install -e '.[sim]'): the Lift rows are left out"
fi

# 5. Driving planners (highway-env, the drive extra): the scorer's check on the expert's logged futures, then the
#    three shipped planners side by side on the same held-out scenes (driven once by the expert on seeds 100000..,
#    in all cores, and kept in outputs/scenes; PDMS, NFE, latency, diversity).
S="${SCENES:-1000}"
if [ "${HIGHWAY:-1}" = 0 ]; then
    echo "readme.sh: HIGHWAY=0: the driving rows are left out"
elif $PY -c "import highway_env" 2>/dev/null; then
    run $R/highway_expert.json $RTDP eval task=highway expert=true scenes=$S bev=0 out=outputs/readme/highway_expert \
        json=$R/highway_expert.json
    run $R/highway.json $RTDP bench task=highway checkpoint=$C/highway/checkpoint \
        checkpoints=[$C/highway_diffusion_plan/checkpoint,$C/highway_regression/checkpoint] scenes=$S \
        calls=${N:-100} threads=$T json=$R/highway.json
else
    echo "readme.sh: highway-env is not installed (pip install -e '.[drive]'): the driving rows are left out"
fi

$PY benchmarks/readme_tables.py "$R" | tee "$R/README_tables.md"
