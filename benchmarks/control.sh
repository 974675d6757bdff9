#!/usr/bin/env bash
# Reproduce the real-time control figures quoted in benchmarks/RESULTS.md ("Real-time control").
# Timing runs want quiet cores: nothing else heavy may run while this does (about 50 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
RTDP=${RTDP:-.venv/bin/rtdp}
R=benchmarks/results
CK=rtdp/assets/checkpoints/pusht_edm/checkpoint     # edm-3: ~20 ms per chunk, far below the 800 ms chunk
SLOW=rtdp/assets/checkpoints/pusht/checkpoint       # ddpm-100: ~400 ms per chunk on 2 cores
mkdir -p "$R"

# 1. PushT, the shipped EDM policy: synchronous evaluation, then the same checkpoint in real time
#    at 10 Hz through the sim driver (environment in its own process, on the wall clock)
$RTDP eval checkpoint=$CK episodes=50 video=false json=$R/control_pusht_sync.json out=outputs/control_sync
$RTDP control checkpoint=$CK driver=sim episodes=50 seam=switch live=false \
    json=$R/control_pusht_switch.json out=outputs/control_switch

# 2. Chunk seams side by side (inference submitted 2 intervals earlier, so chunks overlap)
for seam in switch ensemble rtc; do
    $RTDP control checkpoint=$CK driver=sim episodes=20 seam=$seam overlap=2 live=false \
        json=$R/control_pusht_seam_$seam.json out=outputs/control_seam_$seam
done

# 3. Thread or process worker: the 50 Hz loop on the Dynamixel bus emulator with a Diffusion Policy
#    low-dim size network (fresh, timing only) inferring all the time on both cores; 60 s each
for worker in thread process; do
    $RTDP control size=dp_lowdim family=edm sampler=edm steps=3 driver=dynamixel port=emulator rate_hz=50 \
        duration_s=60 worker=$worker threads=2 watchdog_s=2 live=false \
        json=$R/control_50hz_$worker.json out=outputs/control_50hz_$worker
done

# 4. Ten minutes at 50 Hz with the process worker
$RTDP control size=dp_lowdim family=edm sampler=edm steps=3 driver=dynamixel port=emulator rate_hz=50 \
    duration_s=600 worker=process threads=2 watchdog_s=2 live=false \
    json=$R/control_50hz_10min.json out=outputs/control_50hz_10min
cp outputs/control_50hz_10min/timing.png $R/control_50hz_10min.png
cp outputs/control_switch/timing.png $R/control_pusht_switch.png

# 5. The slow DDPM-100 policy in real time: ~0.4 s between observation and action
$RTDP control checkpoint=$SLOW driver=sim episodes=20 seam=switch live=false \
    json=$R/control_pusht_ddpm_switch.json out=outputs/control_ddpm_switch
$RTDP control checkpoint=$SLOW driver=sim episodes=20 seam=rtc overlap=2 live=false \
    json=$R/control_pusht_ddpm_rtc.json out=outputs/control_ddpm_rtc

