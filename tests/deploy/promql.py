"""promtool and PromQL helpers for the deploy checks: names used by an expression, parse checks."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
#: Metric prefixes xaid exports itself (DCGM_* come from NVIDIA's exporter).
OWN_PREFIXES = ("xaid_", "grpc_", "process_", "python_")

_MATCHERS = re.compile(r"\{[^}]*\}")
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_RANGES = re.compile(r"\[[^\]]*\]")
_NAME = re.compile(r"(?<![\w:.])([a-zA-Z_:][\w:]*)(?![\w:])(?!\s*\()")


def promtool() -> str:
    """The promtool binary; the test skips cleanly where it is missing (`make test` installs it)."""
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed (Debian package prometheus; `make promtool`)")
    return path


def run_promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], input=stdin, capture_output=True, text=True, timeout=60, check=False
    )


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (label names, functions and durations removed)."""
    text = _RANGES.sub(" ", _GROUPING.sub(" ", _MATCHERS.sub(" ", _STRINGS.sub('""', expr))))
    return {m.group(1) for m in _NAME.finditer(text)}


def own_metric_names(exprs: Iterable[str]) -> set[str]:
    return {n for e in exprs for n in metric_names(e) if n.startswith(OWN_PREFIXES)}


def scraped_names(scrape: str) -> set[str]:
    """Every sample name in a scrape (with _total, _bucket, _count, _sum as exported)."""
    return {s.name for family in text_string_to_metric_families(scrape) for s in family.samples}


def check_expressions(exprs: dict[str, str], tmp_path: Path) -> None:
    """Each expression parses: wrapped as recording rules, `promtool check rules` accepts them."""
    rules = [
        {"record": f"check:{i}", "expr": expr, "labels": {"source": name[:60]}}
        for i, (name, expr) in enumerate(exprs.items())
    ]
    path = tmp_path / "expressions.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "expressions", "rules": rules}]}))
    result = run_promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
