"""Programs across the fleet, from the central store: totals, the audit report, decisions.

A program's figures are the sums, over every node ledger that ever shipped records of it
(nodes that no longer exist included), of each node's job totals; sums across ledgers use
``math.fsum`` (exactly rounded, so independent of order). Its definition is the latest signed
``program`` record of its journal, else the configuration file. The report document is the
local report's (docs/report-schema.md) with ``source.kind = "central"`` and a ``fleet``
section: per-node coverage, gaps and shipping state, the definition's history, decisions.
"""

from __future__ import annotations

import datetime as dt
import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gpuflops.compliance.accuracy import accuracy_for
from gpuflops.compliance.journal import ProgramJournal, check_journal, journal_rows, to_programs_config
from gpuflops.compliance.programs import UNATTRIBUTED, attempts, evaluate_program, merge_metadata
from gpuflops.compliance.reconcile import JobInput
from gpuflops.compliance.report import (
    REPORT_SCHEMA_VERSION,
    counter_sources,
    decision,
    figures,
    flag_evidence,
    threshold_evidence,
)
from gpuflops.compliance.thresholds import ProgramsConfig, ProgramStatus
from gpuflops.ledger.central_read import CentralJobRow, CentralReader, LedgerRow, Point, interpolate
from gpuflops.ledger.records import JobEventRecord
from gpuflops.ledger.rollup import rollup_signing_message
from gpuflops.ledger.signing import verify_signature

SILENT_AFTER_S = 3600.0  # a ledger that has shipped nothing for this long is listed as silent


def _iso(t_s: float | None) -> str | None:
    return None if t_s is None else dt.datetime.fromtimestamp(t_s, dt.UTC).isoformat()


@dataclass(frozen=True)
class FleetProgram:
    """Everything the central store knows of one program, evaluated."""

    program: str
    status: ProgramStatus
    rows: tuple[CentralJobRow, ...]
    inputs: tuple[JobInput, ...]
    events: tuple[tuple[str, JobEventRecord], ...]
    journal: ProgramJournal
    config: ProgramsConfig
    config_source: str
    ledgers: Mapping[str, LedgerRow]


def job_inputs(reader: CentralReader, rows: Sequence[CentralJobRow],
               metadata: Mapping[tuple[str, str], Mapping[str, Any]],
               matched: bool = True) -> list[JobInput]:
    """One JobInput per job, summed over the ledgers it ran on.

    With ``matched``, measured FLOPs inside each ledger's estimate window are interpolated from
    the shipped rollups (docs/fleet.md); without, reconciliation uses whole-job totals.
    """
    points = {}
    if matched:
        for program in sorted({r.program for r in rows}):
            points.update(reader.window_points(program))
    by_job: dict[tuple[str, str], list[CentralJobRow]] = {}
    for r in rows:
        if r.program != UNATTRIBUTED:
            by_job.setdefault((r.job, r.program), []).append(r)
    out = []
    for (job, program), rs in sorted(by_job.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        windows = [r for r in rs if r.estimate_t0_s is not None and r.estimate_t1_s is not None]
        inside = None
        if matched and windows:
            inside = math.fsum(_inside(r, points.get((r.ledger_id, r.job))) for r in windows)
        out.append(JobInput(
            job=job, program=program, measured_flops=math.fsum(r.measured_flops for r in rs),
            analytic_flops=math.fsum(r.analytic_flops for r in rs),
            recompute_flops=math.fsum(r.recompute_flops for r in rs),
            tokens=math.fsum(r.tokens for r in rs), matched_measured_flops=inside,
            metadata=metadata.get((job, program), {}),
            hmma_flops=math.fsum(r.hmma_flops for r in rs), half_rate_fraction=_half_rate(rs)))
    return out


def _half_rate(rows: Sequence[CentralJobRow]) -> float | None:
    """One job's half-rate claim over the ledgers it ran on.

    Where every ledger claimed the same fraction (a job on one node always), that claim: the
    job then reconciles exactly as on its node. Otherwise the fraction that takes off the
    summed HMMA FLOPs what each ledger's own claim takes off its own (hmma x f / (1 + f),
    reconcile.py), a ledger without a claim taking off nothing; without HMMA FLOPs, where the
    claim changes nothing, the largest.
    """
    claims = [r.half_rate_fraction for r in rows if r.half_rate_fraction is not None]
    if not claims:
        return None
    if len(claims) == len(rows) and len(set(claims)) == 1:
        return claims[0]
    hmma = math.fsum(r.hmma_flops for r in rows)
    if hmma <= 0:
        return max(claims)
    share = math.fsum(r.hmma_flops * f / (1.0 + f) for r in rows
                      if (f := r.half_rate_fraction) is not None) / hmma
    return share / (1.0 - share)


def _inside(r: CentralJobRow, pts: tuple[Point, ...] | None) -> float:
    """Measured FLOPs of one ledger's job inside its estimate window (interpolated)."""
    if pts is None or r.estimate_t0_s is None or r.estimate_t1_s is None:
        return r.measured_flops
    at0 = interpolate(pts[0], pts[1], r.estimate_t0_s, r.first_t_s)
    at1 = interpolate(pts[2], pts[3], r.estimate_t1_s, r.first_t_s)
    return max(0.0, min(r.measured_flops, at1) - at0)


def load_program(reader: CentralReader, program: str, *, fallback: ProgramsConfig,
                 pins: Mapping[str, bytes] | None = None, matched: bool = True) -> FleetProgram:
    """Evaluate ``program`` from the central store (raises CentralError, ProgramConfigError)."""
    journal = check_journal(program, journal_rows(reader.store.journal(program)).get(program, []),
                            reader.store.signers(), pins)
    definition = journal.definition
    if definition is not None:
        config = to_programs_config(program, definition, fallback)
        rec = journal.definitions[-1]
        source = f"central journal record {rec.seq} by {rec.signer}"
    else:
        config = fallback
        source = ("configuration file" if program in fallback.programs
                  else "defaults (no definition recorded)")
    ledgers = reader.ledgers()
    events = reader.events(program)
    # Where a registration does not name its node, the ledger's node is where it ran.
    evs = [(lid, ev if ev.payload.get("node") else JobEventRecord(
        ev.seq, ev.kind, ev.job, ev.program, ev.t_s,
        {**ev.payload, "node": ledgers[lid].node if lid in ledgers else "?"}))
           for lid, ev in events]
    plain = [ev for _lid, ev in evs]
    rows = reader.program_jobs(program)
    inputs = job_inputs(reader, rows, merge_metadata(plain), matched)
    status = evaluate_program(program, inputs, config, [a.metadata for a in attempts(plain)])
    return FleetProgram(program, status, tuple(rows), tuple(inputs), tuple(evs), journal, config,
                        source, ledgers)


def _node_entries(fp: FleetProgram, reader: CentralReader, now_s: float
                  ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    nodes, all_gaps = [], []
    for lid in sorted({r.ledger_id for r in fp.rows}, key=lambda x: (
            fp.ledgers[x].cluster, fp.ledgers[x].node, x) if x in fp.ledgers else ("", "", x)):
        led = fp.ledgers.get(lid)
        rs = [r for r in fp.rows if r.ledger_id == lid]
        firsts = [r.first_t_s for r in rs if r.first_t_s is not None]
        lasts = [r.last_t_s for r in rs if r.last_t_s is not None]
        t0, t1 = (min(firsts), max(lasts)) if firsts and lasts else (None, None)
        gaps = reader.gaps(lid, t0, t1) if t0 is not None and t1 is not None else []
        unmeasured: dict[str, float] = {}
        for g in gaps:
            unmeasured[g.reason] = unmeasured.get(g.reason, 0.0) + g.duration_s
            all_gaps.append({"node": led.node if led else lid, "gpu": g.gpu, "uuid": g.uuid,
                             "from": _iso(g.t0_s), "to": _iso(g.t1_s),
                             "seconds": g.duration_s, "reason": g.reason})
        signed = False
        if led is not None and led.head_seq > 0:
            rec = reader.head_record(lid, led.head_seq)
            signed = rec is not None and verify_signature(
                led.public_key, rollup_signing_message(rec[0]), rec[1])
        silent = led is None or led.ingested_at_s is None or now_s - led.ingested_at_s > SILENT_AFTER_S
        nodes.append({
            "node": led.node if led else "?", "cluster": led.cluster if led else "?",
            "ledger_id": lid, "jobs": sorted({r.job for r in rs}),
            "measured_flops": math.fsum(r.measured_flops for r in rs if r.program != UNATTRIBUTED),
            "from": _iso(t0), "to": _iso(t1),
            "shipped_through_seq": led.raw_seq if led else 0,
            "shipped_through_at": _iso(led.raw_t_s) if led else None,
            "last_ingest_at": _iso(led.ingested_at_s) if led else None,
            "silent": silent, "fenced": led.failed if led else None,
            "head_signature_verified": signed,
            "gaps": len(gaps), "unmeasured_seconds": unmeasured,
        })
    return nodes, all_gaps


def _series(reader: CentralReader, program: str, total: float, max_points: int = 500
            ) -> list[dict[str, float]]:
    hours = reader.program_hours(program)
    stride = max(1, math.ceil(len(hours) / max_points))
    out, cum = [], 0.0
    for i, (hour, v) in enumerate(hours):
        cum += v
        if i % stride == 0 or i == len(hours) - 1:
            out.append({"t_s": float((hour + 1) * 3600), "cumulative_flops": cum})
    if out:
        out[-1]["cumulative_flops"] = total  # the exact total; hourly sums are for the chart
    return out


def build_central_report(fp: FleetProgram, reader: CentralReader, *, now_s: float,
                         source: Mapping[str, str], accuracy: Mapping[str, str] | None = None
                         ) -> dict[str, Any]:
    """The audit report document of a program across the fleet (report_schema.json).

    Its shared sections are built by report.py, as for a node's report. Without ``accuracy``,
    the figures of the GPU models the shipped daemon starts of the program's ledgers recorded.
    """
    st = fp.status
    events = [ev for _l, ev in fp.events]
    nodes, gaps = _node_entries(fp, reader, now_s)
    decisions = fp.journal.decisions
    by_reason: dict[str, float] = {}
    for g in gaps:
        by_reason[g["reason"]] = by_reason.get(g["reason"], 0.0) + g["seconds"]
    spans = [(n["from"], n["to"]) for n in nodes if n["from"]]
    evidence = [
        *threshold_evidence(st),
        f"central store: {len(nodes)} node ledgers in clusters "
        f"{', '.join(sorted({n['cluster'] for n in nodes})) or 'none'} hold the program's records; "
        f"program definition from {fp.config_source}",
        "journal: " + ("verified" if fp.journal.fault is None else
                       f"VERIFY FAILED at record {fp.journal.fault.seq}: {fp.journal.fault.reason}"),
        *flag_evidence(st),
    ]
    evidence += [f"recorded decision #{d.seq}: {d.outcome} by {d.by} at {_iso(d.t_s)}"
                 + (f" ({d.note})" if d.note else "") for d in decisions]
    evidence += [f"node {n['node']} ({n['cluster']}) is fenced: {n['fenced']}" for n in nodes
                 if n["fenced"]]
    if gaps:
        evidence.append(f"{len(gaps)} spans of unmeasured time on the program's nodes: "
                        + ", ".join(f"{r} {v:.1f} s" for r, v in sorted(by_reason.items())))
    starts = [p for _t, p in reader.session_starts(sorted({r.ledger_id for r in fp.rows}))]
    if accuracy is None:
        accuracy = accuracy_for(m for p in starts for m in p.get("gpu_models", ()))
    return {
        "schema_version": REPORT_SCHEMA_VERSION, "program": fp.program,
        "generated_at": _iso(now_s), "generated_at_s": now_s,
        "source": {"kind": "central", "central": dict(source), "queries": []},
        **figures(st, fp.inputs, merge_metadata(events), attempts(events),
                  fp.config.for_program(fp.program), counter_sources=counter_sources(starts),
                  accuracy=accuracy, assumptions=[
                      "Central figures: each node's job totals as shipped (bit-identical to its "
                      "ledger); measured FLOPs inside an estimate window are interpolated "
                      "between shipped rollups (docs/fleet.md)."]),
        "series": _series(reader, fp.program, st.flops_by_basis["measured"]),
        "decision": decision(st, evidence),
        "coverage": {
            "scope": "every node ledger in the central store that ran the program",
            "from": min((a for a, _ in spans), default=None),
            "to": max((b for _, b in spans), default=None),
            "gaps": gaps, "unmeasured_seconds": by_reason,
        },
        "ledger": None,
        "fleet": {
            "nodes": nodes,
            "clusters": sorted({n["cluster"] for n in nodes}),
            "definition": {
                "source": fp.config_source, "current": fp.journal.definition,
                "history": [{"seq": r.seq, "by": r.signer, "at": _iso(float(r.obj["t_s"])),
                             "recorded_by": r.recorded_by, "note": r.obj.get("note", ""),
                             "definition": r.obj["definition"]} for r in fp.journal.definitions],
            },
            "decisions": [{"seq": d.seq, "outcome": d.outcome, "by": d.by, "at": _iso(d.t_s),
                           "note": d.note, "up_to_ratio": d.up_to_ratio,
                           "evidence": dict(d.evidence)} for d in decisions],
            "journal_verified": fp.journal.fault is None,
            "journal_fault": None if fp.journal.fault is None else
            f"record {fp.journal.fault.seq}: {fp.journal.fault.reason}",
        },
    }


def render_fleet_html(page: str, report: Mapping[str, Any]) -> str:
    """Add the fleet sections to the local report's page (before its Method section)."""
    e = html.escape
    fleet = report["fleet"]

    def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
        head = "".join(f"<th>{e(h)}</th>" for h in headers)
        body = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    nodes = table(
        ["cluster", "node", "ledger", "jobs", "measured", "from", "to", "shipped through",
         "last ingest", "state", "unmeasured s"],
        [[n["cluster"], n["node"], n["ledger_id"][:8], ", ".join(n["jobs"]),
          f"{n['measured_flops']:.3e}", n["from"] or "—", n["to"] or "—",
          f"seq {n['shipped_through_seq']} ({n['shipped_through_at'] or '—'})",
          n["last_ingest_at"] or "—",
          "FENCED: " + n["fenced"] if n["fenced"] else ("silent" if n["silent"] else "shipping"),
          f"{sum(n['unmeasured_seconds'].values()):.1f}"] for n in fleet["nodes"]])
    hist = table(["#", "by", "at", "note", "definition"],
                 [[h["seq"], h["by"], h["at"], h["note"], str(h["definition"])]
                  for h in fleet["definition"]["history"]])
    dec = table(["#", "outcome", "by", "at", "up to", "note"],
                [[d["seq"], d["outcome"], d["by"], d["at"],
                  "—" if d["up_to_ratio"] is None else f"{d['up_to_ratio']:.0%}", d["note"]]
                 for d in fleet["decisions"]])
    section = (f"<h2>Nodes and clusters (central store)</h2>{nodes}"
               f"<h2>Program definition</h2><p>In force: {e(fleet['definition']['source'])}.</p>{hist}"
               f"<h2>Recorded decisions</h2>{dec}<p>Journal "
               + ("verified" if fleet["journal_verified"] else "FAILED: " + e(str(fleet["journal_fault"])))
               + ".</p>\n")
    return page.replace("<h2>Method</h2>", section + "<h2>Method</h2>", 1)
