"""Minimal systemd sd_notify(3) client: readiness and watchdog datagrams over $NOTIFY_SOCKET."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping


def notify(state: str, *, env: Mapping[str, str] = os.environ) -> bool:
    """Send ``state`` ("READY=1", "WATCHDOG=1") to systemd; False if unsupervised or on error."""
    address = env.get("NOTIFY_SOCKET", "")
    if not address or not state:
        return False
    if address.startswith("@"):
        # Abstract namespace socket: systemd writes it with a leading '@' standing for a NUL byte.
        target: str | bytes = b"\0" + address[1:].encode()
    elif address.startswith("/"):
        target = address
    else:
        # vsock: and other transports systemd may hand to VMs; not used on a GPU host.
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(target)
            sock.sendall(state.encode())
    except OSError:
        # A notification that cannot be delivered must never take the daemon down; systemd's
        # watchdog restarts it if notifications keep failing.
        return False
    return True
