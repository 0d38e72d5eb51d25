"""The ``gpuflops run`` launcher: register a job, run a command as its process tree, end the job
with its status (the click command is gpuflops/cli/run.py).

The launcher registers itself (the daemon attaches its pid from SO_PEERCRED), so the command and
everything it starts is attributed to the job. It exports GPUFLOPS_JOB, GPUFLOPS_PROGRAM and
GPUFLOPS_SOCKET so ``JobReporter`` in the command reports into the same job, forwards signals,
re-registers if the daemon restarts, and ends the job (``final``) with the command's exit status.
A daemon that is down never stops the command from running (unless --require-daemon).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from gpuflops.config import DEFAULT_SOCKET_PATH
from gpuflops.jobs import protocol
from gpuflops.jobs.protocol import ErrorCode, ProtocolError

FORWARDED_SIGNALS = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)
_SI_USER_MAX = 0  # si_code <= 0: sent by a process (kill, tkill, sigqueue); > 0: by the kernel
_KEEPALIVE_S = 2.0
_PING_EVERY_S = 30.0  # well inside the daemon's socket_idle_s (120 s by default)
_REFUSED = frozenset({ErrorCode.CONFLICT, ErrorCode.FORBIDDEN, ErrorCode.JOB_ENDED,
                      ErrorCode.BAD_FIELD})


class _Session:
    """A blocking connection to the daemon that re-registers the job after reconnecting."""

    def __init__(self, path: str, register: Mapping[str, Any], timeout_s: float = 2.0) -> None:
        self.path = path
        self.register = dict(register)
        self.timeout_s = timeout_s
        self.sock: socket.socket | None = None
        self.last_error: str | None = None
        self.refused: dict[str, Any] | None = None
        self.sent_s = time.monotonic()

    def connect(self) -> bool:
        """Connect and register; False (with last_error or refused set) when that failed."""
        self.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout_s)
        try:
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
            self.last_error = f"cannot connect to {self.path}: {exc.strerror or exc}"
            return False
        self.sock = sock
        reply = self.request(self.register)
        if reply is None:
            return False
        if not reply.get("ok"):
            self.last_error = f"{reply.get('error')}: {reply.get('detail')}"
            if reply.get("error") in _REFUSED:
                self.refused = reply
            self.close()
            return False
        return True

    def request(self, msg: Mapping[str, Any]) -> dict[str, Any] | None:
        """Send one message and return its reply, or None (connection closed) on failure."""
        if self.sock is None:
            return None
        self.sent_s = time.monotonic()
        try:
            self.sock.sendall(protocol.encode(msg))
            data = b""
            while not data.endswith(b"\n"):
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError("daemon closed the connection")
                data += chunk
            return protocol.decode(data.split(b"\n", 1)[0])
        except (OSError, ProtocolError) as exc:
            self.last_error = f"lost connection to {self.path}: {exc}"
            self.close()
            return None

    def alive(self) -> bool:
        """True when the connection is open and the daemon has not closed it."""
        if self.sock is None:
            return False
        readable, _, _ = select.select([self.sock], [], [], 0)
        if readable:
            try:
                if not self.sock.recv(1, socket.MSG_PEEK):
                    self.close()
                    return False
            except OSError:
                self.close()
                return False
        return True

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def _unblock_signals() -> None:
    signal.pthread_sigmask(signal.SIG_SETMASK, set())


def exit_status(returncode: int) -> tuple[int, str]:
    """Shell-style exit code (128+N for signal N) and a status string for the job's end."""
    if returncode < 0:
        sig = -returncode
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        return 128 + sig, f"signaled: {name}"
    return returncode, "completed" if returncode == 0 else "failed"


def run_job(
    job: str,
    program: str,
    command: Sequence[str],
    *,
    socket_path: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    require_daemon: bool = False,
    environ: Mapping[str, str] | None = None,
    err: TextIO = sys.stderr,
) -> int:
    """Run ``command`` as job ``job`` and return its shell-style exit code (main thread only)."""
    env = dict(os.environ if environ is None else environ)
    path = socket_path or env.get("GPUFLOPS_SOCKET") or DEFAULT_SOCKET_PATH
    register = {"v": 1, "op": "register", "job": job, "program": program, **(metadata or {})}
    session = _Session(path, register)
    if not session.connect():
        if session.refused is not None:
            print(f"gpuflops run: daemon refused job {job}: {session.last_error}", file=err)
            return 2
        if require_daemon:
            print(f"gpuflops run: {session.last_error}", file=err)
            return 2
        print(
            f"gpuflops run: warning: {session.last_error}; running without registering "
            "(will keep trying)",
            file=err,
        )
    env.update(GPUFLOPS_JOB=job, GPUFLOPS_PROGRAM=program, GPUFLOPS_SOCKET=path)

    waited = {*FORWARDED_SIGNALS, signal.SIGCHLD}
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, waited)
    try:
        try:
            child = subprocess.Popen(list(command), env=env, preexec_fn=_unblock_signals)
        except OSError as exc:
            print(f"gpuflops run: cannot run {command[0]!r}: {exc.strerror or exc}", file=err)
            code, status = (127 if isinstance(exc, FileNotFoundError) else 126), "not started"
        else:
            code, status = _supervise(child, session, waited)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)

    if session.sock is None:
        session.connect()
    end = {"v": 1, "op": "end", "job": job, "final": True, "exit_code": code, "status": status}
    reply = session.request(end)
    if reply is None or not reply.get("ok"):
        why = session.last_error if reply is None else reply.get("detail")
        print(f"gpuflops run: warning: could not end job {job}: {why}", file=err)
    session.close()
    return code


def _supervise(
    child: subprocess.Popen[bytes], session: _Session, waited: set[signal.Signals]
) -> tuple[int, str]:
    while True:
        info = signal.sigtimedwait(waited, _KEEPALIVE_S)
        # Terminal-generated signals (si_code > 0) already reached the child: it shares our
        # process group. Forward only what was sent to us alone, so Ctrl-C is not doubled.
        if (
            info is not None
            and info.si_signo != signal.SIGCHLD
            and info.si_code <= _SI_USER_MAX
        ):
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, info.si_signo)
        returncode = child.poll()
        if returncode is not None:
            return exit_status(returncode)
        if info is None and not session.alive() and session.refused is None:
            session.connect()  # daemon restarted: register again so the tree stays attributed
        elif info is None and time.monotonic() - session.sent_s > _PING_EVERY_S:
            session.request({"v": 1, "op": "ping"})  # the daemon closes silent connections
