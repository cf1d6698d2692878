"""What the engine learns online: the cost of work, paces from streams, prefill progress."""

from __future__ import annotations

import math
import random

import pytest

from proxy.attribution.learning import WorkCostLearner, WorkCosts, nnls
from proxy.attribution.prefill import PrefillProgress, queued_prompt_in
from proxy.attribution.split import split_priced
from proxy.attribution.timing import PaceLearner
from proxy.attribution.usage import RequestUsage


def test_nnls_keeps_coefficients_non_negative() -> None:
    # y = 2 x0 - 1 x1 unconstrained; the best non-negative fit drops x1.
    rows = [((1.0, 0.0), 2.0), ((0.0, 1.0), -1.0), ((1.0, 1.0), 1.0)]
    xx = [[sum(x[i] * x[j] for x, _ in rows) for j in range(2)] for i in range(2)]
    xy = [sum(x[i] * y for x, y in rows) for i in range(2)]
    theta, _ = nnls(xx, xy)
    assert theta[1] == 0.0 and theta[0] > 0


def _interval(rng: random.Random, costs: WorkCosts, noise: float, i: int = 0) -> tuple[float, float, float, float, float]:
    """(dynamic joules, prompt tokens, output tokens, decode seconds, sequence-seconds) of
    the i-th 0.1 s interval of a load that swings slowly (as traffic does), from known costs."""
    load = 0.5 + 0.5 * math.sin(i / 150)
    batch = max(0, round(rng.gauss(64 * load, 4)))
    prompt = rng.uniform(0, 500) if rng.random() < load else 0.0
    decode_seconds = 0.1 if batch else 0.0
    sequence_seconds = 0.1 * batch
    joules = costs.prompt_joules_per_token * prompt + costs.decode_joules(decode_seconds, sequence_seconds)
    return joules * rng.gauss(1.0, noise), prompt, 5.0 * batch, decode_seconds, sequence_seconds


def test_work_costs_are_learned_from_intervals() -> None:
    truth = WorkCosts(prompt_joules_per_token=0.1, fixed_watts=20.0, batch_watts=50.0, batch_exponent=0.5)
    learner = WorkCostLearner(fixed_prefill_weight=None, default_prefill_weight=0.1)
    rng = random.Random(7)
    assert learner.costs() is None  # nothing seen: the prefill weight rules
    for i in range(3000):
        joules, prompt, output, decoding, sequences = _interval(rng, truth, 0.05, i)
        learner.observe(0.1, joules, prompt, output, decoding, sequences)
    costs = learner.costs()
    assert costs is not None
    assert costs.prompt_joules_per_token == pytest.approx(0.1, rel=0.05)
    for batch in (1, 8, 64):  # decode power at any batch size, whatever the split of it
        expected = truth.decode_joules(1.0, float(batch))
        assert costs.decode_joules(1.0, float(batch)) == pytest.approx(expected, rel=0.1)
    assert learner.joules_per_output_token is not None and learner.joules_per_output_token > 0


def test_configured_prefill_weight_is_never_replaced() -> None:
    learner = WorkCostLearner(fixed_prefill_weight=0.3, default_prefill_weight=0.1)
    rng = random.Random(1)
    truth = WorkCosts(0.1, 0.0, 50.0, 0.5)
    for i in range(1000):
        learner.observe(0.1, *_interval(rng, truth, 0.0, i))
    assert learner.costs() is None and learner.fallback_weight == 0.3


def test_pace_from_streams() -> None:
    pace = PaceLearner(default_prefill_tokens_per_second=5000.0)
    assert pace.pace().prefill_tokens_per_second == 5000.0 and pace.pace().decode_seconds_per_token is None
    for i in range(100):
        queued = 0.0 if i % 2 else 1.0  # half waited a second in the queue first
        # 1000 prompt tokens at 2000 tokens/s, then 50 tokens 20 ms apart
        pace.observe_stream(1000, 0.0, queued + 0.5, queued + 0.5 + 49 * 0.02, 50)
    # The fastest first tokens are those that did not queue: their rate is the pace.
    assert pace.pace().prefill_tokens_per_second == pytest.approx(2000.0)
    assert pace.pace().decode_seconds_per_token == pytest.approx(0.02)


def _request(at: float, prompt: int) -> RequestUsage:
    return RequestUsage(group="g", opened_at=at, streaming=False, prompt_tokens_estimate=prompt)


def test_prefill_progress_is_first_come_first_served() -> None:
    progress = PrefillProgress()
    a, b = _request(0.0, 300), _request(0.0, 100)
    progress.enqueue(a)
    progress.enqueue(b)
    first = progress.advance(0.0, 0.1, 200.0)
    second = progress.advance(0.1, 0.2, 200.0)
    # a's 300 tokens: 200 in the first interval, 100 in the second; then b's 100.
    assert queued_prompt_in(a, first.start, first.end, 300) == pytest.approx(200)
    assert queued_prompt_in(a, second.start, second.end, 300) == pytest.approx(100)
    assert queued_prompt_in(b, second.start, second.end, 100) == pytest.approx(100)
    assert a.prefill_done_at == pytest.approx(0.15) and b.prefill_done_at == pytest.approx(0.2)
    # It never runs ahead of what has arrived.
    third = progress.advance(0.2, 0.3, 500.0)
    assert third.end == pytest.approx(400)


def test_progress_behind_is_spread_back_where_the_energy_was() -> None:
    progress = PrefillProgress()
    a = _request(0.0, 1000)
    progress.enqueue(a)
    spans = [progress.advance(t / 10, (t + 1) / 10, 0.0) for t in range(10)]  # measured nothing
    progress.done_by(a, 1.0)  # yet it was done by t = 1.0
    # The 1000 tokens are spread over the second it waited, not dumped at its end.
    placed = [queued_prompt_in(a, s.start, s.end, 1000) for s in spans]
    assert sum(placed) == pytest.approx(1000)
    assert max(placed) == pytest.approx(100, rel=0.01)
    assert a.prefill_done_at == 1.0


def test_priced_split_pays_prompts_then_shares_the_rest() -> None:
    shares, idle = split_priced(100.0, [30.0, 0.0, 0.0], [0.0, 1.0, 3.0], [0.1, 0.1, 0.1])
    assert idle == 0.0 and shares == pytest.approx([30.0, 17.5, 52.5])
    # An interval that drew less than its prompts' price scales them down; decode gets nothing.
    shares, _ = split_priced(20.0, [30.0, 10.0, 0.0], [0.0, 0.0, 3.0], [0.1, 0.1, 0.1])
    assert shares == pytest.approx([15.0, 5.0, 0.0])
    assert math.fsum(shares) == pytest.approx(20.0)
