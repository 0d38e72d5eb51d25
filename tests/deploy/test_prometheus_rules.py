"""The Prometheus rules: promtool check and unit tests, and that every alert is tested."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.contract import contract_metrics
from tests.deploy.promtool import promtool
from tests.deploy.tooling import REPO

RULES_DIR = REPO / "exporters" / "prometheus"
RULES = RULES_DIR / "gpuflops.rules.yml"
RULE_TESTS = RULES_DIR / "gpuflops.rules.test.yml"


def _rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def test_promtool_check_rules() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in result.stdout


def test_promtool_unit_tests_pass() -> None:
    result = promtool("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    alerts = {r["alert"] for r in _rules() if "alert" in r}
    fired: set[str] = set()
    quiet: set[str] = set()
    for group in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for case in group.get("alert_rule_test", []):
            (fired if case.get("exp_alerts") else quiet).add(case["alertname"])
    assert alerts - fired == set(), "alerts never tested firing"
    assert alerts - quiet == set(), "alerts never tested quiet"
    assert (fired | quiet) - alerts == set(), "tests name alerts that do not exist"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("original", "broken"),
    [
        # Each change must make the unit tests fail: they pin the thresholds they claim to.
        (">= 0.5\n", ">= 0.4\n"),
        ("[6h], 2592000)", "[6h], 86400)"),
        ("last_over_time(gpuflops_program_flops_total[1h])", "gpuflops_program_flops_total"),
        ("> 120", "> 1200"),
        # The central total is a floor under the nodes' sum, and the nodes' sum one under it.
        (">= on (program, basis)", "< on (program, basis)"),
        ("gpuflops_central_ship_lag_seconds > 900", "gpuflops_central_ship_lag_seconds > 9000"),
    ],
)
def test_unit_tests_catch_a_changed_rule(tmp_path: Path, original: str, broken: str) -> None:
    text = RULES.read_text()
    assert original in text
    (tmp_path / RULES.name).write_text(text.replace(original, broken, 1))
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    result = promtool("test", "rules", RULE_TESTS.name, cwd=tmp_path)
    assert result.returncode != 0, result.stdout


def test_rules_use_only_contract_metrics_and_recorded_series() -> None:
    known = set(contract_metrics()) | {"up"} | {r["record"] for r in _rules() if "record" in r}
    for rule in _rules():
        names = set(re.findall(r"\b(gpuflops_\w+|\w+:\w+:\w+|up)\b(?=\s*[{\[)\s])", rule["expr"]))
        assert names <= known, (rule.get("alert") or rule.get("record"), names - known)


def test_recording_rule_names_follow_level_metric_operation() -> None:
    for rule in _rules():
        if "record" in rule:
            level, metric, ops = rule["record"].split(":")
            assert level in {"program", "job", "instance", "cluster"}
            assert metric.startswith("gpuflops_")
            assert ops


def test_every_alert_has_a_runbook_url_to_its_row_in_alerts_md() -> None:
    alerts_md = (REPO / "docs" / "alerts.md").read_text()
    for rule in _rules():
        if "alert" not in rule:
            continue
        url = rule["annotations"]["runbook_url"]
        base, _, anchor = url.partition("#")
        assert base.endswith("/alerts.md") and anchor == rule["alert"].lower(), url
        assert f'<a id="{anchor}"></a>`{rule["alert"]}`' in alerts_md, anchor


def test_rules_never_group_by_the_scrape_job_label() -> None:
    """The training job is `job_id`; `job` is Prometheus' scrape job, used only with `up`."""
    for rule in _rules():
        expr = rule["expr"]
        assert not re.search(r"by \([^)]*\bjob\b", expr), expr
        assert "$labels.job " not in str(rule.get("annotations", {})) + " "
