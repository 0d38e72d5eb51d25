"""The daemon's job socket: a Unix socket served by one thread with ``selectors``.

Identity comes from the kernel (SO_PEERCRED, read once at accept), never from a message. Every
complete line gets exactly one reply; malformed, oversized or rate-limited messages get an error
reply and change nothing, and a failure handling one connection never touches the others.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import selectors
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any

from gpuflops.config import DEFAULT_SOCKET_PATH, check_socket_mode
from gpuflops.jobs import protocol
from gpuflops.jobs.connections import (
    Conn,
    ServerLimits,
    ServerStats,
    peer_credentials,
    prepare_socket_path,
    resolve_gid,
)
from gpuflops.jobs.protocol import ErrorCode, ProtocolError
from gpuflops.jobs.records import Durability, Peer
from gpuflops.jobs.registry import JobRegistry

log = logging.getLogger(__name__)

MAX_UNIX_PATH_BYTES = 107  # sun_path is 108 bytes including the terminating NUL
_RECV_BYTES = 256 * 1024
_OK = b'{"ok":true}\n'
# Requests that change what the ledger records: their replies wait until it is committed.
_CHANGES = (protocol.Register, protocol.Add, protocol.Claim, protocol.End)


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
        durability: Durability | None = None,
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
        self._durability = durability
        self._holding: set[Conn] = set()
        self._by_uid: Counter[int] = Counter()
        self._idle_closed = 0
        self._listener: socket.socket | None = None
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of our socket file
        self._selector: selectors.BaseSelector | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._conns: dict[int, Conn] = {}
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
        gid = resolve_gid(self._group)
        prepare_socket_path(self._path)
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
            held_replies=sum(len(c.held) for c in list(self._holding)),
            idle_closed=self._idle_closed,
        )

    def wake(self) -> None:
        """Wake the serving thread (thread-safe): the ledger committed, held replies may go."""
        if self._wake_w is not None:
            with contextlib.suppress(OSError):
                self._wake_w.send(b"x")

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
        next_idle = self._monotonic()
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
                if self._holding:
                    self._release_held()
                now = self._monotonic()
                if now >= next_idle:
                    next_idle = now + 1.0
                    self._close_idle(now)
                if now >= next_prune:
                    next_prune = now + self._limits.prune_interval_s
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
                self._refuse(sock, f"{len(self._conns)} connections open "
                                   f"(limit {self._limits.max_connections})")
                continue
            try:
                peer = self._credentials(sock)
            except OSError:
                sock.close()
                continue
            limit = self._limits.max_connections_per_uid
            if peer.uid != 0 and self._by_uid[peer.uid] >= limit:
                self._refuse(sock, f"uid {peer.uid} has {limit} connections open (the per-user "
                                   "limit); close some")
                continue
            now = self._monotonic()
            conn = Conn(sock=sock, peer=peer, tokens=self._limits.burst, refilled_s=now,
                         active_s=now)
            self._by_uid[peer.uid] += 1
            self._conns[sock.fileno()] = conn
            self._selector.register(sock, selectors.EVENT_READ, conn)
            self._accepted += 1

    def _refuse(self, sock: socket.socket, detail: str) -> None:
        self._refused += 1
        with self._errors_lock:
            self._errors[ErrorCode.TOO_MANY_CONNECTIONS] += 1
        reply = protocol.error_reply(ErrorCode.TOO_MANY_CONNECTIONS, detail)
        with contextlib.suppress(OSError):
            sock.send(protocol.encode(reply))
        sock.close()

    def _close_idle(self, now: float) -> None:
        """Close connections that sent nothing for ``idle_timeout_s`` and wait for nothing."""
        limit = self._limits.idle_timeout_s
        for conn in [c for c in self._conns.values()
                     if now - c.active_s > limit and not c.held and not c.outbuf]:
            self._idle_closed += 1
            with contextlib.suppress(OSError):
                conn.sock.send(protocol.encode(protocol.error_reply(
                    ErrorCode.IDLE, f"nothing sent for {limit:g} s; connection closed")))
            self._close(conn)

    def _release_held(self) -> None:
        """Send, in order, the held replies whose changes are now committed."""
        assert self._durability is not None
        durable = self._durability.durable()
        for conn in list(self._holding):
            while conn.held and conn.held[0][0] <= durable:
                conn.outbuf += conn.held.popleft()[1]
            if not conn.held:
                self._holding.discard(conn)
            self._flush(conn)

    def _service(self, conn: Conn, mask: int) -> None:
        try:
            if mask & selectors.EVENT_WRITE:
                self._flush(conn)
            if mask & selectors.EVENT_READ:
                self._read(conn)
        except Exception:
            self._loop_errors += 1
            log.debug("closing job socket connection from pid %d", conn.peer.pid, exc_info=True)
            self._close(conn)

    def _read(self, conn: Conn) -> None:
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
        conn.active_s = now
        conn.tokens = min(
            self._limits.burst, conn.tokens + (now - conn.refilled_s) * self._limits.rate_per_s
        )
        conn.refilled_s = now
        replies: list[tuple[bytes, int]] = []
        if b"\n" in data:
            *lines, rest = bytes(buf).split(b"\n")
            buf[:] = rest
            for line in lines:
                if len(line) + 1 > limit:
                    replies.append((self._error(ErrorCode.TOO_LARGE,
                                                f"message over {limit} bytes"), 0))
                elif line and not line.isspace():
                    replies.append(self._handle(conn, line))
        if len(buf) >= limit:
            replies.append((self._error(ErrorCode.TOO_LARGE, f"message over {limit} bytes"), 0))
            buf.clear()
            conn.skipping = True
        if replies:
            durable = self._durability.durable() if self._durability is not None else 0
            for reply, ticket in replies:
                if conn.held or ticket > durable:  # acknowledged once committed, in order
                    conn.held.append((ticket, reply))
                else:
                    conn.outbuf += reply
            if conn.held:
                self._holding.add(conn)
            self._flush(conn)

    def _handle(self, conn: Conn, line: bytes) -> tuple[bytes, int]:
        """The reply to one line, and the ticket it waits for (0: none)."""
        if conn.tokens < 1.0:
            return self._error(
                ErrorCode.RATE_LIMITED,
                f"over {self._limits.rate_per_s:g} messages/s on this connection; not applied",
            ), 0
        conn.tokens -= 1.0
        msg_id = None
        durability = self._durability
        try:
            msg = protocol.decode(line)
            msg_id = protocol.message_id(msg)
            req = protocol.parse(msg)
            changes = isinstance(req, _CHANGES)
            if changes and durability is not None and not durability.writable():
                raise ProtocolError(ErrorCode.UNAVAILABLE, "the daemon cannot write its ledger "
                                    "(disk full?): nothing applied; retry later")
            reply = self._dispatch(req, conn.peer)
        except ProtocolError as exc:
            return self._error(exc.code, exc.detail, msg_id), 0
        except Exception:
            self._loop_errors += 1
            log.warning("job socket: internal error handling a message", exc_info=True)
            return self._error(ErrorCode.INTERNAL, "internal error; nothing applied", msg_id), 0
        self._ok += 1
        ticket = durability.ticket() if changes and durability is not None else 0
        if reply is None:
            if msg_id is None:
                return _OK, ticket
            reply = {"ok": True}
        if msg_id is not None:
            reply["id"] = msg_id
        return protocol.encode(reply), ticket

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

    def _flush(self, conn: Conn) -> None:
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
        elif len(conn.held) > self._limits.max_held_replies:
            want = 0  # read no more until the ledger has committed what it sent
        if want == 0 and conn.events != 0:
            conn.events = 0
            self._selector.unregister(conn.sock)
            return
        if want and conn.events == 0:
            conn.events = want
            self._selector.register(conn.sock, want, conn)
            return
        if want != conn.events:
            conn.events = want
            self._selector.modify(conn.sock, want, conn)

    def _close(self, conn: Conn) -> None:
        fd = conn.sock.fileno()
        self._holding.discard(conn)
        conn.held.clear()
        if fd >= 0 and self._conns.get(fd) is conn:
            del self._conns[fd]
            self._by_uid[conn.peer.uid] -= 1
            if self._by_uid[conn.peer.uid] <= 0:
                del self._by_uid[conn.peer.uid]
            if self._selector is not None:
                with contextlib.suppress(KeyError, ValueError, OSError):
                    self._selector.unregister(conn.sock)
        conn.sock.close()
