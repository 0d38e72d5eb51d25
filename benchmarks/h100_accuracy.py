"""Accuracy, attribution, freshness and overhead of the gpuflops daemon on a real GPU.

Run on the GPU machine from the repository root:

    PYTHONPATH=. python3 benchmarks/h100_accuracy.py --out $OUT

1. Starts `gpuflops daemon --backend nvml` at default settings, recording its trace.
2. Runs GEMM phases of known FLOPs (benchmarks/gemm_worker.py) with idle padding, then two
   processes sharing the GPU, while scraping /metrics.
3. Compares the daemon's counters with the exact counts; also what `nvidia-smi` utilisation x
   datasheet peak x time would report.
4. Measures the daemon's CPU and memory and the slowdown of a GEMM loop beside it (daemon
   paused with SIGSTOP in alternate blocks, ABBA order).
Writes results.json, the annotated trace and logs under --out; prints a table last.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import pynvml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from mps import mps_daemon  # noqa: E402

from gpuflops.pipeline.integrate import Integrator  # noqa: E402
from gpuflops.rates import FAMILIES  # noqa: E402
from gpuflops.sampler.trace import TraceWriter, load_trace  # noqa: E402

PEAK_BF16_DENSE = 989.4e12  # H100 SXM datasheet, what utilisation x peak tools multiply by
WORKER = str(ROOT / "benchmarks" / "gemm_worker.py")
PY = sys.executable


def scrape(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    out: dict = {"gpu": {}, "proc": {}, "unattr": 0.0}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "gpuflops_gpu_flops_total":
                k = (s.labels["pipe"], s.labels["precision"])
                out["gpu"][k] = out["gpu"].get(k, 0.0) + s.value
            elif s.name == "gpuflops_process_flops_total":
                pid = int(s.labels["pid"])
                out["proc"][pid] = out["proc"].get(pid, 0.0) + s.value
            elif s.name == "gpuflops_unattributed_flops_total":
                out["unattr"] += s.value
            elif s.name == "gpuflops_attribution_timesliced_flops_total":
                out["sliced"] = out.get("sliced", 0.0) + s.value
            elif s.name == "gpuflops_attribution_shared_intervals_total":
                out.setdefault("split", {})[s.labels["method"]] = s.value
    return out


class Poller(threading.Thread):
    """Scrapes /metrics and reads NVML utilization.gpu (the 'nvidia-smi' number)."""

    def __init__(self, url: str, period: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.url, self.period = url, period
        self.scrapes: list[tuple[float, dict]] = []
        self.util: list[tuple[float, float]] = []
        self.stop = threading.Event()
        pynvml.nvmlInit()
        self.h = pynvml.nvmlDeviceGetHandleByIndex(0)

    def run(self) -> None:
        while not self.stop.is_set():
            t = time.time()
            with contextlib.suppress(OSError):
                self.scrapes.append((time.time(), scrape(self.url)))
            self.util.append((time.time(), pynvml.nvmlDeviceGetUtilizationRates(self.h).gpu / 100))
            self.stop.wait(max(0.0, self.period - (time.time() - t)))

    def at(self, t: float) -> dict:
        """Last scrape taken at or before t."""
        best = self.scrapes[0][1]
        for ts, s in self.scrapes:
            if ts > t:
                break
            best = s
        return best

    def smi_flops(self, t0: float, t1: float) -> float:
        total = 0.0
        for (ta, ua), (tb, _) in zip(self.util, self.util[1:], strict=False):
            lo, hi = max(ta, t0), min(tb, t1)
            if hi > lo:
                total += ua * PEAK_BF16_DENSE * (hi - lo)
        return total


def start_daemon(out: Path, listen: str, record: Path | None, extra: list[str]) -> subprocess.Popen:
    port = listen.rsplit(":", 1)[1]
    state = out / f"state-{port}"
    shutil.rmtree(state, ignore_errors=True)
    cmd = [PY, "-m", "gpuflops.cli", "daemon", "--backend", "nvml", "--listen", listen,
           "--socket", str(out / f"gpuflops-{port}.sock"), "--state-dir", str(state), *extra]
    if record:
        cmd += ["--record", str(record)]
    log = open(out / f"daemon-{listen.rsplit(':', 1)[1]}.log", "w")  # noqa: SIM115
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    url = f"http://{listen}/healthz"
    for _ in range(300):
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return p
        except OSError:
            time.sleep(0.1)
        if p.poll() is not None:
            raise SystemExit(f"daemon exited early, see {log.name}")
    raise SystemExit("daemon did not become healthy")


def delta(a: dict, b: dict) -> dict:
    return {k: b["gpu"].get(k, 0.0) - a["gpu"].get(k, 0.0) for k in set(a["gpu"]) | set(b["gpu"])}


def hmma_rescaled(d: dict, precision: str) -> float:
    """Daemon counts HMMA at bf16 by default; restate at the phase's known precision."""
    hop = FAMILIES["hopper"].rates
    total = 0.0
    for (pipe, prec), v in d.items():
        if pipe == "hmma":
            want = precision if precision in ("fp8", "fp16", "bf16", "tf32") else prec
            rate = hop[f"hmma:{want}"].flops_per_clock_per_sm
            total += v * rate / hop[f"hmma:{prec}"].flops_per_clock_per_sm
        else:
            total += v
    return total


def trace_flops(trace: Path, t0: float, t1: float, precision: str) -> float:
    header, intervals, _ = load_trace(trace)
    info = {g.key: g for g in header.gpus}
    integ = Integrator(lambda _k: precision if precision in ("fp8", "fp16", "bf16", "tf32") else "bf16")
    total = 0.0
    for iv in intervals:
        for s in iv.samples:
            if s.t1_s > t0 and s.t0_s < t1:
                total += integ.integrate(info[s.key], s).total
    return total


# Two processes on one GPU. A runs 12 s; B joins 3 s later for 6 s. "report": each worker
# reports its exact FLOPs through the job socket as it goes (the analytic split); "mps": the
# workers are clients of an MPS server started for the scenario (GPU settings untouched).
SHARED = [
    {"name": "staggered_reporting", "a": "bf16", "b": "bf16_mid", "report": True, "mps": False},
    {"name": "staggered_silent", "a": "bf16", "b": "bf16_mid", "report": False, "mps": False},
    {"name": "mlp_fp32_reporting", "a": "bf16_mlp", "b": "fp32", "report": True, "mps": False},
    {"name": "staggered_mps_reporting", "a": "bf16", "b": "bf16_mid", "report": True, "mps": True},
]


def run_shared(out: Path, listen: str, sc: dict) -> dict:
    port = listen.rsplit(":", 1)[1]
    env = dict(os.environ, GPUFLOPS_SOCKET=str(out / f"gpuflops-{port}.sock"),
               PYTHONPATH=str(ROOT))
    with mps_daemon(out, env) if sc["mps"] else contextlib.nullcontext(env) as env:
        start = time.time() + 8.0
        fa, fb = out / f"{sc['name']}-a.json", out / f"{sc['name']}-b.json"
        extra_a = ["--report", f"{sc['name']}-a"] if sc["report"] else []
        extra_b = ["--report", f"{sc['name']}-b"] if sc["report"] else []
        pa = subprocess.Popen([PY, WORKER, str(fa), sc["a"], "--seconds", "12", "--start-at",
                               str(start), *extra_a], env=env)
        pb = subprocess.Popen([PY, WORKER, str(fb), sc["b"], "--seconds", "6", "--start-at",
                               str(start + 3), *extra_b], env=env)
        pa.wait()
        pb.wait()
        time.sleep(6.0)  # shared intervals settle after attribution_hold_s
    procs = [json.loads(fa.read_text())[0], json.loads(fb.read_text())[0]]
    return {**sc, "processes": procs, "t_before": min(p["t0"] for p in procs) - 1.0,
            "t_after": time.time()}


def accuracy(out: Path, seconds: float, sharing_only: bool = False) -> dict:
    listen = "127.0.0.1:9450"
    raw_trace = out / "trace-raw.jsonl.gz"
    d = start_daemon(out, listen, raw_trace, [])
    poll = Poller(f"http://{listen}/metrics")
    poll.start()
    time.sleep(3.0)
    idle0, idle1 = time.time() - 2.5, time.time()
    phases_file = out / "phases.json"
    names = "bf16,fp16,tf32,fp8,fp64,fp32,bf16_small,bf16_mid,bf16_mlp"
    if not sharing_only:
        subprocess.run([PY, WORKER, str(phases_file), names, "--seconds", str(seconds)], check=True)
    else:
        phases_file.write_text("[]")
    shared_runs = [run_shared(out, listen, sc) for sc in SHARED]
    poll.stop.set()
    poll.join()
    d.send_signal(signal.SIGTERM)
    d.wait(timeout=30)

    phases = json.loads(phases_file.read_text())
    rows = []
    freshness = None
    for ph in phases:
        w0, w1 = ph["t0"] - 1.0, ph["t1"] + 1.0
        dd = delta(poll.at(w0), poll.at(w1 + 0.5))
        precision = ph["dtype"] if ph["dtype"] in ("fp8", "fp16", "bf16", "tf32") else "bf16"
        measured = hmma_rescaled(dd, precision)
        as_bf16 = sum(dd.values())
        tr = trace_flops(raw_trace, w0, w1, precision)
        smi = poll.smi_flops(ph["t0"], ph["t1"])
        rows.append(
            {
                **ph,
                "measured": measured,
                "measured_assuming_bf16": as_bf16,
                "trace_measured": tr,
                "ratio": measured / ph["flops"],
                "ratio_trace": tr / ph["flops"],
                "ratio_bf16_assumed": as_bf16 / ph["flops"],
                "smi_estimate": smi,
                "ratio_smi": smi / ph["flops"],
                "by_pipe": {f"{k[0]}:{k[1]}": v for k, v in dd.items() if v},
            }
        )
        if freshness is None:
            base = sum(poll.at(ph["t0"])["gpu"].values())
            for ts, s in poll.scrapes:
                if ts > ph["t0"] and sum(s["gpu"].values()) > base:
                    freshness = ts - ph["t0"]
                    break
    idle = sum(delta(poll.at(idle0), poll.at(idle1)).values())
    gaps = []
    for a, b in itertools.pairwise(phases):
        # the last interval of a phase ends up to one interval after t1: start after it
        gaps.append(sum(delta(poll.at(a["t1"] + 1.2), poll.at(b["t0"] - 0.1)).values()))
    # two-process attribution: process counters after settling, minus before the scenario
    shared_results = []
    for run in shared_runs:
        before, after = poll.at(run["t_before"]), poll.at(run["t_after"])
        procs = []
        for p in run["processes"]:
            got = after["proc"].get(p["pid"], 0.0) - before["proc"].get(p["pid"], 0.0)
            procs.append({**{k: v for k, v in p.items() if k != "series"},
                          "attributed": got, "ratio": got / p["flops"]})
        true = sum(p["flops"] for p in run["processes"])
        # true FLOPs done while both ran (B's span), from the workers' time courses
        b0, b1 = max(p["t0"] for p in run["processes"]), min(p["t1"] for p in run["processes"])
        both = sum(f for p in run["processes"] for t, f in p["series"] if b0 < t <= b1)
        gpu_total = sum(delta(before, after).values())
        shared_results.append({
            "name": run["name"], "report": run["report"], "mps": run["mps"], "processes": procs,
            "unattributed": after["unattr"] - before["unattr"],
            "gpu_total": gpu_total,
            "gpu_ratio": gpu_total / true,
            "split": {k: v - before.get("split", {}).get(k, 0.0)
                      for k, v in after.get("split", {}).items()},
            "timesliced_share": (after.get("sliced", 0.0) - before.get("sliced", 0.0)) / gpu_total,
            "true_share_both_running": both / true,
        })
    two = [dict(p, scenario=run["name"]) for run in shared_runs for p in run["processes"]]
    # annotated trace: the recorded intervals plus the ground truth as events
    header, intervals, _ = load_trace(raw_trace)
    w = TraceWriter(
        out / "h100-demo.jsonl.gz",
        list(header.gpus),
        header.interval_s,
        {**header.meta, "annotated_by": "benchmarks/h100_accuracy.py"},
    )
    events = [dict(kind="phase", **p) for p in phases] + [
        dict(kind="phase", shared=True, **p) for p in two
    ]
    events.append({"kind": "idle", "t0": idle0, "t1": idle1})
    for e in events:
        w.event(e)
    for iv in intervals:
        w.interval(list(iv.samples))
    w.close()
    return {
        "phases": rows,
        "idle_flops": idle,
        "inter_phase_idle_flops": gaps,
        "freshness_s": freshness,
        "shared": shared_results,
        "driver": pynvml.nvmlSystemGetDriverVersion(),
        "gpu": pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0)),
    }


def overhead(out: Path, blocks: int, block_s: float) -> dict:
    listen = "127.0.0.1:9451"
    d = start_daemon(out, listen, None, [])
    proc = psutil.Process(d.pid)
    time.sleep(2.0)
    start = time.time() + 6.0
    gap = 0.6
    wf = out / "overhead-blocks.json"
    worker = subprocess.Popen(
        [PY, WORKER, str(wf), ",".join(["bf16"] * blocks), "--seconds", str(block_s),
         "--start-at", str(start), "--gap", str(gap)]
    )
    pattern = ["on", "off", "off", "on"] * (blocks // 4 + 1)
    on_cpu, on_time, rss = 0.0, 0.0, []
    t = start
    for i in range(blocks):
        state = pattern[i]
        if state == "off":
            d.send_signal(signal.SIGSTOP)
        else:
            d.send_signal(signal.SIGCONT)
        c0 = sum(proc.cpu_times()[:2])
        w0 = time.time()
        t += block_s + 0.05
        # block boundaries drift a little with sync granularity; re-read from worker later
        time.sleep(max(0.0, t - time.time()))
        if state == "on":
            on_cpu += sum(proc.cpu_times()[:2]) - c0
            on_time += time.time() - w0
            rss.append(proc.memory_info().rss)
        t += gap - 0.05
        time.sleep(max(0.0, t - time.time()))
    d.send_signal(signal.SIGCONT)
    worker.wait()
    scraped = scrape(f"http://{listen}/metrics")
    d.send_signal(signal.SIGTERM)
    d.wait(timeout=30)
    res = json.loads(wf.read_text())
    on = [r["tflops_per_s"] for i, r in enumerate(res) if pattern[i] == "on"]
    off = [r["tflops_per_s"] for i, r in enumerate(res) if pattern[i] == "off"]
    slow = 1 - statistics.mean(on) / statistics.mean(off)
    return {
        "cpu_fraction_of_core": on_cpu / on_time,
        "rss_bytes_max": max(rss),
        "gemm_tflops_on": on,
        "gemm_tflops_off": off,
        "slowdown": slow,
        "slowdown_stderr": (statistics.pstdev(on + off) / (len(on) ** 0.5)) / statistics.mean(off),
        "scraped_total_flops": sum(scraped["gpu"].values()),
    }


def microcosts() -> dict:
    pynvml.nvmlInit()
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    s1, s2 = pynvml.nvmlGpmSampleAlloc(), pynvml.nvmlGpmSampleAlloc()
    mg = pynvml.c_nvmlGpmMetricsGet_t()
    mg.version = pynvml.NVML_GPM_METRICS_GET_VERSION
    ids = [5, 6, 7, 9, 11, 12, 13, 2, 3]
    mg.numMetrics = len(ids)
    for i, m in enumerate(ids):
        mg.metrics[i].metricId = m
    res: dict[str, float] = {}

    def cost(name: str, fn, n: int) -> None:  # type: ignore[no-untyped-def]
        c0 = time.process_time()
        for _ in range(n):
            fn()
        res[name + "_cpu_us"] = (time.process_time() - c0) / n * 1e6

    pynvml.nvmlGpmSampleGet(h, s1)
    time.sleep(0.11)

    def pair() -> None:
        pynvml.nvmlGpmSampleGet(h, s2)
        mg.sample1, mg.sample2 = s1, s2
        pynvml.nvmlGpmMetricsGet(mg)

    cost("gpm_sample_get", lambda: pynvml.nvmlGpmSampleGet(h, s2), 200)
    mg.sample1, mg.sample2 = s1, s2
    cost("gpm_metrics_get_9", lambda: pynvml.nvmlGpmMetricsGet(mg), 200)
    cost("gpm_pair_9", pair, 200)
    cost("clock_read", lambda: pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM), 2000)
    cost("process_list", lambda: pynvml.nvmlDeviceGetComputeRunningProcesses(h), 200)
    cost("utilization", lambda: pynvml.nvmlDeviceGetUtilizationRates(h), 200)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--blocks", type=int, default=12)
    ap.add_argument("--block-seconds", type=float, default=5.0)
    ap.add_argument("--skip-overhead", action="store_true")
    ap.add_argument("--sharing-only", action="store_true",
                    help="only the two-process scenarios (no single-process phases, no overhead)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/gpuflops-bench"))
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    a.work.mkdir(parents=True, exist_ok=True)
    results: dict = {} if a.sharing_only else {"micro": microcosts()}
    print("micro:", json.dumps(results.get("micro")), flush=True)
    results["accuracy"] = accuracy(a.work, a.seconds, a.sharing_only)
    shutil.copy(a.work / "h100-demo.jsonl.gz", a.out / "h100-demo.jsonl.gz")
    (a.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    if not (a.skip_overhead or a.sharing_only):
        results["overhead"] = overhead(a.work, a.blocks, a.block_seconds)
    for log in a.work.glob("daemon-*.log"):
        shutil.copy(log, a.out / log.name)
    workers = {f.name: json.loads(f.read_text()) for f in sorted(a.work.glob("*-[ab].json"))}
    (a.out / "shared-workers.json").write_text(json.dumps(workers))
    (a.out / "results.json").write_text(json.dumps(results, indent=1, default=str))

    acc = results["accuracy"]
    print(f"\nGPU {acc['gpu']} driver {acc['driver']}")
    print(f"{'phase':<12}{'TFLOP/s':>9}{'meas/true':>10}{'trace':>8}{'bf16-assumed':>13}{'smi x peak':>11}")
    for r in acc["phases"]:
        print(
            f"{r['name']:<12}{r['tflops_per_s']:>9.1f}{r['ratio']:>10.4f}{r['ratio_trace']:>8.4f}"
            f"{r['ratio_bf16_assumed']:>13.4f}{r['ratio_smi']:>11.3f}"
        )
    print(f"idle FLOPs: {acc['idle_flops']}  between phases: {acc['inter_phase_idle_flops']}")
    print(f"freshness: {acc['freshness_s']}")
    print(f"\n{'two processes':<25}{'A':>10}{'A/true':>8}{'B':>10}{'B/true':>8}{'GPU/true':>9}"
          f"{'unattr':>10}{'sliced':>8}{'both':>6}  intervals by method")
    for r in acc["shared"]:
        pa, pb = r["processes"]
        print(f"{r['name']:<25}{pa['name']:>10}{pa['ratio']:>8.4f}{pb['name']:>10}{pb['ratio']:>8.4f}"
              f"{r['gpu_ratio']:>9.4f}{r['unattributed']:>10.2e}{r['timesliced_share']:>8.3f}"
              f"{r['true_share_both_running']:>6.2f}  {r['split']}")
    if "overhead" in results:
        o = results["overhead"]
        print(
            f"overhead: cpu {o['cpu_fraction_of_core'] * 100:.3f}% of a core, rss "
            f"{o['rss_bytes_max'] / 2**20:.1f} MiB, gemm slowdown {o['slowdown'] * 100:.3f}% "
            f"(+-{o['slowdown_stderr'] * 100:.3f}%)"
        )


if __name__ == "__main__":
    main()
