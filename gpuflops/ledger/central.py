"""The central store in PostgreSQL: the only module that imports psycopg.

Connections come from a libpq URL (with its TLS parameters: ``sslmode``, ``sslrootcert``, ...).
A password in the URL is refused, because argv is visible to every user of the machine; it
comes from a file (``--central-password-file``) or from libpq's own environment
(``PGPASSWORD``, ``PGPASSFILE``/``~/.pgpass``). The schema lives in central_schema.sql; every
integrity check on ingest runs inside PostgreSQL (triggers), whoever inserts.

Other modules run their SQL through :class:`CentralStore`'s ``fetch``/``stream``/``execute``,
which map psycopg's errors to :class:`CentralError`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import psycopg
from psycopg import conninfo

# 2: job totals carry the ledger's v4 columns (hmma_flops, half_rate_fraction). A version 1
# store cannot be upgraded in place: its rollups never carried the HMMA share.
CENTRAL_SCHEMA_VERSION = 2
Params = Sequence[Any] | Mapping[str, Any] | None  # None: the SQL is sent as is (no % parsing)
CONNECT_TIMEOUT_S = 5


class CentralError(Exception):
    """A central-store operation failed. ``kind``: config, connect, refused, fork, key, query,
    privilege, schema. ``sqlstate`` is PostgreSQL's code when it answered."""

    def __init__(self, kind: str, message: str, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.sqlstate = sqlstate


@dataclass(frozen=True)
class CentralConfig:
    """Where the central store is and how to authenticate; never holds a password in the URL."""

    url: str
    password: str | None = None

    @classmethod
    def from_options(cls, url: str, password_file: Path | None = None) -> CentralConfig:
        """Validate ``url`` (refusing an embedded password) and read the password file."""
        try:
            params = conninfo.conninfo_to_dict(url)
        except psycopg.ProgrammingError as exc:
            raise CentralError("config", f"--central: not a libpq URL or conninfo: {exc}") from None
        if params.get("password"):
            raise CentralError(
                "config", "--central: the URL contains a password, and command lines are "
                "visible to every user of the machine. Put the password in a file "
                "(--central-password-file FILE, mode 0600) or in PGPASSWORD / a PGPASSFILE")
        password = None
        if password_file is not None:
            try:
                text = Path(password_file).read_text(encoding="utf-8")
            except OSError as exc:
                raise CentralError("config", f"--central-password-file {password_file}: "
                                             f"{exc.strerror or exc}") from None
            password = text.rstrip("\r\n")
            if not password:
                raise CentralError("config", f"--central-password-file {password_file} is empty")
        return cls(url, password)

    def describe(self) -> dict[str, str]:
        """Host, port, database and user, for reports and logs (no secrets)."""
        params = conninfo.conninfo_to_dict(self.url)
        return {k: str(params[k]) for k in ("host", "port", "dbname", "user", "sslmode")
                if params.get(k)}


def _schema_sql() -> str:
    return (resources.files("gpuflops") / "ledger" / "central_schema.sql").read_text("utf-8")


def _error(exc: psycopg.Error) -> CentralError:
    state = exc.sqlstate
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if state is not None and state.startswith("GF"):
        return CentralError("refused", text, state)
    if isinstance(exc, psycopg.errors.InsufficientPrivilege):
        return CentralError("privilege", text, state)
    if isinstance(exc, psycopg.errors.UndefinedTable | psycopg.errors.InvalidSchemaName):
        return CentralError("schema", f"{text} (run `gpuflops central init` first)", state)
    if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
        return CentralError("connect", text, state)
    return CentralError("query", text, state)


@dataclass(frozen=True)
class Head:
    """A ledger's newest shipped rollup, and the raw record it anchors."""

    seq: int
    hash: str
    raw_seq: int
    raw_hash: str
    failed: str | None


@dataclass(frozen=True)
class Registration:
    ledger_id: str
    node: str
    cluster: str
    public_key: bytes


class CentralStore:
    """One connection to the central store, reconnected on demand; thread-safe by a lock."""

    def __init__(self, config: CentralConfig, *, application_name: str = "gpuflops") -> None:
        self.config = config
        self._application_name = application_name
        self._conn: psycopg.Connection[Any] | None = None
        self._lock = threading.RLock()

    def __enter__(self) -> CentralStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is not None and not self._conn.closed and not self._conn.broken:
            return self._conn
        self.close()
        kwargs: dict[str, Any] = {
            "autocommit": True, "connect_timeout": CONNECT_TIMEOUT_S,
            "application_name": self._application_name,
            # A peer that vanished (host down, network cut) is noticed within ~30 s.
            "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5,
            "keepalives_count": 3,
        }
        if self.config.password is not None:
            kwargs["password"] = self.config.password
        try:
            self._conn = psycopg.connect(self.config.url, **kwargs)
        except psycopg.Error as exc:
            raise CentralError("connect", f"cannot connect: {_error(exc)}") from None
        return self._conn

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                with contextlib.suppress(psycopg.Error):
                    self._conn.close()
                self._conn = None

    @contextlib.contextmanager
    def transaction(self) -> Iterator[psycopg.Cursor[Any]]:
        """A cursor inside one transaction; committed on success, rolled back otherwise."""
        with self._lock:
            conn = self._connection()
            try:
                with conn.transaction(), conn.cursor() as cur:
                    yield cur
            except psycopg.Error as exc:
                raise _error(exc) from None

    def fetch(self, sql: str, params: Params = None) -> list[tuple[Any, ...]]:
        with self.transaction() as cur:
            cur.execute(sql, params)
            return list(cur.fetchall())

    def execute(self, sql: str, params: Params = None) -> int:
        with self.transaction() as cur:
            cur.execute(sql, params)
            return int(cur.rowcount)

    def stream(self, sql: str, params: Params = None, *,
               batch: int = 2000) -> Iterator[tuple[Any, ...]]:
        """Rows of a large query through a server-side cursor, in one read-only snapshot."""
        with self._lock:
            conn = self._connection()
            try:
                with conn.transaction(), conn.cursor(name="gpuflops_stream") as cur:
                    cur.itersize = batch
                    cur.execute(sql, params)
                    yield from cur
            except psycopg.Error as exc:
                raise _error(exc) from None

    # -- schema -------------------------------------------------------------------------------

    def init_schema(self) -> bool:
        """Create the schema, roles and grants; False when it already exists at this version."""
        rows = self.fetch("SELECT 1 FROM pg_namespace WHERE nspname = 'gpuflops'")
        if rows:
            version = self.schema_version()
            if version != CENTRAL_SCHEMA_VERSION:
                raise CentralError("schema", f"central schema version {version}, this gpuflops "
                                             f"knows {CENTRAL_SCHEMA_VERSION} (docs/fleet.md)")
            return False
        with self.transaction() as cur:
            cur.execute(_schema_sql())
        return True

    def schema_version(self) -> int:
        rows = self.fetch("SELECT value FROM gpuflops.meta WHERE key = 'schema_version'")
        return int(rows[0][0]) if rows else 0

    # -- shipping -----------------------------------------------------------------------------

    def register(self, reg: Registration) -> Registration:
        """Register a ledger (first ship: trust on first use); returns what is registered."""
        with self.transaction() as cur:
            cur.execute(
                "INSERT INTO gpuflops.ledgers (ledger_id, node, cluster, public_key)"
                " VALUES (%s, %s, %s, %s) ON CONFLICT (ledger_id) DO NOTHING",
                (reg.ledger_id, reg.node, reg.cluster, reg.public_key))
            cur.execute("SELECT node, cluster, public_key FROM gpuflops.ledgers"
                        " WHERE ledger_id = %s", (reg.ledger_id,))
            row = cur.fetchone()
        assert row is not None
        return Registration(reg.ledger_id, row[0], row[1], bytes(row[2]))

    def head(self, ledger_id: str) -> Head | None:
        rows = self.fetch("SELECT seq, hash, raw_seq, raw_hash, failed FROM gpuflops.heads"
                          " WHERE ledger_id = %s", (ledger_id,))
        if not rows:
            return None
        seq, h, raw_seq, raw_hash, failed = rows[0]
        return Head(int(seq), h, int(raw_seq), raw_hash, failed)

    def job_rows(self, ledger_id: str) -> list[tuple[Any, ...]]:
        """The ledger's job totals as of its head, as ``JobTotals.row()``s: (job, program,
        measured, ..., last_t_s, hmma_flops, half_rate_fraction)."""
        return self.fetch(
            "SELECT job, program, measured_flops, analytic_flops, tokens, recompute_flops,"
            " estimate_t0_s, estimate_t1_s, first_t_s, last_t_s, hmma_flops, half_rate_fraction"
            " FROM gpuflops.job_totals WHERE ledger_id = %s", (ledger_id,))

    def insert_records(self, ledger_id: str,
                       rows: Sequence[tuple[int, str, str, str, bytes]]) -> None:
        """Insert (seq, content, prev_hash, hash, sig) rows in one transaction (all or none)."""
        with self.transaction() as cur:
            cur.executemany(
                "INSERT INTO gpuflops.records (ledger_id, seq, content, prev_hash, hash, sig)"
                " VALUES (%s, %s, %s, %s, %s, %s)",
                [(ledger_id, *r) for r in rows])

    def report_fork(self, ledger_id: str, raw_seq: int, central_hash: str, local_hash: str,
                    detail: str) -> None:
        self.execute("SELECT gpuflops.report_fork(%s, %s, %s, %s, %s)",
                     (ledger_id, raw_seq, central_hash, local_hash, detail))

    # -- journal: program definitions and decisions ---------------------------------------------

    def signers(self) -> dict[str, bytes]:
        return {name: bytes(key) for name, key in
                self.fetch("SELECT name, public_key FROM gpuflops.signers")}

    def add_signer(self, name: str, public_key: bytes) -> None:
        self.execute("INSERT INTO gpuflops.signers (name, public_key) VALUES (%s, %s)",
                     (name, public_key))

    def journal(self, program: str | None = None) -> list[tuple[Any, ...]]:
        """(program, seq, kind, content, prev_hash, hash, signer, sig, recorded_by) rows."""
        where = "" if program is None else " WHERE program = %s"
        return self.fetch(
            "SELECT program, seq, kind, content, prev_hash, hash, signer, sig, recorded_by"
            f" FROM gpuflops.journal{where} ORDER BY program, seq",
            None if program is None else (program,))

    def append_journal(self, program: str, seq: int, kind: str, content: str, prev_hash: str,
                       hash_: str, signer: str, sig: bytes) -> None:
        self.execute(
            "INSERT INTO gpuflops.journal (program, seq, kind, content, prev_hash, hash, signer,"
            " sig) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
            (program, seq, kind, content, prev_hash, hash_, signer, sig))
