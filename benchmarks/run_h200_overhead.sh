#!/usr/bin/env bash
# One device call on an H200 machine: the PM worker's cost by decode cadence, then the daemon's
# overhead at its defaults (PM workers included) and its yielding to Nsight Compute.
#   OUT=... bash benchmarks/run_h200_overhead.sh      (from the repository root, wheels in .whl/)
set -u
: "${OUT:?}"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1
# cupti-python 13.3 wants its own CUPTI, not the 13.0 one torch's environment carries.
export LD_LIBRARY_PATH=/tmp/site/nvidia/cu13/lib:${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name,driver_version,power.limit,compute_mode --format=csv | tee "$OUT/gpus.txt"
timeout 120 python3 benchmarks/pm_worker_cost.py --out "$OUT" --seconds 10 \
  --decode "${COST_DECODE:-0.1,0.25,0.5,1.0}" 2>&1 | tee "$OUT/cost-log.txt"
timeout 300 python3 benchmarks/pm_overhead.py --out "$OUT" --blocks "${OH_BLOCKS:-8}" \
  --block-s 12 --settle-s 4 2>&1 | tee "$OUT/overhead-log.txt"
