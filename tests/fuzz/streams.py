"""Hypothesis strategies for the fuzz tests: SSE and NDJSON streams as model servers write
them (and as broken ones do), random splits of a body into reads, and a reference
framing of SSE written from the rule framing.py documents, independent of its code."""

from __future__ import annotations

import json
import re
from typing import Any

import orjson
from hypothesis import strategies as st

# -- splitting a body into the reads the proxy sees ------------------------------------


@st.composite
def splits(draw: st.DrawFn, body: bytes) -> list[bytes]:
    """`body` cut at random places (empty reads included: aiohttp never yields them,
    but a reader must not care)."""
    cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=8)))
    edges = [0, *cuts, len(body)]
    return [body[a:b] for a, b in zip(edges, edges[1:])]


# -- SSE --------------------------------------------------------------------------------

TERMINATORS = st.sampled_from([b"\n\n", b"\r\n\r\n", b"\r\r"])
DATA_PREFIX = st.sampled_from([b"data: ", b"data:"])
TEXT = st.text(max_size=12)  # any unicode: quotes, backslashes, "data:", "[DONE]", newlines (escaped by JSON)


def compact(value: Any) -> bytes:
    return orjson.dumps(value)


def spaced(value: Any) -> bytes:
    """json.dumps' default separators (', ' and ': '), as some servers write."""
    return json.dumps(value, ensure_ascii=False).encode()


ENCODINGS = st.sampled_from([compact, spaced])
USAGE = st.fixed_dictionaries(
    {"prompt_tokens": st.integers(0, 10**6), "completion_tokens": st.integers(0, 10**6)},
    optional={"total_tokens": st.integers(0, 10**6)},
)


def _content_chunk(text: str, usage_null: str) -> dict[str, Any]:
    chunk: dict[str, Any] = {"id": "chatcmpl-1", "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}
    if usage_null == "first":
        return {"usage": None, **chunk}
    if usage_null == "last":
        return {**chunk, "usage": None}
    return chunk


openai_content = st.builds(_content_chunk, TEXT, st.sampled_from(["none", "first", "last"]))
openai_usage_only = st.builds(lambda u: {"id": "chatcmpl-1", "choices": [], "usage": u}, USAGE)
openai_content_with_usage = st.builds(
    lambda t, u: {"id": "chatcmpl-1", "choices": [{"index": 0, "delta": {"content": t}}], "usage": u}, TEXT, USAGE
)
tgi_token = st.builds(
    lambda i, t: {"token": {"id": i, "text": t, "logprob": -0.1, "special": False}, "generated_text": None, "details": None},
    st.integers(0, 50000),
    TEXT,
)
tgi_final = st.builds(
    lambda t, n: {"token": {"id": 2, "text": "", "special": True}, "generated_text": t, "details": {"finish_reason": "length", "generated_tokens": n}},
    TEXT,
    st.integers(0, 10**6),
)
llamacpp_token = st.builds(lambda t: {"content": t, "stop": False}, TEXT)
llamacpp_final = st.builds(
    lambda p, n: {"content": "", "stop": True, "timings": {"prompt_n": p, "predicted_n": n, "prompt_ms": 1.5, "predicted_ms": 9.0}},
    st.integers(0, 10**5),
    st.integers(0, 10**5),
)


def data_event(payloads: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    return st.builds(lambda prefix, value, enc, end: prefix + enc(value) + end, DATA_PREFIX, payloads, ENCODINGS, TERMINATORS)


DONE = st.builds(lambda prefix, end: prefix + b"[DONE]" + end, DATA_PREFIX, TERMINATORS)
COMMENT = st.builds(lambda text, end: b":" + text.encode() + end, st.sampled_from(["", " keep-alive", " ping"]), TERMINATORS)
NAMED = st.builds(lambda name, value, end: b"event: " + name + b"\ndata: " + compact(value) + end, st.sampled_from([b"message", b"x"]), openai_content, TERMINATORS)
MULTILINE = st.builds(lambda a, b, end: b"data: " + a.encode("utf-8", "replace") + b"\ndata: " + b.encode("utf-8", "replace") + end, TEXT.filter(lambda s: "\n" not in s and "\r" not in s), TEXT.filter(lambda s: "\n" not in s and "\r" not in s), TERMINATORS)
JUNK = st.builds(lambda raw, end: raw + end, st.binary(max_size=24), TERMINATORS)
RAW = st.binary(max_size=24)  # no terminator of its own: may merge with what follows


def sse_stream(*payloads: st.SearchStrategy[Any], done: bool = True) -> st.SearchStrategy[bytes]:
    """A stream of events as the server writes them, with noise, an optional [DONE]
    (anywhere, possibly more than one), and an optional unterminated tail."""
    pieces = st.one_of(*(data_event(p) for p in payloads), COMMENT, NAMED, MULTILINE, JUNK, RAW, *([DONE] if done else []))
    tail = st.one_of(st.just(b""), st.binary(max_size=16), st.builds(lambda p: p[: len(p) // 2], data_event(st.one_of(*payloads))))
    return st.builds(lambda body, end: b"".join(body) + end, st.lists(pieces, max_size=12), tail)


def frame(body: bytes) -> tuple[list[bytes], bytes]:
    """(complete events, unterminated rest). An event ends at the first blank line
    written as LF LF, CR LF CR LF or CR CR (the SSE spec's three line ends), whichever
    ends first; each keeps its terminator."""
    events: list[bytes] = []
    pos = 0
    while True:
        ends = [i + len(t) for t in (b"\n\n", b"\r\n\r\n", b"\r\r") if (i := body.find(t, pos)) >= 0]
        if not ends:
            return events, body[pos:]
        end = min(ends)
        events.append(body[pos:end])
        pos = end


def is_blank(raw: bytes) -> bool:
    """Only CR and LF: blank lines, which SSE clients skip."""
    return not raw.strip(b"\r\n")


def same_stream(got: bytes, expected: bytes) -> None:
    """Equal as an SSE client reads them, byte for byte in every event: the same events
    in the same order and the same unterminated rest, after dropping the blank-line filler
    (CR and LF) before each event: where filler between two events lands, and whether
    filler before a hidden event goes with it, depends on how the reads were cut. And no
    other byte lost or added."""

    def events(stream: bytes) -> tuple[list[bytes], bytes]:
        found, rest = frame(stream)
        return [e for e in (e.lstrip(b"\r\n") for e in found) if e], rest.lstrip(b"\r\n")

    assert events(got) == events(expected)
    assert sorted(got.translate(None, b"\r\n")) == sorted(expected.translate(None, b"\r\n"))


def data_of(event: bytes) -> bytes | None:
    """The data field per the SSE spec: every `data:` line, one leading space dropped,
    joined by LF; None when the event has no data line."""
    lines = [line for line in re.split(rb"\r\n|\r|\n", event) if line.startswith(b"data:")]
    if not lines:
        return None
    return b"\n".join(line[6:] if line.startswith(b"data: ") else line[5:] for line in lines)


def is_done(event: bytes) -> bool:
    data = data_of(event)
    return data is not None and data.strip() == b"[DONE]"


def comment(figures: dict[str, Any]) -> bytes:
    return b": emissions " + orjson.dumps(figures) + b"\n\n"


# -- NDJSON (Ollama) ----------------------------------------------------------------------

ollama_line = st.builds(lambda t: {"model": "llama3", "created_at": "2024-01-01T00:00:00Z", "response": t, "done": False}, TEXT)
ollama_final = st.builds(
    lambda p, n: {"model": "llama3", "response": "", "done": True, "done_reason": "stop", "prompt_eval_count": p, "eval_count": n, "prompt_eval_duration": 2000, "eval_duration": 3000},
    st.integers(0, 10**6),
    st.integers(0, 10**6),
)
LINE_END = st.sampled_from([b"\n", b"\r\n"])
ndjson_piece = st.one_of(
    st.builds(lambda v, end: compact(v) + end, st.one_of(ollama_line, ollama_final), LINE_END),
    st.builds(lambda v, end: spaced(v) + end, ollama_final, LINE_END),  # "done": true, spaced: not recognized
    st.builds(lambda raw, end: raw + end, st.binary(max_size=24), LINE_END),
    st.just(b"\n"),
)
ndjson_stream = st.builds(
    lambda lines, tail: b"".join(lines) + tail,
    st.lists(ndjson_piece, max_size=10),
    st.one_of(st.just(b""), st.binary(max_size=16), st.builds(lambda v: compact(v), ollama_final)),
)
