"""The Grafana dashboard (ops/grafana/archipelago.json) parses, every query in it names only series
the project exports, and every series the project exports is on it.

The exported names come from the code's own registries: the coordinator's `Metrics` and an
island's `IslandMetrics`, instantiated here without a port. With promtool on PATH (Debian's
prometheus package) every query must also parse as PromQL.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "ops" / "grafana" / "archipelago.json"
SERIES = re.compile(r"\barchipelago_[a-z0-9_]+")
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
            "gauge": ("",)}


def registries() -> list:
    from coordinator.metrics import Metrics
    from island.telemetry import IslandMetrics

    return [Metrics().registry, IslandMetrics("island-0").registry]


def exported() -> dict[str, set[str]]:
    """Each exported metric family -> the series names Prometheus stores for it."""
    out: dict[str, set[str]] = {}
    for registry in registries():
        for family in registry.collect():
            out[family.name] = {family.name + suffix for suffix in SUFFIXES[family.type]}
    return out


def queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())

    def walk(panels: list[dict]):
        for panel in panels:
            yield from (t["expr"] for t in panel.get("targets", []))
            yield from walk(panel.get("panels", []))

    return list(walk(dashboard["panels"]))


def test_every_query_names_exported_series_and_every_series_is_shown():
    families = exported()
    names = set().union(*families.values())
    exprs = queries()
    assert len(exprs) >= 20
    for expr in exprs:
        used = set(SERIES.findall(expr))
        assert used, f"query names no archipelago series: {expr}"
        assert used <= names, f"query names series nobody exports: {sorted(used - names)} in {expr}"
    shown = {name for expr in exprs for name in SERIES.findall(expr)}
    missing = [family for family, series in families.items() if not series & shown]
    assert not missing, f"exported but on no panel: {missing}"


def test_exported_names_follow_prometheus_conventions():
    for family in exported():
        assert family.startswith(("archipelago_coordinator_", "archipelago_island_")), family
        assert not family.endswith("_total"), family  # the client library adds it to counters' samples
        assert not re.search(r"_(ms|milliseconds|kb|mb|minutes|hours)$", family), f"{family}: use base units"


@pytest.mark.prometheus
@pytest.mark.skipif(shutil.which("promtool") is None, reason="no promtool on PATH (apt-get install -y prometheus)")
def test_every_query_parses_as_promql(tmp_path):
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": expr.replace("$__rate_interval", "1m")}
        for i, expr in enumerate(queries())]}]}
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules, allow_unicode=True))
    result = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
