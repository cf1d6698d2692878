"""Stream request bodies reach the upstream as the client wrote them, plus only the bytes
that ask for usage (issue 13 row 9): big integers, exponents, duplicate keys, key order
and spacing are the client's. Checked against a real upstream that records the bytes."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.dialects import dialect_for

from .support import CHAT, HostileProxy, raw_request

ASK = b'"stream_options":{"include_usage":true},'
HEAD = b'{"model":"m","stream":true,'
TAIL = b'"messages":[{"role":"user","content":"hi"}]}'

# (client body, what the upstream must receive)
CASES = [
    pytest.param(
        b'{"model":"m","stream":true,"seed":123456789012345678901234567890,"temperature":1e0,' + TAIL,
        b'{' + ASK + b'"model":"m","stream":true,"seed":123456789012345678901234567890,"temperature":1e0,' + TAIL,
        id="big-int-and-exponent",
    ),
    pytest.param(
        b'{"model":"m","stream":true,"n":1,"n":2,"top_p":0.50,' + TAIL,
        b'{' + ASK + b'"model":"m","stream":true,"n":1,"n":2,"top_p":0.50,' + TAIL,
        id="duplicate-keys",
    ),
    pytest.param(
        b'  {\n  "stream" : true ,\n  "model":"m", ' + TAIL,
        b'  {' + ASK + b'\n  "stream" : true ,\n  "model":"m", ' + TAIL,
        id="spacing",
    ),
    pytest.param(
        HEAD + b'"stream_options":{"continuous_usage_stats":true},' + TAIL,
        HEAD + b'"stream_options":{"include_usage":true,"continuous_usage_stats":true},' + TAIL,
        id="options-without-include-usage",
    ),
    pytest.param(
        HEAD + b'"stream_options": { },' + TAIL,
        HEAD + b'"stream_options": {"include_usage":true },' + TAIL,
        id="empty-options",
    ),
    pytest.param(
        HEAD + b'"stream_options":{"a":1},"x":{"stream_options":{}},"stream_options":{"b":"}"},' + TAIL,
        HEAD + b'"stream_options":{"a":1},"x":{"stream_options":{}},"stream_options":{"include_usage":true,"b":"}"},' + TAIL,
        id="duplicate-options-the-last-wins",
    ),
    pytest.param(
        HEAD + b'"stream\\u005foptions":{"a":1},' + TAIL,
        HEAD + b'"stream\\u005foptions":{"include_usage":true,"a":1},' + TAIL,
        id="escaped-key",
    ),
]
# The client chose: nothing changes, not even a byte.
UNTOUCHED = [
    pytest.param(HEAD + b'"stream_options":{"include_usage":false},"seed":1e0,' + TAIL, id="include-usage-false"),
    pytest.param(HEAD + b'"stream_options":{"include_usage":true},"seed":123456789012345678901234567890,' + TAIL, id="include-usage-true"),
    pytest.param(HEAD + b'"stream_options":null,' + TAIL, id="options-not-an-object"),
    pytest.param(b'{"model":"m","stream":false,"seed":123456789012345678901234567890,' + TAIL, id="not-a-stream"),
]


@pytest.mark.parametrize(("body", "expected"), CASES)
async def test_the_upstream_gets_the_client_bytes_plus_the_usage_request(hostile_proxy: HostileProxy, body: bytes, expected: bytes) -> None:
    response = await raw_request(hostile_proxy.port, "POST", CHAT.encode(), [], body)
    assert response.status == 200, response.raw
    assert hostile_proxy.recorder.bodies[-1] == expected
    assert b'"usage"' not in response.body  # the client did not ask: it sees no usage
    await hostile_proxy.after_attack()


@pytest.mark.parametrize("body", UNTOUCHED)
async def test_a_body_where_the_client_chose_arrives_byte_identical(hostile_proxy: HostileProxy, body: bytes) -> None:
    response = await raw_request(hostile_proxy.port, "POST", CHAT.encode(), [], body)
    assert response.status == 200, response.raw
    assert hostile_proxy.recorder.bodies[-1] == body


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=200, deadline=None)
@given(extra=st.dictionaries(st.text(max_size=10), json_values, max_size=5), options=st.none() | st.dictionaries(st.text(max_size=8), json_values, max_size=3), indent=st.booleans())
def test_any_stream_body_is_only_inserted_into(extra: dict[str, object], options: dict[str, object] | None, indent: bool) -> None:
    data = {**{k: v for k, v in extra.items() if k != "stream_options"}, "stream": True}
    if options is not None:
        data["stream_options"] = options
    body = orjson.dumps(data, option=orjson.OPT_INDENT_2 if indent else 0)
    info = dialect_for("openai", CHAT).inspect_request("POST", CHAT, body)
    sent = info.body
    assert sent is not None
    wants = isinstance(options, dict) and options.get("include_usage") is True
    assert info.client_wants_usage is wants
    if options is not None and "include_usage" in options:
        assert sent is body
        return
    parsed = orjson.loads(sent)
    assert parsed["stream_options"]["include_usage"] is True
    assert parsed == {**data, "stream_options": {**(options or {}), "include_usage": True}}
    at = next((i for i, (a, b) in enumerate(zip(body, sent)) if a != b), len(body))
    added = len(sent) - len(body)
    assert sent[:at] == body[:at] and sent[at + added :] == body[at:]
