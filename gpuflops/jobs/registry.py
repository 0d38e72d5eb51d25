"""Thread-safe registry of jobs reported over the job socket, and the pid -> job lookup.

The server thread mutates it; the attribution stage calls ``job_for_pid`` every sampling interval
per GPU process; the exporter reads ``snapshot()``; the ledger listens through ``on_event``.
Identity (pid, uid) always comes from the kernel (SO_PEERCRED) via ``Peer``, never from a message.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from gpuflops.jobs.protocol import PER_RANK_FIELDS, ErrorCode, Increment, ProtocolError
from gpuflops.jobs.records import (
    AttachedJob,
    JobSnapshot,
    Peer,
    ProcessLookup,
    PsutilProcessLookup,
    RegisterResult,
    RegistryEvent,
    RegistryLimits,
    RegistrySnapshot,
)

log = logging.getLogger(__name__)

MAX_TREE_DEPTH = 128  # a process tree deeper than this is not a training job

@dataclass
class _Job:
    job_id: str
    program_id: str
    owner_uid: int
    started_s: float
    metadata: dict[str, Any] = field(default_factory=dict)
    ranks: dict[int, dict[str, Any]] = field(default_factory=dict)
    participants: dict[str, bool] = field(default_factory=dict)  # key -> ended
    pids: dict[int, float | None] = field(default_factory=dict)  # pid -> start time
    last_seq: dict[str, int] = field(default_factory=dict)  # client -> highest applied seq
    analytic_flops: float = 0.0
    analytic_tokens: float = 0.0
    recompute_flops: float = 0.0
    adds: int = 0
    state: str = "open"
    ended_s: float | None = None
    exit_code: int | None = None
    end_status: str | None = None

    def snapshot(self) -> JobSnapshot:
        meta: dict[str, Any] = dict(self.metadata)
        if "extra" in meta:
            meta["extra"] = MappingProxyType(dict(meta["extra"]))
        if self.ranks:
            meta["ranks"] = MappingProxyType(
                {r: MappingProxyType(dict(v)) for r, v in self.ranks.items()}
            )
        return JobSnapshot(
            job_id=self.job_id,
            program_id=self.program_id,
            owner_uid=self.owner_uid,
            state=self.state,
            started_s=self.started_s,
            ended_s=self.ended_s,
            pids=frozenset(self.pids),
            metadata=MappingProxyType(meta),
            analytic_flops=self.analytic_flops,
            analytic_tokens=self.analytic_tokens,
            recompute_flops=self.recompute_flops,
            adds=self.adds,
            exit_code=self.exit_code,
            end_status=self.end_status,
        )


@dataclass
class _CacheEntry:
    ref: AttachedJob | None
    start_time: float | None
    checked_s: float
    generation: int

class JobRegistry:
    """Jobs, their attached processes and their analytic figures."""

    def __init__(
        self,
        *,
        process_lookup: ProcessLookup | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        limits: RegistryLimits | None = None,
        cache_ttl_s: float = 2.0,
    ) -> None:
        self._lookup: ProcessLookup = process_lookup or PsutilProcessLookup()
        self._clock = clock
        self._monotonic = monotonic
        self._limits = limits or RegistryLimits()
        self._cache_ttl_s = cache_ttl_s
        self._lock = threading.Lock()  # guards state; never held while calling out
        self._emit_lock = threading.Lock()  # orders mutation + listener calls
        self._jobs: dict[str, _Job] = {}
        self._ended_order: list[str] = []
        self._pid_index: dict[int, str] = {}  # attached pid -> open job id
        self._generation = 0  # bumped when attachments change; invalidates the pid cache
        self._cache: dict[int, _CacheEntry] = {}
        self._listeners: list[Callable[[RegistryEvent], None]] = []
        self._listener_errors = 0

    # -- listeners -------------------------------------------------------------------------

    def on_event(self, listener: Callable[[RegistryEvent], None]) -> None:
        """Call ``listener`` for every applied change, in order, on the mutating thread.

        Listeners must be quick (enqueue, don't write); an exception is logged and counted.
        """
        with self._lock:
            self._listeners = [*self._listeners, listener]

    @property
    def listener_errors(self) -> int:
        """Exceptions raised by listeners so far."""
        return self._listener_errors

    def _emit(self, event: RegistryEvent) -> None:
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:
                self._listener_errors += 1
                if self._listener_errors == 1:
                    log.warning("job event listener failed", exc_info=True)
                else:
                    log.debug("job event listener failed", exc_info=True)

    # -- helpers ---------------------------------------------------------------------------

    def _owned(self, job_id: str, peer: Peer) -> _Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise ProtocolError(ErrorCode.UNKNOWN_JOB, f"job {job_id!r} is not registered")
        if peer.uid != 0 and peer.uid != job.owner_uid:
            raise ProtocolError(
                ErrorCode.FORBIDDEN, f"job {job_id!r} belongs to uid {job.owner_uid}"
            )
        return job

    def _open(self, job_id: str, peer: Peer) -> _Job:
        job = self._owned(job_id, peer)
        if job.state != "open":
            raise ProtocolError(ErrorCode.JOB_ENDED, f"job {job_id!r} has ended")
        return job

    def _in_tree(self, pid: int, root: int) -> bool:
        """True when ``pid`` is ``root`` or one of its descendants."""
        current: int | None = pid
        for _ in range(MAX_TREE_DEPTH):
            if current is None or current <= 0:
                return False
            if current == root:
                return True
            current = self._lookup.parent_pid(current)
        return False

    def _attach_locked(self, job: _Job, pid: int, start_time: float | None) -> bool:
        if pid in job.pids and job.pids[pid] == start_time:
            return False
        if len(job.pids) >= self._limits.max_pids_per_job:
            raise ProtocolError(ErrorCode.LIMIT, f"job has {len(job.pids)} pids attached")
        previous = self._pid_index.get(pid)
        if previous is not None and previous != job.job_id:
            # A live process belongs to one job: the newest attachment wins.
            self._jobs[previous].pids.pop(pid, None)
        job.pids[pid] = start_time
        self._pid_index[pid] = job.job_id
        self._generation += 1
        return True

    def _release_pids_locked(self, job: _Job) -> None:
        for pid in job.pids:
            if self._pid_index.get(pid) == job.job_id:
                del self._pid_index[pid]
        self._generation += 1

    def _evict_ended_locked(self) -> None:
        while len(self._ended_order) > self._limits.max_ended_jobs:
            old = self._ended_order.pop(0)
            job = self._jobs.get(old)
            if job is not None and job.state == "ended":
                del self._jobs[old]

    # -- mutations -------------------------------------------------------------------------

    def register(
        self,
        job_id: str,
        program_id: str,
        metadata: Mapping[str, Any],
        peer: Peer,
        client: str | None = None,
    ) -> RegisterResult:
        """Create ``job_id`` or join it (same uid, same program); attach the peer's pid."""
        start_time = self._lookup.start_time(peer.pid)
        with self._emit_lock:
            with self._lock:
                job = self._jobs.get(job_id)
                created = job is None
                if job is None:
                    open_jobs = sum(1 for j in self._jobs.values() if j.state == "open")
                    if open_jobs >= self._limits.max_open_jobs:
                        raise ProtocolError(ErrorCode.LIMIT, f"{open_jobs} jobs open")
                    job = _Job(job_id, program_id, peer.uid, self._clock())
                else:
                    job = self._open(job_id, peer)
                    if job.program_id != program_id:
                        raise ProtocolError(
                            ErrorCode.CONFLICT,
                            f"job {job_id!r} is registered to program {job.program_id!r}",
                        )
                if (
                    peer.pid not in job.pids
                    and len(job.pids) >= self._limits.max_pids_per_job
                ):
                    raise ProtocolError(ErrorCode.LIMIT, f"job has {len(job.pids)} pids attached")
                conflicts = self._merge_metadata(job, metadata)
                key = f"rank:{metadata['rank']}" if "rank" in metadata else f"pid:{peer.pid}"
                if (
                    key not in job.participants
                    and len(job.participants) >= self._limits.max_participants_per_job
                ):
                    raise ProtocolError(ErrorCode.LIMIT, "too many participants")
                job.participants[key] = False
                if created:
                    self._jobs[job_id] = job
                self._attach_locked(job, peer.pid, start_time)
                time_s = self._clock()
            data = {"metadata": dict(metadata), "created": created, "conflicts": conflicts}
            if client is not None:
                data["client"] = client
            self._emit(RegistryEvent("register", job_id, program_id, time_s, peer, data))
        return RegisterResult(created=created, conflicts=conflicts)

    def _merge_metadata(self, job: _Job, metadata: Mapping[str, Any]) -> tuple[str, ...]:
        conflicts: list[str] = []
        rank = metadata.get("rank")
        if rank is not None:
            job.ranks[rank] = {k: metadata[k] for k in PER_RANK_FIELDS if k in metadata}
        for name, value in metadata.items():
            if name in PER_RANK_FIELDS:
                continue
            if name == "extra":
                extra = job.metadata.setdefault("extra", {})
                for key, item in value.items():
                    if key not in extra:
                        extra[key] = item
                    elif extra[key] != item:
                        conflicts.append(f"extra.{key}")
            elif name not in job.metadata:
                job.metadata[name] = value
            elif job.metadata[name] != value:
                # First value wins; the disagreement is returned and kept in the ledger event.
                conflicts.append(name)
        return tuple(conflicts)

    def attach(self, job_id: str, pid: int, peer: Peer) -> bool:
        """Attach ``pid`` (must be the peer or its descendant) to an open job the peer owns."""
        with self._lock:
            self._open(job_id, peer)
        if not self._in_tree(pid, peer.pid):
            if self._lookup.start_time(pid) is None:
                raise ProtocolError(ErrorCode.NO_SUCH_PROCESS, f"no process {pid}")
            raise ProtocolError(
                ErrorCode.FORBIDDEN, f"pid {pid} is not in the process tree of pid {peer.pid}"
            )
        start_time = self._lookup.start_time(pid)
        if start_time is None:
            raise ProtocolError(ErrorCode.NO_SUCH_PROCESS, f"no process {pid}")
        with self._emit_lock:
            with self._lock:
                job = self._open(job_id, peer)
                changed = self._attach_locked(job, pid, start_time)
                time_s = self._clock()
            data = {"pid": pid, "changed": changed}
            self._emit(RegistryEvent("attach", job_id, job.program_id, time_s, peer, data))
        return changed

    def add(
        self,
        job_id: str,
        items: Iterable[Increment],
        peer: Peer,
        client: str | None = None,
        seq: int | None = None,
    ) -> bool:
        """Add increments to an open job; False (nothing changed) for an already-applied seq."""
        items = tuple(items)
        if len(items) == 1:
            flops, tokens, recompute, count = items[0]
        else:
            flops = math.fsum(i.flops for i in items)
            tokens = math.fsum(i.tokens for i in items)
            recompute = math.fsum(i.recompute_flops for i in items)
            count = sum(i.adds for i in items)
        with self._emit_lock:
            with self._lock:
                job = self._open(job_id, peer)
                if client is not None and seq is not None:
                    last = job.last_seq.get(client)
                    if last is not None and seq <= last:
                        return False
                    if last is None and len(job.last_seq) >= self._limits.max_clients_per_job:
                        raise ProtocolError(ErrorCode.LIMIT, "too many clients for this job")
                    job.last_seq[client] = seq
                job.analytic_flops += flops
                job.analytic_tokens += tokens
                job.recompute_flops += recompute
                job.adds += count
                time_s = self._clock()
                program_id = job.program_id
            if self._listeners:
                data: dict[str, Any] = {
                    "flops": flops,
                    "tokens": tokens,
                    "recompute_flops": recompute,
                    "adds": count,
                    "items": [
                        (i.flops, i.tokens, i.recompute_flops, i.adds) for i in items
                    ],
                }
                if client is not None:
                    data["client"] = client
                    data["seq"] = seq
                self._emit(RegistryEvent("add", job_id, program_id, time_s, peer, data))
        return True

    def claim(self, job_id: str, peer: Peer, data: dict[str, Any]) -> None:
        """Record an open job's claim about its own work (protocol.Claim's fields)."""
        with self._emit_lock:
            with self._lock:
                job = self._open(job_id, peer)
                time_s, program_id = self._clock(), job.program_id
            self._emit(RegistryEvent("claim", job_id, program_id, time_s, peer, data))

    def end(
        self,
        job_id: str,
        peer: Peer,
        *,
        final: bool = False,
        rank: int | None = None,
        exit_code: int | None = None,
        status: str | None = None,
    ) -> bool:
        """Mark a participant done; the job ends on ``final`` or when every participant is done.

        Returns whether the job is now ended.
        """
        with self._emit_lock:
            with self._lock:
                job = self._open(job_id, peer)
                key = f"rank:{rank}" if rank is not None else f"pid:{peer.pid}"
                if key in job.participants:
                    job.participants[key] = True
                elif not final:
                    raise ProtocolError(
                        ErrorCode.BAD_FIELD, f"{key} never registered with job {job_id!r}"
                    )
                world = job.metadata.get("world_size")
                all_ranks = world is None or all(
                    job.participants.get(f"rank:{r}") for r in range(world)
                )
                ended = final or (all_ranks and all(job.participants.values()))
                if exit_code is not None and (job.exit_code is None or exit_code != 0):
                    job.exit_code = exit_code  # a failure of any participant is kept
                if status is not None and (final or job.end_status is None):
                    job.end_status = status
                time_s = self._clock()
                if ended:
                    job.state = "ended"
                    job.ended_s = time_s
                    self._release_pids_locked(job)
                    self._ended_order.append(job_id)
                    self._evict_ended_locked()
            data = {
                "final": final,
                "rank": rank,
                "exit_code": exit_code,
                "status": status,
                "job_ended": ended,
            }
            self._emit(RegistryEvent("end", job_id, job.program_id, time_s, peer, data))
        return ended

    # -- reads -----------------------------------------------------------------------------

    def query(self, job_id: str, peer: Peer) -> JobSnapshot:
        """One job's snapshot, for its owner (or root)."""
        with self._lock:
            return self._owned(job_id, peer).snapshot()

    def snapshot(self) -> RegistrySnapshot:
        """Immutable copy of every job, for the exporter."""
        with self._lock:
            return RegistrySnapshot(
                time_s=self._clock(), jobs=tuple(j.snapshot() for j in self._jobs.values())
            )

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
