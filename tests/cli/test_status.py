"""`gpuflops status`: parse and render real scrapes of a MetricsServer over a replayed H100 trace;
TLS with basic auth, a URL that is not a metrics endpoint, and the live view in a real terminal
(tmux) surviving a daemon restart without redrawing the whole screen."""

from __future__ import annotations

import contextlib
import http.server
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import bcrypt
import pytest
from prometheus_client.registry import CollectorRegistry

from gpuflops.cli.status import PIPES, Endpoint, StatusError, parse_status, render_text
from gpuflops.compliance.programs import ProgramView
from gpuflops.exporter.collector import FlopsCollector
from gpuflops.exporter.http import MetricsServer
from gpuflops.exporter.jobs_collector import JobsCollector
from gpuflops.exporter.state import Totals
from gpuflops.exporter.webconfig import load_web_config
from gpuflops.jobs.records import RegistrySnapshot
from gpuflops.ledger.sink import LedgerSink
from gpuflops.pipeline.attribute import ProcessAttributor
from gpuflops.pipeline.integrate import Integrator
from gpuflops.pipeline.label import Labeler
from gpuflops.pipeline.pipeline import CountingSink, Pipeline
from tests.support import ROOT, demo_trace

_HEADER, _INTERVALS, _EVENTS = demo_trace()
INFO = _HEADER.gpus[0]
SHARED_T1 = max(e.data["t1"] for e in _EVENTS if e.data.get("shared"))


def _registry() -> tuple[CollectorRegistry, Totals]:
    """A replay stopped mid shared-phase (two processes show), plus a no-GPM unit; every
    process is labelled job ft-1 of program llama-ft."""
    no_gpm = replace(INFO, key="1", index=1, uuid="GPU-nogpm", metrics=frozenset(),
                     unavailable_reason="GPM not supported on this ampere GPU")
    totals = Totals([INFO, no_gpm])
    p = Pipeline([INFO, no_gpm], Integrator(), ProcessAttributor(),
                 Labeler(lambda _pid, _uuid: ("ft-1", "llama-ft")), CountingSink(), totals)
    for iv in _INTERVALS:
        s = iv.samples[0]
        if s.t0_s > SHARED_T1 - 3:
            break
        p.step([s, replace(s, key="1", activity=None, error="tensor_activity_unavailable")])
    totals.add_estimate("ft-1", "llama-ft", 1e15, 4096.0, 0.0)
    reg = CollectorRegistry(auto_describe=False)
    reg.register(FlopsCollector(totals.snapshot, "replay"))
    reg.register(JobsCollector(totals.snapshot, ProgramView, lambda: RegistrySnapshot(0.0, ()),
                               LedgerSink(None), None))
    return reg, totals


@pytest.fixture
def served() -> Iterator[tuple[str, Totals]]:
    reg, totals = _registry()
    server = MetricsServer(reg, "127.0.0.1:0", lambda: (True, "ok"))
    server.start()
    yield f"http://127.0.0.1:{server.port}/metrics", totals
    server.stop()


def _gpuflops(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS="160")
    return subprocess.run([sys.executable, "-m", "gpuflops", *args], capture_output=True,
                          text=True, env=env, timeout=timeout, cwd=ROOT)


def test_parse_status_of_a_real_scrape(served: tuple[str, Totals]) -> None:
    url, totals = served
    with urllib.request.urlopen(url, timeout=5) as r:
        view = parse_status(r.read().decode())
    assert view.backend == "replay" and view.version
    rows = view.gpus
    assert sorted(rows) == ["0", "1"]
    snap = totals.snapshot()
    r0 = rows["0"]
    live = snap.live["0"]
    assert r0.flops_total == pytest.approx(sum(v for k, v in snap.gpu_flops.items() if k[0] == "0"))
    assert sum(r0.pipe_flops.values()) == pytest.approx(r0.flops_total)
    assert r0.flops_per_s == pytest.approx(live.flops_per_s)
    assert r0.clock_hz == live.clock_hz
    assert live.activity is not None
    hmma = {m.value: v for m, v in live.activity.items()}["hmma"]
    assert r0.activity["hmma"] == pytest.approx(hmma)
    assert set(PIPES) <= set(r0.activity)  # every pipe, DFMA (FP64 tensor) included
    assert {pid for pid, _comm, _v in r0.processes} == {"458", "1470", "1471"}
    r1 = rows["1"]
    assert not r1.available and r1.reason == "GPM not supported on this ampere GPU"
    assert r1.flops_total == 0 and r1.flops_per_s is None
    job = next(j for j in view.jobs if j.job_id == "ft-1")
    assert (job.job_id, job.program, job.analytic) == ("ft-1", "llama-ft", 1e15)
    assert job.measured == pytest.approx(snap.job_flops[("ft-1", "llama-ft")])


def test_render_has_a_column_per_pipe_processes_jobs_and_programs(
    served: tuple[str, Totals]
) -> None:
    url, _totals = served
    view = Endpoint(url).fetch()
    text = render_text(view, width=160)
    header = next(line for line in text.splitlines() if line.strip().startswith("GPU") and
                  "hmma" in line)
    assert header.split() == ["GPU", *PIPES, "SM", "clock", "FLOP/s", "total", "FLOPs", "gaps"]
    assert "TFLOP/s" in text and "PFLOP" in text and "MHz" in text
    assert "1470" in text and "1471" in text and "python3" in text
    assert "tensor activity unavailable: GPM not supported on this ampere GPU" in text
    assert "ft-1" in text and "llama-ft" in text
    progress = parse_status(
        'gpuflops_build_info{version="x",backend="nvml"} 1\n'
        'gpuflops_program_flops_total{program="p",basis="compliance"} 1.1e22\n'
        'gpuflops_program_threshold_flops{program="p",rule="unknown_base"} 3.3e22\n'
        'gpuflops_program_threshold_ratio{program="p"} 0.3333\n')
    text = render_text(progress)
    assert "unknown_base" in text and "33.330%" in text and "██████░" in text


def test_status_command_once(served: tuple[str, Totals]) -> None:
    url, _totals = served
    r = _gpuflops("status", "--once", "--url", url)
    assert r.returncode == 0, r.stderr
    assert "hmma" in r.stdout and "dfma" in r.stdout and "ft-1" in r.stdout


def test_a_url_that_is_not_metrics_is_a_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text("<html>hello</html>")
    (tmp_path / "metrics").write_text("# HELP node_cpu x\nnode_cpu 1\n")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a: object, **kw: object) -> None:
            super().__init__(*a, directory=str(tmp_path), **kw)  # type: ignore[arg-type]

        def log_message(self, *_a: object) -> None:
            pass

        def guess_type(self, path: str) -> str:  # type: ignore[override]
            return "text/plain" if path.endswith("metrics") else super().guess_type(path)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{httpd.server_address[1]}"
        for path, says in (("/", "is not a metrics endpoint"),
                           ("/metrics", "not a gpuflops metrics endpoint"),
                           ("/nope", "HTTP 404")):
            r = _gpuflops("status", "--once", "--url", base + path, "--wait", "5")
            assert r.returncode == 1 and says in r.stderr, r.stderr
            assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_reads_tls_and_basic_auth_endpoints(tmp_path: Path) -> None:
    from tests.e2e.test_tls_scrape import _pki

    ca, cert, key = _pki(tmp_path)
    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=4)).decode()
    web = tmp_path / "web.yml"
    web.write_text(f"tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
                   f"basic_auth_users:\n  prom: '{hashed}'\n")
    wc = load_web_config(web)
    reg, _totals = _registry()
    server = MetricsServer(reg, "127.0.0.1:0", lambda: (True, "ok"),
                           ssl_context=wc.ssl_context(), auth=wc.check_auth)
    server.start()
    (tmp_path / "pw").write_text("pw\n")
    (tmp_path / "bad").write_text("nope\n")
    url = f"https://127.0.0.1:{server.port}/metrics"
    try:
        r = _gpuflops("status", "--once", "--url", url, "--ca-file", str(ca), "--user", "prom",
                      "--password-file", str(tmp_path / "pw"))
        assert r.returncode == 0 and "hmma" in r.stdout, r.stderr
        r = _gpuflops("status", "--once", "--url", url, "--ca-file", str(ca), "--user", "prom",
                      "--password-file", str(tmp_path / "bad"))
        assert r.returncode == 1 and "HTTP 401" in r.stderr
        r = _gpuflops("status", "--once", "--url", url)  # the CA is not trusted
        assert r.returncode == 1 and "CERTIFICATE_VERIFY_FAILED" in r.stderr
    finally:
        server.stop()
    with pytest.raises(StatusError):
        Endpoint(url).fetch(timeout_s=1)


def _pane(session: str) -> str:
    return subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True,
                          text=True, check=True).stdout


@contextlib.contextmanager
def _tmux(session: str, command: str) -> Iterator[None]:
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "170", "-y", "50",
                    command], check=True)
    try:
        yield
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)


def _wait_pane(session: str, text: str, timeout_s: float = 20) -> str:
    deadline = time.monotonic() + timeout_s
    pane = ""
    while time.monotonic() < deadline:
        pane = _pane(session)
        if text in pane:
            return pane
        time.sleep(0.2)
    raise AssertionError(f"{text!r} never appeared; screen:\n{pane}")


@pytest.mark.slow
def test_live_view_in_tmux_survives_a_restart_without_clearing_the_screen(
    tmp_path: Path
) -> None:
    if shutil.which("tmux") is None:
        if os.environ.get("CI"):
            pytest.fail("tmux is missing (Debian package tmux)")
        pytest.skip("tmux is missing")
    reg, _totals = _registry()
    server = MetricsServer(reg, "127.0.0.1:0", lambda: (True, "ok"))
    port = server.port
    server.start()
    raw = tmp_path / "raw.out"
    session = f"gfst{os.getpid()}"
    command = (f"cd {ROOT} && sleep 0.5 && PYTHONPATH={ROOT} {sys.executable} -m gpuflops "
               f"status --url http://127.0.0.1:{port}/metrics --interval 0.2")
    with _tmux(session, command):
        # A copy of every byte the view writes to the terminal.
        subprocess.run(["tmux", "pipe-pane", "-o", "-t", session, f"cat >> {raw}"], check=True)
        pane = _wait_pane(session, "llama-ft")
        assert "dfma" in pane and "fp64" in pane and "Programs against their thresholds" in pane
        time.sleep(1.5)  # a few redraws of an unchanged view
        server.stop()
        pane = _wait_pane(session, "retrying")
        assert "cannot read" in pane and "ft-1" in pane  # the last view stays
        server = MetricsServer(reg, f"127.0.0.1:{port}", lambda: (True, "ok"))
        server.start()
        try:
            deadline = time.monotonic() + 20
            while "retrying" in _pane(session) and time.monotonic() < deadline:
                time.sleep(0.2)
            pane = _pane(session)
            assert "retrying" not in pane and "llama-ft" in pane
        finally:
            server.stop()
    frames = raw.read_bytes()
    # Frame after frame drawn over the last from the home position, never erased first: no
    # clear-screen and no erase-line sequences, so nothing blanks between two frames.
    assert frames.count(b"Programs against their thresholds") >= 5
    assert frames.count(b"\x1b[2J") == 0 and frames.count(b"\x1b[2K") == 0
