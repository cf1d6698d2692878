"""Continuous batching, without any I/O or sleeping, so it also runs in virtual time.

A step is one forward pass: every decoding sequence produces one token, and prompt
tokens of newly admitted sequences are processed within a per-step budget (chunked
prefill). A step lasts `decode_step_seconds(batch)` plus the prefill tokens' time, and
while it runs the SimGpu is told exactly which sequences do what, so its power and its
ground truth follow the real in-flight work. A sequence whose prompt is done gets its
first token at the end of that step and decodes from the next one.

The caller drives time: `start_step(now)` returns how long the step lasts, and
`finish_step(now)` is called when that time has passed (really, or virtually).
"""

from __future__ import annotations

import enum
from collections import deque
from typing import Callable, Iterator, Protocol

from proxy.sim.config import SimModelConfig
from proxy.sim.gpu import SimGpu
from proxy.sim.physics import StepWork
from proxy.sim.text import WordStream, detokenize


class Phase(enum.Enum):
    WAITING = "waiting"
    PREFILL = "prefill"
    DECODE = "decode"
    FINISHED = "finished"
    CANCELLED = "cancelled"


class TokenSink(Protocol):
    """Where a streaming sequence's output goes; called from the scheduler, must not block."""

    def on_token(self, seq: "SimSequence", position: int, index: int) -> None: ...

    def on_finish(self, seq: "SimSequence") -> None: ...


class SimSequence:
    """One generation request as the engine sees it."""

    __slots__ = (
        "request_id", "prompt_tokens", "target_tokens", "finish_reason", "words",
        "token_indices", "sink", "connection_lost", "on_done", "phase", "prefilled_tokens",
        "generated_tokens", "arrival_seconds", "admitted_seconds", "first_token_seconds",
        "finished_seconds",
    )  # fmt: skip

    def __init__(
        self,
        request_id: str,
        prompt_tokens: int,
        target_tokens: int,
        finish_reason: str,
        seed: int,
        *,
        sink: TokenSink | None = None,
        connection_lost: Callable[[], bool] | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt_tokens = max(0, prompt_tokens)
        self.target_tokens = max(0, target_tokens)
        self.finish_reason = finish_reason
        self.words = WordStream(seed)
        self.token_indices: list[int] = []
        self.sink = sink
        self.connection_lost = connection_lost
        self.on_done: Callable[[SimSequence], None] | None = None
        self.phase = Phase.WAITING
        self.prefilled_tokens = 0
        self.generated_tokens = 0
        self.arrival_seconds = 0.0
        self.admitted_seconds: float | None = None
        self.first_token_seconds: float | None = None
        self.finished_seconds: float | None = None

    @property
    def text(self) -> str:
        return detokenize(self.token_indices)

    @property
    def cancelled(self) -> bool:
        return self.phase is Phase.CANCELLED


def plan_output(natural_tokens: int, max_tokens: int | None) -> tuple[int, str]:
    """Tokens to generate and the OpenAI finish_reason: 'length' only when the cap cut it."""
    if max_tokens is not None and max_tokens < natural_tokens:
        return max(0, max_tokens), "length"
    return natural_tokens, "stop"


class BatchEngine:
    def __init__(self, config: SimModelConfig, gpu: SimGpu) -> None:
        self.config = config
        self.gpu = gpu
        self._waiting: deque[SimSequence] = deque()
        self._prefilling: deque[SimSequence] = deque()
        self._decoding: list[SimSequence] = []
        self._step_prefill: list[tuple[SimSequence, int]] = []
        self.steps = 0
        self.tokens_generated = 0
        self.prompt_tokens_processed = 0
        """Prompt tokens prefilled so far, counted as each step ends (vLLM's
        vllm:prompt_tokens_total; tokens_generated is vllm:generation_tokens_total)."""

    # -- membership -----------------------------------------------------------------------

    def submit(self, seq: SimSequence, now: float) -> None:
        seq.phase = Phase.WAITING
        seq.arrival_seconds = now
        self._waiting.append(seq)

    def cancel(self, seq: SimSequence, now: float) -> None:
        """Stop a sequence now; the work it did stays on the books, its slot is freed."""
        phase = seq.phase
        if phase is Phase.FINISHED or phase is Phase.CANCELLED:
            return
        if phase is Phase.PREFILL:
            self._prefilling.remove(seq)
            self.gpu.set_own_watts({seq.request_id: 0.0}, now)
        elif phase is Phase.DECODE:
            # Left in _decoding until the step ends (skipped there): O(1) now.
            self.gpu.update_decode_batch(left=(seq.request_id,), now=now)
        # WAITING: skipped lazily at admission.
        seq.phase = Phase.CANCELLED
        seq.finished_seconds = now
        if seq.on_done is not None:
            seq.on_done(seq)

    def has_work(self) -> bool:
        return bool(self._waiting or self._prefilling or self._decoding)

    def active_sequences(self) -> Iterator[SimSequence]:
        yield from self._waiting
        yield from self._prefilling
        yield from self._decoding

    def cancel_lost(self, now: float) -> int:
        """Cancel every sequence whose client went away; returns how many."""
        lost = [
            s for s in self.active_sequences()
            if s.connection_lost is not None and s.phase is not Phase.CANCELLED and s.connection_lost()
        ]  # fmt: skip
        for seq in lost:
            self.cancel(seq, now)
        return len(lost)

    @property
    def waiting_count(self) -> int:
        return sum(1 for s in self._waiting if s.phase is Phase.WAITING)

    @property
    def running_count(self) -> int:
        return len(self._prefilling) + sum(1 for s in self._decoding if s.phase is Phase.DECODE)

    # -- steps ----------------------------------------------------------------------------

    def start_step(self, now: float) -> float | None:
        """Plan the next step and put its load on the GPU; None when there is nothing to do."""
        config = self.config
        running = len(self._prefilling) + len(self._decoding)
        while self._waiting and running < config.max_batch:
            seq = self._waiting.popleft()
            if seq.phase is not Phase.WAITING:
                continue
            seq.phase = Phase.PREFILL
            seq.admitted_seconds = now
            self._prefilling.append(seq)
            running += 1
        budget = config.max_prefill_tokens_per_step
        chunks: list[tuple[SimSequence, int]] = []
        prefill_tokens = 0
        for seq in self._prefilling:
            if budget <= 0:
                break
            take = min(seq.prompt_tokens - seq.prefilled_tokens, budget)
            chunks.append((seq, take))
            budget -= take
            prefill_tokens += take
        batch = len(self._decoding)
        if batch == 0 and not chunks:
            return None
        duration = config.decode_step_seconds(batch) if batch else 0.0
        duration += prefill_tokens * config.prefill_seconds_per_token
        duration = max(duration, 1e-6)  # a step always takes some time
        self._step_prefill = chunks
        physics = self.gpu.physics
        if physics is not None:
            work = StepWork(
                {s.request_id: take for s, take in chunks if take},
                {s.request_id: s.prompt_tokens + s.generated_tokens for s in self._decoding if s.phase is Phase.DECODE},
                duration,
            )
            cost = physics.step(work, len(self.gpu.device_ids))
            duration = max(cost.seconds, 1e-6)
            self.gpu.set_step_watts({rid: j / duration for rid, j in cost.joules_by_request.items()}, now)
        elif prefill_tokens:
            self.gpu.set_prefill_rates({s.request_id: take / duration for s, take in chunks if take}, now)
        self.steps += 1
        return duration

    def finish_step(self, now: float) -> None:
        """The step's time has passed: hand out its tokens and finish what is done."""
        survivors: list[SimSequence] = []
        left: list[str] = []
        joined: list[str] = []
        emitted = 0
        decode = Phase.DECODE
        emit = self._emit
        for seq in self._decoding:
            if seq.phase is not decode:
                continue
            emit(seq)
            emitted += 1
            if seq.generated_tokens >= seq.target_tokens:
                left.append(seq.request_id)
                self._finish(seq, now)
            else:
                survivors.append(seq)
        for seq, take in self._step_prefill:
            if seq.phase is not Phase.PREFILL:
                continue
            seq.prefilled_tokens += take
            self.prompt_tokens_processed += take
            if seq.prefilled_tokens < seq.prompt_tokens:
                continue
            self._prefilling.remove(seq)
            if seq.target_tokens == 0:
                self._finish(seq, now)  # embeddings: prompt work only
                continue
            seq.first_token_seconds = now
            self._emit(seq)
            emitted += 1
            if seq.generated_tokens >= seq.target_tokens:
                self._finish(seq, now)
            else:
                seq.phase = Phase.DECODE
                survivors.append(seq)
                joined.append(seq.request_id)
        self._decoding = survivors
        if self.gpu.physics is not None:
            self._step_prefill = []
            self.gpu.set_step_watts({}, now)  # the next step sets its own
            self.tokens_generated += emitted
            return
        if self._step_prefill:
            self._step_prefill = []
            self.gpu.set_prefill_rates({}, now)
        if joined or left:
            self.gpu.update_decode_batch(joined=joined, left=left, now=now)
        self.tokens_generated += emitted

    def _emit(self, seq: SimSequence) -> None:
        position = seq.generated_tokens
        index = seq.words.next_index()
        seq.token_indices.append(index)
        seq.generated_tokens = position + 1
        if seq.sink is not None:
            seq.sink.on_token(seq, position, index)

    def _finish(self, seq: SimSequence, now: float) -> None:
        seq.phase = Phase.FINISHED
        seq.finished_seconds = now
        if seq.sink is not None:
            seq.sink.on_finish(seq)
        if seq.on_done is not None:
            seq.on_done(seq)
