"""sd_notify against a real AF_UNIX datagram socket, as systemd provides it."""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpuflops.app.sdnotify import notify


@pytest.fixture
def listener() -> Iterator[tuple[socket.socket, str]]:
    # A short directory keeps the path under the 108-byte sun_path limit.
    with tempfile.TemporaryDirectory(prefix="sdn", dir="/tmp") as tmp:
        path = str(Path(tmp) / "notify")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.settimeout(2)
        try:
            yield sock, path
        finally:
            sock.close()


def test_ready_and_watchdog_are_delivered(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    assert notify("READY=1", env={"NOTIFY_SOCKET": path}) is True
    assert sock.recv(4096) == b"READY=1"
    assert notify("WATCHDOG=1\nSTATUS=sampling 8 GPUs", env={"NOTIFY_SOCKET": path})
    assert sock.recv(4096) == b"WATCHDOG=1\nSTATUS=sampling 8 GPUs"


def test_abstract_namespace_socket() -> None:
    name = f"gpuflops-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(2)
        assert notify("READY=1", env={"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(4096) == b"READY=1"


def test_not_supervised_returns_false() -> None:
    assert notify("READY=1", env={}) is False
    assert notify("READY=1", env={"NOTIFY_SOCKET": ""}) is False
    assert notify("READY=1", env={"NOTIFY_SOCKET": "vsock:2:1234"}) is False


def test_missing_socket_degrades_to_false(tmp_path: Path) -> None:
    assert notify("READY=1", env={"NOTIFY_SOCKET": str(tmp_path / "gone")}) is False


def test_empty_state_is_not_sent(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    assert notify("", env={"NOTIFY_SOCKET": path}) is False
    sock.settimeout(0.05)
    with pytest.raises(TimeoutError):
        sock.recv(4096)
