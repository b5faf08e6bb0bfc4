"""The Grafana dashboard: expressions parse, xaid's metrics exist in a real scrape, units set."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.promql import DEPLOY, check_expressions, own_metric_names, scraped_names

GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "xaid.json"
#: Grafana's built-in interval variables, replaced by a plausible value before parsing.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "30s", "$__range": "1h"}


def _panels() -> list[dict[str, Any]]:
    panels: list[dict[str, Any]] = json.loads(DASHBOARD.read_text())["panels"]
    return [p for p in panels if p["type"] != "row"]


def _expressions() -> dict[str, str]:
    exprs: dict[str, str] = {}
    for panel in _panels():
        for target in panel["targets"]:
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, f"{panel['title']}: unknown variable in {expr}"
            exprs[f"{panel['title']} {target['refId']}"] = expr
    return exprs


def test_rows_cover_the_operations_catalogue() -> None:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    rows = [p["title"] for p in panels if p["type"] == "row"]
    assert [r.split(" ")[0] for r in rows] == [
        "Overview",
        "Explain",
        "Models",
        "GPU",
        "Process",
        "Audit",
    ]


def test_every_panel_expression_parses(tmp_path: Path) -> None:
    check_expressions(_expressions(), tmp_path)


def test_every_xaid_metric_a_panel_uses_is_exported(scrape: str) -> None:
    used = own_metric_names(_expressions().values())
    assert {"xaid_inflight_requests", "grpc_server_handled_total"} <= used
    missing = sorted(used - scraped_names(scrape))
    assert not missing, f"panels use metrics the server does not export: {missing}"


def test_gpu_panels_use_dcgm_exporter_names() -> None:
    text = " ".join(_expressions().values())
    assert {"DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED"} <= set(re.findall(r"DCGM_\w+", text))


def test_every_panel_has_a_unit_and_the_templated_datasource() -> None:
    for panel in _panels():
        assert panel["fieldConfig"]["defaults"].get("unit"), f"{panel['title']} has no unit"
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], f"{panel['title']} has no query"


def test_panel_ids_are_unique() -> None:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))


def test_audit_row_shows_records_per_second_and_write_failures() -> None:
    audit = {name: expr for name, expr in _expressions().items() if name.startswith("Audit")}
    assert set(audit) == {"Audit records A", "Audit write failures A"}
    assert "rate(xaid_audit_records_total" in audit["Audit records A"]
    assert "xaid_audit_write_failures_total" in audit["Audit write failures A"]


def test_provisioning_loads_the_dashboard_from_the_mounted_folder() -> None:
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "xaid.yaml").read_text())
    path = provider["providers"][0]["options"]["path"]
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"])
    assert mounts["./grafana/dashboards"] == path
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    source = yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "prometheus.yaml").read_text()
    )["datasources"][0]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    assert "prometheus" in compose["services"]
