"""The lean public HTTP/1.1 server (proxy.server) as a client sees it through raw
sockets: keep-alive and pipelining answered in order, chunked and Content-Length bodies,
Expect: 100-continue, HEAD, head limits, and clean JSON errors for malformed requests."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from aiohttp import web
from helpers import start_proxy, start_upstream

from proxy.serve import Service

TIMEOUT = 10.0


async def echo(request: web.Request) -> web.Response:
    body = await request.read()
    return web.json_response({"path": request.path_qs, "method": request.method, "body": body.decode(), "te": request.headers.get("Transfer-Encoding")})


async def started() -> tuple[web.AppRunner, Service]:
    runner, url = await start_upstream({"/{tail:.*}": echo})
    service = await start_proxy(url, dialect="generic", server={"header_read_seconds": 5})
    return runner, service


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            body += chunk[:-2]
    else:
        body = await reader.read()
    return status, headers, body


async def exchange(service: Service, raw: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", service.public_port)
    writer.write(raw)
    await writer.drain()
    return reader, writer


def post(path: str, body: bytes, extra: str = "") -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: p\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


async def test_pipelined_requests_are_answered_in_order_on_one_connection() -> None:
    runner, service = await started()
    try:
        raw = b"".join(post(f"/v1/x?n={i}", f"body-{i}".encode()) for i in range(5))
        reader, writer = await exchange(service, raw)
        for i in range(5):
            status, _, body = await read_response(reader)
            data: dict[str, Any] = orjson.loads(body)
            assert status == 200 and data["path"] == f"/v1/x?n={i}" and data["body"] == f"body-{i}"
        writer.close()
    finally:
        await service.stop()
        await runner.cleanup()


async def test_a_chunked_request_body_arrives_whole() -> None:
    runner, service = await started()
    try:
        head = b"POST /v1/up HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n"
        reader, writer = await exchange(service, head)
        for part in (b"hello ", b"chunked ", b"world"):
            writer.write(b"%x\r\n%b\r\n" % (len(part), part))
            await writer.drain()
            await asyncio.sleep(0.01)
        writer.write(b"0\r\n\r\n")
        status, _, body = await read_response(reader)
        assert status == 200 and orjson.loads(body)["body"] == "hello chunked world"
        writer.close()
    finally:
        await service.stop()
        await runner.cleanup()


async def test_expect_100_continue_gets_100_before_the_body_is_sent() -> None:
    runner, service = await started()
    try:
        reader, writer = await exchange(service, b"POST /v1/up HTTP/1.1\r\nHost: p\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        assert interim.startswith(b"HTTP/1.1 100")
        writer.write(b"12345")
        status, _, body = await read_response(reader)
        assert status == 200 and orjson.loads(body)["body"] == "12345"
        writer.close()
    finally:
        await service.stop()
        await runner.cleanup()


async def test_head_gets_headers_and_no_body_and_the_connection_stays_usable() -> None:
    runner, service = await started()
    try:
        reader, writer = await exchange(service, b"HEAD /v1/h HTTP/1.1\r\nHost: p\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        assert head.startswith(b"HTTP/1.1 200")
        writer.write(post("/v1/after", b"x"))
        status, _, body = await read_response(reader)  # the next bytes are the next response: HEAD sent no body
        assert status == 200 and orjson.loads(body)["path"] == "/v1/after"
        writer.close()
    finally:
        await service.stop()
        await runner.cleanup()


async def test_malformed_heads_get_a_json_400_and_never_a_traceback() -> None:
    runner, service = await started()
    try:
        for raw in (b"GARBAGE\r\n\r\n", b"GET / HTTP/1.1\r\nBad Header Line\r\n\r\n", b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n"):
            reader, writer = await exchange(service, raw)
            status, headers, body = await read_response(reader)
            assert status == 400, raw
            assert orjson.loads(body)["error"]["code"] == 400
            assert b"Traceback" not in body and headers.get("connection") == "close"
            writer.close()
    finally:
        await service.stop()
        await runner.cleanup()


async def test_oversized_heads_are_refused_with_a_json_400() -> None:
    runner, service = await started()
    try:
        cases = [
            (b"GET /v1/x HTTP/1.1\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n", 400),
            (b"GET /v1/x HTTP/1.1\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(500)) + b"\r\n", 400),
            (b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\n\r\n", 400),
        ]
        for raw, expected in cases:
            reader, writer = await exchange(service, raw)
            status, _, body = await read_response(reader)
            error = orjson.loads(body)["error"]
            assert status == expected and error["code"] == expected and error["type"] == "request_header_too_large"
            writer.close()
        reader, writer = await exchange(service, post("/v1/ok", b"y"))
        assert (await read_response(reader))[0] == 200
        writer.close()
    finally:
        await service.stop()
        await runner.cleanup()


async def test_a_body_larger_than_max_body_bytes_is_refused_before_it_is_read() -> None:
    runner, url = await start_upstream({"/{tail:.*}": echo})
    service = await start_proxy(url, dialect="generic", server={"max_body_bytes": 100})
    try:
        reader, writer = await exchange(service, b"POST /v1/x HTTP/1.1\r\nHost: p\r\nContent-Length: 1000000\r\nExpect: 100-continue\r\n\r\n")
        status, headers, body = await read_response(reader)
        assert status == 413 and orjson.loads(body)["error"]["type"] == "request_too_large"
        assert headers.get("connection") == "close"  # the announced body is never read as a request
        writer.close()
    finally:
        await service.stop()
        await runner.cleanup()
