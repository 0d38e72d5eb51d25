"""A PM worker process whose CUPTI is a fake: run 21's recorded H200 samples, replayed in real
time from now (the real worker loop, ``gpuflops.sampler.cupti.serve``, around it).

    python pm_fake_worker.py MODE --bus B --period P     MODE: replay | refuse | hang | crash | deaf
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import sys
import time
from pathlib import Path

from gpuflops.sampler.cupti import serve
from gpuflops.sampler.pm import PmError

DATA = Path(__file__).resolve().parents[1] / "data" / "h200-pm-samples.json.gz"


class Replay:
    pid = None

    def __init__(self, crash_after_s: float | None = None) -> None:
        samples = json.loads(gzip.decompress(DATA.read_bytes()))["samples"][1:]  # not the long first
        shift = time.time_ns() - int(samples[0][0])
        self._samples = [(int(a) + shift, int(b) + shift, c, t) for a, b, c, t in samples]
        self._i = 0
        self._crash_at = None if crash_after_s is None else time.time() + crash_after_s

    def read(self) -> list[tuple[int, int, float, float]]:
        if self._crash_at is not None and time.time() > self._crash_at:
            os._exit(3)  # what a segfault in CUPTI looks like from outside
        now = time.time_ns()
        out = []
        while self._i < len(self._samples) and self._samples[self._i][1] <= now:
            out.append(self._samples[self._i])
            self._i += 1
        return out

    def close(self) -> None:
        pass


def _refuse() -> Replay:
    raise PmError("counters_unavailable", "RuntimeError: PM sampling is already enabled")


if __name__ == "__main__":
    mode, period = sys.argv[1], float(sys.argv[sys.argv.index("--period") + 1])
    if mode == "hang":
        time.sleep(3600)
    if mode == "deaf":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print(json.dumps({"ready": True}), flush=True)
        time.sleep(3600)
    opener = {"replay": Replay, "refuse": _refuse, "crash": lambda: Replay(0.5)}[mode]
    sys.exit(serve(opener, period))
