"""The Batch API of a fleet replica whose PostgreSQL stops answering (a dead network link,
a hung server): clients get the API's JSON 503 within the store's call bound instead of
waiting for minutes, and the API answers again once the database does."""

from __future__ import annotations

import asyncio
from typing import Any

import openai
import pytest
from conftest import Rig, chat_lines, jsonl, until, upload

from proxy.batches import pg_store


class SilentLink:
    """A TCP relay to the database that can go silent: every socket stays open and
    nothing is delivered until the link heals (bytes sent meanwhile wait, as TCP's do)."""

    def __init__(self, target_port: int) -> None:
        self._target_port = target_port
        self._healthy = asyncio.Event()
        self._healthy.set()
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    def cut(self) -> None:
        self._healthy.clear()

    def heal(self) -> None:
        self._healthy.set()

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        await self._server.wait_closed()

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self._writers.append(client_writer)
        await self._healthy.wait()
        try:
            server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self._target_port)
        except OSError:
            client_writer.close()
            return
        self._writers.append(server_writer)
        await asyncio.gather(self._pump(client_reader, server_writer), self._pump(server_reader, client_writer))

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                await self._healthy.wait()
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


async def test_a_silent_database_gets_a_quick_503_and_the_api_recovers(
    rig: Rig, cluster: Any, dsn: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pg_store, "CALL_SECONDS", 1.0)  # the store's bound (10 s in service), short for the test
    link = SilentLink(cluster.port)
    port = await link.start()
    try:
        through_link = dsn.replace(f":{cluster.port}/", f":{port}/")
        service = await rig.start(receipts={"backend": "postgres", "dsn": through_link, "path": str(tmp_path / "r.db")})
        client = rig._client(f"http://127.0.0.1:{service.public_port}/v1", "sk-owner")
        file = await upload(client, jsonl(chat_lines(2)))
        batch = await client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")

        link.cut()
        # A guard, not a timing assertion: before the bound existed this waited 60 s per call.
        with pytest.raises(openai.APIStatusError) as refused:
            await asyncio.wait_for(client.batches.retrieve(batch.id), 30)
        assert refused.value.status_code == 503
        assert refused.value.body["type"] == "batches_unavailable"  # type: ignore[index]
        with pytest.raises(openai.APIStatusError) as listed:
            await asyncio.wait_for(client.files.list(), 30)
        assert listed.value.status_code == 503

        link.heal()

        async def answers() -> bool:
            try:
                return (await client.batches.retrieve(batch.id)).id == batch.id
            except openai.APIStatusError:
                return False

        await until(answers, "the Batch API to answer again")
        assert [f.id for f in (await client.files.list()).data] == [file.id]
        rig.services.remove(service)
        await service.stop()  # before the link closes: its stop releases leases through it
    finally:
        link.heal()
        await link.close()
