"""Thread-safe registry of jobs reported over the job socket, and the pid -> job lookup.

The server thread mutates it; the attribution stage calls ``job_for_pid`` every sampling interval
per GPU process; the exporter reads ``snapshot()``; the ledger listens through ``on_event``.
Identity (pid, uid) always comes from the kernel (SO_PEERCRED) via ``Peer``, never from a message.

Jobs and programs have owners (docs/protocol.md, "Authorization"). What earlier sessions
recorded comes from the ledger (``history``): a job not in memory is looked up there, so after a
restart its owner, its ended state, its totals and its reporters' sequence numbers still hold.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from gpuflops.jobs.live import LiveJob
from gpuflops.jobs.pids import PidIndex
from gpuflops.jobs.programs import ProgramTable
from gpuflops.jobs.protocol import ErrorCode, Increment, ProtocolError
from gpuflops.jobs.records import (
    AnalyticBound,
    AttachedJob,
    JobHistory,
    JobSnapshot,
    KnownJob,
    Peer,
    ProcessLookup,
    ProgramAccess,
    PsutilProcessLookup,
    RegisterResult,
    RegistryEvent,
    RegistryLimits,
    RegistrySnapshot,
)

log = logging.getLogger(__name__)


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
        history: JobHistory | None = None,
        access: Callable[[str], ProgramAccess] | None = None,
        bound: AnalyticBound | None = None,
    ) -> None:
        self._lookup: ProcessLookup = process_lookup or PsutilProcessLookup()
        self._history = history
        self._programs = ProgramTable(history, access)
        self._bound = bound
        self._open_by_uid: dict[int, int] = {}
        self._known_cache: dict[str, tuple[float, KnownJob | None]] = {}  # attribution checks
        self._clock = clock
        self._monotonic = monotonic
        self._limits = limits or RegistryLimits()
        self._cache_ttl_s = cache_ttl_s
        self._lock = threading.Lock()  # guards state; never held while calling out
        self._emit_lock = threading.Lock()  # orders mutation + listener calls
        self._jobs: dict[str, LiveJob] = {}
        self._ended_order: list[str] = []
        self._pids = PidIndex(self._lock, self._jobs, self._lookup, monotonic, cache_ttl_s)
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

    def _find_locked(self, job_id: str) -> LiveJob | None:
        """The job in memory, else as the ledger recorded it (not yet back in memory: only a
        uid that may write to it brings it back, in ``_owned``)."""
        job = self._jobs.get(job_id)
        if job is not None or self._history is None:
            return job
        known = self._history.known_job(job_id)
        return None if known is None else LiveJob.restored(known)

    def _count_open_locked(self, uid: int, delta: int) -> None:
        if delta > 0:
            if sum(self._open_by_uid.values()) >= self._limits.max_open_jobs:
                raise ProtocolError(ErrorCode.LIMIT, f"{self._limits.max_open_jobs} jobs open")
            if uid != 0 and self._open_by_uid.get(uid, 0) >= self._limits.max_open_jobs_per_uid:
                raise ProtocolError(
                    ErrorCode.LIMIT, f"uid {uid} has {self._limits.max_open_jobs_per_uid} jobs "
                    "open (the per-user limit); end some first")
        left = self._open_by_uid.get(uid, 0) + delta
        if left > 0:
            self._open_by_uid[uid] = left
        else:
            self._open_by_uid.pop(uid, None)

    def _writes(self, job: LiveJob, uid: int, groups: Callable[[], Iterable[int]]) -> bool:
        """Whether ``uid`` may write to ``job``: root, its owner, or its owner group."""
        return uid == 0 or uid == job.owner_uid or (
            job.owner_gid is not None and job.owner_gid in frozenset(groups()))

    def _owned(self, job_id: str, peer: Peer) -> LiveJob:
        job = self._find_locked(job_id)
        if job is None:
            raise ProtocolError(ErrorCode.UNKNOWN_JOB, f"job {job_id!r} is not registered")
        if not self._writes(job, peer.uid, lambda: self._lookup.groups(peer.pid)):
            raise ProtocolError(
                ErrorCode.FORBIDDEN, f"job {job_id!r} belongs to uid {job.owner_uid}"
            )
        if job.state == "open" and job_id not in self._jobs:  # back from the ledger
            self._count_open_locked(job.owner_uid, +1)
            self._jobs[job_id] = job
        job.active_s = self._monotonic()
        return job

    def _open(self, job_id: str, peer: Peer) -> LiveJob:
        job = self._owned(job_id, peer)
        if job.state != "open":
            raise ProtocolError(ErrorCode.JOB_ENDED, f"job {job_id!r} has ended")
        return job

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
                job = self._find_locked(job_id)
                created = job is None
                if job is not None:
                    job = self._open(job_id, peer)
                    if job.program_id != program_id:
                        raise ProtocolError(
                            ErrorCode.CONFLICT,
                            f"job {job_id!r} is registered to program {job.program_id!r}",
                        )
                role = self._programs.role(program_id, peer.uid,
                                           lambda: self._lookup.groups(peer.pid))
                if role is None:
                    owner = self._programs.owner(program_id)
                    raise ProtocolError(
                        ErrorCode.FORBIDDEN,
                        f"uid {peer.uid} may not register jobs into program {program_id!r} "
                        + (f"(owned by uid {owner}; " if owner is not None else "(")
                        + "the node's program policy lists who may)")
                self._programs.check_facts(program_id, role, metadata)
                if job is None:
                    self._count_open_locked(peer.uid, +1)
                    job = LiveJob(job_id, program_id, peer.uid, self._clock(),
                               owner_gid=self._programs.job_group(program_id),
                               active_s=self._monotonic())
                if (
                    peer.pid not in job.pids
                    and len(job.pids) >= self._limits.max_pids_per_job
                ):
                    raise ProtocolError(ErrorCode.LIMIT, f"job has {len(job.pids)} pids attached")
                conflicts = job.merge_metadata(metadata)
                key = f"rank:{metadata['rank']}" if "rank" in metadata else f"pid:{peer.pid}"
                if (
                    key not in job.participants
                    and len(job.participants) >= self._limits.max_participants_per_job
                ):
                    if created:
                        self._count_open_locked(peer.uid, -1)
                    raise ProtocolError(ErrorCode.LIMIT, "too many participants")
                job.participants[key] = False
                if created:
                    self._jobs[job_id] = job
                self._programs.record(program_id, peer.uid, metadata)
                self._pids.attach_locked(job, peer.pid, start_time, self._limits.max_pids_per_job)
                time_s = self._clock()
            data: dict[str, Any] = {"metadata": dict(metadata), "created": created,
                                    "conflicts": conflicts}
            if created:  # the ledger keeps who owns the job (docs/ledger.md, schema v5)
                data["owner"] = {"uid": job.owner_uid, "gid": job.owner_gid}
            if client is not None:
                data["client"] = client
            self._emit(RegistryEvent("register", job_id, program_id, time_s, peer, data))
        return RegisterResult(created=created, conflicts=conflicts)

    def attach(self, job_id: str, pid: int, peer: Peer) -> bool:
        """Attach ``pid`` (must be the peer or its descendant) to an open job the peer owns."""
        with self._lock:
            self._open(job_id, peer)
        if not self._pids.in_tree(pid, peer.pid):
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
                changed = self._pids.attach_locked(job, pid, start_time,
                                                   self._limits.max_pids_per_job)
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
                try:
                    job = self._open(job_id, peer)
                except ProtocolError as exc:
                    refused = self._find_locked(job_id) if exc.code == ErrorCode.FORBIDDEN else None
                    if refused is not None:
                        self._refuse(refused, peer, "forbidden", flops, tokens, exc.detail)
                    raise
                if client is not None and seq is not None:
                    last = job.last_seq.get(client)
                    if last is not None and seq <= last:
                        return False
                    if last is None and len(job.last_seq) >= self._limits.max_clients_per_job:
                        raise ProtocolError(ErrorCode.LIMIT, "too many clients for this job")
                time_s = self._clock()
                if self._bound is not None:
                    limit = self._bound.limit(time_s - job.started_s)
                    if max(job.analytic_flops + flops, job.recompute_flops + recompute) > limit:
                        detail = (
                            f"job {job_id!r} would report {job.analytic_flops + flops:.4g} "
                            f"analytic FLOPs, more than this node's GPUs can execute since it "
                            f"registered {time_s - job.started_s:.0f} s ago ({limit:.4g} FLOPs "
                            f"at {self._bound.slack:g} x their peak); not applied")
                        self._refuse(job, peer, "bound", flops, tokens, detail, limit)
                        raise ProtocolError(ErrorCode.BOUND, detail)
                if client is not None and seq is not None:
                    job.last_seq[client] = seq
                job.analytic_flops += flops
                job.analytic_tokens += tokens
                job.recompute_flops += recompute
                job.adds += count
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

    def _refuse(self, job: LiveJob, peer: Peer, reason: str, flops: float, tokens: float,
                detail: str, limit: float | None = None) -> None:
        """Record a refused add in the ledger (emit lock held): evidence, changing no total."""
        data = {"op": "add", "reason": reason, "flops": flops, "tokens": tokens,
                "detail": detail, "limit": limit}
        self._emit(RegistryEvent("refused", job.job_id, job.program_id, self._clock(), peer, data))

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
                    self._count_open_locked(job.owner_uid, -1)
                    self._pids.release_locked(job)
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

    def may_attribute(self, job_id: str, program_id: str, uid: int | None,
                      groups: frozenset[int]) -> bool:
        """Whether a process of ``uid`` may have its FLOPs counted to (job, program) by the
        environment or its cgroup: it must be allowed to write to the job, if the job is
        registered, and to register into the program, if anyone owns the program."""
        if uid == 0:
            return True
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None and self._history is not None:
            now = self._monotonic()
            hit = self._known_cache.get(job_id)
            if hit is None or now - hit[0] > self._cache_ttl_s:
                if len(self._known_cache) >= 4096:
                    self._known_cache.clear()
                hit = self._known_cache[job_id] = (now, self._history.known_job(job_id))
            job = None if hit[1] is None else LiveJob.restored(hit[1])
        if job is not None and (uid is None or not self._writes(job, uid, lambda: groups)):
            return False
        if not self._programs.restricted(program_id):
            return True
        return self._programs.role(program_id, uid, lambda: groups) is not None

    def snapshot(self) -> RegistrySnapshot:
        """Immutable copy of every job, for the exporter."""
        with self._lock:
            return RegistrySnapshot(
                time_s=self._clock(), jobs=tuple(j.snapshot() for j in self._jobs.values())
            )

    def job_for_pid(self, pid: int) -> AttachedJob | None:
        """The open job ``pid`` or one of its ancestors is attached to, or None (PidIndex)."""
        return self._pids.job_for_pid(pid)

    def prune(self) -> int:
        """Forget exited processes, and rest idle jobs; returns how many pids were dropped."""
        dropped = self._pids.prune()
        self._rest_idle()
        return dropped

    def _rest_idle(self) -> None:
        """Open jobs with no process and no message for ``idle_job_s`` leave memory, once the
        ledger has them: their owner's next message brings them back as they were."""
        if self._history is None:
            return
        now = self._monotonic()
        with self._lock:
            idle = [j.job_id for j in self._jobs.values() if j.state == "open" and not j.pids
                    and now - j.active_s >= self._limits.idle_job_s]
        for job_id in idle:
            known = self._history.known_job(job_id)
            with self._emit_lock, self._lock:
                job = self._jobs.get(job_id)
                # Only what the ledger holds in full may leave: every applied seq committed.
                if (job is not None and job.state == "open" and not job.pids
                        and known is not None and dict(known.clients) == job.last_seq):
                    del self._jobs[job_id]
                    self._count_open_locked(job.owner_uid, -1)
