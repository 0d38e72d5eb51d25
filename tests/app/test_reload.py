"""SIGHUP on a real daemon: new TLS certificates and basic-auth users without a restart, a bad
file keeps what runs, the daemon never dies of it; then SIGTERM still writes the stop record."""

from __future__ import annotations

import base64
import signal
import socket
import ssl
import time
import urllib.error
import urllib.request
from pathlib import Path

import bcrypt
import pytest

from gpuflops.ledger.store import Ledger
from tests.e2e.promserver import daemon, wait_for
from tests.e2e.test_tls_scrape import _pki


def _status(url: str, ca: Path, password: str | None = None) -> int:
    req = urllib.request.Request(url)
    if password is not None:
        req.add_header("Authorization", "Basic " + base64.b64encode(
            f"prom:{password}".encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=5,
                                    context=ssl.create_default_context(cafile=str(ca))) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def _web_config(path: Path, cert: Path, key: Path, password: str) -> None:
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
    path.write_text(f"tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
                    f"basic_auth_users:\n  prom: '{hashed}'\n")


@pytest.mark.slow
def test_sighup_reloads_certificates_and_users_and_keeps_running(tmp_short: Path) -> None:
    (tmp_short / "a").mkdir()
    (tmp_short / "b").mkdir()
    ca1, cert1, key1 = _pki(tmp_short / "a")
    ca2, cert2, key2 = _pki(tmp_short / "b")
    web = tmp_short / "web.yml"
    _web_config(web, cert1, key1, "one")
    with daemon(tmp_short / "node", speed=8.0, extra_args=["--web-config", str(web)]) as d:
        metrics = f"https://{d.target}/metrics"
        assert _status(metrics, ca1, "one") == 200

        # A plain-HTTP client against TLS: one log line, no traceback.
        with socket.create_connection(("127.0.0.1", d.port), timeout=5) as s:
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            s.recv(100)
        wait_for("the handshake failure in the log", lambda: "TLS handshake" in d.log(), 10)
        assert [line for line in d.log().splitlines() if "TLS handshake" in line].__len__() == 1

        # Renewed certificate (another CA here) and a new password, then SIGHUP.
        _web_config(web, cert2, key2, "two")
        d.proc.send_signal(signal.SIGHUP)
        wait_for("the reload", lambda: "reloaded configuration" in d.log(), 10)
        assert _status(metrics, ca2, "two") == 200
        assert _status(metrics, ca2, "one") == 401
        with pytest.raises(urllib.error.URLError):
            _status(metrics, ca1, "two")

        # A broken file is refused; the running configuration stays.
        web.write_text("tls_server_config: {cert_file: /nonexistent.crt, key_file: /x.key}\n")
        d.proc.send_signal(signal.SIGHUP)
        wait_for("the refused reload", lambda: "reload failed" in d.log(), 10)
        assert _status(metrics, ca2, "two") == 200
        assert d.proc.poll() is None
        time.sleep(0.5)
        assert d.stop() == 0
    log = d.log()
    assert "Traceback" not in log, log
    led = Ledger.open(d.ledger_path, clock=time.time, readonly=True)
    try:
        last = led.last_activity()
    finally:
        led.close()
    assert last is not None and last.clean_stop  # SIGHUP never ended the session
