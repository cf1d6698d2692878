"""Fuzzing the config loader with TOML-shaped data: every key of the contract (and some
unknown ones) with values of every TOML type, plausible or not (inf, nan, dates, ports out
of range, URLs that do not parse). Invariant: `config_from_dict` / `load_config` return a
Config or raise ConfigError with a non-empty key and reason, never another exception;
and a Config they return holds what it promises: finite numbers, listen ports 0-65535,
upstream URLs whose port parses, a boolean trust_forwarded. `check-config` builds the
rest (tenants, embodied rates, intensity provider, meter) under the same rule.
"""

from __future__ import annotations

import datetime as dt
import math
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from hypothesis import event, example, given
from hypothesis import strategies as st

from proxy.build import build_embodied_rates, build_intensity, build_meter
from proxy.config import DIALECTS, Config, config_from_dict, load_config
from proxy.errors import ConfigError
from proxy.tenants import Tenancy

from . import fuzz

FUZZ = fuzz(300)

SCALARS = st.one_of(
    st.text(max_size=10),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(),  # nan and inf included: TOML has both
    st.booleans(),
    st.datetimes(timezones=st.none() | st.just(dt.timezone.utc)),
    st.dates(),
    st.times(),
)
ANY = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)
EDGES = st.sampled_from([math.inf, -math.inf, math.nan, 0, -1, 0.0, 1e308, 2**63 - 1, "", "x", "auto", "false", True, [], {}])

# -- a valid config: every key of the contract, each with values the docs allow -----------

POSITIVE = st.one_of(st.integers(1, 10**6), st.floats(0.01, 1e6))
SECONDS = st.floats(0.01, 600)
GOOD_UPSTREAM = st.fixed_dictionaries(
    {"url": st.sampled_from(["http://127.0.0.1:8000", "https://model.internal/v1/", "http://[::1]:8000", "http://sim:8000"])},
    optional={
        "dialect": st.sampled_from(DIALECTS),
        "routes": st.lists(st.sampled_from(["/v1/", "/", "/api/", "/generate"]), max_size=2),
        "models": st.lists(st.sampled_from(["llama", "m"]), max_size=2),
        "devices": st.just(["0"]),
        "pue": st.floats(1.0, 3.0),
        "device_model": st.sampled_from(["H100", "A100"]),
        "timeouts": st.fixed_dictionaries({}, optional={"connect_seconds": SECONDS, "first_byte_seconds": SECONDS, "idle_seconds": SECONDS}),
    },
)
GOOD = st.fixed_dictionaries(
    {"upstreams": st.lists(GOOD_UPSTREAM, min_size=1, max_size=3).map(lambda ups: [{**u, "name": f"u{i}"} for i, u in enumerate(ups)])},
    optional={
        "server": st.fixed_dictionaries(
            {},
            optional={
                "listen": st.sampled_from(["127.0.0.1:0", "0.0.0.0:8080", "[::1]:8081"]),
                "admin_listen": st.sampled_from(["127.0.0.1:9464", "127.0.0.1:0"]),
                "max_body_bytes": st.integers(1, 2**40), "max_buffer_bytes": st.integers(1, 2**34),
                "drain_seconds": st.floats(0, 600), "trust_forwarded": st.booleans(),
                "timeouts": st.fixed_dictionaries({}, optional={"connect_seconds": SECONDS, "idle_seconds": SECONDS}),
            },
        ),
        "meter": st.one_of(
            st.fixed_dictionaries({"kind": st.sampled_from(["auto", "nvml"])}, optional={"interval_ms": st.integers(10, 5000)}),
            st.fixed_dictionaries({"kind": st.just("estimate"), "estimate": st.fixed_dictionaries({}, optional={"power_watts": POSITIVE})}),
            st.fixed_dictionaries({"kind": st.just("scrape"), "scrape": st.fixed_dictionaries({"url": st.just("http://127.0.0.1:9400/metrics")}, optional={"preset": st.sampled_from(["dcgm", "triton", "kepler"]), "timeout_seconds": SECONDS})}),
            st.fixed_dictionaries({"kind": st.just("rapl"), "rapl": st.fixed_dictionaries({}, optional={"root": st.just("/nonexistent")})}),
        ),
        "carbon": st.one_of(
            st.fixed_dictionaries({"intensity": st.one_of(POSITIVE, st.sampled_from(["DEU", "FRA", "gcp:europe-west4"]))}, optional={"pue": st.one_of(st.floats(1.0, 3.0), st.sampled_from(["aws", "gcp", "azure"])), "embodied": st.booleans()}),
            st.fixed_dictionaries({"provider": st.just("table"), "zone": st.sampled_from(["DEU", "aws:us-east-1", "WORLD"])}),
            st.fixed_dictionaries({"provider": st.just("ukgrid")}, optional={"region_id": st.integers(1, 17), "poll_seconds": SECONDS}),
        ),
        "attribution": st.fixed_dictionaries({}, optional={"prefill_weight": st.one_of(st.just("auto"), st.floats(0, 10)), "idle_power_watts": st.one_of(st.just("auto"), st.floats(0, 1000), st.just({"0": 60}))}),
        "receipts": st.fixed_dictionaries({}, optional={"path": st.sampled_from([":memory:", "r.db"]), "retention_days": st.integers(1, 3650), "max_mb": st.one_of(st.just(0), st.floats(1, 1e6)), "commit_wait_ms": st.floats(0, 1000)}),
        "tenants": st.fixed_dictionaries({}, optional={"header": st.just("X-Tenant"), "allow": st.lists(st.sampled_from(["a", "b"]), max_size=2)}),
    },
)


def leaves(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a config a value sits: tables' keys and arrays' items, nested."""
    found = [path] if path else []
    if isinstance(value, dict):
        for key, item in value.items():
            found += leaves(item, (*path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found += leaves(item, (*path, i))
    return found


def replaced(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        return {**value, head: replaced(value[head], rest, new)}
    return [replaced(item, rest, new) if i == head else item for i, item in enumerate(value)]


def check_promises(config: Config) -> None:
    server = config.server
    for number in (server.max_body_bytes, server.max_buffer_bytes, server.drain_seconds, config.pue, config.meter.interval_ms,
                   config.receipts.retention_days, config.receipts.commit_wait_ms):
        assert math.isfinite(number), config
    assert isinstance(server.trust_forwarded, bool)
    for listen in (server.listen, server.admin_listen):
        assert 0 <= listen.port <= 65535
    for upstream in config.upstreams:
        urlsplit(upstream.url).port  # serve's readiness probe reads it: must not raise
        timeouts = upstream.timeouts
        assert all(math.isfinite(t) and t > 0 for t in (timeouts.connect_seconds, timeouts.first_byte_seconds, timeouts.idle_seconds))
        assert upstream.pue is None or math.isfinite(upstream.pue)


def loads_or_names_the_key(load: Any) -> Config | None:
    try:
        config = load()
    except ConfigError as exc:
        assert exc.key and exc.reason, exc
        event(f"ConfigError {exc.key.split('.')[0].split('[')[0]}")
        return None
    check_promises(config)
    event("ok")
    return config


def check_config(config: Config) -> Config:
    """What `carbon-proxy check-config` goes on to build from a loaded config."""
    Tenancy(config.tenants)
    build_embodied_rates(config)
    build_intensity(config)
    if config.meter.kind not in ("auto", "sim"):
        build_meter(config)
    return config


@FUZZ
@given(data=st.data())
@example(data=None)
def test_a_valid_config_with_one_value_changed_loads_or_names_the_key(data: st.DataObject | None) -> None:
    if data is None:  # the valid configs themselves must load
        return
    good = data.draw(GOOD, "valid config")
    config = loads_or_names_the_key(lambda: config_from_dict(good))
    assert config is not None, "a config the docs allow was refused"
    places = leaves(good)
    path = data.draw(st.sampled_from(places), "changed key") if places else ()
    bad = replaced(good, path, data.draw(st.one_of(EDGES, ANY), "to"))
    config = loads_or_names_the_key(lambda: config_from_dict(bad))
    if config is not None:
        loads_or_names_the_key(lambda: check_config(config))


@fuzz(150)
@given(data=st.dictionaries(st.sampled_from(["server", "upstreams", "meter", "carbon", "attribution", "receipts", "tenants", "x"]), ANY, max_size=4))
@example(data={"upstreams": [{"url": "http://x"}], "server": {"max_body_bytes": math.inf}})
@example(data={"upstreams": [{"url": "http://x"}], "server": {"drain_seconds": math.nan}})
@example(data={"upstreams": [{"url": "http://x"}], "carbon": {"zone": 5}})
@example(data={"upstreams": [{"url": "http://[::1"}]})
@example(data={"upstreams": [{"url": "http://a:99999"}]})
@example(data={"upstreams": [{"url": "http://x"}], "server": {"trust_forwarded": "false"}})
def test_any_shape_loads_or_names_the_key(data: dict[str, Any]) -> None:
    config = loads_or_names_the_key(lambda: config_from_dict(data))
    assert config is None or config.upstreams  # a Config always has somewhere to send requests


TOML_LINES = st.one_of(
    st.sampled_from(["[server]", "[[upstreams]]", "[meter]", "[carbon]", "[receipts]", "[attribution]", "[meter.estimate]", "[tenants]"]),
    st.builds(
        lambda k, v: f"{k} = {v}",
        st.sampled_from(["listen", "url", "dialect", "routes", "drain_seconds", "kind", "intensity", "pue", "path", "name", "x"]),
        st.sampled_from(['"http://127.0.0.1:8000"', '"127.0.0.1:0"', "inf", "nan", "-inf", "1979-05-27", "[1, 2]", '["/v1/"]', "{a = 1}", "true", '"openai"', "0x10", "1e400", '"\\u00e9"']),
    ),
    st.text(max_size=20),
)


@fuzz(200)
@given(text=st.lists(TOML_LINES, max_size=12).map("\n".join), raw=st.one_of(st.none(), st.binary(max_size=40)))
@example(text="", raw=b'[[upstreams]]\nurl = "http://x"\nname = "\xff"\n')  # not UTF-8
def test_load_config_gives_a_config_or_names_the_key(text: str, raw: bytes | None) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "carbon-proxy.toml"
        path.write_bytes(raw if raw is not None else text.encode())
        config = loads_or_names_the_key(lambda: load_config(path))
        assert config is None or config.upstreams
