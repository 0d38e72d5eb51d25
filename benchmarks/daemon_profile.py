"""Where the daemon's CPU goes on a real GPU: per-thread CPU and a profile of the sampling loop.

    PYTHONPATH=. python3 benchmarks/daemon_profile.py --out $OUT [-- extra daemon flags]

Runs a GEMM loop, starts the daemon at default settings (plus the extra flags) under
GPUFLOPS_PROFILE, measures each thread's CPU over --seconds, stops it and prints the top of
the sampling loop's profile.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pstats
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
import h100_accuracy as acc


def measure(out: Path, name: str, port: int, extra: list[str], seconds: float) -> dict:
    prof = out / f"{name}.prof"
    os.environ["GPUFLOPS_PROFILE"] = str(prof)
    d = acc.start_daemon(out, f"127.0.0.1:{port}", None, extra)
    os.environ.pop("GPUFLOPS_PROFILE")
    p = psutil.Process(d.pid)
    time.sleep(2)
    t0 = time.time()
    th0 = {t.id: t.user_time + t.system_time for t in p.threads()}
    c0 = sum(p.cpu_times()[:2])
    time.sleep(seconds)
    th1 = {t.id: t.user_time + t.system_time for t in p.threads()}
    c1 = sum(p.cpu_times()[:2])
    wall = time.time() - t0
    d.send_signal(signal.SIGTERM)
    d.wait(timeout=30)
    threads = {
        ("main" if tid == d.pid else str(tid)): (th1[tid] - th0.get(tid, 0.0)) / wall for tid in th1
    }
    s = io.StringIO()
    pstats.Stats(str(prof), stream=s).sort_stats("tottime").print_stats(18)
    return {"name": name, "extra": extra, "cpu_fraction": (c1 - c0) / wall, "threads": threads,
            "profile_top": s.getvalue()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seconds", type=float, default=20.0)
    a = ap.parse_args()
    work = Path("/tmp/gpuflops-profile")
    work.mkdir(parents=True, exist_ok=True)
    variants = [
        ("default", ["--state-dir", str(work / "st1"), "--socket", str(work / "s1.sock")]),
        ("no-ledger", ["--no-ledger", "--socket", str(work / "s2.sock")]),
        ("no-ledger-no-socket", ["--no-ledger", "--no-socket"]),
    ]
    w = subprocess.Popen([acc.PY, acc.WORKER, str(work / "load.json"), "bf16",
                          "--seconds", str(len(variants) * (a.seconds + 6) + 5)])
    time.sleep(3)
    res = [measure(work, n, 9480 + i, x, a.seconds) for i, (n, x) in enumerate(variants)]
    w.terminate()
    w.wait()
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "profile.json").write_text(json.dumps(res, indent=1))
    for r in res:
        print(f"\n=== {r['name']}: {r['cpu_fraction'] * 100:.3f}% of a core; threads:",
              {k: f"{v * 100:.3f}%" for k, v in r["threads"].items()})
        print(r["profile_top"][:3500])


if __name__ == "__main__":
    main()
