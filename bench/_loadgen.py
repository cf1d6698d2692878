"""The load generator: its own process and event loop (uvloop), an aiohttp client with a
pooled keep-alive connector per job, so it never shares a loop with what it measures.

The orchestrator starts `serve(conn)` in a child process and sends jobs over the pipe:
("open_loop" | "streams" | "closed_loop", {kwargs}); the child answers ("started", t)
when the measured window opens (warm-up done), for streams ("all_open", t) once every
slot has its first stream running, and then ("done", result dict).
Times are time.perf_counter() seconds; latencies in the result are in seconds.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import orjson

CHAT_PATH = "/v1/chat/completions"
TOKEN_MARK = b'"content":'
"""A chat stream chunk that carries a token (the role chunk has an empty content too)."""


def chat_body(max_tokens: int, stream: bool, prompt: str = "Say something about the weather today.") -> bytes:
    body: dict[str, Any] = {"model": "sim-llm", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens}
    if stream:
        body["stream"] = True
    return orjson.dumps(body)


HEADERS = {"Content-Type": "application/json"}


def _session(limit: int) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=limit, limit_per_host=0, keepalive_timeout=60, force_close=False)
    return aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=120), auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar()
    )


async def _post(session: aiohttp.ClientSession, url: str, body: bytes) -> int:
    async with session.post(url, data=body, headers=HEADERS) as response:
        await response.read()
        return response.status


async def _warm(session: aiohttp.ClientSession, url: str, body: bytes, connections: int, rounds: int = 3) -> None:
    """Open `connections` pooled connections (client and, behind a proxy, upstream) first."""
    for _ in range(rounds):
        await asyncio.gather(*(_post(session, url, body) for _ in range(connections)))


async def open_loop(conn: Any, base: str, rate: float, seconds: float, max_tokens: int = 1) -> dict[str, Any]:
    """Non-streaming requests started at a fixed rate whatever the answers do (open loop).

    Latency runs from the moment a request is handed to the client to its last body byte;
    `late` says how far behind schedule the generator itself started requests.
    """
    url = base + CHAT_PATH
    body = chat_body(max_tokens, stream=False)
    latencies: list[float] = []
    late: list[float] = []
    errors = 0
    async with _session(limit=0) as session:
        await _warm(session, url, body, connections=8)
        pending: set[asyncio.Task[None]] = set()

        async def one(scheduled: float) -> None:
            nonlocal errors
            t0 = time.perf_counter()
            late.append(t0 - scheduled)
            try:
                status = await _post(session, url, body)
            except Exception:
                errors += 1
                return
            if status != 200:
                errors += 1
                return
            latencies.append(time.perf_counter() - t0)

        count = int(rate * seconds)
        interval = 1.0 / rate
        start = time.perf_counter() + 0.02
        conn.send(("started", start))
        for i in range(count):
            scheduled = start + i * interval
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.ensure_future(one(scheduled))
            pending.add(task)
            task.add_done_callback(pending.discard)
        if pending:
            await asyncio.gather(*pending)
        elapsed = time.perf_counter() - start
    return {"latencies": latencies, "late": late, "errors": errors, "sent": count, "elapsed": elapsed}


async def streams(
    conn: Any, base: str, count: int, seconds: float, max_tokens: int = 100, stagger_seconds: float = 1.0
) -> dict[str, Any]:
    """`count` concurrent streams, each slot starting a new one when its stream ends, for
    `seconds`; the server paces tokens. Records time to first token and the gaps between
    successive token-bearing reads of each stream."""
    url = base + CHAT_PATH
    body = chat_body(max_tokens, stream=True)
    ttft: list[float] = []
    gaps: list[float] = []
    chunks = 0
    errors = 0
    completed = 0
    async with _session(limit=0) as session:
        # Warm-up: open the pool (and the proxy's upstream pool) with short streams.
        warm = chat_body(2, stream=True)
        await asyncio.gather(*(_post(session, url, warm) for _ in range(count)))
        start = time.perf_counter()
        deadline = start + seconds
        conn.send(("started", start))
        first_streams_open = 0

        async def slot(index: int) -> None:
            nonlocal chunks, errors, completed, first_streams_open
            await asyncio.sleep(stagger_seconds * index / count)
            first = True
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                last = None
                local_gaps: list[float] = []
                try:
                    async with session.post(url, data=body, headers=HEADERS) as response:
                        if response.status != 200:
                            errors += 1
                            await response.read()
                            continue
                        async for chunk in response.content.iter_any():
                            if TOKEN_MARK not in chunk:
                                continue
                            now = time.perf_counter()
                            if last is None:
                                ttft.append(now - t0)
                                if first:
                                    first = False
                                    first_streams_open += 1
                                    if first_streams_open == count:  # every slot streams now
                                        conn.send(("all_open", now))
                            else:
                                local_gaps.append(now - last)
                            last = now
                            chunks += 1
                except Exception:
                    errors += 1
                    continue
                gaps.extend(local_gaps)
                completed += 1

        await asyncio.gather(*(slot(i) for i in range(count)))
        elapsed = time.perf_counter() - start
    return {"ttft": ttft, "gaps": gaps, "chunks": chunks, "errors": errors, "completed": completed, "elapsed": elapsed}


async def closed_loop(conn: Any, base: str, concurrency: int, seconds: float, max_tokens: int = 1) -> dict[str, Any]:
    """`concurrency` workers, each sending its next request when the last one answered."""
    url = base + CHAT_PATH
    body = chat_body(max_tokens, stream=False)
    latencies: list[float] = []
    errors = 0
    async with _session(limit=0) as session:
        await _warm(session, url, body, connections=concurrency)
        start = time.perf_counter()
        deadline = start + seconds
        conn.send(("started", start))

        async def worker() -> None:
            nonlocal errors
            while True:
                t0 = time.perf_counter()
                if t0 >= deadline:
                    return
                try:
                    status = await _post(session, url, body)
                except Exception:
                    errors += 1
                    continue
                if status != 200:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - t0)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return {"latencies": latencies, "errors": errors, "elapsed": elapsed}


async def mixed(
    conn: Any,
    base: str,
    seconds: float,
    rate: float = 50.0,
    report_every: float = 5.0,
    stream_share: float = 0.3,
    disconnect_share: float = 0.1,
    stream_tokens: int = 20,
    max_in_flight: int = 512,
    seed: int = 1,
) -> dict[str, Any]:
    """A steady mixed load for a soak: requests started at `rate`/s for `seconds`, each one
    of: non-streaming (max_tokens=1), a full stream of `stream_tokens` tokens, or a client
    disconnect (half: a stream dropped after its first token, half: a non-streaming request
    for `stream_tokens` tokens dropped before the answer). Sends ("progress", counts) every
    `report_every` seconds so the orchestrator samples /proc in step; at most
    `max_in_flight` requests at once (a start is skipped, and counted, beyond that)."""
    import random

    rng = random.Random(seed)
    url = base + CHAT_PATH
    short = chat_body(1, stream=False)
    stream_body = chat_body(stream_tokens, stream=True)
    long_body = chat_body(stream_tokens, stream=False)
    counts = {"nonstream": 0, "stream": 0, "drop_stream": 0, "drop_wait": 0, "errors": 0, "skipped": 0}

    async def nonstream(session: aiohttp.ClientSession) -> None:
        status = await _post(session, url, short)
        counts["nonstream" if status == 200 else "errors"] += 1

    async def stream(session: aiohttp.ClientSession) -> None:
        async with session.post(url, data=stream_body, headers=HEADERS) as response:
            ok = response.status == 200
            tokens = 0
            async for chunk in response.content.iter_any():
                tokens += chunk.count(TOKEN_MARK)
        counts["stream" if ok and tokens else "errors"] += 1

    async def drop_stream(session: aiohttp.ClientSession) -> None:
        async with session.post(url, data=stream_body, headers=HEADERS) as response:
            if response.status != 200:
                counts["errors"] += 1
                return
            async for chunk in response.content.iter_any():
                if TOKEN_MARK in chunk:
                    break
            response.close()  # drop the connection mid-stream, as a client that went away
        counts["drop_stream"] += 1

    async def drop_wait(session: aiohttp.ClientSession) -> None:
        # The sim needs stream_tokens decode steps for this answer: gone well before it.
        try:
            await asyncio.wait_for(_post(session, url, long_body), timeout=0.1)
        except asyncio.TimeoutError:
            counts["drop_wait"] += 1
            return
        counts["nonstream"] += 1

    kinds = [nonstream, stream, drop_stream, drop_wait]
    weights = [1.0 - stream_share - disconnect_share, stream_share, disconnect_share / 2, disconnect_share / 2]

    async with _session(limit=0) as session:
        pending: set[asyncio.Task[None]] = set()

        async def one(kind: Any) -> None:
            try:
                await kind(session)
            except Exception:
                counts["errors"] += 1

        start = time.perf_counter()
        conn.send(("started", start))
        interval = 1.0 / rate
        next_report = start + report_every
        i = 0
        while True:
            now = time.perf_counter()
            if now >= next_report:
                conn.send(("progress", {"t": now - start, "in_flight": len(pending), **counts}))
                next_report += report_every
            if now - start >= seconds:
                break
            scheduled = start + i * interval
            if scheduled > now:
                await asyncio.sleep(min(scheduled - now, max(0.0, next_report - now)))
                continue
            i += 1
            if len(pending) >= max_in_flight:
                counts["skipped"] += 1
                continue
            task = asyncio.ensure_future(one(rng.choices(kinds, weights)[0]))
            pending.add(task)
            task.add_done_callback(pending.discard)
        if pending:
            await asyncio.wait(pending, timeout=30)
        elapsed = time.perf_counter() - start
    return {**counts, "elapsed": elapsed}


JOBS = {"open_loop": open_loop, "streams": streams, "closed_loop": closed_loop, "mixed": mixed}


def serve(conn: Any) -> None:
    """The child process: run jobs until told to stop."""
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    while True:
        message = conn.recv()
        if message is None:
            break
        name, kwargs = message
        try:
            result = loop.run_until_complete(JOBS[name](conn, **kwargs))
            conn.send(("done", result))
        except Exception as exc:  # report, keep serving
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
    loop.close()
