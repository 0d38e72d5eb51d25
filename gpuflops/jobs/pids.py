"""Which process belongs to which job: attached pids, their descendants, and a cache.

The registry owns the jobs and the lock; this index keeps the pid -> job map consistent with
them under that lock, and answers ``job_for_pid`` for the attribution stage every interval.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from gpuflops.jobs.live import LiveJob
from gpuflops.jobs.protocol import ErrorCode, ProtocolError
from gpuflops.jobs.records import AttachedJob, ProcessLookup

MAX_TREE_DEPTH = 128  # a process tree deeper than this is not a training job


@dataclass
class _CacheEntry:
    ref: AttachedJob | None
    start_time: float | None
    checked_s: float
    generation: int


class PidIndex:
    """pid -> open job, sharing the registry's lock and jobs."""

    def __init__(self, lock: threading.Lock, jobs: dict[str, LiveJob], lookup: ProcessLookup,
                 monotonic: Callable[[], float], cache_ttl_s: float) -> None:
        self._lock = lock
        self._jobs = jobs
        self._lookup = lookup
        self._monotonic = monotonic
        self._cache_ttl_s = cache_ttl_s
        self._pid_index: dict[int, str] = {}  # attached pid -> open job id
        self._generation = 0  # bumped when attachments change; invalidates the pid cache
        self._cache: dict[int, _CacheEntry] = {}

    def in_tree(self, pid: int, root: int) -> bool:
        """True when ``pid`` is ``root`` or one of its descendants."""
        current: int | None = pid
        for _ in range(MAX_TREE_DEPTH):
            if current is None or current <= 0:
                return False
            if current == root:
                return True
            current = self._lookup.parent_pid(current)
        return False

    def attach_locked(self, job: LiveJob, pid: int, start_time: float | None,
                      max_pids: int) -> bool:
        """Attach ``pid`` to ``job`` (the registry's lock held); False if it already was."""
        if pid in job.pids and job.pids[pid] == start_time:
            return False
        if len(job.pids) >= max_pids:
            raise ProtocolError(ErrorCode.LIMIT, f"job has {len(job.pids)} pids attached")
        previous = self._pid_index.get(pid)
        if previous is not None and previous != job.job_id:
            # A live process belongs to one job: the newest attachment wins.
            self._jobs[previous].pids.pop(pid, None)
        job.pids[pid] = start_time
        self._pid_index[pid] = job.job_id
        self._generation += 1
        return True

    def release_locked(self, job: LiveJob) -> None:
        """Detach every process of an ended job (the registry's lock held)."""
        for pid in job.pids:
            if self._pid_index.get(pid) == job.job_id:
                del self._pid_index[pid]
        self._generation += 1

    def job_for_pid(self, pid: int) -> AttachedJob | None:
        """The open job ``pid`` or one of its ancestors is attached to, or None.

        Cached per pid for ``cache_ttl_s`` and until attachments change. Once found in a job's
        tree a process stays with that job until it exits or the job ends, so a child whose
        attached parent died (re-parented to init) keeps its attribution.
        """
        now = self._monotonic()
        with self._lock:
            generation = self._generation
            entry = self._cache.get(pid)
        if (
            entry is not None
            and entry.generation == generation
            and now - entry.checked_s < self._cache_ttl_s
        ):
            return entry.ref
        start_time = self._lookup.start_time(pid)
        if start_time is None:
            with self._lock:
                self._cache.pop(pid, None)
            return None
        ref = self._resolve(pid)
        with self._lock:
            if (
                ref is None
                and entry is not None
                and entry.ref is not None
                and entry.start_time == start_time
            ):
                job = self._jobs.get(entry.ref.job_id)
                if job is not None and job.state == "open":
                    ref = entry.ref  # sticky: same process, job still open
            if len(self._cache) >= 65_536:
                self._cache.clear()
            if self._generation == generation:
                self._cache[pid] = _CacheEntry(ref, start_time, now, generation)
        return ref

    def _resolve(self, pid: int) -> AttachedJob | None:
        current: int | None = pid
        for _ in range(MAX_TREE_DEPTH):
            if current is None or current <= 0:
                return None
            with self._lock:
                job_id = self._pid_index.get(current)
                job = self._jobs.get(job_id) if job_id is not None else None
                recorded = job.pids.get(current) if job is not None else None
            if job is not None:
                if recorded is None or recorded == self._lookup.start_time(current):
                    return AttachedJob(job.job_id, job.program_id)
                self._forget_pid(current, job.job_id)  # pid reused by another process
            current = self._lookup.parent_pid(current)
        return None

    def _forget_pid(self, pid: int, job_id: str) -> None:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is not None:
                job.pids.pop(pid, None)
            if self._pid_index.get(pid) == job_id:
                del self._pid_index[pid]
                self._generation += 1

    def prune(self) -> int:
        """Forget attached pids whose process has exited; returns how many were dropped."""
        with self._lock:
            attached = [(pid, job_id) for pid, job_id in self._pid_index.items()]
        dropped = 0
        for pid, job_id in attached:
            with self._lock:
                job = self._jobs.get(job_id)
                recorded = job.pids.get(pid) if job is not None else None
            now_start = self._lookup.start_time(pid)
            if now_start is None or (recorded is not None and recorded != now_start):
                self._forget_pid(pid, job_id)
                dropped += 1
        with self._lock:
            cached = list(self._cache)
        gone = [pid for pid in cached if self._lookup.start_time(pid) is None]
        with self._lock:
            for pid in gone:
                self._cache.pop(pid, None)
        return dropped
