"""ScrapeMeter against a real local HTTP exporter serving DCGM, Triton and Kepler pages."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web

from proxy.errors import ConfigError
from proxy.meters.base import DeviceFacts, MeterError, device_facts
from proxy.meters.scrape import PRESETS, ScrapeMeter, make_scrape_meter, parse_samples

from .fake_pynvml import FakeClock

UUID_0 = "GPU-3877938d-024c-c46b-5268-cd86ad37f0d7"
UUID_1 = "GPU-8a1f6c42-1e5b-4c1d-9a3e-2b7c9d0e4f51"


def dcgm_page(
    millijoules: dict[str, int], hostname: str = "node-a", model: str = "NVIDIA H100 80GB HBM3", limits_watts: dict[str, float] | None = None
) -> str:
    lines = [
        "# HELP DCGM_FI_DEV_POWER_USAGE Power draw (in W).",
        "# TYPE DCGM_FI_DEV_POWER_USAGE gauge",
    ]
    for gpu in millijoules:
        lines.append(f'DCGM_FI_DEV_POWER_USAGE{{gpu="{gpu}",UUID="GPU-{gpu}",Hostname="{hostname}"}} 312.5')
    lines += [
        "# HELP DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION Total energy consumption since boot (in mJ).",
        "# TYPE DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION counter",
    ]
    for gpu, value in millijoules.items():
        lines.append(
            f'DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{{gpu="{gpu}",UUID="{[UUID_0, UUID_1][int(gpu) % 2]}",'
            f'device="nvidia{gpu}",modelName="{model}",Hostname="{hostname}",'
            f'DCGM_FI_DRIVER_VERSION="550.54.15"}} {value}'
        )
    if limits_watts:
        lines += ["# HELP DCGM_FI_DEV_POWER_MGMT_LIMIT Power management limit (in W).", "# TYPE DCGM_FI_DEV_POWER_MGMT_LIMIT gauge"]
        for gpu, watts in limits_watts.items():
            lines.append(f'DCGM_FI_DEV_POWER_MGMT_LIMIT{{gpu="{gpu}",UUID="{[UUID_0, UUID_1][int(gpu) % 2]}",modelName="{model}",Hostname="{hostname}"}} {watts}')
    return "\n".join(lines) + "\n"


def triton_page(joules: float) -> str:
    return (
        "# HELP nv_energy_consumption GPU energy consumption in joules since the Triton Server started\n"
        "# TYPE nv_energy_consumption counter\n"
        f'nv_energy_consumption{{gpu_uuid="{UUID_0}"}} {joules}\n'
        "# HELP nv_gpu_power_usage GPU power usage in watts\n"
        "# TYPE nv_gpu_power_usage gauge\n"
        f'nv_gpu_power_usage{{gpu_uuid="{UUID_0}"}} 280.1\n'
    )


def kepler_page(joules: float) -> str:
    return (
        "# HELP kepler_node_gpu_joules_total Total energy consumption of GPU at node level in joules\n"
        "# TYPE kepler_node_gpu_joules_total counter\n"
        f'kepler_node_gpu_joules_total{{gpu="0",gpu_uuid="{UUID_0}",node_name="worker-1",vendor="nvidia"}} {joules}\n'
        "# TYPE kepler_node_gpu_watts gauge\n"
        f'kepler_node_gpu_watts{{gpu="0",gpu_uuid="{UUID_0}",node_name="worker-1",vendor="nvidia"}} 250\n'
    )


class Exporter:
    """A /metrics endpoint whose page, status and delay the test sets."""

    def __init__(self) -> None:
        self.page = ""
        self.status = 200
        self.delay_seconds = 0.0
        self.url = ""
        self.handler: Callable[[web.Request], Awaitable[web.Response]] = self.serve_page

    async def dispatch(self, request: web.Request) -> web.Response:
        return await self.handler(request)

    async def serve_page(self, request: web.Request) -> web.Response:
        if self.delay_seconds:
            await asyncio.sleep(self.delay_seconds)
        return web.Response(text=self.page, status=self.status, content_type="text/plain")


@pytest.fixture
async def exporter() -> AsyncIterator[Exporter]:
    state = Exporter()
    app = web.Application()
    app.router.add_get("/metrics", state.dispatch)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    state.url = f"http://{host}:{port}/metrics"
    yield state
    await runner.cleanup()


async def test_dcgm_preset_reads_millijoules_as_joules_per_gpu_index(exporter: Exporter) -> None:
    exporter.page = dcgm_page({"0": 1_000_000, "1": 5_000_000, "10": 7_000})
    meter = make_scrape_meter("dcgm", url=exporter.url)
    await meter.start()
    assert meter.device_ids() == ("0", "1", "10"), "every series found, in natural order"
    exporter.page = dcgm_page({"0": 1_300_000, "1": 5_050_000, "10": 7_000})
    sample = await meter.read()
    assert sample.joules_by_device == {"0": pytest.approx(300.0), "1": pytest.approx(50.0), "10": 0.0}
    assert meter.kind == "scrape" and meter.method == "measured"
    await meter.close()


async def test_dcgm_page_names_each_gpu_and_its_power_limit_where_published(exporter: Exporter) -> None:
    exporter.page = dcgm_page({"0": 1_000, "1": 2_000}, model="NVIDIA A100-SXM4-80GB", limits_watts={"0": 350.0})
    meter = make_scrape_meter("dcgm", url=exporter.url)
    await meter.start()
    assert device_facts(meter) == {
        "0": DeviceFacts("NVIDIA A100-SXM4-80GB", 350.0),
        "1": DeviceFacts("NVIDIA A100-SXM4-80GB", None),  # its limit is not on the page
    }
    await meter.close()
    exporter.page = triton_page(10.0)  # no model label, no limit: nothing to tell
    meter = make_scrape_meter("triton", url=exporter.url)
    await meter.start()
    assert device_facts(meter) == {}
    await meter.close()


async def test_dcgm_can_key_devices_by_uuid(exporter: Exporter) -> None:
    exporter.page = dcgm_page({"0": 1_000, "1": 2_000})
    meter = make_scrape_meter("dcgm", url=exporter.url, device_label="UUID", devices=[UUID_1])
    await meter.start()
    exporter.page = dcgm_page({"0": 1_000, "1": 12_000})
    assert (await meter.read()).joules_by_device == {UUID_1: pytest.approx(10.0)}
    await meter.close()


async def test_triton_preset_reads_joules_by_gpu_uuid(exporter: Exporter) -> None:
    exporter.page = triton_page(1234.5)
    meter = make_scrape_meter("triton", url=exporter.url)
    await meter.start()
    exporter.page = triton_page(1334.5)
    assert (await meter.read()).joules_by_device == {UUID_0: pytest.approx(100.0)}
    await meter.close()


async def test_kepler_preset_reads_joules_by_gpu_index(exporter: Exporter) -> None:
    exporter.page = kepler_page(5000.25)
    meter = make_scrape_meter("kepler", url=exporter.url, match_labels={"node_name": "worker-1"})
    await meter.start()
    exporter.page = kepler_page(5100.25)
    assert (await meter.read()).joules_by_device == {"0": pytest.approx(100.0)}
    await meter.close()


async def test_counter_reset_counts_on_from_zero_and_never_decreases(exporter: Exporter) -> None:
    exporter.page = triton_page(5000)
    meter = make_scrape_meter("triton", url=exporter.url)
    await meter.start()
    seen = []
    for value in (5100, 30, 80):  # Triton restarted between 5100 and 30
        exporter.page = triton_page(value)
        seen.append((await meter.read()).joules_by_device[UUID_0])
    assert seen == [pytest.approx(100), pytest.approx(130), pytest.approx(180)]
    await meter.close()


async def test_unchanged_value_keeps_the_timestamp_of_its_last_change(exporter: Exporter) -> None:
    clock = FakeClock()
    exporter.page = triton_page(100)
    meter = ScrapeMeter(exporter.url, "nv_energy_consumption", 1.0, "gpu_uuid", clock=clock)
    await meter.start()
    clock.advance(1.0)
    exporter.page = triton_page(400)
    changed = await meter.read()
    clock.advance(1.0)  # the exporter has not collected again
    stale = await meter.read()
    assert changed.timestamp_seconds == stale.timestamp_seconds == clock.now_seconds - 1.0
    assert stale.joules_by_device == changed.joules_by_device
    assert changed.power_watts_by_device == {UUID_0: pytest.approx(300.0)}
    await meter.close()


async def test_missing_series_for_a_configured_device_names_it(exporter: Exporter) -> None:
    exporter.page = dcgm_page({"0": 1_000, "1": 2_000})
    with pytest.raises(MeterError, match=r'gpu="2"'):
        await make_scrape_meter("dcgm", url=exporter.url, devices=["0", "2"]).start()

    meter = make_scrape_meter("dcgm", url=exporter.url, devices=["0", "1"])
    await meter.start()
    exporter.page = dcgm_page({"0": 3_000})  # GPU 1 dropped out of the page
    with pytest.raises(MeterError, match=r'no series DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION\{gpu="1"\}'):
        await meter.read()
    exporter.page = dcgm_page({"0": 4_000, "1": 6_000})  # and came back
    assert (await meter.read()).joules_by_device == {"0": pytest.approx(3.0), "1": pytest.approx(4.0)}
    await meter.close()


async def test_endpoint_down_is_a_meter_error(exporter: Exporter) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    meter = make_scrape_meter("dcgm", url=f"http://127.0.0.1:{port}/metrics")
    with pytest.raises(MeterError, match="cannot scrape"):
        await meter.start()


async def test_slow_endpoint_times_out_quickly(exporter: Exporter) -> None:
    exporter.page = triton_page(1)
    meter = make_scrape_meter("triton", url=exporter.url, timeout_seconds=0.2)
    await meter.start()
    exporter.delay_seconds = 5.0
    began = time.monotonic()
    with pytest.raises(MeterError, match="did not answer within 0.2 s"):
        await meter.read()
    assert time.monotonic() - began < 1.0
    await meter.close()


async def test_garbage_page_says_the_metric_is_absent(exporter: Exporter) -> None:
    exporter.page = "<html><body>502 Bad Gateway</body></html>\n\x00\xff{{{\n"
    with pytest.raises(MeterError, match="page has no DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION samples"):
        await make_scrape_meter("dcgm", url=exporter.url).start()


async def test_wrong_device_label_lists_the_labels_present(exporter: Exporter) -> None:
    exporter.page = triton_page(1)
    meter = make_scrape_meter("triton", url=exporter.url, device_label="gpu", devices=["0"])
    with pytest.raises(MeterError, match="labelled gpu_uuid"):
        await meter.start()


async def test_http_error_status_is_a_meter_error(exporter: Exporter) -> None:
    exporter.page, exporter.status = "oops", 503
    with pytest.raises(MeterError, match="HTTP 503"):
        await make_scrape_meter("dcgm", url=exporter.url).start()


async def test_several_hosts_need_match_labels(exporter: Exporter) -> None:
    exporter.page = dcgm_page({"0": 1_000}, hostname="node-a") + dcgm_page({"0": 9_000}, hostname="node-b")
    with pytest.raises(MeterError, match="differ in Hostname.*match_labels"):
        await make_scrape_meter("dcgm", url=exporter.url).start()

    meter = make_scrape_meter("dcgm", url=exporter.url, match_labels={"Hostname": "node-b"})
    await meter.start()
    exporter.page = dcgm_page({"0": 1_000}, hostname="node-a") + dcgm_page({"0": 19_000}, hostname="node-b")
    assert (await meter.read()).joules_by_device == {"0": pytest.approx(10.0)}
    await meter.close()

    # Two series for a GPU we do not read are not our problem.
    exporter.page = dcgm_page({"0": 1}, "node-a") + dcgm_page({"1": 1}, "node-c") + dcgm_page({"1": 2}, "node-d")
    only_gpu_0 = make_scrape_meter("dcgm", url=exporter.url, devices=["0"])
    await only_gpu_0.start()
    await only_gpu_0.close()


async def test_overlapping_reads_never_look_like_a_reset(exporter: Exporter) -> None:
    counter = {"value": 1000}

    async def rising(request: web.Request) -> web.Response:
        counter["value"] += 100
        page = triton_page(counter["value"])
        await asyncio.sleep(0.01 if counter["value"] % 200 else 0.03)  # replies out of order if unserialized
        return web.Response(text=page, content_type="text/plain")

    exporter.handler = rising
    meter = make_scrape_meter("triton", url=exporter.url)
    await meter.start()
    samples = await asyncio.gather(*(meter.read() for _ in range(6)))
    values = sorted(s.joules_by_device[UUID_0] for s in samples)
    assert values[-1] == pytest.approx(600.0), "no energy counted twice"
    await meter.close()


def test_parser_handles_escapes_special_values_timestamps_and_bad_lines() -> None:
    text = "\n".join(
        [
            "# TYPE energy counter",
            'energy{gpu="0",note="a \\"quoted\\" } brace, comma"} 12.5 1700000000000',
            'energy{gpu="1",} NaN',
            "energy 7",
            'energy_total{gpu="0"} 99',  # a different metric sharing the prefix
            'energy{gpu="2" 5',  # malformed: skipped, not fatal
            'energy{gpu="3"} not-a-number',
            '  energy{gpu="4"} +Inf',
            'energy{gpu="5"} 1e3 # {trace_id="abc"} 1.0',  # OpenMetrics exemplar
        ]
    )
    samples = parse_samples(text, "energy")
    assert samples[0] == ({"gpu": "0", "note": 'a "quoted" } brace, comma'}, 12.5)
    assert samples[1][0] == {"gpu": "1"} and samples[1][1] != samples[1][1]  # NaN
    assert samples[2] == ({}, 7.0)
    assert samples[3] == ({"gpu": "5"}, 1000.0)
    assert len(samples) == 4


def test_presets_and_overrides() -> None:
    assert PRESETS["dcgm"].scale == 0.001 and PRESETS["dcgm"].device_label == "gpu"
    assert PRESETS["triton"].device_label == "gpu_uuid"
    assert PRESETS["kepler"].metric == "kepler_node_gpu_joules_total"
    custom = make_scrape_meter(None, url="http://x:1/metrics", metric="my_joules_total", device_label="card")
    assert (custom.metric, custom.scale, custom.device_label) == ("my_joules_total", 1.0, "card")
    overridden = make_scrape_meter("dcgm", url="http://x:1/metrics", scale=1e-3, device_label="UUID")
    assert overridden.device_label == "UUID" and overridden.metric == PRESETS["dcgm"].metric
    with pytest.raises(ConfigError, match="meter.scrape.preset"):
        make_scrape_meter("prometheus", url="http://x:1/metrics")
    with pytest.raises(ConfigError, match="meter.scrape.metric"):
        make_scrape_meter(None, url="http://x:1/metrics")
    with pytest.raises(ConfigError, match="meter.scrape.scale"):
        make_scrape_meter("dcgm", url="http://x:1/metrics", scale=0)
    with pytest.raises(ConfigError, match="meter.scrape.url"):
        make_scrape_meter("dcgm", url="localhost:9400/metrics")
