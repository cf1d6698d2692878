"""Incremental readers for the two stream framings: SSE events and NDJSON lines.

Both forward only whole events/lines (an event split across reads is held until it is
complete), take a fast path of one substring scan per read when nothing interesting
passes, and hold the final event(s) so the figures can be placed before or inside them.

An event or line never grows past `max_event_bytes` in memory: an upstream sending one
without end would otherwise be buffered whole (and copied on every read). Past the cap,
what is held goes out and the rest of the stream passes through as it comes, unread and
unchanged; the counts stop there and `work.unparsed` flags the figures.
"""

from __future__ import annotations

from typing import Any

import orjson

from proxy.dialects.base import ResponseReader

_LF2 = b"\n\n"
# An event ends at a blank line; the SSE spec allows LF, CRLF and bare CR line ends.
_TERMINATORS = (_LF2, b"\r\n\r\n", b"\r\r")


def _last_boundary(buf: bytes) -> int:
    """Index just past the last complete SSE event, or 0."""
    last = 0
    for terminator in _TERMINATORS:
        at = buf.rfind(terminator)
        if at >= 0 and at + len(terminator) > last:
            last = at + len(terminator)
    return last


def split_events(ready: bytes) -> list[bytes]:
    """Split complete SSE text into events, each keeping its own terminator bytes."""
    events: list[bytes] = []
    pos = 0
    end = len(ready)
    while pos < end:
        stop = -1
        for terminator in _TERMINATORS:
            at = ready.find(terminator, pos)
            if at >= 0 and (stop < 0 or at + len(terminator) < stop):
                stop = at + len(terminator)
        if stop < 0:
            events.append(ready[pos:])
            break
        events.append(ready[pos:stop])
        pos = stop
    return events


def event_data(event: bytes) -> bytes | None:
    """The data field of one SSE event (multiple data lines joined by LF), or None."""
    if event.startswith(b"data:") and event.count(b"data:") == 1:
        line = event[5:].rstrip(b"\r\n")
        if b"\n" not in line and b"\r" not in line:  # else other fields follow (id:, event:)
            return line[1:] if line.startswith(b" ") else line
    parts = []
    for line in event.splitlines():
        if line.startswith(b"data:"):
            value = line[5:]
            parts.append(value[1:] if value.startswith(b" ") else value)
    return b"\n".join(parts) if parts else None


def sse_comment(figures: dict[str, Any]) -> bytes:
    # A comment line is ignored by every SSE client: safe for strict parsers.
    return b": emissions " + orjson.dumps(figures) + b"\n\n"


class SseReader(ResponseReader):
    """Generic SSE: one data event ~ one token; figures as a comment before [DONE]."""

    streaming = True
    slow_markers: tuple[bytes, ...] = (b"[DONE]",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pending = b""
        self._held: list[bytes] = []
        self._leftover = b""
        self._blank = b""
        self._passthrough = False

    def feed(self, chunk: bytes, now: float) -> bytes:
        if self._passthrough:
            return chunk
        buf = self._pending + chunk if self._pending else chunk
        # Servers write whole events: a read that ends on a boundary needs no search.
        cut = len(buf) if buf.endswith(_LF2) else _last_boundary(buf)
        if cut == 0:
            if len(buf) > self.max_event_bytes:
                self._pending = b""
                return self._overflow(b"", buf)
            self._pending = buf
            return b""
        if cut == len(buf):
            ready = buf
            if self._pending:
                self._pending = b""
        else:
            ready, self._pending = buf[:cut], buf[cut:]
            if len(self._pending) > self.max_event_bytes:
                rest, self._pending = self._pending, b""
                return self._overflow(self._forward(ready, now), rest)
        return self._forward(ready, now)

    def _overflow(self, out: bytes, rest: bytes) -> bytes:
        """An event outgrew the cap: release what is held, pass everything on from here."""
        self._passthrough = True
        self.work.unparsed = True
        return out + self.release_held() + rest

    def release_held(self) -> bytes:
        """Events held for the tail, as they came (the stream goes unread from here)."""
        held, self._held = self._held, []
        return b"".join(held)

    def _forward(self, ready: bytes, now: float) -> bytes:
        """Complete events: the bytes to send for them now."""
        for marker in self.slow_markers:
            if marker in ready:
                return self._marked(ready, now)
        count = self.count_tokens(ready)
        if count:
            self.work.streamed_tokens += count
            self.tick(count, now)
        return ready

    def count_tokens(self, ready: bytes) -> int:
        """Tokens in complete events with no slow marker: one per data event here."""
        return ready.count(b"data:")

    def _marked(self, ready: bytes, now: float) -> bytes:
        """Complete events where a slow marker appears (subclasses may shortcut)."""
        return self._slow(ready, now)

    def _slow(self, ready: bytes, now: float) -> bytes:
        out = [self.on_event(event, now) for event in split_events(ready)]
        return b"".join(o for o in out if o)

    def on_event(self, event: bytes, now: float) -> bytes | None:
        """One complete event: bytes to forward (itself, changed, or None to hold)."""
        data = event_data(event)
        if data is None:
            return event
        if data.strip() == b"[DONE]":
            self._held.append(event)
            return None
        self.on_data(data, now)
        return event

    def on_data(self, data: bytes, now: float) -> None:
        self.work.streamed_tokens += 1
        self.tick(1, now)

    def end(self) -> None:
        # An unterminated last event: SSE clients drop it at EOF, so it passes as is and
        # no figures follow it (a terminator would make them dispatch it).
        if self._pending and not self._passthrough:
            pending, self._pending = self._pending, b""
            if not pending.strip(b"\r\n"):
                # Blank lines after the last event (one read later than its terminator):
                # nothing is cut off, so the figures still follow.
                self._blank = pending
                return
            self._leftover = pending
            try:
                data = event_data(self._leftover)
                if data is not None and data.strip() != b"[DONE]":
                    self.read_final_data(data)
            except Exception:  # a parse failure must never change the bytes
                pass

    def read_final_data(self, data: bytes) -> None:
        return None

    def tail(self, figures: dict[str, Any] | None) -> bytes:
        if self._passthrough:
            return b""  # the stream may have ended mid-event: nothing can follow it safely
        if self._leftover:
            # In their original order: a held [DONE] glued after the fragment would be
            # lost to the client (the fragment's line would swallow its `data:`).
            return b"".join(self._held) + self._leftover
        lead = sse_comment(figures) if figures is not None else b""
        return self._blank + lead + b"".join(self._held)


class NdjsonReader(ResponseReader):
    """NDJSON: one object per line; the final `done: true` line gets the figures."""

    streaming = True
    final_marker = b'"done":true'

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pending = b""
        self._final: bytes | None = None
        self._leftover = b""
        self._passthrough = False

    def feed(self, chunk: bytes, now: float) -> bytes:
        if self._passthrough:
            return chunk
        buf = self._pending + chunk if self._pending else chunk
        cut = buf.rfind(b"\n") + 1
        if cut == 0:
            if len(buf) > self.max_event_bytes:
                self._pending = b""
                return self._overflow(b"", buf)
            self._pending = buf
            return b""
        ready, self._pending = buf[:cut], buf[cut:]
        if len(self._pending) > self.max_event_bytes:
            rest, self._pending = self._pending, b""
            return self._overflow(self._forward(ready, now), rest)
        return self._forward(ready, now)

    def _overflow(self, out: bytes, rest: bytes) -> bytes:
        """A line outgrew the cap: release the held final line, pass everything on."""
        self._passthrough = True
        self.work.unparsed = True
        final, self._final = self._final, None
        return out + (final or b"") + rest

    def _forward(self, ready: bytes, now: float) -> bytes:
        """Complete lines: the bytes to send for them now."""
        if self.final_marker not in ready:
            count = ready.count(b"\n")
            self.work.streamed_tokens += count
            self.tick(count, now)
            return ready
        out = []
        for line in ready.splitlines(keepends=True):
            if self.final_marker in line and self._final is None and self._read_final(line):
                self._final = line
                continue
            if line.strip():
                self.work.streamed_tokens += 1
                self.tick(1, now)
            out.append(line)
        return b"".join(out)

    def _read_final(self, line: bytes) -> bool:
        try:
            data = orjson.loads(line)
        except orjson.JSONDecodeError:
            return False
        if not isinstance(data, dict) or data.get("done") is not True:
            return False
        self.read_json(data)
        return True

    def end(self) -> None:
        if self._pending and not self._passthrough:
            self._leftover, self._pending = self._pending, b""
            if self._final is None and self.final_marker in self._leftover and self._read_final(self._leftover):
                self._final, self._leftover = self._leftover, b""

    def tail(self, figures: dict[str, Any] | None) -> bytes:
        if self._final is None:  # (always so after an overflow: it went out then)
            return self._leftover
        line = self._final
        if figures is not None:
            body = line.rstrip(b"\r\n")
            ending = line[len(body) :]
            close = body.rfind(b"}")
            if close > 0:
                line = body[:close] + b',"emissions":' + orjson.dumps(figures) + body[close:] + ending
        return line + self._leftover
