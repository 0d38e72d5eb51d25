"""JobRegistry: ownership, multi-rank merging, ending, events, pid -> job lookup and its cache."""

from __future__ import annotations

import pytest

from gpuflops.jobs.protocol import ErrorCode, Increment, ProtocolError
from gpuflops.jobs.records import AttachedJob, Peer, RegistryEvent
from gpuflops.jobs.registry import JobRegistry
from tests.support import FakeClock


class ProcTree:
    """A process table as a dict, in the spirit of a fake /proc tree (ProcessLookup)."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {1: 0}
        self.start: dict[int, float] = {1: 1.0}
        self.calls = 0

    def spawn(self, pid: int, ppid: int, start: float = 100.0) -> None:
        self.parent[pid], self.start[pid] = ppid, start

    def exit(self, pid: int) -> None:
        self.parent.pop(pid, None)
        self.start.pop(pid, None)

    def parent_pid(self, pid: int) -> int | None:
        self.calls += 1
        return self.parent.get(pid)

    def start_time(self, pid: int) -> float | None:
        self.calls += 1
        return self.start.get(pid)

    def groups(self, pid: int) -> frozenset[int]:
        return frozenset()


@pytest.fixture
def tree() -> ProcTree:
    t = ProcTree()
    t.spawn(10, 1)  # launcher
    t.spawn(11, 10)  # torchrun
    t.spawn(12, 11)  # rank 0
    t.spawn(13, 11)  # rank 1
    t.spawn(20, 1)  # unrelated
    return t


@pytest.fixture
def reg(tree: ProcTree, clock: FakeClock) -> JobRegistry:
    return JobRegistry(process_lookup=tree, clock=clock, monotonic=clock, cache_ttl_s=2.0)


ROOT_LAUNCHER = Peer(pid=10, uid=1000, gid=1000)


def test_children_of_attached_process_belong_to_the_job(reg: JobRegistry) -> None:
    reg.register("j1", "p1", {}, ROOT_LAUNCHER)
    assert reg.job_for_pid(12) == AttachedJob("j1", "p1")
    assert reg.job_for_pid(10) == AttachedJob("j1", "p1")
    assert reg.job_for_pid(20) is None
    assert reg.job_for_pid(99999) is None


def test_lookup_is_cached_and_invalidated_by_attach(
    reg: JobRegistry, tree: ProcTree, clock: FakeClock
) -> None:
    assert reg.job_for_pid(13) is None
    calls = tree.calls
    for _ in range(100):
        assert reg.job_for_pid(13) is None
    assert tree.calls == calls  # served from the cache
    reg.register("j1", "p1", {}, ROOT_LAUNCHER)  # attachment change invalidates
    assert reg.job_for_pid(13) == AttachedJob("j1", "p1")
    calls = tree.calls
    clock.t += 1.0
    assert reg.job_for_pid(13) == AttachedJob("j1", "p1")
    assert tree.calls == calls
    clock.t += 5.0  # past the TTL: re-verified
    assert reg.job_for_pid(13) == AttachedJob("j1", "p1")
    assert tree.calls > calls


def test_reparented_child_keeps_its_job_and_reused_pid_does_not(
    reg: JobRegistry, tree: ProcTree, clock: FakeClock
) -> None:
    reg.register("j1", "p1", {}, ROOT_LAUNCHER)
    assert reg.job_for_pid(12) == AttachedJob("j1", "p1")
    tree.exit(10)
    tree.exit(11)
    tree.spawn(12, 1)  # re-parented to init, same process (same start time)
    assert reg.prune() == 1
    clock.t += 5
    assert reg.job_for_pid(12) == AttachedJob("j1", "p1")
    tree.spawn(10, 1, start=555.0)  # pid 10 reused by an unrelated process
    tree.spawn(30, 10, start=556.0)
    assert reg.job_for_pid(30) is None
    assert reg.job_for_pid(10) is None


def test_ended_job_releases_its_processes(reg: JobRegistry) -> None:
    reg.register("j1", "p1", {}, ROOT_LAUNCHER)
    assert reg.job_for_pid(12) is not None
    assert reg.end("j1", ROOT_LAUNCHER, final=True, exit_code=0, status="completed")
    assert reg.job_for_pid(12) is None
    with pytest.raises(ProtocolError) as info:
        reg.add("j1", [Increment(1.0, 1.0)], ROOT_LAUNCHER)
    assert info.value.code == ErrorCode.JOB_ENDED
    snap = reg.snapshot().job("j1")
    assert snap is not None and snap.state == "ended" and snap.exit_code == 0


def test_multi_rank_sum_and_end_when_all_ranks_end(reg: JobRegistry) -> None:
    r0, r1 = Peer(12, 1000, 1000), Peer(13, 1000, 1000)
    reg.register("j", "p", {"rank": 0, "world_size": 2, "model": "m", "node": "a"}, r0)
    result = reg.register("j", "p", {"rank": 1, "world_size": 2, "model": "other"}, r1)
    assert not result.created and result.conflicts == ("model",)
    reg.add("j", [Increment(1e12, 10.0, 2e11)], r0)
    reg.add("j", [Increment(3e12, 30.0), Increment(1.0, 0.0, 0.0, 4)], r1)
    snap = reg.snapshot().job("j")
    assert snap is not None
    assert snap.analytic_flops == 4e12 + 1.0 and snap.analytic_tokens == 40.0
    assert snap.recompute_flops == 2e11 and snap.adds == 6
    assert snap.metadata["model"] == "m"
    assert set(snap.metadata["ranks"]) == {0, 1}
    assert snap.pids == frozenset({12, 13})
    assert not reg.end("j", r0, rank=0)
    assert reg.end("j", r1, rank=1, exit_code=3)
    snap = reg.snapshot().job("j")
    assert snap is not None and snap.state == "ended" and snap.exit_code == 3


def test_launcher_keeps_job_open_until_final(reg: JobRegistry) -> None:
    reg.register("j", "p", {}, ROOT_LAUNCHER)
    rank0 = Peer(12, 1000, 1000)
    reg.register("j", "p", {"rank": 0, "world_size": 1}, rank0)
    assert not reg.end("j", rank0, rank=0)
    assert reg.snapshot().jobs[0].state == "open"
    assert reg.end("j", ROOT_LAUNCHER, final=True, exit_code=0)


def test_uid_ownership_and_program_conflict(reg: JobRegistry) -> None:
    reg.register("j", "p", {}, ROOT_LAUNCHER)
    other = Peer(20, 2000, 2000)
    for call in (
        lambda: reg.add("j", [Increment(1.0, 1.0)], other),
        lambda: reg.register("j", "p", {}, other),
        lambda: reg.end("j", other, final=True),
        lambda: reg.query("j", other),
    ):
        with pytest.raises(ProtocolError) as info:
            call()
        assert info.value.code == ErrorCode.FORBIDDEN
    reg.add("j", [Increment(5.0, 1.0)], Peer(20, 0, 0))  # root may
    with pytest.raises(ProtocolError) as info:
        reg.register("j", "other-program", {}, ROOT_LAUNCHER)
    assert info.value.code == ErrorCode.CONFLICT
    with pytest.raises(ProtocolError) as info:
        reg.add("nope", [Increment(1.0, 1.0)], ROOT_LAUNCHER)
    assert info.value.code == ErrorCode.UNKNOWN_JOB
    snap = reg.snapshot().job("j")
    assert snap is not None and snap.analytic_flops == 5.0


def test_duplicate_seq_is_not_counted_twice(reg: JobRegistry) -> None:
    reg.register("j", "p", {}, ROOT_LAUNCHER)
    assert reg.add("j", [Increment(1.0, 1.0)], ROOT_LAUNCHER, client="c", seq=1)
    assert not reg.add("j", [Increment(1.0, 1.0)], ROOT_LAUNCHER, client="c", seq=1)
    assert reg.add("j", [Increment(1.0, 1.0)], ROOT_LAUNCHER, client="d", seq=1)
    assert reg.snapshot().jobs[0].analytic_flops == 2.0


def test_events_carry_data_and_peer(reg: JobRegistry) -> None:
    events: list[RegistryEvent] = []
    reg.on_event(events.append)
    reg.on_event(lambda e: 1 / 0)  # a broken listener must not break the registry
    reg.register("j", "p", {"model": "m"}, ROOT_LAUNCHER)
    reg.add("j", [Increment(2.0, 3.0, 1.0)], ROOT_LAUNCHER)
    reg.end("j", ROOT_LAUNCHER, final=True, exit_code=0)
    assert [e.kind for e in events] == ["register", "add", "end"]
    assert events[0].data["metadata"] == {"model": "m"}
    assert events[1].data["flops"] == 2.0 and events[1].data["recompute_flops"] == 1.0
    assert events[2].data["job_ended"] is True
    assert all(e.peer == ROOT_LAUNCHER for e in events)
    assert reg.listener_errors == 3


def test_snapshot_is_immutable(reg: JobRegistry) -> None:
    reg.register("j", "p", {"model": "m", "extra": {"a": 1}}, ROOT_LAUNCHER)
    snap = reg.snapshot().jobs[0]
    with pytest.raises(TypeError):
        snap.metadata["model"] = "x"  # type: ignore[index]
    reg.add("j", [Increment(1.0, 1.0)], ROOT_LAUNCHER)
    assert snap.analytic_flops == 0.0
