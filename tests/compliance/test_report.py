"""The audit report: JSON against its schema, Prometheus source, HTML in headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from gpuflops.compliance.html import render_html
from gpuflops.compliance.prometheus import PrometheusError, PrometheusSource
from gpuflops.compliance.report import SCHEMA_PATH, build_report
from gpuflops.compliance.thresholds import ProgramsConfig
from gpuflops.ledger.store import Ledger
from gpuflops.model import FlopsRow
from tests.compliance.pngread import count_colour, decode_png

ROOT = Path(__file__).resolve().parents[2]
T0 = 1_750_000_000.0
BASE = 2.4e20  # base model compute (so the threshold is 8e19 and the chart is readable)
CONFIG = ProgramsConfig(programs={"llama-ft": {"base_model_compute_flops": BASE,
                                               "base_model_compute_source": "model card"}})


def _meta(attempt: int, rank: int, node: str, **extra: Any) -> dict[str, Any]:
    return {"job": "ft-1", "program": "llama-ft", "attempt": attempt, "rank": rank,
            "world_size": 2, "node": node, "model": "llama-3-8b", "params_total": 8.0e9,
            "params_trainable": 8.0e9, "precision": "bf16-mixed", "method": "full",
            "activation_checkpointing": True, "seq_len": 4096, "global_batch_size": 64,
            "base_model_compute_flops": BASE, **extra}


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    ledger = Ledger.open(tmp_path / "ledger.sqlite3", clock=lambda: T0)
    for rank in (0, 1):
        ledger.append_job_event("register", "ft-1", "llama-ft", _meta(1, rank, "node-a"), T0)
    per_interval = 1.2e17  # two GPUs, 0.6e17 each
    for i in range(200):
        t = T0 + 10 + i
        if i == 100:
            for rank in (0, 1):
                ledger.append_job_event("register", "ft-1", "llama-ft",
                                        _meta(2, rank, "node-b", resumed_from="ft-1/1"), t)
        ledger.append_interval(t, t + 1, [
            FlopsRow("0", "GPU-a", "hmma", "bf16", "ft-1", "llama-ft", 100, per_interval / 2),
            FlopsRow("1", "GPU-b", "hmma", "bf16", "ft-1", "llama-ft", 101, per_interval / 2)])
        if i % 20 == 19:
            ledger.append_job_event("estimate", "ft-1", "llama-ft", {
                "analytic_flops": 20 * per_interval * 0.95, "tokens": 20 * 2.6e5,
                "recompute_flops": 20 * per_interval * 0.95 / 4,
                "window_t0_s": t - 19, "window_t1_s": t + 1}, t + 1)
    # Unmeasured time: one GPU's counters for 2.5 s, the whole node for 10 s around the resume,
    # and a gap after the program ended, which its report leaves out.
    ledger.append_gap(T0 + 50, T0 + 52.5, "gpm_read", [("1", "GPU-b")])
    ledger.append_gap(T0 + 105, T0 + 115, "daemon_lost", [("*", "")])
    ledger.append_gap(T0 + 500, T0 + 600, "daemon_stopped", [("*", "")])
    ledger.close()
    yield tmp_path


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-c",
           "from gpuflops.cli.report import report_command; report_command()", *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=False,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def _schema() -> dict[str, Any]:
    schema: dict[str, Any] = json.loads(SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return schema


def test_json_report_from_ledger_validates_and_is_right(state_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    acc = tmp_path / "accuracy.json"
    acc.write_text(json.dumps({"H100 hmma bf16 vs analytic": "±4% (docs/accuracy.md table 2)"}))
    cfg = tmp_path / "programs.toml"
    cfg.write_text('[programs.llama-ft]\nbase_model_compute_flops = 2.4e20\n'
                   'base_model_compute_source = "model card"\n')
    proc = _cli("--program", "llama-ft", "--state-dir", str(state_dir), "--out", str(out),
                "--config", str(cfg), "--accuracy", str(acc))
    assert proc.returncode == 0, proc.stderr
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o640 & ~umask  # never world-readable
    doc = json.loads(out.read_text())
    jsonschema.validate(doc, _schema(), format_checker=jsonschema.FormatChecker())
    assert doc["totals"]["measured_flops"] == pytest.approx(200 * 1.2e17)
    assert doc["threshold"]["rule"] == "one_third_of_base"
    assert doc["threshold"]["flops"] == pytest.approx(8e19)
    # Reconciled (the default): the counters confirm the estimates (1/0.95), so the analytic
    # figure counts, without its recomputation term.
    analytic = 200 * 1.2e17 * 0.95
    assert doc["threshold"]["ratio"] == pytest.approx(analytic * 0.75 / 8e19)
    assert doc["totals"]["compliance_band"] == pytest.approx(0.15)
    assert doc["method"]["counter_sources"] == []  # no daemon session in this fixture
    assert doc["decision"]["outcome"] == "downstream_modifier"
    cov = doc["coverage"]
    assert [(g["gpu"], g["seconds"], g["reason"]) for g in cov["gaps"]] == [
        ("1", 2.5, "gpm_read"), ("*", 10.0, "daemon_lost")]
    assert cov["unmeasured_seconds"] == {"gpm_read": 2.5, "daemon_lost": 10.0}
    assert any("unmeasured time" in x for x in doc["decision"]["evidence"])
    [job] = doc["jobs"]
    assert job["ratio"] == pytest.approx(1 / 0.95)
    assert not job["divergent"] and job["findings"] == []
    assert job["basis_used"] == "analytic_confirmed"
    assert job["hardware_flops"] == pytest.approx(2.4e19) and job["half_rate_fraction"] is None
    assert [(a["attempt"], a["nodes"], a["ranks"]) for a in doc["attempts"]] == \
        [(1, ["node-a"], 2), (2, ["node-b"], 2)]
    assert doc["attempts"][1]["resumed_from"] == "ft-1/1"
    assert doc["ledger"]["verified"] and doc["ledger"]["records"] == 1 + 2 + 2 + 200 + 10 + 3
    assert doc["method"]["uncertainties"][0]["value"].startswith("±4%")
    assert doc["series"][-1]["cumulative_flops"] == pytest.approx(2.4e19)
    # A broken document must fail the schema (the schema constrains something).
    doc["decision"]["outcome"] = "fine"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, _schema())


def test_report_cli_errors_cleanly(tmp_path: Path) -> None:
    proc = _cli("--program", "p", "--state-dir", str(tmp_path / "none"))
    assert proc.returncode == 1 and "no ledger" in proc.stderr


class _Prom:
    """A tiny Prometheus HTTP API answering from two nodes' per-job counters."""

    def __init__(self) -> None:
        self.node_values = {
            "measured_flops": [("ft-1", 2.4e19), ("ft-1", 2.0e19), ("ft-2", 1.0e19)],
            "analytic_flops": [("ft-1", 2.2e19), ("ft-1", 2.1e19), ("ft-2", 0.9e19)],
            "analytic_tokens": [("ft-1", 1e9), ("ft-1", 1e9), ("ft-2", 5e8)],
            "recompute_flops": [("ft-1", 0.5e19), ("ft-1", 0.5e19), ("ft-2", 0.2e19)],
        }
        # Per-job gauges, already summed (hardware) or maxed (fraction) across nodes.
        self.gauges: dict[str, list[tuple[str, float]]] = {
            "gpuflops_job_hardware_flops": [], "gpuflops_job_half_rate_fraction": []}
        self.seen: list[str] = []

    def answer(self, path: str, params: dict[str, str]) -> dict[str, Any]:
        q = params["query"]
        self.seen.append(q)
        if 'program="llama-ft"' not in q:
            return {"status": "error", "errorType": "bad_data", "error": "unexpected query"}
        if path == "/api/v1/query_range":
            start, end, step = (float(params[k]) for k in ("start", "end", "step"))
            n = int((end - start) // step) + 1
            vals = [[start + i * step, str(5.4e19 * i / max(1, n - 1))] for i in range(n)]
            return {"status": "success", "data": {"resultType": "matrix",
                                                  "result": [{"metric": {}, "values": vals}]}}
        for name, rows2 in self.gauges.items():
            if name in q:
                return {"status": "success", "data": {"resultType": "vector", "result": [
                    {"metric": {"job_id": j, "program": "llama-ft"}, "value": [T0, str(v)]}
                    for j, v in rows2]}}
        for name, rows in self.node_values.items():
            if f"gpuflops_job_{name}_total" in q:
                sums: dict[str, float] = {}
                for job, v in rows:
                    sums[job] = sums.get(job, 0.0) + v
                return {"status": "success", "data": {"resultType": "vector", "result": [
                    {"metric": {"job_id": j, "program": "llama-ft"}, "value": [T0, str(v)]}
                    for j, v in sums.items()]}}
        return {"status": "error", "error": "unknown metric"}


@pytest.fixture
def prom() -> Iterator[tuple[str, _Prom]]:
    fake = _Prom()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            params = dict(urllib.parse.parse_qsl(url.query))
            body = json.dumps(fake.answer(url.path, params)).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", fake
    server.shutdown()
    server.server_close()
    thread.join()


def _prometheus_report(state_dir: Path, url: str) -> dict[str, Any]:
    ledger = Ledger.open(state_dir / "ledger.sqlite3", clock=lambda: T0, readonly=True)
    try:
        return build_report("llama-ft", ledger=ledger, config=CONFIG, now_s=T0 + 300,
                            prometheus=PrometheusSource(url))
    finally:
        ledger.close()


def test_prometheus_totals_across_nodes(state_dir: Path, prom: tuple[str, _Prom]) -> None:
    url, fake = prom
    doc = _prometheus_report(state_dir, url)
    jsonschema.validate(doc, _schema())
    assert doc["source"]["kind"] == "prometheus"
    assert doc["totals"]["measured_flops"] == pytest.approx(5.4e19)
    assert doc["totals"]["analytic_flops"] == pytest.approx(5.2e19)
    jobs = {j["job"]: j for j in doc["jobs"]}
    assert jobs["ft-1"]["ratio"] == pytest.approx(4.4 / 4.3)
    assert jobs["ft-1"]["metadata"]["model"] == "llama-3-8b"  # metadata still from the ledger
    tot = doc["totals"]
    assert doc["threshold"]["ratio"] == pytest.approx(
        (tot["analytic_flops"] - tot["recompute_flops"]) / 8e19)
    assert doc["threshold"]["level_reached"] == 0.5
    assert any(q.startswith("sum by (job_id,program)(max_over_time("
                            "gpuflops_job_measured_flops_total") for q in fake.seen)
    assert doc["series"][-1]["cumulative_flops"] == pytest.approx(5.4e19)


def test_prometheus_report_keeps_the_half_rate_correction(state_dir: Path,
                                                          prom: tuple[str, _Prom]) -> None:
    url, fake = prom
    # ft-2's census put a quarter of its tensor FLOPs on half-rate kernels; its nodes' hardware
    # figure is 8e18 of the 1e19 measured: the report must reach the same hardware figure.
    fake.gauges["gpuflops_job_half_rate_fraction"] = [("ft-2", 0.25)]
    fake.gauges["gpuflops_job_hardware_flops"] = [("ft-1", 4.4e19), ("ft-2", 0.8e19)]
    doc = _prometheus_report(state_dir, url)
    jobs = {j["job"]: j for j in doc["jobs"]}
    assert jobs["ft-2"]["hardware_flops"] == pytest.approx(0.8e19)
    assert jobs["ft-2"]["half_rate_fraction"] == 0.25
    assert jobs["ft-1"]["hardware_flops"] == pytest.approx(4.4e19)  # no claim: as measured
    assert jobs["ft-1"]["half_rate_fraction"] is None


def test_prometheus_error_is_reported(prom: tuple[str, _Prom]) -> None:
    url, _ = prom
    with pytest.raises(PrometheusError, match="unexpected query"):
        PrometheusSource(url).query("up")
    with pytest.raises(PrometheusError):
        PrometheusSource("http://127.0.0.1:9", timeout_s=2).query('x{program="llama-ft"}')


BLUE = (0x1F, 0x77, 0xB4)
RED = (0xD6, 0x27, 0x28)


def _screenshot(chromium: str, page: Path, png: Path, profile: Path) -> bytes:
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu",
                    "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
                    f"--screenshot={png}", "--window-size=1200,900", page.as_uri()],
                   capture_output=True, timeout=90, check=True)
    return png.read_bytes()


@pytest.mark.slow
def test_html_report_renders_in_headless_chromium(state_dir: Path, tmp_path: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is required in CI (apt-get install chromium)")
        pytest.skip("chromium not installed")
    page = tmp_path / "report.html"
    proc = _cli("--program", "llama-ft", "--state-dir", str(state_dir), "--format", "html",
                "--out", str(page))
    assert proc.returncode == 0, proc.stderr
    text = page.read_text()
    assert "<svg" in text and "http://" not in text.replace("http://www.w3.org/2000/svg", "")
    unmeasured = text.split("<h2>Unmeasured time</h2>")[1].split("<h2>")[0]
    assert "daemon_lost" in unmeasured and "gpm_read" in unmeasured
    assert "daemon_stopped" not in unmeasured  # after the program's span
    png = decode_png(_screenshot(chromium, page, tmp_path / "shot.png", tmp_path / "prof"))
    chart_area = (0, 150, 1200, 750)
    assert count_colour(png, BLUE, chart_area) > 1500  # the cumulative line, 4 px wide
    assert count_colour(png, RED, chart_area) > 2500  # the threshold line, 4 px wide

    # Control: the same page without the series has no blue line.
    doc = json.loads(_cli("--program", "llama-ft", "--state-dir", str(state_dir)).stdout)
    doc["series"] = []
    empty = tmp_path / "empty.html"
    empty.write_text(render_html(doc))
    png2 = decode_png(_screenshot(chromium, empty, tmp_path / "shot2.png", tmp_path / "prof2"))
    assert count_colour(png2, BLUE, chart_area) < 50


def _polyline_ys(svg: str) -> list[float]:
    import re

    points = re.search(r'<polyline points="([^"]+)"', svg)
    assert points is not None
    return [float(p.split(",")[1]) for p in points.group(1).split()]


def test_chart_is_logarithmic_and_has_no_1970_when_empty() -> None:
    from gpuflops.compliance.html import render_chart

    threshold = 3.3e22
    # A program at a millionth of its threshold, growing tenfold: a rising line, not a floor.
    tiny = [(1.7e9 + i * 60, threshold * 1e-7 * (1 + 9 * i / 10)) for i in range(11)]
    ys = _polyline_ys(render_chart(tiny, threshold, [0.5, 0.8, 0.95]))
    assert ys[0] - ys[-1] > 20  # a decade is well over 20 px high
    assert ys == sorted(ys, reverse=True)  # never falls
    empty = render_chart([], threshold, [0.5, 0.8, 0.95])
    assert "1970" not in empty and "UTC" not in empty and "no FLOPs recorded" in empty
    assert "<polyline" not in empty


def test_html_measured_over_analytic_column_matches_the_totals(state_dir: Path) -> None:
    import re

    doc = json.loads(_cli("--program", "llama-ft", "--state-dir", str(state_dir)).stdout)
    page = render_html(doc)
    jobs = page.split("<h2>Jobs</h2>")[1].split("<h2>")[0]
    for row in re.findall(r"<tr><td>(.*?)</td></tr>", jobs.split("<tbody>")[1]):
        cells = row.split("</td><td>")
        measured, analytic, shown = float(cells[1]), float(cells[2]), cells[4]
        # The cells show 4 significant digits; the ratio agrees with them to that precision.
        assert float(shown) == pytest.approx(measured / analytic, rel=2e-3), cells


def test_html_shows_the_hardware_figure_basis_and_band(state_dir: Path) -> None:
    doc = json.loads(_cli("--program", "llama-ft", "--state-dir", str(state_dir)).stdout)
    page = render_html(doc)
    jobs = page.split("<h2>Jobs</h2>")[1].split("<h2>")[0]
    assert "analytic_confirmed" in jobs and "± 15%" in jobs  # confirmed within the agreement
    assert "± 15%" in page.split("<h2>Jobs</h2>")[0]  # the program's band beside its total
    assert "Cycle counters: not recorded" in page  # the fixture's ledger has no daemon session
