"""Image generation endpoints: AUTOMATIC1111 POST /sdapi/v1/txt2img, OpenAI POST /v1/images/generations.

Both report the work the proxy's diffusion dialect counts: images x steps x
(width x height / 1024^2). Images are tiny valid PNGs (8x8, one colour per seed): the
sim models the time and energy of denoising, not the pixels.
"""

from __future__ import annotations

import base64
import struct
import time
import zlib
from typing import Any

import orjson
from aiohttp import web

from proxy.sim.state import SIM_STATE, RequestTicket, SimState, connection_watch
from proxy.sim.streaming import json_response, read_json, send_now
from proxy.sim.text import text_seed

MAX_SIDE_PIXELS = 4096


def tiny_png(seed: int) -> bytes:
    """An 8x8 single-colour RGB PNG; the colour comes from the seed."""
    width = height = 8
    rgb = bytes(((seed >> shift) & 0xFF) for shift in (0, 8, 16))
    raw = b"".join(b"\x00" + rgb * width for _ in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _png_b64(seed: int) -> str:
    return base64.b64encode(tiny_png(seed)).decode("ascii")


def _a1111_error(message: str) -> web.HTTPUnprocessableEntity:
    # FastAPI's validation error shape, which AUTOMATIC1111 answers with.
    detail = [{"loc": ["body"], "msg": message, "type": "value_error"}]
    return web.HTTPUnprocessableEntity(text=orjson.dumps({"detail": detail}).decode(), content_type="application/json")


def _openai_error(message: str, param: str) -> web.HTTPBadRequest:
    error = {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": None}}
    return web.HTTPBadRequest(text=orjson.dumps(error).decode(), content_type="application/json")


def _int_field(body: dict[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = body.get(name, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _a1111_error(f"{name} must be an integer between {low} and {high}")
    return value


async def _denoise(state: SimState, request: web.Request, ticket: RequestTicket, *, steps: int, width: int,
                   height: int, batch_size: int, n_iter: int) -> bool:
    finished = await state.diffusion.run(
        ticket.request_id, steps=steps, width=width, height=height, batch_size=batch_size, n_iter=n_iter,
        connection_lost=connection_watch(request),
    )  # fmt: skip
    if finished:
        ticket.images = batch_size * n_iter
    else:
        ticket.outcome = "cancelled"
    return finished


async def txt2img(request: web.Request) -> web.StreamResponse:
    state = request.app[SIM_STATE]
    body = await read_json(request)
    prompt = body.get("prompt", "")
    if not isinstance(prompt, str):
        raise _a1111_error("prompt must be a string")
    steps = _int_field(body, "steps", 50, 1, 1000)
    width = _int_field(body, "width", 512, 8, MAX_SIDE_PIXELS)
    height = _int_field(body, "height", 512, 8, MAX_SIDE_PIXELS)
    batch_size = _int_field(body, "batch_size", 1, 1, 64)
    n_iter = _int_field(body, "n_iter", 1, 1, 100)
    seed = body.get("seed", -1)
    if not isinstance(seed, int) or seed < 0:
        seed = text_seed(prompt, state.config.seed) & 0xFFFFFFFF
    async with state.request(request) as ticket:
        if not await _denoise(state, request, ticket, steps=steps, width=width, height=height,
                              batch_size=batch_size, n_iter=n_iter):
            return web.Response(status=499)
        count = batch_size * n_iter
        seeds = [seed + i for i in range(count)]
        parameters = dict(body)
        parameters.update(prompt=prompt, steps=steps, width=width, height=height, batch_size=batch_size,
                          n_iter=n_iter, seed=seed)
        info = {
            "prompt": prompt, "all_prompts": [prompt] * count, "negative_prompt": body.get("negative_prompt", ""),
            "seed": seed, "all_seeds": seeds, "subseed": -1, "all_subseeds": [-1] * count,
            "width": width, "height": height, "sampler_name": body.get("sampler_name") or "Euler a",
            "cfg_scale": body.get("cfg_scale", 7.0), "steps": steps, "batch_size": batch_size,
            "sd_model_name": state.config.model, "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        }  # fmt: skip
        result = {"images": [_png_b64(s) for s in seeds], "parameters": parameters,
                  "info": orjson.dumps(info).decode()}
        return await send_now(request, json_response(result, ticket.request_id))


def _parse_size(size: Any) -> tuple[int, int]:
    if size in (None, "auto"):
        return 1024, 1024
    if isinstance(size, str) and "x" in size:
        width_text, _, height_text = size.partition("x")
        if width_text.isdigit() and height_text.isdigit():
            width, height = int(width_text), int(height_text)
            if 8 <= width <= MAX_SIDE_PIXELS and 8 <= height <= MAX_SIDE_PIXELS:
                return width, height
    raise _openai_error(f"Invalid size {size!r}: use WIDTHxHEIGHT such as '1024x1024'", "size")


async def images_generations(request: web.Request) -> web.StreamResponse:
    state = request.app[SIM_STATE]
    body = await read_json(request)
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise _openai_error("'prompt' is required", "prompt")
    n = body.get("n", 1)
    if n is None:
        n = 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 10:
        raise _openai_error("'n' must be an integer between 1 and 10", "n")
    width, height = _parse_size(body.get("size"))
    response_format = body.get("response_format") or "b64_json"
    if response_format not in ("b64_json", "url"):
        raise _openai_error("'response_format' must be 'url' or 'b64_json'", "response_format")
    steps = state.config.diffusion_default_steps
    seed = text_seed(prompt, state.config.seed)
    async with state.request(request) as ticket:
        # OpenAI-style backends denoise the n images as one batch.
        if not await _denoise(state, request, ticket, steps=steps, width=width, height=height,
                              batch_size=n, n_iter=1):
            return web.Response(status=499)
        data = []
        for i in range(n):
            b64 = _png_b64(seed + i)
            item = {"b64_json": b64} if response_format == "b64_json" else {"url": "data:image/png;base64," + b64}
            item["revised_prompt"] = prompt
            data.append(item)
        return await send_now(request, json_response({"created": int(time.time()), "data": data},
                                                     ticket.request_id))
