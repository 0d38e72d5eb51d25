"""Job socket throughput: N client processes send single-add messages over the real Unix socket.

Each client registers its own job, then sends ``--messages`` add messages (one JSON line each,
pipelined in windows of ``--window`` before reading the replies) and checks every reply is ok.
Throughput counts messages (requests answered), not coalesced adds. The server runs in this
process's thread exactly as in the daemon; the clients are separate processes.

    python3 benchmarks/socket_throughput.py --clients 32 --messages 20000
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks.ledger_wiring import socket_server
from gpuflops.jobs.registry import JobRegistry
from gpuflops.jobs.server import ServerLimits


def _client(path: str, index: int, messages: int, window: int, go: object, out: object) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    job = f"bench-{index}"
    reg = {"v": 1, "op": "register", "job": job, "program": "bench"}
    sock.sendall(json.dumps(reg).encode() + b"\n")
    assert json.loads(sock.recv(65536))["ok"]
    line = json.dumps({"v": 1, "op": "add", "job": job, "flops": 1.5e12, "tokens": 4096}).encode()
    chunk = (line + b"\n") * window
    go.wait()  # type: ignore[attr-defined]
    ok = 0
    sent = 0
    pending = b""
    waits: list[float] = []
    while sent < messages:
        n = min(window, messages - sent)
        t0 = time.perf_counter()
        sock.sendall(chunk if n == window else (line + b"\n") * n)
        sent += n
        got = 0
        while got < n:
            data = pending + sock.recv(65536)
            *replies, pending = data.split(b"\n")
            got += len(replies)
            ok += replies.count(b'{"ok":true}')
        waits.append(time.perf_counter() - t0)
    out.put((ok, waits))  # type: ignore[attr-defined]
    sock.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--messages", type=int, default=20_000, help="per client")
    parser.add_argument("--window", type=int, default=64, help="messages in flight per client")
    parser.add_argument("--ledger", action="store_true",
                        help="commit to a real ledger as the daemon does (replies wait for it)")
    args = parser.parse_args()
    path = os.path.join(tempfile.mkdtemp(dir="/tmp"), "bench.sock")
    registry = JobRegistry()
    limits = ServerLimits(rate_per_s=1e9, burst=1e9)
    ctx = mp.get_context("fork")
    go, out = ctx.Event(), ctx.Queue()
    with socket_server(path, registry, args.ledger, limits=limits) as server:
        procs = [
            ctx.Process(target=_client, args=(path, i, args.messages, args.window, go, out))
            for i in range(args.clients)
        ]
        for proc in procs:
            proc.start()
        time.sleep(1.0)  # let every client connect and register
        t0 = time.perf_counter()
        go.set()
        results = [out.get() for _ in procs]
        elapsed = time.perf_counter() - t0
        ok = sum(r[0] for r in results)
        waits = sorted(w for r in results for w in r[1])
        for proc in procs:
            proc.join()
        stats = server.stats()
    total = args.clients * args.messages
    snap = registry.snapshot()
    flops = sum(j.analytic_flops for j in snap.jobs)
    assert ok == total, f"{ok} ok replies of {total}"
    assert flops == total * 1.5e12, flops
    pct = {p: waits[min(len(waits) - 1, int(len(waits) * p / 100))] * 1000 for p in (50, 99)}
    print(
        f"clients={args.clients} window={args.window} ledger={'yes' if args.ledger else 'no'} "
        f"messages={total} ok={ok} errors={stats.messages_error} seconds={elapsed:.2f} "
        f"throughput={total / elapsed:,.0f} messages/s window_reply_p50={pct[50]:.2f}ms "
        f"p99={pct[99]:.2f}ms cpus={os.cpu_count()}"
    )


if __name__ == "__main__":
    main()
