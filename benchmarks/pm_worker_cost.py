"""What one PM worker (``python -m gpuflops.sampler.cupti``) costs, by decode cadence.

Run on a GPU machine from the repository root (cupti-python carried as wheels, its CUPTI first
on LD_LIBRARY_PATH; benchmarks/run_h200_suite.sh shows how):

    PYTHONPATH=.:/tmp/site python3 benchmarks/pm_worker_cost.py --out $OUT

A bf16 GEMM loop (benchmarks/gemm_worker.py) keeps GPU 0 busy. For each decode cadence a
worker samples GPU 0 at the daemon's default period for ``--seconds``; we read its CPU time
(psutil), its memory (RSS, and USS/PSS: the pages that are its own, and its share of the
shared libraries), its GPU memory (NVML), and its own decode statistics (``--stats``).

Writes pm-worker-cost.json under --out and prints a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def measure(bus: str, period_s: float, decode_s: float, seconds: float) -> dict[str, Any]:
    import psutil
    import pynvml

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get(
        "PYTHONPATH", "")]))
    proc = subprocess.Popen(
        [PY, "-m", "gpuflops.sampler.cupti", "--bus", bus, "--period", repr(period_s),
         "--decode-every", repr(decode_s), "--stats"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT, text=True)
    assert proc.stdout is not None
    first = proc.stdout.readline()
    if '"ready"' not in first:
        proc.kill()
        return {"error": first + (proc.stderr.read() if proc.stderr else "")[-2000:]}
    p = psutil.Process(proc.pid)
    time.sleep(2.0)  # the first decodes allocate their buffers
    c0, t0 = p.cpu_times(), time.monotonic()
    lines = 0
    end = t0 + seconds
    os.set_blocking(proc.stdout.fileno(), False)
    while time.monotonic() < end:
        time.sleep(0.2)
        chunk = proc.stdout.read() or ""
        lines += chunk.count("\n")
    c1, t1 = p.cpu_times(), time.monotonic()
    mem = p.memory_full_info()
    pynvml.nvmlInit()
    gpu_mem = 0
    h = pynvml.nvmlDeviceGetHandleByPciBusId(bus)
    for q in pynvml.nvmlDeviceGetComputeRunningProcesses(h):
        if q.pid == proc.pid:
            gpu_mem = int(q.usedGpuMemory or 0)
    threads = p.num_threads()
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=20)
    stats = next((json.loads(ln) for ln in err.splitlines() if ln.startswith('{"reads"')), None)
    wall = t1 - t0
    cpu = (c1.user + c1.system) - (c0.user + c0.system)
    return {"decode_s": decode_s, "period_s": period_s, "wall_s": wall,
            "cpu_core_share": cpu / wall, "samples_per_s": lines / wall,
            "rss": mem.rss, "uss": mem.uss, "pss": mem.pss, "threads": threads,
            "gpu_memory": gpu_mem, "stats": stats, "rc": proc.returncode}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--period", type=float, default=0.05)
    ap.add_argument("--decode", default="0.1,0.25,0.5")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    import pynvml

    pynvml.nvmlInit()
    bus = pynvml.nvmlDeviceGetPciInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).busId
    bus = bus.decode() if isinstance(bus, bytes) else bus
    cadences = [float(x) for x in a.decode.split(",")]
    total = len(cadences) * (a.seconds + 8) + 15
    gemm = subprocess.Popen([PY, str(ROOT / "benchmarks" / "gemm_worker.py"),
                             str(Path(tempfile.mkdtemp()) / "g.json"), "bf16", "--seconds",
                             str(total), "--gap", "0"], env=dict(os.environ,
                                                                 CUDA_VISIBLE_DEVICES="0"))
    time.sleep(8)
    rows = []
    for d in cadences:
        try:
            rows.append(measure(bus, a.period, d, a.seconds))
        except Exception as e:  # a benchmark records what failed and goes on
            rows.append({"decode_s": d, "error": repr(e)})
        (a.out / "pm-worker-cost.json").write_text(json.dumps(rows, indent=1))
    gemm.kill()
    print(f"\n{'decode s':>8} {'CPU %core':>9} {'read CPU %':>10} {'samples/s':>9} "
          f"{'RSS MiB':>8} {'USS MiB':>8} {'PSS MiB':>8} {'GPU MiB':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['decode_s']:>8} error: {r['error'][-300:]}")
            continue
        st = r["stats"] or {}
        read_share = st.get("read_cpu_s", 0) / max(st.get("cpu_since_ready_s", 1e-9), 1e-9)
        print(f"{r['decode_s']:>8} {100 * r['cpu_core_share']:>9.2f} {100 * read_share:>10.0f} "
              f"{r['samples_per_s']:>9.1f} {r['rss'] / 2**20:>8.0f} {r['uss'] / 2**20:>8.0f} "
              f"{r['pss'] / 2**20:>8.0f} {r['gpu_memory'] / 2**20:>8.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
