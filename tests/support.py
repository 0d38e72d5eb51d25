"""What the tests share at import time; tests/conftest.py turns it into fixtures.

One demo trace (the H100 recording shipped in the package, loaded once), one fake clock, and
fake GPUs. Import it as ``tests.support``.
"""

from __future__ import annotations

import contextlib
import functools
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from gpuflops.model import GpuInfo
from gpuflops.sampler.trace import TraceEvent, TraceHeader, TraceInterval, load_trace

ROOT = Path(__file__).resolve().parents[1]
DEMO_TRACE = ROOT / "gpuflops" / "data" / "h100-demo.jsonl.gz"

Trace = tuple[TraceHeader, tuple[TraceInterval, ...], tuple[TraceEvent, ...]]
DemoTrace = Trace


@functools.cache
def trace(path: Path) -> Trace:
    """A recorded trace's header, intervals and ground-truth events (read once, immutable)."""
    header, intervals, events = load_trace(path)
    return header, tuple(intervals), tuple(events)


def demo_trace() -> DemoTrace:
    """The demo trace shipped in the package."""
    return trace(DEMO_TRACE)


class FakeClock:
    """Wall time that moves only when a test sets ``t`` or something sleeps on it."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def sleep(self, dt: float) -> None:
        self.t += max(dt, 0.0)


def fake_gpus(n: int = 2) -> list[GpuInfo]:
    """``n`` H100s ("0", "1", ...; uuids GPU-a, GPU-b, ...) with 132 SMs each."""
    return [GpuInfo(str(i), i, f"GPU-{chr(ord('a') + i)}", "H100", "hopper", 132) for i in range(n)]


@contextlib.contextmanager
def short_tmpdir() -> Iterator[Path]:
    """A directory under /tmp short enough for Unix socket paths (108-byte limit)."""
    path = tempfile.mkdtemp(dir="/tmp", prefix="gfe2e")
    try:
        yield Path(path)
    finally:
        shutil.rmtree(path, ignore_errors=True)
