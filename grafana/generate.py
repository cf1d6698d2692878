"""Write the Grafana dashboards and Grafana-managed alert rules of carbon-proxy.

    python grafana/generate.py            # rewrite grafana/dashboards/*.json and
                                          # grafana/provisioning/alerting/carbon-proxy-alerts.json
    python grafana/generate.py --check    # exit 1 when a committed file is out of date

The JSON files are the product (Grafana provisions them, or you import them); this
script keeps their ids, grid and datasource references consistent, and derives the
Grafana alert rules from deploy/prometheus/rules/carbon-proxy-alerts.yml so the two
alerting paths cannot drift apart. Reading that YAML needs PyYAML (`pip install pyyaml`);
the dashboards need nothing beyond the standard library.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from promql_terms import terms  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DASHBOARDS = HERE / "dashboards"
ALERTS_OUT = HERE / "provisioning" / "alerting" / "carbon-proxy-alerts.json"
PROMETHEUS_ALERTS = ROOT / "deploy" / "prometheus" / "rules" / "carbon-proxy-alerts.yml"

DATASOURCE_UID = "prometheus"
"""The uid grafana/provisioning/datasources/prometheus.yaml gives the datasource."""
DS = {"type": "prometheus", "uid": "${datasource}"}
FOLDER = "carbon-proxy"
TAGS = ["carbon-proxy"]

# Label filters shared by panels; Grafana expands the variables (All = .*).
REQ = 'upstream=~"$upstream", model=~"$model", tenant=~"$tenant"'
INST = 'instance=~"$instance"'
GROUP = 'instance=~"$instance", group=~"$group"'
PROXY_JOB = 'job=~".*carbon-proxy.*"'
G_PER_KWH = 3.6e6
"""Intensity is exported in g/J (base units); dashboards show the usual g/kWh."""


# -- panel builders -----------------------------------------------------------------------


def target(expr: str, legend: str = "", *, instant: bool = False, table: bool = False) -> dict[str, Any]:
    t: dict[str, Any] = {"datasource": DS, "expr": expr, "legendFormat": legend or "__auto", "range": not instant, "instant": instant}
    if table:
        t["format"] = "table"
    return t


def _field_config(unit: str, *, decimals: int | None = None, mappings: list[dict[str, Any]] | None = None,
                  thresholds: list[tuple[float | None, str]] | None = None, stack: bool = False) -> dict[str, Any]:  # fmt: skip
    steps = [{"color": color, "value": value} for value, color in (thresholds or [(None, "green")])]
    defaults: dict[str, Any] = {"unit": unit, "thresholds": {"mode": "absolute", "steps": steps}, "mappings": mappings or []}
    if decimals is not None:
        defaults["decimals"] = decimals
    if stack:
        defaults["custom"] = {"stacking": {"mode": "normal", "group": "A"}, "fillOpacity": 25}
    return {"defaults": defaults, "overrides": []}


def timeseries(title: str, targets: list[dict[str, Any]], unit: str, *, w: int = 12, h: int = 8, description: str = "",
               stack: bool = False) -> dict[str, Any]:  # fmt: skip
    return {
        "type": "timeseries", "title": title, "description": description, "datasource": DS, "targets": targets,
        "fieldConfig": _field_config(unit, stack=stack),
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                    "tooltip": {"mode": "multi", "sort": "desc"}},
        "_size": (w, h),
    }  # fmt: skip


def stat(title: str, expr: str, unit: str, *, w: int = 4, h: int = 4, description: str = "", legend: str = "",
         decimals: int | None = None, mappings: list[dict[str, Any]] | None = None,
         thresholds: list[tuple[float | None, str]] | None = None, time_from: str | None = None,
         text_mode: str = "auto") -> dict[str, Any]:  # fmt: skip
    panel: dict[str, Any] = {
        "type": "stat", "title": title, "description": description, "datasource": DS,
        "targets": [target(expr, legend, instant=True)],
        "fieldConfig": _field_config(unit, decimals=decimals, mappings=mappings, thresholds=thresholds),
        "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}, "colorMode": "value",
                    "graphMode": "none", "textMode": text_mode, "justifyMode": "auto", "orientation": "auto"},
        "_size": (w, h),
    }  # fmt: skip
    if time_from:
        panel["timeFrom"] = time_from  # e.g. "now/d": today so far, whatever the dashboard range
    return panel


def table(title: str, expr: str, unit: str, *, w: int = 12, h: int = 8, description: str = "") -> dict[str, Any]:
    return {
        "type": "table", "title": title, "description": description, "datasource": DS,
        "targets": [target(expr, instant=True, table=True)],
        "fieldConfig": _field_config(unit),
        "options": {"showHeader": True, "sortBy": [{"displayName": "Value", "desc": True}]},
        "transformations": [{"id": "organize", "options": {"excludeByName": {"Time": True}}}],
        "_size": (w, h),
    }  # fmt: skip


def row(title: str) -> dict[str, Any]:
    return {"type": "row", "title": title, "collapsed": False, "panels": [], "_size": (24, 1)}


UP_MAPPING = [{"type": "value", "options": {"0": {"text": "DOWN", "color": "red"}, "1": {"text": "UP", "color": "green"}}}]
STALE_MAPPING = [{"type": "value", "options": {"0": {"text": "live", "color": "green"}, "1": {"text": "STALE", "color": "orange"}}}]


def variable(name: str, label: str, metric: str, label_name: str) -> dict[str, Any]:
    query = f"label_values({metric}, {label_name})"
    return {
        "type": "query", "name": name, "label": label, "datasource": DS, "definition": query, "query": query,
        "refresh": 2, "multi": True, "includeAll": True, "allValue": ".*", "sort": 1,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
    }  # fmt: skip


DATASOURCE_VARIABLE = {"type": "datasource", "name": "datasource", "label": "Data source", "query": "prometheus", "current": {}}


def dashboard(uid: str, title: str, description: str, variables: list[dict[str, Any]], panels: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "uid": uid, "title": title, "description": description, "tags": TAGS, "editable": True, "graphTooltip": 1,
        "schemaVersion": 39, "version": 1, "refresh": "30s", "timezone": "browser",
        "time": {"from": "now-6h", "to": "now"},
        "links": [{"type": "dashboards", "tags": TAGS, "asDropdown": True, "title": "carbon-proxy", "includeVars": False}],
        "templating": {"list": [DATASOURCE_VARIABLE, *variables]},
        "annotations": {"list": []},
        "panels": _layout(panels),
    }  # fmt: skip


def _layout(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Flow panels left to right, wrapping at 24 columns; ids in order."""
    x = y = row_height = 0
    out = []
    for panel_id, panel in enumerate(panels, start=1):
        w, h = panel.pop("_size")
        if x + w > 24:
            x, y = 0, y + row_height
            row_height = 0
        panel["id"] = panel_id
        panel["gridPos"] = {"x": x, "y": y, "w": w, "h": h}
        out.append(panel)
        x += w
        row_height = max(row_height, h)
        if panel["type"] == "row":
            x, y, row_height = 0, y + h, 0
    return out


# -- the dashboards ---------------------------------------------------------------------


def rate(metric: str, selector: str, window: str = "$__rate_interval") -> str:
    return f"rate({metric}{{{selector}}}[{window}])"


def overview() -> dict[str, Any]:
    co2e = "carbon_proxy_request_co2e_grams_total"
    energy = "carbon_proxy_request_energy_joules_total"
    tokens = "carbon_proxy_tokens_total"
    out_tokens = f'{REQ}, type="output"'
    panels = [
        row("Now and today"),
        stat("CO2e rate now", f"sum({rate(co2e, REQ)}) * 3600", "suffix: g/h", decimals=2,
             description="Request CO2e (operational + embodied) per hour at the current rate."),
        stat("CO2e today", f"sum(increase({co2e}{{{REQ}}}[$__range]))", "massg", time_from="now/d",
             description="Request CO2e since midnight (dashboard time zone)."),
        stat("Energy today", f"sum(increase({energy}{{{REQ}}}[$__range])) / 3.6e6", "kwatth", time_from="now/d",
             description="IT energy attributed to requests since midnight, before PUE."),
        stat("g CO2e per 1k output tokens", f"1000 * sum(increase({co2e}{{{REQ}}}[$__range])) / sum(increase({tokens}{{{out_tokens}}}[$__range]))",
             "massg", decimals=3, description="Over the selected time range."),
        stat("J per output token", f"sum(increase({energy}{{{REQ}}}[$__range])) / sum(increase({tokens}{{{out_tokens}}}[$__range]))",
             "joule", decimals=2, description="Over the selected time range."),
        stat("Requests/s", f"sum({rate('carbon_proxy_requests_total', REQ)})", "reqps", decimals=1),
        row("Who emits"),
        timeseries("CO2e rate by model", [target(f"sum by (model) ({rate(co2e, REQ)}) * 3600", "{{model}}")], "suffix: g/h", stack=True),
        timeseries("CO2e rate by tenant", [target(f"sum by (tenant) ({rate(co2e, REQ)}) * 3600", "{{tenant}}")], "suffix: g/h",
                   stack=True, description="Tenants outside the configured allow-list are folded into 'other'."),
        table("Top emitters (selected range)", f"topk(10, sum by (tenant, model, upstream) (increase({co2e}{{{REQ}}}[$__range])))",
              "massg", description="Grams CO2e per tenant, model and upstream over the dashboard's time range."),
        timeseries("CO2e per request (p50, p95)", [
            target(f"histogram_quantile(0.5, sum by (le, model) ({rate('carbon_proxy_per_request_co2e_grams_bucket', REQ)}))", "p50 {{model}}"),
            target(f"histogram_quantile(0.95, sum by (le, model) ({rate('carbon_proxy_per_request_co2e_grams_bucket', REQ)}))", "p95 {{model}}"),
        ], "massg"),
        row("Efficiency"),
        timeseries("g CO2e per 1k output tokens", [
            target(f"1000 * sum by (model) ({rate(co2e, REQ)}) / sum by (model) ({rate(tokens, out_tokens)})", "{{model}}"),
            target('carbon_proxy:co2e_per_1k_output_tokens_grams:rate1h{upstream=~"$upstream", model=~"$model"}', "{{model}} (1h)"),
        ], "massg"),
        timeseries("J per output token", [
            target(f"sum by (model) ({rate(energy, REQ)}) / sum by (model) ({rate(tokens, out_tokens)})", "{{model}}"),
            target('carbon_proxy:energy_per_output_token_joules:rate1h{upstream=~"$upstream", model=~"$model"}', "{{model}} (1h)"),
        ], "joule", description="Energy attributed to requests divided by the tokens they generated; the 1h line is what the regression alert compares with its day average."),
        timeseries("Tokens/s by type", [target(f"sum by (type) ({rate(tokens, REQ)})", "{{type}}")], "short", w=8),
        timeseries("Requests/s by outcome", [target(f"sum by (outcome) ({rate('carbon_proxy_requests_total', REQ)})", "{{outcome}}")],
                   "reqps", w=8),
        timeseries("Whole footprint: requests and idle", [
            target(f"sum({rate(co2e, REQ)}) * 3600", "requests"),
            target("sum(carbon_proxy:idle_co2e_grams:rate5m) * 3600", "idle (no request in flight)"),
        ], "suffix: g/h", w=8, stack=True, description="Idle energy belongs to no request; priced here at the current intensity and PUE."),
    ]  # fmt: skip
    variables = [
        variable("upstream", "Upstream", "carbon_proxy_requests_total", "upstream"),
        variable("model", "Model", 'carbon_proxy_requests_total{upstream=~"$upstream"}', "model"),
        variable("tenant", "Tenant", "carbon_proxy_requests_total", "tenant"),
    ]
    return dashboard("carbon-proxy-overview", "carbon-proxy: emissions overview",
                     "CO2e now and today, per model and tenant, efficiency trends and top emitters.", variables, panels)  # fmt: skip


def energy() -> dict[str, Any]:
    measured = "carbon_proxy_measured_energy_joules_total"
    attributed = "carbon_proxy_attributed_energy_joules_total"
    idle = "carbon_proxy_idle_energy_joules_total"
    panels = [
        row("Energy accounting"),
        stat("Measured power", f"sum({rate(measured, GROUP)})", "watt", decimals=0),
        stat("Idle share", f"sum(increase({idle}{{{GROUP}}}[$__range])) / sum(increase({measured}{{{GROUP}}}[$__range]))",
             "percentunit", decimals=1, description="Energy drawn while no request was in flight, over the selected range."),
        stat("Attribution drift (30m)", f"max(abs(carbon_proxy:attribution_drift:ratio_rate30m{{{GROUP}}}))", "percentunit",
             decimals=2, thresholds=[(None, "green"), (0.02, "red")],
             description="|attributed + idle - measured| / measured; alert above 2%."),
        stat("Meter", f"min(carbon_proxy_meter_up{{{INST}}})", "none", mappings=UP_MAPPING,
             thresholds=[(None, "red"), (1, "green")]),
        stat("Meter reading age", f"max(carbon_proxy_meter_staleness_seconds{{{INST}}})", "s", decimals=2,
             thresholds=[(None, "green"), (10, "red")]),
        stat("Prefill weight", f"max(carbon_proxy_prefill_weight_ratio{{{INST}}})", "none", decimals=3,
             description="Cost of a prompt token relative to an output token (configured or learned)."),
        timeseries("Measured vs attributed vs idle power", [
            target(f"sum by (group) ({rate(measured, GROUP)})", "measured {{group}}"),
            target(f"sum by (group) ({rate(attributed, GROUP)})", "attributed {{group}}"),
            target(f"sum by (group) ({rate(idle, GROUP)})", "idle {{group}}"),
            target(f"sum by (group) ({rate(measured, GROUP)}) - sum by (group) ({rate(attributed, GROUP)}) - sum by (group) ({rate(idle, GROUP)})",
                   "settling {{group}}"),
        ], "watt", w=16, description="measured = attributed + idle once settled; 'settling' is energy of requests still in flight."),
        timeseries("Attribution drift", [target(f"carbon_proxy:attribution_drift:ratio_rate30m{{{GROUP}}}", "{{instance}} {{group}}")],
                   "percentunit", w=8),
        row("Devices"),
        timeseries("Device power", [target(f"carbon_proxy_device_power_watts{{{INST}}}", "{{instance}} gpu {{device}}")], "watt", w=8),
        timeseries("Device energy rate (from counters)",
                   [target(f"rate(carbon_proxy_device_energy_joules_total{{{INST}}}[$__rate_interval])", "{{instance}} gpu {{device}}")],
                   "watt", w=8),
        timeseries("Idle power and in-flight requests", [
            target(f"carbon_proxy_idle_power_watts{{{GROUP}}}", "idle W {{group}}"),
            target(f"carbon_proxy_in_flight_requests{{{GROUP}}}", "in flight {{group}}"),
        ], "short", w=8),
        timeseries("Energy per request (p50, p95)", [
            target("histogram_quantile(0.5, sum by (le, model) (rate(carbon_proxy_per_request_energy_joules_bucket[$__rate_interval])))", "p50 {{model}}"),
            target("histogram_quantile(0.95, sum by (le, model) (rate(carbon_proxy_per_request_energy_joules_bucket[$__rate_interval])))", "p95 {{model}}"),
        ], "joule", w=12),
        timeseries("PUE by group", [target(f"carbon_proxy_pue_ratio{{{GROUP}}}", "{{group}}")], "none", w=12),
        row("Meter and proxy health"),
        timeseries("Meter reads", [
            target(f"sum by (meter) ({rate('carbon_proxy_meter_samples_total', INST)})", "good {{meter}}"),
            target(f"sum by (meter) ({rate('carbon_proxy_meter_read_failures_total', INST)})", "failed {{meter}}"),
        ], "reqps", w=8),
        timeseries("Meter read time and reading age", [
            target(f"carbon_proxy_meter_read_duration_seconds{{{INST}}}", "read {{meter}}"),
            target(f"carbon_proxy_meter_staleness_seconds{{{INST}}}", "age {{meter}}"),
        ], "s", w=8),
        timeseries("Proxy CPU", [target(f"rate(process_cpu_seconds_total{{{PROXY_JOB}, {INST}}}[$__rate_interval])", "{{instance}}")],
                   "percentunit", w=8, description="CPU seconds per second of each proxy process."),
        timeseries("Proxy overhead (p50, p99)", [
            target(f"histogram_quantile(0.5, sum by (le, upstream) ({rate('carbon_proxy_overhead_seconds_bucket', INST)}))", "p50 {{upstream}}"),
            target(f"histogram_quantile(0.99, sum by (le, upstream) ({rate('carbon_proxy_overhead_seconds_bucket', INST)}))", "p99 {{upstream}}"),
        ], "s", description="Proxy time before the upstream call (routing, dialect, attribution, headers)."),
        timeseries("Time to first byte (p50, p99)", [
            target(f"histogram_quantile(0.5, sum by (le, upstream) ({rate('carbon_proxy_time_to_first_byte_seconds_bucket', INST)}))", "p50 {{upstream}}"),
            target(f"histogram_quantile(0.99, sum by (le, upstream) ({rate('carbon_proxy_time_to_first_byte_seconds_bucket', INST)}))", "p99 {{upstream}}"),
        ], "s"),
    ]  # fmt: skip
    variables = [
        variable("instance", "Proxy", "carbon_proxy_meter_up", "instance"),
        variable("group", "Device group", 'carbon_proxy_measured_energy_joules_total{instance=~"$instance"}', "group"),
    ]
    return dashboard("carbon-proxy-energy", "carbon-proxy: energy accounting",
                     "Measured vs attributed vs idle energy per device group, devices, meter and proxy health.", variables, panels)  # fmt: skip


def grid() -> dict[str, Any]:
    intensity = f"carbon_proxy_grid_intensity_grams_per_joule{{{INST}}}"
    panels = [
        row("Grid carbon intensity"),
        stat("Intensity now", f"max({intensity}) * 3.6e6", "suffix: g/kWh", decimals=0),
        stat("Source", intensity, "none", legend="{{source}}", text_mode="name", w=6,
             description="Where the intensity comes from: constant, table:<zone> or a live provider."),
        stat("Stale", f"max(carbon_proxy_grid_intensity_stale{{{INST}}})", "none", mappings=STALE_MAPPING,
             thresholds=[(None, "green"), (1, "orange")]),
        stat("Provider", f"min(carbon_proxy_intensity_provider_up{{{INST}}})", "none", mappings=UP_MAPPING,
             thresholds=[(None, "red"), (1, "green")], w=3),
        stat("Last provider answer", f"max(carbon_proxy_intensity_provider_staleness_seconds{{{INST}}})", "s", decimals=0, w=3),
        stat("vs 1-day average", f"max(carbon_proxy:grid_intensity:ratio_avg1d{{{INST}}})", "none", decimals=2, w=4,
             thresholds=[(None, "green"), (1.5, "orange")], description="The spike alert fires above 1.5."),
        timeseries("Grid intensity by source", [target(f"{intensity} * 3.6e6", "{{instance}} {{source}}")], "suffix: g/kWh", w=16),
        timeseries("Intensity relative to its 1-day average",
                   [target(f"carbon_proxy:grid_intensity:ratio_avg1d{{{INST}}}", "{{instance}}")], "none", w=8),
        row("Provider health"),
        timeseries("Stale flag", [target(f"carbon_proxy_grid_intensity_stale{{{INST}}}", "{{instance}} {{source}}")], "none", w=8),
        timeseries("Provider up and consecutive failures", [
            target(f"carbon_proxy_intensity_provider_up{{{INST}}}", "up {{provider}}"),
            target(f"carbon_proxy_intensity_provider_consecutive_failures{{{INST}}}", "failures {{provider}}"),
        ], "short", w=8),
        timeseries("Age of the provider's last answer",
                   [target(f"carbon_proxy_intensity_provider_staleness_seconds{{{INST}}}", "{{provider}}")], "s", w=8),
        row("Carbon-aware routing"),
        stat("Avoided, last 24 h (predicted)", f"sum(increase(carbon_proxy_avoided_co2e_grams_total{{{INST}}}[1d]))",
             "suffix: g", decimals=1, w=6,
             description="Predicted grams of the baseline policy's choices minus those of the chosen upstreams "
                         "(X-Carbon-Route). A counterfactual: the baseline never ran."),
        timeseries("Avoided gCO2e per hour, by upstream chosen (predicted)", [
            target(f"sum by (upstream, policy, baseline) (rate(carbon_proxy_avoided_co2e_grams_total{{{INST}}}[$__rate_interval])) * 3600",
                   "{{upstream}} ({{policy}} vs {{baseline}})"),
        ], "suffix: g/h", w=9),
        timeseries("Where the routing policy sends requests", [
            target(f"sum by (upstream) (rate(carbon_proxy_routed_requests_total{{{INST}}}[$__rate_interval]))", "{{upstream}}"),
        ], "reqps", w=9, stack=True),
        row("Deferred work (Batch API)"),
        stat("Avoided by batches, last 24 h", f"sum(increase(carbon_proxy_batch_avoided_co2e_grams_total{{{INST}}}[1d]))",
             "suffix: g", decimals=1, w=6,
             description="Grams finished batches emitted less than they would have run at submission "
                         "(each batch's carbon.avoided_grams)."),
        stat("Lines deferred now", f"sum(carbon_proxy_batch_deferred_requests{{{INST}}})", "short", decimals=0, w=6,
             description="Lines of accepted batches not started yet: waiting for their low-carbon window, or for room."),
        stat("Guard breaches, last 1 h", f"sum(increase(carbon_proxy_batch_latency_breaches_total{{{INST}}}[1h]))", "short",
             decimals=0, w=6, thresholds=[(None, "green"), (1, "orange")],
             description="Windows in which interactive p95 latency was over its objective: batch lines paused and their limit halved."),
        stat("Batch line limit now", f"sum(carbon_proxy_batch_allowed_in_flight_requests{{{INST}}})", "short", decimals=0, w=6,
             description="Lines allowed in flight: [batches] max_concurrency, lowered by the latency guard; 0 = paused."),
        timeseries("Batch lines deferred, in flight and allowed", [
            target(f"sum(carbon_proxy_batch_deferred_requests{{{INST}}})", "deferred"),
            target(f"sum(carbon_proxy_batch_in_flight_requests{{{INST}}})", "in flight"),
            target(f"sum(carbon_proxy_batch_allowed_in_flight_requests{{{INST}}})", "allowed (latency guard)"),
        ], "short", w=8),
        timeseries("Batch lines ended per minute, by state", [
            target(f"sum by (state) (rate(carbon_proxy_batch_lines_total{{{INST}}}[$__rate_interval])) * 60", "{{state}}"),
        ], "short", w=8, stack=True),
        timeseries("gCO2e avoided by batches per hour", [
            target(f"sum(rate(carbon_proxy_batch_avoided_co2e_grams_total{{{INST}}}[$__rate_interval])) * 3600", "avoided"),
        ], "suffix: g/h", w=8),
    ]  # fmt: skip
    variables = [variable("instance", "Proxy", "carbon_proxy_grid_intensity_grams_per_joule", "instance")]
    return dashboard("carbon-proxy-grid", "carbon-proxy: grid intensity",
                     "The grid carbon intensity the proxy prices energy with, its source and staleness; work shifted in space and time.", variables, panels)  # fmt: skip


# -- Grafana alert rules from the Prometheus ones ------------------------------------------

_EVALUATORS = {">": "gt", "<": "lt"}


def _query(ref: str, expr: str) -> dict[str, Any]:
    return {
        "refId": ref, "relativeTimeRange": {"from": 600, "to": 0}, "datasourceUid": DATASOURCE_UID,
        "model": {"refId": ref, "expr": expr, "instant": True, "range": False, "intervalMs": 1000, "maxDataPoints": 43200,
                  "datasource": {"type": "prometheus", "uid": DATASOURCE_UID}},
    }  # fmt: skip


def _expression(ref: str, model: dict[str, Any]) -> dict[str, Any]:
    return {
        "refId": ref, "relativeTimeRange": {"from": 0, "to": 0}, "datasourceUid": "__expr__",
        "model": {"refId": ref, "datasource": {"type": "__expr__", "uid": "__expr__"}, **model},
    }


def grafana_rule(rule: dict[str, Any]) -> dict[str, Any]:
    """One Prometheus alert as a Grafana rule: per term, query -> last value -> threshold;
    terms joined with && (Prometheus `and` on identical label sets)."""
    name = rule["alert"]
    data: list[dict[str, Any]] = []
    conditions: list[str] = []
    parts = terms(rule["expr"])
    for i, term in enumerate(parts, start=1):
        if term.op not in _EVALUATORS or term.threshold is None:
            raise SystemExit(f"{name}: each term must be `VALUE > NUMBER` or `VALUE < NUMBER`, got {term}")
        query, last, check = f"A{i}", f"B{i}", f"C{i}"
        data.append(_query(query, term.value))
        data.append(_expression(last, {"type": "reduce", "expression": query, "reducer": "last", "settings": {"mode": "dropNN"}}))
        data.append(_expression(check, {"type": "threshold", "expression": last,
                                        "conditions": [{"evaluator": {"type": _EVALUATORS[term.op], "params": [term.threshold]}}]}))  # fmt: skip
        conditions.append(check)
    condition = conditions[0]
    if len(conditions) > 1:
        condition = "D"
        data.append(_expression(condition, {"type": "math", "expression": " && ".join(f"${c}" for c in conditions)}))
    slug = re.sub(r"(?<!^)(?=[A-Z])", "-", name.removeprefix("CarbonProxy")).lower()
    return {
        "uid": f"carbon-proxy-{slug}"[:40], "title": name, "condition": condition, "data": data,
        "for": rule.get("for", "0s"), "noDataState": "OK", "execErrState": "Error", "isPaused": False,
        "labels": dict(rule.get("labels", {})), "annotations": dict(rule.get("annotations", {})),
    }  # fmt: skip


def grafana_alerts() -> dict[str, Any]:
    import yaml  # only the alert conversion needs it

    groups = yaml.safe_load(PROMETHEUS_ALERTS.read_text(encoding="utf-8"))["groups"]
    rules = [grafana_rule(rule) for group in groups for rule in group["rules"] if "alert" in rule]
    return {"apiVersion": 1, "groups": [{"orgId": 1, "name": "carbon-proxy", "folder": FOLDER, "interval": "1m", "rules": rules}]}


def outputs() -> dict[Path, dict[str, Any]]:
    return {
        DASHBOARDS / "carbon-proxy-overview.json": overview(),
        DASHBOARDS / "carbon-proxy-energy.json": energy(),
        DASHBOARDS / "carbon-proxy-grid.json": grid(),
        ALERTS_OUT: grafana_alerts(),
    }


def render(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a committed file differs from what would be written")
    args = parser.parse_args()
    stale = []
    for path, document in outputs().items():
        text = render(document)
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(path)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    for path in stale:
        print(f"out of date: {path.relative_to(ROOT)} (run python grafana/generate.py)", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
