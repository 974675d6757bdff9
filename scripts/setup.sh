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

echo "[setup] installing rtdp[sim,hw,drive,dev] (log: $LOG)"
"${PIP[@]}" install -e ".[sim,hw,drive,dev]" >>"$LOG" 2>&1 || { tail -n 20 "$LOG"; exit 1; }
# gym-pusht wants pygame and highway-env pygame-ce; both write the same pygame/ folder. pygame installed
# last, over it, leaves both environments working (uninstalling either would break the module).
if ! .venv/bin/python -m pip show -q pygame >/dev/null 2>&1 || [ ! -f .venv/.pygame-last ]; then
    "${PIP[@]}" install --force-reinstall --no-deps "pygame==2.6.1" >>"$LOG" 2>&1 || { tail -n 20 "$LOG"; exit 1; }
    touch .venv/.pygame-last
fi
.venv/bin/python -c "import rtdp, torch, zarr, gymnasium, gym_pusht, highway_env; print('[setup] ok: torch', torch.__version__)"
