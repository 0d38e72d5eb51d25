"""End-to-end harness: a real Prometheus, real gpuflops daemons and real job processes.

Everything listens on 127.0.0.1 and lives in a temporary directory; every wait is bounded.
Prometheus is Debian's ``prometheus`` package: tests skip without it locally and fail in CI.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gpuflops.config import demo_trace_path
from tests.deploy.tooling import REPO, require_tool

RULES = REPO / "exporters" / "prometheus" / "gpuflops.rules.yml"
DASHBOARDS = sorted((REPO / "exporters" / "grafana" / "dashboards").glob("*.json"))
# Beyond the largest pid_max Linux allows (2**22): replayed processes that can never be local.
NO_SUCH_PID = 2**22 + 1000


def require_prometheus() -> str:
    """Path of the prometheus binary; skips locally, fails in CI, when it is missing."""
    return require_tool("prometheus", "prometheus")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(what: str, check: Callable[[], Any], timeout_s: float, period_s: float = 0.2) -> Any:
    """Poll ``check`` until it returns something truthy; AssertionError naming ``what`` if not."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while True:
        try:
            last = check()
        except (OSError, ValueError) as e:
            last = e
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}; last: {last!r}")
        time.sleep(period_s)


def _stop(proc: subprocess.Popen[Any], timeout_s: float = 15.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return int(proc.returncode)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    for name in ("GPUFLOPS_JOB", "GPUFLOPS_PROGRAM", "GPUFLOPS_SOCKET"):
        env.pop(name, None)
    return env


# ------------------------------------------------------------------------------- Prometheus


def rules_every_second(tmp: Path) -> Path:
    """The project's rule file with every group evaluated each second instead of each minute.

    Only the evaluation interval changes (a test cannot wait a minute for the first record);
    expressions, names and labels are the shipped ones.
    """
    doc = yaml.safe_load(RULES.read_text())
    for group in doc["groups"]:
        group["interval"] = "1s"
    out = tmp / "gpuflops.rules.yml"
    out.write_text(yaml.safe_dump(doc, sort_keys=False, width=1000))
    return out


class PromError(AssertionError):
    """The Prometheus API answered with an error."""


@dataclass
class Prometheus:
    """A running Prometheus server and a small client for its HTTP API."""

    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def api(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        try:
            with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=10) as resp:
                body = json.loads(resp.read())
        except urllib.error.HTTPError as e:
            raise PromError(f"{path} {params}: HTTP {e.code}: {e.read()[:500]!r}") from None
        if body.get("status") != "success":
            raise PromError(f"{path} {params}: {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query; a vector's samples, or a scalar as one sample without labels."""
        data = self.api("/api/v1/query", {"query": expr})
        if data["resultType"] == "vector":
            return list(data["result"])
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        raise PromError(f"{expr}: unexpected result type {data['resultType']}")

    def values(self, expr: str, *by: str) -> dict[tuple[str, ...], float]:
        """Instant query as {label values in ``by`` order: value}."""
        return {
            tuple(r["metric"].get(k, "") for k in by): float(r["value"][1]) for r in self.query(expr)
        }

    def targets(self) -> list[dict[str, Any]]:
        return list(self.api("/api/v1/targets", {"state": "active"})["activeTargets"])

    def wait_targets(self, health: Mapping[str, str], timeout_s: float = 30.0) -> dict[str, Any]:
        """Wait until each scrape pool named in ``health`` has its targets in that health."""

        def check() -> dict[str, Any] | None:
            found = {t["scrapePool"]: t for t in self.targets()}
            ok = all(p in found and found[p]["health"] == h for p, h in health.items())
            return found if ok else None

        return dict(wait_for(f"targets {dict(health)}", check, timeout_s, 0.5))

    def last_scrape_after(self, pool: str, t_s: float, timeout_s: float = 15.0) -> None:
        """Wait until every target of scrape pool ``pool`` was scraped after wall time ``t_s``."""

        def check() -> bool:
            ts = [t for t in self.targets() if t["scrapePool"] == pool]
            return bool(ts) and all(
                t["health"] == "up" and _rfc3339(t["lastScrape"]) > t_s for t in ts
            )

        wait_for(f"a scrape of {pool} after {t_s:.1f}", check, timeout_s, 0.3)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


def _rfc3339(text: str) -> float:
    """Prometheus' lastScrape (nanosecond RFC 3339, 'Z' or offset) as Unix seconds."""
    m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)$", text)
    if m is None:
        raise ValueError(f"cannot parse time {text!r}")
    import datetime as dt

    base = dt.datetime.fromisoformat(m.group(1) + ("+00:00" if m.group(3) == "Z" else m.group(3)))
    return base.timestamp() + float(m.group(2) or 0.0)


@contextlib.contextmanager
def prometheus(
    tmp: Path,
    scrape_configs: Sequence[Mapping[str, Any]],
    *,
    rule_files: Sequence[Path] = (),
    ready_timeout_s: float = 30.0,
) -> Iterator[Prometheus]:
    """Start Prometheus (1 s scrape and evaluation) on a free loopback port; stop it after."""
    binary = require_prometheus()
    tmp.mkdir(parents=True, exist_ok=True)
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(p) for p in rule_files],
        "scrape_configs": list(scrape_configs),
    }
    config_path = tmp / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    log_path = tmp / "prometheus.log"
    for _attempt in range(3):  # the port can be taken between choosing and binding it
        port = free_port()
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [binary, f"--config.file={config_path}", f"--storage.tsdb.path={tmp / 'data'}",
                 f"--web.listen-address=127.0.0.1:{port}", "--log.level=info"],
                stdout=log, stderr=subprocess.STDOUT, cwd=tmp,
            )
        server = Prometheus(f"http://127.0.0.1:{port}", proc, log_path)

        def ready(server: Prometheus = server) -> bool:
            if server.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited {server.proc.returncode}: {server.log()}")
            with urllib.request.urlopen(f"{server.url}/-/ready", timeout=2) as resp:
                return resp.status == 200

        try:
            wait_for("prometheus /-/ready", ready, ready_timeout_s)
        except RuntimeError:
            if "address already in use" in server.log():
                continue
            raise
        break
    else:
        raise AssertionError("prometheus could not bind a free port three times")
    try:
        yield server
    finally:
        _stop(server.proc)


# ------------------------------------------------------------------------------- daemon


@dataclass
class DaemonProc:
    """``gpuflops daemon`` as a subprocess; ``port`` is read from its log."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    state_dir: Path
    socket_path: Path
    port: int = 0
    scheme: str = "http"

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def ledger_path(self) -> Path:
        return self.state_dir / "ledger.sqlite3"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def stop(self) -> int:
        return _stop(self.proc)


@contextlib.contextmanager
def daemon(
    workdir: Path,
    *,
    trace: Path | None = None,
    speed: float = 1.0,
    extra_args: Sequence[str] = (),
    health_timeout_s: float = 30.0,
) -> Iterator[DaemonProc]:
    """Run ``gpuflops daemon`` replaying ``trace`` on 127.0.0.1:<free port>; SIGTERM after."""
    workdir.mkdir(parents=True, exist_ok=True)
    state = workdir / "state"
    sock = workdir / "s.sock"
    log_path = workdir / "daemon.log"
    args = [
        sys.executable, "-m", "gpuflops", "daemon",
        "--replay", str(trace or demo_trace_path()), "--speed", str(speed),
        "--listen", "127.0.0.1:0", "--socket", str(sock), "--state-dir", str(state),
        *extra_args,
    ]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=_env())
    d = DaemonProc(proc, log_path, state, sock)
    try:

        def serving() -> int | None:
            if proc.poll() is not None:
                raise RuntimeError(f"daemon exited {proc.returncode}: {d.log()}")
            m = re.search(r"serving /metrics on \S+ \(port (\d+)\)", d.log())
            return int(m.group(1)) if m and sock.exists() else None

        d.port = int(wait_for("the daemon to serve", serving, health_timeout_s))
        d.scheme = "https" if "--web-config" in extra_args else "http"
        yield d
    finally:
        d.stop()


def healthz(d: DaemonProc, context: Any = None) -> tuple[int, bytes]:
    """GET /healthz without credentials."""
    try:
        with urllib.request.urlopen(f"{d.scheme}://{d.target}/healthz", timeout=5,
                                    context=context) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


# ------------------------------------------------------------------------------- traces


@dataclass
class Segment:
    """A slice [t0, t1) of the demo trace (seconds from its start), with pids renamed."""

    t0_s: float
    t1_s: float
    pids: Mapping[int, int] = field(default_factory=dict)
    rename_others: bool = True  # pids not in ``pids`` become NO_SUCH_PID + pid
    gap: str | None = None  # replace activity by a gap with this reason


def _demo() -> tuple[dict[str, Any], list[dict[str, Any]]]:
    with gzip.open(demo_trace_path(), "rt") as f:
        lines = [json.loads(line) for line in f]
    return lines[0], [r for r in lines[1:] if "samples" in r]


def _merge(group: list[dict[str, Any]], seg: Segment) -> dict[str, Any]:
    """Consecutive intervals of one GPU as one: duration-weighted activity and clock."""

    def pid(p: int) -> int:
        return seg.pids.get(p, NO_SUCH_PID + p if seg.rename_others else p)

    samples = [r["samples"][0] for r in group]
    total = sum(s["t1"] - s["t0"] for s in samples)
    out: dict[str, Any] = {"key": samples[0]["key"], "t0": samples[0]["t0"],
                           "t1": samples[0]["t0"] + total}
    if seg.gap is not None:
        out.update(activity=None, clock_hz=None, clock_reads=0, error=seg.gap)
        return out
    acts = samples[0]["activity"].keys()
    out["activity"] = {m: sum(s["activity"][m] * (s["t1"] - s["t0"]) for s in samples) / total
                       for m in acts}
    out["clock_hz"] = sum(s["clock_hz"] * (s["t1"] - s["t0"]) for s in samples) / total
    out["clock_reads"] = sum(s.get("clock_reads", 0) for s in samples)
    procs: dict[int, list[Any]] = {}
    for s in samples:
        for p in s.get("processes", []):
            procs[pid(p[0])] = [pid(p[0]), p[1], p[2]]
    if procs:
        out["processes"] = list(procs.values())
        out["process_util"] = [[pid(u[0]), u[1], u[2]] for s in samples
                               for u in s.get("process_util", [])]
    return out


def build_trace(path: Path, segments: Sequence[Segment], *, merge: int = 5,
                idle_tail_s: float = 0.0, no_counters_gpu: bool = False) -> Path:
    """A replayable trace from slices of the shipped H100 trace, laid end to end.

    ``merge`` consecutive 0.1 s intervals become one, so a fast replay commits fewer ledger
    records. The idle tail repeats the trace's first (idle) interval. ``no_counters_gpu`` adds a
    second unit that reports no tensor activity (as a pre-Hopper GPU without GPM would).
    """
    header, intervals = _demo()
    origin = intervals[0]["t0"]
    out: list[dict[str, Any]] = []
    t = origin

    def emit(group: list[dict[str, Any]], seg: Segment) -> None:
        nonlocal t
        sample = _merge(group, seg)
        shift = t - sample["t0"]
        sample["t0"] += shift
        sample["t1"] += shift
        for u in sample.get("process_util", []):
            u[1] += shift
        out.append({"t0": sample["t0"], "t1": sample["t1"], "samples": [sample]})
        t = sample["t1"]

    for seg in segments:
        chosen = [r for r in intervals if seg.t0_s <= r["t0"] - origin < seg.t1_s]
        for i in range(0, len(chosen), merge):
            emit(chosen[i:i + merge], seg)
    idle = intervals[0]
    dur = idle["t1"] - idle["t0"]
    for _ in range(int(idle_tail_s / (dur * merge))):
        emit([idle] * merge, Segment(0, 0))
    gpus = list(header["gpus"])
    if no_counters_gpu:
        gpus.append({
            "key": "1", "index": 1, "uuid": "GPU-00000000-0000-0000-0000-0000000000a1",
            "name": "NVIDIA A100-SXM4-40GB", "architecture": "ampere", "sm_count": 108,
            "gpu_instance_id": None, "metrics": [],
            "unavailable_reason": "GPM not supported on this GPU",
        })
    head = {k: v for k, v in header.items() if k != "gpus"}
    head.update(gpus=gpus, interval_s=dur * merge, derived_from="h100-demo.jsonl.gz (tests/e2e)")
    with path.open("w") as f:
        f.write(json.dumps(head) + "\n")
        for rec in out:
            f.write(json.dumps(rec) + "\n")
    return path


# ------------------------------------------------------------------------------- jobs


@dataclass(frozen=True)
class Estimate:
    """What a simulated job publishes: ``steps`` adds of (flops, tokens, recompute) each."""

    steps: int
    flops: float
    tokens: float
    recompute_flops: float = 0.0
    step_s: float = 0.1

    @property
    def total(self) -> tuple[float, float, float]:
        return (self.steps * self.flops, self.steps * self.tokens,
                self.steps * self.recompute_flops)


_JOB_SCRIPT = textwrap.dedent("""
    import json, sys, time
    from gpuflops.client.reporter import JobReporter
    spec = json.loads(sys.argv[1])
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        sys.exit(3)
    est = spec.pop("estimate")
    r = JobReporter(flush_interval_s=0.2, reconnect_max_s=0.5, **spec)
    with r:
        for _ in range(est["steps"]):
            r.add(est["flops"], est["tokens"], est["recompute_flops"])
            time.sleep(est["step_s"])
    st = r.stats()
    print(json.dumps({"delivered_flops": st.delivered_flops, "dropped_flops": st.dropped_flops,
                      "pending_flops": st.pending_flops, "last_error": st.last_error}), flush=True)
    sys.exit(0 if st.dropped_flops == 0 and st.pending_flops == 0 else 4)
""")


@dataclass
class JobProc:
    """A training-job stand-in that waits for ``go`` on stdin, then reports through JobReporter.

    It exists (with its pid) before it reports, so a trace can name it as the GPU process.
    """

    proc: subprocess.Popen[str]
    estimate: Estimate

    @property
    def pid(self) -> int:
        return int(self.proc.pid)

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def result(self, timeout_s: float = 30.0) -> dict[str, Any]:
        """Wait for the job to finish; its reporter's delivered/dropped figures."""
        out, err = self.proc.communicate(timeout=timeout_s)
        lines = [line for line in out.splitlines() if line.startswith("{")]
        if self.proc.returncode != 0 or not lines:
            raise AssertionError(f"job exited {self.proc.returncode}: {out}\n{err[-3000:]}")
        return dict(json.loads(lines[-1]))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate(timeout=5)


def start_job(socket_path: Path, job: str, program: str, estimate: Estimate, *,
              env_job: bool = False, **metadata: Any) -> JobProc:
    """Spawn a job process (blocked until ``go``); ``env_job`` also sets GPUFLOPS_JOB/PROGRAM."""
    spec = {"job": job, "program": program, "socket_path": str(socket_path),
            "estimate": estimate.__dict__, **metadata}
    env = _env()
    if env_job:
        env.update(GPUFLOPS_JOB=job, GPUFLOPS_PROGRAM=program)
    proc = subprocess.Popen(
        [sys.executable, "-c", _JOB_SCRIPT, json.dumps(spec)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=REPO, env=env,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        raise AssertionError(f"job process did not start: {line!r} {proc.communicate()[1][-2000:]}")
    return JobProc(proc, estimate)
