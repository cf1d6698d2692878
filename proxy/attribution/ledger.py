"""An unsettled interval's work as known since the engine first split it.

The engine splits each metered interval once with the work known then, and again when
it settles. In between, its members close one by one and report their work, and the
figure each reads at its end (provisional.py) should count what is known by then. The
ledger keeps the interval's work totals so that one member's work can be replaced and
its share re-priced in O(1), by the rules of the engine's split (engine._works).
"""

from __future__ import annotations

REPRICE_FRACTION = 0.01
"""An interval's prices are evaluated again when its work totals moved by more than this."""


Row = tuple[float, float, float, float, bool]
"""prompt tokens, raw output, context tokens per output token, batch seconds, output known."""


class Ledger:
    """An unsettled interval's work as known since it was first split, kept so that a
    member's share can be re-priced in O(1) when it closes (engine._works' rules).

    Per member (a Row): prompt tokens, raw output (a stream's tokens, a closed request's
    output spread over its decode, a work unit count; an open non-streamed request's is
    not known yet), context tokens per output token, seconds in the decode batch, and
    whether its output is known. Where a non-streamed request decodes (its tokens are
    not seen) or no token was seen, every sequence in the batch makes one token per step:
    decoders' output is their seconds in the batch at the batch's token rate, measured on
    the sequences whose output is known (an open request's seconds count as decoding at
    that rate, not at none), which sharpens as members close."""

    __slots__ = (
        "rows", "prompt", "units", "known", "seconds", "known_seconds", "raw_context", "step_context",
        "blind", "fallback_tokens_per_second", "priced_with", "priced_at",
    )  # fmt: skip

    def __init__(self, rows: list[Row], blind: bool, fallback_tokens_per_second: float) -> None:
        self.rows = rows
        self.blind = blind
        self.fallback_tokens_per_second = fallback_tokens_per_second
        self.prompt = self.units = self.known = self.seconds = self.known_seconds = 0.0
        self.raw_context = self.step_context = 0.0
        for row in rows:
            self._add(row, 1.0)
        self.priced_with: object | None = None
        """The cost model's fit the interval's prices came from (None: price again)."""
        self.priced_at = self.totals()
        """The work totals the interval's prices were evaluated at."""

    def moved(self, totals: tuple[float, float, float, float]) -> bool:
        """Whether the work moved enough since the prices were evaluated to price again
        (prices depend on the rates only through the curve's slope: a per cent of work
        moves them by less than that)."""
        return any(abs(a - b) > REPRICE_FRACTION * max(abs(a), abs(b)) for a, b in zip(totals, self.priced_at))

    def _add(self, row: Row, sign: float) -> None:
        prompt, raw, context, decoding, seen = row
        self.prompt += sign * prompt
        if decoding > 0:
            self.known += sign * raw
            self.seconds += sign * decoding
            if seen:
                self.known_seconds += sign * decoding
            self.raw_context += sign * raw * context
            self.step_context += sign * decoding * context
        else:
            self.units += sign * raw

    def replace(self, i: int, row: Row) -> bool:
        """A member's row as known now; whether it changed."""
        old = self.rows[i]
        if row == old:
            return False
        self._add(old, -1.0)
        self._add(row, 1.0)
        self.rows[i] = row
        return True

    def by_steps(self) -> bool:
        return self.blind or self.known + self.units <= 0

    def tokens_per_batch_second(self) -> float:
        if self.known > 0 and self.known_seconds > 0:
            return self.known / self.known_seconds
        return self.fallback_tokens_per_second

    def work(self, i: int) -> tuple[float, float, float, float]:
        """Member i's (prompt, output, context read, batch seconds), as the split counts them."""
        prompt, raw, context, decoding, _ = self.rows[i]
        if decoding <= 0:
            return (prompt, raw, 0.0, 0.0)
        output = decoding * self.tokens_per_batch_second() if self.by_steps() else raw
        return (prompt, output, output * context, decoding)

    def totals(self) -> tuple[float, float, float, float]:
        if self.by_steps():
            rate = self.tokens_per_batch_second()
            return (self.prompt, self.units + rate * self.seconds, rate * self.step_context, self.seconds)
        return (self.prompt, self.units + self.known, self.raw_context, self.seconds)
