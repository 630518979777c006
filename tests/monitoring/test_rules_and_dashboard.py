"""The alert rules pass `promtool check rules` and their unit tests, every alert is tested both ways and has its
runbook section; the dashboard and the rules read only metrics the exporter really serves."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.monitoring.exposition import observed_metrics, referenced_names, served_names

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "monitoring" / "rules" / "streamssl.rules.yml"
RULE_TESTS = ROOT / "monitoring" / "rules" / "streamssl.rules.test.yml"
DASHBOARD = ROOT / "monitoring" / "dashboards" / "streamssl.json"
RUNBOOK = ROOT / "docs" / "RUNBOOK.md"
needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None,
                                    reason="promtool not on PATH (`make tools` installs Debian's prometheus)")


def alerts() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"] if "alert" in rule]


def dashboard_exprs() -> list[str]:
    """The PromQL of every panel, and of every query variable (Grafana's `label_values(SELECTOR, label)` unwrapped)."""
    board = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in board["panels"] for target in panel.get("targets", [])]
    variables = [variable["definition"] for variable in board["templating"]["list"] if variable["type"] == "query"]
    return exprs + [re.sub(r"^label_values\((.*),\s*\w+\)$", r"\1", definition) for definition in variables]


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], cwd=RULES.parent, capture_output=True, text=True, timeout=60, check=False)


@needs_promtool
def test_promtool_checks_the_rules_and_their_unit_tests_pass() -> None:
    checked = _promtool("check", "rules", RULES.name)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in checked.stdout
    tested = _promtool("test", "rules", RULE_TESTS.name)
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr


def test_every_alert_has_a_duration_severity_runbook_and_a_test_both_ways() -> None:
    runbook_anchors = {re.sub(r"[^a-z0-9 -]", "", line[3:].strip().lower()).replace(" ", "-")
                       for line in RUNBOOK.read_text().splitlines() if line.startswith("## ")}
    cases = [case for test in yaml.safe_load(RULE_TESTS.read_text())["tests"] for case in test["alert_rule_test"]]
    names = [rule["alert"] for rule in alerts()]
    assert len(names) == len(set(names)) >= 14
    for rule in alerts():
        name = rule["alert"]
        assert rule.get("for") and rule["labels"]["severity"] in {"critical", "warning"}, name
        notes = rule["annotations"]
        assert notes["summary"] and notes["description"], name
        assert notes["runbook_url"] == f"docs/RUNBOOK.md#{name.lower()}" and name.lower() in runbook_anchors, name
        tested = [case for case in cases if case["alertname"] == name]
        assert any(case["exp_alerts"] for case in tested), f"{name}: no case where it fires"
        assert any(not case["exp_alerts"] for case in tested), f"{name}: no case where it does not fire"


def test_the_dashboard_has_the_panels_ops_asked_for_and_a_datasource_variable() -> None:
    board = json.loads(DASHBOARD.read_text())
    assert 36 <= board["schemaVersion"] <= 41
    assert any(variable["type"] == "datasource" and variable["query"] == "prometheus"
               for variable in board["templating"]["list"])
    titles = {panel["title"] for panel in board["panels"]}
    assert {"Throughput", "Input-wait share", "Loss", "kNN top-1", "Embedding std", "Checkpoint age",
            "Rejects by reason", "Kafka lag per partition", "Publish age", "Embedding drift", "Process memory and CPU",
            "Eval duration"} <= titles
    assert all(panel["datasource"]["uid"] == "${datasource}" for panel in board["panels"])
    assert len({panel["id"] for panel in board["panels"]}) == len(board["panels"])


@pytest.mark.parametrize("source", ["dashboard", "rules"])
def test_every_expression_reads_only_metrics_the_exporter_serves(source: str) -> None:
    served = served_names(observed_metrics())
    exprs = dashboard_exprs() if source == "dashboard" else [rule["expr"] for rule in alerts()]
    referenced = set().union(*map(referenced_names, exprs))
    assert len(referenced) >= 12  # the extraction found the expressions' names at all
    assert referenced <= served, sorted(referenced - served)


def test_the_name_extraction_sees_through_functions_suffixes_and_label_matchers() -> None:
    expr = ('histogram_quantile(0.9, sum by (le) (rate(streamssl_step_duration_seconds_bucket{job="streamssl", '
            'reason="streamssl_not_a_metric"}[5m]))) / on(instance) process_cpu_seconds_total')
    assert referenced_names(expr) == {"streamssl_step_duration_seconds_bucket", "process_cpu_seconds_total"}
    assert "streamssl_step_duration_seconds" not in served_names(observed_metrics())  # a histogram's base name is not
