#!/usr/bin/env bash
# Reproduce the real-time control figures quoted in benchmarks/RESULTS.md ("Real-time control").
# Timing runs want quiet cores: nothing else may run while this does (about 45 minutes). A CPU hog at
# normal priority starves the nice-10 inference worker and the emulator, and the runs stop on the watchdog.
# STEPS="1 3" runs only the parts README.md quotes (about 17 minutes); the default runs all four.
set -euo pipefail
STEPS=${STEPS:-"1 2 3 4"}
step() { [[ " $STEPS " == *" $1 "* ]]; }
cd "$(dirname "$0")/.."
RTDP=${RTDP:-.venv/bin/rtdp}
R=benchmarks/results
CK=rtdp/assets/checkpoints/pusht_edm/checkpoint     # edm-3: ~17 ms per chunk, far below the 800 ms chunk
mkdir -p "$R"

# 1. PushT, the shipped EDM policy: synchronous evaluation, then the same checkpoint in real time
#    at 10 Hz through the sim driver (environment in its own process, on the wall clock)
if step 1; then
$RTDP eval checkpoint=$CK episodes=50 video=false json=$R/control_pusht_sync.json out=outputs/control_sync
$RTDP control checkpoint=$CK driver=sim episodes=50 seam=switch live=false \
    json=$R/control_pusht_switch.json out=outputs/control_switch
cp outputs/control_switch/timing.png $R/control_pusht_switch.png
fi

# 2. Chunk seams side by side (inference submitted 2 intervals earlier, so chunks overlap)
step 2 && for seam in switch ensemble rtc; do
    $RTDP control checkpoint=$CK driver=sim episodes=10 seam=$seam overlap=2 live=false \
        json=$R/control_pusht_seam_$seam.json out=outputs/control_seam_$seam
done

# 3. Thread or process worker: the 50 Hz loop on the Dynamixel bus emulator with a Diffusion Policy
#    low-dim size network (fresh, timing only; edm-3 takes ~220 ms, longer than the 160 ms chunk,
#    so the worker never rests), 60 s each
step 3 && for worker in thread process; do
    $RTDP control size=dp_lowdim policy=edm sampler=edm steps=3 driver=dynamixel port=emulator rate_hz=50 \
        duration_s=60 worker=$worker threads=2 watchdog_s=2 live=false \
        json=$R/control_50hz_$worker.json out=outputs/control_50hz_$worker
done

# 4. Ten minutes at 50 Hz, process worker, the same network with int8 weights (edm-3+int8dyn ~50 ms,
#    inside the 160 ms chunk, so the arm moves all the time)
if step 4; then
$RTDP control size=dp_lowdim policy=edm sampler=edm steps=3 precision=int8dyn driver=dynamixel port=emulator \
    rate_hz=50 duration_s=600 worker=process threads=2 watchdog_s=2 live=false \
    json=$R/control_50hz_10min.json out=outputs/control_50hz_10min
cp outputs/control_50hz_10min/timing.png $R/control_50hz_10min.png
fi
