"""What the ledger holds and returns: record kinds, errors, and the typed results of reads."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

LEDGER_FILENAME = "ledger.sqlite3"

JobEventKind = Literal["register", "estimate", "claim", "end", "refused"]
# ``refused``: an analytic report the daemon refused (over the physical bound, or from a uid
# that may not write to the job), kept as evidence; it changes no total.
JOB_EVENT_KINDS: frozenset[str] = frozenset({"register", "estimate", "claim", "end", "refused"})
Synchronous = Literal["FULL", "NORMAL"]
SESSION_EVENTS: frozenset[str] = frozenset({"start", "stop", "alive"})
NODE = "*"  # the ``gpu`` of a gap that covers every GPU of the node (the daemon was not running)


class LedgerError(Exception):
    """Base class for ledger failures; carries the ledger path."""

    def __init__(self, path: Path, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


class LedgerCorruptError(LedgerError):
    """The file is not a readable ledger (not SQLite, damaged, or its chain head is broken)."""


class LedgerVersionError(LedgerError):
    """The file was written by a newer schema version than this code knows."""


class LedgerWriteError(LedgerError):
    """An append failed; nothing of it was committed."""



@dataclass(frozen=True)
class GpuKey:
    gpu: str
    uuid: str
    pipe: str
    precision: str


@dataclass(frozen=True)
class JobKey:
    job: str
    program: str


@dataclass(frozen=True)
class JobTotals:
    """Persisted per-job sums, the columns of ``job_totals`` after (job, program) in order;
    ``recompute_flops`` is the analytic recomputation term.

    ``hmma_flops`` and ``half_rate_fraction`` (ledger schema v4) come last in a row, so the
    first ten columns keep their places.
    """

    measured_flops: float = 0.0
    analytic_flops: float = 0.0
    tokens: float = 0.0
    recompute_flops: float = 0.0
    # Span covered by analytic estimates (None before the first estimate).
    estimate_t0_s: float | None = None
    estimate_t1_s: float | None = None
    first_t_s: float | None = None
    last_t_s: float | None = None
    hmma_flops: float = 0.0  # the tensor-core (HMMA) part of measured_flops
    half_rate_fraction: float | None = None  # the job's latest kernel-census claim

    def row(self, job: str, program: str) -> list[Any]:
        """The job_totals row that rollups ship and the central store keeps."""
        return [job, program, self.measured_flops, self.analytic_flops, self.tokens,
                self.recompute_flops, self.estimate_t0_s, self.estimate_t1_s, self.first_t_s,
                self.last_t_s, self.hmma_flops, self.half_rate_fraction]

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> tuple[tuple[str, str], JobTotals]:
        """A ``row()`` (or a central job_totals row) back as (key, totals)."""
        return (str(row[0]), str(row[1])), cls(*row_values(row))


def _opt(v: Any) -> float | None:
    return None if v is None else float(v)


def row_values(row: Sequence[Any]) -> list[Any]:
    """The ten figures of a ``JobTotals.row()`` after (job, program), typed; a row shipped
    without the v4 columns reads as no HMMA FLOPs and no claim."""
    return [float(row[2]), float(row[3]), float(row[4]), float(row[5]),
            *(_opt(v) for v in row[6:10]),
            float(row[10]) if len(row) > 10 else 0.0,
            _opt(row[11]) if len(row) > 11 else None]


@dataclass(frozen=True)
class LedgerTotals:
    """Everything the daemon needs to restore its counters at start."""

    gpu: Mapping[GpuKey, float]
    jobs: Mapping[JobKey, JobTotals]
    records: int
    head_seq: int
    head_hash: str

    def program_measured(self, program: str) -> float:
        return sum(t.measured_flops for k, t in self.jobs.items() if k.program == program)


@dataclass(frozen=True)
class JobEventRecord:
    """One job event as stored in the chain."""

    seq: int
    kind: str
    job: str
    program: str
    t_s: float
    payload: Mapping[str, Any]


@dataclass(frozen=True)
class Gap:
    """Time one GPU (``gpu == NODE``: every GPU) was not measured, and why."""

    seq: int
    gpu: str
    uuid: str
    t0_s: float
    t1_s: float
    reason: str

    @property
    def duration_s(self) -> float:
        return self.t1_s - self.t0_s


@dataclass(frozen=True)
class LastActivity:
    """The newest record's time, and whether it was the daemon's clean stop."""

    t_s: float
    kind: str
    clean_stop: bool


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of a full chain check; ``first_bad_id`` is the first failing sequence number."""

    ok: bool
    records: int
    first_bad_id: int | None
    reason: str | None
    head_hash: str
    head_seq: int = 0
    warnings: tuple[str, ...] = field(default_factory=tuple)
    # The chain is sound and only the derived tables disagree with it: they can be rebuilt.
    derived_only: bool = False
