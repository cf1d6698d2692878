"""A real Prometheus scraping a proxy under simulated traffic: every PromQL expression of
the dashboards, the Grafana alert rules and the Prometheus rule files must return data.

Alert expressions return nothing while they do not fire, so each is also split at its
top-level comparisons and set operators (grafana/promql_terms.py) and every value side
must return data; the whole expression must still evaluate without error. Nothing is
skipped: an expression that cannot return data here is a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import time
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest

from helpers import FakeMeter
from proxy.serve import Service

from .tools import (
    ALLOWED_TENANTS, RULE_FILES, chat_body, dashboard_queries, fast_upstream, grafana_alert_queries, grafana_alert_rules,
    instant_query, prometheus, promql_terms, require_binary, run_tool, send_chat, start_service, stop_service, substitute,
)  # fmt: skip

DEADLINE_SECONDS = 45.0
MODELS = ("llama-3-8b", "mistral-7b")


@contextlib.asynccontextmanager
async def sim_upstream() -> AsyncIterator[tuple[str, Any]]:
    """The project's simulated model server and its GPU as the meter; a plain OpenAI-shaped
    server and a constant-power meter if the sim is not available."""
    try:
        from proxy.meters.sim import SimMeter
        from proxy.sim.config import SimModelConfig
        from proxy.sim.gpu import SimGpu
        from proxy.sim.server import run_sim_server
    except ImportError:
        runner, url = await fast_upstream()
        try:
            yield url, FakeMeter(watts=300.0)
        finally:
            await runner.cleanup()
        return
    gpu = SimGpu(("0",), idle_power_watts=70.0)
    server = await run_sim_server(config=SimModelConfig(tokens_per_second=200.0), gpu=gpu)
    try:
        yield server.url, SimMeter(gpu)
    finally:
        await server.close()


async def traffic(service: Service, stop: asyncio.Event, workers: int = 4) -> int:
    """Streaming and buffered chat requests from allow-listed and unknown tenants."""
    counter = itertools.count()
    sent = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal sent
        while not stop.is_set():
            i = next(counter)
            tenant = ALLOWED_TENANTS[i % 2] if i % 3 else f"guest-{i}"
            await send_chat(session, service.public_port, tenant, chat_body(MODELS[i % 2], stream=bool(i % 2), max_tokens=6))
            sent += 1

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(worker(session) for _ in range(workers)))
    return sent


async def check(session: aiohttp.ClientSession, url: str, where: str, expr: str) -> list[str]:
    """Problems with one expression: it must evaluate, and each value side return data."""
    query = substitute(expr)
    answer = await instant_query(session, url, query)
    if answer.get("status") != "success":
        return [f"{where}: {query!r} failed: {answer.get('error')}"]
    problems = []
    for value in promql_terms.value_expressions(query):
        data = answer if value == query else await instant_query(session, url, value)
        if data.get("status") != "success":
            problems.append(f"{where}: {value!r} failed: {data.get('error')}")
        elif data["data"]["resultType"] == "vector" and not data["data"]["result"]:
            problems.append(f"{where}: {value!r} returned no data")
    return problems


async def loaded_rules(session: aiohttp.ClientSession, url: str) -> list[dict[str, Any]]:
    async with session.get(f"{url}/api/v1/rules") as response:
        body = await response.json()
    return [rule for group in body["data"]["groups"] for rule in group["rules"]]


def _compact(expr: str) -> str:
    return re.sub(r"\s+", "", expr)


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)", duration))


def check_grafana_twins(rules: list[dict[str, Any]]) -> None:
    """Each Prometheus alert (as Prometheus parsed it) has a Grafana rule with the same
    queries, comparisons, thresholds, `for`, labels and annotations."""
    grafana = {rule["title"]: rule for rule in grafana_alert_rules()}
    alerts = [rule for rule in rules if rule["type"] == "alerting"]
    assert {a["name"] for a in alerts} == set(grafana)
    evaluator = {"gt": ">", "lt": "<"}
    for alert in alerts:
        twin = grafana[alert["name"]]
        data = {q["refId"]: q["model"] for q in twin["data"]}
        expected = promql_terms.terms(alert["query"])
        assert len([r for r in data if r.startswith("A")]) == len(expected), alert["name"]
        for i, term in enumerate(expected, start=1):
            threshold = data[f"C{i}"]["conditions"][0]["evaluator"]
            assert _compact(data[f"A{i}"]["expr"]) == _compact(term.value), (alert["name"], data[f"A{i}"]["expr"], term.value)
            assert (evaluator[threshold["type"]], threshold["params"][0]) == (term.op, term.threshold), alert["name"]
        assert _seconds(twin["for"]) == alert["duration"], alert["name"]
        assert twin["labels"] == alert["labels"] and twin["annotations"] == alert["annotations"], alert["name"]


async def test_every_expression_returns_data_from_a_real_prometheus(tmp_path: Path) -> None:
    require_binary("prometheus")
    promtool = require_binary("promtool")
    started = time.monotonic()
    async with sim_upstream() as (upstream_url, meter):
        service = await start_service(upstream_url, meter)
        stop = asyncio.Event()
        load = asyncio.create_task(traffic(service, stop))
        try:
            async with prometheus(tmp_path, service.admin_port) as url, aiohttp.ClientSession() as session:
                rules = await loaded_rules(session, url)
                # Prometheus loaded every rule the files hold (promtool counts them too).
                counted = run_tool(promtool, "check", "rules", *map(str, RULE_FILES))
                assert len(rules) == sum(int(n) for n in re.findall(r"SUCCESS: (\d+) rules found", counted.stdout)) > 0
                check_grafana_twins(rules)

                expressions = dashboard_queries() + grafana_alert_queries()
                expressions += [(f"{rule['type']} rule {rule['name']}", rule["query"]) for rule in rules]
                assert len(expressions) > 60
                while True:
                    problems: list[str] = []
                    for where, expr in expressions:
                        problems += await check(session, url, where, expr)
                    if not problems:
                        break
                    if time.monotonic() - started > DEADLINE_SECONDS:
                        pytest.fail(f"{len(problems)} of {len(expressions)} expressions without data:\n" + "\n".join(problems))
                    await asyncio.sleep(1.0)
        finally:
            stop.set()
            sent = await asyncio.wait_for(load, 40)
            await stop_service(service)
    assert sent > 0
