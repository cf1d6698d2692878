"""What the metrics tests share: the Prometheus binaries, the PromQL of the dashboards
and rule files, and a proxy with a traffic generator.

Prometheus and promtool come from the Debian package `prometheus` (.ci/run installs it).
Locally a missing binary skips the test that needs it, with the reason; under CI (the CI
environment variable set) it fails instead, so CI can never pass by skipping.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import aiohttp
import pytest
from aiohttp import web

from proxy.carbon.intensity import ConstantIntensity
from proxy.config import config_from_dict
from proxy.receipts.model import MemoryReceiptStore
from proxy.serve import Service

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "grafana"
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
RULE_FILES = sorted((PROMETHEUS_DIR / "rules").glob("*.yml"))
RULE_TESTS = sorted((PROMETHEUS_DIR / "tests").glob("*.yml"))
DASHBOARD_FILES = sorted((GRAFANA / "dashboards").glob("*.json"))
GRAFANA_ALERTS = GRAFANA / "provisioning" / "alerting" / "carbon-proxy-alerts.json"

ALLOWED_TENANTS = ("team-a", "team-b")
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=30)
"""No request of these tests may hang the suite: a stuck proxy fails the test instead."""
TENANT_HEADER = "X-Tenant-Id"


def load_grafana_module(name: str) -> Any:
    """grafana/*.py are scripts, not a package: load one by path."""
    spec = importlib.util.spec_from_file_location(f"grafana_{name}", GRAFANA / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


promql_terms = load_grafana_module("promql_terms")


def require_binary(name: str) -> str:
    path = shutil.which(name)
    if path is not None:
        return path
    reason = f"{name} is not installed (Debian package 'prometheus'; .ci/run installs it)"
    if os.environ.get("CI"):
        pytest.fail(f"{reason}: CI must run this test, not skip it", pytrace=False)
    pytest.skip(reason)


def run_tool(*args: str, stdin: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


# -- PromQL found in the dashboards and Grafana alert rules -----------------------------------

# What Grafana substitutes before a query reaches Prometheus, sized for a test Prometheus
# scraping every second for under a minute.
GRAFANA_INTERVALS = {"$__rate_interval": "15s", "$__interval": "5s", "$__range": "5m"}
_VARIABLE = re.compile(r"\$\{?(\w+)\}?")
_LABEL_VALUES = re.compile(r"^\s*label_values\((.*),\s*(\w+)\s*\)\s*$", re.DOTALL)


def substitute(expr: str) -> str:
    for name, value in GRAFANA_INTERVALS.items():
        expr = expr.replace(name, value)
    # Template variables are always used as regex matchers (=~"$model"): All = .*
    return _VARIABLE.sub(".*", expr)


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and template variable of every dashboard."""
    found: list[tuple[str, str]] = []
    for path in DASHBOARD_FILES:
        board = json.loads(path.read_text(encoding="utf-8"))
        for panel in _walk(board.get("panels", [])):
            for t in panel.get("targets", []) or []:
                if t.get("expr"):
                    found.append((f"{path.name}: {panel.get('title')} [{t.get('refId', '')}{t.get('legendFormat', '')}]", t["expr"]))
        for var in board.get("templating", {}).get("list", []):
            if var.get("type") != "query":
                continue
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            match = _LABEL_VALUES.match(query)
            # label_values(metric, label) is Grafana's; the PromQL behind it is a count by label.
            expr = f"count by ({match.group(2)}) ({match.group(1)})" if match else query
            found.append((f"{path.name}: variable ${var['name']}", expr))
    return found


def grafana_alert_rules() -> list[dict[str, Any]]:
    document = json.loads(GRAFANA_ALERTS.read_text(encoding="utf-8"))
    return [rule for group in document["groups"] for rule in group["rules"]]


def grafana_alert_queries() -> list[tuple[str, str]]:
    found = []
    for rule in grafana_alert_rules():
        for query in rule["data"]:
            if query["datasourceUid"] != "__expr__":
                found.append((f"grafana alert {rule['title']} [{query['refId']}]", query["model"]["expr"]))
    return found


# -- a proxy under traffic -------------------------------------------------------------------


def proxy_config(upstream_url: str, **extra: Any) -> dict[str, Any]:
    return {
        "server": {"listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0", "drain_seconds": 2},
        "upstreams": [{"name": "sim", "url": upstream_url, "dialect": "openai", "devices": ["0"]}],
        "meter": {"interval_ms": 50},
        "carbon": {"intensity": 450, "pue": 1.2},
        "attribution": {"idle_power_watts": 60},
        "receipts": {"path": ":memory:"},
        "tenants": {"header": TENANT_HEADER, "allow": list(ALLOWED_TENANTS)},
        **extra,
    }


async def start_service(upstream_url: str, meter: Any, **extra: Any) -> Service:
    service = Service(
        config_from_dict(proxy_config(upstream_url, **extra)),
        meter=meter,
        intensity=ConstantIntensity(450),
        receipts=MemoryReceiptStore(),
    )
    await service.start()
    return service


async def stop_service(service: Service, deadline_seconds: float = 20.0) -> None:
    """Service.stop(), failing the test rather than hanging if shutdown never ends."""
    await asyncio.wait_for(service.stop(), deadline_seconds)


async def fast_upstream() -> tuple[web.AppRunner, str]:
    """A minimal OpenAI-shaped server: answers at once with a fixed usage block."""

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        return web.json_response({
            "id": "chatcmpl-test", "object": "chat.completion", "model": body.get("model", "m"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16},
        })  # fmt: skip

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


def chat_body(model: str, *, stream: bool = False, max_tokens: int = 8) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "messages": [{"role": "user", "content": "How green is this?"}]}
    if stream:
        body["stream"] = True
    return body


async def send_chat(session: aiohttp.ClientSession, port: int, tenant: str, body: dict[str, Any]) -> int:
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    async with session.post(url, json=body, headers={TENANT_HEADER: tenant}, timeout=REQUEST_TIMEOUT) as response:
        await response.read()
        return response.status


async def scrape(admin_port: int) -> str:
    async with aiohttp.ClientSession(timeout=REQUEST_TIMEOUT) as session:
        async with session.get(f"http://127.0.0.1:{admin_port}/metrics") as response:
            assert response.status == 200
            return await response.text()


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        assert match, f"unparseable exposition line: {line!r}"
        labels = dict(_LABEL.findall(match.group(3) or ""))
        samples.append((match.group(1), labels, float(match.group(4))))
    return samples


# -- a real Prometheus ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def prometheus(tmp_path: Path, scrape_port: int) -> AsyncIterator[str]:
    """A Prometheus scraping 127.0.0.1:scrape_port every second, with the project's rule
    files evaluated every second. Yields its base URL once it is ready."""
    binary = require_binary("prometheus")
    rules = "\n".join(f"  - {path}" for path in RULE_FILES)
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"rule_files:\n{rules}\n"
        "scrape_configs:\n  - job_name: carbon-proxy\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{scrape_port}']\n",
        encoding="utf-8",
    )
    port = free_port()
    log = (tmp_path / "prometheus.log").open("w")
    process = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            while True:
                if process.poll() is not None:
                    raise AssertionError(f"prometheus exited: {(tmp_path / 'prometheus.log').read_text()[-2000:]}")
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(f"{url}/-/ready") as response:
                        if response.status == 200:
                            break
                assert time.monotonic() < deadline, "prometheus did not become ready in 20 s"
                await asyncio.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


async def instant_query(session: aiohttp.ClientSession, base_url: str, expr: str) -> dict[str, Any]:
    async with session.post(f"{base_url}/api/v1/query", data={"query": expr}, timeout=REQUEST_TIMEOUT) as response:
        return await response.json(content_type=None)
