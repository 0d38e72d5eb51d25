"""What one PM worker (``python -m gpuflops.sampler.cupti``) costs, by request cadence.

Run on a GPU machine from the repository root (cupti-python carried as wheels, its CUPTI first
on LD_LIBRARY_PATH; benchmarks/run_h200_suite.sh shows how):

    PYTHONPATH=.:/tmp/site python3 benchmarks/pm_worker_cost.py --out $OUT

A bf16 GEMM loop (benchmarks/gemm_worker.py) keeps GPU 0 busy. For each request cadence a
worker samples GPU 0 at the daemon's default period for ``--seconds`` and is asked for a decode
as the daemon asks (a line on its stdin, answered by the samples and ``{"decoded": n}``); we
read its CPU time
(psutil), its memory (RSS, and USS/PSS: the pages that are its own, and its share of the
shared libraries), its GPU memory (NVML), and its own decode statistics (``--stats``).

Writes pm-worker-cost.json under --out and prints a table last.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def measure(bus: str, period_s: float, request_s: float, seconds: float) -> dict[str, Any]:
    """One worker, asked for a decode every ``request_s`` as the daemon does every interval."""
    import psutil
    import pynvml

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get(
        "PYTHONPATH", "")]))
    proc = subprocess.Popen(
        [PY, "-m", "gpuflops.sampler.cupti", "--bus", bus, "--period", repr(period_s),
         "--stats"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=env, cwd=ROOT)
    assert proc.stdout is not None and proc.stdin is not None and proc.stderr is not None
    try:
        first = proc.stdout.readline().decode()
        if '"ready"' not in first:
            return {"request_s": request_s, "error": first}
        p = psutil.Process(proc.pid)
        fd = proc.stdout.fileno()
        os.set_blocking(fd, False)
        samples = answers = 0
        lat: list[float] = []
        c0, t0 = p.cpu_times(), time.monotonic()
        while time.monotonic() - t0 < seconds:
            time.sleep(request_s)
            sent = time.monotonic()
            proc.stdin.write(b"\n")
            proc.stdin.flush()
            buf = b""
            while b'"decoded"' not in buf and time.monotonic() - sent < 1.0:
                select.select([fd], [], [], 0.05)
                with contextlib.suppress(BlockingIOError):
                    buf += os.read(fd, 1 << 16)
            lat.append(time.monotonic() - sent)
            samples += buf.count(b"]\n")
            answers += buf.count(b'"decoded"')
        c1, t1 = p.cpu_times(), time.monotonic()
        mem = p.memory_full_info()
        pynvml.nvmlInit()
        gpu_mem = 0
        h = pynvml.nvmlDeviceGetHandleByPciBusId(bus)
        for q in pynvml.nvmlDeviceGetComputeRunningProcesses(h):
            if q.pid == proc.pid:
                gpu_mem = int(q.usedGpuMemory or 0)
        threads = p.num_threads()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    err = proc.stderr.read().decode(errors="replace")
    stats = next((json.loads(ln) for ln in err.splitlines() if ln.startswith('{"reads"')), None)
    wall = t1 - t0
    cpu = (c1.user + c1.system) - (c0.user + c0.system)
    lat.sort()
    return {"request_s": request_s, "period_s": period_s, "wall_s": wall,
            "cpu_core_share": cpu / wall, "samples_per_s": samples / wall, "answers": answers,
            "reply_p50_s": lat[len(lat) // 2], "reply_max_s": lat[-1],
            "rss": mem.rss, "uss": mem.uss, "pss": mem.pss, "threads": threads,
            "gpu_memory": gpu_mem, "stats": stats, "rc": proc.returncode,
            "stderr_tail": err[-500:]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--period", type=float, default=0.05)
    ap.add_argument("--requests", default="0.5,0.1",
                    help="seconds between decode requests (the daemon asks once an interval)")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    import pynvml

    pynvml.nvmlInit()
    bus = pynvml.nvmlDeviceGetPciInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).busId
    bus = bus.decode() if isinstance(bus, bytes) else bus
    cadences = [float(x) for x in a.requests.split(",")]
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
        except Exception:  # a benchmark records what failed and goes on
            import traceback

            rows.append({"request_s": d, "error": traceback.format_exc()[-1500:]})
        (a.out / "pm-worker-cost.json").write_text(json.dumps(rows, indent=1))
    gemm.kill()
    print(f"\n{'request s':>9} {'CPU %core':>9} {'read CPU %':>10} {'samples/s':>9} "
          f"{'reply ms':>8} {'RSS MiB':>8} {'USS MiB':>8} {'PSS MiB':>8} {'GPU MiB':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['request_s']:>9} error: {r['error'][-300:]}")
            continue
        st = r["stats"] or {}
        read_share = st.get("read_cpu_s", 0) / max(st.get("cpu_since_ready_s", 1e-9), 1e-9)
        print(f"{r['request_s']:>9} {100 * r['cpu_core_share']:>9.2f} {100 * read_share:>10.0f} "
              f"{r['samples_per_s']:>9.1f} {1e3 * r['reply_p50_s']:>8.1f} "
              f"{r['rss'] / 2**20:>8.0f} {r['uss'] / 2**20:>8.0f} "
              f"{r['pss'] / 2**20:>8.0f} {r['gpu_memory'] / 2**20:>8.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
