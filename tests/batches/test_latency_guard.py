"""The latency guard on scripted latencies and a fake clock: when batch lines pause, how
far their limit falls and how it climbs back, what counts as interactive traffic."""

from __future__ import annotations

import pytest

from proxy.batches.latency_guard import MIN_SAMPLES, LatencyGuard
from proxy.batches.settings import parse_batches
from proxy.errors import ConfigError

WINDOW = 2.0


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Script:
    """Feeds a guard one window of interactive latencies at a time."""

    def __init__(self, guard: LatencyGuard, clock: FakeClock) -> None:
        self.guard, self.clock, self.n = guard, clock, 0

    def window(self, latencies: list[float], upstream: str = "gpu-a", lines_in_flight: int | None = None) -> int:
        """Requests end within the window; at its end the runner asks: returns the lines allowed."""
        if lines_in_flight is not None:
            self.guard.lines_changed(lines_in_flight)
        for latency in latencies:
            self.n += 1
            self.guard.observe(f"r{self.n}", upstream, latency, batch_line=False)
        self.clock.t += WINDOW
        return self.guard.allowed_lines()

    def batch_line(self, upstream: str) -> None:
        self.n += 1
        self.guard.observe(f"r{self.n}", upstream, 99.0, batch_line=True)


def absolute(objective: float = 0.5, max_lines: int = 8, opened: bool = False) -> tuple[LatencyGuard, Script]:
    """`opened`: past slow start, at max_lines already."""
    clock = FakeClock()
    guard = LatencyGuard(max_lines, WINDOW, objective_seconds=objective, clock=clock, initial_limit=max_lines if opened else 1)
    return guard, Script(guard, clock)


FAST = [0.1] * 20
SLOW = [0.1] * 10 + [0.9] * 10  # p95 0.9 s


def test_slow_start_doubles_the_limit_until_a_breach_then_halves_it_and_adds_one_per_healthy_window() -> None:
    guard, script = absolute(max_lines=8)
    assert guard.allowed_lines() == 1  # no jump from idle to max_concurrency lines
    assert [script.window(FAST, lines_in_flight=n) for n in (1, 2, 4, 8)] == [2, 4, 8, 8]
    assert script.window(SLOW, lines_in_flight=8) == 0  # paused
    assert (guard.limit, guard.breaches) == (4, 1)
    assert script.window(SLOW) == 0  # still over: halved again, still paused
    assert (guard.limit, guard.breaches) == (2, 2)
    assert script.window(FAST, lines_in_flight=0) == 2  # back under: resumes at the halved limit
    assert [script.window(FAST, lines_in_flight=n) for n in (2, 3, 4, 5, 6, 7, 8)] == [3, 4, 5, 6, 7, 8, 8]


def test_the_limit_grows_only_in_windows_where_lines_ran_up_to_it() -> None:
    guard, script = absolute(max_lines=8)
    assert [script.window(FAST, lines_in_flight=0) for _ in range(5)] == [1] * 5  # no batch running: no evidence
    assert script.window(FAST, lines_in_flight=1) == 2
    assert script.window(FAST, lines_in_flight=1) == 2  # a batch's last line alone says nothing about 2
    assert script.window(FAST, lines_in_flight=2) == 4


def test_the_limit_never_falls_below_one_line() -> None:
    guard, script = absolute(max_lines=2)
    for _ in range(5):
        assert script.window(SLOW, lines_in_flight=1) == 0
    assert guard.limit == 1 and script.window(FAST) == 1


def test_a_few_slow_requests_are_no_verdict_and_no_traffic_is_healthy() -> None:
    guard, script = absolute(max_lines=4, opened=True)
    assert script.window([5.0] * (MIN_SAMPLES - 1), lines_in_flight=4) == 4  # below MIN_SAMPLES: no p95 to judge
    assert script.window([]) == 4 and guard.breaches == 0
    assert script.window([5.0] * MIN_SAMPLES) == 0


def test_slow_answers_while_no_line_runs_are_not_the_batches_doing() -> None:
    guard, script = absolute(max_lines=4, opened=True)
    assert script.window(SLOW, lines_in_flight=0) == 4 and guard.breaches == 0
    assert script.window(SLOW, lines_in_flight=4) == 0 and guard.breaches == 1
    assert script.window(SLOW, lines_in_flight=0) == 0  # lines in flight at the pause ended in it: still judged
    assert (guard.limit, guard.breaches) == (1, 2)
    assert script.window(SLOW) == 1 and guard.breaches == 2  # still slow with no line at all: not ours, resume


def test_each_request_counts_once_however_often_its_receipt_is_recorded() -> None:
    guard, script = absolute(max_lines=4, opened=True)
    for _ in range(MIN_SAMPLES * 3):  # provisional, then final, then a late prompt count
        guard.observe("same-receipt", "gpu-a", 5.0, batch_line=False)
    assert script.window([], lines_in_flight=4) == 4 and guard.breaches == 0


def test_batch_lines_own_latency_is_not_interactive_traffic() -> None:
    guard, script = absolute(max_lines=4, opened=True)
    for _ in range(MIN_SAMPLES * 2):
        script.batch_line("gpu-a")  # slow lines (99 s each): what batches are for
    assert script.window([], lines_in_flight=4) == 4 and guard.breaches == 0


def test_only_upstreams_that_batch_lines_use_are_judged() -> None:
    guard, script = absolute(max_lines=4, opened=True)
    script.batch_line("gpu-a")
    assert script.window(SLOW, upstream="gpu-b", lines_in_flight=4) == 4  # slow, but no batch line runs there
    assert script.window(SLOW, upstream="gpu-a") == 0
    assert guard.last_p95_seconds["gpu-a"] == pytest.approx(0.9)


def test_the_relative_objective_compares_with_latency_measured_while_no_line_ran() -> None:
    clock = FakeClock()
    guard = LatencyGuard(4, WINDOW, objective_ratio=1.1, clock=clock, initial_limit=4)
    script = Script(guard, clock)
    assert script.window([0.100] * 20, lines_in_flight=0) == 4  # clean window: the baseline
    assert guard.baseline_seconds("gpu-a") == pytest.approx(0.100)
    assert script.window([0.105] * 20, lines_in_flight=4) == 4  # +5 %: within 10 %
    assert script.window([0.125] * 20) == 0  # +25 %: paused, halved
    assert guard.limit == 2
    assert guard.baseline_seconds("gpu-a") == pytest.approx(0.100)  # windows with lines never move it


def test_without_a_baseline_the_guard_pauses_one_window_to_measure_traffic_alone() -> None:
    clock = FakeClock()
    guard = LatencyGuard(4, WINDOW, objective_ratio=1.1, clock=clock, initial_limit=4)
    script = Script(guard, clock)
    assert script.window([0.2] * 20, lines_in_flight=4) == 0  # lines ran all along: no baseline, measure
    assert guard.breaches == 0
    assert script.window([0.15] * 20, lines_in_flight=0) == 0  # lines in flight at the pause ended in it: not alone
    assert guard.baseline_seconds("gpu-a") is None
    assert script.window([0.1] * 20) == 4  # measured alone: resume at the limit
    assert guard.baseline_seconds("gpu-a") == pytest.approx(0.1)
    assert script.window([0.2] * 20, lines_in_flight=4) == 0 and guard.breaches == 1  # 2x alone: a breach


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("interactive_latency_objective_seconds", 0),
        ("interactive_latency_objective_seconds", "fast"),
        ("interactive_latency_objective_ratio", 1.0),
        ("interactive_latency_objective_ratio", True),
        ("interactive_latency_window_seconds", -1),
    ],
)
def test_bad_guard_settings_name_their_key(key: str, value: object) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_batches({key: value})
    assert f"batches.{key}" in str(caught.value)


def test_guard_settings_defaults_and_off() -> None:
    settings = parse_batches({})
    assert settings.interactive_latency_objective_ratio == 1.05 and settings.latency_guarded
    off = parse_batches({"interactive_latency_objective_ratio": 0})
    assert off.interactive_latency_objective_ratio is None and not off.latency_guarded
    both = parse_batches({"interactive_latency_objective_seconds": 0.25, "interactive_latency_window_seconds": 5})
    assert (both.interactive_latency_objective_seconds, both.interactive_latency_window_seconds) == (0.25, 5.0)
