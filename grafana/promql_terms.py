"""Split a PromQL expression at its top level: `and`/`or`/`unless` operands and comparisons.

Used by grafana/generate.py (a Prometheus alert `VALUE > 6 and VALUE2 > 6` becomes
Grafana queries, reduces and thresholds) and by tests/metrics (an alert expression
returns nothing while it is not firing, so its value sides are what must return data).
Only the top level is split: parentheses, braces, brackets and strings are skipped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

COMPARISONS = ("==", "!=", ">=", "<=", ">", "<")
SET_OPERATORS = ("and", "or", "unless")
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")
_MODIFIER = re.compile(r"\s*(bool\s+)?(on|ignoring)\s*\(([^)]*)\)\s*((group_left|group_right)\s*(\([^)]*\))?)?", re.IGNORECASE)


@dataclass(frozen=True)
class Term:
    """One operand of the top-level set operators: `value`, or `value op threshold`."""

    value: str
    op: str | None = None
    right: str | None = None
    """The right side of the comparison (a number for alert thresholds)."""

    @property
    def threshold(self) -> float | None:
        if self.right is not None and _NUMBER.match(self.right):
            return float(self.right)
        return None


def _top_level(expr: str) -> list[tuple[int, int]]:
    """(start, end) of every character run at nesting depth 0, outside strings."""
    runs: list[tuple[int, int]] = []
    depth = 0
    quote: str | None = None
    start = 0
    i = 0
    while i < len(expr):
        ch = expr[i]
        if quote:
            if ch == "\\":
                i += 2
                continue
            if ch == quote:
                quote = None
                start = i + 1
        elif ch in "\"'`":
            if depth == 0 and i > start:
                runs.append((start, i))
            quote = ch
        elif ch in "([{":
            if depth == 0 and i > start:
                runs.append((start, i))
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth == 0:
                start = i + 1
        i += 1
    if depth == 0 and quote is None and start < len(expr):
        runs.append((start, len(expr)))
    return runs


def _find_top(expr: str, pattern: re.Pattern[str]) -> list[re.Match[str]]:
    found = []
    for start, end in _top_level(expr):
        found += list(pattern.finditer(expr, start, end))
    return found


_SET_OP = re.compile(r"(?<![\w:])(and|or|unless)(?![\w:])", re.IGNORECASE)
_COMPARE = re.compile(r"==|!=|>=|<=|(?<![=!<>])>(?!=)|(?<![=!<>])<(?!=)")


def split_set_operators(expr: str) -> list[str]:
    """The operands of top-level `and`/`or`/`unless`, with their on()/ignoring() dropped."""
    parts: list[str] = []
    last = 0
    for match in _find_top(expr, _SET_OP):
        parts.append(expr[last : match.start()])
        modifier = _MODIFIER.match(expr, match.end())
        last = modifier.end() if modifier and modifier.group(2) else match.end()
    parts.append(expr[last:])
    return [p.strip() for p in parts if p.strip()]


def split_comparison(expr: str) -> Term:
    """`a > b` -> Term(a, '>', b); an expression without a top-level comparison -> Term(expr)."""
    matches = _find_top(expr, _COMPARE)
    if not matches:
        return Term(expr.strip())
    match = matches[0]
    right = expr[match.end() :]
    modifier = re.match(r"\s*bool\b", right)
    if modifier:
        right = right[modifier.end() :]
    grouping = _MODIFIER.match(right)
    if grouping and grouping.group(2):
        right = right[grouping.end() :]
    return Term(expr[: match.start()].strip(), match.group(0), right.strip())


def terms(expr: str) -> list[Term]:
    """Every top-level operand of `expr`, each split at its comparison."""
    return [split_comparison(part) for part in split_set_operators(expr)]


def value_expressions(expr: str) -> list[str]:
    """The sub-expressions that must return data for `expr` to be able to: both sides of
    each comparison (unless a plain number), each operand of and/or/unless."""
    values: list[str] = []
    for term in terms(expr):
        values.append(term.value)
        if term.right is not None and term.threshold is None:
            values.append(term.right)
    return values
