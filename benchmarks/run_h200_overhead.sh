#!/usr/bin/env bash
# One device call on an H200 machine: the PM worker's cost by request cadence, then the daemon's
# overhead at its defaults (PM workers included) and its yielding to Nsight Compute, then the
# overhead with NVML's clock only (--counters nvml), to tell PM sampling's share.
#   OUT=... bash benchmarks/run_h200_overhead.sh      (from the repository root, wheels in .whl/)
# PM_PERIOD (seconds, default the daemon's 0.05) sets the PM sample period of the worker and the
# daemon; OH_NVML=0 skips the NVML-only comparison, OH_PROFILER=0 the Nsight Compute part.
set -u
: "${OUT:?}"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1
# cupti-python 13.3 wants its own CUPTI, not the 13.0 one torch's environment carries.
export LD_LIBRARY_PATH=/tmp/site/nvidia/cu13/lib:${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name,driver_version,power.limit,compute_mode --format=csv | tee "$OUT/gpus.txt"
export GPUFLOPS_PM_PERIOD_S=${PM_PERIOD:-0.05}
timeout 100 python3 benchmarks/pm_worker_cost.py --out "$OUT" --seconds 12 \
  --period "$GPUFLOPS_PM_PERIOD_S" --requests "${COST_REQUESTS:-0.5,0.1}" 2>&1 | tee "$OUT/cost-log.txt"
timeout 260 python3 benchmarks/pm_overhead.py --out "$OUT/defaults" --blocks "${OH_BLOCKS:-8}" \
  $([ "${OH_PROFILER:-1}" = 0 ] && echo --skip-profiler) \
  --block-s 12 --settle-s 4 2>&1 | tee "$OUT/overhead-log.txt"
[ "${OH_NVML:-1}" != 0 ] && timeout 150 python3 benchmarks/pm_overhead.py --out "$OUT/nvml" \
  --skip-profiler --daemon-args "--counters nvml" --blocks "${OH_BLOCKS:-8}" --block-s 12 \
  --settle-s 4 2>&1 | tee "$OUT/overhead-nvml-log.txt"
