"""JobReporter.add() latency in the calling (training) thread, with the sender thread running.

Measures each call with perf_counter_ns while a real daemon socket server receives the flushes
(or, with --no-daemon, while the reporter retries a missing socket), and prints percentiles.

    python3 benchmarks/client_add_latency.py --calls 200000
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from gpuflops.client import JobReporter
from gpuflops.jobs.registry import JobRegistry
from gpuflops.jobs.server import JobSocketServer


def measure(path: str, calls: int) -> list[int]:
    samples = [0] * calls
    clock = time.perf_counter_ns
    with JobReporter("bench", "bench", socket_path=path, flush_interval_s=0.05,
                     close_timeout_s=1.0) as r:
        add = r.add
        for i in range(calls):
            t0 = clock()
            add(1.5e12, 4096.0, 0.0)
            samples[i] = clock() - t0
    return sorted(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--no-daemon", action="store_true")
    args = parser.parse_args()
    path = os.path.join(tempfile.mkdtemp(dir="/tmp"), "lat.sock")
    if args.no_daemon:
        samples = measure(path, args.calls)
    else:
        registry = JobRegistry()
        with JobSocketServer(registry, path):
            samples = measure(path, args.calls)
        job = registry.snapshot().job("bench")
        assert job is not None and job.adds == args.calls, job
    n = len(samples)
    pct = {p: samples[min(n - 1, int(n * p / 100))] / 1000 for p in (50, 90, 99, 99.9)}
    print(
        f"calls={n} daemon={'no' if args.no_daemon else 'yes'} "
        + " ".join(f"p{p}={v:.2f}us" for p, v in pct.items())
        + f" max={samples[-1] / 1000:.1f}us"
    )


if __name__ == "__main__":
    main()
