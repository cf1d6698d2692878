"""The `carbon-proxy` command: serve, demo, check-config, estimate, report."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from dataclasses import replace
from typing import Sequence

from proxy import __version__
from proxy.config import (
    METERS,
    Config,
    UpstreamConfig,
    config_from_dict,
    load_config,
    parse_host_port,
    parse_upstream_url,
)
from proxy.errors import ConfigError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse exits 2 too; keep its message short
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _serve_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="TOML config file (see README)")
    parser.add_argument("--upstream", action="append", metavar="URL", help="model server URL (repeatable: first match by route)")
    parser.add_argument("--dialect", default=None, help="dialect of --upstream: openai, tgi, ollama, llamacpp, diffusion, generic")
    parser.add_argument("--listen", metavar="HOST:PORT", help="public listener (default 127.0.0.1:8080)")
    parser.add_argument("--admin-listen", metavar="HOST:PORT", help="admin listener for /metrics, /healthz (default 127.0.0.1:9464)")
    parser.add_argument("--meter", choices=METERS, help="energy source (default auto: nvml, else estimate)")
    parser.add_argument("--intensity", metavar="NUMBER|ZONE", help="grid intensity in gCO2e/kWh, or a zone such as DEU or gcp:europe-west4")
    parser.add_argument("--pue", type=float, help="power usage effectiveness (default: the cloud's own for a cloud zone, else 1.58)")
    parser.add_argument("--receipts", metavar="PATH", help="receipts database (default carbon-proxy.db; ':memory:' keeps none)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def config_from_args(args: argparse.Namespace) -> Config:
    """The config file (if any), with command-line flags taking precedence."""
    if args.config:
        config = load_config(args.config)
    elif args.upstream:
        config = Config(upstreams=(UpstreamConfig(name="default", url=parse_upstream_url("--upstream", args.upstream[0])),))
    else:
        raise ConfigError("--upstream", "give --upstream URL or --config FILE")
    if args.config and args.upstream:
        raise ConfigError("--upstream", "use either --upstream or the [[upstreams]] of --config, not both")
    if args.upstream and len(args.upstream) > 1:
        upstreams = tuple(
            UpstreamConfig(name=f"upstream-{i}", url=parse_upstream_url("--upstream", url)) for i, url in enumerate(args.upstream)
        )
        config = replace(config, upstreams=upstreams)
    if args.dialect:
        if args.config:
            raise ConfigError("--dialect", "set dialect per upstream in the config file")
        data = {"upstreams": [{"name": u.name, "url": u.url, "dialect": args.dialect} for u in config.upstreams]}
        config = replace(config, upstreams=config_from_dict(data).upstreams)
    server = config.server
    if args.listen:
        server = replace(server, listen=parse_host_port("--listen", args.listen))
    if args.admin_listen:
        server = replace(server, admin_listen=parse_host_port("--admin-listen", args.admin_listen))
    config = replace(config, server=server)
    if args.meter:
        config = replace(config, meter=replace(config.meter, kind=args.meter))
    if args.intensity:
        carbon = {k: v for k, v in config.carbon.items() if k not in ("intensity", "provider", "zone")}
        try:
            carbon["intensity"] = float(args.intensity)
        except ValueError:
            carbon.update(provider="table", zone=args.intensity)
        config = replace(config, carbon=carbon)
    if args.pue is not None:
        if args.pue < 1.0:
            raise ConfigError("--pue", f"must be at least 1.0, got {args.pue:g}")
        config = replace(config, pue=args.pue)
    if args.receipts:
        config = replace(config, receipts=replace(config.receipts, path=args.receipts))
    if server.listen == server.admin_listen and server.listen.port != 0:
        raise ConfigError("server.admin_listen", "must differ from server.listen: admin endpoints stay off the public port")
    return config


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _run(coro: object) -> None:
    try:
        import uvloop

        uvloop.run(coro)  # type: ignore[arg-type]
    except ImportError:
        asyncio.run(coro)  # type: ignore[arg-type]


def cmd_serve(args: argparse.Namespace) -> int:
    from proxy.serve import build_service, run_until_signal

    config = config_from_args(args)
    _setup_logging(args.log_level)

    async def main() -> None:
        service = await build_service(config)
        await run_until_signal(service)

    _run(main())
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    from proxy.build import build_embodied_rates, build_intensity, build_meter
    from proxy.tenants import Tenancy

    config = load_config(args.path)
    Tenancy(config.tenants)
    build_embodied_rates(config)
    from proxy.routing.place import build_sites

    build_sites(config.upstreams, default_intensity=build_intensity(config), default_pue=config.pue)
    if config.meter.kind not in ("auto", "sim"):
        build_meter(config)
    print(f"{args.path}: ok ({len(config.upstreams)} upstream(s), meter {config.meter.kind})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from proxy.demo import run_demo

    _setup_logging(args.log_level)
    _run(run_demo(port=args.port, admin_port=args.admin_port, sim_port=args.sim_port, traffic=args.traffic, duration_seconds=args.duration))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="carbon-proxy", description="Measure the energy and CO2e of each model request.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    serve = sub.add_parser("serve", help="run the proxy")
    _serve_flags(serve)
    serve.set_defaults(func=cmd_serve)

    check = sub.add_parser("check-config", help="validate a config file")
    check.add_argument("path")
    check.set_defaults(func=cmd_check_config)

    demo = sub.add_parser("demo", help="sim model server + sim GPU + proxy on localhost")
    demo.add_argument("--traffic", action="store_true", help="also send a steady mix of requests and print a live table")
    demo.add_argument("--port", type=int, default=8080)
    demo.add_argument("--admin-port", type=int, default=9464)
    demo.add_argument("--sim-port", type=int, default=8000)
    demo.add_argument("--duration", type=float, default=None, help="stop after this many seconds (default: until Ctrl-C)")
    demo.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    demo.set_defaults(func=cmd_demo)

    from proxy.carbon import calculator

    estimate = sub.add_parser("estimate", help="what-if calculator: energy and CO2e of a GPU workload")
    calculator.add_arguments(estimate)
    estimate.set_defaults(func=calculator.run)

    try:
        from proxy.receipts import report
    except ImportError:
        report = None  # type: ignore[assignment]
    if report is not None:
        rep = sub.add_parser("report", help="totals from the receipts database")
        report.add_arguments(rep)
        rep.set_defaults(func=report.run)
    from proxy.batches import cli as batches_cli

    listing = sub.add_parser("batches", help="the Batch API's batches and the grams they avoided")
    batches_cli.add_arguments(listing)
    listing.set_defaults(func=batches_cli.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"carbon-proxy: config error: {exc.key}: {exc.reason}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
