"""The job socket wired to a real ledger as the daemon wires it, for the socket benchmarks.

``--ledger``: registry events go to a ``LedgerSink`` on a real SQLite file (synchronous=NORMAL,
the daemon's default), a thread commits every 0.5 s as the sampling loop does, and, where this
gpuflops acknowledges a change only once it is committed, the server waits for the ledger.
Works on trees from before that change too (then replies do not wait), for before/after figures.
"""

from __future__ import annotations

import inspect
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from gpuflops.jobs.registry import JobRegistry
from gpuflops.jobs.server import JobSocketServer
from gpuflops.ledger.sink import LedgerSink
from gpuflops.ledger.store import Ledger


@contextmanager
def socket_server(path: str, registry: JobRegistry, ledger: bool,
                  **kw: Any) -> Iterator[JobSocketServer]:
    """A started server; with ``ledger``, its registry's events are committed to a ledger."""
    if not ledger:
        with JobSocketServer(registry, path, **kw) as server:
            yield server
        return
    led = Ledger.open(Path(tempfile.mkdtemp(dir="/tmp")) / "bench.sqlite3", clock=time.time,
                      synchronous="NORMAL")
    sink = LedgerSink(led)
    registry.on_event(sink.on_job_event)
    acks_wait = "durability" in inspect.signature(JobSocketServer).parameters
    if acks_wait:
        kw["durability"] = sink
    stop = threading.Event()

    def sampling_loop() -> None:  # what the daemon's sampling thread does every interval
        while not stop.wait(0.5):
            sink.commit([])

    loop = threading.Thread(target=sampling_loop, daemon=True)
    with JobSocketServer(registry, path, **kw) as server:
        if acks_wait:
            sink.on_durable(server.wake)
            sink.start()
        loop.start()
        try:
            yield server
        finally:
            stop.set()
            loop.join()
    sink.close()
