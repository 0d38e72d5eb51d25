"""What the job socket keeps per connection, its limits and its counters."""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import selectors
import socket
import stat
import struct
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from gpuflops.jobs import protocol
from gpuflops.jobs.records import Peer

_PEERCRED = struct.Struct("3i")
log = logging.getLogger(__name__)


class SocketInUseError(RuntimeError):
    """Another live process answers on the socket path, or the path is not a socket."""


@dataclass(frozen=True)
class ServerLimits:
    """Per-daemon and per-connection bounds."""

    max_message_bytes: int = protocol.MAX_MESSAGE_BYTES
    max_connections: int = 1024
    max_connections_per_uid: int = 64  # one user cannot take every connection (root excepted)
    idle_timeout_s: float = 120.0  # a connection that sends nothing this long is closed
    max_held_replies: int = 4096  # replies waiting for the ledger; then stop reading the peer
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
    held_replies: int = 0  # replies waiting for their change to be committed
    idle_closed: int = 0


def peer_credentials(sock: socket.socket) -> Peer:
    """The connecting process's pid, uid and gid from SO_PEERCRED (Linux)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    pid, uid, gid = _PEERCRED.unpack(raw)
    return Peer(pid=pid, uid=uid, gid=gid)


@dataclass(eq=False)
class Conn:
    sock: socket.socket
    peer: Peer
    tokens: float
    refilled_s: float
    inbuf: bytearray = field(default_factory=bytearray)
    outbuf: bytearray = field(default_factory=bytearray)
    skipping: bool = False  # discarding the rest of an oversized line
    events: int = selectors.EVENT_READ
    held: deque[tuple[int, bytes]] = field(default_factory=deque)  # (ticket, reply) in order
    active_s: float = 0.0


def resolve_gid(group: str | int | None) -> int | None:
    """The socket's group as a gid: a name, a numeric string (containers), or an int."""
    if group is None or isinstance(group, int):
        return group
    if group.isdigit():  # a numeric gid, as containers pass it (no /etc/group entry)
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ValueError(f"socket group {group!r} does not exist") from None


def prepare_socket_path(path: Path) -> None:
    """Make the parent directory; remove a stale socket file; refuse a live or foreign one."""
    parent = path.parent
    if not parent.is_dir():
        parent.mkdir(parents=True, mode=0o755)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketInUseError(f"{path} exists and is not a socket; not touching it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        log.info("removing stale job socket %s", path)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return
    except OSError as exc:
        raise SocketInUseError(f"cannot probe {path}: {exc}") from exc
    finally:
        probe.close()
    raise SocketInUseError(f"another process is listening on {path}")
