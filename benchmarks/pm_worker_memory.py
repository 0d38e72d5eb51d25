"""Where a PM worker's host memory goes, step by step, and what can be given back.

Run on a GPU machine from the repository root (cupti-python carried as wheels, its CUPTI first
on LD_LIBRARY_PATH; benchmarks/run_h200_overhead.sh shows how):

    PYTHONPATH=.:/tmp/site python3 benchmarks/pm_worker_memory.py --out $OUT

One process does what a PM worker (sampler/cupti.py) does, one step at a time, on GPU 0 while a
bf16 GEMM loop keeps it busy: load CUPTI's libraries, import cupti-python, cuInit, retain the
primary context, enable, configure and start PM sampling, build the decoder, decode for a few
seconds, then ``malloc_trim(0)``. After each step it records RSS and USS (psutil) and the
resident memory of each mapping group (/proc/self/smaps: anonymous, heap, and each file).

Writes pm-worker-memory.json under --out and prints a table last: the memory after each step,
and the ten largest mapping groups at the end.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
MiB = 2**20


def smaps() -> dict[str, dict[str, int]]:
    """Resident and private bytes per mapping group."""
    groups: dict[str, dict[str, int]] = defaultdict(lambda: {"rss": 0, "private": 0})
    name = "[anon]"
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if not head:
                continue
            if "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
                name = head[5] if len(head) > 5 else "[anon]"
                name = os.path.basename(name) if name.startswith("/") else name
            elif head[0] == "Rss:":
                groups[name]["rss"] += int(head[1]) * 1024
            elif head[0] in ("Private_Clean:", "Private_Dirty:"):
                groups[name]["private"] += int(head[1]) * 1024
    return dict(groups)


def snapshot(step: str, rows: list[dict[str, Any]]) -> None:
    import psutil

    m = psutil.Process().memory_full_info()
    rows.append({"step": step, "t": time.time(), "rss": m.rss, "uss": m.uss, "pss": m.pss,
                 "groups": smaps()})
    print(f"{step:<28} RSS {m.rss / MiB:7.1f} MiB  USS {m.uss / MiB:7.1f} MiB", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--period", type=float, default=0.05)
    ap.add_argument("--decode-s", type=float, default=5.0)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    snapshot("python + psutil", rows)
    import pynvml

    pynvml.nvmlInit()
    bus = pynvml.nvmlDeviceGetPciInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).busId
    bus = bus.decode() if isinstance(bus, bytes) else bus
    gemm = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "gemm_worker.py"),
                             str(Path(tempfile.mkdtemp()) / "g.json"), "bf16", "--seconds",
                             str(a.decode_s + 40), "--gap", "0"],
                            env=dict(os.environ, CUDA_VISIBLE_DEVICES="0"))
    try:
        time.sleep(6)
        snapshot("pynvml", rows)
        from gpuflops.sampler import cupti as worker
        from gpuflops.sampler.pm import PM_METRICS

        snapshot("gpuflops.sampler.cupti", rows)
        worker._preload(worker._cupti_libraries())
        snapshot("CUPTI libraries loaded", rows)
        from cuda.bindings import driver as cu
        from cupti import pm_sampling

        snapshot("cupti-python imported", rows)
        cu.cuInit(0)
        snapshot("cuInit", rows)
        err, dev = cu.cuDeviceGetByPCIBusId(bus.encode())
        if int(err) != 0:
            err, dev = cu.cuDeviceGetByPCIBusId(bus[4:].encode())
        err, ctx = cu.cuDevicePrimaryCtxRetain(dev)
        cu.cuCtxSetCurrent(ctx)
        snapshot("primary context", rows)
        col = pm_sampling.Collector(int(dev))
        col.enable()
        snapshot("PM sampling enabled", rows)
        col.configure(metrics=list(PM_METRICS), sampling_interval=int(a.period * 1e9),
                      hardware_buffer_size=32 << 20)
        snapshot("configured", rows)
        col.start()
        snapshot("started", rows)
        dec = worker._Decoder(col)
        snapshot("decoder built", rows)
        n = 0
        t_end = time.monotonic() + a.decode_s
        while time.monotonic() < t_end:
            time.sleep(0.5)
            n += len(dec.read())
        snapshot(f"decoded {n} samples", rows)
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
        snapshot("malloc_trim(0)", rows)
        col.stop()
        dec.close()
        col.disable()
        cu.cuDevicePrimaryCtxRelease(dev)
        snapshot("closed", rows)
    finally:
        gemm.kill()
        (a.out / "pm-worker-memory.json").write_text(json.dumps(rows, indent=1))
    print(f"\n{'step':<28} {'RSS MiB':>8} {'USS MiB':>8} {'ΔRSS':>8}")
    prev = 0
    for r in rows:
        print(f"{r['step']:<28} {r['rss'] / MiB:>8.1f} {r['uss'] / MiB:>8.1f} "
              f"{(r['rss'] - prev) / MiB:>+8.1f}")
        prev = r["rss"]
    at = next(r for r in rows if r["step"].startswith("decoded"))
    print(f"\nlargest mapping groups after decoding: {'RSS MiB':>8} {'private MiB':>11}")
    for name, g in sorted(at["groups"].items(), key=lambda kv: -kv[1]["rss"])[:10]:
        print(f"  {name[:40]:<40} {g['rss'] / MiB:>8.1f} {g['private'] / MiB:>11.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
