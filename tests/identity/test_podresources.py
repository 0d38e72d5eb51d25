"""The kubelet PodResources client against a real gRPC server on a real Unix socket, and the
mapper naming Kubernetes jobs from device ownership (fake /proc tree, tests/identity/proc).

The server's answers are encoded here by hand from the public API's field numbers
(k8s.io/kubelet pkg/apis/podresources/v1/api.proto), not with the client's own message
classes, and carry the fields a current kubelet adds (cpu_ids, memory, topology), so a wrong
field number or a parser that chokes on newer kubelets fails these tests.
"""

from __future__ import annotations

import re
import shutil
import sys
import time
from collections.abc import Iterator, Mapping
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2

from gpuflops.config import Settings, env_settings
from gpuflops.identity.kubelet import KubeletClient
from gpuflops.identity.mapper import JobMapper
from gpuflops.identity.podresources import (
    LIST_METHOD,
    MESSAGES,
    DeviceHolder,
    PodResourcesClient,
    PodResourcesError,
    grpc_list,
    message_classes,
    parse_list_response,
)
from gpuflops.jobs.registry import JobRegistry
from gpuflops.pipeline.label import Labeler
from tests.support import FakeClock

PROC = Path(__file__).parent / "proc"
PROTO = Path(__file__).parents[2] / "gpuflops" / "identity" / "podresources.proto"
U1 = "7a3c4e0e-2a5b-4c1f-9d6e-3f2b1a0c9d8e"  # pid 1001
U3 = "d2c4b6a8-1e3f-4a5b-8c7d-9e0f1a2b3c4d"  # pid 1003
U5 = "9f1e3d5c-b7a9-4c8e-8d6f-0a2b4c6d8e1f"  # pid 1005
GPU_A = "GPU-5c0d1f3e-8a2b-4c6d-9e1f-2a3b4c5d6e7f"
GPU_B = "GPU-0e9d8c7b-6a5f-4e3d-2c1b-0a9f8e7d6c5b"
GPU_SLICED = "GPU-1a2b3c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d"
GPU_FREE = "GPU-9f8e7d6c-5b4a-4f3e-2d1c-0b9a8f7e6d5c"
MIG = "MIG-3e1a7c5b-9d2f-5a4e-8b6c-1f3d5a7c9e0b"


# -- protobuf wire format, by hand ------------------------------------------------------------

def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _len(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _str(number: int, text: str) -> bytes:
    return _len(number, text.encode())


def devices(resource: str, *ids: str, numa: int | None = None) -> bytes:
    body = _str(1, resource) + b"".join(_str(2, i) for i in ids)
    if numa is not None:  # topology = 3: TopologyInfo{repeated NUMANode nodes = 1{int64 ID = 1}}
        body += _len(3, _len(1, _varint(1 << 3 | 0) + _varint(numa)))
    return body


def container(name: str, *devs: bytes, cpu_ids: tuple[int, ...] = ()) -> bytes:
    body = _str(1, name) + b"".join(_len(2, d) for d in devs)
    if cpu_ids:  # cpu_ids = 3, packed int64
        body += _len(3, b"".join(_varint(c) for c in cpu_ids))
        # memory = 4: ContainerMemory{memory_type = 1, size = 2}
        body += _len(4, _str(1, "memory") + _varint(2 << 3 | 0) + _varint(8 << 30))
    return body


def pod(namespace: str, name: str, *containers: bytes) -> bytes:
    return _str(1, name) + _str(2, namespace) + b"".join(_len(3, c) for c in containers)


def response(*pods: bytes) -> bytes:
    return b"".join(_len(1, p) for p in pods)


NODE = response(
    pod("kube-system", "nvidia-device-plugin-daemonset-x7k2p", container("nvidia-device-plugin")),
    pod("ml", "llama-ft-0",
        container("trainer", devices("nvidia.com/gpu", GPU_A, GPU_B, numa=0), cpu_ids=(2, 3)),
        container("log-shipper")),
    pod("ml", "sft-worker-1", container("worker", devices("nvidia.com/mig-1g.10gb", MIG, numa=1))),
    # Time-slicing: the device plugin hands out replicas "<uuid>::<n>" of one GPU.
    pod("research", "notebook-a", container("lab", devices("nvidia.com/gpu", f"{GPU_SLICED}::0"))),
    pod("research", "notebook-b", container("lab", devices("nvidia.com/gpu", f"{GPU_SLICED}::3"))),
    pod("", "no-namespace", container("c", devices("nvidia.com/gpu", GPU_FREE))),
)


# -- a kubelet stand-in: real gRPC server, real Unix socket -----------------------------------

@dataclass
class Kubelet:
    path: str
    body: list[bytes] = field(default_factory=lambda: [NODE])
    delay_s: list[float] = field(default_factory=lambda: [0.0])
    requests: list[tuple[str, bytes]] = field(default_factory=list)
    server: Any = None

    def stop(self) -> None:
        self.server.stop(0).wait(5)


@pytest.fixture
def kubelet(tmpdir_short: str) -> Iterator[Kubelet]:
    state = Kubelet(f"{tmpdir_short}/kubelet.sock")

    def list_pods(request: bytes, context: grpc.ServicerContext) -> bytes:
        state.requests.append((LIST_METHOD, request))
        time.sleep(state.delay_s[0])
        return state.body[0]

    # No (de)serializers: the handler sees and returns raw bytes, as encoded above.
    handler = grpc.method_handlers_generic_handler(
        "v1.PodResourcesLister", {"List": grpc.unary_unary_rpc_method_handler(list_pods)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"unix://{state.path}")
    server.start()
    state.server = server
    try:
        yield state
    finally:
        state.stop()


# -- the messages -----------------------------------------------------------------------------

def test_proto_file_matches_the_messages_built_in_python() -> None:
    text = PROTO.read_text()
    assert re.search(r"^package v1;$", text, re.M)
    assert "rpc List(ListPodResourcesRequest) returns (ListPodResourcesResponse)" in text
    declared: dict[str, list[tuple[str, int, bool, str]]] = {}
    for name, body in re.findall(r"message (\w+) \{(.*?)\}", text, re.S):
        declared[name] = [(f, int(n), bool(rep), t) for rep, t, f, n in
                          re.findall(r"(repeated )?(\w+) (\w+) = (\d+);", body)]
    built = {}
    for name, cls in message_classes().items():
        proto = descriptor_pb2.DescriptorProto()
        cls.DESCRIPTOR.CopyToProto(proto)
        built[name] = [(f.name, f.number, f.label == f.LABEL_REPEATED,
                        f.type_name.removeprefix(".v1.") or "string") for f in proto.field]
        assert all(f.type in (f.TYPE_STRING, f.TYPE_MESSAGE) for f in proto.field)
    assert declared == built
    assert set(built) == set(MESSAGES)


def test_parses_a_current_kubelets_answer_and_skips_what_it_does_not_use() -> None:
    found = parse_list_response(NODE)
    assert found[GPU_A] == found[GPU_B] == (
        DeviceHolder("ml", "llama-ft-0", "trainer", "nvidia.com/gpu"),)
    assert found[MIG] == (DeviceHolder("ml", "sft-worker-1", "worker", "nvidia.com/mig-1g.10gb"),)
    assert found[GPU_SLICED] == (DeviceHolder("research", "notebook-a", "lab", "nvidia.com/gpu"),
                                 DeviceHolder("research", "notebook-b", "lab", "nvidia.com/gpu"))
    assert GPU_FREE not in found  # its pod has no namespace: malformed, skipped
    assert set(found) == {GPU_A, GPU_B, MIG, GPU_SLICED}
    assert parse_list_response(b"") == {}  # a node without pods


@pytest.mark.parametrize("body", [b"<html>", b"\x0a\x05hello", b"\xff\xff\xff"])
def test_garbage_is_refused_with_a_clear_error(body: bytes) -> None:
    with pytest.raises(PodResourcesError, match="not a ListPodResourcesResponse"):
        parse_list_response(body)


# -- the gRPC call ----------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_list_over_grpc_on_the_unix_socket(kubelet: Kubelet) -> None:
    found = grpc_list(kubelet.path)(2.0)
    assert found == parse_list_response(NODE)
    assert kubelet.requests == [(LIST_METHOD, b"")]  # an empty ListPodResourcesRequest


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("case", "says"), [
    ("garbage", "not a ListPodResourcesResponse"),
    ("slow", "DEADLINE_EXCEEDED"),
    ("oversized", "RESOURCE_EXHAUSTED"),
    ("gone", "UNAVAILABLE"),
])
def test_call_failures_name_the_socket_and_the_cause(kubelet: Kubelet, case: str, says: str) -> None:
    list_pods = grpc_list(kubelet.path, max_bytes=64 << 10)
    if case == "garbage":
        kubelet.body[0] = b"<html><body>404</body></html>"
    elif case == "slow":
        kubelet.delay_s[0] = 1.0
    elif case == "oversized":
        filler = [pod("ns", f"pod-{i:05d}", container("c", devices("x", "y" * 64)))
                  for i in range(1000)]
        kubelet.body[0] = response(*filler)
        assert len(kubelet.body[0]) > 64 << 10
    else:
        kubelet.stop()
    started = time.monotonic()
    with pytest.raises(PodResourcesError, match=says) as err:
        list_pods(0.3)
    assert kubelet.path in str(err.value) and LIST_METHOD in str(err.value)
    assert time.monotonic() - started < 5


# -- the client: cache, refresh, last good list -----------------------------------------------

@pytest.mark.timeout(30)
def test_client_refreshes_on_schedule_and_keeps_the_last_good_list(kubelet: Kubelet) -> None:
    clock = FakeClock()
    client = PodResourcesClient(grpc_list(kubelet.path), clock=clock, timeout_s=0.5)
    assert client.holder(GPU_A, U1) == DeviceHolder("ml", "llama-ft-0", "trainer", "nvidia.com/gpu")
    assert client.holders(GPU_FREE) == ()  # unknown device: no holder, and within
    assert client.requests == 1  # miss_refresh_s no second request
    clock.t += 5
    assert client.holders(GPU_FREE) == () and client.requests == 2  # a miss refreshes
    kubelet.body[0] = b"\x0a\x05hello"
    clock.t += 30
    assert client.holder(GPU_A, U1) is not None  # the answer failed: last good list
    kubelet.stop()
    clock.t += 30
    assert client.holder(MIG, U3) == DeviceHolder("ml", "sft-worker-1", "worker",
                                                  "nvidia.com/mig-1g.10gb")
    assert (client.requests, client.errors) == (4, 2)


def test_client_without_a_kubelet_answers_none_and_counts() -> None:
    client = PodResourcesClient(grpc_list("/nonexistent/pod-resources/kubelet.sock"), timeout_s=0.3)
    assert client.holders(GPU_A) is None
    assert client.holder(GPU_A, U1) is None
    assert (client.requests, client.errors) == (1, 1)  # the second ask was within 5 s


# -- the mapper -------------------------------------------------------------------------------

def _mapper(kubelet: Kubelet | None, clock: FakeClock, proc: Path = PROC,
            pods: KubeletClient | None = None) -> JobMapper:
    path = kubelet.path if kubelet is not None else "/nonexistent/kubelet.sock"
    client = PodResourcesClient(grpc_list(path), clock=clock, timeout_s=0.5)
    return JobMapper(proc, order=("kubernetes",), kubelet=pods, pod_resources=client, clock=clock)


@pytest.mark.timeout(30)
def test_mapper_names_pods_by_the_gpu_their_work_ran_on(kubelet: Kubelet, tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    shutil.copytree(PROC / "1001", proc / "1001")
    shutil.copytree(PROC / "1002", proc / "1002")
    with (proc / "1002" / "environ").open("ab") as f:
        f.write(b"GPUFLOPS_PROGRAM=mistral-sft\0")
    clock = FakeClock()
    mapper = _mapper(kubelet, clock, proc)
    r = mapper.resolve(1001, GPU_A)
    assert (r.job, r.program) == ("k8s/ml/llama-ft-0", "k8s/ml/llama-ft-0")  # no labels here
    assert r.details["pod_uid"] == U1 and r.details["container"] == "trainer"
    assert r.details["pod_source"] == "pod-resources"
    assert mapper.resolve(1001, GPU_B).job == "k8s/ml/llama-ft-0"
    r = mapper.resolve(1002, MIG)  # a MIG device UUID
    assert (r.job, r.program) == ("k8s/ml/sft-worker-1", "mistral-sft")  # program from the env
    assert mapper.resolve(1001, None).job == f"k8s/pod/{U1}"  # no GPU at hand: the UID
    assert mapper.resolve(1001, GPU_FREE).job == f"k8s/pod/{U1}"  # a GPU no pod was given
    stats = mapper.stats()
    assert stats["pod_resources_requests"] == 1 and stats["pod_resources_errors"] == 0


@pytest.mark.timeout(30)
def test_a_time_sliced_gpu_is_not_guessed(kubelet: Kubelet) -> None:
    mapper = _mapper(kubelet, FakeClock())
    r = mapper.resolve(1003, GPU_SLICED)
    assert r.job == f"k8s/pod/{U3}" and "pod" not in r.details
    assert mapper.stats()["pod_resources_shared"] == 1


@pytest.mark.timeout(30)
def test_a_pod_on_another_pods_gpu_unnames_both(kubelet: Kubelet) -> None:
    clock = FakeClock()
    mapper = _mapper(kubelet, clock)
    assert mapper.resolve(1001, GPU_A).job == "k8s/ml/llama-ft-0"
    # Pod U5 was given no GPU but sees them all (NVIDIA_VISIBLE_DEVICES=all) and runs on A.
    assert mapper.resolve(1005, GPU_A).job == f"k8s/pod/{U5}"
    assert mapper.resolve(1001, GPU_A).job == f"k8s/pod/{U1}"
    assert mapper.stats()["pod_resources_conflicts"] == 2
    clock.t += 20
    mapper.resolve(1001, GPU_A)
    clock.t += 20  # U5 has not been seen for 40 s: the pod is U1's again
    assert mapper.resolve(1001, GPU_A).job == "k8s/ml/llama-ft-0"


@pytest.mark.timeout(30)
def test_kubelet_pods_wins_and_pod_resources_covers_its_failures(kubelet: Kubelet) -> None:
    answer = [b'{"items": [{"metadata": {"uid": "%s", "namespace": "ml", "name": "llama-ft-0", '
              b'"labels": {"gpuflops.io/program": "llama3-8b-ft"}}}]}' % U1.encode()]

    def fetch(url: str, headers: Mapping[str, str], timeout_s: float) -> bytes:
        if not answer[0]:
            raise ConnectionRefusedError("kubelet down")
        return answer[0]

    clock = FakeClock()
    pods = KubeletClient("http://127.0.0.1:10255/pods", token_path=None, fetch=fetch, clock=clock)
    mapper = _mapper(kubelet, clock, pods=pods)
    r = mapper.resolve(1001, GPU_A)
    assert (r.job, r.program) == ("k8s/ml/llama-ft-0", "llama3-8b-ft")
    assert "pod_source" not in r.details and not kubelet.requests  # /pods answered
    answer[0] = b""
    pods = KubeletClient("http://127.0.0.1:10255/pods", token_path=None, fetch=fetch, clock=clock)
    mapper = _mapper(kubelet, clock, pods=pods)
    r = mapper.resolve(1001, GPU_A)
    assert r.job == "k8s/ml/llama-ft-0" and r.details["pod_source"] == "pod-resources"
    assert mapper.stats()["kubelet_errors"] == 1


def test_an_unreachable_socket_costs_the_names_only() -> None:
    mapper = _mapper(None, FakeClock())
    assert mapper.resolve(1001, GPU_A).job == f"k8s/pod/{U1}"
    assert mapper.resolve(1003, GPU_A).job == f"k8s/pod/{U3}"
    assert mapper.stats()["pod_resources_errors"] == 1


@pytest.mark.timeout(30)
def test_the_labeler_asks_with_the_unit_each_share_ran_on(kubelet: Kubelet) -> None:
    mapper = _mapper(kubelet, FakeClock())

    def job_of(pid: int, uuid: str) -> tuple[str, str]:
        ref = mapper.resolve(pid, uuid)
        return ref.job, ref.program

    labeler = Labeler(job_of)
    assert labeler.job(1001, GPU_A)[0] == "k8s/ml/llama-ft-0"
    assert labeler.job(1001, GPU_SLICED)[0] == f"k8s/pod/{U1}"


# -- wiring -----------------------------------------------------------------------------------

def test_setting_comes_from_the_environment() -> None:
    path = "/var/lib/kubelet/pod-resources/kubelet.sock"
    assert env_settings({"GPUFLOPS_POD_RESOURCES_SOCKET": path}) == {"pod_resources_socket": path}
    assert env_settings({"GPUFLOPS_POD_RESOURCES_SOCKET": ""}) == {"pod_resources_socket": None}
    assert Settings().pod_resources_socket is None  # off unless asked for


def test_daemon_without_the_extra_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from gpuflops.app.assemble import _labeler

    monkeypatch.setitem(sys.modules, "grpc", None)  # import grpc -> ImportError
    monkeypatch.delitem(sys.modules, "gpuflops.identity.podresources")
    settings = Settings(pod_resources_socket="/var/lib/kubelet/pod-resources/kubelet.sock")
    with pytest.raises(RuntimeError, match=r"gpuflops\[kubernetes\]"):
        _labeler(settings, JobRegistry(), time.monotonic)
    assert _labeler(Settings(), JobRegistry(), time.monotonic) is not None


@pytest.mark.timeout(30)
def test_daemon_wires_the_socket_into_attribution(kubelet: Kubelet,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from gpuflops.app import assemble

    built: list[JobMapper] = []

    def mapper(**kw: Any) -> JobMapper:
        built.append(JobMapper(PROC, **{**kw, "order": ("kubernetes",)}))
        return built[-1]

    monkeypatch.setattr(assemble, "JobMapper", mapper)
    labeler = assemble._labeler(Settings(pod_resources_socket=kubelet.path), JobRegistry(),
                                time.monotonic)
    assert labeler.job(1001, GPU_A) == ("k8s/ml/llama-ft-0", "k8s/ml/llama-ft-0")
    assert labeler.job(1001, GPU_SLICED)[0] == f"k8s/pod/{U1}"  # the unit is part of the key
    assert built[0].stats()["pod_resources_requests"] == 1
    assert kubelet.requests == [(LIST_METHOD, b"")]
