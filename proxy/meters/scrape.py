"""GPU energy from a Prometheus text endpoint: for Kubernetes, where the proxy has no GPU.

The exporter runs next to the GPUs (DCGM exporter, Triton, Kepler) and publishes a
cumulative energy counter per device; we fetch it, pick one metric, and key its series
by one label. Presets carry the metric, unit and label of the common exporters:

| preset | metric | unit | device label |
| --- | --- | --- | --- |
| dcgm | DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION | mJ | gpu (index; or UUID) |
| triton | nv_energy_consumption | J | gpu_uuid |
| kepler | kepler_node_gpu_joules_total | J | gpu (index; or gpu_uuid) |

Kepler's labels are from its GPU monitoring proposal (sustainable-computing-io/kepler,
docs/developer/proposal/EP-003-GPU-Power-Monitoring.md): gpu, gpu_uuid, vendor, plus the
constant node_name; a DaemonSet endpoint is per node, so match_labels rarely matters.

Freshness: an exporter's value only moves at its collection interval (dcgm-exporter's
default is 30 s: run it with `-c 1000` or less). As with NVML, a sample's timestamp is
when a device's value was last seen to change, so stale stretches never read as zero
power. Counter resets (exporter or server restart) count the new value from zero.

The parser is our own rather than prometheus_client.parser: we need one metric out of
hundreds of lines ten times a second; skipping non-matching lines by prefix is cheap, and
one malformed line elsewhere in the page must not fail the read (the library's parser
raises on the first line it dislikes and builds every family we would throw away).
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from typing import Callable, Collection, Mapping, Sequence

import aiohttp

from proxy.errors import ConfigError
from proxy.meters.base import DeviceFacts, EnergySample, MeterError
from proxy.meters.counters import EnergyCounter

MODEL_NAME_LABEL = "modelName"
"""The DCGM exporter's label for the GPU's model name ("NVIDIA H100 80GB HBM3")."""
POWER_LIMIT_METRIC = "DCGM_FI_DEV_POWER_MGMT_LIMIT"
"""The DCGM exporter's board power limit in watts, where its counters list includes it."""

# Prometheus' own fallback: plain text 0.0.4, where counter samples keep their names.
_ACCEPT = "text/plain;version=0.0.4;q=1,*/*;q=0.1"


@dataclass(frozen=True, slots=True)
class ScrapePreset:
    metric: str
    scale: float
    """Multiply a sample by this to get joules."""
    device_label: str


PRESETS: Mapping[str, ScrapePreset] = {
    "dcgm": ScrapePreset("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", 0.001, "gpu"),
    "triton": ScrapePreset("nv_energy_consumption", 1.0, "gpu_uuid"),
    "kepler": ScrapePreset("kepler_node_gpu_joules_total", 1.0, "gpu"),
}


def parse_samples(text: str, metric: str) -> list[tuple[dict[str, str], float]]:
    """The samples of one metric in Prometheus text exposition: (labels, value) pairs.

    Lines that do not parse are skipped: an exporter page is not ours to validate.
    """
    samples: list[tuple[dict[str, str], float]] = []
    for line in text.splitlines():
        if not line.startswith(metric):  # comments, blank lines, every other metric
            continue
        rest = line[len(metric) :]
        if not rest or rest[0] not in "{ \t":  # a longer name sharing our prefix
            continue
        labels: dict[str, str] = {}
        if rest[0] == "{":
            parsed = _parse_labels(rest)
            if parsed is None:
                continue
            labels, rest = parsed
        fields = rest.split()  # value, then an optional timestamp or exemplar
        if not fields:
            continue
        try:
            value = float(fields[0])  # also takes NaN, +Inf, -Inf
        except ValueError:
            continue
        samples.append((labels, value))
    return samples


def _parse_labels(text: str) -> tuple[dict[str, str], str] | None:
    """`{a="x",b="y\\"z"} rest` -> ({...}, " rest"); None when malformed."""
    labels: dict[str, str] = {}
    i, n = 1, len(text)
    while True:
        while i < n and text[i] in " \t":
            i += 1
        if i < n and text[i] == "}":
            return labels, text[i + 1 :]
        start = i
        while i < n and (text[i].isalnum() or text[i] == "_"):
            i += 1
        name = text[start:i]
        while i < n and text[i] in " \t":
            i += 1
        if not name or i + 1 >= n or text[i] != "=":
            return None
        i += 1
        while i < n and text[i] in " \t":
            i += 1
        if i >= n or text[i] != '"':
            return None
        i += 1
        chars: list[str] = []
        while i < n and text[i] != '"':
            if text[i] == "\\" and i + 1 < n:
                i += 1
                chars.append("\n" if text[i] == "n" else text[i])
            else:
                chars.append(text[i])
            i += 1
        if i >= n:
            return None
        labels[name] = "".join(chars)
        i += 1
        while i < n and text[i] in " \t":
            i += 1
        if i < n and text[i] == ",":
            i += 1
        elif not (i < n and text[i] == "}"):
            return None


class ScrapeMeter:
    """Cumulative joules per device from an exporter's energy counter."""

    kind = "scrape"
    method = "measured"

    def __init__(
        self,
        url: str,
        metric: str,
        scale: float,
        device_label: str,
        match_labels: Mapping[str, str] | None = None,
        timeout_seconds: float = 1.0,
        *,
        devices: Sequence[str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`devices`: label values to report; None means every series found at start()."""
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ConfigError("meter.scrape.url", f"must be an http:// or https:// URL, not {url!r}")
        if not metric or not isinstance(metric, str):
            raise ConfigError("meter.scrape.metric", f"must name the energy counter to read, not {metric!r}")
        if not (isinstance(scale, (int, float)) and scale > 0 and math.isfinite(scale)):
            raise ConfigError("meter.scrape.scale", f"must be a positive number (joules per unit), not {scale!r}")
        if not device_label or not isinstance(device_label, str):
            raise ConfigError("meter.scrape.device_label", f"must name the label whose value is the device id, not {device_label!r}")
        if match_labels is not None and not (isinstance(match_labels, Mapping) and all(isinstance(v, str) for v in match_labels.values())):
            raise ConfigError("meter.scrape.match_labels", f"must be a table of label = value, not {match_labels!r}")
        if not (isinstance(timeout_seconds, (int, float)) and timeout_seconds > 0 and math.isfinite(timeout_seconds)):
            raise ConfigError("meter.scrape.timeout_seconds", f"must be a positive number, not {timeout_seconds!r}")
        self.url = url
        self.metric = metric
        self.scale = float(scale)
        self.device_label = device_label
        self.match_labels = dict(match_labels or {})
        self.timeout_seconds = float(timeout_seconds)
        self._configured = None if devices is None else [str(d) for d in devices]
        self._clock = clock
        self._session: aiohttp.ClientSession | None = None
        self._counters: dict[str, EnergyCounter] = {}
        self._page_summary = ""  # what the last page held, for error messages
        self._facts: dict[str, DeviceFacts] = {}
        # Reads are serialized: two overlapping scrapes could apply an older page after a
        # newer one, which would look like a counter reset and count energy twice.
        self._lock = asyncio.Lock()

    def device_ids(self) -> Sequence[str]:
        if self._counters:
            return tuple(self._counters)
        return tuple(self._configured or ())

    def device_facts(self) -> dict[str, DeviceFacts]:
        """What the first page said of each device: the model name label and the power
        limit series, where the exporter publishes them (DCGM)."""
        return dict(self._facts)

    async def start(self) -> None:
        if self._session is not None:
            return
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout_seconds),
            headers={"Accept": _ACCEPT},
        )
        try:
            page = await self._fetch()
            series = self._series(page, self._configured)
            devices = self._configured if self._configured is not None else sorted(series, key=_natural)
            if not devices:
                raise MeterError(f"scrape meter: {self._no_series(None)}")
            self._counters = {device: EnergyCounter(self.scale) for device in devices}
            # The first page sets the origin and proves every device is there.
            self._update(series, self._clock())
            self._facts = self._read_facts(page, devices)
        except BaseException:
            await self.close()
            raise

    async def read(self) -> EnergySample:
        if self._session is None:
            raise MeterError("scrape meter: read() before start() or after close()")
        async with self._lock:
            series = self._series(await self._fetch(), self._counters)
            return self._update(series, self._clock())

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def _fetch(self) -> str:
        session = self._session
        if session is None:
            raise MeterError("scrape meter: closed")
        try:
            async with session.get(self.url) as response:
                if response.status != 200:
                    raise MeterError(f"scrape meter: {self.url} answered HTTP {response.status}")
                body = await response.read()
        except TimeoutError as err:  # asyncio's and aiohttp's timeouts both derive from it
            raise MeterError(f"scrape meter: {self.url} did not answer within {self.timeout_seconds:g} s") from err
        except aiohttp.ClientError as err:
            raise MeterError(f"scrape meter: cannot scrape {self.url}: {err}") from err
        return body.decode("utf-8", errors="replace")

    def _series(self, text: str, wanted: Collection[str] | None) -> dict[str, float]:
        """Device label value -> raw sample of the matching series; two series for one wanted
        device (None: any device) is an error, since we cannot tell which is ours."""
        found: dict[str, float] = {}
        labels_by_device: dict[str, list[dict[str, str]]] = {}
        samples = parse_samples(text, self.metric)
        label_names = sorted({name for labels, _ in samples for name in labels})
        self._page_summary = (
            f"the page has {len(samples)} series of {self.metric}, labelled {', '.join(label_names) or 'nothing'}"
            if samples
            else f"the page has no {self.metric} samples"
        )
        for labels, value in samples:
            if any(labels.get(k) != v for k, v in self.match_labels.items()):
                continue
            device = labels.get(self.device_label)
            if device is None:
                continue
            labels_by_device.setdefault(device, []).append(labels)
            found[device] = value
        for device, label_sets in labels_by_device.items():
            if len(label_sets) > 1 and (wanted is None or device in wanted):
                differing = sorted({k for s in label_sets for k in s if any(o.get(k) != s[k] for o in label_sets)})
                raise MeterError(
                    f"scrape meter: {len(label_sets)} series of {self.metric} at {self.url} have "
                    f"{self.device_label}={device!r} (they differ in {', '.join(differing)}); "
                    f"pick one with match_labels"
                )
        return found

    def _read_facts(self, page: str, devices: Sequence[str]) -> dict[str, DeviceFacts]:
        names: dict[str, str] = {}
        for labels, _ in parse_samples(page, self.metric):
            device = labels.get(self.device_label)
            if device is not None and MODEL_NAME_LABEL in labels and all(labels.get(k) == v for k, v in self.match_labels.items()):
                names.setdefault(device, labels[MODEL_NAME_LABEL])
        limits: dict[str, float] = {}
        for labels, watts in parse_samples(page, POWER_LIMIT_METRIC):
            device = labels.get(self.device_label)
            if device is not None and math.isfinite(watts) and watts > 0 and all(labels.get(k) == v for k, v in self.match_labels.items()):
                limits.setdefault(device, watts)
        return {d: DeviceFacts(names.get(d), limits.get(d)) for d in devices if d in names or d in limits}

    def _update(self, series: Mapping[str, float], now_seconds: float) -> EnergySample:
        for device in self._counters:  # check them all before moving any counter
            value = series.get(device)
            if value is None:
                raise MeterError(f"scrape meter: {self._no_series(device)}")
            if not (math.isfinite(value) and value >= 0):
                series_name = f'{self.metric}{{{self.device_label}="{device}"}}'
                raise MeterError(f"scrape meter: {series_name} is {value!r}, not a counter value")
        joules: dict[str, float] = {}
        watts: dict[str, float] = {}
        stamp_seconds = float("-inf")
        for device, counter in self._counters.items():
            joules[device] = counter.update(series[device], now_seconds)
            assert counter.changed_at_seconds is not None
            stamp_seconds = max(stamp_seconds, counter.changed_at_seconds)
            power = counter.watts()
            if power is not None:
                watts[device] = power
        return EnergySample(timestamp_seconds=stamp_seconds, joules_by_device=joules, power_watts_by_device=watts)

    def _no_series(self, device: str | None) -> str:
        wanted = {self.device_label: "..." if device is None else device, **self.match_labels}
        selector = ",".join(f'{k}="{v}"' for k, v in wanted.items())
        return f"no series {self.metric}{{{selector}}} at {self.url} ({self._page_summary})"


def make_scrape_meter(
    preset: str | None,
    *,
    url: str,
    metric: str | None = None,
    scale: float | None = None,
    device_label: str | None = None,
    match_labels: Mapping[str, str] | None = None,
    timeout_seconds: float = 1.0,
    devices: Sequence[str] | None = None,
) -> ScrapeMeter:
    """A ScrapeMeter from a preset name (dcgm, triton, kepler) with any field overridden."""
    if preset is None:
        if metric is None:
            raise ConfigError("meter.scrape.metric", f"required without a preset (presets: {', '.join(PRESETS)})")
        base = ScrapePreset(metric, 1.0 if scale is None else scale, device_label or "gpu")
    elif isinstance(preset, str) and preset in PRESETS:
        base = PRESETS[preset]
    else:
        raise ConfigError("meter.scrape.preset", f"unknown preset {preset!r}; expected one of: {', '.join(PRESETS)}")
    return ScrapeMeter(
        url=url,
        metric=metric or base.metric,
        scale=base.scale if scale is None else scale,
        device_label=device_label or base.device_label,
        match_labels=match_labels,
        timeout_seconds=timeout_seconds,
        devices=devices,
    )


def _natural(device: str) -> tuple[int, int | str]:
    """Order "2" before "10"; names after numbers."""
    return (0, int(device)) if device.isdigit() else (1, device)
