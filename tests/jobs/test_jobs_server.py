"""The job socket over a real Unix socket: protocol round trips, file handling, limits."""

from __future__ import annotations

import os
import socket
import stat
import time
from collections.abc import Callable

import pytest

from gpuflops.jobs.connections import SocketInUseError
from gpuflops.jobs.protocol import MAX_MESSAGE_BYTES
from gpuflops.jobs.registry import JobRegistry
from gpuflops.jobs.server import JobSocketServer, ServerLimits
from tests.jobs.jobsock_client import Client


def test_happy_path(client: Client, registry: JobRegistry) -> None:
    pong = client.call(op="ping", id="p1")
    assert pong["ok"] and pong["versions"] == [1] and pong["id"] == "p1"
    assert pong["peer"]["pid"] == os.getpid()
    reg = client.call(op="register", job="ft-1", program="acme", model="m", params_total=10,
                      params_trainable=5, precision="bf16", method="lora", rank=0, world_size=1)
    assert reg == {"ok": True, "job": "ft-1", "created": True, "conflicts": [], "pid": os.getpid()}
    assert client.call(op="add", job="ft-1", flops=1e15, tokens=4096, recompute_flops=3e14) == {
        "ok": True
    }
    assert client.call(op="add", job="ft-1", items=[{"flops": 1e15, "tokens": 4096, "adds": 3}],
                       client="c", seq=1)["ok"]
    assert client.call(op="add", job="ft-1", items=[{"flops": 1e15, "tokens": 4096}],
                       client="c", seq=1)["duplicate"] is True
    q = client.call(op="query", job="ft-1")
    assert q["job"]["analytic_flops"] == 2e15 and q["job"]["analytic_tokens"] == 8192
    assert q["job"]["recompute_flops"] == 3e14 and q["job"]["adds"] == 4
    assert q["job"]["metadata"]["method"] == "lora"
    assert client.call(op="end", job="ft-1", rank=0, exit_code=0) == {"ok": True, "job_ended": True}
    assert registry.job_for_pid(os.getpid()) is None


def test_errors_reply_and_leave_state_alone(client: Client, registry: JobRegistry) -> None:
    client.call(op="register", job="j", program="p")
    bad = client.call(op="add", job="nope", flops=1, tokens=1, id=5)
    assert bad == {"ok": False, "error": "unknown_job", "detail": bad["detail"], "id": 5}
    assert client.call(op="add", job="j", flops=-1, tokens=1)["error"] == "bad_field"
    assert client.call(v=9, op="ping")["error"] == "bad_version"
    client.send_raw(b"garbage\n")
    assert client.reply()["error"] == "bad_json"
    client.send_raw(b"\n  \n")  # blank lines are not requests and get no reply
    assert client.call(op="ping")["ok"]
    assert registry.snapshot().jobs[0].analytic_flops == 0.0


def test_oversized_message_gets_error_and_connection_survives(client: Client) -> None:
    client.call(op="register", job="j", program="p")
    client.send_raw(b'{"v":1,"op":"ping","pad":"' + b"x" * (MAX_MESSAGE_BYTES * 3) + b'"}\n')
    reply = client.reply()
    assert reply["error"] == "too_large" and "65536" in reply["detail"]
    assert client.call(op="add", job="j", flops=2.0, tokens=1)["ok"]
    assert client.call(op="query", job="j")["job"]["analytic_flops"] == 2.0


def test_socket_file_mode_group_and_cleanup(registry: JobRegistry, tmpdir_short: str) -> None:
    path = f"{tmpdir_short}/sub/dir/g.sock"
    with JobSocketServer(registry, path, group=65534) as srv:
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o660
        assert st.st_gid == 65534
        assert srv.stats().connections_open == 0
    assert not os.path.exists(path)


def test_stale_socket_replaced_live_one_refused(registry: JobRegistry, tmpdir_short: str) -> None:
    path = f"{tmpdir_short}/s.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # file left behind, nobody listening
    with JobSocketServer(registry, path):
        with pytest.raises(SocketInUseError):
            JobSocketServer(JobRegistry(), path).start()
        with Client(path) as c:
            assert c.call(op="ping")["ok"]  # the live one was not disturbed
    regular = f"{tmpdir_short}/file"
    open(regular, "w").close()
    with pytest.raises(SocketInUseError):
        JobSocketServer(registry, regular).start()
    assert os.path.isfile(regular)


def test_unknown_group_and_long_path_are_config_errors(
    registry: JobRegistry, tmpdir_short: str
) -> None:
    with pytest.raises(ValueError):
        JobSocketServer(registry, "/tmp/" + "x" * 120)
    with pytest.raises(ValueError):
        JobSocketServer(registry, f"{tmpdir_short}/s.sock", group="no-such-group-gf").start()


def test_connection_limit(registry: JobRegistry, tmpdir_short: str) -> None:
    path = f"{tmpdir_short}/s.sock"
    with (
        JobSocketServer(registry, path, limits=ServerLimits(max_connections=2)) as srv,
        Client(path) as a,
        Client(path) as b,
        Client(path) as c,
    ):
        assert a.call(op="ping")["ok"] and b.call(op="ping")["ok"]
        assert c.reply()["error"] == "too_many_connections"
        assert a.call(op="ping")["ok"]
        b.close()
        deadline = time.monotonic() + 5
        while srv.stats().connections_open > 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        with Client(path) as d:
            assert d.call(op="ping")["ok"]
        assert srv.stats().connections_refused == 1


def test_rate_limit_per_connection(registry: JobRegistry, tmpdir_short: str) -> None:
    path = f"{tmpdir_short}/s.sock"
    limits = ServerLimits(rate_per_s=1.0, burst=5.0)
    with JobSocketServer(registry, path, limits=limits), Client(path) as a, Client(path) as b:
        a.call(op="register", job="j", program="p")
        a.send_raw(b'{"v":1,"op":"add","job":"j","flops":1.0,"tokens":1}\n' * 20)
        replies = [a.reply() for _ in range(20)]
        limited = [r for r in replies if not r["ok"]]
        assert len(limited) >= 14 and all(r["error"] == "rate_limited" for r in limited)
        applied = 20 - len(limited)
        assert b.call(op="query", job="j")["job"]["analytic_flops"] == float(applied)


def test_client_that_never_reads_is_back_pressured(connect: Callable[[], Client]) -> None:
    slow, other = connect(), connect()
    slow.sock.setblocking(False)
    ping = b'{"v":1,"op":"ping"}\n' * 1000
    sent = 0
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        try:
            sent += slow.sock.send(ping)
        except BlockingIOError:
            break
    assert sent < 200 * 1024 * 1024  # the server stopped reading at some point
    assert other.call(op="ping")["ok"]  # and still serves everyone else


def test_stop_closes_connections(server: JobSocketServer, client: Client) -> None:
    assert client.call(op="ping")["ok"]
    server.stop()
    assert client.sock.recv(10) == b""
    assert not os.path.exists(server.path)
