"""Issue 5: a real Prometheus scrapes the daemon over TLS with basic auth (--web-config).

The certificate authority, the server certificate for 127.0.0.1 and the bcrypt hash are made
here; a scrape job with the right password is up, one with a wrong password is down with 401,
an unauthenticated /metrics is refused, and /healthz needs no credentials.
"""

from __future__ import annotations

import base64
import ssl
import urllib.error
import urllib.request
from pathlib import Path

import bcrypt
import pytest

from tests.e2e.promserver import daemon, healthz, prometheus, require_prometheus
from tests.pki import Ca

USER = "prometheus"
PASSWORD = "e2e-scrape-secret"




def _pki(d: Path) -> tuple[Path, Path, Path]:
    """(CA certificate, server certificate for 127.0.0.1, server key) as PEM files."""
    ca = Ca.create("gpuflops e2e CA")
    cert, key = ca.issue(d, "server", "127.0.0.1", server=True, ips=("127.0.0.1",))
    return ca.write(d / "ca.crt"), cert, key


def _get(url: str, context: ssl.SSLContext, auth: tuple[str, str] | None = None) -> int:
    req = urllib.request.Request(url)
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(req, timeout=10, context=context) as resp:
            body = resp.read()
            assert b"gpuflops_build_info" in body or url.endswith("/healthz")
            return int(resp.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


@pytest.mark.slow
def test_prometheus_scrapes_over_tls_with_basic_auth(tmp_short: Path) -> None:
    require_prometheus()
    ca, cert, key = _pki(tmp_short)
    # Cost 4 (the minimum) keeps the test fast; the verification path is the same as cost 12.
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
    web = tmp_short / "web.yml"
    web.write_text(f"tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
                   f"basic_auth_users:\n  {USER}: '{hashed}'\n")
    context = ssl.create_default_context(cafile=str(ca))

    with daemon(tmp_short / "node", extra_args=["--web-config", str(web), "--no-ledger"]) as d:
        base = f"https://{d.target}"
        assert _get(f"{base}/metrics", context) == 401
        assert _get(f"{base}/metrics", context, (USER, "wrong")) == 401
        assert _get(f"{base}/metrics", context, (USER, PASSWORD)) == 200
        status, body = healthz(d, context)
        assert status == 200, body
        with pytest.raises(OSError):  # TLS only: plain HTTP gets no answer
            urllib.request.urlopen(f"http://{d.target}/healthz", timeout=5).close()

        def scrape_job(name: str, password: str) -> dict[str, object]:
            return {"job_name": name, "scheme": "https",
                    "tls_config": {"ca_file": str(ca)},
                    "basic_auth": {"username": USER, "password": password},
                    "static_configs": [{"targets": [d.target]}]}

        with prometheus(tmp_short / "prom", [scrape_job("gpuflops", PASSWORD),
                                             scrape_job("gpuflops-wrong-password", "nope")]) as prom:
            targets = prom.wait_targets({"gpuflops": "up", "gpuflops-wrong-password": "down"})
            assert "401" in str(targets["gpuflops-wrong-password"]["lastError"]), targets
            assert targets["gpuflops"]["lastError"] == ""
            up = prom.values("up", "job")
            assert up == {("gpuflops",): 1.0, ("gpuflops-wrong-password",): 0.0}
            # What the authenticated scrape stored is the daemon's: the replayed H100 is metered.
            assert prom.values('gpuflops_build_info{backend="replay"}', "job") == {("gpuflops",): 1.0}
