"""Map a process id to the job it works for: socket registration, environment, Kubernetes, Slurm,
torchrun or systemd, in a configurable order; anything else goes to the explicit unattributed job.

Only this module reads /proc/<pid>/{stat,cgroup,environ} for attribution, and only
``KubeletClient`` (kubelet.py) and ``PodResourcesClient`` (podresources.py) talk to the kubelet;
they take their root, clock and transport through the constructor. See docs/attribution.md
("Process → job mapping") for layouts and rules.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

from gpuflops.identity.cgroup import (
    DEFAULT_SYSTEMD_IGNORE,
    CgroupLine,
    CgroupParseError,
    StatFields,
    bounded_text,
    find_pod,
    find_slurm,
    find_systemd_unit,
    parse_cgroup,
    parse_environ,
    parse_stat,
    parse_status,
    sanitize_label,
)
from gpuflops.identity.kubelet import KubeletClient
from gpuflops.model import UNATTRIBUTED

if TYPE_CHECKING:  # podresources.py imports grpc, which only its optional extra installs
    from gpuflops.identity.podresources import PodResourcesClient

log = logging.getLogger(__name__)

SOURCES: tuple[str, ...] = ("socket", "env", "kubernetes", "slurm", "torchrun", "systemd")
DEFAULT_ORDER: tuple[str, ...] = SOURCES
PROGRAM_LABEL = "gpuflops.io/program"  # pod label or annotation naming the program
JOB_LABEL = "gpuflops.io/job"  # pod label or annotation grouping several pods into one job


@dataclass(frozen=True)
class JobIdentity:
    """The job and program a process's FLOPs count towards, and how we know."""

    job: str  # Prometheus-safe label value, e.g. "k8s/ml/llama-ft-0", "slurm/4242"
    program: str  # Prometheus-safe label value; the job itself when nothing names a program
    source: str  # one of SOURCES, or "none" for the unattributed job
    details: Mapping[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        # A read-only copy, so a JobIdentity shared between threads and caches cannot change.
        object.__setattr__(self, "details", MappingProxyType(dict(self.details)))


UNATTRIBUTED_IDENTITY = JobIdentity(UNATTRIBUTED, UNATTRIBUTED, "none", {})
# (identity, process uid or None, its gids) -> whether that process may count there.
Authorize = Callable[[JobIdentity, int | None, frozenset[int]], bool]


def validate_order(order: Iterable[str]) -> tuple[str, ...]:
    """Check a source order; raises ValueError naming the bad entry and the valid ones."""
    result = tuple(s.strip() for s in order)
    for name in result:
        if name not in SOURCES:
            raise ValueError(f"unknown job source {name!r}; valid: {', '.join(SOURCES)}")
    dupes = sorted({s for s in result if result.count(s) > 1})
    if dupes:
        raise ValueError(f"job source listed twice: {', '.join(dupes)}")
    return result


def parse_order(text: str) -> tuple[str, ...]:
    """Parse a comma-separated order such as ``"socket,slurm,kubernetes"`` (for the CLI)."""
    return validate_order(s for s in text.split(",") if s.strip())


# ---------------------------------------------------------------------------------------------
# Process view and the sources


@dataclass(frozen=True)
class _ProcView:
    """What /proc said about one process at one moment."""

    pid: int
    ppid: int
    start_ticks: int
    cgroups: tuple[CgroupLine, ...]  # empty when unreadable or malformed
    env: Mapping[str, str] | None  # None when environ could not be read
    uid: int | None = None  # effective uid; None when status could not be read
    groups: frozenset[int] = frozenset()  # every gid of the process


def _program(env: Mapping[str, str] | None, *fallbacks: str | None) -> str | None:
    """GPUFLOPS_PROGRAM from the environment, else the first usable fallback."""
    candidates = [env.get("GPUFLOPS_PROGRAM") if env else None, *fallbacks]
    for c in candidates:
        if c:
            clean = sanitize_label(c)
            if clean:
                return clean
    return None


def _details(values: Mapping[str, str | None]) -> dict[str, str]:
    return {k: bounded_text(v) for k, v in values.items() if v}


_TORCHRUN_KEYS = {
    "rank": "RANK",
    "group_rank": "GROUP_RANK",
    "local_rank": "LOCAL_RANK",
    "world_size": "WORLD_SIZE",
    "attempt": "TORCHELASTIC_RESTART_COUNT",
}


class JobMapper:
    """Resolve pids to jobs from /proc under ``proc_root``; never raises from ``resolve``.

    Answers from /proc are cached per pid for ``ttl_s`` and tied to the process's start time
    (field 22 of stat), so a reused pid is resolved afresh. The socket lookup is consulted on
    every call because registrations arrive at any time. A pid that has vanished gets its last
    known answer, else the unattributed job; cached pids not asked about for ``retain_s`` are
    dropped. Thread-safe (one lock; a kubelet refresh holds it for at most its timeout).
    """

    def __init__(
        self,
        proc_root: Path = Path("/proc"),
        order: Sequence[str] = DEFAULT_ORDER,
        kubelet: KubeletClient | None = None,
        pod_resources: PodResourcesClient | None = None,
        socket_lookup: Callable[[int], JobIdentity | None] | None = None,
        authorize: Authorize | None = None,
        clock: Callable[[], float] = time.monotonic,
        ttl_s: float = 30.0,
        retain_s: float = 600.0,
        systemd_ignore: Iterable[str] = DEFAULT_SYSTEMD_IGNORE,
        max_entries: int = 65536,
    ) -> None:
        self._proc = proc_root
        self._order = validate_order(order)
        self._kubelet = kubelet
        self._pod_resources = pod_resources
        self._socket_lookup = socket_lookup
        self._authorize = authorize
        self._clock = clock
        self._ttl_s = ttl_s
        self._retain_s = retain_s
        self._systemd_ignore = tuple(systemd_ignore)
        self._max_entries = max_entries
        self._lock = threading.Lock()
        self._cache: dict[int, _Entry] = {}
        self._pruned_at = clock()
        self._counts: dict[str, int] = {}
        self._sources: dict[str, Callable[[_ProcView, str | None],
                                          tuple[JobIdentity | None, bool]]] = {
            "env": self._from_env,
            "kubernetes": self._from_kubernetes,
            "slurm": self._from_slurm,
            "torchrun": self._from_torchrun,
            "systemd": self._from_systemd,
        }

    @property
    def order(self) -> tuple[str, ...]:
        return self._order

    def stats(self) -> dict[str, int]:
        """Counters: ``resolved_<source>``, ``unattributed``, and problems by kind."""
        with self._lock:
            counts = dict(self._counts)
        if self._kubelet is not None:
            counts["kubelet_requests"] = self._kubelet.requests
            counts["kubelet_errors"] = self._kubelet.errors
        if self._pod_resources is not None:
            pr = self._pod_resources
            counts.update(pod_resources_requests=pr.requests, pod_resources_errors=pr.errors,
                          pod_resources_shared=pr.shared, pod_resources_conflicts=pr.conflicts)
        return counts

    def resolve(self, pid: int, gpu: str | None = None) -> JobIdentity:
        """The job ``pid`` works for; ``UNATTRIBUTED_IDENTITY`` when no source knows. ``gpu`` is
        the UUID of the unit (GPU or MIG device) the work ran on: PodResources maps it to a pod."""
        with self._lock:
            now = self._clock()
            self._prune(now)
            ref = self._resolve(pid, gpu, now)
            self._count("unattributed" if ref.source == "none" else f"resolved_{ref.source}")
            return ref

    # -- cache ---------------------------------------------------------------------------------

    def _resolve(self, pid: int, gpu: str | None, now: float) -> JobIdentity:
        entry = self._cache.get(pid)
        stat = self._read_stat(self._proc / str(pid))
        fresh = (
            entry is not None
            and stat is not None
            and entry.view.start_ticks == stat.start_time_ticks
            and now - entry.read_at < self._ttl_s
        )
        view = None if fresh or stat is None else self._read(pid)
        if not fresh and view is None:
            self._count("vanished")
        elif view is not None and (entry is None or entry.view.start_ticks != view.start_ticks):
            if entry is not None:
                self._count("pid_reused")
            entry = self._cache[pid] = _Entry(view, now)
        elif view is not None and entry is not None:
            entry.view, entry.read_at = view, now
            entry.results.clear()
        if entry is not None:
            entry.seen_at = now
        for source in self._order:
            if source == "socket":
                ref = self._from_socket(pid)
            elif entry is None:
                continue
            elif source in entry.results:
                ref = entry.results[source]
            else:
                ref, final = self._run_source(source, entry.view, gpu)
                if final:
                    entry.results[source] = ref
            if ref is not None and source != "socket" and entry is not None \
                    and not self._authorized(ref, entry.view):
                continue
            if ref is not None:
                return ref
        return UNATTRIBUTED_IDENTITY

    def _authorized(self, ref: JobIdentity, view: _ProcView) -> bool:
        """A job or program named by the environment or a cgroup counts only for a process whose
        uid may write to it: the socket's owners and the node's program policy decide."""
        if self._authorize is None:
            return True
        try:
            if self._authorize(ref, view.uid, view.groups):
                return True
        except Exception as e:  # someone else's code: refusing is the safe answer
            self._problem("authorize_error", "authorizing pid %d failed: %r", view.pid, e)
            return False
        self._problem(f"forbidden_{ref.source}",
                      "pid %d (uid %s) names job %s of program %s through %s, which its uid may "
                      "not write to; not counted there", view.pid, view.uid, ref.job, ref.program,
                      ref.source)
        return False

    def _run_source(self, source: str, view: _ProcView,
                    gpu: str | None) -> tuple[JobIdentity | None, bool]:
        try:
            return self._sources[source](view, gpu)
        except Exception as e:  # a parser bug must cost one answer, not the daemon
            self._problem("source_error", "source %s failed for pid %d: %r", source, view.pid, e)
            return None, False

    def _prune(self, now: float) -> None:
        if now - self._pruned_at < self._ttl_s and len(self._cache) <= self._max_entries:
            return
        self._pruned_at = now
        for pid in [p for p, e in self._cache.items() if now - e.seen_at >= self._retain_s]:
            del self._cache[pid]
        if len(self._cache) > self._max_entries:
            by_age = sorted(self._cache, key=lambda p: self._cache[p].seen_at)
            for pid in by_age[: len(self._cache) - self._max_entries]:
                del self._cache[pid]

    # -- /proc ---------------------------------------------------------------------------------

    def _read(self, pid: int) -> _ProcView | None:
        """Read stat, cgroup and environ; None when the process is gone (or was replaced)."""
        base = self._proc / str(pid)
        stat = self._read_stat(base)
        if stat is None:
            return None
        cgroups: tuple[CgroupLine, ...] = ()
        try:
            cgroups = parse_cgroup((base / "cgroup").read_text(errors="replace"))
        except CgroupParseError as e:
            self._problem("cgroup_malformed", "pid %d: %s", pid, e)
        except OSError as e:
            self._problem("cgroup_unreadable", "cannot read cgroup of pid %d: %s", pid, e)
        env: dict[str, str] | None = None
        try:
            env = parse_environ((base / "environ").read_bytes())
        except OSError as e:
            # EACCES unless we are root or hold CAP_SYS_PTRACE over the process's owner.
            self._problem("environ_unreadable", "cannot read environ of pid %d: %s", pid, e)
        uid, groups = None, frozenset[int]()
        try:
            uid, groups = parse_status((base / "status").read_text(errors="replace"))
        except OSError as e:
            self._problem("status_unreadable", "cannot read status of pid %d: %s", pid, e)
        again = self._read_stat(base)
        if again is None or again.start_time_ticks != stat.start_time_ticks:
            return None  # the pid died or was reused while we read: these files may be mixed
        return _ProcView(pid, stat.ppid, stat.start_time_ticks, cgroups, env, uid, groups)

    def _read_stat(self, base: Path) -> StatFields | None:
        try:
            return parse_stat((base / "stat").read_text(errors="replace"))
        except (OSError, ValueError):
            return None

    def _read_env(self, pid: int) -> dict[str, str] | None:
        try:
            return parse_environ((self._proc / str(pid) / "environ").read_bytes())
        except OSError:
            return None

    # -- sources -------------------------------------------------------------------------------
    # Each returns (answer or None, whether the answer may be cached for ttl_s).

    def _from_socket(self, pid: int) -> JobIdentity | None:
        if self._socket_lookup is None:
            return None
        try:
            ref = self._socket_lookup(pid)
        except Exception as e:  # the registry is someone else's code; keep attributing
            self._problem("socket_error", "socket lookup for pid %d failed: %r", pid, e)
            return None
        if ref is None:
            return None
        job = sanitize_label(ref.job)
        if not job or job == UNATTRIBUTED:
            return None
        return JobIdentity(job, sanitize_label(ref.program) or job, "socket", ref.details)

    def _from_env(self, view: _ProcView, _gpu: str | None) -> tuple[JobIdentity | None, bool]:
        job = sanitize_label(view.env.get("GPUFLOPS_JOB", "")) if view.env else ""
        if not job:
            return None, True
        return JobIdentity(job, _program(view.env) or job, "env", {}), True

    def _from_kubernetes(self, view: _ProcView, gpu: str | None) -> tuple[JobIdentity | None, bool]:
        pod = find_pod(view.cgroups)
        if pod is None:
            return None, True
        info = self._kubelet.pod(pod.pod_uid) if self._kubelet is not None else None
        details: dict[str, str | None] = {
            "pod_uid": pod.pod_uid,
            "container_id": pod.container_id,
            "runtime": pod.runtime,
            "qos_class": pod.qos_class,
            "conmon": "true" if pod.conmon else None,
        }
        if info is None:
            held = None
            if self._pod_resources is not None and gpu:
                held = self._pod_resources.holder(gpu, pod.pod_uid)
            # No labels from PodResources: the program comes from the job socket or the env.
            job = sanitize_label(f"k8s/{held.namespace}/{held.pod}" if held is not None
                                 else f"k8s/pod/{pod.pod_uid}")
            if held is not None:
                details.update(namespace=held.namespace, pod=held.pod, container=held.container,
                               pod_source="pod-resources")
            ref = JobIdentity(job, _program(view.env) or job, "kubernetes", _details(details))
            # Not cached: once the kubelet answers, the pod's name replaces its UID; and a
            # PodResources answer depends on the GPU asked about.
            return ref, self._kubelet is None and self._pod_resources is None
        group = info.labels.get(JOB_LABEL) or info.annotations.get(JOB_LABEL)
        job = sanitize_label(f"k8s/{info.namespace}/{group or info.name}")
        named = info.labels.get(PROGRAM_LABEL) or info.annotations.get(PROGRAM_LABEL)
        details.update(
            namespace=info.namespace,
            pod=info.name,
            container=info.containers.get(pod.container_id or ""),
        )
        program = _program(None, named) or _program(view.env) or job
        return JobIdentity(job, program, "kubernetes", _details(details)), True

    def _from_slurm(self, view: _ProcView, _gpu: str | None) -> tuple[JobIdentity | None, bool]:
        cg = find_slurm(view.cgroups)
        env = view.env or {}
        env_job = env.get("SLURM_JOB_ID", "").strip()
        job_id = cg.job_id if cg is not None else env_job
        if not job_id:
            return None, True
        # The cgroup is set by slurmd; the environment only counts when it names the same job.
        trusted_env = env if env_job == job_id else {}
        job = sanitize_label(f"slurm/{job_id}")
        details = _details({
            "job_id": job_id,
            "step": cg.step if cg is not None and cg.step else trusted_env.get("SLURM_STEP_ID"),
            "uid": cg.uid if cg is not None else None,
            "array_job_id": trusted_env.get("SLURM_ARRAY_JOB_ID"),
            "array_task_id": trusted_env.get("SLURM_ARRAY_TASK_ID"),
            "attempt": trusted_env.get("SLURM_RESTART_COUNT"),
            "cluster": trusted_env.get("SLURM_CLUSTER_NAME"),
            "evidence": "+".join(
                e for e, ok in (("cgroup", cg is not None), ("environ", bool(trusted_env))) if ok
            ),
        })
        program = _program(view.env, trusted_env.get("SLURM_JOB_NAME")) or job
        return JobIdentity(job, program, "slurm", details), True

    def _from_torchrun(self, view: _ProcView, _gpu: str | None) -> tuple[JobIdentity | None, bool]:
        env = view.env or {}
        if "TORCHELASTIC_RUN_ID" not in env:
            return None, True
        run_id = env["TORCHELASTIC_RUN_ID"].strip()
        details = {k: env.get(v) for k, v in _TORCHRUN_KEYS.items()}
        if run_id in ("", "none"):
            # torchrun's default --rdzv-id is "none", shared by every unnamed run on the host:
            # name the run after its elastic agent, the nearest ancestor without the variable.
            agent = self._torchrun_agent(view)
            if agent is None:
                return None, True
            job = f"torchrun/none-{agent}"
            details["agent_pid"] = str(agent)
        else:
            job = f"torchrun/{run_id}"
        job = sanitize_label(job)
        details["run_id"] = run_id
        return JobIdentity(job, _program(env) or job, "torchrun", _details(details)), True

    def _torchrun_agent(self, view: _ProcView) -> int | None:
        ppid = view.ppid
        for _ in range(32):  # bounded: a pid loop in a bad fake tree must not hang us
            if ppid <= 1:
                return None
            parent_env = self._read_env(ppid)
            if parent_env is None:
                return None
            if "TORCHELASTIC_RUN_ID" not in parent_env:
                return ppid
            stat = self._read_stat(self._proc / str(ppid))
            if stat is None:
                return None
            ppid = stat.ppid
        return None

    def _from_systemd(self, view: _ProcView, _gpu: str | None) -> tuple[JobIdentity | None, bool]:
        unit = find_systemd_unit(view.cgroups, self._systemd_ignore)
        if unit is None:
            return None, True
        scope = f"user@{unit.user_uid}/" if unit.user_uid else ""
        job = sanitize_label(f"systemd/{scope}{unit.unit}")
        details = _details({"unit": unit.unit, "user_uid": unit.user_uid})
        return JobIdentity(job, _program(view.env) or job, "systemd", details), True

    # -- bookkeeping ---------------------------------------------------------------------------

    def _count(self, kind: str) -> None:
        self._counts[kind] = self._counts.get(kind, 0) + 1

    def _problem(self, kind: str, msg: str, *args: object) -> None:
        self._count(kind)
        log.log(logging.WARNING if self._counts[kind] == 1 else logging.DEBUG, msg, *args)


@dataclass
class _Entry:
    """Cached /proc view of one pid and the per-source answers derived from it."""

    view: _ProcView
    read_at: float
    seen_at: float = 0.0
    results: dict[str, JobIdentity | None] = field(default_factory=dict)
