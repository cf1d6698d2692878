"""Dialect readers: incremental parsing survives any split, and never changes bytes."""

from __future__ import annotations

import gzip

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.dialects import dialect_for
from proxy.dialects.base import RequestInfo, ResponseReader

OPENAI_STREAM = (
    b'data: {"choices":[{"index":0,"delta":{"content":"a"}}],"usage":null}\n\n'
    b'data: {"choices":[{"index":0,"delta":{"content":"b"}}],"usage":null}\r\n\r\n'
    b": keep-alive\n\n"
    b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":null}\n\n'
    b'data: {"choices":[],"usage":{"prompt_tokens":11,"completion_tokens":2,"total_tokens":13}}\n\n'
    b"data: [DONE]\n\n"
)


def _read(reader: ResponseReader, chunks: list[bytes], figures: dict | None = None) -> bytes:
    out = [reader.feed(c, float(i)) for i, c in enumerate(chunks)]
    reader.end()
    return b"".join(out) + reader.tail(figures)


def _cuts(body: bytes, a: int, b: int) -> list[bytes]:
    a, b = sorted((a, b))
    return [body[:a], body[a:b], body[b:]]


def _openai_reader(wants_usage: bool) -> ResponseReader:
    info = RequestInfo(model="m", stream=True, client_wants_usage=wants_usage)
    return dialect_for("openai", "/v1/chat/completions").reader(info, "text/event-stream", lambda n, t: None)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(OPENAI_STREAM)), st.integers(0, len(OPENAI_STREAM)))
def test_openai_stream_split_anywhere_is_unchanged_and_counted(a: int, b: int) -> None:
    reader = _openai_reader(wants_usage=True)
    assert _read(reader, _cuts(OPENAI_STREAM, a, b)) == OPENAI_STREAM
    assert reader.work.prompt_tokens == 11 and reader.work.output_tokens == 2


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(OPENAI_STREAM)), st.integers(0, len(OPENAI_STREAM)))
def test_usage_the_client_did_not_ask_for_is_hidden(a: int, b: int) -> None:
    reader = _openai_reader(wants_usage=False)
    out = _read(reader, _cuts(OPENAI_STREAM, a, b), {"energy_joules": 1.5})
    assert b'"usage"' not in out
    assert out.endswith(b': emissions {"energy_joules":1.5}\n\ndata: [DONE]\n\n')
    assert out.count(b"data: {") == 3
    assert reader.work.output_tokens == 2


@settings(max_examples=200, deadline=None)
@given(st.integers(0, len(OPENAI_STREAM)), st.integers(0, len(OPENAI_STREAM)))
def test_a_stream_framed_with_bare_cr_is_counted_and_gets_its_figures(a: int, b: int) -> None:
    # The SSE spec allows CR alone as a line end; such a stream is read like any other.
    body = OPENAI_STREAM.replace(b"\r\n", b"\n").replace(b"\n", b"\r")
    reader = _openai_reader(wants_usage=False)
    out = _read(reader, _cuts(body, a, b), {"energy_joules": 1.5})
    assert out.endswith(b': emissions {"energy_joules":1.5}\n\ndata: [DONE]\r\r')
    assert out.count(b"data: {") == 3 and b'"usage"' not in out
    assert reader.work.output_tokens == 2


def test_figures_go_inside_the_usage_chunk_when_asked() -> None:
    reader = _openai_reader(wants_usage=True)
    out = _read(reader, [OPENAI_STREAM], {"co2e_grams": 0.25})
    usage = orjson.loads(out.split(b"\n\n")[-3][6:])
    assert usage["usage"]["emissions"] == {"co2e_grams": 0.25}
    assert usage["usage"]["completion_tokens"] == 2


def test_malformed_events_pass_through_unchanged() -> None:
    body = b'data: {"usage": {not json\n\ndata: \xff\xfe garbage\n\nevent: x\ndata: [DONE]\n\n'
    reader = _openai_reader(wants_usage=True)
    out = _read(reader, [body[:7], body[7:]], {"x": 1})
    assert out == body.replace(b"event: x\ndata: [DONE]\n\n", b"") + b': emissions {"x":1}\n\n' + b"event: x\ndata: [DONE]\n\n"


def test_unterminated_last_event_gets_no_figures() -> None:
    body = b'data: {"choices":[{"delta":{"content":"a"}}]}\n\ndata: {"partial"'
    reader = _openai_reader(wants_usage=False)
    assert _read(reader, [body], {"x": 1}) == body


@pytest.mark.parametrize(
    ("dialect", "path", "body", "content_type", "expected"),
    [
        ("openai", "/v1/embeddings", b'{"data":[],"usage":{"prompt_tokens":8,"total_tokens":8}}', "application/json", (8, 0)),
        ("tgi", "/generate", b'{"generated_text":"x","details":{"generated_tokens":17,"prefill":[{},{},{}]}}', "application/json", (3, 17)),
        ("ollama", "/api/chat", b'{"done":true,"prompt_eval_count":26,"eval_count":290,"prompt_eval_duration":130079000,"eval_duration":4232710000}', "application/json", (26, 290)),
        ("llamacpp", "/completion", b'{"content":"x","timings":{"prompt_n":5,"predicted_n":9,"prompt_ms":12.5,"predicted_ms":90.0}}', "application/json", (5, 9)),
    ],
)
def test_native_json_counts(dialect: str, path: str, body: bytes, content_type: str, expected: tuple[int, int]) -> None:
    reader = dialect_for(dialect, path).reader(RequestInfo(), content_type, lambda n, t: None)
    reader.read_body(body, None)
    assert (reader.work.prompt_tokens, reader.work.output_tokens_best()) == expected


def test_tgi_stream_reads_details_and_gets_a_comment() -> None:
    body = (
        b'data:{"token":{"id":1,"text":"a","logprob":0,"special":false},"generated_text":null,"details":null}\n\n'
        b'data:{"token":{"id":2,"text":"b","logprob":0,"special":false},"generated_text":"ab","details":{"finish_reason":"length","generated_tokens":2}}\n\n'
    )
    reader = dialect_for("tgi", "/generate_stream").reader(RequestInfo(stream=True), "text/event-stream", lambda n, t: None)
    out = _read(reader, [body[:50], body[50:]], {"e": 1})
    assert out == body + b': emissions {"e":1}\n\n'
    assert reader.work.output_tokens == 2


def test_llamacpp_stream_final_event_counts() -> None:
    body = (
        b'data: {"content":"a","stop":false}\n\n'
        b'data: {"content":"","stop":true,"timings":{"prompt_n":4,"predicted_n":1}}\n\n'
    )
    reader = dialect_for("llamacpp", "/completion").reader(RequestInfo(stream=True), "text/event-stream", lambda n, t: None)
    assert _read(reader, [body], None) == body
    assert (reader.work.prompt_tokens, reader.work.output_tokens) == (4, 1)


def test_gzip_json_is_read_without_changing_it() -> None:
    body = gzip.compress(b'{"usage":{"prompt_tokens":2,"completion_tokens":3}}')
    reader = dialect_for("openai", "/v1/completions").reader(RequestInfo(), "application/json", lambda n, t: None)
    reader.read_body(body, "gzip")
    assert reader.work.output_tokens == 3


def test_openai_request_gets_include_usage_and_keeps_other_options() -> None:
    dialect = dialect_for("openai", "/v1/chat/completions")
    info = dialect.inspect_request("POST", "/v1/chat/completions", b'{"model":"m","stream":true,"stream_options":{"x":1}}')
    assert not info.client_wants_usage
    assert orjson.loads(info.body) == {"model": "m", "stream": True, "stream_options": {"x": 1, "include_usage": True}}
    untouched = b'{"model":"m","stream":false}'
    assert dialect.inspect_request("POST", "/v1/chat/completions", untouched).body is untouched


@pytest.mark.parametrize(
    ("path", "body", "units"),
    [
        ("/sdapi/v1/txt2img", b'{"steps":20,"width":1024,"height":1024,"batch_size":2}', 40.0),
        ("/sdapi/v1/txt2img", b"{}", 20 * 0.25),
        ("/v1/images/generations", b'{"n":1,"size":"512x512"}', 30 * 0.25),
    ],
)
def test_diffusion_work_units(path: str, body: bytes, units: float) -> None:
    info = dialect_for("diffusion", path).inspect_request("POST", path, body)
    assert info.work_units == pytest.approx(units)


def test_absurd_counts_from_a_hostile_upstream_are_ignored() -> None:
    reader = dialect_for("openai", "/v1/completions").reader(RequestInfo(), "application/json", lambda n, t: None)
    reader.read_body(b'{"usage":{"prompt_tokens":1e308,"completion_tokens":99999999999999}}', None)
    assert reader.work.prompt_tokens is None and reader.work.output_tokens == 0
