"""One job as the registry holds it in memory: owner, attached processes, analytic figures."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from gpuflops.jobs.protocol import PER_RANK_FIELDS
from gpuflops.jobs.records import JobSnapshot, KnownJob


@dataclass
class LiveJob:
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
    owner_gid: int | None = None  # the program policy's job group: its members write too
    active_s: float = 0.0  # monotonic time of the last message (idle jobs leave memory)

    @classmethod
    def restored(cls, known: KnownJob) -> LiveJob:
        return cls(known.job_id, known.program_id, known.owner_uid, known.registered_s,
                   metadata=dict(known.metadata), participants=dict(known.participants),
                   last_seq=dict(known.clients), analytic_flops=known.analytic_flops,
                   analytic_tokens=known.analytic_tokens, recompute_flops=known.recompute_flops,
                   state="open" if known.ended_s is None else "ended", ended_s=known.ended_s,
                   owner_gid=known.owner_gid)

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

    def merge_metadata(self, metadata: Mapping[str, Any]) -> tuple[str, ...]:
        """Merge a registration's fields: the first value wins; disagreements are returned."""
        job = self
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
