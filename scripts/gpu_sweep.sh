#!/usr/bin/env bash
# The GPU sweep on a machine whose image lacks diffusers and omegaconf: installs the wheels carried in .whl
# (see scripts/gpu_sweep.py's docstring) into /tmp/site, then runs the sweep under a hard timeout.
#   bash scripts/gpu_sweep.sh --out "$OUT/sweep.json" [more gpu_sweep.py flags]
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
exec timeout "${SWEEP_TIMEOUT_S:-570}" python3 scripts/gpu_sweep.py --budget-s "${SWEEP_BUDGET_S:-480}" "$@"
