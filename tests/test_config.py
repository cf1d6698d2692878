"""Config: the DESIGN.md example loads; each mistake names its key and reason."""

from __future__ import annotations

import pytest

from proxy.cli import build_parser, config_from_args
from proxy.config import config_from_dict, load_config
from proxy.errors import ConfigError

EXAMPLE = """
[server]
listen = "0.0.0.0:8080"
admin_listen = "127.0.0.1:9464"

[[upstreams]]
name = "llama"
url = "http://127.0.0.1:8000"
dialect = "openai"
routes = ["/v1/"]
devices = ["0"]
pue = 1.2

[meter]
kind = "scrape"
interval_ms = 100

[meter.scrape]
url = "http://127.0.0.1:9400/metrics"
metric = "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"
scale = 0.001
device_label = "gpu"

[carbon]
intensity = 450
embodied = true

[attribution]
prefill_weight = "auto"
idle_power_watts = "auto"

[receipts]
path = "carbon-proxy.db"
retention_days = 90
"""


def test_design_example_loads(tmp_path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(EXAMPLE)
    config = load_config(path)
    assert str(config.server.listen) == "0.0.0.0:8080"
    assert config.upstreams[0].devices == ("0",) and config.upstreams[0].pue == 1.2
    assert config.meter.kind == "scrape" and config.meter.options["scale"] == 0.001
    assert config.attribution.prefill_weight is None and config.attribution.idle_power_watts is None
    assert config.attribution.settle_ms == 0.0  # the end-of-response figure is never held by default


@pytest.mark.parametrize(
    ("data", "key", "reason"),
    [
        ({"upstreams": []}, "upstreams", "at least one"),
        ({"upstreams": [{"name": "a"}]}, "upstreams[0].url", "missing"),
        ({"upstreams": [{"url": "ftp://x"}]}, "upstreams[0].url", "http://"),
        ({"upstreams": [{"url": "http://x", "routes": ["v1"]}]}, "upstreams[0].routes", "starting with '/'"),
        ({"upstreams": [{"url": "http://x", "pue": 0.9}]}, "upstreams[0].pue", "must be >= 1"),
        ({"upstreams": [{"url": "http://x", "colour": 1}]}, "upstreams[0].colour", "unknown key"),
        ({"upstreams": [{"url": "http://x"}], "server": {"listen": "nope"}}, "server.listen", "HOST:PORT"),
        ({"upstreams": [{"url": "http://x"}], "meter": {"kind": "geiger"}}, "meter.kind", "unknown meter"),
        ({"upstreams": [{"url": "http://x"}], "attribution": {"prefill_weight": "lots"}}, "attribution.prefill_weight", "number"),
        ({"upstreams": [{"url": "http://x"}], "attribution": {"settle_ms": -5}}, "attribution.settle_ms", "at least 0"),
        ({"upstreams": [{"url": "http://x"}], "attribution": {"settle_ms": 60_000}}, "attribution.settle_ms", "at most 10000"),
        (
            {"upstreams": [{"name": "a", "url": "http://x", "devices": ["0", "1"]}, {"name": "b", "url": "http://y", "devices": ["1"]}]},
            "upstreams[1].devices",
            "overlap",
        ),
        ({"upstreams": [{"name": "a", "url": "http://x"}, {"name": "a", "url": "http://y"}]}, "upstreams[1].name", "duplicate"),
    ],
)
def test_errors_name_the_key(data, key, reason) -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_dict(data)
    assert caught.value.key == key
    assert reason in caught.value.reason


def test_flags_override_the_file_and_keep_meter_tables(tmp_path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(EXAMPLE.replace('kind = "scrape"', 'kind = "nvml"'))
    args = build_parser().parse_args(
        ["serve", "--config", str(path), "--meter", "scrape", "--listen", "127.0.0.1:9000", "--intensity", "DEU", "--pue", "1.4"]
    )
    config = config_from_args(args)
    assert config.meter.kind == "scrape" and config.meter.options["url"].endswith("/metrics")
    assert config.server.listen.port == 9000
    assert config.carbon["provider"] == "table" and config.carbon["zone"] == "DEU"
    assert config.pue == 1.4


def test_admin_listener_must_differ_from_public() -> None:
    args = build_parser().parse_args(["serve", "--upstream", "http://x:1", "--listen", "127.0.0.1:9000", "--admin-listen", "127.0.0.1:9000"])
    with pytest.raises(ConfigError) as caught:
        config_from_args(args)
    assert caught.value.key == "server.admin_listen"
