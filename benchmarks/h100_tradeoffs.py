"""Sampling trade-offs on a real GPU: CPU cost and accuracy per (interval, clock period),
NVML call costs under load, and two-process attribution scenarios.

    PYTHONPATH=. python3 benchmarks/h100_tradeoffs.py --out $OUT

Several daemons sample the same workload at once (GPM samples are snapshots of free-running
counters, so readers do not disturb each other; the 0.1 s/0.02 s daemon doubles as a check
against the single-daemon figures of benchmarks/h100_accuracy.py).
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pynvml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import h100_accuracy as acc

CONFIGS = [(0.1, 0.02), (0.1, 0.05), (0.1, 0.1), (0.2, 0.05), (0.5, 0.05)]
CPU_CONFIGS = [(0.1, 0.02), (0.1, 0.05), (0.1, 0.1), (0.2, 0.05), (0.2, 0.2), (0.5, 0.1)]
SCENARIOS = {
    # name: (process A phase, seconds, process B phase, B start offset, B seconds)
    "same_shape": ("bf16", 10, "bf16", 3, 5),
    "small_vs_big": ("bf16_small", 10, "bf16", 3, 5),
    "mlp_vs_fp32": ("bf16_mlp", 10, "fp32", 3, 5),
}


def daemon_args(interval: float, clock: float, state: Path, ledger: bool = True) -> list[str]:
    a = ["--interval", str(interval), "--no-socket"]
    cfg = state / f"cfg-{interval}-{clock}.toml"
    cfg.write_text(f"[daemon]\nclock_period_s = {clock}\n")
    a += ["--config", str(cfg)]
    a += ["--state-dir", str(state / f"ledger-{interval}-{clock}")] if ledger else ["--no-ledger"]
    return a


def micro_under_load(work: Path) -> dict:
    w = subprocess.Popen([acc.PY, acc.WORKER, str(work / "micro-load.json"), "bf16", "--seconds", "12"])
    time.sleep(4)
    res = acc.microcosts()
    w.wait()
    return res


def cpu_sweep(work: Path, seconds: float) -> list[dict]:
    out = []
    configs = [(*c, True) for c in CPU_CONFIGS] + [(0.1, 0.02, False)]
    n = len(configs)
    w = subprocess.Popen(
        [acc.PY, acc.WORKER, str(work / "cpu-load.json"), "bf16", "--seconds", str(n * (seconds + 3) + 4)]
    )
    time.sleep(3)
    for i, (interval, clock, ledger) in enumerate(configs):
        listen = f"127.0.0.1:{9500 + i}"
        d = acc.start_daemon(work, listen, None, daemon_args(interval, clock, work, ledger))
        p = psutil.Process(d.pid)
        time.sleep(1.0)
        c0, t0 = sum(p.cpu_times()[:2]), time.time()
        time.sleep(seconds)
        cpu = (sum(p.cpu_times()[:2]) - c0) / (time.time() - t0)
        rss = p.memory_info().rss
        d.send_signal(signal.SIGTERM)
        d.wait(timeout=30)
        out.append({"interval_s": interval, "clock_period_s": clock, "ledger": ledger,
                    "cpu_fraction": cpu, "rss_bytes": rss})
        print("cpu", out[-1], flush=True)
    w.terminate()
    w.wait()
    return out


def accuracy_sweep(work: Path, seconds: float) -> dict:
    daemons, polls = [], []
    for i, (interval, clock) in enumerate(CONFIGS):
        listen = f"127.0.0.1:{9460 + i}"
        rec = work / "trace-sweep.jsonl.gz" if i == 0 else None
        daemons.append(acc.start_daemon(work, listen, rec, daemon_args(interval, clock, work)))
        polls.append(acc.Poller(f"http://{listen}/metrics", period=0.25))
    for p in polls:
        p.start()
    time.sleep(2)
    pf = work / "sweep-phases.json"
    names = "bf16,fp16,tf32,fp8,fp64,fp32,bf16_small,bf16_mid,bf16_mlp"
    subprocess.run([acc.PY, acc.WORKER, str(pf), names, "--seconds", str(seconds)], check=True)
    shared = []
    for name, (a, sa, b, off, sb) in SCENARIOS.items():
        start = time.time() + 7.0
        fa, fb = work / f"{name}-a.json", work / f"{name}-b.json"
        pa = subprocess.Popen(
            [acc.PY, acc.WORKER, str(fa), a, "--seconds", str(sa), "--start-at", str(start)]
        )
        pb = subprocess.Popen(
            [acc.PY, acc.WORKER, str(fb), b, "--seconds", str(sb), "--start-at", str(start + off)]
        )
        pa.wait()
        pb.wait()
        shared.append((name, json.loads(fa.read_text()) + json.loads(fb.read_text())))
    time.sleep(6)
    for p in polls:
        p.stop.set()
        p.join()
    for d in daemons:
        d.send_signal(signal.SIGTERM)
        d.wait(timeout=30)
    phases = json.loads(pf.read_text())
    result: dict = {"configs": [], "scenarios": []}
    for (interval, clock), poll in zip(CONFIGS, polls, strict=True):
        rows = []
        for ph in phases:
            dd = acc.delta(poll.at(ph["t0"] - 1.0), poll.at(ph["t1"] + 1.5))
            precision = ph["dtype"] if ph["dtype"] in ("fp8", "fp16", "bf16", "tf32") else "bf16"
            rows.append({"name": ph["name"], "ratio": acc.hmma_rescaled(dd, precision) / ph["flops"]})
        result["configs"].append({"interval_s": interval, "clock_period_s": clock, "phases": rows})
    poll = polls[0]
    for name, procs in shared:
        t_before = min(p["t0"] for p in procs) - 1.0
        t_after = max(p["t1"] for p in procs) + 5.0
        before, after = poll.at(t_before), poll.at(t_after)
        result["scenarios"].append({
            "name": name,
            "processes": [
                {**p, "attributed": after["proc"].get(p["pid"], 0.0) - before["proc"].get(p["pid"], 0.0)}
                for p in procs
            ],
            "gpu_total": sum(acc.delta(before, after).values()),
            "unattributed": after["unattr"] - before["unattr"],
        })
    # annotate the trace with the ground truth for offline analysis
    header, intervals, _ = acc.load_trace(work / "trace-sweep.jsonl.gz")
    w = acc.TraceWriter(work / "h100-sweep.jsonl.gz", list(header.gpus), header.interval_s,
                        {**header.meta, "annotated_by": "benchmarks/h100_tradeoffs.py"})
    for ph in phases:
        w.event({"kind": "phase", **ph})
    for name, procs in shared:
        for p in procs:
            w.event({"kind": "phase", "shared": True, "scenario": name, **p})
    for iv in intervals:
        w.interval(list(iv.samples))
    w.close()
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/gpuflops-tradeoffs"))
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--cpu-seconds", type=float, default=10.0)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    a.work.mkdir(parents=True, exist_ok=True)
    res: dict = {"micro_idle": acc.microcosts()}
    res["micro_load"] = micro_under_load(a.work)
    print("micro idle", res["micro_idle"], "\nmicro load", res["micro_load"], flush=True)
    res["accuracy"] = accuracy_sweep(a.work, a.seconds)
    (a.out / "tradeoffs.json").write_text(json.dumps(res, indent=1))
    shutil.copy(a.work / "h100-sweep.jsonl.gz", a.out / "h100-sweep.jsonl.gz")
    res["cpu"] = cpu_sweep(a.work, a.cpu_seconds)
    (a.out / "tradeoffs.json").write_text(json.dumps(res, indent=1))
    pynvml.nvmlInit()
    print("\naccuracy (measured/true) by interval/clock period")
    names = [r["name"] for r in res["accuracy"]["configs"][0]["phases"]]
    print(f"{'config':<12}" + "".join(f"{n:>11}" for n in names))
    for c in res["accuracy"]["configs"]:
        cells = "".join(f"{r['ratio']:>11.4f}" for r in c["phases"])
        print(f"{c['interval_s']}/{c['clock_period_s']:<8}" + cells)
    print("\nattribution (attributed/true)")
    for s in res["accuracy"]["scenarios"]:
        print(s["name"], [(p["name"], round(p["attributed"] / p["flops"], 4)) for p in s["processes"]],
              "unattr", f"{s['unattributed']:.3e}")
    print("\ncpu under load")
    for c in res["cpu"]:
        print(c)


if __name__ == "__main__":
    main()
