"""EstimateMeter: modelled energy, flagged as estimated."""

from __future__ import annotations

import logging

import pytest

from proxy.errors import ConfigError
from proxy.meters.base import MeterError, WorkAwareMeter
from proxy.meters.estimate import EstimateMeter, ecologits_joules_per_output_token

from .fake_pynvml import FakeClock


def test_ecologits_fit_gives_the_documented_magnitudes() -> None:
    # ~0.16 J per output token at 8 B active parameters, ~0.29 J at 70 B (per H100-class GPU, batch 64)
    assert ecologits_joules_per_output_token(8) == pytest.approx(0.1623, rel=1e-3)
    assert ecologits_joules_per_output_token(70) == pytest.approx(0.2894, rel=1e-3)
    # larger batches share the GPU better
    assert ecologits_joules_per_output_token(70, batch_size=256) < ecologits_joules_per_output_token(70)


async def test_per_token_energy_goes_to_every_device_of_the_request() -> None:
    clock = FakeClock()
    meter: WorkAwareMeter = EstimateMeter(
        ["0", "1", "2"], active_params_billions={"meta-llama/Llama-3.1-70B-Instruct": 70}, clock=clock
    )
    await meter.start()
    meter.observe_work(["0", "1"], prompt_tokens=500, output_tokens=1000, model="meta-llama/Llama-3.1-70B-Instruct")
    clock.advance(5.0)
    sample = await meter.read()
    per_gpu = 1000 * ecologits_joules_per_output_token(70)
    assert sample.joules_by_device == {"0": pytest.approx(per_gpu), "1": pytest.approx(per_gpu), "2": 0.0}
    assert sample.timestamp_seconds == clock.now_seconds
    assert meter.method == "estimated" and meter.kind == "estimate"
    await meter.close()


async def test_model_names_match_loosely_and_unknown_models_use_the_default(caplog: pytest.LogCaptureFixture) -> None:
    meter = EstimateMeter(
        ["0"], active_params_billions={"Mixtral-8x7B": 12.9}, default_active_params_billions=3.0, clock=FakeClock()
    )
    assert meter.active_params_billions("mistralai/mixtral-8x7b") == 12.9
    assert meter.active_params_billions("MIXTRAL-8X7B") == 12.9
    assert meter.active_params_billions(None) == 3.0
    await meter.start()
    with caplog.at_level(logging.WARNING, logger="carbon_proxy.meter"):
        meter.observe_work(["0"], 0, 100, "some-new-model")
        meter.observe_work(["0"], 0, 100, "some-new-model")
    assert [r.getMessage() for r in caplog.records] == [
        "estimate meter: no size configured for model 'some-new-model'; using 3 B active parameters (the params_b prior)"
    ]
    sample = await meter.read()
    assert sample.joules_by_device["0"] == pytest.approx(200 * ecologits_joules_per_output_token(3.0))


async def test_prompt_tokens_count_only_when_weighted() -> None:
    plain = EstimateMeter(["0"], clock=FakeClock())
    weighted = EstimateMeter(["0"], prompt_token_weight=0.25, clock=FakeClock())
    for meter in (plain, weighted):
        await meter.start()
        meter.observe_work(["0"], prompt_tokens=400, output_tokens=100, model=None)
    one_token = ecologits_joules_per_output_token(8.0)
    assert (await plain.read()).joules_by_device["0"] == pytest.approx(100 * one_token)
    assert (await weighted.read()).joules_by_device["0"] == pytest.approx(200 * one_token)


async def test_bad_work_reports_never_raise_on_the_request_path(caplog: pytest.LogCaptureFixture) -> None:
    meter = EstimateMeter(["0"], clock=FakeClock())
    await meter.start()
    with caplog.at_level(logging.WARNING, logger="carbon_proxy.meter"):
        meter.observe_work(["7"], 10, 10, None)  # a device this meter does not have
        meter.observe_work(["0"], -5, -5, None)
    assert "device '7' not counted" in caplog.text
    assert (await meter.read()).joules_by_device == {"0": 0.0}


async def test_constant_power_accrues_with_time_and_ignores_tokens() -> None:
    clock = FakeClock()
    meter = EstimateMeter(["0", "1"], power_watts={"0": 300, "1": 150}, clock=clock)
    assert meter.mode == "constant_power"
    await meter.start()
    clock.advance(10.0)
    meter.observe_work(["0"], 100, 100, None)
    sample = await meter.read()
    assert sample.joules_by_device == {"0": pytest.approx(3000.0), "1": pytest.approx(1500.0)}
    assert sample.power_watts_by_device == {"0": 300.0, "1": 150.0}


async def test_reading_before_start_is_an_error() -> None:
    with pytest.raises(MeterError, match="before start"):
        await EstimateMeter().read()


def test_invalid_settings_name_the_key() -> None:
    with pytest.raises(ConfigError, match="meter.estimate.power_watts: no power given for device"):
        EstimateMeter(["0", "1"], power_watts={"0": 300})
    with pytest.raises(ConfigError, match="meter.estimate.power_watts: constant power and per-token"):
        EstimateMeter(["0"], power_watts=300, active_params_billions={"x": 7})
    with pytest.raises(ConfigError, match="meter.estimate.power_watts.0"):
        EstimateMeter(["0"], power_watts=-1)
    with pytest.raises(ConfigError, match="meter.estimate.active_params_billions.x"):
        EstimateMeter(["0"], active_params_billions={"x": float("nan")})
    with pytest.raises(ConfigError, match="meter.estimate.devices"):
        EstimateMeter([])
