"""The audit report of one program: JSON (report_schema.json) and a self-contained HTML page.

Totals come from the local ledger, or with a Prometheus URL from Prometheus (all nodes). Job
metadata, attempts and the chain head always come from the local ledger.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import math
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from gpuflops.compliance.programs import Attempt, attempts, evaluate_program, job_inputs, merge_metadata
from gpuflops.compliance.reconcile import JobInput
from gpuflops.compliance.thresholds import ProgramsConfig, ProgramStatus
from gpuflops.ledger.store import Ledger

REPORT_SCHEMA_VERSION = 2
SCHEMA_PATH = Path(__file__).with_name("report_schema.json")
ACCURACY_DOC = "docs/accuracy.md"

ASSUMPTIONS = (
    "Measured FLOPs are tensor- and FP-pipe activity (NVML GPM) x SM clock x SM count x the "
    "peak FLOPs/clock/SM of the assumed precision; the counters cannot tell tensor "
    "precisions apart.",
    "Measured FLOPs include everything the GPUs executed for the job: activation "
    "recomputation, evaluation and any other work; analytic FLOPs are what the job's "
    "estimate reported (including its recomputation term when it reported one).",
    "Work no job claimed is kept as program 'unattributed' and is not counted here.",
    "Reconciliation compares measured FLOPs inside the span the estimates cover with the "
    "estimates; with a Prometheus source it compares whole-job totals.",
)


class PrometheusError(RuntimeError):
    """A Prometheus query failed; carries the URL and query."""

    def __init__(self, url: str, query: str, message: str) -> None:
        super().__init__(f"{url}: query {query!r}: {message}")
        self.url = url
        self.query = query


UrlOpen = Callable[[str, float], bytes]


def _urlopen(url: str, timeout_s: float) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:
        body: bytes = resp.read()
        return body


class PrometheusSource:
    """Cluster-wide totals from the Prometheus HTTP API (instant and range queries)."""

    def __init__(self, base_url: str, *, timeout_s: float = 30.0,
                 urlopen: UrlOpen = _urlopen) -> None:
        self.base_url = base_url.rstrip("/")
        self._timeout_s = timeout_s
        self._urlopen = urlopen
        self.queries: list[str] = []

    def _get(self, path: str, params: Mapping[str, str]) -> Any:
        url = f"{self.base_url}{path}?{urllib.parse.urlencode(params)}"
        query = params.get("query", "")
        self.queries.append(query)
        try:
            body = json.loads(self._urlopen(url, self._timeout_s))
        except (OSError, ValueError) as exc:
            raise PrometheusError(self.base_url, query, str(exc)) from exc
        if not isinstance(body, dict) or body.get("status") != "success":
            err = body.get("error") if isinstance(body, dict) else body
            raise PrometheusError(self.base_url, query, f"status not success: {err}")
        return body["data"]

    def query(self, promql: str) -> list[tuple[dict[str, str], float]]:
        """Instant vector query: [(labels, value)]."""
        data = self._get("/api/v1/query", {"query": promql})
        if data.get("resultType") != "vector":
            raise PrometheusError(self.base_url, promql,
                                  f"expected a vector, got {data.get('resultType')}")
        return [(dict(r["metric"]), float(r["value"][1])) for r in data["result"]]

    def query_range(self, promql: str, start_s: float, end_s: float,
                    step_s: float) -> list[tuple[float, float]]:
        """Range query of a single series (summed): [(t_s, value)]."""
        data = self._get("/api/v1/query_range", {
            "query": promql, "start": f"{start_s:.3f}", "end": f"{end_s:.3f}",
            "step": f"{step_s:.3f}"})
        points: dict[float, float] = {}
        for r in data.get("result", []):
            for t, v in r["values"]:
                points[float(t)] = points.get(float(t), 0.0) + float(v)
        return sorted(points.items())

    def job_inputs(self, program: str,
                   metadata: Mapping[tuple[str, str], Mapping[str, Any]]) -> list[JobInput]:
        """Per-job sums across all nodes."""
        sel = f'{{program="{_promql_escape(program)}"}}'
        cols: dict[str, dict[tuple[str, str], float]] = {}
        for name in ("measured_flops", "analytic_flops", "analytic_tokens", "recompute_flops"):
            q = f"sum by (job,program)(gpuflops_job_{name}_total{sel})"
            cols[name] = {(lab.get("job", ""), lab.get("program", "")): v
                          for lab, v in self.query(q)}
        keys = sorted(set().union(*cols.values()))
        return [JobInput(
            job=job, program=prog, measured_flops=cols["measured_flops"].get((job, prog), 0.0),
            analytic_flops=cols["analytic_flops"].get((job, prog), 0.0),
            recompute_flops=cols["recompute_flops"].get((job, prog), 0.0),
            tokens=cols["analytic_tokens"].get((job, prog), 0.0),
            metadata=metadata.get((job, prog), {})) for job, prog in keys]

    def series(self, program: str, start_s: float, end_s: float,
               max_points: int = 500) -> list[tuple[float, float]]:
        step = max(15.0, (end_s - start_s) / max_points)
        q = (f'sum(gpuflops_job_measured_flops_total{{program="{_promql_escape(program)}"}})')
        return self.query_range(q, start_s, end_s, step)


def _promql_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _iso(t_s: float) -> str:
    return dt.datetime.fromtimestamp(t_s, dt.timezone.utc).isoformat()


def _jsonable(value: Any) -> Any:
    """Metadata as JSON (it already is: it came through canonical JSON); floats stay finite."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def build_report(program: str, *, ledger: Ledger | None, config: ProgramsConfig,
                 now_s: float, state_dir: Path | None = None,
                 prometheus: PrometheusSource | None = None,
                 accuracy: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The report document (validates against report_schema.json)."""
    events = ledger.job_events(program) if ledger is not None else []
    meta = merge_metadata(events)
    att: list[Attempt] = attempts(events)
    if prometheus is not None:
        inputs = prometheus.job_inputs(program, meta)
        start = min([a.first_t_s for a in att] + [now_s - 86400.0])
        series = prometheus.series(program, start, now_s)
        source: dict[str, Any] = {"kind": "prometheus", "prometheus_url": prometheus.base_url,
                                  "queries": list(prometheus.queries)}
    elif ledger is not None:
        inputs = job_inputs(ledger, ledger.totals(), events, program)
        series = ledger.program_series(program)
        source = {"kind": "ledger", "queries": []}
    else:
        raise ValueError("a report needs a ledger, a Prometheus source, or both")
    if state_dir is not None:
        source["state_dir"] = str(state_dir)
    status: ProgramStatus = evaluate_program(program, inputs, config,
                                             [a.metadata for a in att])
    cfg = config.for_program(program)
    check = ledger.verify() if ledger is not None else None
    coverage = _coverage(ledger, program) if ledger is not None else None
    th = status.threshold
    flagged = [j for j in status.jobs if j.flagged]
    evidence = [
        f"{status.flops_by_basis['compliance']:.6e} FLOPs counted under the policy: "
        f"{status.policy.describe()}",
        f"threshold {th.flops:.6e} FLOPs under rule {th.rule} ({th.description})"
        + (f"; base model compute {th.base_model_compute_flops:.6e} FLOPs, source: "
           f"{th.base_model_compute_source or 'not stated'}" if th.base_model_compute_flops
           else ""),
        ("no local ledger" if check is None else
         f"ledger chain head seq {check.head_seq} hash {check.head_hash}: "
         + ("verified" if check.ok else f"VERIFY FAILED: {check.reason}")),
    ] + [f"job {j.job}: " + "; ".join(f.message for f in j.findings if f.flag) for j in flagged]
    if coverage is not None and coverage["gaps"]:
        evidence.append(
            f"{len(coverage['gaps'])} spans of unmeasured time on this node during the program: "
            + ", ".join(f"{r} {v:.1f} s" for r, v in sorted(coverage["unmeasured_seconds"].items())))
    uncertainties = [{"name": k, "value": v, "source": ACCURACY_DOC}
                     for k, v in sorted((accuracy or {}).items())]
    if not uncertainties:
        uncertainties = [{"name": "measurement error", "value": "not provided",
                          "source": ACCURACY_DOC}]
    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "program": program,
        "generated_at": _iso(now_s),
        "generated_at_s": now_s,
        "source": source,
        "totals": {
            "measured_flops": status.flops_by_basis["measured"],
            "analytic_flops": status.flops_by_basis["analytic"],
            "compliance_flops": status.flops_by_basis["compliance"],
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
            "findings": [asdict(f) for f in j.findings],
            "metadata": _jsonable(meta.get((j.job, program), {})),
        } for j in status.jobs],
        "attempts": [{
            "job": a.job, "attempt": a.attempt, "resumed_from": a.resumed_from,
            "first_registered_at": _iso(a.first_t_s), "nodes": list(a.nodes), "ranks": a.ranks,
            "metadata": _jsonable(a.metadata),
        } for a in att],
        "series": [{"t_s": t, "cumulative_flops": v} for t, v in series],
        "method": {
            "assumed_precision": cfg.assumed_precision,
            "tolerance": cfg.tolerance,
            "policy": asdict(cfg.policy),
            "policy_description": cfg.policy.describe(),
            "assumptions": list(ASSUMPTIONS),
            "uncertainties": uncertainties,
        },
        "decision": {
            "outcome": status.decision,
            "rule": th.rule,
            "reason": status.decision_reason,
            "evidence": evidence,
        },
        "coverage": coverage,
        "ledger": None if ledger is None or check is None else {
            "path": str(ledger.path), "head_seq": check.head_seq, "head_hash": check.head_hash,
            "records": check.records, "verified": check.ok, "verify_reason": check.reason,
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


def load_accuracy(path: Path | None) -> dict[str, str]:
    """Accuracy figures (name -> value text) taken from docs/accuracy.md, as a JSON object."""
    if path is None:
        return {}
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object of name -> value")
    return {str(k): str(v) for k, v in data.items()}


# -- HTML --------------------------------------------------------------------------------------

SERIES_COLOUR = "#1f77b4"
THRESHOLD_COLOUR = "#d62728"
LEVEL_COLOUR = "#ff7f0e"


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.3e}"


def render_chart(series: Sequence[tuple[float, float]], threshold: float,
                 levels: Sequence[float], width: int = 960, height: int = 380) -> str:
    """Inline SVG: cumulative FLOPs over time against the threshold and approach levels."""
    left, right, top, bottom = 90, 20, 20, 50
    pw, ph = width - left - right, height - top - bottom
    ymax = max([threshold] + [v for _, v in series]) * 1.08 or 1.0
    if series:
        t0, t1 = series[0][0], series[-1][0]
    else:
        t0 = t1 = 0.0
    span = (t1 - t0) or 1.0

    def x(t: float) -> float:
        return left + (t - t0) / span * pw

    def y(v: float) -> float:
        return top + ph - v / ymax * ph

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" id="chart" width="{width}" '
             f'height="{height}" viewBox="0 0 {width} {height}" role="img" '
             'aria-label="cumulative FLOPs against the threshold">',
             f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#ffffff" '
             'stroke="#888888"/>']
    for i in range(5):
        v = ymax * i / 4
        parts.append(f'<text x="{left - 6}" y="{y(v) + 4:.1f}" font-size="11" '
                     f'text-anchor="end">{v:.2e}</text>')
    for i, tt in enumerate((t0, (t0 + t1) / 2, t1)):
        anchor = ("start", "middle", "end")[i]
        label = dt.datetime.fromtimestamp(tt, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        parts.append(f'<text x="{x(tt):.1f}" y="{height - 28}" font-size="11" '
                     f'text-anchor="{anchor}">{label} UTC</text>')
    for lv in levels:
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{y(threshold * lv):.1f}" '
                     f'y2="{y(threshold * lv):.1f}" stroke="{LEVEL_COLOUR}" stroke-width="2" '
                     'stroke-dasharray="6 4"/>')
        parts.append(f'<text x="{left + pw - 4}" y="{y(threshold * lv) - 4:.1f}" font-size="11" '
                     f'text-anchor="end" fill="{LEVEL_COLOUR}">{lv:.0%}</text>')
    parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{y(threshold):.1f}" '
                 f'y2="{y(threshold):.1f}" stroke="{THRESHOLD_COLOUR}" stroke-width="4"/>')
    parts.append(f'<text x="{left + 4}" y="{y(threshold) - 6:.1f}" font-size="12" '
                 f'fill="{THRESHOLD_COLOUR}">threshold {threshold:.3e} FLOPs</text>')
    if series:
        pts = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in series)
        if len(series) == 1:
            pts += f" {left + pw:.1f},{y(series[0][1]):.1f}"
        parts.append(f'<polyline points="{pts}" fill="none" stroke="{SERIES_COLOUR}" '
                     'stroke-width="4" stroke-linejoin="round"/>')
    parts.append(f'<text x="{left + pw / 2}" y="{height - 8}" font-size="12" '
                 'text-anchor="middle">cumulative FLOPs of the program (blue), threshold '
                 '(red), approach levels (orange)</text></svg>')
    return "\n".join(parts)


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(report: Mapping[str, Any]) -> str:
    """A self-contained page (inline CSS and SVG, no external assets) of a report document."""
    e = html.escape
    th = report["threshold"]
    tot = report["totals"]
    dec = report["decision"]
    led = report["ledger"]
    if led is None:
        ledger_html = "<p>No local ledger was available to this report.</p>"
    else:
        ledger_html = (
            f"<p>{e(led['path'])}: {led['records']} records, chain head seq {led['head_seq']} "
            f"hash <code>{e(led['head_hash'])}</code>; verification: "
            + ("passed" if led["verified"] else "FAILED: " + e(str(led["verify_reason"])))
            + ".</p>")
    series = [(p["t_s"], p["cumulative_flops"]) for p in report["series"]]
    jobs_rows = [[j["job"], _fmt(j["measured_flops"]), _fmt(j["analytic_flops"]),
                  _fmt(j["recompute_flops"]),
                  "—" if j["ratio"] is None else f"{j['ratio']:.3f}",
                  j["inferred_precision"] or "—", _fmt(j["compliance_flops"]),
                  "; ".join(f["message"] for f in j["findings"]) or "—"]
                 for j in report["jobs"]]
    att_rows = [[a["job"], a["attempt"] if a["attempt"] is not None else "—",
                 a["resumed_from"] or "—", a["first_registered_at"], ", ".join(a["nodes"]) or "—",
                 a["ranks"]] for a in report["attempts"]]
    meta_blocks = "".join(
        f"<h3>{e(j['job'])}</h3><pre>{e(json.dumps(j['metadata'], indent=2, sort_keys=True))}"
        "</pre>" for j in report["jobs"])
    cov = report["coverage"]
    if cov is None:
        coverage_html = "<p>No local ledger: unmeasured time is not known to this report.</p>"
    elif not cov["gaps"]:
        coverage_html = (f"<p>{e(cov['scope'])} records no unmeasured time"
                         + (f" between {e(cov['from'])} and {e(cov['to'])}" if cov["from"] else "")
                         + ".</p>")
    else:
        coverage_html = (
            f"<p>{e(cov['scope'])} records these spans of unmeasured time between "
            f"{e(cov['from'])} and {e(cov['to'])} (GPU * is the whole node: no daemon ran). "
            "Work done in them is not in the measured figures.</p>"
            + _table(["GPU", "from", "to", "seconds", "reason"],
                     [[g["gpu"], g["from"], g["to"], f"{g['seconds']:.1f}", g["reason"]]
                      for g in cov["gaps"]]))
    method = report["method"]
    outcome = ("Provider review required" if dec["outcome"] == "provider_review_required"
               else "Stays a downstream modifier")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>gpuflops audit report: {e(report['program'])}</title>
<style>
body {{ font-family: sans-serif; margin: 24px; color: #222; }}
table {{ border-collapse: collapse; margin: 8px 0 16px; font-size: 13px; }}
th, td {{ border: 1px solid #bbb; padding: 4px 8px; text-align: left; vertical-align: top; }}
th {{ background: #eee; }}
pre {{ background: #f6f6f6; padding: 8px; font-size: 12px; overflow-x: auto; }}
.decision {{ border: 2px solid #444; padding: 8px 12px; display: inline-block; }}
code {{ word-break: break-all; }}
</style></head><body>
<h1>Compute audit report: program {e(report['program'])}</h1>
<p>Generated {e(report['generated_at'])} from {e(report['source']['kind'])}.</p>
<div class="decision"><strong>Decision: {e(outcome)}</strong> (rule {e(dec['rule'])})<br>
{e(dec['reason'])}</div>
<h2>Cumulative FLOPs against the threshold</h2>
{render_chart(series, th['flops'], th['levels'])}
{_table(["basis", "FLOPs"], [["measured", _fmt(tot['measured_flops'])],
                            ["analytic", _fmt(tot['analytic_flops'])],
                            ["analytic recompute", _fmt(tot['recompute_flops'])],
                            ["compliance", _fmt(tot['compliance_flops'])],
                            ["threshold", _fmt(th['flops'])],
                            ["ratio", f"{th['ratio']:.4g}"]])}
<h2>Jobs</h2>
{_table(["job", "measured", "analytic", "recompute", "measured/analytic", "inferred precision",
         "compliance", "findings"], jobs_rows)}
<h2>Attempts</h2>
{_table(["job", "attempt", "resumed from", "first registered", "nodes", "ranks"], att_rows)}
<h2>Unmeasured time</h2>
{coverage_html}
<h2>Job metadata</h2>
{meta_blocks or "<p>No job registered metadata.</p>"}
<h2>Method</h2>
<p>Assumed tensor precision {e(method['assumed_precision'])}; reconciliation tolerance
±{method['tolerance']:.0%}; compliance policy: {e(method['policy_description'])}.</p>
<ul>{"".join(f"<li>{e(a)}</li>" for a in method['assumptions'])}</ul>
<h3>Uncertainties</h3>
{_table(["quantity", "value", "source"],
        [[u['name'], u['value'], u['source']] for u in method['uncertainties']])}
<h2>Decision record</h2>
<ul>{"".join(f"<li>{e(x)}</li>" for x in dec['evidence'])}</ul>
<h2>Ledger</h2>
{ledger_html}
</body></html>
"""
