"""Who may register jobs into a program, and who defines it: the node's program policy first,
else the program's first registrant, remembered across restarts through the ledger.

A program's *facts* (``PROGRAM_FACTS``: the base model's compute and whether it carries
systemic risk) choose its threshold rule, so only those who define the program set them, and
once set they do not change over the socket (the programs file, which root edits, overrides
them). docs/protocol.md, "Authorization", is the prose version of this module.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from gpuflops.jobs.protocol import PROGRAM_FACTS, ErrorCode, ProtocolError
from gpuflops.jobs.records import JobHistory, ProgramAccess

_MAX_PROGRAMS = 100_000  # programs remembered in memory; older ones are read from the ledger
_OPEN = ProgramAccess()


class Role(Enum):
    """What a uid may do to a program."""

    DEFINE = "define"  # register jobs and set the program's facts
    REGISTER = "register"  # register jobs


@dataclass
class _Program:
    uid: int
    facts: dict[str, Any] = field(default_factory=dict)


class ProgramTable:
    """Program owners and facts of this session, backed by the ledger's (``history``)."""

    def __init__(self, history: JobHistory | None,
                 access: Callable[[str], ProgramAccess] | None) -> None:
        self._history = history
        self._access = access or (lambda _program: _OPEN)
        self._programs: dict[str, _Program] = {}
        self._lock = threading.Lock()

    def _get(self, program: str) -> _Program | None:
        with self._lock:
            entry = self._programs.get(program)
        if entry is None and self._history is not None:
            owner = self._history.program_owner(program)
            if owner is not None:
                entry = _Program(owner.uid, dict(owner.facts))
                with self._lock:
                    entry = self._programs.setdefault(program, entry)
        return entry

    def role(self, program: str, uid: int | None, groups: Callable[[], Iterable[int]]) -> Role | None:
        """What ``uid`` may do to ``program``; None: nothing. Root may do everything."""
        if uid == 0:
            return Role.DEFINE
        if uid is None:
            return None
        access = self._access(program)
        if uid in access.owners:
            return Role.DEFINE
        if not access.owners:
            entry = self._get(program)
            if entry is None and access.first_registrant_owns:
                return Role.DEFINE  # registering makes it the owner
            if entry is not None and entry.uid == uid and access.first_registrant_owns:
                return Role.DEFINE
        if uid in access.users or (access.groups and access.groups & frozenset(groups())):
            return Role.REGISTER
        return None

    def restricted(self, program: str) -> bool:
        """Whether anyone owns the program or the policy names who may use it."""
        access = self._access(program)
        return bool(access.owners or access.users or access.groups
                    or not access.first_registrant_owns or self._get(program) is not None)

    def job_group(self, program: str) -> int | None:
        return self._access(program).job_group

    def check_facts(self, program: str, role: Role, metadata: Mapping[str, Any]) -> None:
        """Refuse facts from a uid that does not define the program, or that change them."""
        given = {k: metadata[k] for k in PROGRAM_FACTS if k in metadata}
        if not given:
            return
        if role is not Role.DEFINE:
            raise ProtocolError(
                ErrorCode.FORBIDDEN,
                f"only the owner of program {program!r} (or the node's program policy) sets "
                f"{', '.join(sorted(given))}")
        entry = self._get(program)
        known = entry.facts if entry is not None else {}
        changed = sorted(k for k, v in given.items() if k in known and known[k] != v)
        if changed:
            raise ProtocolError(
                ErrorCode.CONFLICT,
                f"program {program!r} already has "
                + ", ".join(f"{k}={known[k]!r}" for k in changed)
                + "; facts set over the socket do not change (the programs file overrides them)")

    def record(self, program: str, uid: int, metadata: Mapping[str, Any]) -> None:
        """A registration was applied: the first registrant owns the program, facts merge."""
        entry = self._get(program)
        with self._lock:
            if entry is None:
                if len(self._programs) >= _MAX_PROGRAMS:
                    self._programs.pop(next(iter(self._programs)))
                entry = self._programs.setdefault(program, _Program(uid))
            for k in PROGRAM_FACTS:
                if k in metadata:
                    entry.facts.setdefault(k, metadata[k])

    def owner(self, program: str) -> int | None:
        entry = self._get(program)
        return None if entry is None else entry.uid
