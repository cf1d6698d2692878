"""CO2e budgets: the [tenants] config, periods and formatting (no state here).

Config, under [tenants]:

    budget_mode = "reject"                       # or "flag": serve, but report it
    budget_cached_tenants = 10000                # tenants held in memory (LRU); others reload lazily
    budget_on_store_down = "open"                # fleet budgets only: or "closed"
    [tenants.budgets]
    team-a = { grams = 500, period = "day" }
    team-b = { grams = 20000, period = "month" }
    "*" = { grams = 50, period = "day" }         # every other tenant, each on its own

Periods are calendar days and months in UTC; a request counts in the period it started.
"""

from __future__ import annotations

import calendar
import math
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

from proxy.errors import ConfigError
from proxy.receipts.model import period_keys

PERIODS = ("day", "month")
MODES = ("reject", "flag")
STORE_DOWN_MODES = ("open", "closed")
DEFAULT_TENANT = "*"
REMAINING_HEADER = "X-CO2e-Budget-Remaining"
DEFAULT_CACHED_TENANTS = 10_000
"""Tenants whose usage is held in memory; the rest are read back from the database."""


@dataclass(frozen=True, slots=True)
class Budget:
    grams: float
    period: str


@dataclass(frozen=True, slots=True)
class BudgetConfig:
    mode: str = "reject"
    budgets: Mapping[str, Budget] = field(default_factory=dict)
    cached_tenants: int = DEFAULT_CACHED_TENANTS
    on_store_down: str = "open"
    """Fleet budgets while PostgreSQL is unreachable: "open" serves on local figures, "closed" rejects."""

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
    cached = tenants.get("budget_cached_tenants", DEFAULT_CACHED_TENANTS)
    if isinstance(cached, bool) or not isinstance(cached, int) or cached < 1:
        raise ConfigError("tenants.budget_cached_tenants", f"expected a whole number >= 1, got {cached!r}")
    down = tenants.get("budget_on_store_down", "open")
    if down not in STORE_DOWN_MODES:
        raise ConfigError("tenants.budget_on_store_down", f"expected one of: {', '.join(STORE_DOWN_MODES)}; got {down!r}")
    return BudgetConfig(mode=mode, budgets=budgets, cached_tenants=cached, on_store_down=down)


def period_end_unix(period: str, now_unix: float) -> float:
    """When the current UTC day or month ends (a rejected client's Retry-After)."""
    t = time.gmtime(now_unix)
    if period == "day":
        return calendar.timegm((t.tm_year, t.tm_mon, t.tm_mday, 0, 0, 0)) + 86_400.0
    year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
    return float(calendar.timegm((year, month, 1, 0, 0, 0)))


def period_key(period: str, unix_seconds: float) -> str:
    day, month = period_keys(unix_seconds)
    return day if period == "day" else month


def format_grams(value: float) -> str:
    """Plain decimals to the nanogram (no exponent) from 0.1 mg up: a header that reads like the budget."""
    if value == 0 or abs(value) >= 1e-4:
        return f"{value:.9f}".rstrip("0").rstrip(".")
    return f"{value:.3e}"
