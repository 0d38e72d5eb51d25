"""`gpuflops daemon` and `gpuflops status` as real subprocesses on real ports and sockets."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import demo_trace

ROOT = Path(__file__).parents[2]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("NOTIFY_SOCKET", None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _gpuflops(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gpuflops", *args],
        capture_output=True, text=True, env=_env(), timeout=timeout, cwd=ROOT,
    )


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """Unix socket paths must stay under ~100 bytes: pytest's tmp_path can be longer."""
    path = tempfile.mkdtemp(dir="/tmp", prefix="gfcli")
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


def _flops(port: int) -> float | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            text = r.read().decode()
    except OSError:
        return None
    return sum(
        s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "gpuflops_gpu_flops_total"
    )


class DemoDaemon:
    def __init__(self, state_dir: Path, sock: Path, *extra: str) -> None:
        self.port = _free_port()
        # The demo trace opens with 7 s of idle GPU (its ground-truth idle window); speed 8 gets
        # to the GEMMs within a second.
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gpuflops", "daemon", "--demo", "--speed", "8",
             "--listen", f"127.0.0.1:{self.port}", "--socket", str(sock),
             "--state-dir", str(state_dir), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT,
        )

    def first_scrape(self, timeout_s: float = 15.0) -> float:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            assert self.proc.poll() is None, self.proc.communicate()[1]
            v = _flops(self.port)
            if v is not None:
                return v
            time.sleep(0.05)
        raise AssertionError("daemon never served /metrics")

    def wait_for_growth(self, above: float, within_s: float) -> float:
        end = time.monotonic() + within_s
        while time.monotonic() < end:
            v = _flops(self.port)
            if v is not None and v > above:
                return v
            time.sleep(0.05)
        raise AssertionError(f"gpuflops_gpu_flops_total stayed at {above} for {within_s}s")

    def terminate(self, within_s: float = 5.0) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGTERM)
        try:
            _out, err = self.proc.communicate(timeout=within_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            raise AssertionError(f"daemon did not exit within {within_s}s of SIGTERM") from None
        return self.proc.returncode, err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


@pytest.mark.slow
def test_demo_daemon_meters_exits_cleanly_and_restarts_from_the_ledger(
    short_dir: Path, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    sock = short_dir / "s.sock"
    d = DemoDaemon(state, sock)
    try:
        first = d.first_scrape()
        assert sock.is_socket()
        grown = d.wait_for_growth(max(first, 0.0), within_s=4.0)  # <1 s of idle at speed 8
        t = time.monotonic()
        later = d.wait_for_growth(grown, within_s=2.0)
        assert time.monotonic() - t < 2.0
        assert later > grown > 0
        before = _flops(d.port)
        assert before is not None and before >= later
        rc, err = d.terminate()
    finally:
        d.kill()
    assert rc == 0, err
    assert "Traceback" not in err
    assert not sock.exists()  # the job socket is removed on shutdown

    d2 = DemoDaemon(state, sock)
    try:
        restarted = d2.first_scrape()
        # Counters continue from the ledger: never below what the first daemon exported.
        assert restarted >= before
        rc, err = d2.terminate()
    finally:
        d2.kill()
    assert rc == 0, err


def test_auto_backend_without_gpu_exits_2_and_points_to_demo(tmp_path: Path, short_dir: Path) -> None:
    port = _free_port()
    state = tmp_path / "state"
    r = _gpuflops(
        "daemon", "--backend", "auto", "--listen", f"127.0.0.1:{port}",
        "--socket", str(short_dir / "s.sock"), "--state-dir", str(state),
    )
    assert r.returncode == 2, r.stderr
    assert "--demo" in r.stderr
    assert "no usable NVIDIA GPU" in r.stderr
    # It never started a replay: nothing served, no socket, no ledger.
    assert "serving /metrics" not in r.stderr
    assert not (short_dir / "s.sock").exists()
    assert not state.exists()


def test_demo_with_nvml_backend_is_an_error(tmp_path: Path) -> None:
    r = _gpuflops("daemon", "--demo", "--backend", "nvml", "--state-dir", str(tmp_path))
    assert r.returncode == 1
    assert "--demo/--replay cannot be combined with --backend nvml" in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_bad_config_and_flags_are_clear_errors(tmp_path: Path) -> None:
    cfg = tmp_path / "gpuflops.toml"
    cfg.write_text('[daemon]\ninterval_s = 0.5\nlisten_port = 9450\n')
    r = _gpuflops("daemon", "--demo", "--config", str(cfg))
    assert r.returncode == 1 and "unknown settings ['listen_port']" in r.stderr
    r = _gpuflops("daemon", "--demo", "--interval", "0.05", "--no-ledger", "--no-socket")
    assert r.returncode == 1 and "interval_s must be a finite number in [0.1, 3600], got 0.05" \
        in r.stderr
    r = _gpuflops("daemon", "--demo", "--precision", "fp64", "--no-ledger", "--no-socket")
    assert r.returncode == 1 and "precision 'fp64' is not one of" in r.stderr
    r = _gpuflops("daemon", "--replay", str(tmp_path / "missing.jsonl"), "--no-ledger", "--no-socket")
    assert r.returncode == 2 and "missing.jsonl:1: cannot read trace" in r.stderr
    assert "Traceback" not in r.stderr


def test_status_cannot_reach_daemon() -> None:
    port = _free_port()
    r = _gpuflops("status", "--once", "--url", f"http://127.0.0.1:{port}/metrics")
    assert r.returncode == 1
    assert f"cannot read http://127.0.0.1:{port}/metrics" in r.stderr


def test_daemon_record_writes_a_trace_that_replays_the_same_intervals(short_dir: Path) -> None:
    from gpuflops.sampler.trace import load_trace

    out = short_dir / "rec.jsonl.gz"
    done = _gpuflops(
        "daemon", "--demo", "--no-loop", "--speed", "200", "--listen", f"127.0.0.1:{_free_port()}",
        "--socket", str(short_dir / "s.sock"), "--no-ledger", "--record", str(out), timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    header, recorded, _ = load_trace(out)
    _h, source, _e = demo_trace()
    assert header.meta["backend"] == "replay" and "recorded_at" in header.meta
    assert len(recorded) == len(source)
    # Same activity and clocks, interval by interval (times are moved onto the wall clock).
    for a, b in zip(recorded, source, strict=True):
        assert [s.activity for s in a.samples] == [s.activity for s in b.samples]
        assert [s.clock_hz for s in a.samples] == [s.clock_hz for s in b.samples]
        assert abs(a.t1_s - a.t0_s - (b.t1_s - b.t0_s)) < 1e-6


def test_commands_find_the_state_dir_and_socket_as_the_daemon_does(tmp_path: Path) -> None:
    """verify and run read GPUFLOPS_CONFIG's file and GPUFLOPS_* variables, like the daemon."""
    cfg = tmp_path / "gpuflops.toml"
    cfg.write_text(f'[daemon]\nstate_dir = "{tmp_path / "from-file"}"\n')
    env = {**_env(), "GPUFLOPS_CONFIG": str(cfg)}
    r = subprocess.run([sys.executable, "-m", "gpuflops", "verify"], capture_output=True,
                       text=True, env=env, timeout=30, cwd=ROOT)
    assert r.returncode == 2 and str(tmp_path / "from-file") in r.stderr, r.stderr
    env["GPUFLOPS_STATE_DIR"] = str(tmp_path / "from-env")
    r = subprocess.run([sys.executable, "-m", "gpuflops", "verify"], capture_output=True,
                       text=True, env=env, timeout=30, cwd=ROOT)
    assert str(tmp_path / "from-env") in r.stderr, r.stderr
    env["GPUFLOPS_SOCKET"] = str(tmp_path / "nowhere.sock")
    r = subprocess.run([sys.executable, "-m", "gpuflops", "run", "--job", "j", "--program", "p",
                        "--require-daemon", "--", "true"], capture_output=True, text=True,
                       env=env, timeout=30, cwd=ROOT)
    assert r.returncode != 0 and "nowhere.sock" in r.stderr, r.stderr


def test_log_format_json_and_exporter_toolkit_flags(short_dir: Path) -> None:
    import json

    r = _gpuflops("daemon", "--demo", "--no-loop", "--speed", "2000", "--no-socket",
                  "--no-ledger", "--web.listen-address", "127.0.0.1:0",
                  "--web.telemetry-path", "/custom", "--log.format", "json",
                  "--log.level", "info", timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [json.loads(line) for line in r.stderr.splitlines() if line.strip()]
    assert lines and all({"ts", "level", "logger", "msg"} <= set(x) for x in lines)
    assert any(x["msg"].startswith("serving /custom on 127.0.0.1:0") for x in lines)


def test_without_the_central_extra_only_its_commands_are_unavailable() -> None:
    """psycopg and cryptography are the optional `central` extra: the image of a plain
    `pip install gpuflops` must still run every other command."""
    script = (
        "import sys\n"
        "sys.modules.update(cryptography=None, psycopg=None)  # import raises ImportError\n"
        "from click.testing import CliRunner\n"
        "from gpuflops.cli import main\n"
        "r = CliRunner()\n"
        "for cmd in ('daemon', 'record', 'status', 'run', 'estimate', 'verify', 'report'):\n"
        "    res = r.invoke(main, [cmd, '--help'])\n"
        "    assert res.exit_code == 0, (cmd, res.output)\n"
        "for cmd in ('decide', 'gate', 'central'):\n"
        "    res = r.invoke(main, [cmd, '--program', 'p'])\n"
        "    assert res.exit_code == 1 and 'needs gpuflops[central]' in res.output, res.output\n"
        "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       env=_env(), timeout=60, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr
