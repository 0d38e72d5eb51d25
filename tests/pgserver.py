"""A throwaway PostgreSQL cluster for tests: Debian's initdb and pg_ctl on a temporary directory.

It listens on a Unix socket in that directory (trust, for the test's admin connections) and on
127.0.0.1 at a free port (SCRAM passwords, as daemons connect in production). With ``tls`` the
TCP port takes TLS connections only (``ssl = on``, ``hostssl`` lines; a connection without TLS is
rejected by pg_hba), and the logins in ``ServerTls.cert_logins`` authenticate by a client
certificate signed by the same CA instead of a password. PostgreSQL
refuses to run as root, so under root (CI) the server runs as the system user
``gpuflops-pgtest``, created when missing. ``kill9`` kills the postmaster and every backend with
SIGKILL, as a crash would.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from tests.deploy.tooling import in_ci

PG_USER = "gpuflops-pgtest"
ADMIN = "postgres"


def find_bin_dir() -> Path | None:
    """Where initdb and pg_ctl are: PATH first, then Debian's /usr/lib/postgresql/<v>/bin."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                      key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    return Path(versions[-1]).parent if versions else None


def require_postgres() -> Path:
    bin_dir = find_bin_dir()
    if bin_dir is None:
        message = "initdb/pg_ctl not found; install the Debian package 'postgresql'"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    return bin_dir


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ensure_user() -> None:
    try:
        pwd.getpwnam(PG_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                        PG_USER], check=True, capture_output=True)


@dataclass(frozen=True)
class ServerTls:
    """The server's certificate and key, and the CA that signed them; clients verify the server
    against ``ca`` and the server verifies client certificates against it."""

    cert: Path
    key: Path
    ca: Path
    cert_logins: tuple[str, ...] = ()  # logins that authenticate by client certificate only


class PgCluster:
    """initdb + pg_ctl in a temporary directory; start, stop, kill -9, and DSNs."""

    def __init__(self, bin_dir: Path, tls: ServerTls | None = None) -> None:
        self.bin_dir = bin_dir
        self.tls = tls
        self.root = Path(tempfile.mkdtemp(dir="/tmp", prefix="gfpg"))
        os.chmod(self.root, 0o755)
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = _free_port()
        self.as_root = os.geteuid() == 0
        if self.as_root:
            _ensure_user()
            shutil.chown(self.root, PG_USER, PG_USER)

    def _run(self, *args: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bin_dir / args[0]), *args[1:]]
        if self.as_root:
            cmd = ["runuser", "-u", PG_USER, "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False,
                              cwd=self.root)

    def initdb(self) -> None:
        r = self._run("initdb", "-D", str(self.data), "-U", ADMIN, "-A", "trust", "-E", "UTF8",
                      "--no-locale", "--no-sync")
        if r.returncode != 0:
            raise RuntimeError(f"initdb failed: {r.stdout}\n{r.stderr}")
        conf = self.data / "postgresql.conf"
        with conf.open("a") as f:
            f.write(f"\nlisten_addresses = '127.0.0.1'\nport = {self.port}\n"
                    f"unix_socket_directories = '{self.root}'\nmax_connections = 60\n"
                    # Tests kill processes, not machines: the page cache survives, fsync is moot.
                    "fsync = off\nfull_page_writes = off\n"
                    "password_encryption = 'scram-sha-256'\n")
        if self.tls is None:
            (self.data / "pg_hba.conf").write_text(
                "local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n")
        else:
            self._configure_tls(self.tls)

    def _configure_tls(self, tls: ServerTls) -> None:
        # The server reads its key as PG_USER and refuses one that others may read.
        d = self.root / "tls"
        d.mkdir()
        for src in (tls.cert, tls.key, tls.ca):
            shutil.copyfile(src, d / src.name)
            os.chmod(d / src.name, 0o600 if src == tls.key else 0o644)
            if self.as_root:
                shutil.chown(d / src.name, PG_USER, PG_USER)
        with (self.data / "postgresql.conf").open("a") as f:
            f.write(f"ssl = on\nssl_cert_file = '{d / tls.cert.name}'\n"
                    f"ssl_key_file = '{d / tls.key.name}'\nssl_ca_file = '{d / tls.ca.name}'\n")
        lines = ["local all all trust", "hostnossl all all all reject"]
        lines += [f"hostssl all {login} 127.0.0.1/32 cert" for login in tls.cert_logins]
        lines += ["hostssl all all 127.0.0.1/32 scram-sha-256"]
        (self.data / "pg_hba.conf").write_text("\n".join(lines) + "\n")

    def start(self, timeout_s: float = 60.0) -> None:
        r = self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t",
                      str(int(timeout_s)), "start", timeout_s=timeout_s + 10)
        if r.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed: {r.stdout}{r.stderr}\n{self.tail()}")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def running(self) -> bool:
        pid = self.postmaster_pid()
        return pid is not None and psutil.pid_exists(pid)

    def kill9(self) -> None:
        """SIGKILL the postmaster and all its backends, then wait until they are gone."""
        pid = self.postmaster_pid()
        if pid is None:
            return
        try:
            parent = psutil.Process(pid)
            procs = [parent, *parent.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGKILL)
        psutil.wait_procs(procs, timeout=10)

    def tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def admin_dsn(self, dbname: str = "postgres") -> str:
        return f"host={self.root} port={self.port} user={ADMIN} dbname={dbname}"

    def tcp_url(self, user: str, dbname: str) -> str:
        """How a daemon connects: without TLS, or with the server verified (verify-full)."""
        if self.tls is None:
            return self.plain_url(user, dbname)
        return (f"postgresql://{user}@127.0.0.1:{self.port}/{dbname}"
                f"?sslmode=verify-full&sslrootcert={self.tls.ca}")

    def plain_url(self, user: str, dbname: str) -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{dbname}?sslmode=disable"

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        r = subprocess.run([str(self.bin_dir / "psql") if (self.bin_dir / "psql").exists()
                            else "psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                            self.admin_dsn(dbname), "-c", sql],
                           capture_output=True, text=True, timeout=60, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"psql failed: {r.stderr}")
        return r.stdout

    def destroy(self) -> None:
        if self.running():
            self.stop("immediate")
            deadline = time.monotonic() + 10
            while self.running() and time.monotonic() < deadline:
                time.sleep(0.1)
            if self.running():
                self.kill9()
        shutil.rmtree(self.root, ignore_errors=True)
