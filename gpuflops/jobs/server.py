"""The daemon's job socket: a Unix socket served by one thread with ``selectors``.

Identity comes from the kernel (SO_PEERCRED, read once at accept), never from a message. Every
complete line gets exactly one reply; malformed, oversized or rate-limited messages get an error
reply and change nothing, and a failure handling one connection never touches the others.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import logging
import os
import selectors
import socket
import stat
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any

from gpuflops.config import DEFAULT_SOCKET_PATH, check_socket_mode
from gpuflops.jobs import protocol
from gpuflops.jobs.protocol import ErrorCode, ProtocolError
from gpuflops.jobs.records import Peer
from gpuflops.jobs.registry import JobRegistry

log = logging.getLogger(__name__)

MAX_UNIX_PATH_BYTES = 107  # sun_path is 108 bytes including the terminating NUL
_RECV_BYTES = 256 * 1024
_OK = b'{"ok":true}\n'
_PEERCRED = struct.Struct("3i")


class SocketInUseError(RuntimeError):
    """Another live process answers on the socket path, or the path is not a socket."""


@dataclass(frozen=True)
class ServerLimits:
    """Per-daemon and per-connection bounds."""

    max_message_bytes: int = protocol.MAX_MESSAGE_BYTES
    max_connections: int = 1024
    rate_per_s: float = 20_000.0  # messages per connection, token bucket refill
    burst: float = 40_000.0
    max_pending_reply_bytes: int = 1 << 20  # stop reading a peer that does not read replies
    prune_interval_s: float = 30.0


@dataclass(frozen=True)
class ServerStats:
    """Counters for ``gpuflops_jobsocket_messages_total`` and operators."""

    messages_ok: int
    messages_error: int
    errors: Mapping[str, int]  # error code -> count
    connections_open: int
    connections_accepted: int
    connections_refused: int
    loop_errors: int


def peer_credentials(sock: socket.socket) -> Peer:
    """The connecting process's pid, uid and gid from SO_PEERCRED (Linux)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    pid, uid, gid = _PEERCRED.unpack(raw)
    return Peer(pid=pid, uid=uid, gid=gid)


@dataclass(eq=False)
class _Conn:
    sock: socket.socket
    peer: Peer
    tokens: float
    refilled_s: float
    inbuf: bytearray = field(default_factory=bytearray)
    outbuf: bytearray = field(default_factory=bytearray)
    skipping: bool = False  # discarding the rest of an oversized line
    events: int = selectors.EVENT_READ


class JobSocketServer:
    """Serves the job protocol on a Unix socket from a background thread."""

    def __init__(
        self,
        registry: JobRegistry,
        path: str | os.PathLike[str] = DEFAULT_SOCKET_PATH,
        *,
        mode: int = 0o660,
        group: str | int | None = None,
        limits: ServerLimits | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        credentials: Callable[[socket.socket], Peer] = peer_credentials,
    ) -> None:
        self._registry = registry
        self._path = Path(path)
        if len(os.fsencode(self._path)) > MAX_UNIX_PATH_BYTES:
            raise ValueError(f"socket path longer than {MAX_UNIX_PATH_BYTES} bytes: {path}")
        self._mode = check_socket_mode(mode)
        self._group = group
        self._limits = limits or ServerLimits()
        self._monotonic = monotonic
        self._credentials = credentials
        self._listener: socket.socket | None = None
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of our socket file
        self._selector: selectors.BaseSelector | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._conns: dict[int, _Conn] = {}
        self._ok = 0
        self._errors: Counter[str] = Counter()
        self._errors_lock = threading.Lock()  # stats() copies it from another thread
        self._accepted = 0
        self._refused = 0
        self._loop_errors = 0

    @property
    def path(self) -> Path:
        """The socket path served."""
        return self._path

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Bind the socket (0660, group-owned if configured) and start serving."""
        if self._thread is not None:
            raise RuntimeError("server already started")
        gid = self._resolve_gid()
        self._prepare_path()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Bind under a temporary name, set mode and group, then rename into place: the socket is
        # never reachable with the wrong permissions and os.umask (process-wide) is left alone.
        tmp = self._path.parent / f".gf{os.getpid()}.{threading.get_ident() % 100000}"
        try:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            listener.bind(str(tmp))
            os.chmod(tmp, self._mode)
            if gid is not None:
                os.chown(tmp, -1, gid)
            listener.listen(1024)
            listener.setblocking(False)
            os.rename(tmp, self._path)
        except BaseException:
            listener.close()
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        st = os.stat(self._path)
        self._identity = (st.st_dev, st.st_ino)
        self._listener = listener
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(listener, selectors.EVENT_READ, "listener")
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="gpuflops-jobsocket", daemon=True)
        self._thread.start()
        log.info("job socket listening on %s", self._path)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop serving, close every connection and remove our socket file."""
        thread = self._thread
        if thread is None:
            return
        self._stopping.set()
        if self._wake_w is not None:
            with contextlib.suppress(OSError):
                self._wake_w.send(b"x")
        thread.join(timeout_s)
        if thread.is_alive():
            log.warning("job socket thread did not stop within %.1f s", timeout_s)
        for conn in list(self._conns.values()):
            self._close(conn)
        for sock in (self._listener, self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        if self._selector is not None:
            self._selector.close()
        self._unlink_if_ours()
        self._thread = None
        self._listener = None

    def __enter__(self) -> JobSocketServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def stats(self) -> ServerStats:
        """A consistent-enough copy of the counters (read from any thread)."""
        with self._errors_lock:
            errors = dict(self._errors)
        return ServerStats(
            messages_ok=self._ok,
            messages_error=sum(errors.values()),
            errors=MappingProxyType(errors),
            connections_open=len(self._conns),
            connections_accepted=self._accepted,
            connections_refused=self._refused,
            loop_errors=self._loop_errors,
        )

    def _resolve_gid(self) -> int | None:
        if self._group is None or isinstance(self._group, int):
            return self._group
        if self._group.isdigit():  # a numeric gid, as containers pass it (no /etc/group entry)
            return int(self._group)
        try:
            return grp.getgrnam(self._group).gr_gid
        except KeyError:
            raise ValueError(f"socket group {self._group!r} does not exist") from None

    def _prepare_path(self) -> None:
        parent = self._path.parent
        if not parent.is_dir():
            parent.mkdir(parents=True, mode=0o755)
        try:
            st = os.lstat(self._path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise SocketInUseError(f"{self._path} exists and is not a socket; not touching it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(str(self._path))
        except (ConnectionRefusedError, FileNotFoundError):
            log.info("removing stale job socket %s", self._path)
            with contextlib.suppress(FileNotFoundError):
                self._path.unlink()
            return
        except OSError as exc:
            raise SocketInUseError(f"cannot probe {self._path}: {exc}") from exc
        finally:
            probe.close()
        raise SocketInUseError(f"another process is listening on {self._path}")

    def _unlink_if_ours(self) -> None:
        try:
            st = os.lstat(self._path)
        except FileNotFoundError:
            return
        if self._identity == (st.st_dev, st.st_ino):
            with contextlib.suppress(FileNotFoundError):
                self._path.unlink()

    # -- event loop ------------------------------------------------------------------------

    def _run(self) -> None:
        assert self._selector is not None
        next_prune = self._monotonic() + self._limits.prune_interval_s
        while not self._stopping.is_set():
            try:
                for key, mask in self._selector.select(timeout=1.0):
                    if key.data == "listener":
                        self._accept()
                    elif key.data == "wake":
                        with contextlib.suppress(OSError):
                            self._wake_r.recv(64)  # type: ignore[union-attr]
                    else:
                        self._service(key.data, mask)
                if self._monotonic() >= next_prune:
                    next_prune = self._monotonic() + self._limits.prune_interval_s
                    self._registry.prune()
            except Exception:
                # The loop must outlive any bug: count it, say it once loudly, keep serving.
                self._loop_errors += 1
                level = logging.WARNING if self._loop_errors == 1 else logging.DEBUG
                log.log(level, "job socket loop error", exc_info=True)
                time.sleep(0.01)

    def _accept(self) -> None:
        assert self._listener is not None and self._selector is not None
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    log.warning("job socket: out of file descriptors")
                return
            sock.setblocking(False)
            if len(self._conns) >= self._limits.max_connections:
                self._refused += 1
                with self._errors_lock:
                    self._errors[ErrorCode.TOO_MANY_CONNECTIONS] += 1
                reply = protocol.error_reply(
                    ErrorCode.TOO_MANY_CONNECTIONS,
                    f"{len(self._conns)} connections open (limit {self._limits.max_connections})",
                )
                with contextlib.suppress(OSError):
                    sock.send(protocol.encode(reply))
                sock.close()
                continue
            try:
                peer = self._credentials(sock)
            except OSError:
                sock.close()
                continue
            now = self._monotonic()
            conn = _Conn(sock=sock, peer=peer, tokens=self._limits.burst, refilled_s=now)
            self._conns[sock.fileno()] = conn
            self._selector.register(sock, selectors.EVENT_READ, conn)
            self._accepted += 1

    def _service(self, conn: _Conn, mask: int) -> None:
        try:
            if mask & selectors.EVENT_WRITE:
                self._flush(conn)
            if mask & selectors.EVENT_READ:
                self._read(conn)
        except Exception:
            self._loop_errors += 1
            log.debug("closing job socket connection from pid %d", conn.peer.pid, exc_info=True)
            self._close(conn)

    def _read(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(_RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        if not data:
            self._close(conn)
            return
        limit = self._limits.max_message_bytes
        buf = conn.inbuf
        buf += data
        if conn.skipping:
            newline = buf.find(b"\n")
            if newline < 0:
                buf.clear()
                return
            del buf[: newline + 1]
            conn.skipping = False
        now = self._monotonic()
        conn.tokens = min(
            self._limits.burst, conn.tokens + (now - conn.refilled_s) * self._limits.rate_per_s
        )
        conn.refilled_s = now
        replies: list[bytes] = []
        if b"\n" in data:
            *lines, rest = bytes(buf).split(b"\n")
            buf[:] = rest
            for line in lines:
                if len(line) + 1 > limit:
                    replies.append(self._error(ErrorCode.TOO_LARGE, f"message over {limit} bytes"))
                elif line and not line.isspace():
                    replies.append(self._handle(conn, line))
        if len(buf) >= limit:
            replies.append(self._error(ErrorCode.TOO_LARGE, f"message over {limit} bytes"))
            buf.clear()
            conn.skipping = True
        if replies:
            conn.outbuf += b"".join(replies)
            self._flush(conn)

    def _handle(self, conn: _Conn, line: bytes) -> bytes:
        if conn.tokens < 1.0:
            return self._error(
                ErrorCode.RATE_LIMITED,
                f"over {self._limits.rate_per_s:g} messages/s on this connection; not applied",
            )
        conn.tokens -= 1.0
        msg_id = None
        try:
            msg = protocol.decode(line)
            msg_id = protocol.message_id(msg)
            reply = self._dispatch(protocol.parse(msg), conn.peer)
        except ProtocolError as exc:
            return self._error(exc.code, exc.detail, msg_id)
        except Exception:
            self._loop_errors += 1
            log.warning("job socket: internal error handling a message", exc_info=True)
            return self._error(ErrorCode.INTERNAL, "internal error; nothing applied", msg_id)
        self._ok += 1
        if reply is None:
            if msg_id is None:
                return _OK
            reply = {"ok": True}
        if msg_id is not None:
            reply["id"] = msg_id
        return protocol.encode(reply)

    def _error(self, code: str, detail: str, msg_id: int | str | None = None) -> bytes:
        with self._errors_lock:
            self._errors[code] += 1
        return protocol.encode(protocol.error_reply(code, detail, msg_id))

    def _dispatch(self, req: protocol.Request, peer: Peer) -> dict[str, Any] | None:
        registry = self._registry
        if isinstance(req, protocol.Add):
            if registry.add(req.job, req.items, peer, req.client, req.seq):
                return None
            return {"ok": True, "duplicate": True}
        if isinstance(req, protocol.Register):
            result = registry.register(req.job, req.program, req.metadata, peer, req.client)
            return {
                "ok": True,
                "job": req.job,
                "created": result.created,
                "conflicts": list(result.conflicts),
                "pid": peer.pid,
            }
        if isinstance(req, protocol.Claim):
            registry.claim(req.job, peer, {"kind": req.kind, "value": req.value,
                                           "sampled_steps": req.sampled_steps,
                                           "evidence": req.evidence})
            return {"ok": True}
        if isinstance(req, protocol.Attach):
            registry.attach(req.job, req.pid, peer)
            return {"ok": True, "attached": req.pid}
        if isinstance(req, protocol.End):
            ended = registry.end(
                req.job,
                peer,
                final=req.final,
                rank=req.rank,
                exit_code=req.exit_code,
                status=req.status,
            )
            return {"ok": True, "job_ended": ended}
        if isinstance(req, protocol.Query):
            return {"ok": True, "job": registry.query(req.job, peer).to_json()}
        return {
            "ok": True,
            "server": "gpuflops",
            "versions": list(protocol.SUPPORTED_VERSIONS),
            "peer": {"pid": peer.pid, "uid": peer.uid, "gid": peer.gid},
        }

    def _flush(self, conn: _Conn) -> None:
        assert self._selector is not None
        if conn.outbuf:
            try:
                sent = conn.sock.send(conn.outbuf)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self._close(conn)
                return
            del conn.outbuf[:sent]
        pending = len(conn.outbuf)
        want = selectors.EVENT_READ
        if pending:
            want |= selectors.EVENT_WRITE
        if pending > self._limits.max_pending_reply_bytes:
            want = selectors.EVENT_WRITE  # back-pressure: read no more until it reads replies
        if want != conn.events:
            conn.events = want
            self._selector.modify(conn.sock, want, conn)

    def _close(self, conn: _Conn) -> None:
        fd = conn.sock.fileno()
        if fd >= 0 and self._conns.get(fd) is conn:
            del self._conns[fd]
            if self._selector is not None:
                with contextlib.suppress(KeyError, ValueError, OSError):
                    self._selector.unregister(conn.sock)
        conn.sock.close()
