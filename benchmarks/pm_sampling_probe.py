"""Which tensor-pipe counters can CUPTI PM sampling read, and how many FLOPs is one count? (run 21)

Run on the GPU machine from the repository root, with cupti-python carried as wheels:

    PYTHONPATH=.:/tmp/site python3 benchmarks/pm_sampling_probe.py --out $OUT

Steps, each one recorded even when a later one fails:
1. List every base metric PM sampling offers on this chip (``pm-metrics.txt``) and every metric
   ncu knows (``ncu-metrics.txt``).
2. Try each candidate counter alone in a PM-sampling configuration, then the chosen set together.
3. Sample the chosen set every 10 ms from this process while another process
   (benchmarks/gemm_worker.py) runs phases with exact FLOP counts: wgmma GEMMs, a GEMM with an
   odd leading dimension (an mma.sync kernel), flash attention, fp8, tf32, fp32. NVML's SM clock
   and GPM HMMA activity are read beside it, as the daemon reads them.
4. Count the same kernels with ncu (executed tensor ops and the cycle counters), so each PM
   count can be turned into FLOPs per count per instruction path.
5. Start ncu while PM sampling runs, to see what each side reports when the other holds the
   counters.

Prints a table last: per phase, each counter x its candidate rate / exact FLOPs.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
WORKER = str(ROOT / "benchmarks" / "gemm_worker.py")
PHASES = ["bf16", "bf16_vocab", "bf16_vocab_aligned", "sdpa", "fp8", "tf32", "fp32", "bf16_small"]

CANDIDATES = [
    "sm__cycles_elapsed.max",
    "sm__cycles_elapsed.sum",
    "sm__cycles_active.sum",
    "sm__pipe_tensor_cycles_active.sum",
    "smsp__pipe_tensor_cycles_active.sum",
    "sm__pipe_tensor_op_hmma_cycles_active.sum",
    "sm__pipe_tensor_op_gmma_cycles_active.sum",
    "sm__pipe_tensor_op_dmma_cycles_active.sum",
    "sm__pipe_tensor_op_imma_cycles_active.sum",
    "sm__pipe_shared_cycles_active.sum",
    "sm__inst_executed_pipe_tensor_op_gmma.sum",
    "sm__inst_executed_pipe_tensor_op_hmma.sum",
    "smsp__inst_executed_pipe_tensor_op_gmma.sum",
    "smsp__inst_executed_pipe_tensor_op_hmma.sum",
    "sm__pipe_fma_cycles_active.sum",
    "sm__pipe_fp64_cycles_active.sum",
    "sm__inst_executed_pipe_fma.sum",
    "gpc__cycles_elapsed.max",
    "gr__cycles_elapsed.max",
]
NCU_METRICS = [
    "gpu__time_duration.sum",
    "sm__cycles_elapsed.max",
    "sm__pipe_tensor_cycles_active.sum",
    "sm__pipe_tensor_op_hmma_cycles_active.sum",
    "sm__pipe_tensor_op_gmma_cycles_active.sum",
    "sm__inst_executed_pipe_tensor_op_gmma.sum",
    "sm__inst_executed_pipe_tensor_op_hmma.sum",
    "sm__ops_path_tensor_src_bf16_dst_fp32.sum",
    "sm__ops_path_tensor_src_fp8.sum",
    "sm__ops_path_tensor_src_fp8_dst_fp32.sum",
    "sm__ops_path_tensor_src_tf32_dst_fp32.sum",
    "sm__ops_path_tensor_src_fp16_dst_fp32.sum",
    "smsp__sass_thread_inst_executed_op_ffma_pred_on.sum",
    "smsp__sass_thread_inst_executed_op_fadd_pred_on.sum",
    "smsp__sass_thread_inst_executed_op_fmul_pred_on.sum",
]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cuda_context(index: int) -> Any:
    # With CUPTI 13.3 on driver 580, profiler initialisation segfaulted in a process holding
    # only a cuda-bindings context; after `import torch` it ran (run 21). CUPTI 13.0 (the
    # driver's own version) refused the 13.3 bindings' host structs.
    import torch  # noqa: F401
    from cuda.bindings import driver as cu

    (err,) = cu.cuInit(0)
    assert int(err) == 0, err
    err, dev = cu.cuDeviceGet(index)
    assert int(err) == 0, err
    err, ctx = cu.cuDevicePrimaryCtxRetain(dev)
    assert int(err) == 0, err
    (err,) = cu.cuCtxSetCurrent(ctx)
    assert int(err) == 0, err
    return ctx


def list_metrics(out: Path, res: dict[str, Any]) -> None:
    from cupti import pm_sampling, profiler_host
    from cupti.cupti import MetricType

    c = pm_sampling.Collector(0)
    c.enable()
    chip = c._chip_name
    c.disable()
    res["chip"] = chip
    host = profiler_host.ProfilerHost(chip, profiler_host.ProfilerType.PM_SAMPLING)
    host.initialize()
    names: list[str] = []
    for mt in (MetricType.COUNTER, MetricType.RATIO, MetricType.THROUGHPUT):
        try:
            names += [f"{mt.name}\t{n}" for n in host.get_base_metrics(mt)]
        except Exception as e:
            names.append(f"{mt.name}\tERROR {e!r}")
    props = {}
    for n in names:
        base = n.split("\t")[1]
        if re.search(r"tensor|gmma|hmma|cycles_elapsed", base):
            try:
                p = host.get_metric_properties(base)
                props[base] = p.description
            except Exception as e:
                props[base] = f"ERROR {e!r}"
    host.deinitialize()
    (out / "pm-metrics.txt").write_text("\n".join(names) + "\n")
    res["pm_tensor_metrics"] = props
    log(f"chip {chip}: {len(names)} PM base metrics; tensor-ish: {sorted(props)}")


def try_configs(res: dict[str, Any]) -> list[str]:
    from cupti import pm_sampling

    ok, refused = [], {}
    c = pm_sampling.Collector(0)
    c.enable()
    for m in CANDIDATES:
        try:
            c.configure(metrics=[m], sampling_interval=10_000_000, hardware_buffer_size=64 << 20)
            ok.append(m)
        except Exception as e:
            refused[m] = repr(e)[:200]
    want = [m for m in ok if not m.startswith(("gpc__", "gr__", "sm__cycles_elapsed.sum"))]
    chosen: list[str] = []
    for m in want:  # greedy: keep what still fits in one pass
        try:
            c.configure(metrics=[*chosen, m], sampling_interval=10_000_000,
                        hardware_buffer_size=64 << 20)
            chosen.append(m)
        except Exception as e:
            refused[f"+{m}"] = repr(e)[:200]
    c.disable()
    res["pm_ok"], res["pm_refused"], res["pm_chosen"] = ok, refused, chosen
    log(f"PM ok: {ok}\nPM refused: {list(refused)}\nchosen together: {chosen}")
    return chosen


class PmReader:
    """Decodes every ~0.2 s while running; keeps (start_ns, end_ns, values, host_ns_at_decode)."""

    def __init__(self, metrics: list[str]) -> None:
        from cupti import pm_sampling

        self.metrics = metrics
        self.c = pm_sampling.Collector(0)
        self.c.enable()
        self.c.configure(metrics=metrics, sampling_interval=10_000_000,
                         hardware_buffer_size=256 << 20)
        self.samples: list[tuple[int, int, list[float]]] = []
        self.decodes: list[tuple[int, int, int]] = []  # (host ns, last end ns, n)
        self.errors: list[str] = []
        self.decode_cpu_s = 0.0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self.c.start()
        self._t.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.decode_once()

    def decode_once(self) -> None:
        t_cpu = time.process_time()
        try:
            data = self.c.decode(max_samples=4096)
            got = [(s.start_timestamp, s.end_timestamp, list(s.metric_values)) for s in data]
        except Exception as e:
            self.errors.append(f"{time.time():.3f} {e!r}"[:300])
            return
        finally:
            self.decode_cpu_s += time.process_time() - t_cpu
        host = time.time_ns()
        self.samples += got
        if got:
            self.decodes.append((host, got[-1][1], len(got)))

    def stop(self) -> None:
        self._stop.set()
        self._t.join()
        self.decode_once()
        try:
            self.c.stop()
        except Exception as e:
            self.errors.append(f"stop {e!r}")
        self.c.disable()


class NvmlReader(threading.Thread):
    """NVML SM clock every 20 ms and GPM HMMA activity every 100 ms, as (t, value) pairs."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        import pynvml as n

        self.n = n
        n.nvmlInit()
        self.h = n.nvmlDeviceGetHandleByIndex(0)
        self.clock: list[tuple[float, float]] = []
        self.hmma: list[tuple[float, float, float]] = []
        self.stop_ev = threading.Event()

    def run(self) -> None:
        n = self.n
        bufs = [n.nvmlGpmSampleAlloc(), n.nvmlGpmSampleAlloc()]
        n.nvmlGpmSampleGet(self.h, bufs[0])
        t_prev, cur, next_gpm = time.time(), 0, time.time() + 0.1
        while not self.stop_ev.is_set():
            self.clock.append((time.time(), n.nvmlDeviceGetClockInfo(self.h, n.NVML_CLOCK_SM) * 1e6))
            if time.time() >= next_gpm:
                n.nvmlGpmSampleGet(self.h, bufs[1 - cur])
                t = time.time()
                mg = n.c_nvmlGpmMetricsGet_t()
                mg.version = n.NVML_GPM_METRICS_GET_VERSION
                mg.numMetrics = 1
                mg.sample1, mg.sample2 = bufs[cur], bufs[1 - cur]
                mg.metrics[0].metricId = 7  # HMMA tensor util
                n.nvmlGpmMetricsGet(mg)
                self.hmma.append((t_prev, t, mg.metrics[0].value / 100.0))
                t_prev, cur, next_gpm = t, 1 - cur, t + 0.1
            time.sleep(0.02)


def overlap(a0: float, a1: float, b0: float, b1: float) -> float:
    return max(0.0, min(a1, b1) - max(a0, b0))


def run_phases(out: Path, metrics: list[str], res: dict[str, Any]) -> None:
    reader = PmReader(metrics)
    nv = NvmlReader()
    nv.start()
    reader.start()
    time.sleep(1.0)
    wfile = Path(tempfile.mkdtemp()) / "worker.json"
    subprocess.run([PY, WORKER, str(wfile), ",".join(PHASES), "--seconds", "3", "--gap", "1"],
                   check=True, cwd=ROOT)
    time.sleep(0.5)
    reader.stop()
    nv.stop_ev.set()
    nv.join()
    phases = json.loads(wfile.read_text())
    # GPU timestamps -> host: the smallest (host at decode - newest end) is the offset, up to
    # one decode period of lag.
    offs = [h - e for h, e, _n in reader.decodes]
    off = min(offs) if offs else 0
    res["pm_offset_ns_min"], res["pm_offset_ns_max"] = (min(offs), max(offs)) if offs else (0, 0)
    res["pm_first_sample"] = reader.samples[0][:2] if reader.samples else None
    res["pm_decode_cpu_s"] = reader.decode_cpu_s
    res["pm_errors"] = reader.errors
    res["pm_samples"] = len(reader.samples)
    table = []
    for ph in phases:
        t0, t1 = ph["t0"], ph["t1"]
        row: dict[str, Any] = {"phase": ph["name"], "truth": ph["flops"],
                               "tflops": ph["tflops_per_s"]}
        sums = [0.0] * len(metrics)
        dur = 0.0
        for s0, s1, vals in reader.samples:
            a, b = (s0 + off) / 1e9, (s1 + off) / 1e9
            f = overlap(a, b, t0, t1) / max(b - a, 1e-9)
            if f <= 0:
                continue
            dur += f * (b - a)
            for i, v in enumerate(vals):
                sums[i] += f * v
        row["pm_seconds"] = dur
        for m, v in zip(metrics, sums, strict=True):
            row[m] = v
        clk = [c for t, c in nv.clock if t0 <= t <= t1]
        row["nvml_clock_mhz"] = sum(clk) / len(clk) / 1e6 if clk else None
        if "sm__cycles_elapsed.max" in metrics and dur > 0:
            row["pm_clock_mhz"] = sums[metrics.index("sm__cycles_elapsed.max")] / dur / 1e6
        # GPM HMMA x 132 SMs x 4096 x NVML clock, over the same span
        gpm = 0.0
        for a, b, u in nv.hmma:
            ov = overlap(a, b, t0, t1)
            if ov > 0:
                cks = [c for t, c in nv.clock if a <= t <= b] or [0.0]
                gpm += u * 132 * 4096 * (sum(cks) / len(cks)) * ov
        row["gpm_bf16_ratio"] = gpm / ph["flops"]
        table.append(row)
    res["phases"] = table
    (out / "pm-raw.json").write_text(json.dumps({"metrics": metrics, "samples": reader.samples,
                                                 "decodes": reader.decodes, "offset": off,
                                                 "phases": phases, "nvml_clock": nv.clock,
                                                 "gpm_hmma": nv.hmma}))


def ncu_metrics(out: Path, res: dict[str, Any]) -> list[str]:
    r = subprocess.run(["ncu", "--query-metrics", "--chip", "gh100"], capture_output=True, text=True)
    (out / "ncu-metrics.txt.gz").write_bytes(gzip.compress((r.stdout + r.stderr).encode()))
    known = {ln.split()[0] for ln in r.stdout.splitlines() if ln.strip()}
    use = [m for m in NCU_METRICS if m.rsplit(".", 1)[0] in known]
    res["ncu_metrics_used"] = use
    res["ncu_ops_path"] = sorted(k for k in known if "ops_path_tensor" in k)
    res["ncu_tensor_op"] = sorted(k for k in known if "tensor_op" in k or "gmma" in k)
    log(f"ncu metrics used: {use}")
    return use


def ncu_phases(out: Path, metrics: list[str], res: dict[str, Any]) -> None:
    rep = out / "ncu-phases.csv"
    wfile = Path(tempfile.mkdtemp()) / "ncu-worker.json"
    cmd = ["ncu", "--clock-control", "none", "--profile-from-start", "off", "--csv",
           "--page", "raw", "--metrics", ",".join(metrics), PY, WORKER, str(wfile),
           ",".join(PHASES), "--iters", "2"]
    t = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    res["ncu_seconds"] = time.time() - t
    rep.write_text(r.stdout)
    res["ncu_stderr_tail"] = r.stderr[-3000:]
    res["ncu_rc"] = r.returncode
    log(f"ncu rc {r.returncode} in {res['ncu_seconds']:.0f}s")


def contention(out: Path, metrics: list[str], res: dict[str, Any]) -> None:
    """PM sampling running, then ncu profiles a kernel: who gets the counters?"""
    reader = PmReader(metrics)
    reader.start()
    time.sleep(0.5)
    cmd = ["ncu", "--clock-control", "none", "--profile-from-start", "off",
           "--metrics", "sm__pipe_tensor_cycles_active.sum", PY, WORKER,
           str(Path(tempfile.mkdtemp()) / "cont-worker.json"), "bf16", "--iters", "2"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    time.sleep(0.5)
    n_before = len(reader.samples)
    time.sleep(0.6)
    reader.stop()
    res["contention"] = {"ncu_rc": r.returncode, "ncu_tail": (r.stdout + r.stderr)[-1500:],
                         "pm_errors": reader.errors[:20], "pm_samples": len(reader.samples),
                         "pm_samples_growing_after": len(reader.samples) - n_before}
    log(f"contention: {res['contention']}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {}
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        before = pynvml.nvmlDeviceGetMemoryInfo(h).used
        t = time.process_time()
        cuda_context(0)
        res["context_cpu_s"] = time.process_time() - t
        time.sleep(0.3)
        res["context_gpu_bytes"] = pynvml.nvmlDeviceGetMemoryInfo(h).used - before
        res["context_procs"] = [(p.pid, p.usedGpuMemory) for p in
                                pynvml.nvmlDeviceGetComputeRunningProcesses(h)]
        res["compute_mode"] = pynvml.nvmlDeviceGetComputeMode(h)
        log(f"context: {res['context_gpu_bytes'] / 2**20:.0f} MiB, procs {res['context_procs']}")
    except Exception:
        res["context_error"] = traceback.format_exc()[-2000:]
    steps = [
        ("list", lambda: list_metrics(a.out, res)),
        ("configs", lambda: res.__setitem__("_chosen", try_configs(res))),
        ("phases", lambda: run_phases(a.out, res.get("_chosen") or
                                      ["sm__cycles_elapsed.max", "sm__pipe_tensor_cycles_active.sum"], res)),
        ("ncu_list", lambda: res.__setitem__("_ncu", ncu_metrics(a.out, res))),
        ("ncu", lambda: ncu_phases(a.out, res.get("_ncu") or NCU_METRICS[:4], res)),
        ("contention", lambda: contention(a.out, res.get("_chosen") or
                                          ["sm__cycles_elapsed.max"], res)),
    ]
    for name, fn in steps:
        t = time.time()
        try:
            fn()
        except Exception:
            res[f"{name}_error"] = traceback.format_exc()[-3000:]
            log(f"{name} failed:\n{res[f'{name}_error']}")
        res[f"{name}_s"] = time.time() - t
        (a.out / "probe.json").write_text(json.dumps(res, indent=1, default=str))
    try:
        import pynvml

        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        res["rss_bytes"] = int(Path(f"/proc/{os.getpid()}/statm").read_text().split()[1]) * 4096
        res["procs_end"] = [(p.pid, p.usedGpuMemory) for p in
                            pynvml.nvmlDeviceGetComputeRunningProcesses(h)]
    except Exception:
        pass
    (a.out / "probe.json").write_text(json.dumps(res, indent=1, default=str))
    metrics = [m for m in (res.get("_chosen") or []) if "cycles_elapsed" not in m]
    print("\nphase                truth(TF)  pm_clk nvml_clk gpm_bf16  " +
          "  ".join(m.split("__")[1][:28] for m in metrics))
    for row in res.get("phases", []):
        cells = [f"{row.get(m, 0) / row['truth']:.4g}" for m in metrics]
        print(f"{row['phase']:<20} {row['truth'] / 1e12:9.1f} {row.get('pm_clock_mhz') or 0:7.0f} "
              f"{row.get('nvml_clock_mhz') or 0:7.0f} {row['gpm_bf16_ratio']:8.3f}  " + "  ".join(cells))
    print("(counter columns: counts per exact FLOP; x1024 = 1 for bf16 wgmma)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
