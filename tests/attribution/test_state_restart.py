"""A proxy with SQLite receipts keeps what attribution learned across a restart."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import aiohttp
import pytest

from proxy.carbon.intensity import ConstantIntensity
from proxy.config import config_from_dict
from proxy.meters.sim import SimMeter
from proxy.receipts.sqlite import SqliteReceiptStore
from proxy.serve import Service
from proxy.sim import SimGpu, SimModelConfig, run_sim_server
from tests.helpers import proxy_config


async def _service(sim_url: str, gpu: SimGpu, path: Path) -> Service:
    data = proxy_config(sim_url, attribution={"idle_power_watts": "auto"}, receipts={"path": str(path)})
    service = Service(
        config_from_dict(data), meter=SimMeter(gpu), intensity=ConstantIntensity(450), receipts=SqliteReceiptStore(str(path))
    )
    await service.start()
    return service


@pytest.mark.asyncio
async def test_learned_state_is_saved_at_stop_and_reloaded_at_start(tmp_path: Path) -> None:
    path = tmp_path / "receipts.db"
    gpu = SimGpu(refresh_seconds=0.0)
    sim = await run_sim_server("127.0.0.1", 0, SimModelConfig(tokens_per_second=500.0), gpu)
    try:
        first = await _service(sim.url, gpu, path)
        try:
            engine = first.proxy.accountant.engine  # type: ignore[union-attr]
            group = next(iter(engine.group_names))
            pace = {"prefill_rates": [3210.0] * 25, "token_gaps": [0.004] * 25}
            engine._groups[group].pace.load(pace)  # something learned, to find again
            async with aiohttp.ClientSession() as session:
                url = f"http://127.0.0.1:{first.public_port}/v1/completions"
                async with session.post(url, json={"model": "sim-llm", "prompt": "abcd" * 20, "max_tokens": 5}) as response:
                    assert response.status == 200
        finally:
            await first.stop()
        with sqlite3.connect(path) as db:
            groups = [row[0] for row in db.execute("SELECT group_name FROM attribution_state")]
        assert groups == [group]

        second = await _service(sim.url, gpu, path)
        try:
            restored = second.proxy.accountant.engine._groups[group].pace.pace()  # type: ignore[union-attr]
            assert restored.prefill_tokens_per_second == 3210.0 and restored.decode_seconds_per_token == 0.004
        finally:
            await second.stop()
    finally:
        await sim.close()
