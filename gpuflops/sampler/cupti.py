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
import select
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TextIO

from gpuflops.sampler.pm import PM_METRICS, PmDevice, PmError

log = logging.getLogger(__name__)

# The worker decodes when the daemon asks (once per sampling interval), and on its own after
# this long without a request.
IDLE_DECODE_S = 1.0


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


# Samples one decode can hold; a decode that fills the image is followed by another at once.
DECODE_SAMPLES = 256


class _Decoder:
    """Decodes PM records into one counter-data image with one metric evaluator, both reused.

    cupti-python's ``Collector.decode`` builds a new image and a new ``ProfilerHost`` (the
    metric evaluator, which loads the chip's metric tables) on every call: 37 ms of CPU per
    decode on an H200 (run 25), 27% of a core at ten decodes a second. This does the same CUPTI
    calls (cuptiPmSamplingDecodeData, GetCounterDataInfo, GetSampleInfo, ProfilerHost
    EvaluateToGpuValues) with the image re-initialised in place between decodes. It needs the
    Collector's session handle, chip name and image builder, which cupti-python 13.3 keeps as
    private attributes: if they are missing, the caller uses ``Collector.decode``.
    """

    def __init__(self, collector: object) -> None:
        import cupti.cupti as c
        from cupti import profiler_host

        self._cc = c
        self._obj = int(collector._pm_sampling_object)  # type: ignore[attr-defined]
        self._image = collector._create_counter_data_image(DECODE_SAMPLES)  # type: ignore[attr-defined]
        self._metrics = list(PM_METRICS)
        self._host = profiler_host.ProfilerHost(collector._chip_name,  # type: ignore[attr-defined]
                                                profiler_host.ProfilerType.PM_SAMPLING)
        self._host.initialize()

    def _reset(self) -> None:
        c = self._cc
        p = c.PmSampling_CounterDataImage_Initialize_Params()
        p.struct_size = c.PM_SAMPLING_COUNTER_DATA_IMAGE_INITIALIZE_PARAMS_STRUCT_SIZE
        p.p_pm_sampling_object = self._obj
        p.counter_data_size = len(self._image)
        p.p_counter_data = self._image.ctypes.data
        c.pm_sampling_counter_data_image_initialize(p.ptr)

    def read(self) -> list[tuple[int, int, float, float]]:
        c = self._cc
        out: list[tuple[int, int, float, float]] = []
        for _ in range(64):  # at most 64 full images per read; the rest waits for the next
            self._reset()
            d = c.PmSampling_DecodeData_Params()
            d.struct_size = c.PM_SAMPLING_DECODE_DATA_PARAMS_STRUCT_SIZE
            d.p_pm_sampling_object = self._obj
            d.p_counter_data_image = self._image.ctypes.data
            d.counter_data_image_size = len(self._image)
            c.pm_sampling_decode_data(d.ptr)
            if d.overflow:
                raise PmError("overflow", "PM records overflowed the hardware buffer")
            info = c.PmSampling_GetCounterDataInfo_Params()
            info.struct_size = c.PM_SAMPLING_GET_COUNTER_DATA_INFO_PARAMS_STRUCT_SIZE
            info.p_counter_data_image = self._image.ctypes.data
            info.counter_data_image_size = len(self._image)
            c.pm_sampling_get_counter_data_info(info.ptr)
            for i in range(info.num_completed_samples):
                si = c.PmSampling_CounterData_GetSampleInfo_Params()
                si.struct_size = c.PM_SAMPLING_COUNTER_DATA_GET_SAMPLE_INFO_PARAMS_STRUCT_SIZE
                si.p_pm_sampling_object = self._obj
                si.p_counter_data_image = self._image.ctypes.data
                si.counter_data_image_size = len(self._image)
                si.sample_index = i
                c.pm_sampling_counter_data_get_sample_info(si.ptr)
                v = self._host.evaluate_metric_values(counter_data_image=self._image,
                                                      metrics=self._metrics, index=i)
                out.append((int(si.start_timestamp), int(si.end_timestamp), float(v[0]),
                            float(v[1])))
            if d.decode_stop_reason != int(c.PmSampling_DecodeStopReason.COUNTER_DATA_FULL):
                break
        return out

    def close(self) -> None:
        self._host.deinitialize()


class _CuptiSession:
    pid = None  # in this process (the worker's)

    def __init__(self, collector: object, cu: object, dev: object, ctx: object) -> None:
        self._c = collector
        self._cu = cu
        self._dev = dev
        self._ctx = ctx
        self._decoder: _Decoder | None = None
        try:
            self._decoder = _Decoder(collector)
        except (AttributeError, TypeError) as e:  # a cupti-python whose Collector differs
            log.warning("PM decode falls back to Collector.decode (slower): %s", e)

    def read(self) -> list[tuple[int, int, float, float]]:
        self._cu.cuCtxSetCurrent(self._ctx)  # type: ignore[attr-defined]
        try:
            if self._decoder is not None:
                return self._decoder.read()
            data = self._c.decode(max_samples=DECODE_SAMPLES)  # type: ignore[attr-defined]
            return [(int(s.start_timestamp), int(s.end_timestamp), float(s.metric_values[0]),
                     float(s.metric_values[1])) for s in data]
        except PmError:
            raise
        except Exception as e:  # cuptiError (see above), MemoryError on buffer overflow
            raise PmError("decode", f"{type(e).__name__}: {e}") from None

    def close(self) -> None:
        try:
            self._cu.cuCtxSetCurrent(self._ctx)  # type: ignore[attr-defined]
            self._c.stop()  # type: ignore[attr-defined]
        except Exception as e:
            log.debug("PM sampling stop: %s", e)
        finally:
            if self._decoder is not None:
                self._decoder.close()
            self._c.disable()  # type: ignore[attr-defined]
            self._cu.cuDevicePrimaryCtxRelease(self._dev)  # type: ignore[attr-defined]


def serve(open_session: Callable[[], PmDevice], period_s: float, *,
          out: TextIO | None = None, requests: int | None = None,
          idle_decode_s: float = IDLE_DECODE_S, stats: TextIO | None = None) -> int:
    """The worker loop: open, say ready, then decode on request until SIGTERM.

    The daemon asks for a decode by writing a line to ``requests`` (a file descriptor, default
    stdin) at the end of each sampling interval; the worker answers with the samples completed
    since the last decode, one JSON line each, then ``{"decoded": n}``. With no request for
    ``idle_decode_s`` it decodes anyway, so the hardware buffer never fills while the daemon is
    busy. Errors are one ``{"error": ...}`` line and the exit. ``stats`` (when given) gets one
    JSON line at exit: decodes, samples, and CPU seconds (benchmarks/pm_worker_cost.py).
    """
    stream = out or sys.stdout
    req_fd = sys.stdin.fileno() if requests is None else requests
    reads = samples = 0
    read_cpu_s = cpu_ready = 0.0
    stop = threading.Event()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
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
        due = time.monotonic() + idle_decode_s
        watch = [req_fd, wake_r]
        while not stop.is_set():
            ready, _w, _x = select.select(watch, [], [], max(0.0, due - time.monotonic()))
            if req_fd in ready and not os.read(req_fd, 4096):
                watch = [wake_r]  # requests closed: decode on the idle timer alone
            if wake_r in ready:
                os.read(wake_r, 512)  # a signal arrived: SIGTERM sets stop
            if stop.is_set():
                break
            if ready and req_fd not in ready:
                continue  # only the wake-up pipe
            c0 = time.process_time()
            got = session.read()
            read_cpu_s += time.process_time() - c0
            reads, samples = reads + 1, samples + len(got)
            for sample in got:
                stream.write(json.dumps(list(sample)) + "\n")
            say({"decoded": len(got)})
            due = time.monotonic() + idle_decode_s
    except PmError as e:
        say({"error": e.kind, "detail": str(e)})
        return 1
    except BrokenPipeError:  # the daemon went away
        return 0
    finally:
        session.close()
        signal.set_wakeup_fd(-1)
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
    ap.add_argument("--idle-decode", type=float, default=IDLE_DECODE_S,
                    help="decode after this many seconds without a request")
    ap.add_argument("--stats", action="store_true", help="print decode statistics to stderr "
                    "at exit")
    a = ap.parse_args(argv)

    def open_session() -> PmDevice:
        return CuptiOpener()(a.bus, a.period)

    return serve(open_session, a.period, idle_decode_s=a.idle_decode,
                 stats=sys.stderr if a.stats else None)


if __name__ == "__main__":
    sys.exit(main())
