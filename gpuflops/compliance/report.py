"""The audit report of one program: JSON (report_schema.json) and a self-contained HTML page.

Totals come from the local ledger, or with a Prometheus URL from Prometheus (all nodes). Job
metadata, attempts and the chain head always come from the local ledger. The HTML page is
rendered by html.py, the Prometheus queries are in prometheus.py.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from gpuflops.compliance.accuracy import accuracy_for
from gpuflops.compliance.programs import Attempt, attempts, evaluate_program, job_inputs, merge_metadata
from gpuflops.compliance.prometheus import PrometheusSource
from gpuflops.compliance.reconcile import JobInput
from gpuflops.compliance.thresholds import ProgramConfig, ProgramsConfig, ProgramStatus
from gpuflops.ledger.store import Ledger

REPORT_SCHEMA_VERSION = 3
SCHEMA_PATH = Path(__file__).with_name("report_schema.json")
ACCURACY_DOC = "docs/accuracy.md"

ASSUMPTIONS = (
    "Measured FLOPs: with CUPTI PM counters (counter source cupti_pm), tensor FLOPs are the "
    "tensor pipes' busy cycles x the full-rate path's FLOPs per cycle, and FP-pipe FLOPs are "
    "their activity (NVML GPM) x SM count x peak FLOPs/clock/SM x the SMs' own elapsed cycles; "
    "with the nvml source, every pipe is activity x SM count x peak rate x NVML's reported SM "
    "clock, which reads high under load. The counters cannot tell tensor precisions apart.",
    "The hardware figure is the measured one less what a job's kernel census says half-rate "
    "tensor kernels added, bounded at half the tensor counts.",
    "Measured FLOPs include everything the GPUs executed for the job: activation "
    "recomputation, evaluation and any other work; analytic FLOPs are what the job's "
    "estimate reported (including its recomputation term when it reported one).",
    "Work no job claimed is kept as program 'unattributed' and is not counted here.",
    "Reconciliation compares measured FLOPs inside the span the estimates cover with the "
    "estimates; with a Prometheus source it compares whole-job totals.",
)

def _iso(t_s: float) -> str:
    return dt.datetime.fromtimestamp(t_s, dt.UTC).isoformat()


def _jsonable(value: Any) -> Any:
    """Metadata as JSON (it already is: it came through canonical JSON); floats stay finite."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


DEMO_NOTICE = ("DEMO DATA: this ledger holds replayed traces, not a measurement of real work; "
               "no compliance decision may rest on it")


class ReportRefusedError(ValueError):
    """The report would state an outcome it cannot support: the message says why."""


def build_report(program: str, *, ledger: Ledger | None, config: ProgramsConfig,
                 now_s: float, state_dir: Path | None = None,
                 prometheus: PrometheusSource | None = None,
                 accuracy: Mapping[str, str] | None = None,
                 allow_demo: bool = False) -> dict[str, Any]:
    """The report document (validates against report_schema.json).

    Refuses (ReportRefusedError) rather than give an outcome for a program no job ever
    reported, a ledger that fails verification, or replayed data (unless ``allow_demo``, and
    then the document says so)."""
    check = ledger.verify() if ledger is not None else None
    if check is not None and not check.ok:
        where = f" at record {check.first_bad_id}" if check.first_bad_id is not None else ""
        raise ReportRefusedError(f"the ledger fails verification{where}: {check.reason}; no "
                                 "outcome is given from a ledger that does not verify")
    replays = sum(1 for _t, p in (ledger.session_starts() if ledger is not None else [])
                  if p.get("backend") == "replay")
    if replays and not allow_demo:
        raise ReportRefusedError(f"the ledger holds replayed (demo) data from {replays} daemon "
                                 "sessions; pass --allow-demo to report on it anyway (every "
                                 "page then says it is demo data)")
    events = ledger.job_events(program) if ledger is not None else []
    meta = merge_metadata(events)
    att: list[Attempt] = attempts(events)
    if prometheus is not None:
        start = min([a.first_t_s for a in att] + [now_s - 86400.0])
        inputs = prometheus.job_inputs(program, meta, start, now_s)
        series = prometheus.series(program, start, now_s)
        source: dict[str, Any] = {"kind": "prometheus", "prometheus_url": prometheus.base_url,
                                  "queries": list(prometheus.queries)}
    elif ledger is not None:
        inputs = job_inputs(ledger, ledger.totals(), events, program)
        series = ledger.program_series(program)
        source = {"kind": "ledger", "queries": []}
    else:
        raise ValueError("a report needs a ledger, a Prometheus source, or both")
    known = bool(events) or any(i.program == program for i in inputs)
    if not known:
        raise ReportRefusedError(f"no job of program {program!r} is in the "
                                 f"{'ledger' if prometheus is None else 'ledger or Prometheus'}:"
                                 " no outcome for a program that does not exist (check its name)")
    if state_dir is not None:
        source["state_dir"] = str(state_dir)
    status: ProgramStatus = evaluate_program(program, inputs, config,
                                             [a.metadata for a in att])
    coverage = _coverage(ledger, program) if ledger is not None else None
    evidence = [
        *threshold_evidence(status),
        ("no local ledger" if check is None else
         f"ledger chain head seq {check.head_seq} hash {check.head_hash}: "
         + ("verified" if check.ok else f"VERIFY FAILED: {check.reason}")),
        *flag_evidence(status),
    ]
    if coverage is not None and coverage["gaps"]:
        evidence.append(
            f"{len(coverage['gaps'])} spans of unmeasured time on this node during the program: "
            + ", ".join(f"{r} {v:.1f} s" for r, v in sorted(coverage["unmeasured_seconds"].items())))
    starts = [p for _t, p in ledger.session_starts()] if ledger is not None else []
    if accuracy is None and ledger is not None:  # the figures of the GPUs the node recorded
        accuracy = accuracy_for(m for p in starts for m in p.get("gpu_models", ()))
    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "demo": {"replay_sessions": replays, "notice": DEMO_NOTICE} if replays else None,
        "program": program,
        "generated_at": _iso(now_s),
        "generated_at_s": now_s,
        "source": source,
        **figures(status, inputs, meta, att, config.for_program(program),
                  counter_sources=counter_sources(starts), accuracy=accuracy),
        "series": [{"t_s": t, "cumulative_flops": v} for t, v in series],
        "decision": decision(status, evidence),
        "coverage": coverage,
        "ledger": None if ledger is None or check is None else {
            "path": str(ledger.path), "head_seq": check.head_seq, "head_hash": check.head_hash,
            "records": check.records, "verified": check.ok, "verify_reason": check.reason,
        },
    }


# -- the sections a node's report and a fleet report (fleet.py) share --------------------------


def counter_sources(session_starts: Iterable[Mapping[str, Any]]) -> list[str]:
    """The cycle-counter sources named by daemon starts (a start naming none predates the
    choice, and read NVML)."""
    return sorted({str(p.get("counters", "nvml")) for p in session_starts})


def threshold_evidence(status: ProgramStatus) -> list[str]:
    """The decision's first evidence: the figure counted, under which policy, against what."""
    th = status.threshold
    return [
        f"{status.flops_by_basis['compliance']:.6e} FLOPs counted under the policy: "
        f"{status.policy.describe()}",
        f"threshold {th.flops:.6e} FLOPs under rule {th.rule} ({th.description})"
        + (f"; base model compute {th.base_model_compute_flops:.6e} FLOPs, source: "
           f"{th.base_model_compute_source or 'not stated'}" if th.base_model_compute_flops
           else ""),
    ]


def flag_evidence(status: ProgramStatus) -> list[str]:
    """One evidence line per job with findings a human must look at."""
    return [f"job {j.job}: " + "; ".join(f.message for f in j.findings if f.flag)
            for j in status.jobs if j.flagged]


def decision(status: ProgramStatus, evidence: Sequence[str]) -> dict[str, Any]:
    return {"outcome": status.decision, "rule": status.threshold.rule,
            "reason": status.decision_reason, "evidence": list(evidence)}


def figures(status: ProgramStatus, inputs: Sequence[JobInput],
            meta: Mapping[tuple[str, str], Mapping[str, Any]], att: Sequence[Attempt],
            cfg: ProgramConfig, *, counter_sources: Sequence[str],
            accuracy: Mapping[str, str] | None,
            assumptions: Sequence[str] = ()) -> dict[str, Any]:
    """The report's totals, threshold, jobs, attempts and method sections (report_schema.json).

    ``assumptions`` are added to the shared ones; ``accuracy`` None or empty: not provided.
    """
    th = status.threshold
    uncertainties = [{"name": k, "value": v, "source": ACCURACY_DOC}
                     for k, v in sorted((accuracy or {}).items())]
    if not uncertainties:
        uncertainties = [{"name": "measurement error", "value": "not provided",
                          "source": ACCURACY_DOC}]
    return {
        "totals": {
            "measured_flops": status.flops_by_basis["measured"],
            "analytic_flops": status.flops_by_basis["analytic"],
            "compliance_flops": status.flops_by_basis["compliance"],
            "hardware_flops": sum(j.hardware_flops for j in status.jobs),
            "compliance_band": status.band,
            "recompute_flops": sum(j.recompute_flops for j in status.jobs),
            "tokens": sum(i.tokens for i in inputs),
        },
        "threshold": {
            "rule": th.rule, "description": th.description, "flops": th.flops,
            "base_model_compute_flops": th.base_model_compute_flops,
            "base_model_compute_source": th.base_model_compute_source,
            "systemic_risk": th.systemic_risk, "ratio": status.ratio,
            "levels": list(status.levels), "level_reached": status.level_reached,
        },
        "jobs": [{
            "job": j.job, "measured_flops": j.measured_flops, "analytic_flops": j.analytic_flops,
            "recompute_flops": j.recompute_flops,
            "analytic_without_recompute_flops": j.analytic_without_recompute_flops,
            "tokens": next((i.tokens for i in inputs if i.job == j.job), 0.0),
            "ratio": j.ratio, "divergent": j.divergent,
            "declared_precision": j.declared_precision,
            "inferred_precision": j.inferred_precision,
            "correction_factor": j.correction_factor,
            "compliance_flops": j.compliance_flops,
            "hardware_flops": j.hardware_flops,
            "half_rate_fraction": j.half_rate_fraction,
            "basis_used": j.basis_used,
            "band": j.band,
            "findings": [asdict(f) for f in j.findings],
            "metadata": _jsonable(meta.get((j.job, j.program), {})),
        } for j in status.jobs],
        "attempts": [{
            "job": a.job, "attempt": a.attempt, "resumed_from": a.resumed_from,
            "first_registered_at": _iso(a.first_t_s), "nodes": list(a.nodes), "ranks": a.ranks,
            "metadata": _jsonable(a.metadata),
        } for a in att],
        "method": {
            "assumed_precision": cfg.assumed_precision,
            "tolerance": cfg.tolerance,
            "policy": asdict(cfg.policy),
            "policy_description": cfg.policy.describe(),
            "counter_sources": list(counter_sources),
            "assumptions": [*ASSUMPTIONS, *assumptions],
            "uncertainties": uncertainties,
        },
    }


def _coverage(ledger: Ledger, program: str) -> dict[str, Any]:
    """Unmeasured time this node's ledger recorded during the program's span."""
    spans = [(t.first_t_s, t.last_t_s) for k, t in ledger.totals().jobs.items()
             if k.program == program and t.first_t_s is not None and t.last_t_s is not None]
    if not spans:
        return {"scope": "this node's ledger", "from": None, "to": None, "gaps": [],
                "unmeasured_seconds": {}}
    t0 = min(a for a, _ in spans)
    t1 = max(b for _, b in spans)
    gaps = ledger.gaps(t0, t1)
    by_reason: dict[str, float] = {}
    for g in gaps:
        by_reason[g.reason] = by_reason.get(g.reason, 0.0) + g.duration_s
    return {
        "scope": "this node's ledger",
        "from": _iso(t0), "to": _iso(t1),
        "gaps": [{"gpu": g.gpu, "uuid": g.uuid, "from": _iso(g.t0_s), "to": _iso(g.t1_s),
                  "seconds": g.duration_s, "reason": g.reason} for g in gaps],
        "unmeasured_seconds": by_reason,
    }
