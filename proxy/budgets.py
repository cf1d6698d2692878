"""CO2e budgets per tenant per day or month: reject (429) or flag when used up.

Config, under [tenants]:

    budget_mode = "reject"                       # or "flag": serve, but report it
    [tenants.budgets]
    team-a = { grams = 500, period = "day" }
    team-b = { grams = 20000, period = "month" }
    "*" = { grams = 50, period = "day" }         # every other tenant, each on its own

Periods are calendar days and months in UTC; a request counts in the period it started.
Each receipt is charged as it is recorded: the provisional figure at the end of the
request, then the difference when it settles to final. The state outlives restarts:
the receipts database keeps the same sums per tenant and period (table tenant_usage),
and `load` reads them back at start.
"""

from __future__ import annotations

import calendar
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Mapping, Sequence

from proxy.errors import ConfigError
from proxy.receipts.model import Receipt, period_keys

log = logging.getLogger("carbon_proxy.budgets")

PERIODS = ("day", "month")
MODES = ("reject", "flag")
DEFAULT_TENANT = "*"
REMAINING_HEADER = "X-CO2e-Budget-Remaining"
MAX_TRACKED_PROVISIONAL = 100_000
"""Requests charged provisionally and awaiting their final figure (bounded)."""


@dataclass(frozen=True, slots=True)
class Budget:
    grams: float
    period: str


@dataclass(frozen=True, slots=True)
class BudgetConfig:
    mode: str = "reject"
    budgets: Mapping[str, Budget] = field(default_factory=dict)

    def for_tenant(self, tenant: str) -> Budget | None:
        return self.budgets.get(tenant) or self.budgets.get(DEFAULT_TENANT)


def parse_budgets(tenants: Mapping[str, Any]) -> BudgetConfig:
    """[tenants].budget_mode and [tenants.budgets], validated; errors name the key."""
    mode = tenants.get("budget_mode", "reject")
    if mode not in MODES:
        raise ConfigError("tenants.budget_mode", f"expected one of: {', '.join(MODES)}; got {mode!r}")
    table = tenants.get("budgets", {})
    if not isinstance(table, dict):
        raise ConfigError("tenants.budgets", "expected a table of tenant = { grams = N, period = \"day\" | \"month\" }")
    budgets: dict[str, Budget] = {}
    for tenant, entry in table.items():
        key = f"tenants.budgets.{tenant}"
        if not isinstance(entry, dict):
            raise ConfigError(key, f"expected {{ grams = N, period = \"day\" | \"month\" }}, got {entry!r}")
        for name in entry:
            if name not in ("grams", "period"):
                raise ConfigError(f"{key}.{name}", "unknown key; expected one of: grams, period")
        grams = entry.get("grams")
        if isinstance(grams, bool) or not isinstance(grams, (int, float)) or not math.isfinite(grams) or grams < 0:
            raise ConfigError(f"{key}.grams", f"expected a non-negative number of gCO2e, got {grams!r}")
        period = entry.get("period", "day")
        if period not in PERIODS:
            raise ConfigError(f"{key}.period", f"expected one of: {', '.join(PERIODS)}; got {period!r}")
        budgets[str(tenant)] = Budget(grams=float(grams), period=period)
    return BudgetConfig(mode=mode, budgets=budgets)


def period_end_unix(period: str, now_unix: float) -> float:
    """When the current UTC day or month ends (a rejected client's Retry-After)."""
    t = time.gmtime(now_unix)
    if period == "day":
        return calendar.timegm((t.tm_year, t.tm_mon, t.tm_mday, 0, 0, 0)) + 86_400.0
    year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
    return float(calendar.timegm((year, month, 1, 0, 0, 0)))


def _period_key(period: str, unix_seconds: float) -> str:
    day, month = period_keys(unix_seconds)
    return day if period == "day" else month


def format_grams(value: float) -> str:
    """Plain decimals to the nanogram (no exponent) from 0.1 mg up: a header that reads like the budget."""
    if value == 0 or abs(value) >= 1e-4:
        return f"{value:.9f}".rstrip("0").rstrip(".")
    return f"{value:.3e}"


UsageLoader = Callable[[Sequence[str]], Awaitable[dict[tuple[str, str], float]]]


class Budgets:
    def __init__(self, config: BudgetConfig, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.enabled = bool(config.budgets)
        self.reject = config.mode == "reject"
        self._clock = clock
        self._used: dict[tuple[str, str], float] = {}
        """grams per (tenant, period key), current periods only."""
        self._charged: dict[str, float] = {}
        """request id -> grams charged for its provisional receipt."""
        self._current: tuple[str, str] = ("", "")
        # For metrics: how many requests were turned away or served over budget.
        self.rejected_total: dict[str, int] = {}
        self.flagged_total: dict[str, int] = {}

    async def load(self, usage: UsageLoader) -> None:
        """Reload this day's and month's usage from the receipts database."""
        if not self.enabled:
            return
        periods = period_keys(self._clock())
        try:
            loaded = await usage(list(periods))
        except Exception as exc:
            log.error("budgets: cannot reload usage from the receipts database (%s); counting from zero", exc)
            return
        self._current = periods
        for key, grams in loaded.items():
            self._used[key] = self._used.get(key, 0.0) + grams

    def check(self, tenant: str) -> tuple[bool, float | None]:
        """(allowed, remaining grams). Remaining is None without a budget, and negative
        once overspent (flag mode serves such requests; reject mode does not)."""
        budget = self.config.for_tenant(tenant) if self.enabled else None
        if budget is None:
            return True, None
        now = self._clock()
        self._roll(now)
        remaining = budget.grams - self._used.get((tenant, _period_key(budget.period, now)), 0.0)
        if remaining > 0:
            return True, remaining
        counter = self.rejected_total if self.reject else self.flagged_total
        counter[tenant] = counter.get(tenant, 0) + 1
        return not self.reject, remaining

    def retry_after_seconds(self, tenant: str) -> int:
        budget = self.config.for_tenant(tenant)
        if budget is None:
            return 0
        now = self._clock()
        return max(1, math.ceil(period_end_unix(budget.period, now) - now))

    def charge(self, receipt: Receipt) -> None:
        """Charge a recorded receipt: all of it when provisional, the change when final."""
        if not self.enabled or self.config.for_tenant(receipt.tenant) is None:
            return
        previous = self._charged.pop(receipt.request_id, 0.0)
        if receipt.status != "final":
            if len(self._charged) >= MAX_TRACKED_PROVISIONAL:
                self._charged.pop(next(iter(self._charged)))
            self._charged[receipt.request_id] = receipt.co2e_grams
        delta = receipt.co2e_grams - previous
        self._roll(self._clock())
        for key in period_keys(receipt.started_unix):
            if key in self._current:  # a request from a period already over adds nothing now
                self._used[(receipt.tenant, key)] = self._used.get((receipt.tenant, key), 0.0) + delta

    def on_record(self, receipt: Receipt, *_: object) -> None:
        """ProxyServer.on_record listener."""
        self.charge(receipt)

    def used_grams(self, tenant: str, period: str) -> float:
        return self._used.get((tenant, _period_key(period, self._clock())), 0.0)

    def _roll(self, now: float) -> None:
        current = period_keys(now)
        if current != self._current:  # a new day (or month): forget the periods that ended
            self._current = current
            self._used = {key: grams for key, grams in self._used.items() if key[1] in current}
