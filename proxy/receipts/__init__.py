"""Receipts: one durable record per request, readable by the credential that made it."""

from proxy.receipts.model import Receipt, ReceiptStore

__all__ = ["Receipt", "ReceiptStore"]
