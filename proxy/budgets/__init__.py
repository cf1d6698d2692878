"""CO2e budgets per tenant per day or month: reject (429) or flag when used up.

config: the [tenants] keys; cost: predicted grams of a request; ledger: reserve before,
settle after, per-tenant state bounded (LRU plus the receipts database).
"""

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

__all__ = [
    "DEFAULT_TENANT",
    "REMAINING_HEADER",
    "Admission",
    "Budget",
    "BudgetConfig",
    "Budgets",
    "format_grams",
    "parse_budgets",
    "period_end_unix",
]
