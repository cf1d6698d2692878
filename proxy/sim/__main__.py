"""`python -m proxy.sim`: run the simulated model server (and its DCGM-style /metrics)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import signal
import sys

from proxy.sim.config import SimModelConfig
from proxy.sim.gpu import SimGpu
from proxy.sim.physics import PHYSICS_NAMES, draw_physics
from proxy.sim.server import run_sim_server


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = SimModelConfig()
    parser = argparse.ArgumentParser(prog="python -m proxy.sim", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model", default=defaults.model)
    parser.add_argument("--tokens-per-second", type=float, default=defaults.tokens_per_second,
                        help="decode speed of one stream (default %(default)s)")
    parser.add_argument("--prefill-seconds-per-token", type=float, default=defaults.prefill_seconds_per_token)
    parser.add_argument("--max-batch", type=int, default=defaults.max_batch,
                        help="sequences decoding at once; raise it for thousands of streams")
    parser.add_argument("--natural-tokens-min", type=int, default=defaults.natural_tokens_min,
                        help="shortest reply when max_tokens does not cut it")
    parser.add_argument("--natural-tokens-max", type=int, default=defaults.natural_tokens_max)
    parser.add_argument("--diffusion-seconds-per-step", type=float, default=defaults.diffusion_seconds_per_step)
    parser.add_argument("--devices", default="0", help="comma-separated device ids (default %(default)s)")
    parser.add_argument("--idle-watts", type=float, default=70.0, help="idle power per device")
    parser.add_argument("--max-watts", type=float, default=700.0, help="power limit per device")
    parser.add_argument("--refresh-seconds", type=float, default=0.1,
                        help="energy counter refresh period, as NVML (0: exact)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--physics", choices=PHYSICS_NAMES, default=None,
                        help="a ground-truth physics of proxy.sim.physics, parameters drawn from --seed "
                             "(default: the built-in additive power model)")  # fmt: skip
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    config = SimModelConfig(
        model=args.model,
        tokens_per_second=args.tokens_per_second,
        prefill_seconds_per_token=args.prefill_seconds_per_token,
        max_batch=args.max_batch,
        natural_tokens_min=args.natural_tokens_min,
        natural_tokens_max=args.natural_tokens_max,
        diffusion_seconds_per_step=args.diffusion_seconds_per_step,
        seed=args.seed,
    )
    gpu = SimGpu(
        [d.strip() for d in args.devices.split(",") if d.strip()],
        idle_power_watts=args.idle_watts,
        max_power_watts=args.max_watts,
        refresh_seconds=args.refresh_seconds,
        seed=args.seed,
        physics=None if args.physics is None else draw_physics(
            args.physics, random.Random(args.seed), idle_watts=args.idle_watts, board_watts=args.max_watts
        ),
    )
    server = await run_sim_server(args.host, args.port, config, gpu)
    logging.getLogger("proxy.sim").info("sim model server on %s (model %s)", server.url, config.model)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except NotImplementedError:  # Windows
            pass
    try:
        await stop.wait()
    finally:
        await server.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args))
    else:
        uvloop.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
