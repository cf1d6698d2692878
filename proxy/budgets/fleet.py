"""Budgets shared by every replica through PostgreSQL (DESIGN.md section 11).

One row per tenant and period in `carbon_budget_usage` holds the fleet's settled grams
and the grams all replicas hold reserved for requests in flight; `carbon_budget_reservations`
holds each replica's share of the latter. A sync is one statement per batch of tenants:
it adds this replica's settled grams since the last sync and its change in reservations
to the shared row, under that row's lock, and returns the row. So the figures a replica
gets back include every other replica's pushes that committed before, exactly.

- Every SYNC_INTERVAL_SECONDS, tenants touched since (and those with requests in flight,
  as a heartbeat) are synced in the background.
- An admission syncs first (reserving its prediction before it asks) when the tenant's
  figures are older than MAX_AGE_SECONDS, or when this replica's reservations since the
  last sync, with this one, would pass SHARE_BETWEEN_SYNCS of the headroom (budget - used
  - reserved by all) the last sync saw. As the headroom shrinks, syncs come closer
  together; near the limit every request syncs, and replicas decide one at a time on
  the shared row.
- Reservations of a replica that stopped syncing (crash, partition) for STALE_SECONDS are
  taken back by whichever replica notices.
- While PostgreSQL is down: "open" serves on the last shared figures plus this replica's
  own (the basis says `budget=local`), "closed" answers 503. Settled grams not yet pushed
  are kept and pushed when it is back; a replica killed with SIGKILL loses at most one
  interval of them from the shared counter (never from the receipts).

Overshoot with N replicas: as on one proxy (proxy.budgets.ledger), with the sum taken
over the requests in flight across the fleet; plus what replicas reserved unseen by each
other between syncs: each at most SHARE_BETWEEN_SYNCS x the headroom H it last saw, so
N x SHARE_BETWEEN_SYNCS x H in all, which fits in H while N <= 1 / SHARE_BETWEEN_SYNCS
(10 replicas): beyond that, at most (N x SHARE_BETWEEN_SYNCS - 1) x H more.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable

from proxy.budgets.config import Budget, BudgetConfig
from proxy.budgets.ledger import Admission, Budgets, TenantState
from proxy.receipts.postgres import Postgres, PostgresUnavailable
from proxy.tasks import cancel_and_wait

log = logging.getLogger("carbon_proxy.budgets")

SYNC_INTERVAL_SECONDS = 0.5
MAX_AGE_SECONDS = 1.0
REQUEST_SYNC_SECONDS = 0.25
"""The longest a request waits for a sync (or a first read) before deciding on local figures."""
SHARE_BETWEEN_SYNCS = 0.1
STALE_SECONDS = 10.0
JANITOR_SECONDS = 5.0
LOCAL_NOTE = "; budget=local"
MAX_QUEUED_DELTAS = 100_000
"""(tenant, period) pairs whose settled grams wait for the store (bounded memory)."""

_SYNC = """
WITH d AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::float8[], $4::float8[]) AS d(tenant, period, used_delta, reserved_now)
),
prev AS (
    SELECT d.*, coalesce(r.reserved_grams, 0) AS reserved_before FROM d
    LEFT JOIN carbon_budget_reservations r ON r.replica = $5 AND r.tenant = d.tenant AND r.period = d.period
),
mine AS (
    INSERT INTO carbon_budget_reservations (replica, tenant, period, reserved_grams, updated_at)
    SELECT $5, tenant, period, reserved_now, now() FROM d
    ON CONFLICT (replica, tenant, period) DO UPDATE SET reserved_grams = excluded.reserved_grams, updated_at = now()
)
INSERT INTO carbon_budget_usage AS u (tenant, period, used_grams, reserved_grams)
SELECT tenant, period, used_delta, reserved_now - reserved_before FROM prev ORDER BY tenant, period
ON CONFLICT (tenant, period) DO UPDATE
    SET used_grams = u.used_grams + excluded.used_grams, reserved_grams = greatest(0, u.reserved_grams + excluded.reserved_grams)
RETURNING tenant, period, used_grams, reserved_grams
"""

_JANITOR = f"""
WITH dead AS (
    DELETE FROM carbon_budget_reservations WHERE updated_at < now() - interval '{STALE_SECONDS:g} seconds'
    RETURNING tenant, period, reserved_grams
), lost AS (SELECT tenant, period, sum(reserved_grams) AS grams FROM dead GROUP BY tenant, period)
UPDATE carbon_budget_usage u SET reserved_grams = greatest(0, u.reserved_grams - lost.grams)
FROM lost WHERE u.tenant = lost.tenant AND u.period = lost.period
"""

_READ = "SELECT used_grams, reserved_grams FROM carbon_budget_usage WHERE tenant = $1 AND period = $2"


class FleetBudgets(Budgets):
    def __init__(
        self,
        config: BudgetConfig,
        postgres: Postgres,
        replica: str,
        clock: Callable[[], float] = time.time,
        label: Callable[[str], str] = lambda tenant: tenant,
    ) -> None:
        super().__init__(config, clock=clock, label=label)
        self.postgres = postgres
        self.replica = replica
        self.closed_when_down = config.on_store_down == "closed"
        self._deltas: dict[tuple[str, str], float] = {}
        """Settled grams not pushed yet, by (tenant, period key)."""
        self._dirty: set[str] = set()
        self._sync_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._next_janitor = 0.0
        self.store_up = True
        self.syncs_total = 0
        self.sync_failures_total = 0
        self.admitted_store_down_total = 0
        self.deltas_dropped_total = 0

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        if self.enabled and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="fleet-budget-sync")

    async def close(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None
        for state in self._tenants.values():
            state.reserved_grams = 0.0  # this replica holds nothing any more
        try:
            await self.sync(list(self._tenants) + [t for t, _ in self._deltas])
        except PostgresUnavailable:
            log.warning("budgets: %d tenant(s) of settled grams could not be pushed at shutdown", len(self._deltas))

    # -- admission ------------------------------------------------------------------------

    async def admit(
        self, tenant: str, receipt_id: str, model: str | None, prompt_tokens: int, max_output_tokens: int | None
    ) -> Admission:
        budget = self.config.for_tenant(tenant) if self.enabled else None
        if budget is None:
            return await super().admit(tenant, receipt_id, model, prompt_tokens, max_output_tokens)
        state = await self.state(tenant)
        predicted = self.cost.predict_grams(model, prompt_tokens, max_output_tokens)
        if self.store_up and self._needs_sync(state, budget, predicted):
            # Reserve first, then sync: the shared row sees this request before we decide.
            # Bounded: a slow or unreachable store never holds a request longer than
            # REQUEST_SYNC_SECONDS (the sync itself finishes in the background).
            state.reserved_grams += predicted
            sync = asyncio.ensure_future(self.sync([tenant]))
            sync.add_done_callback(_consume)
            try:
                await asyncio.wait_for(asyncio.shield(sync), REQUEST_SYNC_SECONDS)
            except PostgresUnavailable:
                pass
            except asyncio.TimeoutError:
                self._down()  # until the background sync gets through again
            finally:
                state.reserved_grams = max(0.0, state.reserved_grams - predicted)
        if not self.store_up:
            if self.closed_when_down:
                return Admission(False, None, store_down=True)
            self.admitted_store_down_total += 1
        admission = self.decide(tenant, receipt_id, state, budget, predicted)
        self._dirty.add(tenant)
        if admission.reserved_grams:
            state.unseen_grams += admission.reserved_grams
        if not self.store_up:
            return Admission(admission.allowed, admission.remaining_grams, admission.reserved_grams, admission.over_budget, LOCAL_NOTE)
        return admission

    def release(self, receipt_id: str) -> None:
        held = self._reservations.get(receipt_id)
        if held is not None:
            self._dirty.add(held[0])
        super().release(receipt_id)

    def _needs_sync(self, state: TenantState, budget: Budget, predicted: float) -> bool:
        if time.monotonic() - state.synced_at > MAX_AGE_SECONDS:
            return True
        return state.unseen_grams + predicted > SHARE_BETWEEN_SYNCS * state.headroom_grams

    def _settled(self, tenant: str, period_key: str, delta_grams: float) -> None:
        key = (tenant, period_key)
        if key not in self._deltas and len(self._deltas) >= MAX_QUEUED_DELTAS:
            # A long outage with very many tenants: keep memory bounded. The receipts still
            # reach PostgreSQL through the outbox; only the shared counter misses these.
            self.deltas_dropped_total += 1
            if self.deltas_dropped_total == 1:
                log.error("budgets: %d tenants' settled grams are waiting for the store; dropping new ones", MAX_QUEUED_DELTAS)
            return
        self._deltas[key] = self._deltas.get(key, 0.0) + delta_grams
        self._dirty.add(tenant)

    # -- the shared rows ----------------------------------------------------------------

    async def _read_used(self, tenant: str, key: str) -> float:
        """On a tenant's first sight (the request path): bounded like a sync. While the
        store is down the tenant starts from zero here, flagged; the background sync
        corrects it once the store answers."""
        if not self.store_up:
            raise PostgresUnavailable("the fleet budget store is down")
        row = await asyncio.wait_for(self.postgres.run(lambda conn: conn.fetchrow(_READ, tenant, key)), REQUEST_SYNC_SECONDS)
        return 0.0 if row is None else float(row[0])

    def _new_state(self, key: str, used: float) -> TenantState:
        return TenantState(key, used)

    async def sync(self, tenants: list[str]) -> None:
        """Push this replica's settled grams and reservations for `tenants`, and take the
        fleet's figures back. Raises PostgresUnavailable (nothing is lost: the grams stay
        queued for the next sync)."""
        async with self._sync_lock:
            await self._sync_locked(sorted(set(tenants)))

    async def _sync_locked(self, tenants: list[str]) -> None:
        names: list[str] = []
        periods: list[str] = []
        deltas: list[float] = []
        reserved: list[float] = []
        for (tenant, period), grams in list(self._deltas.items()):
            state = self._tenants.get(tenant)
            names.append(tenant)
            periods.append(period)
            deltas.append(grams)
            reserved.append(state.reserved_grams if state is not None and state.period == period else 0.0)
        for tenant in tenants:
            state = self._tenants.get(tenant)
            if state is not None and (tenant, state.period) not in self._deltas:
                names.append(tenant)
                periods.append(state.period)
                deltas.append(0.0)
                reserved.append(state.reserved_grams)
        if not names:
            return
        pushed = {(n, p): d for n, p, d in zip(names, periods, deltas) if d}
        unseen = {t: s.unseen_grams for t, s in self._tenants.items() if t in set(names)}
        for key in pushed:
            self._deltas.pop(key, None)
        started = time.monotonic()
        try:
            rows = await self.postgres.run(lambda conn: self._exchange(conn, names, periods, deltas, reserved))
        except PostgresUnavailable:
            for key, grams in pushed.items():  # back in the queue, with anything newer
                self._deltas[key] = self._deltas.get(key, 0.0) + grams
            self._down()
            raise
        self.syncs_total += 1
        self._up()
        own = dict(zip(zip(names, periods), reserved))
        for tenant, period, used, fleet_reserved in rows:
            state = self._tenants.get(tenant)
            if state is None or state.period != period:
                continue
            # Grams settled here while the statement ran are still queued: count them too.
            state.used_grams = float(used) + self._deltas.get((tenant, period), 0.0)
            state.others_grams = max(0.0, float(fleet_reserved) - own[(tenant, period)])
            state.synced_at = started
            budget = self.config.for_tenant(tenant)
            if budget is not None:
                state.headroom_grams = budget.grams - float(used) - float(fleet_reserved)
                state.unseen_grams = max(0.0, state.unseen_grams - unseen.get(tenant, 0.0))  # keep what came meanwhile

    async def _exchange(self, conn: Any, names: list[str], periods: list[str], deltas: list[float], reserved: list[float]) -> list[Any]:
        async with conn.transaction():
            rows = await conn.fetch(_SYNC, names, periods, deltas, reserved, self.replica)
        if time.monotonic() >= self._next_janitor:
            self._next_janitor = time.monotonic() + JANITOR_SECONDS
            await conn.execute(_JANITOR)
        return list(rows)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(SYNC_INTERVAL_SECONDS)
            busy = [t for t, s in self._tenants.items() if s.in_flight or s.reserved_grams]
            tenants, self._dirty = list(self._dirty) + busy, set()
            try:
                if tenants or self._deltas:
                    await self.sync(tenants)
                elif not self.store_up:  # nothing to push, but is the store back?
                    await self.postgres.run(lambda conn: conn.fetchval("SELECT 1"))
                    self._up()
            except PostgresUnavailable:
                self._dirty.update(tenants)
            except Exception:
                log.exception("budgets: fleet sync failed")

    def _down(self) -> None:
        self.sync_failures_total += 1
        if self.store_up:
            self.store_up = False
            mode = "rejecting (503)" if self.closed_when_down else "serving on local figures (basis: budget=local)"
            log.error("budgets: the fleet budget store is unreachable; %s until it is back", mode)

    def _up(self) -> None:
        if not self.store_up:
            self.store_up = True
            log.warning("budgets: the fleet budget store is reachable again")


def _consume(task: asyncio.Future[None]) -> None:
    """A sync a request stopped waiting for: its failure is already counted (_down)."""
    if not task.cancelled():
        task.exception()
