"""Real daemons shipping to a real PostgreSQL: start, kill -9, restart; compare ledgers.

Each node replays a slice of the shipped H100 trace in which the GPU process is a live job
process (``start_job``, attributed through GPUFLOPS_JOB in its environment), and ships its
ledger every ``ship_every_s`` with ``--central``.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from gpuflops.ledger.store import Ledger
from tests.deploy.tooling import REPO
from tests.e2e.promserver import Estimate, JobProc, Segment, _env, build_trace, start_job, wait_for

DEMO_PID = 458  # the GPU process of the shipped H100 trace


@dataclass
class Node:
    """One daemon: its state dir persists across kills and restarts."""

    name: str
    cluster: str
    workdir: Path
    trace: Path
    central_url: str
    password_file: Path
    ship_every_s: float = 1.0
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0
    starts: int = 0
    kills: int = 0
    logs: list[Path] = field(default_factory=list)

    @property
    def state_dir(self) -> Path:
        return self.workdir / "state"

    @property
    def ledger_path(self) -> Path:
        return self.state_dir / "ledger.sqlite3"

    @property
    def socket_path(self) -> Path:
        return self.workdir / "s.sock"

    def start(self, timeout_s: float = 30.0) -> None:
        cfg = self.workdir / "daemon.toml"
        cfg.write_text(f"[daemon]\ncentral_ship_every_s = {self.ship_every_s}\n")
        self.starts += 1
        log = self.workdir / f"daemon-{self.starts}.log"
        self.logs.append(log)
        with log.open("wb") as f:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gpuflops", "daemon", "--replay", str(self.trace),
                 "--listen", "127.0.0.1:0", "--socket", str(self.socket_path),
                 "--state-dir", str(self.state_dir), "--config", str(cfg),
                 "--central", self.central_url, "--central-password-file", str(self.password_file),
                 "--node-name", self.name, "--cluster", self.cluster],
                stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=_env())
        proc = self.proc

        def serving() -> int | None:
            if proc.poll() is not None:
                raise RuntimeError(f"daemon {self.name} exited {proc.returncode}: {self.log()}")
            m = re.search(r"serving /metrics on \S+ \(port (\d+)\)", log.read_text(errors="replace"))
            return int(m.group(1)) if m else None

        self.port = int(wait_for(f"daemon {self.name} to serve", serving, timeout_s))

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
            self.kills += 1
        self.proc = None

    def stop(self) -> int:
        """SIGTERM: the daemon commits, records its clean stop and ships the rest."""
        if self.proc is None:
            return 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            code = -9
        self.proc = None
        return int(code)

    def log(self) -> str:
        return self.logs[-1].read_text(errors="replace")[-5000:] if self.logs else ""

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
            text = r.read().decode()
        out = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name.startswith("gpuflops_central_"):
                    key = s.name + (json.dumps(s.labels, sort_keys=True) if s.labels else "")
                    out[key] = s.value
        return out


def node_trace(path: Path, job: JobProc) -> Path:
    """The demo trace's busy minute with the job's pid as the GPU process, 0.5 s intervals."""
    return build_trace(path, [Segment(7.4, 67.4, {DEMO_PID: job.pid})], idle_tail_s=20.0)


@contextlib.contextmanager
def job_process(socket_path: Path, job: str, program: str, steps: int = 400) -> Iterator[JobProc]:
    """A job process attributed by its environment, reporting analytic FLOPs once told to go."""
    proc = start_job(socket_path, job, program, Estimate(steps=steps, flops=1e13, tokens=512.0,
                                                         step_s=0.2), env_job=True, attempt=1)
    try:
        yield proc
    finally:
        if proc.proc.poll() is None:
            proc.proc.kill()
        proc.proc.communicate(timeout=10)  # closes its pipes


def ledger_view(path: Path) -> dict[str, Any]:
    """What the central store must hold of a node ledger: head, job totals, gaps."""
    led = Ledger.open(path, clock=time.time, readonly=True)
    try:
        t = led.totals()
        return {
            "head_seq": t.head_seq,
            "jobs": {(k.job, k.program): (v.measured_flops, v.analytic_flops, v.tokens,
                                          v.recompute_flops, v.estimate_t0_s, v.estimate_t1_s,
                                          v.first_t_s, v.last_t_s, v.hmma_flops,
                                          v.half_rate_fraction) for k, v in t.jobs.items()},
            "gaps": sorted((g.seq, g.gpu, g.uuid, g.t0_s, g.t1_s, g.reason) for g in led.gaps()),
        }
    finally:
        led.close()


def program_total(views: list[dict[str, Any]], program: str) -> float:
    return math.fsum(v[0] for view in views for (_j, p), v in view["jobs"].items() if p == program)


def gpuflops(*args: str, stdin: str | None = None, timeout_s: float = 120.0
             ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gpuflops", *args], input=stdin,
                          capture_output=True, text=True, timeout=timeout_s, cwd=REPO, env=_env(),
                          check=False)
