"""The label stage: which job and program a process's FLOPs count towards, and which HMMA
precision the jobs on a unit declared.

Both answers come in through the constructor as callables; the composition root puts the job
registry and the process -> job sources (gpuflops/identity/) behind them, wrapped in
:class:`Memo` because they read /proc or copy the job registry for every process of every
interval.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from gpuflops.model import UNATTRIBUTED, AttributedInterval, FlopsRow, GpuSample
from gpuflops.rates import HMMA_PRECISIONS

# (pid, UUID of the GPU or MIG device the work ran on) -> (job, program)
JobOf = Callable[[int, str], tuple[str, str]]
DeclaredPrecision = Callable[[str, str], str | None]  # (job, program) -> declared HMMA precision

K = TypeVar("K")
V = TypeVar("V")


class Memo(Generic[K, V]):
    """Answers kept for one second: lookups that read /proc or copy the job registry run for
    every process of every interval."""

    def __init__(self, resolve: Callable[[K], V], clock: Callable[[], float], ttl_s: float = 1.0) -> None:
        self._resolve = resolve
        self._clock = clock
        self._ttl = ttl_s
        self._cache: dict[K, tuple[float, V]] = {}

    def __call__(self, key: K) -> V:
        now = self._clock()
        hit = self._cache.get(key)
        if hit is not None and now - hit[0] < self._ttl:
            return hit[1]
        value = self._resolve(key)
        if len(self._cache) > 4096:
            self._cache.clear()
        self._cache[key] = (now, value)
        return value


class Labeler:
    """Labels attributed FLOPs with jobs; without ``job_of`` every process is unattributed, and
    without ``declared_precision`` the configured HMMA precision always stands."""

    def __init__(
        self, job_of: JobOf | None = None, declared_precision: DeclaredPrecision | None = None
    ) -> None:
        self._job_of = job_of
        self._declared = declared_precision

    def job(self, pid: int | None, uuid: str) -> tuple[str, str]:
        """(job, program) of a process working on unit ``uuid``; unattributed work (pid None)
        is its own pseudo-job."""
        if pid is None or self._job_of is None:
            return UNATTRIBUTED, UNATTRIBUTED
        return self._job_of(pid, uuid)

    def hmma_precision(self, sample: GpuSample, uuid: str) -> str | None:
        """The HMMA precision every job on this unit (``uuid``) declared, if they agree."""
        if self._declared is None or not sample.processes or not sample.activity:
            return None
        found = set()
        for p in sample.processes:
            job, program = self.job(p.pid, uuid)
            found.add(self._declared(job, program) if job != UNATTRIBUTED else None)
        if len(found) == 1:
            (only,) = found
            return only if only in HMMA_PRECISIONS else None
        return None

    def rows(self, item: AttributedInterval, uuid: str) -> list[FlopsRow]:
        """One ledger row per share of a settled interval, labelled with its job."""
        rows = []
        for share in item.shares:
            job, program = self.job(share.pid, uuid)
            rows.append(
                FlopsRow(item.key, uuid, share.pipe.value, share.precision, job, program,
                         share.pid, share.flops, share.comm)
            )
        return rows
