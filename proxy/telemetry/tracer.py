"""One OpenTelemetry span per proxied request, exported over OTLP/HTTP.

- The request span (kind SERVER) continues the client's W3C trace context
  (`traceparent`/`tracestate`) and passes its own context upstream, so the model
  server's spans nest under it. It starts when the request is accepted and ends with the
  response, carrying the GenAI semantic-convention attributes (`gen_ai.*`) and the
  proxy's figures as they stand then (`carbon_proxy.*`, status provisional).
- The settled figures come later (once every request overlapping this one has ended),
  after the span has ended, when no attribute or event can be added to it. They go out as
  a second, short span `carbon_proxy.settle`: a child of the request span (same trace,
  so every trace viewer shows it under the request) that also links to it, with the same
  `carbon_proxy.*` attributes at status final. Why not a log record: a log needs a second
  OTLP pipeline (logs), the Python logs SDK is still experimental, and Jaeger/Tempo show
  spans, not logs, in a trace.

Its own TracerProvider: the proxy never replaces a global one an embedding app set up.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any, Mapping

from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import Link, NonRecordingSpan, Span, SpanContext, SpanKind, Status, StatusCode, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from proxy import __version__
from proxy.accounting import Figures
from proxy.app import ProxyServer, group_name
from proxy.exchange import MeteredExchange
from proxy.receipts.model import Receipt
from proxy.telemetry.settings import TelemetrySettings

log = logging.getLogger("carbon_proxy.telemetry")

SETTLE_SPAN = "carbon_proxy.settle"
# gen_ai.operation.name by path: the convention's well-known values, and a custom one
# for images (the convention has none yet).
OPERATIONS = (
    ("/chat/completions", "chat"),
    ("/api/chat", "chat"),
    ("/completions", "text_completion"),
    ("/api/generate", "text_completion"),
    ("/generate", "text_completion"),
    ("/embeddings", "embeddings"),
    ("/api/embed", "embeddings"),
    ("/images/", "image_generation"),
    ("/sdapi/", "image_generation"),
)


def operation_name(path: str) -> str:
    for fragment, name in OPERATIONS:
        if fragment in path:
            return name
    return "generate_content"


def request_attributes(exchange: MeteredExchange) -> dict[str, Any]:
    meta = exchange.meta
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": operation_name(meta.path),
        "http.request.method": meta.method,
        "url.path": meta.path,
        "carbon_proxy.request_id": meta.request_id,
        "carbon_proxy.receipt_id": meta.receipt_id,
        "carbon_proxy.upstream": exchange.upstream.name,
        "carbon_proxy.dialect": exchange.upstream.dialect,
        "carbon_proxy.device_group": group_name(exchange.upstream),
    }
    if exchange.info.model:
        attributes["gen_ai.request.model"] = exchange.info.model
    return attributes


def figure_attributes(receipt: Receipt, tenant_label: str) -> dict[str, Any]:
    """The proxy's own figures. Not the credential hash; the tenant as the metrics label it."""
    attributes: dict[str, Any] = {
        "carbon_proxy.energy_joules": receipt.energy_joules,
        "carbon_proxy.device_energy_joules": receipt.device_energy_joules,
        "carbon_proxy.co2e_grams": receipt.co2e_grams,
        "carbon_proxy.co2e_operational_grams": receipt.operational_grams,
        "carbon_proxy.co2e_embodied_grams": receipt.embodied_grams,
        "carbon_proxy.intensity_g_per_kwh": receipt.intensity_g_per_kwh,
        "carbon_proxy.pue": receipt.pue,
        "carbon_proxy.basis": receipt.basis,
        "carbon_proxy.status": receipt.status,
        "carbon_proxy.tenant": tenant_label,
    }
    if receipt.host_energy_joules is not None:
        attributes["carbon_proxy.host_energy_joules"] = receipt.host_energy_joules
    return attributes


class RequestTracer:
    def __init__(self, proxy: ProxyServer, settings: TelemetrySettings, exporter: SpanExporter | None = None) -> None:
        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter(endpoint=settings.traces_url, headers=dict(settings.headers), timeout=settings.timeout_seconds)
        resource = Resource.create({"service.name": settings.service_name, "service.version": __version__})
        self.provider = TracerProvider(resource=resource)
        # Exports run on the processor's own thread: the event loop never waits on a collector.
        self.provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=settings.export_interval_ms))
        self._tracer = self.provider.get_tracer("carbon_proxy", __version__)
        self._propagator = TraceContextTextMapPropagator()
        self._tenant_label = proxy.tenancy.label
        # Per exchange: its open span, then (once ended) its context for the settle span.
        # Weak keys: an exchange that never records (accounting failed) leaves nothing behind.
        self._open: weakref.WeakKeyDictionary[MeteredExchange, Span] = weakref.WeakKeyDictionary()
        self._ended: weakref.WeakKeyDictionary[MeteredExchange, SpanContext] = weakref.WeakKeyDictionary()
        proxy.add_upstream_headers(self.start)
        proxy.on_record(self.on_record)

    def start(self, exchange: MeteredExchange, client_headers: Mapping[str, str]) -> dict[str, str]:
        """Open the request's span under the client's trace (if it sent one); return the
        trace context headers for the upstream request."""
        parent: Context = self._propagator.extract(client_headers)
        attributes = request_attributes(exchange)
        model = attributes.get("gen_ai.request.model")
        name = f"{attributes['gen_ai.operation.name']} {model}" if model else attributes["gen_ai.operation.name"]
        span = self._tracer.start_span(
            name, context=parent, kind=SpanKind.SERVER, attributes=attributes, start_time=int(exchange.meta.started_unix * 1e9)
        )
        self._open[exchange] = span
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier, context=set_span_in_context(span))
        return carrier

    def on_record(self, receipt: Receipt, figures: Figures | None, exchange: MeteredExchange) -> None:
        if receipt.status == "provisional":
            self._end_request(receipt, exchange)
        else:
            self._settled(receipt, exchange)

    def _end_request(self, receipt: Receipt, exchange: MeteredExchange) -> None:
        span = self._open.pop(exchange, None)
        if span is None:
            return
        work = exchange.reader.work
        attributes: dict[str, Any] = {"http.response.status_code": receipt.status_code, "carbon_proxy.outcome": receipt.outcome}
        if receipt.prompt_tokens is not None:
            attributes["gen_ai.usage.input_tokens"] = receipt.prompt_tokens
        if receipt.output_tokens is not None:
            attributes["gen_ai.usage.output_tokens"] = receipt.output_tokens
        if work.response_id:
            attributes["gen_ai.response.id"] = work.response_id
        if work.finish_reasons:
            attributes["gen_ai.response.finish_reasons"] = list(work.finish_reasons)
        if receipt.model and not exchange.info.model:
            attributes["gen_ai.request.model"] = receipt.model
        if receipt.images:
            attributes["carbon_proxy.images"] = receipt.images
        attributes.update(figure_attributes(receipt, self._tenant_label(receipt.tenant)))
        span.set_attributes(attributes)
        if receipt.outcome != "ok" or receipt.status_code >= 500:
            span.set_status(Status(StatusCode.ERROR, receipt.outcome))
        span.end(end_time=int(receipt.finished_unix * 1e9))
        self._ended[exchange] = span.get_span_context()

    def _settled(self, receipt: Receipt, exchange: MeteredExchange) -> None:
        context = self._ended.pop(exchange, None)
        if context is None:
            return
        parent = set_span_in_context(NonRecordingSpan(context))
        attributes = {"carbon_proxy.request_id": receipt.request_id, "carbon_proxy.receipt_id": receipt.receipt_id, **figure_attributes(receipt, self._tenant_label(receipt.tenant))}
        # Starts where the request ended: its length is how long the figure took to settle.
        span = self._tracer.start_span(
            SETTLE_SPAN,
            context=parent,
            kind=SpanKind.INTERNAL,
            links=[Link(context, {"carbon_proxy.link": "settles"})],
            attributes=attributes,
            start_time=int(receipt.finished_unix * 1e9),
        )
        span.end()

    def shutdown(self) -> None:
        """Flush what is queued (blocking: call it off the event loop)."""
        self.provider.shutdown()


def install_tracing(proxy: ProxyServer, settings: TelemetrySettings, exporter: SpanExporter | None = None) -> RequestTracer:
    return RequestTracer(proxy, settings, exporter)
