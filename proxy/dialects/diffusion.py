"""Diffusion servers: work = images x denoising steps x megapixels (1024^2 pixels).

AUTOMATIC1111 / SD.Next `/sdapi/v1/txt2img` and `/img2img`, and OpenAI-style
`/v1/images/generations`. The work is known from the request; the response confirms
how many images came back.
"""

from __future__ import annotations

from typing import Any

from proxy.dialects.base import Dialect, RequestInfo, ResponseReader, TokenTick, as_int, parse_json_object

_MEGAPIXEL = 1024 * 1024
DEFAULT_STEPS_A1111 = 20  # AUTOMATIC1111's default
DEFAULT_STEPS_OPENAI = 30  # the OpenAI API does not expose steps; a typical SDXL setting


MAX_SIDE = 65_536
MAX_STEPS = MAX_IMAGES = 10_000
"""Far above any real request; bounds absurd ones (1e308 steps) to finite work."""


def work_units(images: int, steps: int, width: int, height: int) -> float:
    images, steps = min(images, MAX_IMAGES), min(steps, MAX_STEPS)
    width, height = min(width, MAX_SIDE), min(height, MAX_SIDE)
    return images * steps * (width * height / _MEGAPIXEL)


def _size(value: Any) -> tuple[int, int] | None:
    if isinstance(value, str) and "x" in value:
        w, _, h = value.partition("x")
        if w.isascii() and w.isdigit() and h.isascii() and h.isdigit():  # superscripts are digits to isdigit, not to int
            return int(w), int(h)
    return None


class DiffusionReader(ResponseReader):
    def read_json(self, data: dict[str, Any]) -> None:
        images = data.get("images")
        if not isinstance(images, list):
            images = data.get("data")
        if isinstance(images, list) and images:
            per_image = self.info.extra.get("units_per_image", 0.0)
            self.work.images = len(images)
            self.work.work_units = per_image * len(images)


class DiffusionDialect(Dialect):
    name = "diffusion"

    def inspect_request(self, method: str, path: str, body: bytes | None) -> RequestInfo:
        info = super().inspect_request(method, path, body)
        data = parse_json_object(body)
        if data is None:
            return info
        if "/sdapi/" in path:
            steps = as_int(data.get("steps")) or DEFAULT_STEPS_A1111
            width = as_int(data.get("width")) or 512
            height = as_int(data.get("height")) or 512
            images = (as_int(data.get("batch_size")) or 1) * (as_int(data.get("n_iter")) or 1)
        else:
            steps = as_int(data.get("steps")) or as_int(data.get("num_inference_steps")) or DEFAULT_STEPS_OPENAI
            width, height = _size(data.get("size")) or (1024, 1024)
            images = as_int(data.get("n")) or 1
        info.extra["units_per_image"] = work_units(1, steps, width, height)
        info.extra["images_requested"] = images
        info.work_units = work_units(images, steps, width, height)
        return info

    def reader(self, info: RequestInfo, content_type: str, tick: TokenTick) -> ResponseReader:
        return DiffusionReader(info, tick)
