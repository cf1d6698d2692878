"""Budgets on one proxy: reserve before a request, settle after; bounded per-tenant state.

- Admission (`admit`, on the event loop): a request reserves its predicted grams
  (proxy.budgets.cost). It is admitted when used + reserved + predicted fits the budget,
  or when nothing of the tenant is in flight and the budget is not used up (so a
  request dearer than the prediction allows can still run, one at a time, and a fresh
  budget smaller than one request is not locked forever). Otherwise 429 (reject mode)
  or served and counted (flag mode).
- Settling (`on_record`): the provisional receipt replaces the reservation with its
  figure; the final receipt adds the difference. `release` frees a reservation whose
  request ended without a receipt.
- Overshoot bound (a tenant, one period, one proxy): spent <= budget + the sum, over the
  requests in flight together, of (actual - predicted) where positive; when a request
  was admitted alone on an almost-used budget, its whole cost. See README "Budgets".
- State: one small entry per tenant in an LRU of `cached_tenants`, plus the receipts
  database (table tenant_usage, kept by the writer). A tenant is read from the database
  on first sight, off the event loop, never all at start. Entries with requests in
  flight are never evicted (their reservations exist nowhere else).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from itertools import islice
from typing import Awaitable, Callable, Iterable, Sequence

from proxy.budgets.config import Budget, BudgetConfig, period_end_unix, period_key
from proxy.budgets.cost import CostModel
from proxy.receipts.model import Receipt

log = logging.getLogger("carbon_proxy.budgets")

MAX_TRACKED_PROVISIONAL = 100_000
"""Requests charged provisionally and awaiting their final figure (bounded)."""

UsageLoader = Callable[[Sequence[str], Sequence[str]], Awaitable[dict[tuple[str, str], float]]]
"""(period keys, tenants) -> grams per (tenant, period key): the store's tenant_usage_grams."""


class TenantState:
    """What a proxy holds of one tenant with a budget."""

    __slots__ = ("period", "used_grams", "reserved_grams", "in_flight", "others_grams", "synced_at", "headroom_grams", "unseen_grams")

    def __init__(self, period: str, used_grams: float, others_grams: float = 0.0) -> None:
        self.period = period
        """The period key the figures are for ('day:2024-05-01', 'month:2024-05')."""
        self.used_grams = used_grams
        self.reserved_grams = 0.0
        """Held by this proxy's requests in flight."""
        self.in_flight = 0
        self.others_grams = others_grams
        """Held by other replicas' requests in flight (fleet budgets; 0 on one proxy)."""
        self.synced_at = 0.0
        """time.monotonic() of the last agreement with the fleet database."""
        self.headroom_grams = 0.0
        """Budget - used - reserved by all, at that agreement (fleet budgets)."""
        self.unseen_grams = 0.0
        """Reserved here since then: not seen by other replicas yet (fleet budgets)."""


@dataclass(frozen=True, slots=True)
class Admission:
    allowed: bool
    remaining_grams: float | None
    """Budget - used - reserved by others, before this request; None without a budget."""
    reserved_grams: float = 0.0
    over_budget: bool = False
    basis_note: str = ""
    """Appended to the request's X-Emissions-Basis (e.g. '; budget=local' while the fleet
    budget store is down and budget_on_store_down = "open")."""
    store_down: bool = False
    """Refused because the fleet budget store is down (budget_on_store_down = "closed")."""


OPEN = Admission(True, None)


class Budgets:
    def __init__(
        self,
        config: BudgetConfig,
        clock: Callable[[], float] = time.time,
        label: Callable[[str], str] = lambda tenant: tenant,
        cost: CostModel | None = None,
    ) -> None:
        self.config = config
        self.enabled = bool(config.budgets)
        self.reject = config.mode == "reject"
        self.cost = cost or CostModel()
        self._clock = clock
        self._label = label
        self._loader: UsageLoader | None = None
        self._tenants: OrderedDict[str, TenantState] = OrderedDict()
        self._loading: dict[str, asyncio.Future[TenantState]] = {}
        self._reservations: dict[str, tuple[str, TenantState, float]] = {}
        """receipt id -> (tenant, its state, grams reserved)."""
        self._charged: dict[str, float] = {}
        """receipt id -> grams charged for its provisional receipt."""
        self._load_failures_logged = False
        self._warming: set[asyncio.Future[TenantState]] = set()
        # For metrics, by tenant label (bounded): requests turned away or served over budget.
        self.rejected_total: dict[str, int] = {}
        self.flagged_total: dict[str, int] = {}
        self.evicted_total = 0
        self.loaded_total = 0

    def start(self) -> None:
        """Background work, if any (fleet budgets sync)."""

    async def close(self) -> None:
        """Give back what this proxy holds (fleet budgets)."""

    def attach(self, loader: UsageLoader) -> None:
        """Where a tenant's usage is read from on first sight (the receipts store)."""
        self._loader = loader

    def warm(self, tenants: Iterable[str]) -> None:
        """Read these (few, configured) tenants now, in the background: their budget
        gauge shows before their first request."""
        for tenant in tenants:
            if self.enabled and self.config.for_tenant(tenant) is not None and tenant not in self._tenants:
                task = asyncio.ensure_future(self.state(tenant))
                self._warming.add(task)
                task.add_done_callback(self._warming.discard)

    @property
    def cached_tenants(self) -> int:
        return len(self._tenants)

    # -- admission ----------------------------------------------------------------------

    async def admit(
        self, tenant: str, receipt_id: str, model: str | None, prompt_tokens: int, max_output_tokens: int | None
    ) -> Admission:
        budget = self.config.for_tenant(tenant) if self.enabled else None
        if budget is None:
            return OPEN
        state = await self.state(tenant)
        predicted = self.cost.predict_grams(model, prompt_tokens, max_output_tokens)
        return self.decide(tenant, receipt_id, state, budget, predicted)

    def decide(self, tenant: str, receipt_id: str, state: TenantState, budget: Budget, predicted: float) -> Admission:
        """Admit and reserve, or refuse, on the figures `state` holds now."""
        remaining = budget.grams - state.used_grams - state.reserved_grams - state.others_grams
        alone = state.in_flight == 0 and state.others_grams <= 0
        fits = remaining >= predicted or (alone and budget.grams - state.used_grams > 0)
        if not fits:
            counter = self.rejected_total if self.reject else self.flagged_total
            label = self._label(tenant)
            counter[label] = counter.get(label, 0) + 1
            if self.reject:
                return Admission(False, remaining, over_budget=True)
        state.reserved_grams += predicted
        state.in_flight += 1
        self._reservations[receipt_id] = (tenant, state, predicted)
        return Admission(True, remaining, predicted, over_budget=not fits)

    def release(self, receipt_id: str) -> None:
        """The request is over: free its reservation if no receipt settled it."""
        held = self._reservations.pop(receipt_id, None)
        if held is not None:
            _, state, grams = held
            state.reserved_grams = max(0.0, state.reserved_grams - grams)
            state.in_flight -= 1

    def retry_after_seconds(self, tenant: str) -> int:
        budget = self.config.for_tenant(tenant)
        if budget is None:
            return 0
        now = self._clock()
        return max(1, math.ceil(period_end_unix(budget.period, now) - now))

    # -- settling -----------------------------------------------------------------------

    def on_record(self, receipt: Receipt, *_: object) -> None:
        """ProxyServer.on_record listener."""
        self.charge(receipt)

    def charge(self, receipt: Receipt) -> None:
        """Charge a recorded receipt: all of it when provisional, the change when final."""
        if not self.enabled:
            return
        if receipt.status == "final":
            self.cost.learn(receipt)
        budget = self.config.for_tenant(receipt.tenant)
        if budget is None:
            return
        self.release(receipt.receipt_id)
        previous = self._charged.pop(receipt.receipt_id, 0.0)
        if receipt.status != "final":
            if len(self._charged) >= MAX_TRACKED_PROVISIONAL:
                self._charged.pop(next(iter(self._charged)))
            self._charged[receipt.receipt_id] = receipt.co2e_grams
        delta = receipt.co2e_grams - previous
        key = period_key(budget.period, receipt.started_unix)
        self._settled(receipt.tenant, key, delta)
        state = self._tenants.get(receipt.tenant)
        if state is None:
            return  # not held (evicted): the database counts it, and is read on next sight
        self._roll(state, budget.period)
        if key == state.period:
            state.used_grams += delta

    def _settled(self, tenant: str, period_key: str, delta_grams: float) -> None:
        """Grams charged for (tenant, period), held or not (fleet budgets push them)."""

    # -- state --------------------------------------------------------------------------

    async def state(self, tenant: str) -> TenantState:
        state = self._tenants.get(tenant)
        if state is not None:
            self._tenants.move_to_end(tenant)
            budget = self.config.for_tenant(tenant)
            if budget is not None:
                self._roll(state, budget.period)
            return state
        loading = self._loading.get(tenant)
        if loading is None:
            loading = asyncio.ensure_future(self._load(tenant))
            self._loading[tenant] = loading
        return await asyncio.shield(loading)

    def used_grams(self, tenant: str) -> float | None:
        """The tenant's usage in its budget's current period, if held in memory."""
        state = self._tenants.get(tenant)
        return None if state is None else state.used_grams

    def remaining_grams(self, tenants: Iterable[str] | None = None) -> dict[str, float]:
        """Budget - used - reserved of `tenants` (None: all held in memory) that are held."""
        out: dict[str, float] = {}
        for tenant in list(self._tenants) if tenants is None else tenants:
            state = self._tenants.get(tenant)
            budget = self.config.for_tenant(tenant)
            if state is not None and budget is not None:
                self._roll(state, budget.period)
                out[tenant] = budget.grams - state.used_grams - state.reserved_grams - state.others_grams
        return out

    async def _load(self, tenant: str) -> TenantState:
        budget = self.config.for_tenant(tenant)
        assert budget is not None
        key = period_key(budget.period, self._clock())
        used = 0.0
        try:
            used = await self._read_used(tenant, key)
            self._load_failures_logged = False
        except Exception as exc:
            if not self._load_failures_logged:  # once per outage
                self._load_failures_logged = True
                log.error("budgets: cannot read usage from the receipts database (%s); counting from zero", exc)
        finally:
            self._loading.pop(tenant, None)
        state = self._tenants.get(tenant)  # a concurrent load may have won
        if state is None:
            state = self._tenants[tenant] = self._new_state(key, used)
            self.loaded_total += 1
            self._evict()
        return state

    async def _read_used(self, tenant: str, key: str) -> float:
        if self._loader is None:
            return 0.0
        usage = await self._loader([key], [tenant])  # the store reads off the event loop
        return usage.get((tenant, key), 0.0)

    def _new_state(self, key: str, used: float) -> TenantState:
        return TenantState(key, used)

    def _evict(self) -> None:
        excess = len(self._tenants) - self.config.cached_tenants
        if excess <= 0:
            return
        for tenant in list(islice(self._tenants, excess + 64)):  # oldest first; a few pinned ones skipped
            if self._tenants[tenant].in_flight == 0:
                del self._tenants[tenant]
                self.evicted_total += 1
                excess -= 1
                if excess == 0:
                    return

    def _roll(self, state: TenantState, period: str) -> None:
        current = period_key(period, self._clock())
        if current != state.period:  # a new day (or month): that period starts from zero
            state.period = current
            state.used_grams = 0.0
