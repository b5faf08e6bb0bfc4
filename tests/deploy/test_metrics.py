"""The live /metrics endpoint: promtool's lint, and the README's catalogue against a real scrape."""

from __future__ import annotations

import re

from tests.deploy.promql import REPO, run_promtool, scraped_names

README_METRIC = re.compile(r"`((?:xaid|grpc)_[a-z_]+)`")


def test_promtool_check_metrics_passes_on_a_real_scrape(scrape: str) -> None:
    assert "xaid_explain_duration_seconds_count" in scrape  # the Explain happened
    result = run_promtool("check", "metrics", stdin=scrape)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_metric_in_the_readme_is_exported(scrape: str) -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    first_cells = [line.split("|")[1] for line in section.splitlines() if line.startswith("|")]
    documented = {name for cell in first_cells for name in README_METRIC.findall(cell)}
    assert "xaid_build_info" in documented
    scraped = scraped_names(scrape)
    families = {re.sub(r"_(bucket|count|sum|created)$", "", name) for name in scraped}
    missing = sorted(n for n in documented if n not in scraped and n not in families)
    assert not missing, f"README lists metrics the server does not export: {missing}"


def test_build_info_and_model_load_duration_are_exported(scrape: str) -> None:
    names = scraped_names(scrape)
    assert "xaid_build_info" in names
    assert "xaid_model_load_duration_seconds_count" in names
    loads = re.findall(
        r'^xaid_model_load_duration_seconds_count\{model="(\w+)"\} (\S+)$', scrape, re.M
    )
    assert {model for model, count in loads if float(count) >= 1} >= {"shapes", "tabular"}
