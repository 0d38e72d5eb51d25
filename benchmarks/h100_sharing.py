"""What the counters show while two processes time-slice one GPU (run 9).

Run on the GPU machine from the repository root:

    PYTHONPATH=. python3 benchmarks/h100_sharing.py --out $OUT

The daemon's GPU total reads 10-13% high during the shared part of runs 1-5, and NVML's
per-process SM utilisation is coarse (values like 1/5, 1/3, 2/5). This script records, at 100 ms,
every GPM metric that could explain or correct either: the activity ratios the daemon uses, the
graphics engine's context-switch metrics (GR0_CTXSW_*, ids 170-174) and the cumulative cycle
metrics (ids 248-260), with the SM clock read every 10 ms. Scenarios start both workers at the
same instant and run them for the same time, so each process's true count and the shared span
are known exactly. It also probes other per-process sources: the v1 processes-utilization call,
accounting mode (read only; never changed), and /proc/<pid>/fdinfo.

Writes raw.json (every interval, every per-process sample, every scenario's truth) under --out
and prints a table last. Analysis of the raw file: benchmarks/sharing_analysis.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pynvml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from mps import mps_daemon  # noqa: E402

WORKER = str(ROOT / "benchmarks" / "gemm_worker.py")
PY = sys.executable

ACTIVITY = {1: "graphics", 2: "sm_active", 3: "sm_occupancy", 5: "tensor_any", 7: "hmma",
            9: "imma", 6: "dfma", 11: "fp64", 12: "fp32", 13: "fp16"}
CTXSW = {170: "ctxsw_cycles_elapsed", 171: "ctxsw_cycles_active", 172: "ctxsw_requests",
         173: "ctxsw_cycles_per_req", 174: "ctxsw_active_pct"}
CYCLES = {248: "sm_cycles_elapsed", 249: "sm_cycles_active", 252: "hmma_cycles_active",
          259: "fp32_cycles_active"}

# cumulative ns: SW power cap, thermal, sync boost, SW/HW thermal, HW power brake slowdown
FIELDS = [74, 75, 76, 269, 270, 271]

SCENARIOS = [
    # name, [(phase, seconds)...] started together
    ("solo_bf16", ["bf16"], 6.0),
    ("same_bf16", ["bf16", "bf16"], 8.0),
    ("bf16_vs_mid", ["bf16", "bf16_mid"], 8.0),
    ("small_vs_bf16", ["bf16_small", "bf16"], 8.0),
    ("mlp_vs_fp32", ["bf16_mlp", "fp32"], 8.0),
    ("three_bf16", ["bf16", "bf16", "bf16_mid"], 8.0),
    ("solo_fp32", ["fp32"], 6.0),
    ("solo_small", ["bf16_small"], 6.0),
]


class Recorder(threading.Thread):
    def __init__(self, metric_ids: list[int], period: float = 0.1, throttle: bool = False) -> None:
        super().__init__(daemon=True)
        self.throttle = throttle
        self.h = pynvml.nvmlDeviceGetHandleByIndex(0)
        self.ids = metric_ids
        self.period = period
        self.rows: list[dict] = []
        self.putil: list[list] = []
        self.putil_v1: list[list] = []
        self.stop = threading.Event()
        self.errors: dict[str, int] = {}

    def _metrics(self, s1, s2) -> dict:  # type: ignore[no-untyped-def]
        out: dict = {}
        for chunk in (self.ids[i:i + 20] for i in range(0, len(self.ids), 20)):
            mg = pynvml.c_nvmlGpmMetricsGet_t()
            mg.version = pynvml.NVML_GPM_METRICS_GET_VERSION
            mg.numMetrics = len(chunk)
            for i, m in enumerate(chunk):
                mg.metrics[i].metricId = m
            mg.sample1, mg.sample2 = s1, s2
            pynvml.nvmlGpmMetricsGet(mg)
            for i, m in enumerate(chunk):
                r = mg.metrics[i]
                out[str(m)] = r.value if r.nvmlReturn == 0 else f"err{r.nvmlReturn}"
        return out

    def _fields(self) -> dict:
        """Cumulative clock-event durations (ns), violation times and energy (mJ)."""
        out: dict = {}
        try:
            vals = pynvml.nvmlDeviceGetFieldValues(self.h, FIELDS)
            for fid, v in zip(FIELDS, vals, strict=True):
                out[f"f{fid}"] = v.value.ullVal if v.nvmlReturn == 0 else f"err{v.nvmlReturn}"
        except pynvml.NVMLError as e:
            out["fields_error"] = str(e)
        for pol in range(6):
            try:
                out[f"viol{pol}"] = pynvml.nvmlDeviceGetViolationStatus(self.h, pol).violationTime
            except pynvml.NVMLError as e:
                out[f"viol{pol}"] = str(e)
        with contextlib.suppress(pynvml.NVMLError):
            out["energy_mj"] = pynvml.nvmlDeviceGetTotalEnergyConsumption(self.h)
        return out

    def run(self) -> None:
        s = [pynvml.nvmlGpmSampleAlloc(), pynvml.nvmlGpmSampleAlloc()]
        pynvml.nvmlGpmSampleGet(self.h, s[0])
        cur, t_prev = 0, time.time()
        last_pu = 0
        last_v1 = 0
        while not self.stop.is_set():
            clocks, reasons = [], []
            t_end = t_prev + self.period
            while time.time() < t_end - 0.005:
                clocks.append(pynvml.nvmlDeviceGetClockInfo(self.h, pynvml.NVML_CLOCK_SM))
                if self.throttle:
                    with contextlib.suppress(pynvml.NVMLError):
                        reasons.append(pynvml.nvmlDeviceGetCurrentClocksEventReasons(self.h))
                time.sleep(0.01)
            time.sleep(max(0.0, t_end - time.time()))
            nxt = 1 - cur
            pynvml.nvmlGpmSampleGet(self.h, s[nxt])
            t = time.time()
            try:
                m = self._metrics(s[cur], s[nxt])
            except pynvml.NVMLError as e:
                m = {"error": str(e)}
            row = {"t0": t_prev, "t1": t, "clock_mhz": sum(clocks) / max(1, len(clocks)),
                   "clock_reads": len(clocks), "m": m}
            if self.throttle:
                row["reasons"] = reasons
                row["fields"] = self._fields()
            self.rows.append(row)
            cur, t_prev = nxt, t
            with contextlib.suppress(pynvml.NVMLError):
                for u in pynvml.nvmlDeviceGetProcessUtilization(self.h, last_pu):
                    self.putil.append([t, u.pid, u.timeStamp / 1e6, u.smUtil, u.memUtil])
                    last_pu = max(last_pu, u.timeStamp)
            try:
                for u in pynvml.nvmlDeviceGetProcessesUtilizationInfo(self.h, last_v1):
                    self.putil_v1.append([t, u.pid, u.timeStamp / 1e6, u.smUtil, u.memUtil])
                    last_v1 = max(last_v1, u.timeStamp)
            except Exception as e:
                k = type(e).__name__ + ":" + str(e)
                self.errors[k] = self.errors.get(k, 0) + 1


def fdinfo(pid: int) -> list[str]:
    out = []
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fdinfo"):
            with contextlib.suppress(OSError):
                text = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if "nvidia" in target or "drm" in text:
                    out.append(f"{fd} -> {target}: {text.strip()[:400]}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/gpuflops-sharing"))
    ap.add_argument("--only", default="", help="comma-separated scenario names")
    ap.add_argument("--mps", action="store_true",
                    help="run the workers as clients of an MPS control daemon started (and quit) "
                         "here; the GPU's compute mode and settings are not touched")
    ap.add_argument("--throttle", action="store_true",
                    help="also read clock-event reasons every 10 ms and throttle counters")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    a.work.mkdir(parents=True, exist_ok=True)
    pynvml.nvmlInit()
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    probes: dict = {"driver": pynvml.nvmlSystemGetDriverVersion(), "gpu": pynvml.nvmlDeviceGetName(h)}
    try:
        probes["accounting_mode"] = pynvml.nvmlDeviceGetAccountingMode(h)
    except pynvml.NVMLError as e:
        probes["accounting_mode"] = str(e)
    with mps_daemon(a.work, dict(os.environ)) if a.mps else contextlib.nullcontext(
        dict(os.environ)
    ) as env:
        probes["mps"] = a.mps
        run_all(a, probes, env)


def run_all(a: argparse.Namespace, probes: dict, env: dict) -> None:
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    ids = sorted([*ACTIVITY, *CTXSW, *CYCLES])
    rec = Recorder(ids, throttle=a.throttle)
    rec.start()
    time.sleep(2.0)
    results = []
    chosen = [sc for sc in SCENARIOS if not a.only or sc[0] in a.only.split(",")]
    for name, phases, seconds in chosen:
        start = time.time() + 12.0
        files = [a.work / f"{name}-{i}.json" for i in range(len(phases))]
        procs = [
            subprocess.Popen([PY, WORKER, str(f), ph, "--seconds", str(seconds), "--start-at",
                              str(start), "--gap", "0.5"], env=env)
            for f, ph in zip(files, phases, strict=True)
        ]
        time.sleep(max(0.0, start + 2.0 - time.time()))
        if name == "same_bf16":
            probes["fdinfo"] = fdinfo(procs[0].pid)
            with contextlib.suppress(pynvml.NVMLError):
                probes["accounting_pids"] = list(pynvml.nvmlDeviceGetAccountingPids(h))
        for p in procs:
            p.wait()
        truth = [json.loads(f.read_text())[0] for f in files]
        results.append({"name": name, "processes": truth})
        print(name, [(t["name"], round(t["tflops_per_s"], 1)) for t in truth], flush=True)
        time.sleep(1.5)
    rec.stop.set()
    rec.join()
    probes["v1_errors"] = rec.errors
    raw = {"probes": probes, "metric_ids": ids, "intervals": rec.rows, "process_util": rec.putil,
           "process_util_v1": rec.putil_v1, "scenarios": results}
    (a.out / "raw.json").write_text(json.dumps(raw))
    print(json.dumps(probes, indent=1)[:3000])
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from sharing_analysis import report

    report(raw)


if __name__ == "__main__":
    main()
