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

from benchmarks.ledger_wiring import socket_server
from gpuflops.client import JobReporter
from gpuflops.jobs.registry import JobRegistry


def measure(path: str, calls: int, acks: int) -> tuple[list[int], list[int]]:
    """add() latencies in the calling thread; then ``acks`` add-to-acknowledged latencies (an
    add, then flush() until the daemon has answered for it)."""
    samples = [0] * calls
    delivered = [0] * acks
    clock = time.perf_counter_ns
    with JobReporter("bench", "bench", socket_path=path, flush_interval_s=0.05,
                     close_timeout_s=1.0) as r:
        add = r.add
        for i in range(calls):
            t0 = clock()
            add(1.5e12, 4096.0, 0.0)
            samples[i] = clock() - t0
        r.flush(10.0)
        for i in range(acks):
            t0 = clock()
            add(1.5e12, 4096.0, 0.0)
            r.flush(10.0)
            delivered[i] = clock() - t0
    return sorted(samples), sorted(delivered)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--no-daemon", action="store_true")
    parser.add_argument("--acks", type=int, default=200,
                        help="then time this many adds until acknowledged (flush)")
    parser.add_argument("--ledger", action="store_true",
                        help="commit to a real ledger as the daemon does (replies wait for it)")
    args = parser.parse_args()
    path = os.path.join(tempfile.mkdtemp(dir="/tmp"), "lat.sock")
    if args.no_daemon:
        samples, acked = measure(path, args.calls, 0)
    else:
        registry = JobRegistry()
        with socket_server(path, registry, args.ledger):
            samples, acked = measure(path, args.calls, args.acks)
        job = registry.snapshot().job("bench")
        assert job is not None and job.adds == args.calls + args.acks, job
    n = len(samples)
    pct = {p: samples[min(n - 1, int(n * p / 100))] / 1000 for p in (50, 90, 99, 99.9)}
    line = (f"calls={n} daemon={'no' if args.no_daemon else 'yes'} "
            f"ledger={'yes' if args.ledger else 'no'} "
            + " ".join(f"p{p}={v:.2f}us" for p, v in pct.items())
            + f" max={samples[-1] / 1000:.1f}us")
    if acked:
        m = len(acked)
        line += (f" | add->acknowledged p50={acked[m // 2] / 1e6:.2f}ms "
                 f"p99={acked[min(m - 1, int(m * 0.99))] / 1e6:.2f}ms")
    print(line)


if __name__ == "__main__":
    main()
