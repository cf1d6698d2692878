"""OpenAI chat and legacy-completion bodies: stream chunks and whole responses.

Stream chunks are built from pre-encoded byte prefixes and suffixes (one concatenation
per token, no JSON encoder on the hot path). `stream_options.include_usage` works as in
OpenAI's API: every chunk then carries `"usage": null`, and one extra chunk with
`"choices": []` and the usage comes before `data: [DONE]`; without it no chunk has a
usage key.
"""

from __future__ import annotations

from typing import Any

import orjson

from proxy.sim.engine import SimSequence
from proxy.sim.streaming import BodyWriter
from proxy.sim.text import token_json


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class ResponseHead:
    """The fields every chunk and response of one completion repeats."""

    __slots__ = ("completion_id", "created", "model", "system_fingerprint", "chat")

    def __init__(self, completion_id: str, created: int, model: str, system_fingerprint: str, chat: bool) -> None:
        self.completion_id = completion_id
        self.created = created
        self.model = model
        self.system_fingerprint = system_fingerprint
        self.chat = chat

    def fields(self, object_name: str) -> dict[str, Any]:
        return {
            "id": self.completion_id,
            "object": object_name,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.system_fingerprint,
        }


def complete_body(head: ResponseHead, seq: SimSequence) -> dict[str, Any]:
    """The non-streaming response of a finished sequence."""
    if head.chat:
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": seq.text, "refusal": None},
            "logprobs": None,
            "finish_reason": seq.finish_reason,
        }
        body = head.fields("chat.completion")
    else:
        choice = {"text": seq.text, "index": 0, "logprobs": None, "finish_reason": seq.finish_reason}
        body = head.fields("text_completion")
    body["choices"] = [choice]
    body["usage"] = usage(seq.prompt_tokens, seq.generated_tokens)
    return body


class OpenAIStreamSink:
    __slots__ = ("_writer", "_head", "_include_usage", "_prefix", "_suffix", "_opening", "_opened")

    def __init__(self, writer: BodyWriter, head: ResponseHead, include_usage: bool) -> None:
        self._writer = writer
        self._head = head
        self._include_usage = include_usage
        object_name = "chat.completion.chunk" if head.chat else "text_completion"
        # '{"id":...,"system_fingerprint":"..."' without its closing brace, then a comma.
        common = b"data: " + orjson.dumps(head.fields(object_name))[:-1] + b","
        tail = b',"usage":null}\n\n' if include_usage else b"}\n\n"
        if head.chat:
            self._prefix = common + b'"choices":[{"index":0,"delta":{"content":'
            self._suffix = b'},"logprobs":null,"finish_reason":null}]' + tail
            # The first chunk announces the role with empty content, as OpenAI does.
            self._opening = (
                common + b'"choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},'
                b'"logprobs":null,"finish_reason":null}]' + tail
            )
        else:
            self._prefix = common + b'"choices":[{"text":'
            self._suffix = b',"index":0,"logprobs":null,"finish_reason":null}]' + tail
            self._opening = b""
        self._opened = False

    def on_token(self, seq: SimSequence, position: int, index: int) -> None:
        if self._opened:
            self._writer.write3(self._prefix, token_json(position, index), self._suffix)
        else:
            self._opened = True
            self._writer.write(self._opening + self._prefix + token_json(position, index) + self._suffix)

    def on_finish(self, seq: SimSequence) -> None:
        head = self._head
        object_name = "chat.completion.chunk" if head.chat else "text_completion"
        final = head.fields(object_name)
        if head.chat:
            final["choices"] = [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": seq.finish_reason}]
        else:
            final["choices"] = [{"text": "", "index": 0, "logprobs": None, "finish_reason": seq.finish_reason}]
        parts = [] if self._opened else [self._opening]
        if self._include_usage:
            final["usage"] = None
            usage_chunk = head.fields(object_name)
            usage_chunk["choices"] = []
            usage_chunk["usage"] = usage(seq.prompt_tokens, seq.generated_tokens)
            parts += [b"data: " + orjson.dumps(final) + b"\n\n", b"data: " + orjson.dumps(usage_chunk) + b"\n\n"]
        else:
            parts.append(b"data: " + orjson.dumps(final) + b"\n\n")
        parts.append(b"data: [DONE]\n\n")
        self._opened = True
        self._writer.write(b"".join(parts))
