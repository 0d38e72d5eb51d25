"""Fixtures over a real PostgreSQL (tests/pgserver.py): one cluster per session, one freshly
initialised central database per test, and logins for each role."""

from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gpuflops.ledger.central import CentralConfig, CentralStore
from tests.pgserver import PgCluster, require_postgres

# Login roles the tests connect as (members of the group roles `central init` creates).
LOGINS = {"gf_ship": "gpuflops_ship", "gf_read": "gpuflops_read", "gf_decide": "gpuflops_decide"}
PASSWORD = "test-password-not-secret"
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


@pytest.fixture(scope="session")
def pg() -> Iterator[PgCluster]:
    cluster = PgCluster(require_postgres())
    try:
        cluster.initdb()
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()


def init_central(pg: PgCluster, name: str) -> CentralDb:
    """Create database ``name`` with the central schema, the test logins and a password file."""
    pg.psql(f"CREATE DATABASE {name}")
    with CentralStore(CentralConfig(pg.admin_dsn(name))) as admin:
        admin.init_schema()
    for login, group in LOGINS.items():
        pg.psql(f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{login}') THEN "
                f"CREATE ROLE {login} LOGIN PASSWORD '{PASSWORD}' IN ROLE {group}; END IF; END $$")
    fd, pw = tempfile.mkstemp(prefix="gfpw")
    with os.fdopen(fd, "w") as f:
        f.write(PASSWORD + "\n")
    return CentralDb(pg, name, Path(pw))


@pytest.fixture
def central(pg: PgCluster) -> Iterator[CentralDb]:
    if not pg.running():
        pg.start()
    db = init_central(pg, f"gf_{os.getpid()}_{next(_counter)}")
    try:
        yield db
    finally:
        db.password_file.unlink(missing_ok=True)
        if pg.running():
            pg.psql(f"DROP DATABASE IF EXISTS {db.dbname} WITH (FORCE)")
