"""Attribution only splits: measured joules per device group -> joules per request."""

from proxy.attribution.engine import AttributionEngine, GroupTotals
from proxy.attribution.usage import RequestUsage

__all__ = ["AttributionEngine", "GroupTotals", "RequestUsage"]
