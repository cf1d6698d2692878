"""What every handler of one sim server shares, and the life of one request in it."""

from __future__ import annotations

import asyncio
import itertools
import re
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from aiohttp import web

from proxy.sim.config import SimModelConfig
from proxy.sim.diffusion_runner import DiffusionRunner
from proxy.sim.gpu import SimGpu
from proxy.sim.engine import SimSequence
from proxy.sim.scheduler import Scheduler
from proxy.sim.streaming import end_stream

_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")


@dataclass(slots=True)
class SimStats:
    """Counters tests and benchmarks read (in-process, or via GET /sim/stats)."""

    in_flight: int = 0
    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    images: int = 0

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}  # type: ignore[attr-defined]


@dataclass(slots=True)
class RequestTicket:
    """One request's id and how it ended, filled in by its handler."""

    request_id: str
    outcome: str = "completed"  # completed | cancelled | failed
    prompt_tokens: int = 0
    completion_tokens: int = 0
    images: int = 0


@dataclass(slots=True)
class SimState:
    config: SimModelConfig
    gpu: SimGpu
    scheduler: Scheduler
    diffusion: DiffusionRunner
    stats: SimStats = field(default_factory=SimStats)
    _suffixes: "itertools.count[int]" = field(default_factory=lambda: itertools.count(2))

    @classmethod
    def create(cls, config: SimModelConfig, gpu: SimGpu) -> "SimState":
        return cls(
            config=config,
            gpu=gpu,
            scheduler=Scheduler(config, gpu),
            diffusion=DiffusionRunner(config, gpu),
        )

    def claim_request_id(self, wanted: str | None) -> str:
        """The client's X-Request-Id when sane and unseen, else a fresh one.

        Ground truth is kept per id, so an id seen before gets a suffix (the response's
        X-Request-Id header says which id the figures are filed under).
        """
        if wanted and _SANE_REQUEST_ID.match(wanted):
            candidate = wanted
            while self.gpu.is_known(candidate):
                candidate = f"{wanted}-{next(self._suffixes)}"
            return candidate
        return uuid.uuid4().hex

    @asynccontextmanager
    async def request(self, request: web.Request) -> AsyncIterator[RequestTicket]:
        """Presence on the GPU (static share) and the counters, for one request's life."""
        ticket = RequestTicket(self.claim_request_id(request.headers.get("X-Request-Id")))
        self.gpu.request_arrived(ticket.request_id)
        self.stats.in_flight += 1
        try:
            yield ticket
        except asyncio.CancelledError:
            ticket.outcome = "cancelled"
            raise
        except Exception:
            ticket.outcome = "failed"
            raise
        finally:
            self.gpu.request_departed(ticket.request_id)
            stats = self.stats
            stats.in_flight -= 1
            if ticket.outcome == "completed":
                stats.completed += 1
            elif ticket.outcome == "cancelled":
                stats.cancelled += 1
            else:
                stats.failed += 1
            stats.prompt_tokens += ticket.prompt_tokens
            stats.completion_tokens += ticket.completion_tokens
            stats.images += ticket.images

    async def generate(
        self, ticket: RequestTicket, seq: SimSequence, stream: web.StreamResponse | None
    ) -> web.StreamResponse | None:
        """Run `seq` through the scheduler and book its tokens on the ticket. Returns the
        finished response for a stream or a cancelled request; None when the caller
        still has to send its non-streaming body."""
        await self.scheduler.generate(seq)
        ticket.prompt_tokens, ticket.completion_tokens = seq.prompt_tokens, seq.generated_tokens
        if seq.cancelled:
            ticket.outcome = "cancelled"
            return stream or web.Response(status=499)
        if stream is not None:
            await end_stream(stream)
            return stream
        return None


def connection_watch(request: web.Request) -> Callable[[], bool]:
    """A cheap 'has the client gone?' check for the scheduler to poll."""
    transport = request.transport
    if transport is None:
        return lambda: True
    return transport.is_closing


SIM_STATE: web.AppKey[SimState] = web.AppKey("sim_state", SimState)
"""Where create_sim_app() keeps the state: `app[SIM_STATE]`."""
