"""The node's program policy: the ``access`` tables of the programs file, as the job socket's
registry applies them (``jobs.records.ProgramAccess``; docs/protocol.md, "Authorization").

```toml
[defaults.access]
first_registrant_owns = true   # a program no owner is listed for belongs to its first registrant
[programs.llama-ft.access]
owners = ["alice"]             # define the program (base model facts) and register jobs into it
users = ["bob", 1003]          # register jobs into it
groups = ["ml"]                # members register jobs into it
job_group = "ml"               # members may also write to every job of the program
```
Names are resolved when the file is read: an unknown user or group is an error, not an open door.
"""

from __future__ import annotations

import grp
import pwd
from collections.abc import Mapping
from typing import Any

from gpuflops.compliance.thresholds import ProgramConfigError, ProgramsConfig
from gpuflops.jobs.records import ProgramAccess

ACCESS_KEYS = frozenset({"owners", "users", "groups", "job_group", "first_registrant_owns"})


def _uid(where: str, name: object) -> int:
    if isinstance(name, int) and not isinstance(name, bool) and name >= 0:
        return name
    if isinstance(name, str):
        try:
            return pwd.getpwnam(name).pw_uid
        except KeyError:
            pass
    raise ProgramConfigError(f"{where}: no user {name!r} on this node")


def _gid(where: str, name: object) -> int:
    if isinstance(name, int) and not isinstance(name, bool) and name >= 0:
        return name
    if isinstance(name, str):
        try:
            return grp.getgrnam(name).gr_gid
        except KeyError:
            pass
    raise ProgramConfigError(f"{where}: no group {name!r} on this node")


def _table(where: str, value: object) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ProgramConfigError(f"{where} must be a table")
    unknown = set(value) - ACCESS_KEYS
    if unknown:
        raise ProgramConfigError(f"{where}: unknown keys {sorted(unknown)}")
    return value


def _names(where: str, value: object) -> list[object]:
    if not isinstance(value, list):
        raise ProgramConfigError(f"{where} must be a list of names or ids")
    return value


def program_access(config: ProgramsConfig, program: str) -> ProgramAccess:
    """The access rules for ``program``: its own table over ``[defaults.access]``."""
    merged = {**_table("[defaults.access]", config.defaults.get("access", {})),
              **_table(f"[programs.{program}.access]",
                       config.programs.get(program, {}).get("access", {}))}
    where = f"program {program!r} access"
    first = merged.get("first_registrant_owns", True)
    if not isinstance(first, bool):
        raise ProgramConfigError(f"{where}: first_registrant_owns must be true or false")
    group = merged.get("job_group")
    return ProgramAccess(
        owners=frozenset(_uid(where, n) for n in _names(f"{where} owners", merged.get("owners", []))),
        users=frozenset(_uid(where, n) for n in _names(f"{where} users", merged.get("users", []))),
        groups=frozenset(_gid(where, n) for n in _names(f"{where} groups",
                                                        merged.get("groups", []))),
        job_group=None if group is None else _gid(where, group),
        first_registrant_owns=first,
    )


def check_access(config: ProgramsConfig) -> None:
    """Resolve every access table now; ProgramConfigError names the first bad entry."""
    program_access(config, "")  # the defaults alone
    for program in config.programs:
        program_access(config, program)


class AccessPolicy:
    """``program -> ProgramAccess`` for the registry, cached per program until a reload."""

    def __init__(self, config: ProgramsConfig) -> None:
        self._config = config
        self._cache: dict[str, ProgramAccess] = {}

    def __call__(self, program: str) -> ProgramAccess:
        hit = self._cache.get(program)
        if hit is None:
            if len(self._cache) >= 65_536:
                self._cache.clear()
            hit = self._cache[program] = program_access(self._config, program)
        return hit
