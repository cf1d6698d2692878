"""OpenTelemetry: spans exported over real OTLP/HTTP to an in-process receiver (protobuf
decoded with opentelemetry-proto), trace context continued from the client to the model
server, and nothing of OpenTelemetry loaded when [telemetry] is not configured."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from typing import Any, AsyncIterator

import aiohttp
import orjson
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest, ExportTraceServiceResponse
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as ProtoSpan

from helpers import FakeMeter, start_proxy, start_upstream
from proxy.config import config_from_dict
from proxy.errors import ConfigError
from proxy.serve import Service
from proxy.telemetry.tracer import SETTLE_SPAN
from proxy.tenants import credential_hash

CLIENT_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN_ID = "00f067aa0ba902b7"
TIMEOUT = aiohttp.ClientTimeout(total=30)


def value_of(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [value_of(v) for v in value.array_value.values]
    return getattr(value, kind)


class Receiver:
    """A minimal OTLP/HTTP collector: POST /v1/traces, protobuf in and out."""

    def __init__(self) -> None:
        self.spans: list[tuple[dict[str, Any], ProtoSpan]] = []
        self.resources: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/traces", self.traces)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    async def traces(self, request: web.Request) -> web.Response:
        assert request.content_type == "application/x-protobuf"
        self.headers.append(dict(request.headers))
        export = ExportTraceServiceRequest()
        export.ParseFromString(await request.read())
        for resource_spans in export.resource_spans:
            self.resources.append({a.key: value_of(a.value) for a in resource_spans.resource.attributes})
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append(({a.key: value_of(a.value) for a in span.attributes}, span))
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(), content_type="application/x-protobuf")

    def named(self, name: str) -> list[tuple[dict[str, Any], ProtoSpan]]:
        return [(a, s) for a, s in self.spans if s.name == name]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    await r.start()
    yield r
    assert r.runner is not None
    await r.runner.cleanup()


class Upstream:
    """An OpenAI-shaped model server that remembers the trace headers it was sent."""

    def __init__(self) -> None:
        self.trace_headers: list[dict[str, str | None]] = []

    async def chat(self, request: web.Request) -> web.Response:
        self.trace_headers.append({h: request.headers.get(h) for h in ("traceparent", "tracestate")})
        body = await request.json()
        return web.json_response(
            {
                "id": "chatcmpl-abc123",
                "object": "chat.completion",
                "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18},
            }
        )


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[Upstream, str]]:
    server = Upstream()
    runner, url = await start_upstream({"/v1/chat/completions": server.chat})
    yield server, url
    await runner.cleanup()


async def chat(service: Service, headers: dict[str, str]) -> tuple[str, str]:
    """(client request id, receipt id) of one chat request."""
    body = {"model": "llama-3-8b", "messages": [{"role": "user", "content": "hello"}]}
    async with aiohttp.ClientSession() as session:
        url = f"http://127.0.0.1:{service.public_port}/v1/chat/completions"
        async with session.post(url, json=body, headers=headers, timeout=TIMEOUT) as response:
            assert response.status == 200
            await response.read()
            return response.headers["X-Request-Id"], response.headers["X-Carbon-Receipt-Id"]


async def test_one_server_span_per_request_with_genai_and_carbon_attributes(receiver: Receiver, upstream: tuple[Upstream, str]) -> None:
    _, url = upstream
    telemetry = {"otlp_endpoint": receiver.url, "export_interval_ms": 50, "headers": {"x-collector-key": "k"}}
    tenants = {"header": "X-Tenant-Id", "allow": ["team-a"]}
    service = await start_proxy(url, meter=FakeMeter(watts=300.0), telemetry=telemetry, tenants=tenants)
    client = {"traceparent": f"00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-01", "X-Tenant-Id": "x", "Authorization": "Bearer sk-secret"}
    try:
        request_id, receipt_id = await chat(service, client)
    finally:
        await asyncio.wait_for(service.stop(), 20)  # settles the request, then flushes the exporter
    receipt = await service.proxy.receipts.get(receipt_id)
    assert receipt is not None and receipt.status == "final"

    (request_span,) = [(a, s) for a, s in receiver.spans if s.kind == ProtoSpan.SPAN_KIND_SERVER]
    attributes, span = request_span
    assert span.name == "chat llama-3-8b"
    assert span.trace_id.hex() == CLIENT_TRACE_ID and span.parent_span_id.hex() == CLIENT_SPAN_ID
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.request.model"] == "llama-3-8b"
    assert attributes["gen_ai.usage.input_tokens"] == 11 and attributes["gen_ai.usage.output_tokens"] == 7
    assert attributes["gen_ai.response.id"] == "chatcmpl-abc123"
    assert attributes["gen_ai.response.finish_reasons"] == ["stop"]
    assert attributes["http.response.status_code"] == 200
    assert attributes["carbon_proxy.request_id"] == request_id
    assert attributes["carbon_proxy.receipt_id"] == receipt_id
    assert attributes["carbon_proxy.status"] == "provisional"
    assert attributes["carbon_proxy.device_group"] == "*" and attributes["carbon_proxy.upstream"] == "sim"
    for key in ("energy_joules", "device_energy_joules", "co2e_grams", "co2e_operational_grams", "co2e_embodied_grams"):
        assert attributes[f"carbon_proxy.{key}"] >= 0, key
    assert attributes["carbon_proxy.intensity_g_per_kwh"] == pytest.approx(450)
    assert attributes["carbon_proxy.pue"] == pytest.approx(1.2)
    assert "meter=fake" in attributes["carbon_proxy.basis"]
    assert span.status.code != span.status.STATUS_CODE_ERROR
    assert span.end_time_unix_nano > span.start_time_unix_nano
    # The tenant as metrics label it ("x" is not allow-listed), never the credential hash.
    assert attributes["carbon_proxy.tenant"] == "other"
    every_value = repr([a for a, _ in receiver.spans])
    assert "sk-secret" not in every_value and credential_hash("sk-secret")[:12] not in every_value

    # The settled figures: a short child span of the request span, linking to it.
    (settle,) = receiver.named(SETTLE_SPAN)
    settled, settle_span = settle
    assert settle_span.trace_id == span.trace_id and settle_span.parent_span_id == span.span_id
    assert [link.span_id for link in settle_span.links] == [span.span_id]
    assert settled["carbon_proxy.status"] == "final" and settled["carbon_proxy.request_id"] == request_id
    assert settled["carbon_proxy.energy_joules"] == pytest.approx(receipt.energy_joules)
    assert settled["carbon_proxy.co2e_grams"] == pytest.approx(receipt.co2e_grams)
    assert settle_span.start_time_unix_nano >= span.end_time_unix_nano - 1_000_000

    assert receiver.resources[0]["service.name"] == "carbon-proxy"
    assert receiver.headers[0]["x-collector-key"] == "k"


async def test_trace_context_round_trips_through_the_proxy_to_the_upstream(receiver: Receiver, upstream: tuple[Upstream, str]) -> None:
    server, url = upstream
    service = await start_proxy(url, meter=FakeMeter(), telemetry={"otlp_endpoint": receiver.url, "export_interval_ms": 50})
    try:
        await chat(service, {"traceparent": f"00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-01", "tracestate": "vendor=blue"})
        await chat(service, {})  # no context from the client: the proxy starts the trace
    finally:
        await asyncio.wait_for(service.stop(), 20)
    continued, started = server.trace_headers
    version, trace_id, parent_id, flags = continued["traceparent"].split("-")  # type: ignore[union-attr]
    assert (version, trace_id, flags) == ("00", CLIENT_TRACE_ID, "01")
    request_spans = {s.span_id.hex(): s for _, s in receiver.spans if s.kind == ProtoSpan.SPAN_KIND_SERVER}
    assert parent_id in request_spans, "the upstream's parent is the proxy's span, not the client's"
    assert request_spans[parent_id].trace_id.hex() == CLIENT_TRACE_ID
    assert continued["tracestate"] == "vendor=blue"
    _, new_trace, new_parent, _ = started["traceparent"].split("-")  # type: ignore[union-attr]
    assert new_trace != CLIENT_TRACE_ID and new_parent in request_spans
    assert not request_spans[new_parent].parent_span_id, "a root span when the client sent no context"


async def test_without_telemetry_the_client_context_passes_through_untouched(upstream: tuple[Upstream, str]) -> None:
    server, url = upstream
    service = await start_proxy(url, meter=FakeMeter())
    try:
        traceparent = f"00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-01"
        await chat(service, {"traceparent": traceparent, "tracestate": "vendor=blue"})
    finally:
        await asyncio.wait_for(service.stop(), 20)
    assert server.trace_headers == [{"traceparent": traceparent, "tracestate": "vendor=blue"}]
    assert service.tracer is None


def test_nothing_of_opentelemetry_loads_when_not_configured() -> None:
    code = """
import asyncio, sys
sys.path.insert(0, "tests")
from helpers import FakeMeter, start_proxy
import proxy.cli, proxy.serve, proxy.admin, proxy.live, proxy.telemetry
async def main():
    service = await start_proxy("http://127.0.0.1:9", meter=FakeMeter())
    await service.stop()
asyncio.run(main())
loaded = sorted(m for m in sys.modules if m.startswith("opentelemetry"))
assert not loaded, loaded
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    "table, key",
    [
        ({"otlp_endpoint": "grpc://collector:4317"}, "telemetry.otlp_endpoint"),
        ({"otlp_endpoint": "http://collector:4318/v1/traces"}, "telemetry.otlp_endpoint"),
        ({"service_name": "x"}, "telemetry.otlp_endpoint"),
        ({"otlp_endpoint": "http://c:4318", "headers": {"k": 1}}, "telemetry.headers"),
        ({"otlp_endpoint": "http://c:4318", "timeout_seconds": 0}, "telemetry.timeout_seconds"),
        ({"otlp_endpoint": "http://c:4318", "export_interval_ms": 1.5}, "telemetry.export_interval_ms"),
        ({"otlp_endpoint": "http://c:4318", "sampler": "always"}, "telemetry.sampler"),
    ],
)
def test_config_errors_name_the_key(table: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as error:
        config_from_dict({"upstreams": [{"name": "a", "url": "http://127.0.0.1:8000"}], "telemetry": table})
    assert error.value.key == key


async def stream_chat(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    base = {"id": "chatcmpl-stream1", "object": "chat.completion.chunk", "model": body["model"]}
    wants_usage = body.get("stream_options", {}).get("include_usage")
    chunks = [
        {**base, "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}]},
        {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
    ]
    if wants_usage:
        chunks.append({**base, "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}})
    for chunk in chunks:
        await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def test_streamed_requests_get_their_span_and_response_id(receiver: Receiver) -> None:
    runner, url = await start_upstream({"/v1/chat/completions": stream_chat})
    service = await start_proxy(url, meter=FakeMeter(), telemetry={"otlp_endpoint": receiver.url, "export_interval_ms": 50})
    try:
        body = {"model": "llama-3-8b", "stream": True, "messages": [{"role": "user", "content": "hello"}]}
        async with aiohttp.ClientSession() as session:
            proxy_url = f"http://127.0.0.1:{service.public_port}/v1/chat/completions"
            async with session.post(proxy_url, json=body, timeout=TIMEOUT) as response:
                assert response.status == 200
                streamed = await response.read()
    finally:
        await asyncio.wait_for(service.stop(), 20)
        await runner.cleanup()
    assert b"chatcmpl-stream1" in streamed
    ((attributes, span),) = [(a, s) for a, s in receiver.spans if s.kind == ProtoSpan.SPAN_KIND_SERVER]
    assert span.name == "chat llama-3-8b"
    assert attributes["gen_ai.response.id"] == "chatcmpl-stream1"
    assert attributes["gen_ai.usage.input_tokens"] == 5 and attributes["gen_ai.usage.output_tokens"] == 2
    assert len(receiver.named(SETTLE_SPAN)) == 1
