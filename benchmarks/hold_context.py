"""Holds what a PM worker holds on GPU 0, and nothing more, until SIGTERM: to split its cost.

    PYTHONPATH=.:/tmp/site python3 benchmarks/hold_context.py context   # a CUDA context only
    PYTHONPATH=.:/tmp/site python3 benchmarks/hold_context.py pm        # + PM sampling, no decode

``benchmarks/pm_overhead.py --instead`` runs it in the "on" blocks in place of the daemon, so the
GEMM slowdown of each part is measured the same way as the daemon's. With ``pm`` the session
samples the daemon's two counters every ``--period`` seconds into a 32 MiB hardware buffer and is
never decoded (12 s at 50 ms is a few hundred records, far from filling it).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["context", "pm"])
    ap.add_argument("--period", type=float, default=0.05)
    a = ap.parse_args()
    from gpuflops.sampler import cupti as worker
    from gpuflops.sampler.pm import PM_METRICS

    worker._preload(worker._cupti_libraries())
    from cuda.bindings import driver as cu

    cu.cuInit(0)
    _err, dev = cu.cuDeviceGet(0)
    _err, ctx = cu.cuDevicePrimaryCtxRetain(dev)
    cu.cuCtxSetCurrent(ctx)
    col = None
    if a.what == "pm":
        from cupti import pm_sampling

        col = pm_sampling.Collector(int(dev))
        col.enable()
        col.configure(metrics=list(PM_METRICS), sampling_interval=int(a.period * 1e9),
                      hardware_buffer_size=32 << 20)
        col.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_a: stop.set())
    print("ready", flush=True)
    stop.wait()
    if col is not None:
        col.stop()
        col.disable()
    cu.cuDevicePrimaryCtxRelease(dev)
    return 0


if __name__ == "__main__":
    sys.exit(main())
