"""The shared background poller behind every live intensity provider.

Requests never wait on a provider: a task polls in the background and `current()` /
`at()` only read what it cached. When the source fails, the last good value is used
(flagged stale); once that is older than `stale_after_seconds`, the offline table
value is used instead (also flagged stale). A 429 backs off and honours Retry-After.
"""

from __future__ import annotations

import abc
import asyncio
import bisect
import contextlib
import logging
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, ClassVar, Iterable, Mapping

import aiohttp
import orjson
import yarl

from proxy.carbon.forecast import ForecastWindow, flat, windows_from_points
from proxy.carbon.intensity import IntensityReading
from proxy.carbon.providers.parsing import MalformedResponse, parse_retry_after
from proxy.carbon.table import TableIntensity

log = logging.getLogger("proxy.carbon.intensity")

MAX_BODY_BYTES = 4 * 1024 * 1024
USER_AGENT = "carbon-proxy (grid intensity poller)"


class ProviderError(Exception):
    """A failed poll. The message is written by us and safe to log (no secrets, no bodies)."""


class RateLimited(ProviderError):
    def __init__(self, retry_after_seconds: float | None) -> None:
        super().__init__("HTTP 429 rate limited" + (f", Retry-After {retry_after_seconds:g}s" if retry_after_seconds is not None else ""))
        self.retry_after_seconds = retry_after_seconds


class Unauthorized(ProviderError):
    def __init__(self, status: int, what: str = "the key") -> None:
        super().__init__(f"HTTP {status}: {what} was refused")
        self.status = status


class Forbidden(ProviderError):
    """HTTP 403: the credentials are fine but this zone, region or plan is not allowed."""

    def __init__(self, what: str = "this zone or region") -> None:
        super().__init__(f"HTTP 403: the account's plan does not allow {what}")


class Redirected(ProviderError):
    """HTTP 3xx: the configured URL is not the API's own (an old host, or a typo).

    Never followed (it would carry the key to whatever host it names); a configuration
    error, so the message names the key to fix and where the server pointed.
    """

    def __init__(self, status: int, location: str, key: str) -> None:
        super().__init__(f"HTTP {status} redirect to {location or 'an unnamed place'}: {key} is not the API's current URL; set it there")
        self.status = status


class NoData(ProviderError):
    """The source answered, but has no value for this place and time (e.g. HTTP 204)."""


class UpstreamFailed(ProviderError):
    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


@dataclass(frozen=True, slots=True)
class IntensityPoint:
    """One data point as a provider publishes it, already in gCO2e/kWh."""

    valid_from_unix: float
    g_per_kwh: float
    estimated: bool = False


@dataclass(frozen=True, slots=True)
class ProviderStatus:
    """Health of a live source, for metrics and logs."""

    source: str
    fallback_source: str
    healthy: bool
    last_success_unix: float | None
    last_attempt_unix: float | None
    consecutive_failures: int
    last_error: str | None
    points: int


class PollingProvider(abc.ABC):
    """Base class: subclasses implement `fetch()` (and may set `marginal`)."""

    provider_name: ClassVar[str] = "polling"
    marginal: bool = False
    """True for marginal signals (WattTime MOER); set per class or per instance."""
    credential_hint: ClassVar[str] = "the provider's credentials"
    url_key: ClassVar[str] = "carbon.url"
    """The config key of the base URL, named when the server redirects."""

    @property
    def forbidden_what(self) -> str:
        return f"{self.zone_label!r}"

    def __init__(
        self,
        *,
        zone_label: str,
        fallback: TableIntensity,
        poll_seconds: float,
        stale_after_seconds: float,
        timeout_seconds: float = 10.0,
        startup_wait_seconds: float = 2.0,
        retry_seconds: float = 30.0,
        max_backoff_seconds: float = 3600.0,
        history_seconds: float = 86400.0,
        session: aiohttp.ClientSession | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.zone_label = zone_label
        self.fallback = fallback
        self.poll_seconds = float(poll_seconds)
        self.stale_after_seconds = float(stale_after_seconds)
        self.timeout_seconds = float(timeout_seconds)
        self.startup_wait_seconds = float(startup_wait_seconds)
        self.retry_seconds = float(retry_seconds)
        self.max_backoff_seconds = float(max_backoff_seconds)
        self.history_seconds = float(history_seconds)
        self._clock = clock
        self._session = session
        self._owns_session = False
        self._task: asyncio.Task[None] | None = None
        self._first_attempt_done = asyncio.Event()
        self._times: list[float] = []
        self._points: dict[float, IntensityPoint] = {}
        self._failing_since: float | None = None
        self._consecutive_failures = 0
        self._consecutive_rate_limits = 0
        self._last_error: str | None = None
        self._last_success_unix: float | None = None
        self._last_attempt_unix: float | None = None
        self.last_delay_seconds: float | None = None
        """The delay the poller chose after its latest attempt (for tests and metrics)."""
        self._fallback_reading = replace(fallback.current(), stale=True)

    # ---- what subclasses provide ---------------------------------------------------
    @abc.abstractmethod
    async def fetch(self) -> list[IntensityPoint]:
        """The provider's latest data points (raises ProviderError subclasses on failure)."""

    def secret_values(self) -> Iterable[str]:
        """Values to scrub from any message before it is logged."""
        return ()

    # ---- the provider interface ----------------------------------------------------
    @property
    def source(self) -> str:
        return f"{self.provider_name}:{self.zone_label}"

    async def start(self) -> None:
        if self._task is not None:
            return
        if self._session is None:
            self._session = aiohttp.ClientSession(headers={"User-Agent": USER_AGENT})
            self._owns_session = True
        self._task = asyncio.create_task(self._run(), name=f"carbon-intensity:{self.source}")
        if self.startup_wait_seconds > 0:
            # Bounded: a dead provider delays startup by at most this, never a request.
            try:
                await asyncio.wait_for(self._first_attempt_done.wait(), self.startup_wait_seconds)
            except asyncio.TimeoutError:
                log.info("%s has not answered yet; using %s until it does", self.source, self.fallback.current().source)

    def current(self) -> IntensityReading:
        return self.at(self._clock())

    def at(self, unix_seconds: float) -> IntensityReading:
        try:
            return self._reading_at(float(unix_seconds))
        except Exception:  # never raise into the request path
            return self._fallback_reading

    def forecast(self, now_unix: float, horizon_seconds: float) -> list[ForecastWindow]:
        """The cached points from the one in force at `now` on (proxy.carbon.forecast).

        Nothing usable (no point yet, or the newest is past `stale_after_seconds`): the
        fallback's flat line, so a caller never plans on data the poller would not serve.
        """
        try:
            index = bisect.bisect_right(self._times, now_unix) - 1
            fresh = index >= 0 and now_unix - self._times[index] <= self.stale_after_seconds
            points = [self._points[t] for t in self._times[index:]] if fresh else []
            windows = windows_from_points([(p.valid_from_unix, p.g_per_kwh, p.estimated) for p in points], now_unix, horizon_seconds)
        except Exception:  # never raise into a caller
            windows = []
        if windows:
            return windows
        return flat(self._fallback_reading.g_per_kwh, now_unix, horizon_seconds, estimated=True)

    def change_points(self, t0_unix: float, t1_unix: float) -> list[float]:
        """Times inside (t0, t1) where the value at() returns may change: data-point
        boundaries, the staleness limit of each point, and the start of an outage."""
        marks: set[float] = set()
        lo = bisect.bisect_right(self._times, t0_unix - self.stale_after_seconds)
        for valid_from in self._times[lo:]:
            if valid_from >= t1_unix:
                break
            marks.add(valid_from)
            marks.add(valid_from + self.stale_after_seconds)
        if self._failing_since is not None:
            marks.add(self._failing_since)
        return sorted(m for m in marks if t0_unix < m < t1_unix)

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None
            self._owns_session = False

    def status(self) -> ProviderStatus:
        return ProviderStatus(
            source=self.source,
            fallback_source=self.fallback.current().source,
            healthy=self._last_success_unix is not None and self._failing_since is None,
            last_success_unix=self._last_success_unix,
            last_attempt_unix=self._last_attempt_unix,
            consecutive_failures=self._consecutive_failures,
            last_error=self._last_error,
            points=len(self._times),
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(source={self.source!r}, fallback={self.fallback.current().source!r})"

    # ---- reading the cache ---------------------------------------------------------
    def _reading_at(self, t: float) -> IntensityReading:
        index = bisect.bisect_right(self._times, t) - 1
        if index < 0:
            return self._fallback_reading
        valid_from = self._times[index]
        if t - valid_from > self.stale_after_seconds:
            return self._fallback_reading
        point = self._points[valid_from]
        return IntensityReading(
            g_per_kwh=point.g_per_kwh,
            source=self.source,
            stale=self._failing_since is not None and t >= self._failing_since,
            estimated=point.estimated,
            marginal=self.marginal,
            valid_from_unix=valid_from,
        )

    # ---- the poll loop ---------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            delay = await self.poll_once()
            self._first_attempt_done.set()
            await asyncio.sleep(delay)

    async def poll_once(self) -> float:
        """One attempt; returns the seconds to wait before the next."""
        now = self._clock()
        self._last_attempt_unix = now
        try:
            points = await self.fetch()
            if not points:
                raise NoData("no data points in the response")
        except asyncio.CancelledError:
            raise
        except RateLimited as exc:
            self._consecutive_rate_limits += 1
            self._record_failure(now, str(exc))
            backoff = min(self.max_backoff_seconds, self.poll_seconds * 2.0**self._consecutive_rate_limits)
            delay = max(backoff, exc.retry_after_seconds or 0.0)
        except Unauthorized as exc:
            self._record_failure(now, f"{exc}; check {self.credential_hint}")
            delay = self.poll_seconds
        except NoData as exc:  # not a fault: ask again at the normal pace
            self._record_failure(now, str(exc))
            delay = self.poll_seconds
        except (Forbidden, Redirected) as exc:  # retrying soon cannot help: back off
            self._record_failure(now, str(exc))
            delay = min(self.max_backoff_seconds, self.poll_seconds * 2.0 ** self._consecutive_failures)
        except Exception as exc:  # outage, timeout, 5xx, malformed body, or a parser bug
            self._record_failure(now, self._describe(exc))
            delay = self._failure_backoff()
        else:
            self._record_success(now, points)
            delay = self.poll_seconds
        self.last_delay_seconds = delay
        return delay

    def _failure_backoff(self) -> float:
        base = min(self.poll_seconds, self.retry_seconds)
        return min(self.poll_seconds, base * 2.0 ** max(0, self._consecutive_failures - 1))

    def _describe(self, exc: BaseException) -> str:
        if isinstance(exc, MalformedResponse):
            return f"malformed response: {exc}"
        if isinstance(exc, ProviderError):
            return str(exc)
        if isinstance(exc, asyncio.TimeoutError):
            return f"no answer within {self.timeout_seconds:g}s"
        if isinstance(exc, aiohttp.ClientConnectionError):
            return f"cannot connect ({type(exc).__name__})"
        if isinstance(exc, aiohttp.ClientError):
            return f"HTTP client error ({type(exc).__name__})"
        return f"unexpected {type(exc).__name__}"

    def _redact(self, text: str) -> str:
        for secret in self.secret_values():
            if secret:
                text = text.replace(secret, "***")
        return text

    def _record_failure(self, now: float, message: str) -> None:
        message = self._redact(message)
        self._consecutive_failures += 1
        self._last_error = message
        if self._failing_since is None:
            self._failing_since = now
            fallback = self.fallback.current().source
            log.warning(
                "grid intensity %s failed: %s; using the last good value (stale) for up to %gs, then %s",
                self.source, message, self.stale_after_seconds, fallback,
            )
        else:
            log.debug("grid intensity %s still failing (%d): %s", self.source, self._consecutive_failures, message)

    def _record_success(self, now: float, points: list[IntensityPoint]) -> None:
        if self._failing_since is not None:
            log.info("grid intensity %s answers again after %d failed polls", self.source, self._consecutive_failures)
        self._failing_since = None
        self._consecutive_failures = 0
        self._consecutive_rate_limits = 0
        self._last_error = None
        self._last_success_unix = now
        for point in points:
            if point.valid_from_unix not in self._points:
                bisect.insort(self._times, point.valid_from_unix)
            self._points[point.valid_from_unix] = point  # a later poll replaces a forecast
        # Keep a bounded history, but always the newest point.
        cutoff = now - self.history_seconds
        while len(self._times) > 1 and self._times[0] < cutoff:
            del self._points[self._times.pop(0)]

    # ---- HTTP helper -----------------------------------------------------------------
    async def get_json(
        self,
        url: str,
        *,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        if self._session is None:
            raise ProviderError("provider not started")
        timeout = aiohttp.ClientTimeout(total=self.timeout_seconds)
        # No redirects: a redirect would carry the key to whatever host it names.
        async with self._session.get(
            url, params=params, headers=headers, timeout=timeout, allow_redirects=False
        ) as resp:
            if resp.status == 204:
                raise NoData("HTTP 204: no data for this place and time")
            if resp.status == 429:
                raise RateLimited(parse_retry_after(resp.headers.get("Retry-After"), self._clock()))
            if resp.status == 401:
                raise Unauthorized(resp.status)
            if resp.status == 403:
                raise Forbidden(self.forbidden_what)
            if 300 <= resp.status < 400:
                location = yarl.URL(resp.headers.get("Location", ""))
                where = f"{location.scheme}://{location.host}" if location.host else ""
                raise Redirected(resp.status, where, self.url_key)
            if resp.status >= 300:
                raise UpstreamFailed(resp.status)
            body = bytearray()
            async for chunk in resp.content.iter_chunked(65536):
                body += chunk
                if len(body) > MAX_BODY_BYTES:
                    raise MalformedResponse(f"response larger than {MAX_BODY_BYTES} bytes")
        try:
            return orjson.loads(bytes(body))
        except orjson.JSONDecodeError:
            raise MalformedResponse("response is not valid JSON") from None
