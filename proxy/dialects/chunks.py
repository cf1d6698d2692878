"""Which OpenAI stream chunks carry a generated token (for servers that send no usage).

A stream's first chunk often carries only the role (`"delta":{"role":"assistant"}` or
`..."content":""`), and its last only the finish reason (`"delta":{}`): neither is a
token. A chunk bears content when a content, text or reasoning field is a non-empty
string, or when it carries tool-call deltas (each is generated text). This reads bytes,
not JSON: it runs per chunk on the hot path, and a wrong guess only moves a count that
the server's own usage overrides whenever it sends one.
"""

from __future__ import annotations

_TEXT_FIELDS = (b'"content":', b'"text":', b'"reasoning_content":', b'"reasoning":')
_TOOL_FIELDS = (b'"tool_calls":[', b'"tool_calls": [', b'"function_call":{', b'"function_call": {')


def _non_empty_string_after(data: bytes, key: bytes) -> bool:
    start = 0
    while True:
        at = data.find(key, start)
        if at < 0:
            return False
        pos = at + len(key)
        while pos < len(data) and data[pos] in b" \t":
            pos += 1
        # `"content":"x` (a string with at least one character) is text; `""` and null are not.
        if data[pos : pos + 1] == b'"' and data[pos + 1 : pos + 2] not in (b'"', b""):
            return True
        start = pos


_CONTENT_STARTS = (b'"content":"', b'"content": "')


def bears_content(data: bytes) -> bool:
    """True when one chunk's JSON carries generated text or a tool-call delta."""
    # The common case first (a text delta, compact JSON or Python's json.dumps): one scan.
    for start in _CONTENT_STARTS:
        at = data.find(start)
        if at >= 0 and data[at + len(start) : at + len(start) + 1] not in (b'"', b""):
            return True
    for key in _TOOL_FIELDS:
        if key in data:
            return True
    for key in _TEXT_FIELDS:
        if key in data and _non_empty_string_after(data, key):
            return True
    return False


def content_events(ready: bytes) -> int:
    """Content-bearing events among complete SSE events (`data:` lines, LF-framed or not)."""
    if ready.count(b"data:") == 1:  # one event per read: the usual case
        return int(bears_content(ready))
    count = 0
    for line in ready.splitlines():
        if line.startswith(b"data:") and bears_content(line):
            count += 1
    return count
