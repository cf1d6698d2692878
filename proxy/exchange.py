"""One metered exchange: the hooks the data path calls, joined to dialect, attribution,
accounting and receipts. Nothing here may fail a request: every accounting step is
guarded, and on error the bytes pass unchanged and the figures are flagged.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Mapping

from multidict import CIMultiDictProxy

from proxy.accounting import Accountant, Figures
from proxy.attribution import RequestUsage
from proxy.config import UpstreamConfig
from proxy.dialects import Dialect, RequestInfo, ResponseReader
from proxy.dialects.base import DEFAULT_MAX_EVENT_BYTES
from proxy.dialects.native import read_tgi_headers
from proxy.forward import BodyMode
from proxy.receipts.model import Receipt
from proxy.routing.header import RouteDecision

log = logging.getLogger("carbon_proxy.exchange")


@dataclass(slots=True)
class RequestMeta:
    receipt_id: str
    """Proxy-unique: the key of this request's receipt (X-Carbon-Receipt-Id)."""
    request_id: str
    """The client's X-Request-Id, or one the proxy made up."""
    method: str
    path: str
    tenant: str
    credential_hash: str | None
    started_unix: float
    started_monotonic: float
    basis_note: str = ""
    """Appended to the basis of this request's figures (e.g. '; budget=local')."""


class MeteredExchange:
    def __init__(
        self,
        *,
        meta: RequestMeta,
        upstream: UpstreamConfig,
        dialect: Dialect,
        info: RequestInfo,
        usage: RequestUsage,
        accountant: Accountant,
        record: Callable[["MeteredExchange", Receipt, Figures | None], None],
        durable: Callable[[str], Awaitable[None]] | None = None,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        lost: Callable[[str], None] | None = None,
        count_prompt: Callable[[Callable[[int], None]], bool] | None = None,
    ) -> None:
        self.meta = meta
        self.upstream = upstream
        self.dialect = dialect
        self.info = info
        self.usage = usage
        self.accountant = accountant
        self._record = record
        self._durable = durable
        self._max_event_bytes = max_event_bytes
        self._lost = lost
        self.reader: ResponseReader = ResponseReader(info, usage.tick)
        self.status = 0
        self.first_byte_at: float | None = None
        self._encoding: str | None = None
        self._place_figures = True
        self.outcome: str | None = None
        self.receipt: Receipt | None = None
        self._count_prompt = count_prompt
        self._tokens_estimated = False
        """True when a token count in the figures is not the server's own (basis flag)."""
        self._last_figures: Figures | None = None
        self.route: RouteDecision | None = None
        """Set by the proxy when a pool's policy chose the upstream (proxy.routing)."""
        self.on_first_byte: Callable[[], None] | None = None
        """Called when the upstream's response headers arrive (the router's backlog)."""
        usage.owner = self

    # -- hooks called by the data path ----------------------------------------------

    def response_started(self, status: int, headers: CIMultiDictProxy[str]) -> BodyMode:
        self.status = status
        self.first_byte_at = time.monotonic()
        if self.on_first_byte is not None:
            try:
                self.on_first_byte()
            except Exception:
                log.exception("first-byte listener failed")
        try:
            content_type = headers.get("Content-Type", "").lower()
            encoding = headers.get("Content-Encoding")
            self._encoding = encoding if encoding and encoding.lower() != "identity" else None
            reader = self.dialect.reader(self.info, content_type, self.usage.tick)
            reader.max_event_bytes = self._max_event_bytes
            if reader.streaming and self._encoding:
                # A compressed stream cannot be read or appended to without re-encoding it:
                # pass it through untouched; the receipt still gets time-based figures.
                reader = ResponseReader(self.info, self.usage.tick)
                self._place_figures = False
            if self.dialect.name == "tgi":
                read_tgi_headers(reader.work, headers)
            self.reader = reader
            return BodyMode.STREAM if reader.streaming else BodyMode.BUFFER
        except Exception:
            log.exception("dialect failed on response headers; passing through")
            self._place_figures = False
            return BodyMode.STREAM

    def feed(self, chunk: bytes) -> bytes:
        try:
            return self.reader.feed(chunk, time.monotonic())
        except Exception:
            # Parsing must never change the bytes: from here on, pass everything through.
            log.exception("dialect failed on a chunk; passing the stream through")
            self._place_figures = False
            held = self._flush_reader()
            self.reader = ResponseReader(self.info, self.usage.tick)
            return held + chunk

    def _flush_reader(self) -> bytes:
        try:
            self.reader.end()
            return self.reader.tail(None)
        except Exception:
            return b""

    async def finish(self) -> bytes:
        try:
            self.reader.end()
        except Exception:
            log.exception("dialect failed at end of stream")
        figures = await self._settled(self._close("ok"))
        await self._receipt_durable()
        placed = figures.as_json() if figures is not None and self._place_figures else None
        if placed is not None:
            placed["receipt_id"] = self.meta.receipt_id  # where the stream's receipt is read
            placed["basis"] += self.meta.basis_note
        try:
            return self.reader.tail(placed)
        except Exception:
            log.exception("dialect failed to write the stream tail")
            return b""

    async def complete(self, body: bytes) -> Mapping[str, str]:
        try:
            self.reader.read_body(body, self._encoding)
        except Exception:
            log.exception("dialect failed on a response body")
        figures = await self._settled(self._close("ok" if self.status < 400 else "upstream_error"))
        await self._receipt_durable()
        if figures is None:
            return {}
        headers = figures.headers()
        headers["X-Emissions-Basis"] += self.meta.basis_note
        return headers

    async def _settled(self, figures: Figures | None) -> Figures | None:
        """With [attribution] settle_ms: the last bytes wait (bounded) for the meter
        reading that covers the request's end, then carry the figure as of then."""
        if figures is None or self.accountant.settle_seconds <= 0:
            return figures
        try:
            await self.accountant.covered(self.usage)
            return self.accountant.figures(self.usage, time.monotonic())
        except Exception:
            log.exception("settling the end-of-response figure failed; sending the predicted one")
            return figures

    def failed(self, reason: str) -> None:
        try:
            self.reader.end()
        except Exception:
            pass
        self._close(reason)

    # -- accounting -------------------------------------------------------------------

    async def _receipt_durable(self) -> None:
        # Before the last bytes go out: a response the client saw complete has its receipt
        # on disk, even if the proxy is killed right after (bounded wait, never raises).
        if self._durable is not None and self.receipt is not None:
            await self._durable(self.meta.receipt_id)

    def _close(self, outcome: str) -> Figures | None:
        if self.outcome is not None:
            return None
        self.outcome = outcome
        now = time.monotonic()
        work = self.reader.work
        try:
            prompt = work.prompt_tokens if work.prompt_tokens is not None else (self.info.prompt_tokens_estimate or None)
            self.accountant.engine.close(
                self.usage,
                now,
                # Prefix-cache hits did no prefill work: attribution gets computed tokens only.
                prompt_tokens=work.computed_prompt_tokens(prompt),
                output_tokens=work.output_tokens_best(),
                work_units=work.work_units,
                prefill_seconds=work.prefill_seconds,
            )
            figures = self.accountant.figures(self.usage, now)
        except Exception:
            log.exception("accounting failed; the request is served without figures")
            if self._lost is not None:
                self._lost("accounting_error")  # no receipt will exist: counted as dropped
            return None
        self._tokens_estimated = self._counts_estimated()
        figures = self._flagged(figures)
        self.receipt = self._receipt(figures, now)
        self._last_figures = figures
        self._record(self, self.receipt, figures)
        if self._tokens_estimated and work.prompt_tokens is None and self._count_prompt is not None:
            try:
                self._count_prompt(self._prompt_counted)
            except Exception:
                log.exception("could not ask the upstream for a prompt count")
        return figures

    def _counts_estimated(self) -> bool:
        """A token request whose prompt or output count is not the server's own, or a
        stream that passed through unread past the event cap."""
        work = self.reader.work
        if work.unparsed:
            return True
        if self.status >= 400 or work.work_units is not None:
            return False
        tokens_seen = work.streamed_tokens or work.prompt_tokens is not None or work.output_tokens is not None
        if not tokens_seen and not (self.info.prompt_tokens_estimate and self.outcome == "ok"):
            return False
        return work.prompt_tokens is None or work.output_tokens is None

    def _flagged(self, figures: Figures) -> Figures:
        if not self._tokens_estimated:
            return figures
        return dataclasses.replace(figures, basis=f"{figures.basis}; {UNPARSED_BASIS}")

    def _prompt_counted(self, count: int) -> None:
        """The upstream's tokenizer counted the prompt (after the response): the receipt
        settles with that count; attribution uses it if it has not settled yet."""
        work = self.reader.work
        if work.prompt_tokens is not None or self.receipt is None:
            return
        work.prompt_tokens = count
        if not self.usage.final:
            self.usage.prompt_tokens = work.computed_prompt_tokens(count)
        self.receipt.prompt_tokens = count
        if self._last_figures is not None:
            self._record(self, self.receipt, self._last_figures)

    def finalize(self, figures: Figures) -> None:
        """Called once attribution has settled every interval this request touched."""
        if self.receipt is None:
            return
        figures = self._flagged(figures)
        self._last_figures = figures
        self.receipt = self._update(self.receipt, figures, self.meta.basis_note)
        self._record(self, self.receipt, figures)

    def _receipt(self, figures: Figures, now: float) -> Receipt:
        meta = self.meta
        work = self.reader.work
        ttfb = None if self.first_byte_at is None else self.first_byte_at - meta.started_monotonic
        receipt = Receipt(
            receipt_id=meta.receipt_id,
            request_id=meta.request_id,
            credential_hash=meta.credential_hash,
            tenant=meta.tenant,
            upstream=self.upstream.name,
            model=self.info.model,
            dialect=self.dialect.name,
            method=meta.method,
            path=meta.path,
            status_code=self.status,
            outcome=self.outcome or "ok",
            started_unix=meta.started_unix,
            duration_seconds=now - meta.started_monotonic,
            time_to_first_byte_seconds=ttfb,
            prompt_tokens=work.prompt_tokens if work.prompt_tokens is not None else (self.info.prompt_tokens_estimate or None),
            cached_tokens=work.cached_tokens,
            output_tokens=work.output_tokens_best() if (work.output_tokens is not None or work.streamed_tokens) else None,
            work_units=work.work_units,
            images=work.images,
            energy_joules=0.0,
            pue=figures.pue,
            intensity_g_per_kwh=0.0,
            operational_grams=0.0,
            embodied_grams=0.0,
            co2e_grams=0.0,
            basis="",
            status="provisional",
        )
        route = self.route
        if route is not None and route.pool_size > 1:
            receipt.route = route.header_value()
            receipt.avoided_grams = route.avoided_grams
        return self._update(receipt, figures, meta.basis_note)

    @staticmethod
    def _update(receipt: Receipt, figures: Figures, basis_note: str = "") -> Receipt:
        receipt.energy_joules = figures.energy_joules
        receipt.intensity_g_per_kwh = figures.intensity_g_per_kwh
        receipt.operational_grams = figures.operational_grams
        receipt.embodied_grams = figures.embodied_grams
        receipt.co2e_grams = figures.co2e_grams
        receipt.basis = figures.basis + basis_note
        receipt.status = figures.status
        return receipt

    def describe(self) -> dict[str, Any]:
        return {"receipt_id": self.meta.receipt_id, "request_id": self.meta.request_id, "upstream": self.upstream.name, "outcome": self.outcome}


UNPARSED_BASIS = "tokens=estimated"
"""The basis flag of a count that is not the server's own (also: a stream passed through
unread past the event cap)."""

