#!/usr/bin/env bash
# Create .venv beside the checkout and install rtdp with every extra the demo
# and the tests use. Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
LOG=.venv/setup.log

# A CPU build of torch first: an unpinned torch pulled in by a dependency
# would otherwise fetch a multi-GB CUDA build. RTDP_TORCH_INDEX may point pip
# at another index that serves CPU wheels.
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
    echo "[setup] installing a CPU build of torch"
    "${PIP[@]}" install "torch==${RTDP_TORCH_VERSION:-2.13.0}" ${RTDP_TORCH_INDEX:+--index-url "$RTDP_TORCH_INDEX"} >>"$LOG" 2>&1 \
        || { tail -n 20 "$LOG"; exit 1; }
fi

echo "[setup] installing rtdp[sim,hw,dev] (log: $LOG)"
"${PIP[@]}" install -e ".[sim,hw,dev]" >>"$LOG" 2>&1 || { tail -n 20 "$LOG"; exit 1; }
.venv/bin/python -c "import rtdp, torch, zarr, gymnasium, gym_pusht; print('[setup] ok: torch', torch.__version__)"
