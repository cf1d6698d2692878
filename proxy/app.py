"""The proxy server: the public listener that forwards and meters, wired to its parts.

The public listener carries model traffic and the receipt endpoint; admin endpoints
(metrics, health) live on a separate listener (see proxy.admin).
"""

from __future__ import annotations

import logging
import time
from typing import AsyncIterator, Callable, Mapping

from proxy.accounting import Accountant, Figures, GroupPricing
from proxy.attribution import AttributionEngine, RequestUsage
from proxy.attribution.prior import prior_from_devices
from proxy.attribution.state import LearnedStateStore, StateKeeper
from proxy.budgets import REMAINING_HEADER, build_budgets, format_grams
from proxy.budgets.cost import requested_output_tokens
from proxy.budgets.ledger import OPEN
from proxy.carbon.embodied import resolve_device_model
from proxy.carbon.intensity import IntensityProvider
from proxy.config import Config, UpstreamConfig
from proxy.dialects import dialect_for
from proxy.dialects.base import parse_json_object
from proxy.exchange import MeteredExchange, RequestMeta
from proxy.forward import Forwarder, json_error
from proxy.header_guard import RateLimitedLog, first_bad_header, headers_read, invalid_header_message, where
from proxy.headers import request_id_from, upstream_request_headers
from proxy.local import LocalEndpoint, LocalRequest, LocalResponse, error_response
from proxy.meters.base import EnergySample, Meter, device_facts
from proxy.meters.sampler import Sampler
from proxy.receipts.endpoint import receipts_endpoint
from proxy.receipts.model import Receipt, ReceiptStore, new_receipt_id
from proxy.routing.header import HEADER as ROUTE_HEADER
from proxy.routing.router import RouteRefused, Router
from proxy.server.messages import BodyTooLarge, Reply, Request
from proxy.tenants import Tenancy
from proxy.tokenize import PromptCounter

log = logging.getLogger("carbon_proxy")

INSPECT_LIMIT_BYTES = 4 * 1024 * 1024
"""Request bodies up to this size are read whole (routing by model, asking for usage);
larger ones stream to the upstream untouched."""

ALL_DEVICES = "*"
RECEIPT_ID_HEADER = "X-Carbon-Receipt-Id"


def group_name(upstream: UpstreamConfig) -> str:
    return ",".join(upstream.devices) if upstream.devices else ALL_DEVICES


class ProxyServer:
    def __init__(
        self,
        config: Config,
        *,
        meter: Meter,
        intensity: IntensityProvider,
        receipts: ReceiptStore,
        embodied_g_per_device_second: Callable[[str], float],
    ) -> None:
        self.config = config
        self.meter = meter
        self.intensity = intensity
        self.receipts = receipts
        self._embodied_rate = embodied_g_per_device_second
        self.router = Router(config.upstreams, config.routing, default_intensity=intensity, default_pue=config.pue)
        self.tenancy = Tenancy(config.tenants)
        self.forwarder = Forwarder(
            max_buffer_bytes=config.server.max_buffer_bytes, client_write_seconds=config.server.client_write_seconds
        )
        self.sampler: Sampler | None = None
        self.accountant: Accountant | None = None
        self.state_keeper: StateKeeper | None = None
        self._record_listeners: list[Callable[[Receipt, Figures | None, MeteredExchange], None]] = []
        self._forward_listeners: list[Callable[[MeteredExchange], None]] = []
        self._reject_listeners: list[Callable[[str], None]] = []
        self._header_hooks: list[Callable[[MeteredExchange, Mapping[str, str]], Mapping[str, str] | None]] = []
        self.in_flight = 0
        self.receipts_dropped: dict[str, int] = {}
        """Receipts lost before reaching the store, by reason (the store counts its own)."""
        self.budgets = build_budgets(self.tenancy.budgets, receipts, self.tenancy.label)
        self.on_record(self.budgets.on_record)
        self._commit_wait_seconds = config.receipts.commit_wait_ms / 1000
        self._written = getattr(receipts, "written", None)
        self.prompt_counter = PromptCounter()
        self.local_endpoints: list[LocalEndpoint] = []
        self.internal_identity: Callable[[Mapping[str, str]], tuple[str, str | None] | None] | None = None
        """Set by proxy.batches: (tenant, credential hash) its runner vouches for on a batch line."""
        self.add_local(receipts_endpoint(receipts))
        self._read_headers = headers_read(self.tenancy.header, config.server.trust_forwarded)
        self._log_unexpected = RateLimitedLog(log)

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        await self.meter.start()
        devices = list(self.meter.device_ids())
        facts = device_facts(self.meter)  # names and board limits from NVML or DCGM, where the meter has them
        groups: dict[str, list[str]] = {}
        device_models: dict[str, str] = {}
        pricing: dict[str, GroupPricing] = {}
        for upstream in self.config.upstreams:
            name = group_name(upstream)
            members = list(upstream.devices) if upstream.devices else devices
            groups[name] = members
            named = [f.name if (f := facts.get(d)) else None for d in members]
            device_models[name] = resolve_device_model(upstream.device_model, self.config.carbon.get("device_model"), named)
            site = self.router.sites[upstream.name]
            pricing[name] = GroupPricing(
                pue=upstream.pue if upstream.pue is not None else self.config.pue,
                embodied_g_per_device_second=self._embodied_rate(device_models[name]),
                devices=len(members),
                intensity=site.intensity if site.own_intensity else None,
            )
        attribution = self.config.attribution
        priors = {n: p for n, m in groups.items() if (p := prior_from_devices(device_models[n], [facts.get(d) for d in m], self.meter.kind))}

        def engine_factory(weight_at: Callable[[float], float], on_final: Callable[[RequestUsage], None]) -> AttributionEngine:
            return AttributionEngine(
                groups,
                idle_power_watts=attribution.idle_power_watts,
                prefill_weight=attribution.prefill_weight,
                weight_at=weight_at,
                on_final=on_final,
                prior=priors,
            )

        def on_sample(sample: EnergySample) -> None:
            accountant.engine.on_sample(sample)
            accountant.sampled()

        self.sampler = Sampler(self.meter, on_sample, self.config.meter.interval_ms / 1000)
        accountant = Accountant(
            engine_factory, self.intensity, pricing, self.sampler.basis, settle_seconds=attribution.settle_ms / 1000
        )
        self.accountant = accountant
        accountant.on_final(self._finalized)
        observe_work = getattr(self.meter, "observe_work", None)
        if callable(observe_work):
            # A modelled meter (estimate) learns energy from the work each request did.
            def feed_meter(receipt: Receipt, figures: Figures | None, exchange: MeteredExchange) -> None:
                if receipt.status == "provisional":
                    devices = groups[group_name(exchange.upstream)]
                    computed = max(0, (receipt.prompt_tokens or 0) - (receipt.cached_tokens or 0))
                    observe_work(devices, computed, receipt.output_tokens or 0, receipt.model)

            self.on_record(feed_meter)
            modelled = getattr(self.meter, "modelled_joules", None)
            if callable(modelled):

                def request_joules(usage: RequestUsage) -> float:
                    owner = usage.owner
                    model = owner.info.model if isinstance(owner, MeteredExchange) else None
                    return modelled(len(groups[usage.group]), usage.prompt_tokens or 0, usage.output_tokens or 0, model)

                accountant.model_work(request_joules)
        await self.intensity.start()
        await self.router.start()
        self.on_record(self.router.observe)
        await self.receipts.start()
        usage = getattr(self.receipts, "tenant_usage_grams", None)
        if usage is not None:
            self.budgets.attach(usage)  # read per tenant on first sight, never all at start
        self.budgets.warm(sorted(self.tenancy.allow))  # a few configured names: their gauges show at once
        self.budgets.start()
        await self.forwarder.start()
        receipts_path = getattr(self.receipts, "path", None)
        if isinstance(receipts_path, str) and receipts_path != ":memory:":
            # Learned attribution state lives in the receipts SQLite file (its own table).
            self.state_keeper = StateKeeper(accountant.engine, LearnedStateStore(receipts_path, device_models))
            await self.state_keeper.start()
        await self.sampler.start()

    async def stop(self) -> None:
        """After the listener drained: take a last sample so finished requests settle."""
        if self.sampler is not None:
            await self.sampler.sample_once()
            await self.sampler.close()
        if self.state_keeper is not None:
            await self.state_keeper.stop()
        await self.forwarder.close()
        await self.budgets.close()
        await self.prompt_counter.close()
        await self.receipts.close()
        await self.router.close()
        await self.intensity.close()
        await self.meter.close()

    def add_local(self, endpoint: LocalEndpoint) -> None:
        """Answer requests under `endpoint.prefix` here instead of forwarding them."""
        self.local_endpoints.append(endpoint)
        self.local_endpoints.sort(key=lambda e: -len(e.prefix))  # longest prefix wins

    def local_endpoint_for(self, path: str) -> LocalEndpoint | None:
        for endpoint in self.local_endpoints:
            if path.startswith(endpoint.prefix) or path == endpoint.prefix.rstrip("/"):
                return endpoint
        return None

    def _prompt_count_for(
        self, upstream: UpstreamConfig, body: bytes | None, authorization: str | None
    ) -> Callable[[Callable[[int], None]], bool]:
        """Asks the upstream's tokenizer for a prompt it did not count (see proxy.tokenize)."""
        return lambda done: self.prompt_counter.count_later(upstream.url, upstream.dialect, body, authorization, done)

    def on_record(self, listener: Callable[[Receipt, Figures | None, MeteredExchange], None]) -> None:
        """Called with every receipt written (provisional, then final): metrics subscribe here."""
        self._record_listeners.append(listener)

    def _finalized(self, usage: RequestUsage, figures: Figures) -> None:
        owner = usage.owner
        if isinstance(owner, MeteredExchange):
            owner.finalize(figures)

    async def _receipt_written(self, receipt_id: str) -> None:
        """Group commit: a response's last bytes wait (bounded) for its receipt's batch."""
        if self._written is None or self._commit_wait_seconds <= 0:
            return
        try:
            await self._written(receipt_id, self._commit_wait_seconds)
        except Exception:
            log.exception("receipt store failed while waiting for a commit")

    def on_forward(self, listener: Callable[[MeteredExchange], None]) -> None:
        """Called just before a request is handed to its upstream (proxy overhead ends here)."""
        self._forward_listeners.append(listener)

    def add_upstream_headers(self, hook: Callable[[MeteredExchange, Mapping[str, str]], Mapping[str, str] | None]) -> None:
        """`hook(exchange, client headers)` runs once per forwarded request; the headers it
        returns are set on the upstream request (telemetry: the trace context)."""
        self._header_hooks.append(hook)

    def on_reject(self, listener: Callable[[str], None]) -> None:
        """Called with the error type of every request the proxy answers itself (400, 404,
        405, 413, 429): these never reach an upstream and so have no receipt."""
        self._reject_listeners.append(listener)

    def _reject(self, status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> Reply:
        for listener in self._reject_listeners:
            try:
                listener(kind)
            except Exception:
                log.exception("reject listener failed")
        return json_error(status, kind, message, headers)

    def _receipt_lost(self, reason: str) -> None:
        self.receipts_dropped[reason] = self.receipts_dropped.get(reason, 0) + 1

    def _record(self, exchange: MeteredExchange, receipt: Receipt, figures: Figures | None) -> None:
        try:
            self.receipts.put(receipt)
        except Exception:
            log.exception("receipt store refused a receipt")
            self._receipt_lost("store_error")
        for listener in self._record_listeners:
            try:
                listener(receipt, figures, exchange)
            except Exception:
                log.exception("receipt listener failed")

    # -- the public handler -----------------------------------------------------------

    async def handle(self, request: Request) -> Reply | None:
        try:
            bad = first_bad_header(request.headers, self._read_headers)
            if bad is not None:
                return self._reject(400, "invalid_header", invalid_header_message(bad))
            return await self._handle(request)
        except BodyTooLarge:
            return self._too_large()
        except Exception as exc:
            return self._last_resort(request, exc)

    def _last_resort(self, request: Request, exc: Exception) -> Reply:
        """A bug or a client gone mid-answer: one log line (rate-limited, no values) and a
        JSON 500, never a plain-text page and a traceback per request."""
        if isinstance(exc, ConnectionError):
            log.debug("client connection failed while answering (%s)", type(exc).__name__)
        else:
            self._log_unexpected(logging.ERROR, "request failed unexpectedly (%s); answered 500", where(exc))
        if request.started:
            request.abort()  # part of an answer went out: the 500 cannot follow it
        return json_error(500, "internal_error", "the proxy failed to answer this request")

    def _too_large(self) -> Reply:
        limit = self.config.server.max_body_bytes
        return self._reject(413, "request_too_large", f"request body exceeds the limit of {limit} bytes")

    async def _handle(self, request: Request) -> Reply | None:
        if not request.raw_path.startswith("/"):
            # Absolute-form (or authority-form) targets would let a client pick the host.
            return self._reject(400, "invalid_request_target", "only origin-form request targets (a path) are accepted")
        if request.method == "CONNECT":
            return self._reject(405, "method_not_allowed", "CONNECT is not supported")
        path = request.path
        local = self.local_endpoint_for(path)
        if local is not None:
            return await self._local(request, local)

        max_body = self.config.server.max_body_bytes
        length = request.content_length
        if length is not None and length > max_body:
            return self._too_large()
        body: bytes | AsyncIterator[bytes] | None = None
        if request.body is not None:
            if length is not None and length <= INSPECT_LIMIT_BYTES:
                content = request.body
                # Usually the whole body came with the head: take it without a read loop.
                body = content.read_nowait() if content.complete else await content.read()
            else:
                body = _limited(request, max_body)

        started_monotonic = time.monotonic()
        raw_body = body if isinstance(body, bytes) else None
        model = None
        data = None
        if self.router.needs_model and raw_body is not None:
            data = parse_json_object(raw_body)
            model = data.get("model") if data is not None and isinstance(data.get("model"), str) else None
        tenant, cred_hash = self.tenancy.identify(request.headers)
        if self.internal_identity is not None:
            vouched = self.internal_identity(request.headers)
            if vouched is not None:  # a batch line: charged (and routed) as the batch's owner
                tenant, cred_hash = vouched
        if data is None and raw_body is not None and self.router.needs_body(path, model):
            data = parse_json_object(raw_body)
        route = self.router.route(path, model, tenant=tenant, body=data)
        if route is None:
            return self._reject(404, "no_route", f"no upstream is configured for {path!r}")
        if isinstance(route, RouteRefused):
            return self._reject(route.status, route.kind, route.message)
        upstream = route.upstream
        dialect = dialect_for(upstream.dialect, path)
        info = dialect.inspect_request(request.method, path, raw_body)

        request_id = request_id_from(request.headers)
        receipt_id = new_receipt_id()
        extra_headers = {"X-Request-Id": request_id}
        if route.pool_size > 1:
            extra_headers[ROUTE_HEADER] = route.header_value()
        admission = OPEN
        if self.budgets.enabled:  # reserve the predicted grams now; the receipt settles them
            limit = requested_output_tokens(raw_body, data)
            admission = await self.budgets.admit(tenant, receipt_id, info.model, info.prompt_tokens_estimate, limit)
        if admission.remaining_grams is not None:
            extra_headers[REMAINING_HEADER] = format_grams(admission.remaining_grams)
        if admission.store_down:
            message = "the fleet budget store is unreachable and budget_on_store_down = \"closed\""
            return self._reject(503, "budget_store_unavailable", message, {**extra_headers, "Retry-After": "1"})
        if not admission.allowed:
            extra_headers["Retry-After"] = str(self.budgets.retry_after_seconds(tenant))
            message = f"tenant {tenant!r} has used its CO2e budget for this period; it resets at the start of the next (UTC)"
            return self._reject(429, "carbon_budget_exceeded", message, extra_headers)
        extra_headers[RECEIPT_ID_HEADER] = receipt_id  # on every response that has a receipt
        assert self.accountant is not None, "ProxyServer.start() was not awaited"
        usage = self.accountant.engine.open(
            group_name(upstream), started_monotonic, streaming=info.stream, prompt_tokens_estimate=info.prompt_tokens_estimate
        )
        meta = RequestMeta(
            receipt_id=receipt_id,
            request_id=request_id,
            method=request.method,
            path=path,
            tenant=tenant,
            credential_hash=cred_hash,
            started_unix=time.time(),
            started_monotonic=started_monotonic,
            basis_note=admission.basis_note,
        )
        exchange = MeteredExchange(
            meta=meta,
            upstream=upstream,
            dialect=dialect,
            info=info,
            usage=usage,
            accountant=self.accountant,
            record=self._record,
            durable=self._receipt_written,
            max_event_bytes=self.config.server.max_event_bytes,
            lost=self._receipt_lost,
            count_prompt=self._prompt_count_for(upstream, info.body, request.headers.get("Authorization")),
        )
        exchange.route = route
        if route.pool_size > 1:
            exchange.on_first_byte = lambda: self.router.first_byte(route)
        headers = upstream_request_headers(
            request.headers,
            client_ip=request.client_ip,
            scheme=request.scheme,
            request_id=request_id,
            trust_forwarded=self.config.server.trust_forwarded,
        )
        for hook in self._header_hooks:
            try:
                extra = hook(exchange, request.headers)
            except Exception:
                log.exception("upstream header hook failed")
                continue
            if extra:
                headers.update(extra)
        send_body = info.body if raw_body is not None else body
        for listener in self._forward_listeners:
            listener(exchange)
        self.in_flight += 1
        self.router.started(route)
        try:
            response = await self.forwarder.forward(
                request,
                upstream_url=upstream.url,
                target=request.raw_path,
                headers=headers,
                body=send_body,
                timeouts=upstream.timeouts,
                exchange=exchange,
                extra_headers=extra_headers,
            )
        finally:
            self.in_flight -= 1
            self.budgets.release(receipt_id)  # a request that ended without a receipt
            self.router.finished(route)
        if isinstance(body, _LimitedBody) and body.exceeded and not request.started:
            return self._too_large()
        return response

    async def _local(self, request: Request, endpoint: LocalEndpoint) -> Reply:
        """Bridge from the public server's request to a server-agnostic LocalEndpoint handler."""
        answer = await self._answer_local(request, endpoint)
        return Reply(answer.status, answer.body, {"Content-Type": answer.content_type, **answer.headers})

    async def _answer_local(self, request: Request, endpoint: LocalEndpoint) -> LocalResponse:
        limit = endpoint.max_body_bytes
        too_large = error_response(413, "request_too_large", f"request body exceeds the limit of {limit} bytes")
        if request.content_length is not None and request.content_length > limit:
            return too_large
        parts: list[bytes] = []
        size = 0
        if request.body is not None:
            async for chunk in request.body:
                size += len(chunk)
                if size > limit:
                    return too_large
                parts.append(chunk)
        tenant, cred_hash = self.tenancy.identify(request.headers)
        local = LocalRequest(request.method, request.path, request.query, request.headers, b"".join(parts), cred_hash, tenant)
        try:
            return await endpoint.handler(local)
        except Exception as exc:
            self._log_unexpected(logging.ERROR, "local endpoint %s failed (%s)", endpoint.prefix, where(exc))
            return error_response(500, "internal_error", "the proxy failed to answer this request")


class _LimitedBody:
    """A streamed request body that stops at the size limit (the handler then answers 413)."""

    def __init__(self, request: Request, limit: int) -> None:
        self._request = request
        self._limit = limit
        self.exceeded = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        size = 0
        assert self._request.body is not None
        async for chunk in self._request.body:
            size += len(chunk)
            if size > self._limit:
                self.exceeded = True
                raise BodyTooLarge()
            yield chunk


def _limited(request: Request, limit: int) -> _LimitedBody:
    return _LimitedBody(request, limit)
