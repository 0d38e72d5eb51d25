"""What crosses the job registry's boundary: client identity, process ancestry, events for the
ledger, immutable snapshots for the exporter, and capacity limits."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import psutil


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


class PsutilProcessLookup:
    """ProcessLookup backed by psutil (reads /proc on Linux)."""

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
    max_ended_jobs: int = 1_000  # ended jobs kept for queries/snapshots; the ledger keeps all
    max_pids_per_job: int = 4_096
    max_clients_per_job: int = 4_096
    max_participants_per_job: int = 65_536


@dataclass(frozen=True)
class RegisterResult:
    """Outcome of a register: whether the job was new, and metadata fields that disagreed."""

    created: bool
    conflicts: tuple[str, ...]
