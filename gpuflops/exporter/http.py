"""HTTP endpoint: the telemetry path (``/metrics``), ``/healthz`` and an index page.

The metrics body comes from prometheus_client's own WSGI app (``make_wsgi_app``): content
negotiation between the Prometheus text format and OpenMetrics, gzip when the scraper accepts
it, and ``name[]`` filtering. It is served by prometheus_client's ``ThreadingWSGIServer``.

TLS and basic auth come from a web-config file (exporter/webconfig.py) and are applied here,
not through ``start_http_server(certfile=...)``, because that one (a) does the TLS handshake in
the accepting thread, so one stalled client blocks every scrape, (b) cannot swap certificates
without rebinding the port, which SIGHUP needs, and (c) has no optional client certificates,
basic auth or unauthenticated ``/healthz``. Here each connection is wrapped with the context
current at accept time and shakes hands in its own thread, with a timeout; a failed handshake
is one log line.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, cast
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client.exposition import ThreadingWSGIServer, make_wsgi_app
from prometheus_client.registry import CollectorRegistry

from gpuflops.config import DEFAULT_TELEMETRY_PATH

log = logging.getLogger(__name__)

HealthCheck = Callable[[], tuple[bool, str]]
AuthCheck = Callable[[str | None], bool]
StartResponse = Callable[..., Any]
_TEXT = "text/plain; charset=utf-8"
_HANDSHAKE_LOG_EVERY_S = 10.0  # one warning per this many seconds; the rest go to debug


def parse_listen(listen: str) -> tuple[str, int]:
    """'HOST:PORT' or '[v6]:PORT' -> (host, port); raises ValueError with the reason."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"listen address wants HOST:PORT, got {listen!r}")
    host = host.strip("[]") or "0.0.0.0"
    p = int(port)
    if not 0 <= p <= 65535:
        raise ValueError(f"port out of range in {listen!r}")
    return host, p


class _Handler(WSGIRequestHandler):
    timeout = 30  # a client that stalls (or never finishes a TLS handshake) frees its thread

    def setup(self) -> None:
        super().setup()  # applies the timeout to the socket
        if isinstance(self.request, ssl.SSLSocket):
            self.request.do_handshake()  # here, in this connection's thread, not in accept()

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http: " + format, *args)


class _Server(ThreadingWSGIServer):
    allow_reuse_address = True
    owner: MetricsServer

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = self.socket.accept()
        context = self.owner.ssl_context  # the context current now: SIGHUP may replace it
        if context is not None:
            sock = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr

    def handle_error(self, request: Any, client_address: Any) -> None:
        self.owner.connection_failed(client_address)


class MetricsServer:
    """Serves a registry in a background thread until :meth:`stop`.

    ``ssl_context`` and ``auth`` may be replaced while serving (:meth:`reload`); each new
    connection uses the values current when it is accepted.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        listen: str,
        health: HealthCheck,
        *,
        ssl_context: ssl.SSLContext | None = None,
        auth: AuthCheck | None = None,
        telemetry_path: str = DEFAULT_TELEMETRY_PATH,
    ) -> None:
        if not telemetry_path.startswith("/") or telemetry_path in ("/", "/healthz"):
            raise ValueError(f"telemetry path must start with / and not be / or /healthz, "
                             f"got {telemetry_path!r}")
        self.registry = registry
        self.health = health
        self.ssl_context = ssl_context
        self.auth = auth
        self.telemetry_path = telemetry_path
        self._metrics = make_wsgi_app(registry)
        self._failures = 0
        self._last_warning = float("-inf")
        self._lock = threading.Lock()
        host, port = parse_listen(listen)
        server_class = type("Server", (_Server,), {
            "address_family": socket.AF_INET6 if ":" in host else socket.AF_INET, "owner": self})
        self._httpd = cast(_Server, make_server(host, port, self._app, server_class,
                                                handler_class=_Handler))
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="http", daemon=True)

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def reload(self, ssl_context: ssl.SSLContext | None, auth: AuthCheck | None) -> None:
        """New TLS material and credentials for connections accepted from now on."""
        self.ssl_context, self.auth = ssl_context, auth

    @property
    def failed_connections(self) -> int:
        """Connections that failed before a response (TLS handshakes, resets, timeouts)."""
        return self._failures

    def connection_failed(self, client_address: Any) -> None:
        """One log line per failed connection (at most one warning per 10 s), no traceback."""
        import sys

        exc = sys.exc_info()[1]
        now = time.monotonic()
        with self._lock:
            self._failures += 1
            loud = now - self._last_warning >= _HANDSHAKE_LOG_EVERY_S
            if loud:
                self._last_warning = now
        what = "TLS handshake" if isinstance(exc, ssl.SSLError) else "connection"
        peer = client_address[0] if isinstance(client_address, tuple) else client_address
        log.log(logging.WARNING if loud else logging.DEBUG, "http: %s from %s failed: %s",
                what, peer, exc or "unknown error")

    def _app(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        method = environ["REQUEST_METHOD"]
        if path == "/healthz":
            ok, msg = self.health()
            return _reply(start_response, "200 OK" if ok else "503 Service Unavailable",
                          (msg + "\n").encode(), _TEXT, method)
        auth = self.auth
        if auth is not None and not auth(environ.get("HTTP_AUTHORIZATION")):
            return _reply(start_response, "401 Unauthorized", b"Unauthorized\n", _TEXT, method,
                          [("WWW-Authenticate", 'Basic realm="gpuflops"')])
        if path == self.telemetry_path:
            return self._serve_metrics(environ, start_response, method)
        if path == "/":
            link = self.telemetry_path.encode()
            body = (b"<html><head><title>gpuflops</title></head><body><h1>gpuflops</h1>"
                    b"<a href='" + link + b"'>metrics</a> <a href='/healthz'>healthz</a>"
                    b"</body></html>\n")
            return _reply(start_response, "200 OK", body, "text/html; charset=utf-8", method)
        return _reply(start_response, "404 Not Found", b"not found\n", _TEXT, method)

    def _serve_metrics(self, environ: dict[str, Any], start_response: StartResponse,
                       method: str) -> Iterable[bytes]:
        captured: list[Any] = []

        def capture(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
            captured[:] = [status, headers]

        try:
            # HEAD is answered like GET without the body (prometheus_client allows only GET).
            body = b"".join(self._metrics({**environ, "REQUEST_METHOD": "GET"}
                                          if method == "HEAD" else environ, capture))
        except Exception as e:  # a collector bug must not kill the endpoint
            log.exception("scrape failed")
            return _reply(start_response, "500 Internal Server Error",
                          f"scrape failed: {e}\n".encode(), _TEXT, method)
        status, headers = captured
        start_response(status, [*headers, ("Content-Length", str(len(body)))])
        return [b"" if method == "HEAD" else body]


def _reply(start_response: StartResponse, status: str, body: bytes, ctype: str, method: str,
           headers: list[tuple[str, str]] | None = None) -> list[bytes]:
    start_response(status, [("Content-Type", ctype), ("Content-Length", str(len(body))),
                            *(headers or [])])
    return [b"" if method == "HEAD" else body]
