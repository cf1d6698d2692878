"""Per-request metrics without a server: what is counted when, and bounded labels."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from proxy.metrics import MODEL_CAP, UNKNOWN_MODEL, ModelLabels, RequestMetrics
from proxy.receipts.model import Receipt
from proxy.tenants import OTHER, Tenancy


def receipt(**overrides: Any) -> Receipt:
    fields: dict[str, Any] = dict(
        receipt_id="rc1", request_id="r1", credential_hash=None, tenant="team-a", upstream="llama", model="m", dialect="openai",
        method="POST", path="/v1/chat/completions", status_code=200, outcome="ok", started_unix=0.0,
        duration_seconds=0.5, time_to_first_byte_seconds=0.1, prompt_tokens=10, output_tokens=20, work_units=None,
        images=0, energy_joules=30.0, pue=1.2, intensity_g_per_kwh=450.0, operational_grams=0.0045,
        embodied_grams=0.0005, co2e_grams=0.005, basis="", status="provisional",
    )  # fmt: skip
    fields.update(overrides)
    return Receipt(**fields)


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    sample = registry.get_sample_value(name, labels)
    return 0.0 if sample is None else sample


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def metrics(registry: CollectorRegistry) -> RequestMetrics:
    tenancy = Tenancy({"allow": ["team-a", "team-b"]})
    metrics = RequestMetrics(tenancy.label, ModelLabels(["m"]))
    registry.register(metrics)
    return metrics


KEY = {"upstream": "llama", "model": "m", "tenant": "team-a"}


def test_requests_and_tokens_count_once_energy_counts_the_final_figure(metrics: RequestMetrics, registry: CollectorRegistry) -> None:
    provisional = receipt(energy_joules=25.0, co2e_grams=0.004)
    metrics.record(provisional, None)
    # provisional: the request and its tokens, no energy yet
    assert value(registry, "carbon_proxy_requests_total", **KEY, outcome="ok") == 1
    assert value(registry, "carbon_proxy_tokens_total", **KEY, type="prompt") == 10
    assert value(registry, "carbon_proxy_tokens_total", **KEY, type="output") == 20
    assert value(registry, "carbon_proxy_request_energy_joules_total", **KEY) == 0
    assert value(registry, "carbon_proxy_time_to_first_byte_seconds_count", upstream="llama", model="m") == 1

    final = dataclasses.replace(provisional, status="final", energy_joules=30.0, co2e_grams=0.005, embodied_grams=0.0005)
    metrics.record(final, None)
    # final: the settled figure once; nothing counted twice
    assert value(registry, "carbon_proxy_requests_total", **KEY, outcome="ok") == 1
    assert value(registry, "carbon_proxy_tokens_total", **KEY, type="output") == 20
    assert value(registry, "carbon_proxy_request_energy_joules_total", **KEY) == 30.0
    assert value(registry, "carbon_proxy_request_co2e_grams_total", **KEY) == pytest.approx(0.005)
    assert value(registry, "carbon_proxy_request_embodied_co2e_grams_total", **KEY) == pytest.approx(0.0005)
    assert value(registry, "carbon_proxy_per_request_energy_joules_count", **KEY) == 1
    assert value(registry, "carbon_proxy_per_request_energy_joules_sum", **KEY) == 30.0
    assert value(registry, "carbon_proxy_per_request_energy_joules_bucket", **KEY, le="25.0") == 0
    assert value(registry, "carbon_proxy_per_request_energy_joules_bucket", **KEY, le="50.0") == 1
    assert value(registry, "carbon_proxy_per_request_co2e_grams_count", **KEY) == 1


def test_a_request_without_timing_or_tokens_still_counts(metrics: RequestMetrics, registry: CollectorRegistry) -> None:
    metrics.record(receipt(outcome="upstream_unreachable", time_to_first_byte_seconds=None, prompt_tokens=None, output_tokens=None,
                           model=None), None)  # fmt: skip
    labels = {"upstream": "llama", "model": UNKNOWN_MODEL, "tenant": "team-a"}
    assert value(registry, "carbon_proxy_requests_total", **labels, outcome="upstream_unreachable") == 1
    assert value(registry, "carbon_proxy_tokens_total", **labels, type="output") == 0
    assert value(registry, "carbon_proxy_time_to_first_byte_seconds_count", upstream="llama", model=UNKNOWN_MODEL) == 0
    assert value(registry, "carbon_proxy_request_duration_seconds_count", upstream="llama", model=UNKNOWN_MODEL) == 1


def test_a_negative_figure_never_breaks_the_counter(metrics: RequestMetrics, registry: CollectorRegistry) -> None:
    metrics.record(receipt(status="final", energy_joules=-1e-12, co2e_grams=-1e-15, embodied_grams=0.0), None)
    assert value(registry, "carbon_proxy_request_energy_joules_total", **KEY) == 0
    assert value(registry, "carbon_proxy_per_request_energy_joules_bucket", **KEY, le="1.0") == 1


def test_histogram_buckets_are_cumulative_with_le_semantics(metrics: RequestMetrics, registry: CollectorRegistry) -> None:
    for joules in (0.5, 1.0, 1.5, 60.0, 1e6):
        metrics.record(receipt(status="final", energy_joules=joules), None)
    bucket = {le: value(registry, "carbon_proxy_per_request_energy_joules_bucket", **KEY, le=le) for le in ("1.0", "2.5", "50.0", "100.0", "+Inf")}
    assert bucket == {"1.0": 2, "2.5": 3, "50.0": 3, "100.0": 4, "+Inf": 5}
    assert value(registry, "carbon_proxy_per_request_energy_joules_count", **KEY) == 5
    assert value(registry, "carbon_proxy_per_request_energy_joules_sum", **KEY) == pytest.approx(1e6 + 63.0)


def test_ten_thousand_tenants_fold_into_the_allow_list_and_other(metrics: RequestMetrics, registry: CollectorRegistry) -> None:
    for i in range(10_000):
        tenant = ("team-a", "team-b")[(i // 10) % 2] if i % 10 == 0 else f"tenant-{i}"
        metrics.record(receipt(request_id=f"r{i}", tenant=tenant), None)
        metrics.record(receipt(request_id=f"r{i}", tenant=tenant, status="final"), None)
    tenants = {s.labels["tenant"] for family in registry.collect() for s in family.samples if "tenant" in s.labels}
    assert tenants == {"team-a", "team-b", OTHER}
    assert value(registry, "carbon_proxy_requests_total", upstream="llama", model="m", tenant=OTHER, outcome="ok") == 9_000
    assert len(metrics._tallies) == 3  # the per-label tallies are bounded too


def test_models_beyond_the_cap_fold_into_other() -> None:
    labels = ModelLabels(["configured"], cap=3)
    assert [labels.label(m) for m in ("a", "b", "c", "d", "a", "configured", None)] == ["a", "b", "c", OTHER, "a", "configured", UNKNOWN_MODEL]
    assert labels.label("x" * 1000) == OTHER
    assert len(ModelLabels([]).label("y" * 1000)) == 100
    assert MODEL_CAP == 50


def test_one_tally_per_folded_label_tuple(metrics: RequestMetrics) -> None:
    first = metrics.bound("llama", "m", "tenant-1")
    assert metrics.bound("llama", "m", "tenant-2") is first  # both fold to other
    assert metrics.bound("llama", "m", "team-a") is not first
