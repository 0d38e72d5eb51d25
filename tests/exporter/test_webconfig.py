"""Web-config: real certificates, real TLS handshakes against http.server, real bcrypt."""

from __future__ import annotations

import base64
import contextlib
import datetime
import http.client
import http.server
import ipaddress
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import bcrypt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gpuflops.exporter.webconfig import WebConfig, WebConfigError, load_web_config

PASSWORD = "s3cret-scrape"
# Cost 4, the minimum, keeps the suite fast; the code path is the same as for cost 12.
HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()


@dataclass(frozen=True)
class Pki:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_key: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer_name, issuer_key = issuer if issuer else (name, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
    else:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _write_cert(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca_key = _key()
    ca_cert = _cert("gpuflops test CA", ca_key, None, ca=True)
    server_key, client_key = _key(), _key()
    return Pki(
        ca=_write_cert(d / "ca.crt", ca_cert),
        server_cert=_write_cert(
            d / "server.crt",
            _cert("127.0.0.1", server_key, (ca_cert.subject, ca_key), server=True),
        ),
        server_key=_write_key(d / "server.key", server_key),
        client_cert=_write_cert(
            d / "client.crt", _cert("prometheus", client_key, (ca_cert.subject, ca_key))
        ),
        client_key=_write_key(d / "client.key", client_key),
        other_key=_write_key(d / "other.key", _key()),
    )


def _write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "web-config.yml"
    path.write_text(text)
    return path


def _tls_config(pki: Pki, extra: str = "") -> str:
    return (
        "tls_server_config:\n"
        f"  cert_file: {pki.server_cert}\n"
        f"  key_file: {pki.server_key}\n" + extra
    )



@contextlib.contextmanager
def serve(config: WebConfig) -> Iterator[int]:
    """A real HTTPS (or HTTP) server that guards every request with ``config``; yields its port."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if not config.check_auth(self.headers.get("Authorization")):
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="gpuflops"')
                self.end_headers()
                return
            body = b"gpuflops_build_info 1\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = config.ssl_context()
    if context is not None:
        server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _client_context(
    pki: Pki, *, cert: bool = False, max_version: ssl.TLSVersion | None = None
) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    if cert:
        context.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    if max_version is not None:
        context.maximum_version = max_version
    return context


def _get(
    port: int, context: ssl.SSLContext | None, auth: tuple[str, str] | None = None
) -> int:
    conn: http.client.HTTPConnection
    if context is None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    else:
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=5, context=context)
    headers = {}
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    try:
        conn.request("GET", "/metrics", headers=headers)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def test_tls_handshake_and_request(pki: Pki, tmp_path: Path) -> None:
    config = load_web_config(_write_config(tmp_path, _tls_config(pki)))
    with serve(config) as port:
        assert _get(port, _client_context(pki)) == 200
        # A client that does not trust the CA refuses the server.
        with pytest.raises(ssl.SSLCertVerificationError):
            _get(port, ssl.create_default_context())


def test_relative_paths_are_relative_to_the_config_file(pki: Pki, tmp_path: Path) -> None:
    (tmp_path / "tls").mkdir()
    (tmp_path / "tls" / "s.crt").write_bytes(pki.server_cert.read_bytes())
    (tmp_path / "tls" / "s.key").write_bytes(pki.server_key.read_bytes())
    path = _write_config(
        tmp_path, "tls_server_config:\n  cert_file: tls/s.crt\n  key_file: tls/s.key\n"
    )
    config = load_web_config(path)
    assert config.tls is not None and config.tls.cert_file == tmp_path / "tls" / "s.crt"
    with serve(config) as port:
        assert _get(port, _client_context(pki)) == 200


def test_client_certificates_required(pki: Pki, tmp_path: Path) -> None:
    extra = f"  client_ca_file: {pki.ca}\n  client_auth_type: RequireAndVerifyClientCert\n"
    config = load_web_config(_write_config(tmp_path, _tls_config(pki, extra)))
    with serve(config) as port:
        assert _get(port, _client_context(pki, cert=True)) == 200
        # TLS 1.3 reports a missing client certificate after the handshake, on first read.
        with pytest.raises((ssl.SSLError, ConnectionResetError, http.client.RemoteDisconnected)):
            _get(port, _client_context(pki))


def test_min_version_refuses_older_clients(pki: Pki, tmp_path: Path) -> None:
    config = load_web_config(_write_config(tmp_path, _tls_config(pki, "  min_version: TLS13\n")))
    with serve(config) as port:
        assert _get(port, _client_context(pki)) == 200
        with pytest.raises(ssl.SSLError):
            _get(port, _client_context(pki, max_version=ssl.TLSVersion.TLSv1_2))


def test_basic_auth_over_tls(pki: Pki, tmp_path: Path) -> None:
    text = _tls_config(pki) + f"basic_auth_users:\n  prometheus: {HASH}\n"
    config = load_web_config(_write_config(tmp_path, text))
    assert config.auth_required
    with serve(config) as port:
        client = _client_context(pki)
        assert _get(port, client, ("prometheus", PASSWORD)) == 200
        assert _get(port, client) == 401
        assert _get(port, client, ("prometheus", "wrong")) == 401
        assert _get(port, client, ("grafana", PASSWORD)) == 401


def test_no_tls_no_auth_from_an_empty_file(tmp_path: Path) -> None:
    config = load_web_config(_write_config(tmp_path, ""))
    assert config.ssl_context() is None
    assert not config.auth_required
    assert config.check_auth(None)
    with serve(config) as port:
        assert _get(port, None) == 200


class CountingCheck:
    """bcrypt.checkpw, counting its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, password: bytes, hashed: bytes) -> bool:
        self.calls += 1
        return bcrypt.checkpw(password, hashed)


def _auth_config(tmp_path: Path, check: Callable[[bytes, bytes], bool]) -> WebConfig:
    text = f"basic_auth_users:\n  prometheus: {HASH}\n  alice: '{HASH.replace('$2b$', '$2y$')}'\n"
    return load_web_config(_write_config(tmp_path, text), checkpw=check)


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_successful_checks_are_cached_failures_are_not(tmp_path: Path) -> None:
    check = CountingCheck()
    config = _auth_config(tmp_path, check)
    assert config.check_auth(_basic("prometheus", PASSWORD))
    assert config.check_auth(_basic("prometheus", PASSWORD))
    assert check.calls == 1
    assert not config.check_auth(_basic("prometheus", "nope"))
    assert not config.check_auth(_basic("prometheus", "nope"))
    assert check.calls == 3
    # htpasswd writes $2y$ hashes.
    assert config.check_auth(_basic("alice", PASSWORD))


def test_unknown_user_still_pays_for_bcrypt(tmp_path: Path) -> None:
    check = CountingCheck()
    config = _auth_config(tmp_path, check)
    assert not config.check_auth(_basic("mallory", PASSWORD))
    assert check.calls == 1
    # ... against a hash of the users' own cost, so timing does not tell users apart.
    assert config.dummy_hash[:7] == HASH[:7].encode()


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "Bearer abc",
        "Basic",
        "Basic !!!not-base64!!!",
        "Basic " + base64.b64encode(b"no-colon").decode(),
        _basic("prometheus", "x" * 100),  # over bcrypt's 72 bytes
    ],
)
def test_malformed_headers_are_refused(tmp_path: Path, header: str | None) -> None:
    config = _auth_config(tmp_path, bcrypt.checkpw)
    assert config.check_auth(header) is False


def test_scheme_is_case_insensitive(tmp_path: Path) -> None:
    config = _auth_config(tmp_path, bcrypt.checkpw)
    assert config.check_auth(_basic("prometheus", PASSWORD).replace("Basic", "basic"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tls_server_config: [", "not valid YAML"),
        ("- a\n- b\n", "must be a YAML mapping"),
        ("http_server_config:\n  http2: false\n", "unsupported field(s) http_server_config"),
        ("tls_server_config:\n  key_file: k\n", "cert_file is required"),
        ("tls_server_config:\n  cert_file: c\n  key_file: k\n  cipher_suites: [x]\n",
         "unsupported field(s) in tls_server_config: cipher_suites"),
        ("tls_server_config:\n  cert_file: c\n  key_file: k\n  min_version: TLS14\n",
         "min_version 'TLS14'"),
        ("tls_server_config:\n  cert_file: c\n  key_file: k\n  client_ca_file: ca\n",
         "client_auth_type is NoClientCert"),
        ("tls_server_config:\n  cert_file: c\n  key_file: k\n"
         "  client_auth_type: RequireAndVerifyClientCert\n", "needs client_ca_file"),
        ("tls_server_config:\n  cert_file: c\n  key_file: k\n  client_ca_file: ca\n"
         "  client_auth_type: RequireAnyClientCert\n", "is not supported"),
        ("tls_server_config:\n  cert_file: c\n  key_file: k\n"
         "  min_version: TLS13\n  max_version: TLS12\n", "below min_version"),
        ("basic_auth_users:\n  prometheus: hunter2\n", "prometheus is not a bcrypt hash"),
        ("basic_auth_users: [prometheus]\n", "must be a mapping"),
        (f"basic_auth_users:\n  'a:b': {HASH}\n", "invalid user name"),
    ],
)
def test_bad_files_get_clear_errors(tmp_path: Path, text: str, message: str) -> None:
    path = _write_config(tmp_path, text)
    with pytest.raises(WebConfigError) as info:
        load_web_config(path)
    assert message in str(info.value)
    assert str(path) in str(info.value)
    assert "hunter2" not in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(WebConfigError, match="cannot read"):
        load_web_config(tmp_path / "absent.yml")


def test_missing_certificate_fails_at_load(tmp_path: Path) -> None:
    path = _write_config(tmp_path, "tls_server_config:\n  cert_file: c.crt\n  key_file: k.key\n")
    with pytest.raises(WebConfigError, match="cannot load cert_file"):
        load_web_config(path)


def test_key_not_matching_the_certificate_fails_at_load(pki: Pki, tmp_path: Path) -> None:
    text = f"tls_server_config:\n  cert_file: {pki.server_cert}\n  key_file: {pki.other_key}\n"
    with pytest.raises(WebConfigError, match="cannot load cert_file"):
        load_web_config(_write_config(tmp_path, text))


def test_renewed_certificate_is_read_by_a_new_context(pki: Pki, tmp_path: Path) -> None:
    cert, key = tmp_path / "s.crt", tmp_path / "s.key"
    cert.write_bytes(pki.server_cert.read_bytes())
    key.write_bytes(pki.server_key.read_bytes())
    config = load_web_config(
        _write_config(tmp_path, f"tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n")
    )
    key.write_bytes(pki.other_key.read_bytes())  # a botched renewal
    with pytest.raises(WebConfigError):
        config.ssl_context()


def test_the_shipped_web_config_loads_as_plain_http() -> None:
    """systemd/web-config.yml, which docs/operations.md installs: every field commented out."""
    shipped = Path(__file__).parents[2] / "systemd" / "web-config.yml"
    config = load_web_config(shipped)
    assert config.tls is None and not config.auth_required
    body = "\n".join(line.lstrip("# ") for line in shipped.read_text().splitlines()
                     if line.startswith("# ") and ":" in line and not line.startswith("# TLS"))
    assert "tls_server_config:" in body and "basic_auth_users:" in body
