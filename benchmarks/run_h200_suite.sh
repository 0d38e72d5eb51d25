#!/usr/bin/env bash
# Run 23 on a two-GPU H200 machine, in one device call: the real-training suite (daemon-metered
# jobs, then ncu's executed tensor ops) and the daemon's overhead with PM sampling. Everything
# lands in $OUT as tarballs (the device returns at most 8 files).
#   OUT=... bash benchmarks/run_h200_suite.sh      (from the repository root, wheels in .whl/)
set -u
: "${OUT:?}"
W=/tmp/rt
mkdir -p "$W"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# cupti-python 13.3 wants its own CUPTI, not the 13.0 one torch's environment carries.
export SUITE_DAEMON_LD_LIBRARY_PATH=/tmp/site/nvidia/cu13/lib:${LD_LIBRARY_PATH:-}
start=$(date +%s)
nvidia-smi --query-gpu=name,driver_version,power.limit,compute_mode --format=csv | tee "$W/gpus.txt"
timeout 245 python3 benchmarks/real_training.py --out "$W" --phase metered 2>&1 | tee "$W/metered-log.txt"
tar czf "$OUT/metered.tgz" -C "$W" .
LD_LIBRARY_PATH=$SUITE_DAEMON_LD_LIBRARY_PATH timeout 140 python3 benchmarks/pm_overhead.py \
  --out "$W/overhead" --blocks 6 --block-s 10 --settle-s 4 2>&1 | tee "$W/overhead-log.txt"
tar czf "$OUT/metered.tgz" -C "$W" .
left=$((570 - $(date +%s) + start))
timeout "$left" python3 benchmarks/real_training.py --out "$W" --phase executed \
  --budget-s $((left - 10)) --jobs llama-v32000-sdpa-full,llama-v32001-sdpa-full,gpt2-v50257-sdpa-full,llama-v32000-sdpa-full-ckpt,llama-v32000-eager-full,llama-v32000-sdpa-lora,gpt2-v50257-eager-lora-ckpt \
  2>&1 | tee "$W/executed-log.txt"
tar czf "$OUT/all.tgz" -C "$W" .
