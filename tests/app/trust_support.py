"""Real users, a real daemon and clients running as those users: what the trust-boundary tests
(issue 13's attacks) share.

``LocalUsers`` creates two users in a socket group and one outside it (CI runs as root), and
removes them afterwards. ``DaemonProcess`` runs ``gpuflops daemon`` as a separate process on a
replayed trace. ``as_user`` sends job-socket requests from a process of another uid; it runs the
system Python with the standard library only, because root's interpreter is not readable to
other users.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from gpuflops.sampler.trace import TraceWriter
from tests.support import DEMO_TRACE, ROOT, trace

SYSTEM_PYTHON = "/usr/bin/python3"  # readable by every user, unlike root's pyenv
GROUP = "gftrust"

CLIENT = r"""
import json, socket, sys
path, requests = sys.argv[1], json.loads(sys.argv[2])
try:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(20)
    s.connect(path)
except OSError as e:
    print(json.dumps({"connect_error": type(e).__name__}))
    sys.exit(0)
f = s.makefile("rwb")
out = []
for m in requests:
    m.setdefault("v", 1)
    f.write(json.dumps(m).encode() + b"\n")
    f.flush()
    out.append(json.loads(f.readline()))
print(json.dumps(out))
"""


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int
    in_group: bool


class LocalUsers:
    """alice and bob in the socket group, carol outside it; real accounts, removed on close."""

    def __init__(self) -> None:
        self.close()  # a run that died earlier may have left them
        subprocess.run(["groupadd", GROUP], check=True)
        self.users: dict[str, User] = {}
        for name, member in (("alice", True), ("bob", True), ("carol", False)):
            login = f"gf{name}"
            cmd = ["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", login]
            if member:
                cmd[1:1] = ["-G", GROUP]
            subprocess.run(cmd, check=True)
            import pwd

            pw = pwd.getpwnam(login)
            self.users[name] = User(login, pw.pw_uid, pw.pw_gid, member)
        import grp

        self.gid = grp.getgrnam(GROUP).gr_gid

    def __getitem__(self, name: str) -> User:
        return self.users[name]

    def groups(self, user: User) -> list[int]:
        return [self.gid] if user.in_group else []

    def close(self) -> None:
        for name in ("alice", "bob", "carol"):
            subprocess.run(["userdel", f"gf{name}"], capture_output=True)
        subprocess.run(["groupdel", GROUP], capture_output=True)


def as_user(users: LocalUsers, who: str, path: str | Path,
            requests: Sequence[Mapping[str, Any]]) -> Any:
    """Send ``requests`` on one connection from a process of ``who``; its replies, in order,
    or ``{"connect_error": ...}`` when it could not connect."""
    user = users[who]
    out = subprocess.run(
        [SYSTEM_PYTHON, "-c", CLIENT, str(path), json.dumps(list(requests))],
        user=user.uid, group=user.gid, extra_groups=users.groups(user), cwd="/",
        env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def spawn_as(users: LocalUsers, who: str, env: Mapping[str, str]) -> subprocess.Popen[bytes]:
    """A process of ``who`` that sleeps with ``env`` (what a training process would carry)."""
    user = users[who]
    return subprocess.Popen(
        [SYSTEM_PYTHON, "-c", "import time; time.sleep(600)"],
        user=user.uid, group=user.gid, extra_groups=users.groups(user), cwd="/",
        env={"PATH": "/usr/bin:/bin", **env})


def remapped_demo(path: Path, pids: Mapping[int, int]) -> Path:
    """The recorded H100 demo trace with its process ids renamed to live processes', so the
    daemon's /proc reads (environment, cgroup, uid) find them. The numbers are as recorded."""
    header, intervals, _events = trace(DEMO_TRACE)
    writer = TraceWriter(path, list(header.gpus), header.interval_s, dict(header.meta))
    for item in intervals:
        writer.interval([replace(s, processes=tuple(replace(p, pid=pids.get(p.pid, p.pid))
                                                    for p in s.processes),
                                 process_util=tuple(replace(u, pid=pids.get(u.pid, u.pid))
                                                    for u in s.process_util))
                         for s in item.samples])
    writer.close()
    with gzip.open(path, "rt") if path.suffix == ".gz" else open(path) as f:
        assert f.readline()  # written and readable
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def short_tmp(prefix: str = "gft") -> Path:
    """A world-traversable directory under /tmp (short socket paths; other users reach it)."""
    path = Path(tempfile.mkdtemp(dir="/tmp", prefix=prefix))
    path.chmod(0o755)
    return path


class DaemonProcess:
    """``gpuflops daemon`` in its own process, on a replayed trace, in ``tmp``."""

    def __init__(self, tmp: Path, *, args: Sequence[str] = (), speed: float = 20.0,
                 replay: Path | None = None, env: Mapping[str, str] | None = None) -> None:
        self.tmp = tmp
        self.state = tmp / "state"
        self.sock = tmp / "run" / "s.sock"
        self.port = free_port()
        self.log = tmp / f"daemon-{time.monotonic_ns()}.log"
        source = ["--replay", str(replay)] if replay else ["--demo"]
        cmd = [sys.executable, "-m", "gpuflops", "daemon", *source, "--speed", str(speed),
               "--listen", f"127.0.0.1:{self.port}", "--socket", str(self.sock),
               "--state-dir", str(self.state), *args]
        self._logf = open(self.log, "wb")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(ROOT),
                                               **(env or {})},
                                     stdout=self._logf, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float = 30.0) -> DaemonProcess:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}: {self.output()}")
            if self.sock.exists() and self.metrics() is not None:
                return self
            time.sleep(0.05)
        raise AssertionError(f"daemon did not come up: {self.output()}")

    def metrics(self) -> dict[str, list[tuple[dict[str, str], float]]] | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
                text = r.read().decode()
        except OSError:
            return None
        out: dict[str, list[tuple[dict[str, str], float]]] = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                out.setdefault(s.name, []).append((dict(s.labels), s.value))
        return out

    def healthz(self) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.wait()

    def wait(self, timeout_s: float = 30.0) -> int:
        code = self.proc.wait(timeout=timeout_s)
        self._logf.close()
        return code


def cleanup(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
