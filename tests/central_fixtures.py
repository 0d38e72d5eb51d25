"""Fixtures over a real PostgreSQL (tests/pgserver.py): one cluster per session, one freshly
initialised central database per test, and logins for each role. ``central_tls`` is the same
over a second cluster that takes TLS connections only, with a throwaway CA (``tls``)."""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gpuflops.ledger.central import CentralConfig, CentralStore
from tests.pgserver import PgCluster, ServerTls, require_postgres
from tests.pki import Ca

# Login roles the tests connect as (members of the group roles `central init` creates).
LOGINS = {"gf_ship": "gpuflops_ship", "gf_read": "gpuflops_read", "gf_decide": "gpuflops_decide"}
PASSWORD = "test-password-not-secret"
CERT_LOGIN = "gf_cert"  # a shipping login that authenticates by client certificate only
_counter = itertools.count()


@dataclass
class CentralDb:
    """One central database: the admin DSN (socket, superuser) and role URLs (TCP, SCRAM)."""

    pg: PgCluster
    dbname: str
    password_file: Path

    @property
    def admin_url(self) -> str:
        return self.pg.admin_dsn(self.dbname)

    def url(self, login: str) -> str:
        return self.pg.tcp_url(login, self.dbname)

    def admin(self) -> CentralStore:
        return CentralStore(CentralConfig(self.admin_url))

    def store(self, login: str) -> CentralStore:
        return CentralStore(CentralConfig(self.url(login), PASSWORD))


@dataclass(frozen=True)
class ClientTls:
    """The test CA's PEM files that clients hold (their directory also has the server's
    certificate and key, which the TLS cluster copies into its own)."""

    ca: Path  # the CA that signed the server's certificate
    other_ca: Path  # a CA that did not
    cert: Path  # a client certificate for CERT_LOGIN, signed by ``ca``
    key: Path
    rogue_cert: Path  # a client certificate for CERT_LOGIN, signed by ``other_ca``
    rogue_key: Path


def _cluster(bin_dir: Path, tls: ServerTls | None = None) -> Iterator[PgCluster]:
    cluster = PgCluster(bin_dir, tls)
    try:
        cluster.initdb()
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture(scope="session")
def pg() -> Iterator[PgCluster]:
    yield from _cluster(require_postgres())


@pytest.fixture(scope="session")
def tls() -> Iterator[ClientTls]:
    d = Path(tempfile.mkdtemp(dir="/tmp", prefix="gfpki"))
    try:
        ca, other = Ca.create("gpuflops test CA"), Ca.create("gpuflops other CA")
        cert, key = ca.issue(d, "client", CERT_LOGIN, server=False)
        rogue_cert, rogue_key = other.issue(d, "rogue", CERT_LOGIN, server=False)
        ca.issue(d, "server", "127.0.0.1", server=True, ips=("127.0.0.1",))
        yield ClientTls(ca.write(d / "ca.crt"), other.write(d / "other-ca.crt"), cert, key,
                        rogue_cert, rogue_key)
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_tls(tls: ClientTls) -> Iterator[PgCluster]:
    d = tls.ca.parent
    yield from _cluster(require_postgres(),
                        ServerTls(d / "server.crt", d / "server.key", tls.ca, (CERT_LOGIN,)))


def init_central(pg: PgCluster, name: str) -> CentralDb:
    """Create database ``name`` with the central schema, the test logins and a password file."""
    pg.psql(f"CREATE DATABASE {name}")
    with CentralStore(CentralConfig(pg.admin_dsn(name))) as admin:
        admin.init_schema()
    for login, group in LOGINS.items():
        pg.psql(f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{login}') THEN "
                f"CREATE ROLE {login} LOGIN PASSWORD '{PASSWORD}' IN ROLE {group}; END IF; END $$")
    if pg.tls is not None:
        pg.psql(f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{CERT_LOGIN}') "
                f"THEN CREATE ROLE {CERT_LOGIN} LOGIN IN ROLE gpuflops_ship; END IF; END $$")
    fd, pw = tempfile.mkstemp(prefix="gfpw")
    with os.fdopen(fd, "w") as f:
        f.write(PASSWORD + "\n")
    return CentralDb(pg, name, Path(pw))


def _central(pg: PgCluster) -> Iterator[CentralDb]:
    if not pg.running():
        pg.start()
    db = init_central(pg, f"gf_{os.getpid()}_{next(_counter)}")
    try:
        yield db
    finally:
        db.password_file.unlink(missing_ok=True)
        if pg.running():
            pg.psql(f"DROP DATABASE IF EXISTS {db.dbname} WITH (FORCE)")


@pytest.fixture
def central(pg: PgCluster) -> Iterator[CentralDb]:
    yield from _central(pg)


@pytest.fixture
def central_tls(pg_tls: PgCluster) -> Iterator[CentralDb]:
    """A central database whose role URLs are ``sslmode=verify-full`` against the test CA."""
    yield from _central(pg_tls)
