"""Grafana dashboards and alert provisioning: structure, PromQL, and data for every panel."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.contract import TARGET_LABELS, contract_metrics
from tests.deploy.dashboards import DEFAULT_VARIABLES, _panels, dashboard_queries, expand
from tests.deploy.promtool import check_expressions, promtool, write_yaml
from tests.deploy.tooling import REPO

GRAFANA = REPO / "exporters" / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
ALERTS = GRAFANA / "provisioning" / "alerting" / "gpuflops-alerts.yaml"
RULES = REPO / "exporters" / "prometheus" / "gpuflops.rules.yml"
BUILTIN_VARIABLES = {"__rate_interval", "__interval", "__range", "datasource"}


def _load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def test_both_dashboards_exist() -> None:
    assert [p.name for p in DASHBOARDS] == ["gpuflops-compliance.json", "gpuflops-fleet.json"]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_structure(path: Path) -> None:
    dash = _load(path)
    for key in ("uid", "title", "schemaVersion", "panels", "templating", "time"):
        assert key in dash, key
    assert len(dash["uid"]) <= 40
    panels = list(_panels(dash["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["w"] > 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        cover = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"])
                 for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not cover & cells, f"panel {panel['title']!r} overlaps another"
        cells |= cover
        if panel["type"] == "row":
            continue
        assert panel["title"] and panel["targets"], panel
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            # Every query goes to the data source the viewer picks, never a hard-coded one.
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    defined = {v["name"] for v in dash["templating"]["list"]}
    used = set()
    for _title, expr in _raw_queries(dash):
        used |= set(re.findall(r"\$\{?(\w+)", expr))
    assert used - defined - BUILTIN_VARIABLES == set()
    assert defined - {"datasource"} <= set(DEFAULT_VARIABLES), "dashboards.py cannot expand it"


def _raw_queries(dash: dict[str, Any]) -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in _panels(dash["panels"]) for t in p.get("targets", [])]


def test_expand_variables() -> None:
    expr = 'rate(x{a=~"$node", b="${program}", c="${job:regex}", d="[[node]]"}[$__rate_interval])'
    assert expand(expr, {"node": "n", "program": "p", "job": "j", "__rate_interval": "5m"}) == (
        'rate(x{a=~"n", b="p", c="j", d="n"}[5m])'
    )
    with pytest.raises(KeyError, match="unknown"):
        expand("x{a=\"$unknown\"}", {})


def test_every_panel_query_parses(tmp_path: Path) -> None:
    queries = [q for path in DASHBOARDS for q in dashboard_queries(path)]
    assert len(queries) >= 30
    result = check_expressions([expr for _title, expr in queries], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    # The same check rejects a broken query, so its success above means something.
    bad = check_expressions(["sum by (instance (rate(gpuflops_gpu_flops_total[5m]))"], tmp_path)
    assert bad.returncode != 0


def _known_series() -> dict[str, frozenset[str] | None]:
    """Contract metrics with their labels; recorded series (labels not checked) as None."""
    known: dict[str, frozenset[str] | None] = {**contract_metrics(), "up": frozenset()}
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            if "record" in rule:
                known[rule["record"]] = None
    return known


_SELECTOR = re.compile(r"\b([a-zA-Z_][\w:]*)\{([^}]*)\}")


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_queries_use_contract_names_and_labels(path: Path) -> None:
    known = _known_series()
    queries = [e for _t, e in dashboard_queries(path)]
    variables = [v["definition"] for v in _load(path)["templating"]["list"] if "definition" in v]
    for expr in queries + variables:
        names = set(re.findall(r"\b(gpuflops_\w+|\w+:\w+:\w+)\b", expr))
        assert names <= set(known), (expr, names - set(known))
        for name, matchers in _SELECTOR.findall(expr):
            labels = known.get(name)
            if labels is None:
                continue
            used = set(re.findall(r"(\w+)\s*[=!]~?", matchers))
            assert used <= labels | TARGET_LABELS, (expr, used - labels - TARGET_LABELS)


def _series(name: str, labels: dict[str, str], values: str) -> dict[str, str]:
    inner = ", ".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{name}{{{inner}}}", "values": values}


def _synthetic_input() -> list[dict[str, str]]:
    """Two nodes' worth of every contract metric, following the contract's labels."""
    n1 = {"instance": "node1:9450", "job": "gpuflops", "node": "node1"}
    n2 = {"instance": "node2:9450", "job": "gpuflops", "node": "node2"}
    g1 = {**n1, "gpu": "0", "uuid": "GPU-a"}
    g2 = {**n2, "gpu": "0", "uuid": "GPU-b"}
    job = {**n1, "job_id": "train-1", "program": "ft-a"}
    prog = {**n1, "program": "ft-a"}
    fleet = {"instance": "central:9451", "job": "gpuflops-central", "program": "ft-a"}
    ramp = "0+6e13x150"
    s = [
        _series("up", n1, "1x150"),
        _series("up", n2, "1x150"),
        _series("gpuflops_gpu_flops_total", {**g1, "pipe": "hmma", "precision": "bf16"}, ramp),
        _series("gpuflops_gpu_flops_total", {**g2, "pipe": "fp32", "precision": "fp32"}, ramp),
        _series("gpuflops_process_flops_total", {**n1, "gpu": "0", "pid": "42", "comm": "python"},
                "0+5e13x150"),
        _series("gpuflops_unattributed_flops_total", {**n1, "gpu": "0"}, "0+1e13x150"),
        _series("gpuflops_attribution_timesliced_flops_total", g1, "0+6e12x150"),
        _series("gpuflops_sampler_intervals_total", {**n1, "gpu": "0"}, "0+60x150"),
        _series("gpuflops_sampler_gaps_total", {**n1, "gpu": "0", "reason": "driver"}, "0+1x150"),
        _series("gpuflops_sampler_gap_seconds_total", {**n1, "gpu": "0", "reason": "driver"},
                "0+2x150"),
        _series("gpuflops_sampler_errors_total", {**n1, "gpu": "0", "kind": "gpm"}, "0+1x150"),
        _series("gpuflops_sampler_last_sample_timestamp_seconds", {**n1, "gpu": "0"}, "0+60x150"),
        _series("gpuflops_build_info", {**n1, "version": "0.1.0", "backend": "nvml"}, "1x150"),
        _series("gpuflops_gpu_sm_clock_hz", g1, "1.98e9x150"),
        _series("gpuflops_gpu_sm_clock_real_hz", g1, "1.34e9x150"),
        _series("gpuflops_gpu_counter_source", {**g1, "source": "cupti_pm"}, "1x150"),
        _series("gpuflops_gpu_counter_intervals_total", {**n1, "gpu": "0", "source": "cupti_pm"},
                "0+120x150"),
        _series("gpuflops_gpu_flops_per_second", g1, "1e12x150"),
        _series("gpuflops_gpu_tensor_activity_available", {**g1, "reason": ""}, "1x150"),
        _series("gpuflops_gpu_tensor_activity_available", {**g2, "reason": "gpm_unsupported"},
                "0x150"),
        _series("gpuflops_job_measured_flops_total", job, "0+1e15x150"),
        _series("gpuflops_job_analytic_flops_total", job, "0+1.1e15x150"),
        _series("gpuflops_job_analytic_tokens_total", job, "0+1e5x150"),
        _series("gpuflops_job_recompute_flops_total", job, "0+1e14x150"),
        _series("gpuflops_job_reconcile_ratio", job, "0.91x150"),
        _series("gpuflops_job_reconcile_divergent", job, "0x150"),
        _series("gpuflops_job_hardware_flops", job, "0+1e15x150"),
        _series("gpuflops_job_half_rate_fraction", job, "0.15x150"),
        _series("gpuflops_program_flops_total", {**prog, "basis": "compliance"}, "0+1.1e15x150"),
        _series("gpuflops_program_flops_total", {**prog, "basis": "measured"}, "0+1e15x150"),
        _series("gpuflops_program_flops_total", {**prog, "basis": "analytic"}, "0+1.1e15x150"),
        _series("gpuflops_program_threshold_flops", {**prog, "rule": "unknown_base"}, "3.3e22x150"),
        _series("gpuflops_program_threshold_ratio", prog, "0.01x150"),
        _series("gpuflops_program_compliance_band_ratio", prog, "0.15x150"),
        _series("gpuflops_jobsocket_messages_total", {**n1, "result": "ok"}, "0+1x150"),
        _series("gpuflops_ledger_records_total", n1, "0+1x150"),
        _series("gpuflops_ledger_write_errors_total", n1, "0x150"),
        _series("gpuflops_ledger_writable", n1, "1x150"),
        _series("gpuflops_ledger_head_seq", {**n1, "ledger_id": "l1"}, "0+1x150"),
        _series("gpuflops_ledger_head_hash_prefix", {**n1, "ledger_id": "l1"}, "12345x150"),
        _series("gpuflops_central_ship_lag_seconds", n1, "0x150"),
        _series("gpuflops_central_backlog_records", n1, "0x150"),
        _series("gpuflops_central_shipped_records_total", n1, "0+120x150"),
        _series("gpuflops_central_ship_errors_total", {**n1, "kind": "connect"}, "0x150"),
        _series("gpuflops_central_forks_total", n1, "0x150"),
        _series("gpuflops_central_fenced", n1, "0x150"),
        _series("gpuflops_fleet_program_flops_total", {**fleet, "basis": "compliance"},
                "0+1.1e15x150"),
        _series("gpuflops_fleet_program_threshold_flops", {**fleet, "rule": "unknown_base"},
                "3.3e22x150"),
        _series("gpuflops_fleet_program_threshold_ratio", {**fleet, "rule": "unknown_base"},
                "0.01x150"),
        _series("gpuflops_fleet_program_nodes", fleet, "2x150"),
        _series("gpuflops_fleet_program_decision", {**fleet, "outcome": "approved_to_continue"},
                "1x150"),
        _series("gpuflops_fleet_node_last_ingest_timestamp_seconds",
                {"instance": "central:9451", "job": "gpuflops-central", "node": "node1",
                 "cluster": "c1"}, "0+60x150"),
        _series("gpuflops_fleet_up", {"instance": "central:9451", "job": "gpuflops-central"},
                "1x150"),
    ]
    for metric in ("tensor_any", "sm_active", "hmma", "fp32"):
        s.append(_series("gpuflops_gpu_activity_ratio", {**g1, "metric": metric}, "0.5x150"))
    return s


def test_synthetic_input_follows_the_contract() -> None:
    contract = contract_metrics()
    seen = set()
    for item in _synthetic_input():
        name, inner = item["series"].split("{", 1)
        if name != "up":
            labels = set(re.findall(r"(\w+)=", inner)) - (TARGET_LABELS - contract[name])
            assert labels == contract[name], name
            seen.add(name)
    assert seen == set(contract)


def _evaluate(exprs: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """promtool test: each expression must return at least one series at 2h."""
    cases = [
        {"expr": f"clamp_max(count({expr}), 1)", "eval_time": "2h",
         "exp_samples": [{"labels": "{}", "value": 1}]}
        for expr in exprs
    ]
    (tmp_path / RULES.name).write_text(RULES.read_text())
    write_yaml(tmp_path / "panels.test.yml", {
        "rule_files": [RULES.name],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": _synthetic_input(),
                   "promql_expr_test": cases}],
    })
    return promtool("test", "rules", "panels.test.yml", cwd=tmp_path)


def test_every_panel_query_returns_data(tmp_path: Path) -> None:
    """Each panel query, evaluated by promtool with the real rules over contract-shaped data."""
    queries = [(p.name, t, e) for p in DASHBOARDS for t, e in dashboard_queries(p)]
    result = _evaluate([e for _f, _t, e in queries], tmp_path)
    if result.returncode != 0:
        empty = [f"{f}: {t}: {e}" for f, t, e in queries if e in result.stdout + result.stderr]
        pytest.fail("panel queries without data:\n" + "\n".join(empty) + "\n" + result.stdout)


def test_a_query_with_a_wrong_label_value_returns_no_data(tmp_path: Path) -> None:
    wrong = 'gpuflops_gpu_activity_ratio{metric="tensor-any"}'
    assert _evaluate([wrong], tmp_path).returncode != 0
    assert _evaluate([wrong.replace("-", "_")], tmp_path).returncode == 0


def test_alert_provisioning_is_generated_from_the_prometheus_rules() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "grafana_alerts.py"), "--check"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr


def test_alert_provisioning_mirrors_every_prometheus_alert(tmp_path: Path) -> None:
    prom = {
        r["alert"]: r
        for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r
    }
    doc = yaml.safe_load(ALERTS.read_text())
    assert doc["apiVersion"] == 1
    rules = [r for g in doc["groups"] for r in g["rules"]]
    assert {r["title"] for r in rules} == set(prom)
    uids = [r["uid"] for r in rules]
    assert len(uids) == len(set(uids)) and all(re.fullmatch(r"[\w-]{1,40}", u) for u in uids)
    exprs = []
    for rule in rules:
        source = prom[rule["title"]]
        data = {d["refId"]: d for d in rule["data"]}
        assert rule["condition"] in data
        assert " ".join(source["expr"].split()) == data["A"]["model"]["expr"]
        assert rule["for"] == source.get("for", "0s")
        assert rule["labels"] == source["labels"]
        # Grafana expands $NAME as environment variables in provisioned labels and query
        # models (not annotations): none may contain a dollar sign.
        assert "$" not in json.dumps(rule["data"]) + json.dumps(rule["labels"])
        assert "$value " not in json.dumps(rule["annotations"]).replace("$values", "")
        exprs.append(data["A"]["model"]["expr"])
    assert check_expressions(exprs, tmp_path).returncode == 0


def test_dashboard_provider_points_at_a_directory() -> None:
    doc = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "gpuflops.yaml").read_text())
    (provider,) = doc["providers"]
    assert provider["type"] == "file" and provider["options"]["path"].startswith("/")
    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "gpuflops.yaml").read_text())
    uids = {d["uid"] for d in ds["datasources"]}
    alert_uids = {
        d["datasourceUid"]
        for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]
        for d in r["data"] if d["datasourceUid"] != "__expr__"
    }
    assert alert_uids <= uids
