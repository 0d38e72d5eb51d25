"""The audit report as one self-contained HTML page (inline CSS and SVG, no external assets)."""

from __future__ import annotations

import datetime as dt
import html
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

SERIES_COLOUR = "#1f77b4"
THRESHOLD_COLOUR = "#d62728"
LEVEL_COLOUR = "#ff7f0e"


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.3e}"


def _band(b: float | None) -> str:
    """The compliance figure's relative uncertainty, or that it is unknown."""
    return " (band unknown)" if b is None else f" ± {b:.0%}"


def render_chart(series: Sequence[tuple[float, float]], threshold: float,
                 levels: Sequence[float], width: int = 960, height: int = 380) -> str:
    """Inline SVG: cumulative FLOPs over time against the threshold and approach levels.

    The FLOPs axis is logarithmic (one grid line per decade), so a program at a millionth of
    its threshold still shows as a rising line, not a flat one on the floor. Without any data
    there is no time axis (no 1970 labels), only a note saying so.
    """
    left, right, top, bottom = 90, 20, 20, 50
    pw, ph = width - left - right, height - top - bottom
    positive = [v for _, v in series if v > 0]
    top_dec = math.ceil(math.log10(max([threshold, *positive]) * 1.08))
    low = min([threshold * min(levels, default=1.0), *positive])
    # At most 15 decades below the top: a value smaller than that sits on the floor.
    low_dec = max(math.floor(math.log10(low)), top_dec - 15)
    if low_dec >= top_dec:
        low_dec = top_dec - 1
    if series:
        t0, t1 = series[0][0], series[-1][0]
    else:
        t0 = t1 = 0.0
    span = (t1 - t0) or 1.0

    def x(t: float) -> float:
        return left + (t - t0) / span * pw

    def y(v: float) -> float:
        d = math.log10(v) if v > 0 else low_dec
        d = min(max(d, low_dec), top_dec)
        return top + ph - (d - low_dec) / (top_dec - low_dec) * ph

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" id="chart" width="{width}" '
             f'height="{height}" viewBox="0 0 {width} {height}" role="img" '
             'aria-label="cumulative FLOPs against the threshold, logarithmic scale">',
             f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#ffffff" '
             'stroke="#888888"/>']
    step = max(1, math.ceil((top_dec - low_dec) / 8))
    for dec in range(low_dec, top_dec + 1, step):
        yy = y(10.0**dec)
        parts.append(f'<line class="decade" x1="{left}" x2="{left + pw}" y1="{yy:.1f}" '
                     f'y2="{yy:.1f}" stroke="#eeeeee"/>')
        parts.append(f'<text x="{left - 6}" y="{yy + 4:.1f}" font-size="11" '
                     f'text-anchor="end">1e{dec}</text>')
    if series:
        stamps = (t0,) if t0 == t1 else (t0, (t0 + t1) / 2, t1)
        for i, tt in enumerate(stamps):
            anchor = ("start", "middle", "end")[i] if len(stamps) == 3 else "start"
            label = dt.datetime.fromtimestamp(tt, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
            parts.append(f'<text x="{x(tt):.1f}" y="{height - 28}" font-size="11" '
                         f'text-anchor="{anchor}">{label} UTC</text>')
    else:
        parts.append(f'<text x="{left + pw / 2}" y="{top + ph / 2}" font-size="14" '
                     'text-anchor="middle">no FLOPs recorded for this program yet</text>')
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
                 'text-anchor="middle">cumulative FLOPs of the program (blue, logarithmic '
                 'scale), threshold (red), approach levels (orange)</text></svg>')
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
    # measured ÷ analytic of the two columns beside it; the reconciliation ratio compares only
    # the measured FLOPs inside the span the estimates cover, so it has a column of its own.
    jobs_rows = [[j["job"], _fmt(j["measured_flops"]), _fmt(j["analytic_flops"]),
                  _fmt(j["recompute_flops"]),
                  f"{j['measured_flops'] / j['analytic_flops']:.3f}" if j["analytic_flops"]
                  else "—",
                  "—" if j["ratio"] is None else f"{j['ratio']:.3f}",
                  j["inferred_precision"] or "—", _fmt(j["hardware_flops"]),
                  _fmt(j["compliance_flops"]) + _band(j["band"]), j["basis_used"],
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
    demo = report.get("demo")
    # Demo data is stamped on every printed page (a fixed element repeats on each) and at
    # every section, so no page or excerpt of the report can pass for a real measurement.
    stamp = "" if not demo else f'<div class="demo">{e(demo["notice"])}</div>'
    h2 = "<h2>" if not demo else '<h2><span class="demo-tag">DEMO DATA</span> '
    if demo:
        outcome = f"DEMO DATA, NOT A DECISION: {outcome}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>{"DEMO DATA: " if demo else ""}gpuflops audit report: {e(report['program'])}</title>
<style>
body {{ font-family: sans-serif; margin: 24px; color: #222; }}
table {{ border-collapse: collapse; margin: 8px 0 16px; font-size: 13px; }}
th, td {{ border: 1px solid #bbb; padding: 4px 8px; text-align: left; vertical-align: top; }}
th {{ background: #eee; }}
pre {{ background: #f6f6f6; padding: 8px; font-size: 12px; overflow-x: auto; }}
.decision {{ border: 2px solid #444; padding: 8px 12px; display: inline-block; }}
code {{ word-break: break-all; }}
.demo {{ position: fixed; top: 0; left: 0; right: 0; background: #b00; color: #fff;
        font-weight: bold; padding: 6px 12px; z-index: 10; }}
.demo-tag {{ background: #b00; color: #fff; padding: 0 6px; }}
body:has(.demo) {{ padding-top: 40px; }}
</style></head><body>
{stamp}
<h1>Compute audit report: program {e(report['program'])}</h1>
<p>Generated {e(report['generated_at'])} from {e(report['source']['kind'])}.</p>
<div class="decision"><strong>Decision: {e(outcome)}</strong> (rule {e(dec['rule'])})<br>
{e(dec['reason'])}</div>
{h2}Cumulative FLOPs against the threshold</h2>
{render_chart(series, th['flops'], th['levels'])}
{_table(["basis", "FLOPs"], [["measured", _fmt(tot['measured_flops'])],
                            ["analytic", _fmt(tot['analytic_flops'])],
                            ["analytic recompute", _fmt(tot['recompute_flops'])],
                            ["hardware", _fmt(tot['hardware_flops'])],
                            ["compliance", _fmt(tot['compliance_flops'])
                             + _band(tot['compliance_band'])],
                            ["threshold", _fmt(th['flops'])],
                            ["ratio", f"{th['ratio']:.4g}"]])}
{h2}Jobs</h2>
{_table(["job", "measured", "analytic", "recompute", "measured ÷ analytic",
         "reconciliation ratio (estimate span)", "inferred precision", "hardware",
         "compliance", "basis", "findings"],
        jobs_rows)}
<p>Measured ÷ analytic divides the two totals beside it. The reconciliation ratio divides only
the measured FLOPs inside the time span the job's estimates cover by the analytic FLOPs; it is
the figure checked against the tolerance.</p>
{h2}Attempts</h2>
{_table(["job", "attempt", "resumed from", "first registered", "nodes", "ranks"], att_rows)}
{h2}Unmeasured time</h2>
{coverage_html}
{h2}Job metadata</h2>
{meta_blocks or "<p>No job registered metadata.</p>"}
{h2}Method</h2>
<p>Cycle counters: {e(", ".join(method['counter_sources']) or "not recorded")}.
Assumed tensor precision {e(method['assumed_precision'])}; reconciliation tolerance
±{method['tolerance']:.0%}; compliance policy: {e(method['policy_description'])}.</p>
<ul>{"".join(f"<li>{e(a)}</li>" for a in method['assumptions'])}</ul>
<h3>Uncertainties</h3>
{_table(["quantity", "value", "source"],
        [[u['name'], u['value'], u['source']] for u in method['uncertainties']])}
{h2}Decision record</h2>
<ul>{"".join(f"<li>{e(x)}</li>" for x in dec['evidence'])}</ul>
{h2}Ledger</h2>
{ledger_html}
</body></html>
"""
