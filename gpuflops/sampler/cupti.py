"""CUPTI PM sampling sessions, opened with NVIDIA's cupti-python (13.3 or newer).

The only module that imports ``cupti`` and ``cuda.bindings``; sampler/pm.py says what the
counters mean and how they are used. Measured on an H200 (driver 580, run 21): a session needs
a CUDA context in its process, which takes 527 MiB of the GPU's memory.

Run as ``python -m gpuflops.sampler.cupti --bus BUS --period S``, this module is the PM worker
of one GPU (sampler/pm_worker.py says why and speaks its protocol): it opens the session,
prints ``{"ready": true}``, then one JSON line per decoded sample until SIGTERM.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TextIO

from gpuflops.sampler.pm import PM_METRICS, PmDevice, PmError

log = logging.getLogger(__name__)

# Seconds between decodes. Each decode builds a counter-data image and a metric evaluator
# (cupti-python's CounterData), which is most of the worker's CPU time.
DECODE_S = 0.1


def _preload(paths: Iterable[Path]) -> None:
    # CUPTI 13.3's profiler initialisation segfaulted on driver 580 unless its own libraries
    # and the nvperf ones were loaded into the global namespace first (run 21: what `import
    # torch` does as a side effect; loading libcudart alone did not help).
    for p in paths:
        ctypes.CDLL(str(p), mode=os.RTLD_GLOBAL)


def _cupti_libraries() -> list[Path]:
    """libnvperf_host, libnvperf_target and libcupti from the nvidia-cuda-cupti distribution
    whose version cupti-python was built for."""
    from importlib import metadata

    try:
        want = metadata.version("cupti-python")
        dist = metadata.distribution("nvidia-cuda-cupti")
    except metadata.PackageNotFoundError as e:
        raise PmError("not_installed", f"{e.name} is not installed (pip install "
                      "'gpuflops[cupti]')") from None
    have = dist.version
    if want.split(".")[:2] != have.split(".")[:2]:
        raise PmError("version_mismatch", f"cupti-python {want} needs nvidia-cuda-cupti "
                      f"{'.'.join(want.split('.')[:2])}.x, found {have}")
    files = {Path(str(f)).name: Path(str(dist.locate_file(f))) for f in dist.files or ()}
    order = ("libnvperf_host.so", "libnvperf_target.so")
    found = [files[n] for n in order if n in files]
    found += [p for n, p in files.items() if n.startswith("libcupti.so.")][:1]
    if len(found) != 3:
        raise PmError("not_installed", f"nvidia-cuda-cupti {have} lacks the profiler libraries")
    return found


def check_installed() -> None:
    """Raise PmError unless cupti-python and a matching CUPTI are installed; imports neither
    (the daemon asks this, its PM workers load them)."""
    import importlib.util

    _cupti_libraries()
    for module in ("cupti", "cuda.bindings"):
        if importlib.util.find_spec(module.split(".")[0]) is None:
            raise PmError("not_installed", f"{module} is not installed")


class CuptiOpener:
    """Opens PM sampling sessions with NVIDIA's cupti-python (13.3 or newer)."""

    def __init__(self, hardware_buffer_bytes: int = 32 << 20) -> None:
        self._buffer = hardware_buffer_bytes
        _preload(_cupti_libraries())
        try:
            from cuda.bindings import driver
            from cupti import pm_sampling
        except ImportError as e:
            raise PmError("not_installed", f"cupti-python is not usable: {e}") from None
        self._cu = driver
        self._pm = pm_sampling
        (err,) = driver.cuInit(0)
        if int(err) != 0:
            raise PmError("cuda_init", f"cuInit failed: {err}")

    def __call__(self, bus_id: str, period_s: float) -> PmDevice:
        cu = self._cu
        # NVML spells the domain with 8 hex digits, CUDA's own form has 4: try both.
        for form in (bus_id, bus_id[4:] if len(bus_id.split(":")[0]) == 8 else bus_id):
            err, dev = cu.cuDeviceGetByPCIBusId(form.encode())
            if int(err) == 0:
                break
        else:
            raise PmError("no_device", f"no CUDA device at {bus_id}: {err}")
        err, ctx = cu.cuDevicePrimaryCtxRetain(dev)
        if int(err) != 0:
            raise PmError("context", f"cannot create a CUDA context on {bus_id}: {err}")
        try:
            (err,) = cu.cuCtxSetCurrent(ctx)
            collector = self._pm.Collector(int(dev))
            collector.enable()
            collector.configure(metrics=list(PM_METRICS),
                                sampling_interval=int(period_s * 1e9),
                                hardware_buffer_size=self._buffer)
            collector.start()
        except (RuntimeError, ValueError, MemoryError, PermissionError) as e:
            cu.cuDevicePrimaryCtxRelease(dev)
            kind = "permission" if isinstance(e, PermissionError) else "counters_unavailable"
            raise PmError(kind, f"{type(e).__name__}: {e}") from None
        except Exception as e:  # cupti.cupti.cuptiError, whose module this file alone loads
            cu.cuDevicePrimaryCtxRelease(dev)
            raise PmError("cupti_error", f"{type(e).__name__}: {e}") from None
        return _CuptiSession(collector, cu, dev, ctx)


class _CuptiSession:
    pid = None  # in this process (the worker's)

    def __init__(self, collector: object, cu: object, dev: object, ctx: object) -> None:
        self._c = collector
        self._cu = cu
        self._dev = dev
        self._ctx = ctx

    def read(self, max_samples: int = 4096) -> list[tuple[int, int, float, float]]:
        self._cu.cuCtxSetCurrent(self._ctx)  # type: ignore[attr-defined]
        try:
            data = self._c.decode(max_samples=max_samples)  # type: ignore[attr-defined]
            return [(int(s.start_timestamp), int(s.end_timestamp), float(s.metric_values[0]),
                     float(s.metric_values[1])) for s in data]
        except Exception as e:  # cuptiError (see above), MemoryError on buffer overflow
            raise PmError("decode", f"{type(e).__name__}: {e}") from None

    def close(self) -> None:
        try:
            self._cu.cuCtxSetCurrent(self._ctx)  # type: ignore[attr-defined]
            self._c.stop()  # type: ignore[attr-defined]
        except Exception as e:
            log.debug("PM sampling stop: %s", e)
        finally:
            self._c.disable()  # type: ignore[attr-defined]
            self._cu.cuDevicePrimaryCtxRelease(self._dev)  # type: ignore[attr-defined]


def serve(open_session: Callable[[], PmDevice], period_s: float,
          out: TextIO | None = None, decode_s: float | None = None,
          stats: TextIO | None = None) -> int:
    """The worker loop: open, say ready, stream samples until SIGTERM; errors as one line.

    Samples are decoded every ``decode_s`` (default: every sample period, at most 0.1 s).
    ``stats`` (when given) gets one JSON line at exit with the decode count and the CPU seconds
    spent decoding (benchmarks/pm_worker_cost.py).
    """
    stream = out or sys.stdout
    reads = samples = 0
    read_cpu_s = cpu_ready = 0.0
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_a: stop.set())

    def say(obj: object) -> None:
        stream.write(json.dumps(obj) + "\n")
        stream.flush()

    try:
        session = open_session()
    except PmError as e:
        say({"error": e.kind, "detail": str(e)})
        return 1
    try:
        say({"ready": True})
        cpu_ready = time.process_time()
        every = decode_s if decode_s is not None else min(DECODE_S, period_s)
        while not stop.wait(every):
            c0 = time.process_time()
            got = session.read()
            read_cpu_s += time.process_time() - c0
            reads, samples = reads + 1, samples + len(got)
            for sample in got:
                say(list(sample))
    except PmError as e:
        say({"error": e.kind, "detail": str(e)})
        return 1
    except BrokenPipeError:  # the daemon went away
        return 0
    finally:
        session.close()
        if stats is not None:
            stats.write(json.dumps({"reads": reads, "samples": samples,
                                    "read_cpu_s": read_cpu_s,
                                    "cpu_since_ready_s": time.process_time() - cpu_ready}) + "\n")
            stats.flush()
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="PM sampling worker of one GPU (gpuflops daemon)")
    ap.add_argument("--bus", required=True, help="PCI bus id of the GPU, as NVML spells it")
    ap.add_argument("--period", type=float, required=True, help="PM sample period in seconds")
    ap.add_argument("--decode-every", type=float, default=None,
                    help="seconds between decodes of the hardware buffer (default: the sample "
                    f"period, at most {DECODE_S} s)")
    ap.add_argument("--stats", action="store_true", help="print decode statistics to stderr "
                    "at exit")
    a = ap.parse_args(argv)

    def open_session() -> PmDevice:
        return CuptiOpener()(a.bus, a.period)

    return serve(open_session, a.period, decode_s=a.decode_every,
                 stats=sys.stderr if a.stats else None)


if __name__ == "__main__":
    sys.exit(main())
