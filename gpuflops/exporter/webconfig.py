"""TLS and basic auth for the metrics endpoint, from a Prometheus exporter-toolkit web-config file.

The file format is the one node_exporter and every exporter-toolkit exporter read, so operators
reuse what they know (https://prometheus.io/docs/prometheus/latest/configuration/https/)::

    tls_server_config:
      cert_file: server.crt            # relative paths are relative to this file's directory
      key_file: server.key
      client_ca_file: clients-ca.crt   # optional: verify client certificates
      client_auth_type: RequireAndVerifyClientCert
      min_version: TLS12
    basic_auth_users:
      prometheus: $2b$12$...           # bcrypt hash (htpasswd -nBC 12 "" | tr -d ':\\n')

Unlike exporter-toolkit, fields gpuflops does not implement (cipher_suites, http_server_config,
...) are refused, not ignored: a security setting that silently does nothing is worse than an
error. PyYAML parses the file (the format is YAML; the stdlib has no YAML parser) and bcrypt
checks the passwords (the hashes are bcrypt; the stdlib has none); only this module imports them.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import secrets
import ssl
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bcrypt
import yaml

CheckPw = Callable[[bytes, bytes], bool]

_TLS_VERSIONS: Mapping[str, ssl.TLSVersion] = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
# Go's tls.ClientAuthType names, as exporter-toolkit spells them. RequestClientCert and
# RequireAnyClientCert ask for a certificate without verifying it; Python's ssl module cannot
# do that, and accepting unverified client certificates is no authentication anyway.
_CLIENT_AUTH: Mapping[str, ssl.VerifyMode] = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
_UNVERIFIED_CLIENT_AUTH = frozenset({"RequestClientCert", "RequireAnyClientCert"})
_TOP_KEYS = frozenset({"tls_server_config", "basic_auth_users"})
_TLS_KEYS = frozenset(
    {"cert_file", "key_file", "client_ca_file", "client_auth_type", "min_version", "max_version"}
)
_BCRYPT = re.compile(rb"^\$2[aby]\$(0[4-9]|[12]\d|3[01])\$[./A-Za-z0-9]{53}$")
# A bcrypt hash of a random password. Unknown users are checked against a hash like it, of the
# users' own cost (load_web_config makes one), so that a wrong user name takes as long as a
# wrong password: no user enumeration by timing.
_DUMMY_HASH = b"$2b$10$oBIJGUVkww55wkec3f65budrwdQN7asmeBe7LDMsBVHebmq5eYrNS"
_CACHE_SIZE = 1024


class WebConfigError(ValueError):
    """A web-config file that cannot be used; the message names the file and the field."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


@dataclass(frozen=True)
class TLSServerConfig:
    """The tls_server_config section, with paths made absolute."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None
    client_auth_type: str = "NoClientCert"
    min_version: str = "TLS12"
    max_version: str | None = None


@dataclass
class WebConfig:
    """Loaded web configuration: builds the SSL context and checks Authorization headers."""

    path: Path
    tls: TLSServerConfig | None = None
    # user -> bcrypt hash
    users: Mapping[str, bytes] = field(default_factory=dict)
    checkpw: CheckPw = bcrypt.checkpw
    dummy_hash: bytes = _DUMMY_HASH
    _cache_key: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)
    _cache: OrderedDict[bytes, None] = field(default_factory=OrderedDict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def auth_required(self) -> bool:
        """True when basic_auth_users is set and requests must authenticate."""
        return bool(self.users)

    def ssl_context(self) -> ssl.SSLContext | None:
        """A server-side context from the files as they are now; None when TLS is not configured.

        Reads the certificate and key on every call, so a caller can pick up renewed
        certificates by building a new context (e.g. on SIGHUP).
        """
        if self.tls is None:
            return None
        tls = self.tls
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = _TLS_VERSIONS[tls.min_version]
        if tls.max_version is not None:
            context.maximum_version = _TLS_VERSIONS[tls.max_version]
        try:
            context.load_cert_chain(certfile=tls.cert_file, keyfile=tls.key_file)
        except (OSError, ssl.SSLError) as e:
            raise WebConfigError(
                self.path,
                f"tls_server_config: cannot load cert_file {tls.cert_file} with key_file "
                f"{tls.key_file}: {e}",
            ) from e
        context.verify_mode = _CLIENT_AUTH[tls.client_auth_type]
        if tls.client_ca_file is not None:
            try:
                context.load_verify_locations(cafile=tls.client_ca_file)
            except (OSError, ssl.SSLError) as e:
                raise WebConfigError(
                    self.path,
                    f"tls_server_config.client_ca_file {tls.client_ca_file}: {e}",
                ) from e
        return context

    def check_auth(self, header: str | None) -> bool:
        """Whether an Authorization header value grants access (always True without users)."""
        if not self.users:
            return True
        credentials = _parse_basic(header)
        if credentials is None:
            return False
        user, password = credentials
        digest = hmac.new(self._cache_key, user + b"\0" + password, hashlib.sha256).digest()
        with self._lock:
            if digest in self._cache:
                self._cache.move_to_end(digest)
                return True
        hashed = self.users.get(user.decode("utf-8", "surrogateescape"))
        try:
            ok = self.checkpw(password, hashed if hashed is not None else self.dummy_hash)
        except ValueError:
            # bcrypt refuses passwords over 72 bytes; such a password cannot match.
            ok = False
        ok = ok and hashed is not None
        if ok:
            # Only successes are cached (exporter-toolkit does the same): bcrypt is slow by
            # design, and Prometheus sends the same credentials on every scrape. Failures stay
            # slow, so guessing stays slow.
            with self._lock:
                self._cache[digest] = None
                if len(self._cache) > _CACHE_SIZE:
                    self._cache.popitem(last=False)
        return ok


def _parse_basic(header: str | None) -> tuple[bytes, bytes] | None:
    """(user, password) from 'Basic base64(user:password)'; None when absent or malformed."""
    if not header:
        return None
    scheme, _, encoded = header.strip().partition(" ")
    if scheme.lower() != "basic" or not encoded:
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, sep, password = decoded.partition(b":")
    if not sep:
        return None
    return user, password


def load_web_config(
    path: str | os.PathLike[str], *, checkpw: CheckPw = bcrypt.checkpw
) -> WebConfig:
    """Parse and validate a web-config file, TLS files included; WebConfigError if unusable."""
    config_path = Path(path)
    try:
        text = config_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise WebConfigError(config_path, f"cannot read: {e}") from e
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise WebConfigError(config_path, f"not valid YAML: {e}") from e
    if raw is None:
        # An empty file means what it does for exporter-toolkit: plain HTTP, no auth.
        raw = {}
    if not isinstance(raw, dict):
        raise WebConfigError(config_path, "must be a YAML mapping")
    _refuse_unknown(config_path, raw, _TOP_KEYS, "")
    base = config_path.parent
    tls = _tls(config_path, base, raw.get("tls_server_config"))
    users = _users(config_path, raw.get("basic_auth_users"))
    config = WebConfig(path=config_path, tls=tls, users=users, checkpw=checkpw)
    if users:
        cost = max(int(h[4:6]) for h in users.values())
        config.dummy_hash = bcrypt.hashpw(secrets.token_bytes(16), bcrypt.gensalt(rounds=cost))
    # Fail now, at startup, on a certificate that does not load, not at the first scrape.
    config.ssl_context()
    return config


def _refuse_unknown(
    path: Path, raw: Mapping[str, Any], allowed: frozenset[str], where: str
) -> None:
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise WebConfigError(
            path,
            f"unsupported field(s) {where}{', '.join(map(str, unknown))}; gpuflops supports "
            f"{', '.join(sorted(allowed))}",
        )


def _tls(path: Path, base: Path, raw: Any) -> TLSServerConfig | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise WebConfigError(path, "tls_server_config must be a mapping")
    _refuse_unknown(path, raw, _TLS_KEYS, "in tls_server_config: ")
    for key in ("cert_file", "key_file"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise WebConfigError(path, f"tls_server_config.{key} is required")

    def resolve(value: str) -> Path:
        return base / Path(value).expanduser()

    ca = raw.get("client_ca_file")
    if ca is not None and (not isinstance(ca, str) or not ca):
        raise WebConfigError(path, "tls_server_config.client_ca_file must be a path")
    auth = raw.get("client_auth_type") or "NoClientCert"
    if auth in _UNVERIFIED_CLIENT_AUTH:
        raise WebConfigError(
            path,
            f"tls_server_config.client_auth_type {auth} (accept unverified client "
            "certificates) is not supported; use VerifyClientCertIfGiven or "
            "RequireAndVerifyClientCert",
        )
    if auth not in _CLIENT_AUTH:
        raise WebConfigError(
            path,
            f"tls_server_config.client_auth_type {auth!r} is not one of "
            f"{', '.join(_CLIENT_AUTH)}",
        )
    if ca is not None and auth == "NoClientCert":
        raise WebConfigError(
            path, "tls_server_config.client_ca_file is set but client_auth_type is NoClientCert"
        )
    if ca is None and auth != "NoClientCert":
        raise WebConfigError(
            path, f"tls_server_config.client_auth_type {auth} needs client_ca_file"
        )
    min_version = raw.get("min_version", "TLS12")
    max_version = raw.get("max_version")
    for key, value in (("min_version", min_version), ("max_version", max_version)):
        if value is not None and value not in _TLS_VERSIONS:
            raise WebConfigError(
                path, f"tls_server_config.{key} {value!r} is not one of {', '.join(_TLS_VERSIONS)}"
            )
    if min_version is None:
        raise WebConfigError(path, "tls_server_config.min_version must not be empty")
    if max_version is not None and _TLS_VERSIONS[max_version] < _TLS_VERSIONS[min_version]:
        raise WebConfigError(path, "tls_server_config.max_version is below min_version")
    return TLSServerConfig(
        cert_file=resolve(raw["cert_file"]),
        key_file=resolve(raw["key_file"]),
        client_ca_file=resolve(ca) if ca is not None else None,
        client_auth_type=auth,
        min_version=str(min_version),
        max_version=None if max_version is None else str(max_version),
    )


def _users(path: Path, raw: Any) -> dict[str, bytes]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise WebConfigError(path, "basic_auth_users must be a mapping of user to bcrypt hash")
    users = {}
    for user, hashed in raw.items():
        if not isinstance(user, str) or not user or ":" in user:
            raise WebConfigError(path, f"basic_auth_users: invalid user name {user!r}")
        encoded = hashed.encode() if isinstance(hashed, str) else b""
        if not _BCRYPT.match(encoded):
            # Never echo the value: it may be a plain-text password put there by mistake.
            raise WebConfigError(
                path, f"basic_auth_users.{user} is not a bcrypt hash ($2b$<cost>$..., 60 chars)"
            )
        users[user] = encoded
    return users
