"""MetricsServer over real sockets: /healthz from the daemon loop, 404, auth hook, errors."""

from __future__ import annotations

import base64
import http.client
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.registry import Collector, CollectorRegistry

from gpuflops.app import Daemon, build
from gpuflops.config import Settings
from gpuflops.exporter.http import MetricsServer, parse_listen
from tests.support import DEMO_TRACE, FakeClock


def _get(
    port: int, path: str, headers: dict[str, str] | None = None, method: str = "GET"
) -> tuple[int, dict[str, str], str]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        c.request(method, path, headers=headers or {})
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read().decode()
    finally:
        c.close()


@pytest.fixture
def daemon() -> Iterator[tuple[Daemon, FakeClock, MetricsServer]]:
    clock = FakeClock(10_000.0)
    settings = Settings(backend="replay", replay_path=str(DEMO_TRACE), replay_speed=1e6,
                        replay_loop=False, listen="127.0.0.1:0", ledger=False, job_socket=False)
    d = build(settings, clock=clock)
    server = MetricsServer(d.registry, "127.0.0.1:0", d.health)
    server.start()
    yield d, clock, server
    server.stop()
    d.close()


@pytest.mark.timeout(60)
def test_healthz_follows_the_sampling_loop(daemon: tuple[Daemon, FakeClock, MetricsServer]) -> None:
    d, clock, server = daemon
    assert _get(server.port, "/healthz")[::2] == (200, "starting\n")
    clock.t += 6.0  # limit: max(5 s, 10 x 0.5 s interval)
    assert _get(server.port, "/healthz")[::2] == (503, "no sampling interval completed yet\n")
    ticks = [0]

    def tick() -> None:
        ticks[0] += 1
        if ticks[0] == 20:
            d.stop.set()

    d.run(on_tick=tick)
    assert ticks[0] == 20
    assert _get(server.port, "/healthz")[::2] == (200, "ok\n")
    clock.t += 4.9
    assert _get(server.port, "/healthz")[0] == 200
    clock.t += 0.2
    status, _h, body = _get(server.port, "/healthz")
    assert status == 503 and body.startswith("sampling loop stalled: last interval 5.1s ago")
    # /metrics still answers while unhealthy: Prometheus sees the stale timestamp itself.
    status, headers, text = _get(server.port, "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=")
    assert 'gpuflops_sampler_intervals_total{gpu="0"} 20.0' in text


def test_unknown_path_is_404_and_index_links(daemon: tuple[Daemon, FakeClock, MetricsServer]) -> None:
    _d, _clock, server = daemon
    assert _get(server.port, "/nope")[0] == 404
    assert _get(server.port, "/metrics/extra")[0] == 404
    status, _h, body = _get(server.port, "/")
    assert status == 200 and "/metrics" in body
    status, headers, body = _get(server.port, "/metrics", method="HEAD")
    assert status == 200 and body == "" and int(headers["content-length"]) > 1000
    assert _get(server.port, "/metrics?x=1")[0] == 200


def test_auth_hook_guards_metrics_but_not_healthz() -> None:
    good = "Basic " + base64.b64encode(b"prom:secret").decode()
    seen: list[str | None] = []

    def auth(header: str | None) -> bool:
        seen.append(header)
        return header == good

    server = MetricsServer(CollectorRegistry(), "127.0.0.1:0", lambda: (True, "ok"), auth=auth)
    server.start()
    try:
        status, headers, _ = _get(server.port, "/metrics")
        assert status == 401 and headers["www-authenticate"] == 'Basic realm="gpuflops"'
        bad = "Basic " + base64.b64encode(b"prom:wrong").decode()
        assert _get(server.port, "/metrics", {"Authorization": bad})[0] == 401
        assert _get(server.port, "/metrics", {"Authorization": good})[0] == 200
        assert _get(server.port, "/nope")[0] == 401  # unknown paths do not leak without auth
        assert _get(server.port, "/healthz")[::2] == (200, "ok\n")
        assert seen == [None, bad, good, None]
    finally:
        server.stop()


class _Broken(Collector):
    def collect(self) -> Iterator[object]:  # type: ignore[override]
        raise RuntimeError("collector bug")


def test_collector_failure_is_500_and_server_survives() -> None:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Broken())
    server = MetricsServer(reg, "127.0.0.1:0", lambda: (True, "ok"))
    server.start()
    try:
        status, _h, body = _get(server.port, "/metrics")
        assert status == 500 and "collector bug" in body
        assert _get(server.port, "/healthz")[0] == 200
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("listen", "want"),
    [("127.0.0.1:9450", ("127.0.0.1", 9450)), (":9450", ("0.0.0.0", 9450)), ("[::1]:80", ("::1", 80))],
)
def test_parse_listen(listen: str, want: tuple[str, int]) -> None:
    assert parse_listen(listen) == want


@pytest.mark.parametrize("listen", ["9450", "host:", "host:port", "h:70000"])
def test_parse_listen_refuses(listen: str) -> None:
    with pytest.raises(ValueError):
        parse_listen(listen)


def test_gzip_and_openmetrics_are_negotiated(daemon: tuple[Daemon, FakeClock, MetricsServer]) -> None:
    import gzip

    _d, _clock, server = daemon
    c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        c.request("GET", "/metrics", headers={"Accept-Encoding": "gzip"})
        r = c.getresponse()
        raw = r.read()
        assert r.getheader("Content-Encoding") == "gzip"
        assert b"gpuflops_build_info" in gzip.decompress(raw)
        c.request("GET", "/metrics", headers={
            "Accept": "application/openmetrics-text; version=1.0.0,text/plain;q=0.5"})
        r = c.getresponse()
        body = r.read().decode()
        assert r.getheader("Content-Type").startswith("application/openmetrics-text")
        assert body.rstrip().endswith("# EOF")
        assert "# TYPE gpuflops_gpu_flops counter" in body  # OpenMetrics names the family
    finally:
        c.close()
    status, headers, _text = _get(server.port, "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    assert "content-encoding" not in headers


def test_telemetry_path_is_configurable() -> None:
    server = MetricsServer(CollectorRegistry(), "127.0.0.1:0", lambda: (True, "ok"),
                           telemetry_path="/custom/metrics")
    server.start()
    try:
        assert _get(server.port, "/custom/metrics")[0] == 200
        assert _get(server.port, "/metrics")[0] == 404
        assert "/custom/metrics" in _get(server.port, "/")[2]
    finally:
        server.stop()
    with pytest.raises(ValueError):
        MetricsServer(CollectorRegistry(), "127.0.0.1:0", lambda: (True, "ok"),
                      telemetry_path="/healthz")


def test_failed_tls_handshake_is_one_log_line_and_reload_swaps_certificates(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging
    import socket
    import ssl
    import urllib.request

    from gpuflops.exporter.webconfig import load_web_config
    from tests.e2e.test_tls_scrape import _pki

    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    ca1, cert1, key1 = _pki(first)
    ca2, cert2, key2 = _pki(second)
    web = tmp_path / "web.yml"
    web.write_text(f"tls_server_config:\n  cert_file: {cert1}\n  key_file: {key1}\n")
    server = MetricsServer(CollectorRegistry(), "127.0.0.1:0", lambda: (True, "ok"),
                           ssl_context=load_web_config(web).ssl_context())
    server.start()
    url = f"https://127.0.0.1:{server.port}/healthz"
    try:
        with urllib.request.urlopen(url, context=ssl.create_default_context(cafile=str(ca1)),
                                    timeout=5) as r:
            assert r.status == 200
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="gpuflops.exporter.http"):
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")  # plain HTTP to TLS
                s.recv(100)
            deadline = time.monotonic() + 5
            while server.failed_connections < 1 and time.monotonic() < deadline:
                time.sleep(0.02)
        lines = [r for r in caplog.records if r.name == "gpuflops.exporter.http"]
        assert len(lines) == 1, [r.getMessage() for r in lines]
        assert lines[0].levelname == "WARNING" and "TLS handshake from 127.0.0.1 failed" in (
            lines[0].getMessage())
        assert lines[0].exc_info is None and "Traceback" not in caplog.text

        # Renewed certificates (here: another CA) are served to new connections after reload.
        web.write_text(f"tls_server_config:\n  cert_file: {cert2}\n  key_file: {key2}\n")
        server.reload(load_web_config(web).ssl_context(), None)
        with urllib.request.urlopen(url, context=ssl.create_default_context(cafile=str(ca2)),
                                    timeout=5) as r:
            assert r.status == 200
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(url, context=ssl.create_default_context(cafile=str(ca1)),
                                   timeout=5)
    finally:
        server.stop()
