"""Receipts for the store, budget, report and fleet tests."""

from __future__ import annotations

import time
from typing import Any

from proxy.receipts.model import Receipt


def make_receipt(request_id: str, **overrides: Any) -> Receipt:
    values: dict[str, Any] = dict(
        receipt_id=request_id,  # tests that need them distinct pass their own
        request_id=request_id,
        credential_hash="c" * 64,
        tenant="team-a",
        upstream="llama",
        model="llama-3-8b",
        dialect="openai",
        method="POST",
        path="/v1/chat/completions",
        status_code=200,
        outcome="ok",
        started_unix=time.time(),
        duration_seconds=0.5,
        time_to_first_byte_seconds=0.05,
        prompt_tokens=100,
        output_tokens=200,
        work_units=None,
        images=0,
        energy_joules=36.0,
        pue=1.2,
        intensity_g_per_kwh=450.0,
        operational_grams=0.0054,
        embodied_grams=0.0006,
        co2e_grams=0.006,
        basis="meter=nvml; intensity=constant; pue=1.2; status=provisional",
        status="provisional",
    )
    values.update(overrides)
    return Receipt(**values)


def finalize(receipt: Receipt, co2e_grams: float) -> Receipt:
    """The same request settled to final with new figures (as MeteredExchange does)."""
    receipt.co2e_grams = co2e_grams
    receipt.operational_grams = co2e_grams - receipt.embodied_grams
    receipt.status = "final"
    receipt.basis = receipt.basis.replace("status=provisional", "status=final")
    return receipt
