"""[carbon] config and --intensity: the right provider, or a ConfigError naming the key."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import pytest

from proxy.build import build_embodied_rates
from proxy.carbon.embodied import EmbodiedModel, resolve_device_model
from proxy.carbon.factory import build_intensity_provider, parse_intensity_flag
from proxy.carbon.intensity import ConstantIntensity
from proxy.carbon.providers import CarbonAwareSdkProvider, ElectricityMapsProvider, UkGridProvider, WattTimeProvider
from proxy.carbon.table import TableIntensity
from proxy.config import config_from_dict
from proxy.errors import ConfigError

ENV = {"ELECTRICITYMAPS_TOKEN": "tok", "WATTTIME_USER": "u", "WATTTIME_PASSWORD": "p", "MY_TOKEN": "t"}


def build(carbon: dict[str, Any] | None) -> Any:
    return build_intensity_provider(carbon, environ=ENV)


def test_nothing_configured_is_the_world_average() -> None:
    provider = build(None)
    assert isinstance(provider, TableIntensity) and provider.current().source == "table:WORLD"


def test_constant_and_zone_forms() -> None:
    assert isinstance(build({"intensity": 450}), ConstantIntensity)
    assert build({"intensity": 450}).current().g_per_kwh == 450
    assert build({"intensity": "DE"}).current().source == "table:DEU"
    assert build({"provider": "table", "zone": "aws:us-east-1"}).current().source == "table:aws:us-east-1"
    assert build({"zone": "FRA"}).current().source == "table:FRA"


def test_live_providers_and_their_fallbacks() -> None:
    em = build({"provider": "electricitymaps", "zone": "US-CAL-CISO", "forecast": True, "poll_seconds": 600})
    assert isinstance(em, ElectricityMapsProvider) and em.fallback.current().source == "table:USA"
    assert em.poll_seconds == 600 and em.fetch_forecast
    wt = build({"provider": "watttime", "zone": "CAISO_NORTH", "fallback_zone": "USA"})
    assert isinstance(wt, WattTimeProvider) and wt.fallback.current().source == "table:USA"
    uk = build({"provider": "ukgrid", "postcode": "SW1A 1AA"})
    assert isinstance(uk, UkGridProvider) and uk.source == "ukgrid:postcode-SW1A"
    assert uk.fallback.current().source == "table:GBR"
    ca = build({"provider": "carbonaware", "location": "westeurope", "url": "http://127.0.0.1:1", "token_env": "MY_TOKEN"})
    assert isinstance(ca, CarbonAwareSdkProvider) and ca.fallback.current().source == "table:azure:westeurope"


def test_unknown_fallback_warns_and_uses_world(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        wt = build({"provider": "watttime", "zone": "CAISO_NORTH"})
    assert wt.fallback.current().source == "table:WORLD" and "carbon.fallback_zone" in caplog.text


def test_token_file(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("from-file\n")
    em = build_intensity_provider({"provider": "electricitymaps", "zone": "DE", "token_file": str(path)}, environ={})
    assert em.secret_values() == ("from-file",)


@pytest.mark.parametrize(
    ("carbon", "key", "words"),
    [
        ({"provider": "electricitymap"}, "carbon.provider", "unknown provider"),
        ({"intensity": -1}, "carbon.intensity", "outside"),
        ({"intensity": True}, "carbon.intensity", "number"),
        ({"intensity": "XX"}, "carbon.intensity", "unknown zone 'XX'"),
        ({"zone": "XX"}, "carbon.zone", "unknown zone 'XX'; use an ISO 3166 alpha-3 code or a cloud region like gcp:europe-west4"),
        ({"intensity": 450, "provider": "electricitymaps", "zone": "DE"}, "carbon.intensity", "exclude each other"),
        ({"provider": "constant"}, "carbon.intensity", "needs intensity"),
        ({"provider": "electricitymaps"}, "carbon.zone", "needs zone"),
        ({"provider": "electricitymaps", "zone": "DE", "token_env": "NOPE"}, "carbon.token_env", "NOPE is not set"),
        ({"provider": "electricitymaps", "zone": "DE", "token_file": "/nonexistent/x"}, "carbon.token_file", "cannot read"),
        ({"provider": "electricitymaps", "zone": "DE", "poll_seconds": 0}, "carbon.poll_seconds", "> 0"),
        ({"provider": "electricitymaps", "zone": "DE", "forecast": "yes"}, "carbon.forecast", "true or false"),
        ({"provider": "electricitymaps", "zone": "DE", "fallback_zone": "XX"}, "carbon.fallback_zone", "unknown zone"),
        ({"provider": "watttime", "zone": "CAISO_NORTH", "password_env": "NOPE"}, "carbon.password_env", "NOPE is not set"),
        ({"provider": "ukgrid", "region_id": 18}, "carbon.region_id", "1..17"),
        ({"provider": "ukgrid", "region_id": 13.0}, "carbon.region_id", "1..17"),
        ({"provider": "ukgrid", "postcode": "12345"}, "carbon.postcode", "not a UK postcode"),
        ({"provider": "ukgrid", "postcode": "RG10", "region_id": 3}, "carbon.postcode", "not both"),
        ({"provider": "carbonaware", "location": "eastus"}, "carbon.url", "self-hosted"),
        ({"intensty": 450}, "carbon.intensty", "unknown key"),
    ],
)
def test_invalid_config_names_the_key(carbon: dict[str, Any], key: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        build(carbon)
    assert info.value.key == key
    assert words in info.value.reason


def test_secret_values_are_not_in_config_errors() -> None:
    with pytest.raises(ConfigError) as info:
        build_intensity_provider({"provider": "watttime", "zone": "X"}, environ={"WATTTIME_USER": "sekrit-user"})
    assert "sekrit-user" not in str(info.value)


def test_intensity_flag() -> None:
    assert parse_intensity_flag("450").current().source == "constant"
    assert parse_intensity_flag("0").current().g_per_kwh == 0
    assert parse_intensity_flag("gcp:europe-west4").current().g_per_kwh == 236
    for bad in ("-3", "nan", "inf", "XX"):
        with pytest.raises(ConfigError) as info:
            parse_intensity_flag(bad)
        assert info.value.key == "--intensity"


def _rates(carbon: dict[str, Any], **upstream: Any) -> Callable[[str], float]:
    config = config_from_dict({"upstreams": [{"name": "u", "url": "http://127.0.0.1:1", **upstream}], "carbon": {"intensity": 400, **carbon}})
    return build_embodied_rates(config)


def test_embodied_rates_from_config() -> None:
    per_second = EmbodiedModel("H100").grams_per_device_second
    assert _rates({})("H100") == per_second > 0
    assert _rates({"embodied": False})("H100") == 0.0
    assert _rates({})("A100") == EmbodiedModel("A100").grams_per_device_second != per_second
    custom = _rates({"device_model": "MI300X", "device_kg": 200, "lifetime_years": 5})
    assert custom("MI300X") == EmbodiedModel("MI300X", device_kg=200, lifetime_years=5).grams_per_device_second
    for carbon, upstream, key in [
        ({"device_model": "MI300X"}, {}, "carbon.device_model"),
        ({}, {"device_model": "MI300X"}, "upstreams[0].device_model"),
        ({"lifetime_years": 0}, {}, "carbon.lifetime_years"),
        ({"gpus_per_server": 0}, {}, "carbon.gpus_per_server"),
        ({"server_kg": -1}, {}, "carbon.server_kg"),
        ({"embodied": "on"}, {}, "carbon.embodied"),
    ]:
        with pytest.raises(ConfigError) as info:
            _rates(carbon, **upstream)
        assert info.value.key == key


def test_device_model_precedence() -> None:
    # The upstream's own model, then [carbon]'s, then what the meter names, then H100.
    assert resolve_device_model("A100", "L4", ["NVIDIA H100 80GB HBM3"]) == "A100"
    assert resolve_device_model(None, "L4", ["NVIDIA H100 80GB HBM3"]) == "L4"
    assert resolve_device_model(None, None, ["NVIDIA L40S", "NVIDIA L40S"]) == "L40S"
    assert resolve_device_model(None, None, ["NVIDIA L40S", "NVIDIA A100-SXM4-80GB"]) == "H100"  # mixed: no one name
    assert resolve_device_model(None, None, ["NVIDIA GeForce RTX 4090"]) == "H100"  # not in the table
    assert resolve_device_model(None, None, [None]) == "H100"
