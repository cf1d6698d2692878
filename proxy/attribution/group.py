"""What the engine keeps per device group: its learners, the requests in flight, and the
meter intervals not yet settled (engine.py advances them; provisional.py reads them)."""

from __future__ import annotations

from array import array
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Mapping

from proxy.attribution.costmodel import CostModel, Prices, Rates
from proxy.attribution.learning import IdlePowerLearner
from proxy.attribution.ledger import Ledger
from proxy.attribution.prefill import PrefillProgress, ProgressSpan
from proxy.attribution.steps import PrefillSteps, StepEnds, step_prices
from proxy.attribution.timing import PaceLearner
from proxy.attribution.usage import RequestUsage

DEFAULT_PREFILL_WEIGHT = 0.1
"""A prompt token costs about a tenth of an output token (batched prefill is compute
bound and fast; decode is memory bound). Used until the group's costs are learned, or
configured (then always)."""
DEFAULT_PREFILL_TOKENS_PER_SECOND = 5000.0
"""Until learned from streams: how long a prompt of n tokens takes to prefill."""
DEFAULT_DECODE_SECONDS_PER_TOKEN = 0.03
"""Until learned from streams: a decoding sequence's time per output token."""
STATE_VERSION = 1
"""Of learned_state's layout; a saved state of another version is learned again."""


@dataclass(slots=True, eq=False)
class Interval:
    t0: float
    t1: float
    dynamic_joules: float
    weight: float
    members: list[RequestUsage]
    presence: array  # seconds present, per member
    binned: array  # output tokens seen in the interval, per member (streams)
    estimates: array  # dynamic joules credited as estimates, per member
    contexts: array  # tokens in each member's KV cache (streams: as sampled; others: refined later)
    progress: ProgressSpan  # the group's prefill progress at t0 and t1
    prices: Prices | None = None  # AS prices at the interval's rates (once the model is learned)
    works: list[tuple[float, float, float, float]] = field(default_factory=list)
    """Per member at the last split: prompt tokens, output tokens, context tokens read,
    seconds in the decode batch."""
    ledger: Ledger | None = None
    """The work as known since, for end-of-response figures (provisional.py)."""
    tokens_per_batch_second: float = 1.0 / DEFAULT_DECODE_SECONDS_PER_TOKEN
    uncovered: int = 0
    """Members not yet closed and covered by a sample; the interval settles at 0."""


@dataclass(slots=True)
class GroupTotals:
    measured_joules: float = 0.0
    idle_joules: float = 0.0
    attributed_joules: float = 0.0
    """Final request energy: static shares plus settled dynamic shares."""
    idle_seconds: float = 0.0


@dataclass(slots=True, eq=False)
class Group:
    name: str
    devices: tuple[str, ...]
    idle: IdlePowerLearner
    model: CostModel
    fixed_prefill_weight: float | None
    prefill_weight: float = DEFAULT_PREFILL_WEIGHT
    """The latest settled interval's joules per prompt token over joules per output token."""
    pace: PaceLearner = field(default_factory=lambda: PaceLearner(DEFAULT_PREFILL_TOKENS_PER_SECOND))
    prefill: PrefillProgress = field(default_factory=PrefillProgress)
    open: dict[RequestUsage, None] = field(default_factory=dict)
    """Requests in flight, in arrival order: a set iterates in an order that follows
    memory addresses, and the splits' float sums would follow it."""
    closed_since_sample: list[RequestUsage] = field(default_factory=list)
    last_t: float | None = None
    last_joules: float = 0.0
    last_power_watts: float = 0.0
    step_ends: StepEnds = field(default_factory=StepEnds)
    """When streams' tokens passed: the server's step ends (steps.py)."""
    prefill_steps: PrefillSteps = field(init=False)
    totals: GroupTotals = field(default_factory=GroupTotals)
    recent: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=64))
    """(seconds, joules) of the latest intervals, for the current power (provisional.py)."""

    def __post_init__(self) -> None:
        self.prefill_steps = PrefillSteps(self.step_ends)

    def prices_over(self, t0: float, t1: float, rates: Rates) -> Prices:
        """The learned cost function's AS prices for [t0, t1], step by step where the
        streams show the steps (steps.step_prices)."""
        fastest = self.pace.pace().fastest_decode_seconds_per_token
        around = self.step_ends.around(t0, t1)
        return step_prices(self.model.prices, t0, t1, around, fastest, rates, self.prefill_steps.seconds_per_token())

    def learned_state(self) -> dict[str, Any]:
        """What the group learned (idle power, cost model, paces, steps), JSON-able."""
        return {
            "version": STATE_VERSION,
            "idle_watts": self.idle.state(),
            "cost_model": self.model.state(),
            "pace": self.pace.state(),
            "prefill_weight": self.prefill_weight,
            "prefill_steps": self.prefill_steps.state(),
        }

    def restore(self, state: Mapping[str, Any]) -> bool:
        """Load learned_state's output; False (nothing changed) for another version or a
        cost model of another basis. Raises KeyError, TypeError, ValueError or
        AttributeError on a malformed state, before changing anything."""
        if state.get("version") != STATE_VERSION:
            return False
        model = CostModel()
        if not model.load(state["cost_model"]):
            return False
        idle = [float(w) for w in state["idle_watts"]]
        pace = {k: [float(v) for v in state["pace"][k]] for k in ("prefill_rates", "token_gaps")}
        weight = float(state["prefill_weight"])
        steps = {k: [float(v) for v in state.get("prefill_steps", {}).get(k, [])] for k in ("step_lengths", "seconds_per_prompt_token")}
        self.model = model
        self.idle.load(idle)
        self.pace.load(pace)
        self.prefill_steps.load(steps)
        if self.fixed_prefill_weight is None:
            self.prefill_weight = weight
        return True
