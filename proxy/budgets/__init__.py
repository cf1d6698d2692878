"""CO2e budgets per tenant per day or month: reject (429) or flag when used up.

config: the [tenants] keys; cost: predicted grams of a request; ledger: reserve before,
settle after, per-tenant state bounded (LRU plus the receipts database).
"""

from typing import Callable

from proxy.budgets.config import (
    DEFAULT_TENANT,
    REMAINING_HEADER,
    Budget,
    BudgetConfig,
    format_grams,
    parse_budgets,
    period_end_unix,
)
from proxy.budgets.ledger import Admission, Budgets


def build_budgets(config: BudgetConfig, receipts: object, label: Callable[[str], str]) -> Budgets:
    """Fleet budgets when receipts go to PostgreSQL (shared by every replica), else local."""
    postgres = getattr(receipts, "postgres", None)
    shipper = getattr(receipts, "shipper", None)
    if postgres is not None and shipper is not None:
        from proxy.budgets.fleet import FleetBudgets

        return FleetBudgets(config, postgres, shipper.replica, label=label)
    return Budgets(config, label=label)

__all__ = [
    "DEFAULT_TENANT",
    "REMAINING_HEADER",
    "Admission",
    "Budget",
    "BudgetConfig",
    "Budgets",
    "build_budgets",
    "format_grams",
    "parse_budgets",
    "period_end_unix",
]
