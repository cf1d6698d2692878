"""The device prior (prior.py): before a group has learned anything, what its meter says
of its devices (NVML's name and enforced power limit, a DCGM page's modelName label and
power limit) or else the configured device model sets idle power and the board limit."""

from __future__ import annotations

from proxy.attribution import AttributionEngine
from proxy.attribution.prior import prior_from_devices
from proxy.meters.base import DeviceFacts


def test_the_meters_device_name_wins_over_the_configured_default() -> None:
    a100 = DeviceFacts("NVIDIA A100-SXM4-40GB", 300.0)
    prior = prior_from_devices("H100", [a100, a100])  # H100: the config's default
    assert prior is not None
    assert prior.idle_watts == 2 * 55.0  # the A100's idle from the table, not the H100's
    assert prior.board_watts == 2 * 300.0  # the limit in force, not the datasheet's 400 W
    assert prior.source == "nvml"


def test_a_limit_missing_for_one_device_falls_back_to_the_table() -> None:
    prior = prior_from_devices("H100", [DeviceFacts("NVIDIA L40S", 300.0), DeviceFacts("NVIDIA L40S", None)], meter="scrape")
    assert prior is not None and prior.idle_watts == 2 * 35.0 and prior.board_watts == 2 * 350.0
    assert prior.source == "table:NVIDIA L40S"


def test_unknown_or_mixed_names_keep_the_configured_model() -> None:
    unknown = prior_from_devices("A100", [DeviceFacts("Gaudi 3", None)])
    assert unknown is not None and unknown.idle_watts == 55.0 and unknown.board_watts == 400.0
    mixed = prior_from_devices("L4", [DeviceFacts("NVIDIA H100 80GB HBM3", None), DeviceFacts("NVIDIA L4", None)])
    assert mixed is not None and mixed.idle_watts == 2 * 16.0
    nothing = prior_from_devices("H100", [None, None])  # a meter that says nothing (rapl, estimate)
    assert nothing is not None and nothing.board_watts == 2 * 700.0


def test_the_engine_starts_from_the_prior() -> None:
    prior = prior_from_devices("H100", [DeviceFacts("NVIDIA A100-SXM4-40GB", 300.0)])
    engine = AttributionEngine({"g": ["0"]}, prior={"g": prior} if prior else None)
    assert engine.idle_power_watts("g") == 55.0  # before any idle time was seen
    assert engine._groups["g"].model.peak_watts == 300.0 - 55.0  # the saturation grid's unit
