"""Process -> job mapping against a fake /proc tree (tests/attribution/proc), a real /proc with
real subprocesses, and a real HTTP(S) kubelet stand-in on 127.0.0.1."""

from __future__ import annotations

import hashlib
import json
import os
import select
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from gpuflops.identity.cgroup import (
    CgroupParseError,
    find_pod,
    find_slurm,
    find_systemd_unit,
    parse_cgroup,
    parse_environ,
    parse_stat,
    sanitize_label,
)
from gpuflops.identity.kubelet import KubeletClient, parse_pod_list, urllib_fetch
from gpuflops.identity.mapper import (
    UNATTRIBUTED_IDENTITY,
    JobIdentity,
    JobMapper,
    parse_order,
    validate_order,
)
from tests.support import FakeClock

PROC = Path(__file__).parent / "proc"
U1 = "7a3c4e0e-2a5b-4c1f-9d6e-3f2b1a0c9d8e"
U2 = "0b6f2d4e-8c1a-4e7b-9f3d-5a2c8e1b7d40"
U3 = "d2c4b6a8-1e3f-4a5b-8c7d-9e0f1a2b3c4d"
U4 = "5e8a1c3b-7d9f-4b2e-a6c0-1d3f5b7e9a2c"
U5 = "9f1e3d5c-b7a9-4c8e-8d6f-0a2b4c6d8e1f"
STATIC = "3c5d6f0e9a1b4c7d8e2f0a1b3c5d7e9f"


def cid(name: str) -> str:
    """Container ids in the fixture tree are sha256(name), 64 hex digits like real ones."""
    return hashlib.sha256(name.encode()).hexdigest()


def copy_proc(tmp_path: Path, *pids: int) -> Path:
    root = tmp_path / "proc"
    for pid in pids:
        shutil.copytree(PROC / str(pid), root / str(pid))
    return root


def write_stat(root: Path, pid: int, start_ticks: int) -> None:
    """Rewrite field 22 (start time) of a fixture stat file."""
    path = root / str(pid) / "stat"
    head, _, rest = path.read_text().rpartition(")")
    fields = rest.split()
    fields[19] = str(start_ticks)
    path.write_text(head + ") " + " ".join(fields) + "\n")


# ---------------------------------------------------------------------------------------------
# Parsers


def test_parse_stat_handles_comm_with_spaces_and_parens() -> None:
    st = parse_stat((PROC / "4008" / "stat").read_text())  # comm "tmux: server"
    assert (st.ppid, st.start_time_ticks) == (1, 844008)
    st = parse_stat("42 (a) b) (c) R 7 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 99 0 0")
    assert (st.ppid, st.start_time_ticks) == (7, 99)
    with pytest.raises(ValueError):
        parse_stat("42 (truncated) R 7 1")


def test_parse_environ_nul_separated_first_wins() -> None:
    env = parse_environ(b"A=1\0B=x=y\0A=2\0garbage\0=novalue\0\0C=\xff\0")
    assert env == {"A": "1", "B": "x=y", "C": "\ufffd"}
    assert parse_environ((PROC / "7001" / "environ").read_bytes()) == {}
    assert parse_environ((PROC / "3002" / "environ").read_bytes())["TORCHELASTIC_RUN_ID"] == "none"


def test_parse_cgroup_rejects_garbage_and_keeps_colons_in_paths() -> None:
    with pytest.raises(CgroupParseError) as e:
        parse_cgroup((PROC / "7002" / "cgroup").read_text())
    assert "not a cgroup file" in e.value.line
    (line,) = parse_cgroup("0::/system.slice/a:b.service\n")
    assert line.unified and line.path == "/system.slice/a:b.service"
    lines = parse_cgroup((PROC / "1001" / "cgroup").read_text())
    assert len(lines) == 12 and lines[-1].controllers == ("name=systemd",)


POD_LAYOUTS = [
    # pid, uid, container id, runtime, qos
    (1001, U1, cid("c1"), None, "burstable"),
    (1002, U2, cid("c2"), "containerd", "burstable"),
    (1003, U3, cid("c3"), "containerd", "besteffort"),
    (1004, U4, cid("c4"), "crio", "guaranteed"),
    (1005, U5, cid("c5"), None, "guaranteed"),
    (1006, U1, cid("c6"), "docker", "burstable"),
    (1007, U2, cid("c7"), "containerd", "burstable"),
    (1008, U3, cid("c8"), "containerd", "besteffort"),
    (1009, STATIC, cid("c9"), "containerd", "burstable"),
    (1010, U4, cid("c10"), None, "besteffort"),
    (1011, U2, cid("c11"), "crio", "burstable"),
    (1012, U2, cid("c12"), "crio", "burstable"),
]


@pytest.mark.parametrize(("pid", "uid", "container", "runtime", "qos"), POD_LAYOUTS)
def test_find_pod_in_real_layouts(
    pid: int, uid: str, container: str, runtime: str | None, qos: str
) -> None:
    pod = find_pod(parse_cgroup((PROC / str(pid) / "cgroup").read_text()))
    assert pod is not None
    assert (pod.pod_uid, pod.container_id, pod.runtime, pod.qos_class) == (
        uid, container, runtime, qos
    )
    assert pod.conmon == (pid == 1011)


@pytest.mark.parametrize("pid", [2001, 2002, 3001, 4001, 4002, 4004, 4007, 7001])
def test_find_pod_none_outside_kubernetes(pid: int) -> None:
    assert find_pod(parse_cgroup((PROC / str(pid) / "cgroup").read_text())) is None


@pytest.mark.parametrize(
    ("pid", "job", "step", "uid"),
    [(2001, "4242", "0", "1000"), (2002, "4243", "batch", None), (2004, "4244", "extern", None),
     (2005, "4243", "batch", None)],
)
def test_find_slurm_v1_and_v2(pid: int, job: str, step: str, uid: str | None) -> None:
    sl = find_slurm(parse_cgroup((PROC / str(pid) / "cgroup").read_text()))
    assert sl is not None and (sl.job_id, sl.step, sl.uid) == (job, step, uid)


def test_find_slurm_needs_a_slurm_root() -> None:
    assert find_slurm(parse_cgroup("0::/system.slice/myapp/job_12/step_0\n")) is None
    assert find_slurm(parse_cgroup("0::/system.slice/slurmd.service\n")) is None
    assert find_slurm(parse_cgroup("4:memory:/slurm_n1/uid_5/job_8/step_1/task_0\n")) is not None


def test_systemd_units_and_ignore_list() -> None:
    def unit(pid: int, ignore: tuple[str, ...] | None = None) -> Any:
        lines = parse_cgroup((PROC / str(pid) / "cgroup").read_text())
        return find_systemd_unit(lines) if ignore is None else find_systemd_unit(lines, ignore)

    assert unit(4001).unit == "finetune-llama.service"
    assert (unit(4002).unit, unit(4002).user_uid) == ("sweep.service", "1000")
    assert unit(4004).unit == "batch-infer.service"  # hybrid: unified line
    for pid in (4003, 4005, 4006, 4008, 4009, 2003):
        assert unit(pid) is None, pid
    # Configurable: with an empty ignore list a login session scope is a unit like any other.
    assert unit(4003, ()).unit == "session-3.scope"
    # v1 only: the name=systemd hierarchy decides.
    v1 = parse_cgroup("4:memory:/\n1:name=systemd:/system.slice/train.service\n")
    sd = find_systemd_unit(v1)
    assert sd is not None and sd.unit == "train.service"
    assert find_systemd_unit(parse_cgroup("4:memory:/system.slice/x.service\n")) is None


def test_sanitize_label_bounds_and_charset() -> None:
    assert sanitize_label("k8s/ml/llama-ft-0") == "k8s/ml/llama-ft-0"
    assert sanitize_label("  a b\t\nc✓\"}{ ") == "a_b_c"
    assert sanitize_label("\t ✓ ") == ""
    long_a, long_b = "j" * 300 + "a", "j" * 300 + "b"
    sa, sb = sanitize_label(long_a), sanitize_label(long_b)
    assert len(sa) == len(sb) == 128 and sa != sb and sa.startswith("j" * 100)
    assert sanitize_label(sa) == sa  # idempotent on its own output


# ---------------------------------------------------------------------------------------------
# Resolution over the fixture tree


@dataclass(frozen=True)
class Want:
    job: str
    program: str
    source: str
    details: Mapping[str, str] = field(default_factory=dict)


EXPECTED: dict[int, Want] = {
    1001: Want(f"k8s/pod/{U1}", f"k8s/pod/{U1}", "kubernetes",
               {"pod_uid": U1, "qos_class": "burstable"}),
    1004: Want(f"k8s/pod/{U4}", f"k8s/pod/{U4}", "kubernetes", {"runtime": "crio"}),
    1009: Want(f"k8s/pod/{STATIC}", f"k8s/pod/{STATIC}", "kubernetes", {}),
    2001: Want("slurm/4242", "llama-ft", "slurm",
               {"step": "0", "uid": "1000", "attempt": "1", "cluster": "hpc1",
                "evidence": "cgroup+environ"}),
    2002: Want("slurm/4243", "mistral-7b-sft", "slurm",
               {"step": "batch", "array_job_id": "4240", "array_task_id": "3"}),
    2003: Want("slurm/77", "linuxproc-job", "slurm", {"evidence": "environ"}),
    2004: Want("slurm/4244", "slurm/4244", "slurm", {"evidence": "cgroup", "step": "extern"}),
    2005: Want("slurm/4243", "slurm/4243", "slurm", {}),
    3000: Want("unattributed", "unattributed", "none"),
    3001: Want("torchrun/c6a0f3b2-9d41-4e7a-b8c5-2f1d0e9a7b63",
               "torchrun/c6a0f3b2-9d41-4e7a-b8c5-2f1d0e9a7b63", "torchrun",
               {"rank": "3", "group_rank": "0", "attempt": "2"}),
    3002: Want("torchrun/none-3003", "torchrun/none-3003", "torchrun", {"agent_pid": "3003"}),
    3004: Want("torchrun/none-3003", "torchrun/none-3003", "torchrun", {"agent_pid": "3003"}),
    4001: Want("systemd/finetune-llama.service", "systemd/finetune-llama.service", "systemd"),
    4002: Want("systemd/user@1000/sweep.service", "systemd/user@1000/sweep.service", "systemd",
               {"user_uid": "1000"}),
    4003: Want("unattributed", "unattributed", "none"),
    4004: Want("systemd/batch-infer.service", "systemd/batch-infer.service", "systemd"),
    4005: Want("unattributed", "unattributed", "none"),
    4006: Want("unattributed", "unattributed", "none"),
    4007: Want(f"systemd/docker-{cid('plain-docker')}.scope",
               f"systemd/docker-{cid('plain-docker')}.scope", "systemd"),
    4008: Want("unattributed", "unattributed", "none"),
    4009: Want("unattributed", "unattributed", "none"),
    5001: Want("team-a/run-17", "llama3-8b-ft", "env"),
    5002: Want(f"k8s/pod/{U1}", f"k8s/pod/{U1}", "kubernetes", {"runtime": "containerd"}),
    7001: Want("unattributed", "unattributed", "none"),
    7002: Want("unattributed", "unattributed", "none"),
}


@pytest.mark.parametrize("pid", sorted(EXPECTED))
def test_resolve_fixture_default_order(pid: int) -> None:
    ref = JobMapper(PROC).resolve(pid)
    want = EXPECTED[pid]
    assert (ref.job, ref.program, ref.source) == (want.job, want.program, want.source)
    for k, v in want.details.items():
        assert ref.details.get(k) == v, k
    if want.source == "none":
        assert ref == UNATTRIBUTED_IDENTITY


def test_every_fixture_pid_resolves_to_a_safe_label() -> None:
    mapper = JobMapper(PROC)
    pids = [int(p.name) for p in PROC.iterdir() if p.name.isdigit()]
    assert len(pids) >= 30
    for pid in pids:
        ref = mapper.resolve(pid)
        for value in (ref.job, ref.program):
            assert value and len(value) <= 128 and sanitize_label(value) == value, (pid, value)
    long_ref = mapper.resolve(5003)
    assert long_ref.source == "env" and long_ref.job.startswith("weird_job_name_xxx")
    assert len(long_ref.job) == 128 and long_ref.program == "prog_a=_b"


def test_jobref_is_immutable_and_hashable() -> None:
    d = {"a": "1"}
    ref = JobIdentity("j", "p", "env", d)
    d["a"] = "2"
    assert ref.details["a"] == "1"
    with pytest.raises(TypeError):
        ref.details["a"] = "3"  # type: ignore[index]
    assert len({ref, JobIdentity("j", "p", "env", {"a": "1"})}) == 1


# ---------------------------------------------------------------------------------------------
# Order


def test_order_decides_between_matching_sources() -> None:
    assert JobMapper(PROC).resolve(5001).source == "env"
    ref = JobMapper(PROC, order=("slurm", "env")).resolve(5001)
    assert (ref.job, ref.program, ref.source) == ("slurm/4245", "llama3-8b-ft", "slurm")
    assert JobMapper(PROC).resolve(5002).source == "kubernetes"
    ref = JobMapper(PROC, order=("torchrun", "kubernetes")).resolve(5002)
    assert ref.job == "torchrun/pytorchjob-llama-ft"
    # A source left out of the order is never consulted.
    assert JobMapper(PROC, order=("kubernetes", "systemd")).resolve(2001) == UNATTRIBUTED_IDENTITY
    assert JobMapper(PROC, order=()).resolve(1001) == UNATTRIBUTED_IDENTITY


def test_order_validation() -> None:
    assert parse_order(" socket, slurm ,kubernetes,") == ("socket", "slurm", "kubernetes")
    with pytest.raises(ValueError, match="unknown job source 'lsf'"):
        validate_order(["slurm", "lsf"])
    with pytest.raises(ValueError, match="listed twice: slurm"):
        parse_order("slurm,env,slurm")
    with pytest.raises(ValueError, match="unknown"):
        JobMapper(PROC, order=("k8s",))


# ---------------------------------------------------------------------------------------------
# Socket registrations


def test_socket_lookup_first_live_and_sanitized() -> None:
    registered: dict[int, JobIdentity] = {}
    mapper = JobMapper(PROC, socket_lookup=registered.get)
    assert mapper.resolve(1003).source == "kubernetes"
    # A registration arriving later wins at once, without waiting for the cache to expire.
    registered[1003] = JobIdentity("ft run 9", "", "socket", {"client": "hf"})
    ref = mapper.resolve(1003)
    assert (ref.job, ref.program, ref.source) == ("ft_run_9", "ft_run_9", "socket")
    assert ref.details == {"client": "hf"}
    # "unattributed" cannot be claimed through the socket; the next source answers.
    registered[1003] = JobIdentity("unattributed", "x", "socket")
    assert mapper.resolve(1003).source == "kubernetes"


def test_socket_lookup_failure_falls_through() -> None:
    def broken(pid: int) -> JobIdentity | None:
        raise RuntimeError("registry bug")

    mapper = JobMapper(PROC, socket_lookup=broken)
    assert mapper.resolve(4001).job == "systemd/finetune-llama.service"
    assert mapper.stats()["socket_error"] == 1


# ---------------------------------------------------------------------------------------------
# Cache: pid reuse, TTL, vanished processes


def test_pid_reuse_detected_by_start_time(tmp_path: Path) -> None:
    root = copy_proc(tmp_path, 4001)
    clock = FakeClock()
    mapper = JobMapper(root, clock=clock, ttl_s=3600)
    assert mapper.resolve(4001).job == "systemd/finetune-llama.service"
    # Same pid, new process: different start time and cgroup. The TTL has not expired.
    (root / "4001" / "cgroup").write_text("0::/system.slice/other-job.service\n")
    write_stat(root, 4001, 999999)
    clock.t += 1
    assert mapper.resolve(4001).job == "systemd/other-job.service"
    assert mapper.stats()["pid_reused"] == 1


def test_ttl_rereads_proc_for_same_process(tmp_path: Path) -> None:
    root = copy_proc(tmp_path, 4001)
    clock = FakeClock()
    mapper = JobMapper(root, clock=clock, ttl_s=30)
    assert mapper.resolve(4001).job == "systemd/finetune-llama.service"
    (root / "4001" / "cgroup").write_text("0::/system.slice/moved.service\n")
    clock.t += 29
    assert mapper.resolve(4001).job == "systemd/finetune-llama.service"  # cached
    clock.t += 1
    assert mapper.resolve(4001).job == "systemd/moved.service"


def test_vanished_pid_keeps_last_answer_then_ages_out(tmp_path: Path) -> None:
    root = copy_proc(tmp_path, 2001)
    clock = FakeClock()
    mapper = JobMapper(root, clock=clock, ttl_s=30, retain_s=600)
    assert mapper.resolve(2001).job == "slurm/4242"
    shutil.rmtree(root / "2001")
    clock.t += 100  # past the TTL: still the last known answer
    assert mapper.resolve(2001).job == "slurm/4242"
    assert mapper.resolve(424242) == UNATTRIBUTED_IDENTITY  # never seen
    assert mapper.stats()["vanished"] == 2
    clock.t += 601
    mapper.resolve(1)  # triggers pruning
    assert mapper.resolve(2001) == UNATTRIBUTED_IDENTITY


def test_half_written_stat_is_treated_as_vanished(tmp_path: Path) -> None:
    root = copy_proc(tmp_path, 4001)
    (root / "4001" / "stat").write_text("4001 (python3) S 1")
    assert JobMapper(root).resolve(4001) == UNATTRIBUTED_IDENTITY


def test_cache_is_bounded(tmp_path: Path) -> None:
    root = copy_proc(tmp_path, 4001, 4002)
    clock = FakeClock()
    mapper = JobMapper(root, clock=clock, max_entries=1)
    mapper.resolve(4001)
    clock.t += 1
    mapper.resolve(4002)
    shutil.rmtree(root / "4001")
    shutil.rmtree(root / "4002")
    clock.t += 1
    # The older entry was evicted; the newer one still answers for its vanished process.
    assert mapper.resolve(4001) == UNATTRIBUTED_IDENTITY
    assert mapper.resolve(4002).job == "systemd/user@1000/sweep.service"


# ---------------------------------------------------------------------------------------------
# Unreadable environ (a real EACCES: root files read by an unprivileged process)


def _resolve_unprivileged(root: Path, pids: list[int]) -> dict[int, list[str]]:
    """Resolve pids as uid 65534 when we are root, else as ourselves; [job, program, source]."""
    if os.geteuid() != 0:
        mapper = JobMapper(root)
        return {p: [mapper.resolve(p).job, mapper.resolve(p).program, mapper.resolve(p).source]
                for p in pids}
    r, w = os.pipe()
    with warnings.catch_warnings():
        # Python >= 3.12 warns about fork() in a threaded process; the child only reads files.
        warnings.simplefilter("ignore", DeprecationWarning)
        child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            os.close(r)
            os.setgid(65534)
            os.setuid(65534)
            mapper = JobMapper(root)
            out = {p: [mapper.resolve(p).job, mapper.resolve(p).program, mapper.resolve(p).source]
                   for p in pids}
            out_stats = mapper.stats()
            os.write(w, json.dumps({"refs": out, "stats": out_stats}).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        ready, _, _ = select.select([f], [], [], 20)
        if not ready:
            os.kill(child, signal.SIGKILL)
        data = f.read() if ready else b""
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    doc = json.loads(data)
    assert doc["stats"]["environ_unreadable"] >= 1
    return {int(k): v for k, v in doc["refs"].items()}


def test_unreadable_environ_skips_env_sources() -> None:
    top = Path(tempfile.mkdtemp(prefix="gpuflops-proc-"))
    try:
        top.chmod(0o755)
        root = top / "proc"
        for pid in (5001, 3001, 2001):
            shutil.copytree(PROC / str(pid), root / str(pid))
            (root / str(pid) / "environ").chmod(0o000 if os.geteuid() else 0o400)
        for d in [root, *root.iterdir()]:
            d.chmod(0o755)
        refs = _resolve_unprivileged(root, [5001, 3001, 2001])
    finally:
        shutil.rmtree(top)
    # GPUFLOPS_JOB unreadable: the Slurm cgroup still names the job, without its env extras.
    assert refs[5001] == ["slurm/4245", "slurm/4245", "slurm"]
    assert refs[2001] == ["slurm/4242", "slurm/4242", "slurm"]
    assert refs[3001] == ["unattributed", "unattributed", "none"]  # torchrun lives in env only


# ---------------------------------------------------------------------------------------------
# Real /proc, real processes


@pytest.fixture
def spawn() -> Iterator[Any]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(env: dict[str, str]) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(30)"], env={**os.environ, **env}
        )
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.kill()
        p.wait()


def test_real_proc_env_and_torchrun_agent(spawn: Any) -> None:
    clean = {k: "" for k in ("GPUFLOPS_JOB", "TORCHELASTIC_RUN_ID")}
    assert "TORCHELASTIC_RUN_ID" not in os.environ
    a = spawn({**clean, "GPUFLOPS_JOB": "real-env-job", "GPUFLOPS_PROGRAM": "real-prog"})
    b = spawn({"TORCHELASTIC_RUN_ID": "none", "RANK": "5"})
    mapper = JobMapper(Path("/proc"))
    ra = mapper.resolve(a.pid)
    assert (ra.job, ra.program, ra.source) == ("real-env-job", "real-prog", "env")
    rb = mapper.resolve(b.pid)
    # Our test process is b's parent and has no TORCHELASTIC_RUN_ID: it plays the agent.
    assert (rb.job, rb.source) == (f"torchrun/none-{os.getpid()}", "torchrun")
    assert rb.details["rank"] == "5"
    a.kill()
    a.wait()
    assert mapper.resolve(a.pid).job == "real-env-job"  # vanished: last answer
    assert mapper.stats()["vanished"] == 1


# ---------------------------------------------------------------------------------------------
# Kubelet, against a real HTTP(S) server on 127.0.0.1


def pod_list() -> dict[str, Any]:
    def pod(uid: str, ns: str, name: str, labels: dict[str, str] | None = None,
            annotations: dict[str, str] | None = None, containers: dict[str, str] | None = None
            ) -> dict[str, Any]:
        return {
            "metadata": {"uid": uid, "namespace": ns, "name": name, "labels": labels or {},
                         "annotations": annotations or {}},
            "spec": {"nodeName": "gpu-node-3"},
            "status": {"phase": "Running", "containerStatuses": [
                {"name": n, "containerID": c, "ready": True} for n, c in (containers or {}).items()
            ]},
        }

    return {
        "kind": "PodList",
        "apiVersion": "v1",
        "metadata": {},
        "items": [
            pod(U1, "ml", "llama-ft-0", {"gpuflops.io/program": "llama3-8b-ft"},
                containers={"trainer": f"docker://{cid('c1')}"}),
            pod(U2, "ml", "sft-worker-1", annotations={"gpuflops.io/program": "mistral-sft"},
                containers={"trainer": f"containerd://{cid('c2')}",
                            "sidecar": f"containerd://{cid('x')}"}),
            pod(U3, "research", "pt-job-worker-2", {"gpuflops.io/job": "pt-job"}),
            pod("mirror-uid-differs", "kube-system", "etcd-gpu-node-3",
                annotations={"kubernetes.io/config.hash": STATIC,
                             "kubernetes.io/config.mirror": STATIC}),
            {"metadata": "not a dict"},
            {"metadata": {"name": "no-uid"}},
        ],
    }


@dataclass
class Kubelet:
    url: str
    requests: list[dict[str, str]]
    status: list[int]
    body: list[bytes]


@pytest.fixture
def kubelet_http() -> Iterator[Kubelet]:
    yield from _serve(None)


def _serve(context: ssl.SSLContext | None) -> Iterator[Kubelet]:
    state = Kubelet("", [], [200], [json.dumps(pod_list()).encode()])

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.requests.append({"path": self.path, **dict(self.headers.items())})
            self.send_response(state.status[0])
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(state.body[0])))
            self.end_headers()
            self.wfile.write(state.body[0])

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    scheme = "http"
    if context is not None:
        server.socket = context.wrap_socket(server.socket, server_side=True)
        scheme = "https"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    state.url = f"{scheme}://127.0.0.1:{server.server_address[1]}/pods"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
        assert not thread.is_alive()


def test_kubelet_names_pods_programs_and_containers(kubelet_http: Kubelet) -> None:
    clock = FakeClock()
    client = KubeletClient(kubelet_http.url, token_path=None, clock=clock)
    mapper = JobMapper(PROC, kubelet=client, clock=clock)
    r = mapper.resolve(1001)
    assert (r.job, r.program) == ("k8s/ml/llama-ft-0", "llama3-8b-ft")
    assert r.details["container"] == "trainer" and r.details["pod_uid"] == U1
    r = mapper.resolve(1002)
    assert (r.job, r.program) == ("k8s/ml/sft-worker-1", "mistral-sft")  # from annotation
    r = mapper.resolve(1003)
    assert (r.job, r.program) == ("k8s/research/pt-job", "k8s/research/pt-job")  # grouped
    assert r.details["pod"] == "pt-job-worker-2"
    r = mapper.resolve(1009)
    assert r.job == "k8s/kube-system/etcd-gpu-node-3"  # static pod via its config hash
    r = mapper.resolve(1005)  # not on this kubelet: UID-based name
    assert r.job == f"k8s/pod/{U5}"
    # One fetch served them all; the miss on U5 did not hammer the kubelet.
    assert len(kubelet_http.requests) == 1
    assert "Authorization" not in kubelet_http.requests[0]  # read-only port: no token
    clock.t += 31
    mapper.resolve(1001)
    assert len(kubelet_http.requests) == 2  # refreshed after refresh_s


def test_kubelet_down_falls_back_then_recovers(kubelet_http: Kubelet) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    target = [f"http://127.0.0.1:{dead_port}/pods"]
    real = urllib_fetch()

    def fetch(url: str, headers: Mapping[str, str], timeout_s: float) -> bytes:
        return real(target[0], headers, timeout_s)  # where the kubelet is "now"

    clock = FakeClock()
    client = KubeletClient(target[0], token_path=None, fetch=fetch, clock=clock, miss_refresh_s=5)
    mapper = JobMapper(PROC, kubelet=client, clock=clock)
    assert mapper.resolve(1001).job == f"k8s/pod/{U1}"
    assert mapper.resolve(1002).job == f"k8s/pod/{U2}"  # within miss_refresh_s: no retry
    assert mapper.stats()["kubelet_errors"] == 1
    assert mapper.stats()["kubelet_requests"] == 1
    # The kubelet comes back; the pod's name replaces its UID (fallbacks are not cached).
    target[0] = kubelet_http.url
    clock.t += 5
    assert mapper.resolve(1001).job == "k8s/ml/llama-ft-0"


@pytest.mark.parametrize(
    ("status", "body"), [(500, b"boom"), (200, b"<html>"), (200, b'{"kind":"Status"}')]
)
def test_kubelet_bad_answers_keep_last_good_list(
    kubelet_http: Kubelet, status: int, body: bytes
) -> None:
    clock = FakeClock()
    client = KubeletClient(kubelet_http.url, token_path=None, clock=clock)
    assert client.pod(U1) is not None
    kubelet_http.status[0], kubelet_http.body[0] = status, body
    clock.t += 60
    info = client.pod(U1)
    assert info is not None and info.name == "llama-ft-0"
    assert client.errors == 1 and client.requests == 2


@pytest.mark.timeout(10)
def test_kubelet_hang_is_bounded_by_timeout() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)  # accepts (in the backlog) but never answers
        port = listener.getsockname()[1]
        client = KubeletClient(f"http://127.0.0.1:{port}/pods", token_path=None, timeout_s=0.3)
        mapper = JobMapper(PROC, kubelet=client)
        t0 = time.monotonic()
        assert mapper.resolve(1001).job == f"k8s/pod/{U1}"
        assert time.monotonic() - t0 < 2.0
        assert client.errors == 1


@pytest.fixture(scope="module")
def tls_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    return cert, key


@pytest.fixture
def kubelet_https(tls_cert: tuple[Path, Path]) -> Iterator[Kubelet]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(tls_cert[0]), str(tls_cert[1]))
    yield from _serve(context)


def test_kubelet_https_with_service_account_token(
    kubelet_https: Kubelet, tls_cert: tuple[Path, Path], tmp_path: Path
) -> None:
    token = tmp_path / "token"
    token.write_text("eyJhbGciOi.test-token\n")
    # Verified against the serving certificate.
    clock = FakeClock()
    client = KubeletClient(kubelet_https.url, token_path=token, clock=clock,
                           fetch=urllib_fetch(ca_file=tls_cert[0]))
    assert client.pod(U1) is not None
    assert kubelet_https.requests[-1]["Authorization"] == "Bearer eyJhbGciOi.test-token"
    # Rotated token is picked up on the next request.
    token.write_text("rotated")
    clock.t += 31
    assert client.pod(U1) is not None
    assert kubelet_https.requests[-1]["Authorization"] == "Bearer rotated"
    # Without the CA, verification fails (counted, no exception) unless it is switched off.
    strict = KubeletClient(kubelet_https.url, token_path=token)
    assert strict.pod(U1) is None and strict.errors == 1
    lax = KubeletClient(kubelet_https.url, token_path=token, fetch=urllib_fetch(verify_tls=False))
    info = lax.pod(U1)
    assert info is not None and info.namespace == "ml"


def test_parse_pod_list_rejects_non_podlists() -> None:
    with pytest.raises(ValueError):
        parse_pod_list(b"\xff\xfe")
    with pytest.raises(ValueError):
        parse_pod_list(b"[]")
    pods = parse_pod_list(json.dumps(pod_list()).encode())
    assert set(pods) == {U1, U2, U3, "mirror-uid-differs", STATIC}
    assert pods[U2].containers == {cid("c2"): "trainer", cid("x"): "sidecar"}
