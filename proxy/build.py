"""Build the parts named in the config: meter, intensity provider, embodied rates, receipts."""

from __future__ import annotations

import logging
from typing import Any, Callable

from proxy.carbon.intensity import IntensityProvider
from proxy.config import Config, MeterConfig
from proxy.errors import ConfigError
from proxy.meters.base import Meter, MeterError
from proxy.receipts.model import MemoryReceiptStore, ReceiptStore

log = logging.getLogger("carbon_proxy")


def _devices(config: Config) -> list[str] | None:
    named = sorted({d for u in config.upstreams for d in u.devices})
    return named or None


def build_meter(config: Config) -> Meter:
    """The configured meter (not started). `auto` is resolved by `resolve_auto_meter`."""
    meter = config.meter
    options = dict(meter.options)
    devices = _devices(config)
    if meter.kind == "nvml":
        from proxy.meters.nvml import NvmlMeter

        _only(meter, options, set())
        return NvmlMeter(devices)
    if meter.kind == "scrape":
        from proxy.meters.scrape import make_scrape_meter

        _only(meter, options, {"url", "preset", "metric", "scale", "device_label", "match_labels", "timeout_seconds"})
        if "url" not in options:
            raise ConfigError("meter.scrape.url", "missing; the exporter's /metrics URL, e.g. http://127.0.0.1:9400/metrics")
        preset = options.pop("preset", None)
        if preset is None and "metric" not in options:
            preset = "dcgm"
        return make_scrape_meter(preset, devices=devices, **options)
    if meter.kind == "rapl":
        from proxy.meters.rapl import RaplMeter

        _only(meter, options, {"root", "zones"})
        if not isinstance(options.get("root", ""), str):
            raise ConfigError("meter.rapl.root", f"expected a directory path, got {options['root']!r}")
        zones = options.get("zones", [])
        if not isinstance(zones, list) or not all(isinstance(z, str) for z in zones):
            raise ConfigError("meter.rapl.zones", f"expected a list of zone kinds such as [\"package\", \"dram\"], got {zones!r}")
        return RaplMeter(**options)
    if meter.kind == "estimate":
        return build_estimate_meter(options, devices)
    if meter.kind == "sim":
        raise ConfigError("meter.kind", "'sim' needs the simulated GPU of `carbon-proxy demo`; use 'scrape' against a sim server's /metrics")
    raise ConfigError("meter.kind", f"{meter.kind!r} must be resolved before building")


def build_estimate_meter(options: dict[str, Any], devices: list[str] | None) -> Meter:
    from proxy.meters.estimate import EstimateMeter

    try:
        return EstimateMeter(devices=devices or ["0"], **options)
    except TypeError as exc:
        raise ConfigError("meter.estimate", f"invalid option: {exc}") from None


def _only(meter: MeterConfig, options: dict[str, Any], allowed: set[str]) -> None:
    for key in options:
        if key not in allowed:
            raise ConfigError(f"meter.{meter.kind}.{key}", f"unknown key; expected one of: {', '.join(sorted(allowed)) or '(none)'}")


async def resolve_auto_meter(config: Config) -> Meter:
    """`auto`: NVML where an NVIDIA driver answers, else `estimate` with a warning, so the
    proxy always starts."""
    if config.meter.kind != "auto":
        return build_meter(config)
    from proxy.meters.nvml import NvmlMeter

    nvml = NvmlMeter(_devices(config))
    try:
        await nvml.start()
        return nvml
    except MeterError as exc:
        log.warning("no NVIDIA GPU answered (%s); using the 'estimate' meter: figures are modelled, not measured", exc)
        return build_estimate_meter(dict(config.meter.options), _devices(config))


def build_intensity(config: Config) -> IntensityProvider:
    from proxy.carbon.factory import build_intensity_provider

    carbon = {k: v for k, v in config.carbon.items() if k not in EMBODIED_KEYS}
    return build_intensity_provider(carbon)


EMBODIED_KEYS = ("embodied", "lifetime_years", "server_kg", "gpus_per_server", "device_kg")


def build_embodied_rates(config: Config) -> Callable[[str], float]:
    """device model -> embodied gCO2e per device-second (0 when [carbon].embodied = false).

    The models configured (`[carbon] device_model`, each upstream's) are checked here, so
    a typo fails at start; a model resolved later from the meter's device names is one
    the table knows (proxy.carbon.embodied.resolve_device_model)."""
    from proxy.carbon.embodied import EmbodiedModel, require_device

    carbon = config.carbon
    enabled = carbon.get("embodied", True)
    if not isinstance(enabled, bool):
        raise ConfigError("carbon.embodied", f"expected true or false, got {enabled!r}")
    options = {k: carbon[k] for k in ("lifetime_years", "server_kg", "gpus_per_server", "device_kg") if k in carbon}
    rates: dict[str, float] = {}

    def rate(device_model: str) -> float:
        if device_model not in rates:
            model = EmbodiedModel(device_model, **options)
            rates[device_model] = model.grams_per_device_second if enabled else 0.0
        return rates[device_model]

    rate("H100")  # checks the [carbon] options
    default = carbon.get("device_model")
    if default is not None:
        if not isinstance(default, str):
            raise ConfigError("carbon.device_model", f"expected a string such as 'H100', got {default!r}")
        rate(default)
    for i, upstream in enumerate(config.upstreams):
        if upstream.device_model is not None and "device_kg" not in carbon:
            require_device(upstream.device_model, f"upstreams[{i}].device_model", "carbon.device_kg")
    return rate


def build_receipts(config: Config) -> ReceiptStore:
    from proxy.receipts.sqlite import SqliteReceiptStore

    receipts = config.receipts
    if receipts.path == ":memory:":
        return MemoryReceiptStore()
    if receipts.backend == "postgres":
        from proxy.receipts.fleet import build_fleet_store

        return build_fleet_store(receipts)
    return SqliteReceiptStore(receipts.path, retention_days=receipts.retention_days, max_mb=receipts.max_mb)
