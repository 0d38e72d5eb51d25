"""``gpuflops run`` end to end: a real launcher process, a real command, a real job socket."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from gpuflops.client.run import exit_status
from gpuflops.jobs.records import AttachedJob
from gpuflops.jobs.registry import JobRegistry
from gpuflops.jobs.server import JobSocketServer

ROOT = str(Path(__file__).resolve().parents[2])
ENV = {**os.environ, "PYTHONPATH": ROOT}
LAUNCHER = [sys.executable, "-m", "gpuflops", "run"]
N = len(LAUNCHER)  # options go after the launcher

TRAINER = textwrap.dedent(
    """
    import os, sys
    from gpuflops.client import JobReporter
    print(os.getpid(), os.environ["GPUFLOPS_JOB"], os.environ["GPUFLOPS_PROGRAM"],
          os.environ["GPUFLOPS_SOCKET"], flush=True)
    sys.stdin.readline()
    with JobReporter(precision="bf16", flush_interval_s=0.05) as r:
        for _ in range(10):
            r.add(flops=1e12, tokens=100, recompute_flops=1e11)
    sys.exit(3)
    """
)


def test_run_end_to_end(server: JobSocketServer, registry: JobRegistry) -> None:
    cmd = [*LAUNCHER, "--job", "e2e-1", "--program", "prog", "--socket", str(server.path),
           "--meta", "model=llama", "--meta", "params_total=8000", "--meta", "dataset=x",
           "--", sys.executable, "-c", TRAINER]
    with subprocess.Popen(cmd, env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None and proc.stdin is not None
        pid, job, program, sock = proc.stdout.readline().split()
        assert (job, program, sock) == ("e2e-1", "prog", str(server.path))
        # The trainer is a child of the launcher, which registered: its tree is attributed.
        assert registry.job_for_pid(int(pid)) == AttachedJob("e2e-1", "prog")
        assert registry.job_for_pid(proc.pid) == AttachedJob("e2e-1", "prog")
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.wait(30) == 3
        assert proc.stderr is not None and proc.stderr.read() == ""
    snap = registry.snapshot().job("e2e-1")
    assert snap is not None
    assert snap.state == "ended" and snap.exit_code == 3 and snap.end_status == "failed"
    assert snap.analytic_flops == 1e13 and snap.analytic_tokens == 1000
    assert snap.recompute_flops == 1e12
    assert snap.metadata["model"] == "llama" and snap.metadata["params_total"] == 8000
    assert snap.metadata["precision"] == "bf16" and snap.metadata["extra"]["dataset"] == "x"
    assert registry.job_for_pid(int(pid)) is None


HANDLER = textwrap.dedent(
    """
    import signal, sys, time
    def bye(signum, frame):
        print("got", signum, flush=True)
        sys.exit(7)
    signal.signal(signal.SIGTERM, bye)
    print("ready", flush=True)
    time.sleep(30)
    """
)


def test_run_forwards_signals(server: JobSocketServer, registry: JobRegistry) -> None:
    cmd = [*LAUNCHER, "--job", "sig", "--program", "p", "--socket", str(server.path), "--",
           sys.executable, "-c", HANDLER]
    with subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 7
        assert proc.stdout.read() == "got 15\n"
    snap = registry.snapshot().job("sig")
    assert snap is not None and snap.state == "ended" and snap.exit_code == 7


def test_run_without_daemon_still_runs_the_command(tmpdir_short: str) -> None:
    missing = f"{tmpdir_short}/none.sock"
    cmd = [*LAUNCHER, "--job", "j", "--program", "p", "--socket", missing, "--",
           sys.executable, "-c", "import sys; sys.exit(5)"]
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=30)
    assert done.returncode == 5 and "running without registering" in done.stderr
    strict = subprocess.run([*cmd[:N], "--require-daemon", *cmd[N:]], env=ENV,
                            capture_output=True, text=True, timeout=30)
    assert strict.returncode == 2 and "cannot connect" in strict.stderr


def test_run_refused_job_and_bad_ids(server: JobSocketServer, registry: JobRegistry) -> None:
    base = [*LAUNCHER, "--program", "p", "--socket", str(server.path), "--", "true"]
    first = subprocess.run([*base[:N], "--job", "once", *base[N:]], env=ENV, timeout=30)
    assert first.returncode == 0
    again = subprocess.run([*base[:N], "--job", "once", *base[N:]], env=ENV, timeout=30,
                           capture_output=True, text=True)
    assert again.returncode == 2 and "job_ended" in again.stderr
    bad = subprocess.run([*base[:N], "--job", "no spaces", *base[N:]], env=ENV, timeout=30,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "job" in bad.stderr
    missing = subprocess.run([*base[:N], "--job", "nocmd", *base[N:-1], "/no/such/binary"],
                             env=ENV, timeout=30, capture_output=True, text=True)
    assert missing.returncode == 127
    snap = registry.snapshot().job("nocmd")
    assert snap is not None and snap.state == "ended" and snap.exit_code == 127


def test_exit_status_convention() -> None:
    assert exit_status(0) == (0, "completed")
    assert exit_status(1) == (1, "failed")
    assert exit_status(-signal.SIGKILL) == (137, "signaled: SIGKILL")
