"""HTTP endpoint: ``/metrics`` (Prometheus text format) and ``/healthz``.

TLS and basic auth are optional and come from a web-config file (exporter/webconfig.py);
``/healthz`` stays unauthenticated so kubelet and systemd probes need no credentials.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

log = logging.getLogger(__name__)

HealthCheck = Callable[[], tuple[bool, str]]
AuthCheck = Callable[[str | None], bool]


def parse_listen(listen: str) -> tuple[str, int]:
    """'HOST:PORT' or '[v6]:PORT' -> (host, port); raises ValueError with the reason."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--listen wants HOST:PORT, got {listen!r}")
    host = host.strip("[]") or "0.0.0.0"
    p = int(port)
    if not 0 <= p <= 65535:
        raise ValueError(f"port out of range in {listen!r}")
    return host, p


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], app: MetricsServer) -> None:
        import socket

        if ":" in addr[0]:
            self.address_family = socket.AF_INET6
        super().__init__(addr, _Handler)
        self.app = app


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    timeout = 30  # a client that stalls (or never finishes a TLS handshake) frees its thread

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http: " + format, *args)

    def _send(self, code: int, body: bytes, ctype: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        app = self.server.app
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            ok, msg = app.health()
            self._send(200 if ok else 503, (msg + "\n").encode(), "text/plain; charset=utf-8")
            return
        if app.auth is not None and not app.auth(self.headers.get("Authorization")):
            self._send(
                401,
                b"Unauthorized\n",
                "text/plain; charset=utf-8",
                {"WWW-Authenticate": 'Basic realm="gpuflops"'},
            )
            return
        if path == "/metrics":
            try:
                body = generate_latest(app.registry)
            except Exception as e:  # a collector bug must not kill the endpoint
                log.exception("scrape failed")
                self._send(500, f"scrape failed: {e}\n".encode(), "text/plain; charset=utf-8")
                return
            self._send(200, body, CONTENT_TYPE_LATEST)
            return
        if path == "/":
            self._send(
                200,
                b"<html><body><h1>gpuflops</h1><a href='/metrics'>metrics</a> "
                b"<a href='/healthz'>healthz</a></body></html>\n",
                "text/html; charset=utf-8",
            )
            return
        self._send(404, b"not found\n", "text/plain; charset=utf-8")


class MetricsServer:
    """Serves a registry in a background thread until :meth:`stop`."""

    def __init__(
        self,
        registry: CollectorRegistry,
        listen: str,
        health: HealthCheck,
        *,
        ssl_context: ssl.SSLContext | None = None,
        auth: AuthCheck | None = None,
    ) -> None:
        self.registry = registry
        self.health = health
        self.auth = auth
        host, port = parse_listen(listen)
        self._httpd = _Server((host, port), self)
        if ssl_context is not None:
            # Handshake in the handler thread (on first read), so a slow client cannot block accept().
            self._httpd.socket = ssl_context.wrap_socket(
                self._httpd.socket, server_side=True, do_handshake_on_connect=False
            )
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="http", daemon=True)

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
