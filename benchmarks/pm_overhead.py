"""The daemon's cost with PM sampling on, and what it does when a profiler wants the counters.

Run on a GPU machine from the repository root (cupti-python carried as wheels):

    PYTHONPATH=.:/tmp/site python3 benchmarks/pm_overhead.py --out $OUT

1. Overhead. A bf16 8192³ GEMM loop (benchmarks/gemm_worker.py) runs on every GPU for the whole
   measurement. The daemon, at its defaults, is started and stopped in alternate blocks
   (on, off, off, on, ... so slow drift cancels). The slowdown is 1 - mean TFLOP/s with the
   daemon / mean without, over the blocks' inner windows (each block's first seconds, while the
   daemon starts or stops, are not counted). CPU is the daemon's user + system time over its
   "on" windows (its PM worker processes included); RSS the largest resident set of the daemon
   and its workers together; GPU memory what NVML lists for those pids.
   With PM sampling off the GPU (SIGSTOP) the hardware would still sample, which is why the
   daemon is stopped rather than paused.
2. Profiler. With the daemon running, Nsight Compute profiles two GEMMs on GPU 0. The daemon
   should see the profiler's target, yield GPU counters to it (falling back to NVML's clock,
   never stopping), and take them back when it exits. /metrics is read every 0.25 s meanwhile.

Writes overhead.json under --out and prints a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
WORKER = str(ROOT / "benchmarks" / "gemm_worker.py")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def scrape(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    try:
        text = urllib.request.urlopen(url, timeout=5).read().decode()
    except OSError:
        return out
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


class Daemon:
    """The daemon, or with ``instead`` another command in its place (its cost alone)."""

    def __init__(self, state: Path, port: int, args: list[str] | None = None,
                 instead: list[str] | None = None) -> None:
        self.state, self.port, self.args, self.instead = state, port, args or [], instead
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"http://127.0.0.1:{port}/metrics"

    def start(self) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get(
            "PYTHONPATH", "")]))
        cmd = self.instead or [
            PY, "-m", "gpuflops", "daemon", "--listen", f"127.0.0.1:{self.port}",
            "--socket", str(self.state / "s.sock"), "--state-dir", str(self.state), *self.args]
        self.proc = subprocess.Popen(
            cmd,
            env=env, cwd=ROOT, stdout=(self.state / "daemon.log").open("ab"),
            stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.proc = None


def _cpu(p: Any) -> float:
    """User + system seconds of a process and its children (the PM workers), live and reaped."""
    total = 0.0
    for q in [p, *p.children(recursive=True)]:
        c = q.cpu_times()
        total += c.user + c.system + c.children_user + c.children_system
    return total


def gpu_memory_of(pid: int) -> dict[int, int]:
    import pynvml

    pynvml.nvmlInit()
    out = {}
    for i in range(pynvml.nvmlDeviceGetCount()):
        h = pynvml.nvmlDeviceGetHandleByIndex(i)
        for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h):
            if p.pid == pid:
                out[i] = int(p.usedGpuMemory or 0)
    return out


def overhead(out: Path, blocks: int, block_s: float, settle_s: float, res: dict[str, Any],
             daemon_args: list[str], instead: list[str] | None = None) -> None:
    import psutil
    import pynvml

    pynvml.nvmlInit()
    ngpu = pynvml.nvmlDeviceGetCount()
    total_s = blocks * block_s + 20
    tmp = Path(tempfile.mkdtemp())
    workers = []
    for g in range(ngpu):
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(g))
        workers.append(subprocess.Popen([PY, WORKER, str(tmp / f"gemm{g}.json"), "bf16",
                                         "--seconds", str(total_s), "--gap", "0"], env=env))
    time.sleep(10)  # worker start-up and the GEMM's first seconds
    state = Path(tempfile.mkdtemp(prefix="gpuflops-oh-"))
    d = Daemon(state, 9481, daemon_args, instead)
    order = ["on", "off", "off", "on"] * (blocks // 4 + 1)
    windows: list[tuple[str, float, float]] = []
    cpu_s = on_s = 0.0
    rss = 0
    gpu_mem: dict[int, int] = {}
    for kind in order[:blocks]:
        if kind == "on":
            d.start()
        t0 = time.time() + settle_s
        time.sleep(settle_s)
        cpu0 = None
        if kind == "on" and d.proc is not None:
            cpu0 = _cpu(psutil.Process(d.proc.pid))
        time.sleep(block_s - settle_s)
        t1 = time.time()
        if cpu0 is not None and d.proc is not None:
            p = psutil.Process(d.proc.pid)
            cpu_s += _cpu(p) - cpu0
            on_s += t1 - t0
            family = [p, *p.children(recursive=True)]  # the daemon and its PM workers
            rss = max(rss, sum(q.memory_info().rss for q in family))
            block_mem: dict[int, int] = {}
            for q in family:
                for gpu, used in gpu_memory_of(q.pid).items():
                    block_mem[gpu] = block_mem.get(gpu, 0) + used
            gpu_mem = {g: max(v, gpu_mem.get(g, 0)) for g, v in block_mem.items()}
            sources = scrape(d.url).get("gpuflops_gpu_counter_source", [])
            res.setdefault("sources_seen", []).append(sorted(
                f"{lab.get('gpu')}:{lab.get('source')}" for lab, v in sources if v == 1))
        windows.append((kind, t0, t1))
        if kind == "on":
            d.stop()
    for w in workers:
        w.wait()
    rates: dict[str, list[float]] = {"on": [], "off": []}
    for g in range(ngpu):
        series = json.loads((tmp / f"gemm{g}.json").read_text())[0]["series"]
        for kind, t0, t1 in windows:
            pts = [(t, f) for t, f in series if t0 <= t <= t1]
            if len(pts) > 2:
                flops = sum(f for _t, f in pts[1:])
                rates[kind].append(flops / (pts[-1][0] - pts[0][0]) / 1e12)
    on, off = statistics.mean(rates["on"]), statistics.mean(rates["off"])
    se = (statistics.pstdev(rates["on"]) ** 2 / len(rates["on"])
          + statistics.pstdev(rates["off"]) ** 2 / len(rates["off"])) ** 0.5 / off
    res["overhead"] = {
        "daemon_args": daemon_args, "instead": instead, "gpus": ngpu, "blocks": blocks,
        "block_s": block_s, "settle_s": settle_s,
        "tflops_on": on, "tflops_off": off, "slowdown": 1 - on / off, "slowdown_se": se,
        "cpu_core_share": cpu_s / on_s if on_s else None,
        "cpu_core_share_per_gpu": cpu_s / on_s / ngpu if on_s else None,
        "rss_bytes": rss, "gpu_memory_bytes": gpu_mem, "rates": rates,
    }
    log(f"overhead: {res['overhead']}")


def profiler(out: Path, res: dict[str, Any]) -> None:
    state = Path(tempfile.mkdtemp(prefix="gpuflops-prof-"))
    d = Daemon(state, 9482)
    d.start()
    time.sleep(8)
    timeline: list[tuple[float, list[str]]] = []
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="0")
    t_start = time.time()
    ncu = subprocess.Popen(["ncu", "--clock-control", "none", "--profile-from-start", "off",
                            "--metrics", "sm__pipe_tensor_cycles_active.sum", PY, WORKER,
                            str(Path(tempfile.mkdtemp()) / "w.json"), "bf16", "--iters", "2"],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    while ncu.poll() is None or time.time() - t_start < 35:
        m = scrape(d.url)
        timeline.append((time.time() - t_start, sorted(
            f"{lab.get('gpu')}:{lab.get('source')}"
            for lab, v in m.get("gpuflops_gpu_counter_source", []) if v == 1)))
        time.sleep(0.25)
        if time.time() - t_start > 120:
            break
    text = ncu.communicate()[0]
    m = scrape(d.url)
    d.stop()
    changes = [timeline[0]] + [timeline[i] for i in range(1, len(timeline))
                               if timeline[i][1] != timeline[i - 1][1]]
    res["profiler"] = {
        "ncu_rc": ncu.returncode, "ncu_tail": (text or "")[-1500:],
        "source_changes": changes,
        "errors": [(lab, v) for lab, v in m.get("gpuflops_sampler_errors_total", [])],
        "gaps": [(lab, v) for lab, v in m.get("gpuflops_sampler_gaps_total", [])],
        "daemon_log_tail": (state / "daemon.log").read_text()[-3000:],
    }
    log(f"profiler: ncu rc {ncu.returncode}; source changes {changes}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--block-s", type=float, default=12.0)
    ap.add_argument("--settle-s", type=float, default=5.0)
    ap.add_argument("--skip-overhead", action="store_true")
    ap.add_argument("--skip-profiler", action="store_true")
    ap.add_argument("--daemon-args", default="", help="extra daemon arguments, e.g. "
                    "'--counters nvml' for the cost without PM sampling")
    ap.add_argument("--instead", help="a command to run in the daemon's place, e.g. "
                    "'python3 benchmarks/hold_context.py context' for a CUDA context's cost")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {}
    for name, fn in (("profiler", lambda: None if a.skip_profiler else profiler(a.out, res)),
                     ("overhead", lambda: None if a.skip_overhead else
                      overhead(a.out, a.blocks, a.block_s, a.settle_s, res,
                               a.daemon_args.split(),
                               a.instead.split() if a.instead else None))):
        try:
            fn()
        except Exception as e:  # a benchmark records what failed and goes on
            import traceback

            res[f"{name}_error"] = traceback.format_exc()[-3000:]
            log(f"{name} failed: {e!r}")
        (a.out / "overhead.json").write_text(json.dumps(res, indent=1, default=str))
    o = res.get("overhead")
    if o:
        what = " ".join(o["instead"] or o["daemon_args"]) or "defaults"
        print(f"\n{what}: GPUs {o['gpus']}  "
              f"slowdown {o['slowdown']:.2%} ± {o['slowdown_se']:.2%}  "
              f"CPU {o['cpu_core_share_per_gpu']:.2%} of a core per GPU  "
              f"RSS {o['rss_bytes'] / 2**20:.1f} MiB  GPU memory "
              f"{ {k: round(v / 2**20) for k, v in o['gpu_memory_bytes'].items()} } MiB")
    p = res.get("profiler")
    if p:
        print(f"ncu under the daemon: rc {p['ncu_rc']}; counter source changes: "
              f"{p['source_changes']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
