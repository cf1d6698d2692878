"""The Prometheus config and rules under promtool; the Grafana files' structure."""

from __future__ import annotations

import json
import re

import pytest

from .tools import (
    DASHBOARD_FILES, GRAFANA, GRAFANA_ALERTS, PROMETHEUS_DIR, RULE_FILES, RULE_TESTS,
    grafana_alert_rules, load_grafana_module, promql_terms, require_binary, run_tool,
)  # fmt: skip


def test_promtool_check_config_and_rules() -> None:
    promtool = require_binary("promtool")
    result = run_tool(promtool, "check", "config", str(PROMETHEUS_DIR / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    result = run_tool(promtool, "check", "rules", *map(str, RULE_FILES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARNING" not in result.stdout + result.stderr


def test_promtool_test_rules() -> None:
    promtool = require_binary("promtool")
    assert RULE_TESTS, "deploy/prometheus/tests/*.yml"
    result = run_tool(promtool, "test", "rules", *map(str, RULE_TESTS), timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def _alert_names_in(paths: list) -> set[str]:
    names: set[str] = set()
    for path in paths:
        names |= set(re.findall(r"^\s*-\s*alert:\s*(\w+)", path.read_text(encoding="utf-8"), re.MULTILINE))
    return names


def test_every_alert_has_a_unit_test_and_a_grafana_twin() -> None:
    alerts = _alert_names_in(RULE_FILES)
    assert {"CarbonProxyEmissionsBudgetBurnFast", "CarbonProxyEnergyPerTokenRegression", "CarbonProxyGridIntensitySpike",
            "CarbonProxyMeterDown", "CarbonProxyMeterStale", "CarbonProxyAttributionDrift"} <= alerts  # fmt: skip
    tested = set()
    for path in RULE_TESTS:
        tested |= set(re.findall(r"alertname:\s*(\w+)", path.read_text(encoding="utf-8")))
    assert alerts == tested, f"alerts without a promtool test: {alerts - tested}"
    assert {rule["title"] for rule in grafana_alert_rules()} == alerts


def test_dashboards_are_what_the_generator_writes() -> None:
    generate = load_grafana_module("generate")
    for build, name in ((generate.overview, "overview"), (generate.energy, "energy"), (generate.grid, "grid")):
        path = GRAFANA / "dashboards" / f"carbon-proxy-{name}.json"
        assert path.read_text(encoding="utf-8") == generate.render(build()), f"{path.name} is stale: run python grafana/generate.py"


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.name)
def test_dashboard_structure(path) -> None:
    board = json.loads(path.read_text(encoding="utf-8"))
    assert board["uid"].startswith("carbon-proxy-") and len(board["uid"]) <= 40
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"])
        assert panel["fieldConfig"]["defaults"]["unit"]
    variables = {v["name"] for v in board["templating"]["list"]}
    assert "datasource" in variables
    for panel in board["panels"]:
        for t in panel.get("targets", []):
            for used in re.findall(r"\$\{?(\w+)", t["expr"]):
                assert used.startswith("__") or used in variables, f"{panel['title']}: ${used} is no variable"


def test_grafana_alert_rules_are_well_formed() -> None:
    document = json.loads(GRAFANA_ALERTS.read_text(encoding="utf-8"))
    assert document["apiVersion"] == 1
    rules = grafana_alert_rules()
    uids = [r["uid"] for r in rules]
    assert len(uids) == len(set(uids)) and all(len(u) <= 40 for u in uids)
    datasource = (GRAFANA / "provisioning" / "datasources" / "prometheus.yaml").read_text(encoding="utf-8")
    assert re.search(r"^\s*uid:\s*prometheus\s*$", datasource, re.MULTILINE)
    for rule in rules:
        refs = {q["refId"]: q for q in rule["data"]}
        assert rule["condition"] in refs
        for query in rule["data"]:
            model = query["model"]
            if query["datasourceUid"] == "__expr__":
                source = model.get("expression", "")
                for ref in re.findall(r"\$?([A-Z]\d*)", source) if model["type"] == "math" else [source]:
                    assert ref in refs, f"{rule['title']}: {query['refId']} reads missing {ref}"
            else:
                assert query["datasourceUid"] == "prometheus" and model["instant"] is True
                assert promql_terms.split_comparison(model["expr"]).op is None, "thresholds belong in Grafana expressions"
        assert "$" not in rule["title"] and all("$" not in v for v in rule["labels"].values())  # provisioning expands $VARS
