"""Subprocess for the kill -9 test: appends intervals to a real ledger and logs each attempt.

Before each append it writes ``B <seq> <flops>`` to the side log and after the commit returns
``C <seq>``; both with os.write (no user-space buffer), so a SIGKILL cannot lose a log line that
the kernel accepted. Usage: ledger_writer.py LEDGER LOG PERIOD_S RUN_ID
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from gpuflops.ledger.store import Ledger
from gpuflops.model import FlopsRow


def main() -> None:
    path, log, period_s, run_id = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3]), sys.argv[4]
    ledger = Ledger.open(path, clock=time.time)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    sys.stdout.write("READY\n")
    sys.stdout.flush()
    i = 0
    while True:
        i += 1
        t1 = time.time()
        flops = 1e12 * (1 + i % 7)
        rows = [FlopsRow("0", "GPU-a", "hmma", "bf16", f"job-{run_id}", "prog", 100, flops),
                FlopsRow("1", "GPU-b", "hmma", "bf16", "shared", "prog", 101, flops / 2)]
        seq = ledger.head()[0] + 1
        os.write(fd, f"B {seq} {flops!r}\n".encode())
        got = ledger.append_interval(t1 - 0.1, t1, rows)
        os.write(fd, f"C {got}\n".encode())
        if period_s > 0:
            time.sleep(period_s)


if __name__ == "__main__":
    main()
