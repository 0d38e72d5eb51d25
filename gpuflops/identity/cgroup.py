"""Pure parsers for /proc/<pid>/{cgroup,environ,stat} and the cgroup layouts of Kubernetes,
Slurm and systemd.

Nothing here touches the filesystem: callers read the files and pass text or bytes in, so every
layout can be tested from fixture files. Layouts are matched by path segment anywhere in the
path, not anchored at the root, because a reader inside a cgroup namespace sees other
processes' paths relative to its own root (``0::/../../kubepods-...-pod<uid>.slice/...``).
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class CgroupLine:
    """One line of /proc/<pid>/cgroup: ``hierarchy-id:controllers:path``."""

    hierarchy: int
    controllers: tuple[str, ...]  # empty for the cgroup v2 unified line "0::/..."
    path: str

    @property
    def unified(self) -> bool:
        return self.hierarchy == 0 and not self.controllers

    @property
    def segments(self) -> tuple[str, ...]:
        return tuple(s for s in self.path.split("/") if s and s not in (".", ".."))


@dataclass(frozen=True)
class StatFields:
    """The fields of /proc/<pid>/stat that job mapping needs."""

    ppid: int
    start_time_ticks: int  # field 22: start time after boot in clock ticks; tells pid reuse apart


@dataclass(frozen=True)
class PodCgroup:
    """A Kubernetes pod (and container, when the path goes that deep) found in a cgroup path."""

    pod_uid: str  # with dashes, as the API server spells it; 32 hex digits for static pods
    container_id: str | None
    runtime: str | None  # "containerd", "crio", "docker"; None when the path does not say
    qos_class: str | None  # "guaranteed", "burstable", "besteffort"; None when not visible
    conmon: bool = False  # cri-o's container monitor, not the container's own processes


@dataclass(frozen=True)
class SlurmCgroup:
    """A Slurm job (and step) found in a cgroup path."""

    job_id: str
    step: str | None  # "0", "1", "batch", "extern", "interactive", ...
    uid: str | None  # only the cgroup v1 layout names the user


class CgroupParseError(ValueError):
    """/proc/<pid>/cgroup had a line that is not ``id:controllers:path``."""

    def __init__(self, line: str) -> None:
        super().__init__(f"malformed cgroup line: {line!r}")
        self.line = line


def parse_cgroup(text: str) -> tuple[CgroupLine, ...]:
    """Parse /proc/<pid>/cgroup; raises CgroupParseError on a malformed line."""
    lines: list[CgroupLine] = []
    for raw in text.splitlines():
        if not raw.strip():
            continue
        # The path may itself contain ':' so split at most twice.
        parts = raw.split(":", 2)
        if len(parts) != 3 or not parts[0].isdigit():
            raise CgroupParseError(raw)
        controllers = tuple(c for c in parts[1].split(",") if c)
        lines.append(CgroupLine(int(parts[0]), controllers, parts[2]))
    return tuple(lines)


def parse_environ(data: bytes) -> dict[str, str]:
    """Parse /proc/<pid>/environ (NUL-separated ``KEY=value``); the first of a duplicate wins."""
    env: dict[str, str] = {}
    for item in data.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if not sep or not key:
            continue
        k = key.decode("utf-8", "replace")
        if k not in env:  # getenv() returns the first occurrence too
            env[k] = value.decode("utf-8", "replace")
    return env


def parse_stat(text: str) -> StatFields:
    """Parse /proc/<pid>/stat; raises ValueError when it is truncated or malformed."""
    # comm (field 2) is in parentheses and may itself contain spaces and ')'.
    _, paren, rest = text.rpartition(")")
    if not paren:
        raise ValueError(f"no ')' in stat line: {text[:80]!r}")
    fields = rest.split()  # fields[0] is field 3 (state)
    if len(fields) < 20:
        raise ValueError(f"stat line has {len(fields) + 2} fields, expected at least 22")
    return StatFields(ppid=int(fields[1]), start_time_ticks=int(fields[19]))


def _ordered(lines: Sequence[CgroupLine]) -> list[CgroupLine]:
    """The unified (v2) line first, then v1 hierarchies in file order."""
    return [ln for ln in lines if ln.unified] + [ln for ln in lines if not ln.unified]


_UUID_DASH = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
_UUID_UNDERSCORE = r"[0-9a-f]{8}_[0-9a-f]{4}_[0-9a-f]{4}_[0-9a-f]{4}_[0-9a-f]{12}"
_STATIC_UID = r"[0-9a-f]{32}"  # static (mirror) pods: the UID is the manifest's config hash
# cgroupfs driver: /kubepods[/burstable|/besteffort]/pod<uid>/<container>
_POD_CGROUPFS = re.compile(rf"^pod({_UUID_DASH}|{_STATIC_UID})$")
# systemd driver: kubepods[-<qos>]-pod<uid with '_'>.slice; kind prefixes another "kubelet-".
_POD_SYSTEMD = re.compile(rf"^(?:[a-z0-9-]*?-)?pod({_UUID_UNDERSCORE}|{_STATIC_UID})\.slice$")
_CONTAINER_SCOPE = re.compile(r"^(cri-containerd|crio-conmon|crio|docker)-([0-9a-f]{64})\.scope$")
_CONTAINER_CRIO_CGROUPFS = re.compile(r"^crio-([0-9a-f]{64})$")
_CONTAINER_BARE = re.compile(r"^([0-9a-f]{64})$")
_RUNTIME = {
    "cri-containerd": "containerd",
    "crio": "crio",
    "crio-conmon": "crio",
    "docker": "docker",
}


def _container(segment: str) -> tuple[str | None, str | None, bool]:
    """(container id, runtime, is conmon) from the cgroup segment below the pod's."""
    m = _CONTAINER_SCOPE.match(segment)
    if m:
        return m.group(2), _RUNTIME[m.group(1)], m.group(1) == "crio-conmon"
    m = _CONTAINER_CRIO_CGROUPFS.match(segment)
    if m:
        return m.group(1), "crio", False
    m = _CONTAINER_BARE.match(segment)
    if m:
        return m.group(1), None, False  # cgroupfs driver: docker and containerd look alike
    return None, None, False


def _qos(segments: Sequence[str], i: int, systemd: bool) -> str | None:
    if systemd:
        seg = segments[i]
        if "-besteffort-pod" in seg:
            return "besteffort"
        if "-burstable-pod" in seg:
            return "burstable"
        return "guaranteed" if "kubepods-pod" in seg else None
    parent = segments[i - 1] if i > 0 else ""
    if parent in ("besteffort", "burstable"):
        return parent
    return "guaranteed" if parent == "kubepods" else None


def find_pod(lines: Sequence[CgroupLine]) -> PodCgroup | None:
    """The Kubernetes pod a process belongs to, from any hierarchy that shows it."""
    for line in _ordered(lines):
        segs = line.segments
        for i, seg in enumerate(segs):
            systemd = False
            m = _POD_CGROUPFS.match(seg)
            if not m:
                m = _POD_SYSTEMD.match(seg)
                systemd = m is not None
            if not m:
                continue
            uid = m.group(1).replace("_", "-")
            below = segs[i + 1] if i + 1 < len(segs) else ""
            cid, runtime, conmon = _container(below)
            return PodCgroup(uid, cid, runtime, _qos(segs, i, systemd), conmon)
    return None


# v1: /slurm[_<node>]/uid_<uid>/job_<id>/step_<step>/task_<n>
# v2: /system.slice/[<node>_]slurmstepd.scope/job_<id>/step_<step>/{user/task_<n>,slurm}
_SLURM_ROOT = re.compile(r"^(?:slurm(?:_[^/]+)?|(?:[^/]+_)?slurmstepd\.scope)$")
_SLURM_JOB = re.compile(r"^job_(\d+)$")
_SLURM_STEP = re.compile(r"^step_(\w+)$")
_SLURM_UID = re.compile(r"^uid_(\d+)$")


def find_slurm(lines: Sequence[CgroupLine]) -> SlurmCgroup | None:
    """The Slurm job a process belongs to, from the task/cgroup plugin's v1 or v2 layout."""
    for line in _ordered(lines):
        segs = line.segments
        roots = [i for i, s in enumerate(segs) if _SLURM_ROOT.match(s)]
        if not roots:
            continue
        uid: str | None = None
        for j in range(roots[0] + 1, len(segs)):
            mu = _SLURM_UID.match(segs[j])
            if mu:
                uid = mu.group(1)
                continue
            mj = _SLURM_JOB.match(segs[j])
            if mj:
                ms = _SLURM_STEP.match(segs[j + 1]) if j + 1 < len(segs) else None
                return SlurmCgroup(mj.group(1), ms.group(1) if ms else None, uid)
            break  # only uid_<n> may sit between the Slurm root and job_<id>
    return None


# Units that hold processes without making them a job: login sessions, the user manager, terminal
# tabs, and the daemons that start jobs (a shell under sshd.service in a container without
# pam_systemd, Slurm's stepd, the container runtimes). Matched with fnmatch against the unit name.
DEFAULT_SYSTEMD_IGNORE: tuple[str, ...] = (
    "init.scope",
    "session-*.scope",
    "user@*.service",
    "user-runtime-dir@*.service",
    "vte-spawn-*.scope",
    "tmux-spawn-*.scope",
    "sshd.service",
    "ssh.service",
    "sshd@*.service",
    "cron.service",
    "crond.service",
    "getty@*.service",
    "serial-getty@*.service",
    "containerd.service",
    "docker.service",
    "crio.service",
    "kubelet.service",
    "slurmd.service",
    "*slurmstepd.scope",
)
_UNIT = re.compile(r"^[^/]+\.(service|scope)$")


@dataclass(frozen=True)
class SystemdUnit:
    """A systemd service or scope, and which manager runs it."""

    unit: str  # full unit name, "finetune.service"
    user_uid: str | None  # "1000" for a unit of user@1000.service, None for the system manager


_USER_MANAGER = re.compile(r"^user@(\d+)\.service$")


def find_systemd_unit(
    lines: Sequence[CgroupLine], ignore: Iterable[str] = DEFAULT_SYSTEMD_IGNORE
) -> SystemdUnit | None:
    """The systemd service or scope a process runs in, under system.slice or user.slice.

    The deepest ``.service``/``.scope`` segment decides; when it matches ``ignore`` the process
    has no unit (we do not climb to an enclosing unit, which would be the user manager or a
    daemon, not a job). Reads the unified line, else the v1 ``name=systemd`` hierarchy.
    """
    patterns = tuple(ignore)
    line = next((ln for ln in lines if ln.unified), None)
    if line is None:
        line = next((ln for ln in lines if "name=systemd" in ln.controllers), None)
    if line is None:
        return None
    segs = line.segments
    if not segs or segs[0] not in ("system.slice", "user.slice"):
        return None
    for i in range(len(segs) - 1, -1, -1):
        seg = segs[i]
        if not _UNIT.match(seg):
            continue
        if any(fnmatch.fnmatchcase(seg, p) for p in patterns):
            return None
        manager = next((m for m in map(_USER_MANAGER.match, segs[:i]) if m), None)
        return SystemdUnit(seg, manager.group(1) if manager else None)
    return None


_UNSAFE = re.compile(r"[^A-Za-z0-9._:/@+=~-]+")
MAX_LABEL_CHARS = 128


def sanitize_label(value: str, max_chars: int = MAX_LABEL_CHARS) -> str:
    """Make ``value`` a bounded, safe Prometheus label value; "" when nothing usable is left.

    Runs of characters outside ``[A-Za-z0-9._:/@+=~-]`` become one ``_``; a value longer than
    ``max_chars`` keeps its head and ends in ``~`` plus 8 hex digits of its SHA-256, so two long
    ids that share a prefix stay distinct.
    """
    cleaned = _UNSAFE.sub("_", value.strip()).strip("_")
    if len(cleaned) <= max_chars:
        return cleaned
    digest = hashlib.sha256(value.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return cleaned[: max_chars - 9] + "~" + digest


def bounded_text(value: str, max_chars: int = 256) -> str:
    """A detail value without control characters, cut to ``max_chars``."""
    return "".join(ch if ch.isprintable() else "?" for ch in value[:max_chars])



def parse_status(text: str) -> tuple[int | None, frozenset[int]]:
    """(effective uid, every gid) of a /proc/<pid>/status text: the ``Uid:`` line's second
    field, and the ``Gid:`` and ``Groups:`` (supplementary) gids; (None, {}) when absent."""
    uid: int | None = None
    gids: set[int] = set()
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name == "Uid":
            fields = rest.split()
            if len(fields) >= 2 and fields[1].isdigit():
                uid = int(fields[1])
        elif name in ("Gid", "Groups"):
            gids.update(int(x) for x in rest.split() if x.isdigit())
    return uid, frozenset(gids)
