"""Fuzzing every dialect reader: random streams (well-formed, noisy and broken) cut into
random reads. None may raise, the result may not depend on where the reads were cut,
and the client gets the upstream's bytes except for each reader's documented additions.

The invariant of each reader, with F the figures, H the held `data: [DONE]` events (in
their order), and R the unterminated rest of the body (framing per streams.frame):

- SSE (generic, TGI, llama.cpp; OpenAI when nothing carries usage):
  out = the other events, unchanged, in order + (R == b"" ? `: emissions F` + H : H + R).
- OpenAI SSE, the client asked for usage: as SSE, except each usage-only chunk
  (`choices` empty, `usage` an object) is held; the last is re-emitted as
  `data: {...,"usage":{...,"emissions":F}}` just before H, an earlier one (a second
  usage chunk is not OpenAI's contract) re-emitted where the next one arrived.
- OpenAI SSE, the proxy asked for usage on the client's behalf: usage-only chunks are
  dropped, every other JSON event keeps its JSON minus `usage` (a `"usage":null` the
  proxy cannot cut textually may stay), non-JSON events are unchanged; then as SSE.
- Ollama NDJSON: every line unchanged, except the first compact `"done":true` line that
  parses, held to the end with `"emissions":F` as its last member; then the unterminated
  rest.
- JSON bodies (all dialects): read_body never raises on any bytes and any
  Content-Encoding, and only reads (the forwarder sends the body as it came).
- Requests: inspect_request never raises; the body sent upstream is the client's,
  except OpenAI streams where `stream_options.include_usage = true` is added.
"""

from __future__ import annotations

import gzip
from typing import Any, Callable

import orjson
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from proxy.dialects import dialect_for
from proxy.dialects.base import RequestInfo, ResponseReader

from . import fuzz
from .streams import (
    comment,
    data_of,
    frame,
    is_blank,
    is_done,
    llamacpp_final,
    llamacpp_token,
    ndjson_stream,
    openai_content,
    openai_content_with_usage,
    openai_usage_only,
    same_stream,
    splits,
    sse_stream,
    tgi_final,
    tgi_token,
)

FIGURES = {"energy_joules": 1.25, "co2e_grams": 0.5, "basis": "meter=fake; status=provisional"}
FUZZ = fuzz(150)


def ignore(count: int, at: float) -> None:
    return None


def read(reader: ResponseReader, chunks: list[bytes]) -> bytes:
    out = [reader.feed(chunk, float(i)) for i, chunk in enumerate(chunks)]
    reader.end()
    return b"".join(out) + reader.tail(FIGURES)


def reader_for(dialect: str, path: str, content_type: str, **info: Any) -> Callable[[], ResponseReader]:
    return lambda: dialect_for(dialect, path).reader(RequestInfo(stream=True, **info), content_type, ignore)


def check_split_invariant(make: Callable[[], ResponseReader], body: bytes, chunks: list[bytes], sse: bool = True) -> bytes:
    whole = make()
    expected = read(whole, [body])
    cut = make()
    got = read(cut, chunks)
    if sse:
        same_stream(got, expected)
    else:
        assert got == expected, "the output depends on where the reads were cut"
    assert (cut.work.prompt_tokens, cut.work.output_tokens) == (whole.work.prompt_tokens, whole.work.output_tokens)
    return expected


def end_of_stream(held: list[bytes], rest: bytes, figures: bytes) -> list[bytes]:
    """What follows the last passed event: the figures and the held events, or, when the
    body ends inside an event, the held events and that fragment (no figures: a terminator
    would make clients dispatch the fragment)."""
    if rest and not is_blank(rest):
        return [*held, rest]
    return [rest, figures, *held]


def sse_expected(body: bytes) -> bytes:
    events, rest = frame(body)
    held = [e for e in events if is_done(e)]
    passed = [e for e in events if not is_done(e)]
    return b"".join(passed + end_of_stream(held, rest, comment(FIGURES)))


# -- SSE readers without usage: generic, TGI, llama.cpp --------------------------------

SSE_READERS = {
    "generic": (reader_for("generic", "/anything", "text/event-stream"), sse_stream(openai_content, tgi_token)),
    "tgi": (reader_for("tgi", "/generate_stream", "text/event-stream"), sse_stream(tgi_token, tgi_final)),
    "llamacpp": (reader_for("llamacpp", "/completion", "text/event-stream"), sse_stream(llamacpp_token, llamacpp_final)),
}


@pytest.mark.parametrize("name", list(SSE_READERS))
@FUZZ
@given(data=st.data())
def test_sse_readers_pass_every_byte_and_place_figures_before_done(name: str, data: st.DataObject) -> None:
    make, streams = SSE_READERS[name]
    body = data.draw(streams, "body")
    chunks = data.draw(splits(body), "chunks")
    same_stream(check_split_invariant(make, body, chunks), sse_expected(body))


# -- OpenAI SSE ----------------------------------------------------------------------------

OPENAI_STREAM = sse_stream(openai_content, openai_content_with_usage, openai_usage_only)


def _is_json(data: bytes) -> bool:
    try:
        orjson.loads(data)
    except orjson.JSONDecodeError:
        return False
    return True


def usage_only(event: bytes) -> dict[str, Any] | None:
    data = data_of(event)
    if data is None or b'"usage":' not in data:
        return None
    try:
        chunk = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    if isinstance(chunk, dict) and isinstance(chunk.get("usage"), dict) and not chunk.get("choices"):
        return chunk
    return None


def reemit(chunk: dict[str, Any], figures: dict[str, Any] | None) -> bytes:
    if figures is not None:
        chunk = {**chunk, "usage": {**chunk["usage"], "emissions": figures}}
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


@FUZZ
@given(data=st.data())
def test_openai_stream_the_client_asked_usage_for_is_unchanged_but_the_usage_chunk(data: st.DataObject) -> None:
    body = data.draw(OPENAI_STREAM, "body")
    chunks = data.draw(splits(body), "chunks")
    out = check_split_invariant(reader_for("openai", "/v1/chat/completions", "text/event-stream", client_wants_usage=True), body, chunks)

    events, rest = frame(body)
    expected, held, last = [], [], None
    for event in events:
        chunk = usage_only(event)
        if is_done(event):
            held.append(event)
        elif chunk is not None:
            if last is not None:
                expected.append(reemit(last, None))
            last = chunk
        else:
            expected.append(event)
    if last is not None:
        expected.append(reemit(last, FIGURES))
        expected += end_of_stream(held, rest, b"")
    else:
        expected += end_of_stream(held, rest, comment(FIGURES))
    same_stream(out, b"".join(expected))


@FUZZ
@given(data=st.data())
def test_openai_stream_hides_the_usage_the_proxy_asked_for(data: st.DataObject) -> None:
    body = data.draw(OPENAI_STREAM, "body")
    chunks = data.draw(splits(body), "chunks")
    out = check_split_invariant(reader_for("openai", "/v1/chat/completions", "text/event-stream", client_wants_usage=False), body, chunks)

    events, rest = frame(body)
    kept = [e for e in events if not is_done(e) and usage_only(e) is None]
    tail = b"".join(end_of_stream([e for e in events if is_done(e)], rest, comment(FIGURES)))
    same_stream(out[len(out) - len(tail) :], tail)
    got, got_rest = frame(out[: len(out) - len(tail)])
    assert got_rest == b"" and len(got) == len(kept), (got, kept)
    for sent, original in zip(got, kept):
        data = data_of(original)
        if sent == original and (data is None or b'"usage":{' not in data.replace(b" ", b"") or not _is_json(data)):
            continue  # unchanged (no usage, a "usage":null left where it cannot be cut, or not JSON at all)
        before, after = orjson.loads(data), orjson.loads(data_of(sent))  # type: ignore[arg-type]
        assert "usage" in before and isinstance(after, dict) and "usage" not in after
        assert after == {k: v for k, v in before.items() if k != "usage"}
        assert not isinstance(before["usage"], dict) or before.get("choices")  # usage-only chunks are dropped


# -- Ollama NDJSON ---------------------------------------------------------------------------


def ndjson_expected(body: bytes) -> bytes:
    complete = body[: body.rfind(b"\n") + 1]
    rest = body[len(complete) :]
    pieces = complete.splitlines(keepends=True)

    def final(line: bytes) -> bool:
        if b'"done":true' not in line:
            return False
        try:
            value = orjson.loads(line)
        except orjson.JSONDecodeError:
            return False
        return isinstance(value, dict) and value.get("done") is True

    index = next((i for i, p in enumerate(pieces) if final(p)), None)
    if index is None:
        if not final(rest):
            return complete + rest
        line, rest, others = rest, b"", pieces
    else:
        line, others = pieces[index], pieces[:index] + pieces[index + 1 :]
    text = line.rstrip(b"\r\n")
    close = text.rfind(b"}")
    placed = text[:close] + b',"emissions":' + orjson.dumps(FIGURES) + text[close:] + line[len(text) :]
    assert orjson.loads(placed) == {**orjson.loads(line), "emissions": FIGURES}
    return b"".join(others) + placed + rest


@FUZZ
@given(data=st.data())
def test_ollama_ndjson_passes_every_line_and_puts_figures_in_the_done_line(data: st.DataObject) -> None:
    body = data.draw(ndjson_stream, "body")
    chunks = data.draw(splits(body), "chunks")
    out = check_split_invariant(reader_for("ollama", "/api/generate", "application/x-ndjson"), body, chunks, sse=False)
    assert out == ndjson_expected(body)


# -- JSON bodies and requests ------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
KEYS = st.sampled_from(
    ["model", "stream", "stream_options", "usage", "choices", "details", "timings", "prompt_eval_count", "eval_count",
     "prompt_eval_duration", "eval_duration", "tokens_predicted", "tokens_evaluated", "images", "data", "steps",
     "num_inference_steps", "width", "height", "batch_size", "n_iter", "n", "size", "prompt", "messages"]
)
SIZES = st.builds(lambda w, h: f"{w}x{h}", st.text(max_size=4), st.text(max_size=4))
VALUES = JSON | SIZES | st.dictionaries(
    st.sampled_from(["prompt_tokens", "completion_tokens", "input_tokens", "output_tokens", "generated_tokens", "prefill",
                     "prompt_n", "predicted_n", "prompt_ms", "predicted_ms", "include_usage"]),
    JSON, max_size=4,
)
DOCUMENTS = st.dictionaries(KEYS, VALUES, max_size=8)
BODIES = st.one_of(st.binary(max_size=64), DOCUMENTS.map(orjson.dumps), JSON.map(orjson.dumps))
ENCODINGS = st.sampled_from([None, "identity", "gzip", "deflate", "x-gzip", "br", "GZIP"])
DIALECT_PATHS = [
    ("openai", "/v1/chat/completions"), ("openai", "/v1/completions"), ("openai", "/v1/embeddings"),
    ("tgi", "/generate"), ("tgi", "/generate_stream"), ("ollama", "/api/chat"), ("ollama", "/v1/chat/completions"),
    ("llamacpp", "/completion"), ("diffusion", "/sdapi/v1/txt2img"), ("diffusion", "/v1/images/generations"),
    ("generic", "/whatever"),
]


def check_work(reader: ResponseReader) -> None:
    work = reader.work
    for count in (work.prompt_tokens, work.output_tokens):
        assert count is None or (isinstance(count, int) and count >= 0)
    assert isinstance(work.output_tokens_best(), int)


@fuzz(400)
@given(target=st.sampled_from(DIALECT_PATHS), body=BODIES, encoding=ENCODINGS)
def test_json_bodies_never_raise_and_are_only_read(target: tuple[str, str], body: bytes, encoding: str | None) -> None:
    dialect, path = target
    for payload in (body, gzip.compress(body)) if encoding in ("gzip", "x-gzip", "GZIP") else (body,):
        reader = dialect_for(dialect, path).reader(RequestInfo(), "application/json", ignore)
        before = bytes(payload)
        reader.read_body(payload, encoding)
        assert payload == before
        check_work(reader)


@fuzz(400)
@given(target=st.sampled_from(DIALECT_PATHS), body=st.one_of(st.none(), BODIES), method=st.sampled_from(["POST", "GET", "PUT"]))
@example(target=("diffusion", "/v1/images/generations"), body=b'{"size":"\xc2\xb2x512"}', method="POST")  # '²'.isdigit()
@example(target=("diffusion", "/sdapi/v1/txt2img"), body=b'{"width":1e308,"height":1e308,"steps":1e308}', method="POST")
def test_requests_never_raise_and_keep_their_body(target: tuple[str, str], body: bytes | None, method: str) -> None:
    dialect, path = target
    info = dialect_for(dialect, path).inspect_request(method, path, body)
    assert info.prompt_tokens_estimate >= 0
    assert info.work_units is None or info.work_units >= 0
    if info.body == body:
        return
    # The one rewrite: an OpenAI stream that did not ask for usage gets include_usage.
    assert dialect_for(dialect, path).name == "openai" and not info.client_wants_usage
    original, sent = orjson.loads(body), orjson.loads(info.body)  # type: ignore[arg-type]
    options = original.get("stream_options")
    assert "stream_options" not in original or (isinstance(options, dict) and "include_usage" not in options)
    assert sent == {**original, "stream_options": {**(options or {}), "include_usage": True}}
    # By insertion only: the client's bytes are all there, in order, around one insertion.
    assert body is not None and info.body is not None
    at = next((i for i, (a, b) in enumerate(zip(body, info.body)) if a != b), len(body))
    added = len(info.body) - len(body)
    assert info.body[:at] == body[:at] and info.body[at + added :] == body[at:]


# -- what the fuzzing found, pinned --------------------------------------------------------------


def _openai(wants_usage: bool) -> ResponseReader:
    return reader_for("openai", "/v1/chat/completions", "text/event-stream", client_wants_usage=wants_usage)()


def test_found_content_chunks_carrying_usage_are_never_held_back() -> None:
    """vLLM's continuous_usage_stats puts usage on every content chunk: all were held and
    only the last re-emitted, so the client lost every other token."""
    body = b"".join(
        b'data: {"choices":[{"index":0,"delta":{"content":"w%d"}}],"usage":{"prompt_tokens":3,"completion_tokens":%d}}\n\n' % (i, i)
        for i in range(1, 4)
    ) + b"data: [DONE]\n\n"
    reader = _openai(wants_usage=True)
    out = read(reader, [body])
    assert out == body.replace(b"data: [DONE]\n\n", comment(FIGURES) + b"data: [DONE]\n\n")
    assert (reader.work.prompt_tokens, reader.work.output_tokens) == (3, 3)


def test_found_a_second_usage_chunk_does_not_drop_the_first() -> None:
    first = b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}\n\n'
    second = b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":5}}\n\n'
    out = read(_openai(wants_usage=True), [first + second + b"data: [DONE]\n\n"])
    assert out.startswith(first) and out.count(b'"usage"') == 2 and b'"completion_tokens":5,"emissions"' in out


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        # [DONE] then an unterminated fragment: the fragment was written before [DONE], so
        # its line swallowed the `data:` and the client never saw the end of the stream.
        (b'data: {"a":1}\n\ndata: [DONE]\n\ndata: {"par', b'data: {"a":1}\n\ndata: [DONE]\n\ndata: {"par'),
        # A [DONE] event with another field after its data line was not recognised, so the
        # figures came after it, where clients have stopped reading.
        (b'data: {"a":1}\n\ndata: [DONE]\nid: 7\n\n', b'data: {"a":1}\n\n' + comment(FIGURES) + b"data: [DONE]\nid: 7\n\n"),
    ],
)
def test_found_done_handling(body: bytes, expected: bytes) -> None:
    assert read(SSE_READERS["generic"][0](), [body]) == expected


def test_found_a_blank_line_in_a_later_read_does_not_cost_the_figures() -> None:
    body = b'data: {"a":1}\n\ndata: [DONE]\n\n'
    whole = read(SSE_READERS["generic"][0](), [body + b"\n"])
    late = read(SSE_READERS["generic"][0](), [body, b"\n"])
    assert comment(FIGURES) in whole and comment(FIGURES) in late
