"""What the engine learns online: the cost function and its AS prices, idle power, paces
from streams, prefill progress."""

from __future__ import annotations

import json
import math
import random
from typing import Callable

import pytest

from proxy.attribution.costmodel import CostModel, Fit, Rates, nnls, prediction_error
from proxy.attribution.learning import IdlePowerLearner
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


def _interval(rng: random.Random, i: int, power: Callable[[Rates], float]) -> tuple[float, Rates]:
    """(dynamic joules, rates) of the i-th 0.05 s interval of a load that swings slowly
    (as traffic does), with prompts in bursts."""
    load = 0.5 + 0.5 * math.sin(i / 300)
    batch = max(0.0, rng.gauss(40 * load, 3))
    prompt = rng.uniform(500, 5000) if rng.random() < 0.3 * load else 0.0
    rates = Rates(prompt, 45.0 * batch, 45.0 * batch * 1500, batch)
    return power(rates) * 0.05 * rng.gauss(1.0, 0.02), rates


def _learn(power: Callable[[Rates], float]) -> CostModel:
    model = CostModel()
    rng = random.Random(7)
    for i in range(12000):  # ten minutes of 50 ms intervals
        joules, rates = _interval(rng, i, power)
        model.observe(0.05, joules, rates)
    assert model.ready
    return model


def test_separable_costs_are_learned_and_priced_by_their_own_terms() -> None:
    # 0.05 J per prompt token; decode 30 W x batch ** 0.5: a prompt pays 0.05 J, the
    # batch's power is shared by its sequences (AS of a separable sum).
    model = _learn(lambda r: 0.05 * r.prompt_per_second + 30.0 * math.sqrt(r.batch))
    assert model.fit is not None and math.isinf(model.fit.saturation_watts)
    at = Rates(2000.0, 45.0 * 20, 45.0 * 20 * 1500, 20.0)
    prices = model.prices(at)
    assert prices.prompt == pytest.approx(0.05, rel=0.05)
    decode_watts = prices.joules(0.0, at.output_per_second, at.context_per_second, at.batch)
    assert decode_watts == pytest.approx(30.0 * math.sqrt(20.0), rel=0.05)


def test_saturating_curve_prices_every_unit_of_work_alike() -> None:
    # One curve of total work (prompt tokens weigh 0.2 of an output token): AS gives
    # every unit the same price, so a prompt token costs 0.2 of an output token.
    def curve(r: Rates) -> float:
        units = 0.2 * r.prompt_per_second + r.output_per_second
        return 800.0 * -math.expm1(units / 800.0 * -1.0)

    model = _learn(curve)
    assert model.fit is not None and not math.isinf(model.fit.saturation_watts)
    at = Rates(2000.0, 45.0 * 20, 45.0 * 20 * 1500, 20.0)
    prices = model.prices(at)
    per_output = prices.joules(0.0, at.output_per_second, at.context_per_second, at.batch) / at.output_per_second
    assert prices.prompt / per_output == pytest.approx(0.2, rel=0.15)


def test_aumann_shapley_prices_add_up_to_the_power() -> None:
    for s in (math.inf, 400.0, -400.0):
        fit = Fit((80.0, 200.0, 30.0, 25.0, 3.0, 10.0), s)
        at = Rates(3000.0, 1200.0, 2.5e6, 25.0)
        prices = fit.prices(at)
        total = prices.joules(at.prompt_per_second, at.output_per_second, at.context_per_second, at.batch)
        if math.isinf(s):
            assert total == pytest.approx(fit.power_watts(at), rel=1e-9)
        else:  # the quartic-root term is the separable candidate's only (masked here)
            masked = Fit(fit.theta[:5] + (0.0,), s)
            prices = masked.prices(at)
            total = prices.joules(at.prompt_per_second, at.output_per_second, at.context_per_second, at.batch)
            assert total == pytest.approx(masked.power_watts(at), rel=1e-3)


def test_cost_model_state_round_trips() -> None:
    model = _learn(lambda r: 0.05 * r.prompt_per_second + 30.0 * math.sqrt(r.batch))
    restored = CostModel()
    assert restored.load(json.loads(json.dumps(model.state())))
    assert restored.fit == model.fit and restored.blocks == model.blocks and restored.ready
    at = Rates(1000.0, 500.0, 1e6, 10.0)
    assert restored.prices(at) == model.prices(at)
    assert not CostModel().load({"terms": ["other"]})  # another layout: ignored, not half-loaded


def test_a_restored_cost_model_learns_on_as_the_one_saved() -> None:
    """A restart between two blocks: the restored model's next fits read the same window
    (the seconds before the restart) and close its blocks at the same times."""

    def power(r: Rates) -> float:
        return 300.0 * (1.0 - math.exp(-(0.08 * r.prompt_per_second + 2.5 * r.output_per_second / 45.0) / 300.0))

    model = CostModel()
    rng = random.Random(11)
    for i in range(6037):  # five minutes, and a block part way
        joules, rates = _interval(rng, i, power)
        model.observe(0.05, joules, rates)
    restored = CostModel()
    assert restored.load(json.loads(json.dumps(model.state())))
    fits = []
    for i in range(6037, 6037 + 400):  # the next 20 s: four refits
        joules, rates = _interval(rng, i, power)
        model.observe(0.05, joules, rates)
        restored.observe(0.05, joules, rates)
        fits.append((model.fit, restored.fit))
    assert model.blocks == restored.blocks
    for saved, again in fits:
        assert saved is not None and again is not None
        assert again == saved


def test_idle_power_is_robust_to_stale_reads_and_noise() -> None:
    learner = IdlePowerLearner()
    rng = random.Random(3)
    pending = 0.0
    for _ in range(400):  # 20 s of 50 ms intervals at 70 W, noisy, some reads stale
        pending += 70.0 * 0.05 * rng.gauss(1.0, 0.03)
        if rng.random() < 0.1:
            learner.observe(0.0, 0.05)  # stale: no energy now, twice as much next time
            continue
        learner.observe(pending, 0.05)
        pending = 0.0
    assert learner.current_watts() == pytest.approx(70.0, rel=0.02)
    assert IdlePowerLearner(prior_watts=65.0).current_watts() == 65.0  # a device prior before any data


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


def test_prompt_weight_is_identified_on_a_server_that_is_saturated_most_of_the_time() -> None:
    # A curve that saturates at 280 W, prompts weighing 0.064 of an output token, and a
    # load that swings over 30 s as the bench's traffic does: near the ceiling power
    # hardly moves with work, so the weight comes from the swings' low parts. With
    # refits on 20 s windows the swings averaged out (0.050 was learned here; 0.11 for
    # 0.064 in a bench seed).
    weight = 0.064

    def curve(r: Rates) -> float:
        units = weight * r.prompt_per_second + r.output_per_second
        return 280.0 * -math.expm1(-units / 280.0)

    rng = random.Random(11)
    model = CostModel()
    for i in range(6000):  # five minutes of 50 ms intervals
        load = 0.55 - 0.45 * math.cos(2 * math.pi * i / 600)
        batch = max(0.0, rng.gauss(60 * load, 3))
        prompt = rng.uniform(500, 8000) if rng.random() < 0.4 * load else 0.0
        rates = Rates(prompt, 30.0 * batch, 30.0 * batch * 1500, batch)
        model.observe(0.05, curve(rates) * 0.05 * rng.gauss(1.0, 0.02), rates)
    assert model.fit is not None and not math.isinf(model.fit.saturation_watts)
    at = Rates(3000.0, 30.0 * 40, 30.0 * 40 * 1500, 40.0)
    prices = model.prices(at)
    per_output = prices.joules(0.0, at.output_per_second, at.context_per_second, at.batch) / at.output_per_second
    assert prices.prompt / per_output == pytest.approx(weight, rel=0.15)


def test_idle_power_is_known_only_once_configured_learned_or_given_by_the_device() -> None:
    learner = IdlePowerLearner()
    assert not learner.known  # the stand-in (the lowest recent power) is no idle power
    for _ in range(3):
        learner.observe(70.0, 1.0)
    assert learner.known
    assert IdlePowerLearner(fixed_watts=70.0).known and IdlePowerLearner(prior_watts=65.0).known


def test_candidates_are_compared_on_half_seconds_where_token_timing_is_noise() -> None:
    # Steps of 33 ms stream their tokens: a 50 ms sub-block sees one or two steps' worth
    # (40 or 80 tokens here), while the power of a saturated device is flat at 200 W.
    # The right curve predicts the power of the tokens seen; a flat fit (a constant per
    # sequence in the batch, what a separable candidate makes of saturation) predicts
    # 200 W. Over half seconds the token counts even out and the curve is as good; at
    # 50 ms the flat fit looked far better and was chosen.
    subs, curve_watts, flat_watts = [], [], []
    for i in range(100):  # one 5 s block of 50 ms sub-blocks
        tokens = 80.0 if i % 2 == 0 else 40.0
        rates = Rates(0.0, tokens / 0.05, 0.0, 20.0)
        subs.append([0.05, 200.0 * 0.05, *(f * 0.05 for f in rates.features())])
        # Power 200 W at the mean rate (1200 tokens/s); the curve's local slope there is
        # 0.03 W per token/s.
        curve_watts.append(200.0 + 0.03 * (rates.output_per_second - 1200.0))
        flat_watts.append(200.0 + 1.0)  # a watt off
    assert prediction_error(subs, curve_watts) < prediction_error(subs, flat_watts)
