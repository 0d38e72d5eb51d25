"""Is NVML's SM clock the clock the SMs actually ran at? (run 14)

Run on the GPU machine from the repository root:

    PYTHONPATH=. python3 benchmarks/clock_probe.py --out $OUT

gpuflops multiplies GPM activity by the SM clock NVML reports. Two errors remain that the
counters this driver exposes cannot explain: large bf16 GEMMs read about +2% on the H100, and
while two contexts time-slice the GPU the total reads 8-13% high (reported clock up 15%,
activity down 13%, throughput down 9%; runs 9-11). Both would follow if the reported clock ran
ahead of the real one. The cumulative cycle metrics that would settle it (GPM 248-260) answer
INVALID_ARGUMENT on driver 580, so this script measures the clock from inside the GPU instead.

A probe kernel (one warp, compiled at run time by torch's jiterator) reads %globaltimer and
%clock64, spins for a fixed number of SM cycles, and reads both again: cycles / nanoseconds is
the clock the SM it ran on actually ticked at. Workers run the GEMM phases of
benchmarks/gemm_worker.py with probes launched back to back on a second stream, so each probe
lands beside the real workload. Meanwhile the parent reads NVML's SM clock every 2 ms and GPM
activity every 100 ms. Per scenario it prints the probes' clock against NVML's over the same
spans, and the daemon's formula (activity x NVML clock) against the same formula with the
probes' clock, both over the exact FLOP count.

The probe costs the workload a little (one warp beside the GEMM's blocks, on one SM at a time),
which changes nothing this script compares: both clocks and the activity are read under the
same load. It is a measurement tool, not something the daemon could do: it needs a CUDA context
on the GPU, which would itself time-slice with every job.

Writes raw.json under --out and prints the table last.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
PY = sys.executable
PROBE_CYCLES = int(os.environ.get("PROBE_CYCLES", "15000000"))  # about 10 ms on the H100
PROBES_PER_BATCH = int(os.environ.get("PROBES_PER_BATCH", "2"))  # one batch is about 50 ms
# Start each probe after a random spin of up to this many seconds, so that probes sample the
# whole batch rather than its first milliseconds after a synchronisation.
PROBE_JITTER_S = float(os.environ.get("PROBE_JITTER_S", "0"))

# One element is the probe's start (globaltimer, ns since the driver's epoch); the other spins
# for `cycles` SM cycles and returns cycles per second, or -1 if the warp changed SM meanwhile.
PROBE_SRC = r"""
template <typename T> T clock_probe(T x, T cycles) {
  unsigned long long t0, t1;
  long long c0, c1;
  unsigned int s0, s1;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
  if (x < (T)0.5) return (T)t0;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(s0));
  asm volatile("mov.u64 %0, %%clock64;" : "=l"(c0));
  long long target = (long long)cycles;
  c1 = c0;
  while (c1 - c0 < target) { asm volatile("mov.u64 %0, %%clock64;" : "=l"(c1)); }
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t1));
  asm volatile("mov.u32 %0, %%smid;" : "=r"(s1));
  if (s0 != s1 || t1 <= t0) return (T)-1;
  return (T)((double)(c1 - c0) * 1e9 / (double)(t1 - t0));
}
"""

SCENARIOS_LIGHT = [
    # low-duty probes (PROBE_CYCLES=3e6, one per batch): the workload barely notices them
    ("bf16_noprobe", ["bf16"], 6.0),
    ("bf16", ["bf16+p"], 6.0),
    ("fp16", ["fp16+p"], 6.0),
    ("tf32", ["tf32+p"], 6.0),
    ("fp8", ["fp8+p"], 6.0),
    ("bf16_mid", ["bf16_mid+p"], 6.0),
    ("bf16_mlp", ["bf16_mlp+p"], 6.0),
    ("fp32", ["fp32+p"], 6.0),
    ("shared_bf16_mid", ["bf16+p", "bf16_mid"], 8.0),
    ("shared_noprobe", ["bf16", "bf16_mid"], 8.0),
    ("mps_bf16_mid", ["bf16+p", "bf16_mid"], 8.0),
]

SCENARIOS = [
    # name, phases (a trailing "+p" runs probes in that worker), seconds
    ("idle", ["idle+p"], 4.0),
    ("bf16", ["bf16+p"], 6.0),
    ("fp16", ["fp16+p"], 6.0),
    ("bf16_mid", ["bf16_mid+p"], 6.0),
    ("bf16_mlp", ["bf16_mlp+p"], 6.0),
    ("fp32", ["fp32+p"], 6.0),
    ("bf16_small", ["bf16_small+p"], 6.0),
    ("shared_bf16_mid", ["bf16+p", "bf16_mid"], 8.0),
    ("shared_mid_bf16", ["bf16_mid+p", "bf16"], 8.0),
]


# ----------------------------------------------------------------------------------- worker
def worker(out: str, phase: str, seconds: float, start_at: float) -> None:
    import torch
    from gemm_worker import PHASES, _operands

    probe_on = phase.endswith("+p")
    name = phase.removesuffix("+p")
    torch.cuda.init()
    torch.zeros(1, device="cuda")
    stream = torch.cuda.Stream(priority=-1)
    probes: list = []
    offset = None
    if probe_on:
        from torch.cuda.jiterator import _create_jit_fn

        fn = _create_jit_fn(PROBE_SRC, cycles=float(PROBE_CYCLES))
        xs = torch.tensor([0.0, 1.0], device="cuda", dtype=torch.float64)
        # globaltimer -> wall clock: a short probe between two host readings
        best = None
        for _ in range(20):
            h0 = time.time()
            r = fn(xs, cycles=1000.0)
            torch.cuda.synchronize()
            h1 = time.time()
            if best is None or h1 - h0 < best[0]:
                best = (h1 - h0, (h0 + h1) / 2 - float(r[0]) / 1e9)
        assert best is not None
        offset = best[1]
        fn(xs)  # warm
        torch.cuda.synchronize()
    mm = None if name == "idle" else _operands(*PHASES[name])
    flops_each = 0 if name == "idle" else 2 * PHASES[name][1] * PHASES[name][2] * PHASES[name][3]
    torch.cuda.synchronize()
    time.sleep(max(0.0, start_at - time.time()))
    count, batch = 0, 1
    t0 = time.time()
    while True:
        if probe_on:
            with torch.cuda.stream(stream):
                for _ in range(PROBES_PER_BATCH):
                    if PROBE_JITTER_S > 0:
                        torch.cuda._sleep(int(random.uniform(0, PROBE_JITTER_S) * 1.3e9))
                    probes.append(fn(xs))
        if mm is not None:
            for _ in range(batch):
                mm()
        torch.cuda.synchronize()
        count += batch
        elapsed = time.time() - t0
        if elapsed >= seconds:
            break
        if mm is not None and elapsed < 0.05 * count / batch:
            batch = min(batch * 2, 4096)
    t1 = time.time()
    spans = []
    for p in probes:
        start_ns, hz = (float(v) for v in p.cpu())
        spans.append([start_ns / 1e9 + offset, hz] if offset is not None else None)
    res = {"name": name, "t0": t0, "t1": t1, "products": count if mm else 0,
           "flops": float(flops_each) * count if mm else 0.0, "pid": os.getpid(),
           "probes": spans, "probe": probe_on}
    Path(out).write_text(json.dumps(res))


# ----------------------------------------------------------------------------------- parent
class ClockReader(threading.Thread):
    def __init__(self, period: float = 0.002) -> None:
        super().__init__(daemon=True)
        import pynvml

        self.nv = pynvml
        self.h = pynvml.nvmlDeviceGetHandleByIndex(0)
        self.period = period
        self.reads: list[tuple[float, float]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            mhz = self.nv.nvmlDeviceGetClockInfo(self.h, self.nv.NVML_CLOCK_SM)
            self.reads.append((time.time(), float(mhz)))
            time.sleep(self.period)


def clock_apis(h: object) -> dict:
    """Every NVML call that reports an SM clock, read once mid-scenario."""
    import pynvml

    out: dict = {}
    for cid in range(4):
        try:
            out[f"clock_id{cid}"] = pynvml.nvmlDeviceGetClock(h, pynvml.NVML_CLOCK_SM, cid)
        except pynvml.NVMLError as e:
            out[f"clock_id{cid}"] = str(e)
    for fn in ("nvmlDeviceGetCurrentClockFreqs", "nvmlDeviceGetPerformanceModes",
               "nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetPerformanceState"):
        try:
            out[fn] = str(getattr(pynvml, fn)(h))
        except Exception as e:  # record whatever this driver answers
            out[fn] = f"{type(e).__name__}: {e}"
    return out


def analyse(raw: dict) -> list[dict]:
    from sharing_analysis import _flops, _overlap

    reads = raw["clock_reads"]
    read_t = [t for t, _ in reads]  # in time order: one reader thread appended them
    rows = raw["intervals"]
    cycles = raw["info"]["probe_cycles"]
    out = []
    print(f"\n{'scenario':<17}{'TFLOP/s':>8}{'probes':>7}{'moved':>6}{'probe MHz':>10}"
          f"{'NVML MHz':>9}{'NVML/probe':>11}{'meas/true':>10}{'w/ probe clk':>13}{'hmma%':>7}")
    for sc in raw["scenarios"]:
        ps = sc["processes"]
        t0, t1 = min(p["t0"] for p in ps), max(p["t1"] for p in ps)
        true = sum(p["flops"] for p in ps)
        cyc = dur = nv_sum = 0.0
        n_ok = moved = 0
        for p in ps:
            for s in p.get("probes") or []:
                if s is None or not (t0 <= s[0] <= t1 - 0.05):
                    continue
                if s[1] <= 0:
                    moved += 1
                    continue
                d = cycles / s[1]
                lo, hi = bisect.bisect_left(read_t, s[0]), bisect.bisect_right(read_t, s[0] + d)
                sel = [mhz for _t, mhz in reads[lo:hi]]
                if not sel:
                    continue
                n_ok += 1
                cyc += cycles
                dur += d
                nv_sum += sum(sel) / len(sel) * d
        probe_mhz = cyc / dur / 1e6 if dur else float("nan")
        nvml_mhz = nv_sum / dur if dur else float("nan")
        meas = hm = 0.0
        n = 0
        for r in rows:
            w = _overlap(r, t0 - 0.3, t1 + 0.3)
            if w > 0:
                meas += _flops(r) * w
            if r["t0"] >= t0 + 0.3 and r["t1"] <= t1 - 0.3:
                hm += float(r["m"].get("7") or 0.0)
                n += 1
        ratio = meas / true if true else float("nan")
        corr = ratio * probe_mhz / nvml_mhz if dur and true else float("nan")
        tput = true / (t1 - t0) / 1e12
        res = {"name": sc["name"], "tflops": tput, "probes": n_ok, "moved": moved,
               "probe_mhz": probe_mhz, "nvml_mhz": nvml_mhz, "nvml_over_probe":
               nvml_mhz / probe_mhz if dur else None, "ratio": ratio, "ratio_probe_clock": corr,
               "hmma": hm / max(n, 1)}
        out.append(res)
        print(f"{sc['name']:<17}{tput:>8.1f}{n_ok:>7}{moved:>6}{probe_mhz:>10.1f}{nvml_mhz:>9.1f}"
              f"{nvml_mhz / probe_mhz:>11.4f}{ratio:>10.4f}{corr:>13.4f}{hm / max(n, 1):>7.1f}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path)
    ap.add_argument("--work", type=Path, default=Path("/tmp/gpuflops-clockprobe"))
    ap.add_argument("--only", default="")
    ap.add_argument("--worker", nargs=4, metavar=("OUT", "PHASE", "SECONDS", "START_AT"))
    ap.add_argument("--analyse", type=Path, help="re-run the analysis on a raw.json")
    ap.add_argument("--light", action="store_true",
                    help="the low-duty scenario list (run 15; set PROBE_CYCLES=3000000 "
                         "PROBES_PER_BATCH=1)")
    a = ap.parse_args()
    if a.worker:
        worker(a.worker[0], a.worker[1], float(a.worker[2]), float(a.worker[3]))
        return
    if a.analyse:
        import gzip

        opener = gzip.open if a.analyse.suffix == ".gz" else open
        with opener(a.analyse, "rt") as fh:
            analyse(json.load(fh))
        return
    import pynvml
    from h100_sharing import ACTIVITY, Recorder
    from mps import mps_daemon

    a.out.mkdir(parents=True, exist_ok=True)
    a.work.mkdir(parents=True, exist_ok=True)
    pynvml.nvmlInit()
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    info = {"driver": pynvml.nvmlSystemGetDriverVersion(), "gpu": pynvml.nvmlDeviceGetName(h),
            "probe_cycles": PROBE_CYCLES, "probes_per_batch": PROBES_PER_BATCH,
            "probe_jitter_s": PROBE_JITTER_S}
    rec = Recorder(sorted(ACTIVITY))
    clk = ClockReader()
    rec.start()
    clk.start()
    time.sleep(1.0)
    scenarios = []
    for name, phases, seconds in SCENARIOS_LIGHT if a.light else SCENARIOS:
        if a.only and name not in a.only.split(","):
            continue
        files = [a.work / f"{name}-{i}.json" for i in range(len(phases))]
        # "mps_" scenarios run their workers as clients of one MPS server: no time-slicing
        with mps_daemon(a.work, dict(os.environ)) if name.startswith("mps_") else (
            contextlib.nullcontext(dict(os.environ))
        ) as env:
            start = time.time() + 15.0
            procs = [subprocess.Popen([PY, __file__, "--worker", str(f), ph, str(seconds),
                                       str(start)], env=env)
                     for f, ph in zip(files, phases, strict=True)]
            time.sleep(max(0.0, start + 3.0 - time.time()))
            apis = clock_apis(h)
            codes = [p.wait() for p in procs]
        if any(codes):
            print(name, "worker failed", codes, flush=True)
            continue
        ps = [json.loads(f.read_text()) for f in files]
        scenarios.append({"name": name, "processes": ps, "clock_apis": apis})
        print(name, [(p["name"], len(p["probes"])) for p in ps], flush=True)
        time.sleep(1.0)
    rec.stop.set()
    clk.stop.set()
    rec.join()
    clk.join()
    raw = {"info": info, "intervals": rec.rows, "clock_reads": clk.reads, "scenarios": scenarios}
    import gzip

    with gzip.open(a.out / "raw.json.gz", "wt") as fh:
        json.dump(raw, fh)
    print(json.dumps(info))
    for sc in scenarios:
        print(sc["name"], json.dumps(sc["clock_apis"])[:600])
    res = analyse(raw)
    (a.out / "results.json").write_text(json.dumps({"info": info, "results": res}, indent=1))


if __name__ == "__main__":
    main()
