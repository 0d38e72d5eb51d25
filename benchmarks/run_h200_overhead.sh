#!/usr/bin/env bash
# One device call on an H200 machine: the PM worker's cost by request cadence, then the daemon's
# overhead at its defaults (PM workers included) and its yielding to Nsight Compute, then the
# overhead with NVML's clock only (--counters nvml), to tell PM sampling's share.
#   OUT=... bash benchmarks/run_h200_overhead.sh      (from the repository root, wheels in .whl/)
set -u
: "${OUT:?}"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1
# cupti-python 13.3 wants its own CUPTI, not the 13.0 one torch's environment carries.
export LD_LIBRARY_PATH=/tmp/site/nvidia/cu13/lib:${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name,driver_version,power.limit,compute_mode --format=csv | tee "$OUT/gpus.txt"
timeout 100 python3 benchmarks/pm_worker_cost.py --out "$OUT" --seconds 12 \
  --requests "${COST_REQUESTS:-0.5,0.1}" 2>&1 | tee "$OUT/cost-log.txt"
timeout 260 python3 benchmarks/pm_overhead.py --out "$OUT/defaults" --blocks "${OH_BLOCKS:-8}" \
  --block-s 12 --settle-s 4 2>&1 | tee "$OUT/overhead-log.txt"
[ -n "${OH_NVML:-1}" ] && timeout 150 python3 benchmarks/pm_overhead.py --out "$OUT/nvml" \
  --skip-profiler --daemon-args "--counters nvml" --blocks "${OH_BLOCKS:-8}" --block-s 12 \
  --settle-s 4 2>&1 | tee "$OUT/overhead-nvml-log.txt"
