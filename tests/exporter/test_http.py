"""MetricsServer over real sockets: /healthz from the daemon loop, 404, auth hook, errors."""

from __future__ import annotations

import base64
import http.client
from collections.abc import Iterator

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
