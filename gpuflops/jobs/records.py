"""What crosses the job registry's boundary: client identity, process ancestry, events for the
ledger, immutable snapshots for the exporter, and capacity limits."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import psutil

from gpuflops.identity.cgroup import parse_status


@dataclass(frozen=True)
class Peer:
    """The kernel-reported identity of a connected client (SO_PEERCRED)."""

    pid: int
    uid: int
    gid: int


@dataclass(frozen=True)
class AttachedJob:
    """The open job a process (or one of its ancestors) is attached to through the socket."""

    job_id: str
    program_id: str


class ProcessLookup(Protocol):
    """Reads process ancestry; ``None`` when the process is gone or unreadable."""

    def parent_pid(self, pid: int) -> int | None: ...

    def start_time(self, pid: int) -> float | None: ...

    def groups(self, pid: int) -> frozenset[int]:
        """Every group the process is in (primary and supplementary); empty when unknown."""
        ...


class PsutilProcessLookup:
    """ProcessLookup backed by psutil (reads /proc on Linux)."""

    def __init__(self, proc_root: str = "/proc") -> None:
        self._proc = proc_root

    def groups(self, pid: int) -> frozenset[int]:
        try:
            with open(f"{self._proc}/{pid}/status", encoding="ascii", errors="replace") as f:
                return parse_status(f.read())[1]
        except OSError:
            return frozenset()

    def parent_pid(self, pid: int) -> int | None:
        try:
            return psutil.Process(pid).ppid()
        except (psutil.Error, ValueError):
            return None

    def start_time(self, pid: int) -> float | None:
        try:
            return psutil.Process(pid).create_time()
        except (psutil.Error, ValueError):
            return None


@dataclass(frozen=True)
class RegistryEvent:
    """A change to the registry, for the ledger: what happened, to which job, sent by whom."""

    kind: str  # "register", "attach", "add", "claim", "end"
    job_id: str
    program_id: str
    time_s: float  # wall clock when the daemon applied it
    peer: Peer
    data: Mapping[str, Any]


@dataclass(frozen=True)
class JobSnapshot:
    """Immutable copy of one job's record."""

    job_id: str
    program_id: str
    owner_uid: int
    state: str  # "open" or "ended"
    started_s: float
    ended_s: float | None
    pids: frozenset[int]
    metadata: Mapping[str, Any]  # per-job fields plus "ranks": {rank: {rank, local_rank, node}}
    analytic_flops: float
    analytic_tokens: float
    recompute_flops: float
    adds: int  # client-side add() calls received
    exit_code: int | None
    end_status: str | None

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON form, as sent in a query reply."""
        meta = dict(self.metadata)
        if "ranks" in meta:
            meta["ranks"] = {str(k): dict(v) for k, v in meta["ranks"].items()}
        if "extra" in meta:
            meta["extra"] = dict(meta["extra"])
        return {
            "job": self.job_id,
            "program": self.program_id,
            "owner_uid": self.owner_uid,
            "state": self.state,
            "started_s": self.started_s,
            "ended_s": self.ended_s,
            "pids": sorted(self.pids),
            "metadata": meta,
            "analytic_flops": self.analytic_flops,
            "analytic_tokens": self.analytic_tokens,
            "recompute_flops": self.recompute_flops,
            "adds": self.adds,
            "exit_code": self.exit_code,
            "end_status": self.end_status,
        }


@dataclass(frozen=True)
class RegistrySnapshot:
    """Immutable copy of the whole registry, for the exporter."""

    time_s: float
    jobs: tuple[JobSnapshot, ...]

    def job(self, job_id: str) -> JobSnapshot | None:
        """The snapshot of ``job_id``, or None."""
        for job in self.jobs:
            if job.job_id == job_id:
                return job
        return None


@dataclass(frozen=True)
class RegistryLimits:
    """Capacity bounds, so a misbehaving client cannot exhaust the daemon's memory."""

    max_open_jobs: int = 10_000
    max_open_jobs_per_uid: int = 256  # one user cannot fill the node's job table
    max_ended_jobs: int = 1_000  # ended jobs kept for queries/snapshots; the ledger keeps all
    max_pids_per_job: int = 4_096
    max_clients_per_job: int = 4_096
    max_participants_per_job: int = 65_536
    # An open job with no live process and no message for this long leaves memory; the ledger
    # keeps it (owner, totals, reporters' sequence numbers) and its owner's next message
    # brings it back. Only with a ledger.
    idle_job_s: float = 600.0


@dataclass(frozen=True)
class AnalyticBound:
    """The most analytic FLOPs a job on this node can report: every GPU at its physical peak
    since the job registered, times ``slack`` (docs/protocol.md, "Bounds")."""

    peak_flops_per_s: float  # the node's GPUs together, at their fastest precision and clock
    slack: float = 4.0
    min_elapsed_s: float = 10.0  # a report right after registering may cover work before it

    def limit(self, elapsed_s: float) -> float:
        return self.peak_flops_per_s * max(elapsed_s, self.min_elapsed_s) * self.slack


@dataclass(frozen=True)
class ProgramAccess:
    """The node's program policy for one program (the programs file's ``access`` table).

    ``owners`` define the program (its base-model facts) and register jobs into it; ``users``
    and members of ``groups`` register jobs into it. With no owners listed the program's first
    registrant owns it, unless ``first_registrant_owns`` is false (then only root may).
    ``job_group``: members of this group may write to every job of the program (the job's
    owner group), besides the uid that registered it.
    """

    owners: frozenset[int] = frozenset()
    users: frozenset[int] = frozenset()
    groups: frozenset[int] = frozenset()
    job_group: int | None = None
    first_registrant_owns: bool = True


@dataclass(frozen=True)
class KnownJob:
    """A job registered in an earlier session, as the ledger recorded it."""

    job_id: str
    program_id: str
    owner_uid: int
    owner_gid: int | None
    registered_s: float
    ended_s: float | None
    analytic_flops: float = 0.0
    analytic_tokens: float = 0.0
    recompute_flops: float = 0.0
    clients: Mapping[str, int] = field(default_factory=dict)  # reporter -> highest seq applied
    participants: Mapping[str, bool] = field(default_factory=dict)  # "rank:N"/"pid:N" -> ended
    metadata: Mapping[str, Any] = field(default_factory=dict)  # first value of each job field


@dataclass(frozen=True)
class ProgramOwner:
    """A program's first registrant and the facts (base model) its definers registered."""

    uid: int
    facts: Mapping[str, Any]


class Durability(Protocol):
    """The ledger's side of an acknowledgement (ledger/sink.py): a reply to a change is sent
    only once the change is committed."""

    def ticket(self) -> int:
        """The ticket of the newest change handed to the ledger."""
        ...

    def durable(self) -> int:
        """Every change with a ticket up to this one is committed."""
        ...

    def writable(self) -> bool:
        """False while the ledger cannot write: changes are refused, not acknowledged."""
        ...


class JobHistory(Protocol):
    """What earlier sessions recorded (the ledger): the registry's memory across restarts."""

    def known_job(self, job_id: str) -> KnownJob | None: ...

    def program_owner(self, program_id: str) -> ProgramOwner | None: ...


@dataclass(frozen=True)
class RegisterResult:
    """Outcome of a register: whether the job was new, and metadata fields that disagreed."""

    created: bool
    conflicts: tuple[str, ...]
