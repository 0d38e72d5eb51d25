"""Identity from SO_PEERCRED: process-tree attach rules and uid ownership, with real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest

from gpuflops.jobs.records import AttachedJob
from gpuflops.jobs.registry import JobRegistry
from gpuflops.jobs.server import JobSocketServer
from tests.jobs.jobsock_client import Client

# Runs in a separate process: registers a job (attaching itself), then tries to attach its
# parent, an unrelated process and its own child. Only stdlib, so it needs no PYTHONPATH.
ATTACHER = textwrap.dedent(
    """
    import json, socket, subprocess, sys
    path, unrelated = sys.argv[1], int(sys.argv[2])
    s = socket.socket(socket.AF_UNIX); s.connect(path); f = s.makefile("rwb")
    def call(**m):
        m["v"] = 1
        f.write(json.dumps(m).encode() + b"\\n"); f.flush()
        return json.loads(f.readline())
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    out = {
        "register": call(op="register", job="child-job", program="p"),
        "parent": call(op="attach", job="child-job", pid=__import__("os").getppid()),
        "unrelated": call(op="attach", job="child-job", pid=unrelated),
        "own_child": call(op="attach", job="child-job", pid=child.pid),
        "spoof": call(op="register", job="x", program="p", pid=1),
        "child_pid": child.pid,
    }
    print(json.dumps(out), flush=True)
    sys.stdin.readline()  # stay alive until the test has checked attribution
    child.kill()
    """
)


def test_attach_only_own_process_tree(server: JobSocketServer, registry: JobRegistry) -> None:
    unrelated = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    proc = subprocess.Popen(
        [sys.executable, "-c", ATTACHER, str(server.path), str(unrelated.pid)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    with proc:
        assert proc.stdout is not None and proc.stdin is not None
        out = json.loads(proc.stdout.readline())
        assert out["register"]["ok"] and out["register"]["pid"] == proc.pid
        assert out["parent"]["error"] == "forbidden"
        assert out["unrelated"]["error"] == "forbidden"
        assert out["own_child"] == {"ok": True, "attached": out["child_pid"]}
        assert out["spoof"]["error"] == "bad_field"  # identity is never taken from a message
        ref = AttachedJob("child-job", "p")
        assert registry.job_for_pid(proc.pid) == ref
        assert registry.job_for_pid(out["child_pid"]) == ref
        assert registry.job_for_pid(os.getpid()) is None
        assert registry.job_for_pid(unrelated.pid) is None
        snap = registry.snapshot().job("child-job")
        assert snap is not None and snap.pids == {proc.pid, out["child_pid"]}
        proc.stdin.write("\n")
        proc.stdin.flush()
        proc.wait(10)
    unrelated.kill()
    unrelated.wait()


def _as_nobody(path: str, requests: list[dict[str, object]]) -> list[dict[str, object]]:
    """Send ``requests`` from a forked child running as uid/gid 65534; return its replies."""
    read_fd, write_fd = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+)
        pid = os.fork()
    if pid == 0:  # child: no pytest machinery from here on, only os._exit
        code = 1
        try:
            os.close(read_fd)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            with Client(path) as c:
                replies = [c.call(**r) for r in requests]
            os.write(write_fd, json.dumps(replies).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    data = b""
    while chunk := os.read(read_fd, 65536):
        data += chunk
    os.close(read_fd)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    result: list[dict[str, object]] = json.loads(data)
    return result


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another uid")
def test_other_uid_cannot_report_into_a_job(registry: JobRegistry, tmpdir_short: str) -> None:
    os.chmod(tmpdir_short, 0o755)
    path = f"{tmpdir_short}/s.sock"
    with JobSocketServer(registry, path, group=65534), Client(path) as root:
        assert root.call(op="register", job="root-job", program="p")["ok"]
        assert root.call(op="add", job="root-job", flops=10.0, tokens=1)["ok"]
        replies = _as_nobody(
            path,
            [
                {"op": "ping"},
                {"op": "add", "job": "root-job", "flops": 1e20, "tokens": 1},
                {"op": "register", "job": "root-job", "program": "p"},
                {"op": "end", "job": "root-job", "final": True},
                {"op": "query", "job": "root-job"},
                {"op": "register", "job": "nobody-job", "program": "p"},
                {"op": "register", "job": "nobody-job", "program": "nobody-p"},
                {"op": "add", "job": "nobody-job", "flops": 3.0, "tokens": 1},
            ],
        )
        peer = replies[0]["peer"]
        assert isinstance(peer, dict) and (peer["uid"], peer["gid"]) == (65534, 65534)
        # Root's program too: its first registrant owns it.
        assert [r.get("error") for r in replies[1:6]] == ["forbidden"] * 5
        assert replies[6]["ok"] and replies[7]["ok"]
        # Root is excepted: it may report into anyone's job.
        assert root.call(op="add", job="nobody-job", flops=4.0, tokens=1)["ok"]
        snap = registry.snapshot()
        root_job, nobody_job = snap.job("root-job"), snap.job("nobody-job")
        assert root_job is not None and nobody_job is not None
        assert root_job.analytic_flops == 10.0 and root_job.state == "open"
        assert nobody_job.owner_uid == 65534 and nobody_job.analytic_flops == 7.0
