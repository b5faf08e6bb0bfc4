"""Alert and recording rules: promtool's syntax check and unit tests, names from a real scrape."""

from __future__ import annotations

from typing import Any

import yaml

from tests.deploy.promql import DEPLOY, own_metric_names, run_promtool, scraped_names

RULES = DEPLOY / "prometheus" / "rules" / "xaid.rules.yml"
RULE_TESTS = DEPLOY / "prometheus" / "tests" / "xaid.rules.test.yml"


def _rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_promtool_check_rules() -> None:
    result = run_promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_pass() -> None:
    result = run_promtool("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    alerts = {rule["alert"] for rule in _rules() if "alert" in rule}
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check["exp_alerts"] else quiet).add(check["alertname"])
    assert firing == alerts
    assert quiet == alerts


def test_rules_use_only_exported_metrics(scrape: str) -> None:
    used = own_metric_names(rule["expr"] for rule in _rules())
    assert used, "no xaid metric found in the rules"
    missing = sorted(used - scraped_names(scrape))
    assert not missing, f"rules use metrics the server does not export: {missing}"


def test_audit_write_failures_page() -> None:
    rules = {rule["alert"]: rule for rule in _rules() if "alert" in rule}
    rule = rules["XaidAuditWriteFailures"]
    assert "xaid_audit_write_failures_total" in rule["expr"]
    assert rule["labels"]["severity"] == "page"


def test_promtool_check_config() -> None:
    result = run_promtool("check", "config", str(DEPLOY / "prometheus" / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
