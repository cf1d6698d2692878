"""Proxy overhead: the same load against the sim model server directly and through the
proxy, in one run (DESIGN.md section 9), printed as Markdown tables.

Two rigs, one after the other:

1. request rate and latency (bench/_wrk.py): `wrk` (a C load generator, one thread)
   against a fast upstream (nginx, one worker, answering a fixed OpenAI-shaped chat
   completion), so each target is the bottleneck: the upstream alone (`direct`), nginx as
   a reverse proxy (one worker, keep-alive pool), the bare data path (bench/_bare.py: the
   proxy's forwarder with no metering: the cost of one Python process hop) and
   carbon-proxy (`python -m proxy serve`, scrape meter on the upstream's static
   DCGM-format /metrics, receipts in memory or with `--receipts sqlite` the default
   durable store). Saturation (wrk -c32) and moderate load (wrk -c1: no queueing, each
   request's latency is the path's own time): requests/s, p50/p99, ratios to nginx and
   direct, added p50.
2. streaming: the sim model server (`python -m proxy.sim`, paced at 50 tokens/s), N
   concurrent chat streams (default 200) from the Python load generator (bench/_loadgen.py),
   each slot starting a new stream when its stream ends. Added time to first token and
   inter-token delay, the proxy's CPU per 1k chunks/s and RSS per open stream.

It ends with one table: the goals against this run's figures for the proxy.

With `--litellm PATH` (the `litellm` script of a venv holding `litellm[proxy]`, kept out of
this project's venv), LiteLLM's proxy, pointed at the same fast upstream (one worker, no
database), joins the wrk phases.

    .venv/bin/python bench/overhead.py            # about 3 minutes
    .venv/bin/python bench/overhead.py --quick    # a few-second smoke run
    .venv/bin/python bench/overhead.py --streams 2000 --skip-wrk
    .venv/bin/python bench/overhead.py --compare-tree /tmp/before   # before/after in one run
    .venv/bin/python bench/overhead.py --profile /tmp/prof          # py-spy each proxy phase

Pinning (default on a machine with 2 or more CPUs, `--pin A:B` to choose, `--no-pin` to
turn off): wrk and the fast upstream (or the sim and the Python generator) on CPUs A,
the target under test on CPUs B, so a target has a core of its own.

On a small machine the generator, the sim and the proxy share cores: the CPU columns say
who was busy, and `other load` how much CPU processes outside the benchmark took.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

import _loadgen  # noqa: E402
import _wrk  # noqa: E402
from _common import (  # noqa: E402
    ROOT,
    Child,
    Sampler,
    Usage,
    free_port,
    load_average,
    median,
    percentile,
    process_rss_bytes,
    python_env,
    spread,
    start_litellm,
    start_bare,
    start_nginx,
    start_proxy,
    start_sim,
)

MS = 1000.0
RECEIPTS = {"memory": ":memory:", "sqlite": "SQLite, the default (a response waits for its receipt's group commit)"}


@dataclass
class Rig:
    workdir: Path
    sim: Child
    proxies: dict[str, Child]
    """'proxy' (this tree), and 'baseline' with --compare-tree."""
    nginx: Child | None
    bare: Child | None
    """The proxy's data path without metering (bench/_bare.py), a reference like nginx."""
    litellm: Child | None
    """LiteLLM's proxy with --litellm (a peer, in the non-streaming and saturation phases)."""
    ports: dict[str, int]
    gen: Any  # multiprocessing.Process
    conn: Any  # its pipe
    profile: str | None = None
    profiles: list[str] = field(default_factory=list)
    goals: list[tuple[str, str, bool | None]] = field(default_factory=list)
    """(goal, measured, met) rows for the closing table; met None: only reported."""

    @property
    def proxied(self) -> list[str]:
        return list(self.proxies)

    def base(self, target: str) -> str:
        return f"http://127.0.0.1:{self.ports[target]}"

    def pids(self) -> dict[str, int]:
        pids = {"generator": self.gen.pid, "sim": self.sim.pid, "bench": os.getpid()}
        pids.update((name, child.pid) for name, child in self.proxies.items())
        if self.nginx is not None:
            pids["nginx"] = self.nginx.pid
        if self.bare is not None:
            pids["bare"] = self.bare.pid
        if self.litellm is not None:
            pids["litellm"] = self.litellm.pid
        return pids

    @property
    def references(self) -> list[str]:
        """Floors to read the proxy's cost against: the bare data path (one Python process
        hop, no metering) and nginx (one hop, no Python)."""
        return (["bare"] if self.bare is not None else []) + (["nginx"] if self.nginx is not None else [])

    @property
    def peers(self) -> list[str]:
        """Other proxies measured beside ours in the non-streaming and saturation phases."""
        return ["litellm"] if self.litellm is not None else []

    def run(self, job: str, target: str, label: str, **kwargs: Any) -> tuple[dict[str, Any], Usage]:
        """One job of the load generator; CPU, RSS and connections sampled while it measures.
        `payload["rss_all_open"]`: RSS of each proxy when every stream slot was streaming."""
        self.conn.send((job, {"base": self.base(target), **kwargs}))
        kind, payload = self.conn.recv()
        if kind == "error":
            raise RuntimeError(f"load generator failed in {label}: {payload}")
        watch = (target,) if target != "direct" else ()
        sampler = Sampler(self.pids(), upstream_port=self.ports["direct"], watch=watch)
        sampler.start()
        spy = self._profile(label, self.proxies[target].pid) if target in self.proxies else None
        rss_all_open: dict[str, int] = {}
        kind, payload = self.conn.recv()
        if kind == "all_open":
            rss_all_open = {name: process_rss_bytes(child.pid) for name, child in self.proxies.items()}
            kind, payload = self.conn.recv()
        usage = sampler.stop()
        if spy is not None:
            spy.send_signal(2)  # SIGINT: py-spy writes what it has
            spy.wait(30)
        if kind == "error":
            raise RuntimeError(f"load generator failed in {label}: {payload}")
        payload["rss_all_open"] = rss_all_open
        return payload, usage

    def _profile(self, label: str, pid: int) -> subprocess.Popen[bytes] | None:
        if not self.profile:
            return None
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        out = f"{self.profile}-{label}.txt"
        self.profiles.append(out)
        argv = [spy, "record", "--pid", str(pid), "--rate", "250", "--format", "raw", "--output", out, "--nonblocking"]
        return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/overhead.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="few-second smoke run (numbers are only indicative)")
    p.add_argument("--wrk-seconds", type=float, default=5.0, help="length of each wrk run")
    p.add_argument("--wrk-reps", type=int, default=3, help="repetitions of the wrk phases per target")
    p.add_argument("--connections", type=int, default=32, help="wrk connections at saturation")
    p.add_argument("--moderate-connections", type=int, default=1, help="wrk connections at moderate load")
    p.add_argument("--streams", type=int, default=200, help="concurrent streams")
    p.add_argument("--stream-tokens", type=int, default=100, help="max_tokens of each stream")
    p.add_argument("--stream-seconds", type=float, default=6.0)
    p.add_argument("--stream-reps", type=int, default=2)
    p.add_argument("--tokens-per-second", type=float, default=50.0, help="the sim's decode speed per stream")
    p.add_argument("--meter", choices=("scrape", "estimate"), default="scrape")
    p.add_argument("--receipts", choices=("memory", "sqlite"), default="memory",
                   help="sqlite: the default config's durable store (each response waits for its receipt's group commit)")
    p.add_argument("--no-nginx", action="store_true", help="skip the nginx reverse proxy reference")
    p.add_argument("--pin", metavar="A:B", help="CPU affinity: load (wrk, upstream, sim, generator) on CPUs A, each target on CPUs B")
    p.add_argument("--no-pin", action="store_true", help="no CPU affinity (the default pins 0:1 on 2+ CPUs)")
    p.add_argument("--no-bare", action="store_true", help="skip the bare data path reference (forwarding without metering)")
    p.add_argument("--skip-wrk", action="store_true", help="skip the request-rate and latency phases")
    p.add_argument("--skip-streams", action="store_true")
    p.add_argument("--compare-tree", metavar="DIR", type=Path,
                   help="also run the proxy from another source tree (DIR/proxy), e.g. a checkout before a change")
    p.add_argument("--litellm", metavar="PATH",
                   help="the `litellm` script of a venv with litellm[proxy]: adds LiteLLM's proxy as a peer target")
    p.add_argument("--profile", metavar="PREFIX", help="py-spy record each proxy phase to PREFIX-<phase>.txt (collapsed stacks)")
    args = p.parse_args(argv)
    if args.quick:
        args.wrk_seconds, args.wrk_reps = 2, 1
        args.streams, args.stream_tokens, args.stream_seconds, args.stream_reps = min(args.streams, 20), 20, 1.5, 1
    if args.pin is None and not args.no_pin and (os.cpu_count() or 1) >= 2:
        args.pin = "0:1"
    if args.no_pin:
        args.pin = None
    if not args.skip_wrk and (_wrk.wrk_binary() is None or _wrk.nginx_binary() is None):
        p.error("the request-rate phases need wrk and nginx (Debian: wrk, nginx-light); or pass --skip-wrk")
    if args.profile and not (shutil.which("py-spy") or (Path(sys.executable).parent / "py-spy").exists()):
        p.error("--profile needs py-spy (pip install py-spy into the venv)")
    if args.compare_tree is not None and not (args.compare_tree / "proxy" / "__init__.py").is_file():
        p.error(f"--compare-tree: {args.compare_tree}/proxy is not a package")
    if args.litellm is not None and not os.access(args.litellm, os.X_OK):
        p.error(f"--litellm: {args.litellm} is not an executable")
    return args


def setup(args: argparse.Namespace, workdir: Path) -> Rig:
    ports = {"direct": free_port()}
    # Replies as long as max_tokens asks: every stream runs its full length, so N are open at once.
    sim = start_sim(workdir, ports["direct"], tokens_per_second=args.tokens_per_second, natural_tokens=100_000)
    proxies: dict[str, Child] = {}
    nginx = litellm = bare = None
    try:
        trees = [("proxy", ROOT)] + ([("baseline", args.compare_tree.resolve())] if args.compare_tree else [])
        for name, tree in trees:
            ports[name] = free_port()
            receipts = str(workdir / f"{name}-receipts.db") if args.receipts == "sqlite" else ":memory:"
            proxies[name] = start_proxy(workdir, ports[name], free_port(), ports["direct"], meter=args.meter, name=name, tree=tree,
                                        receipts=receipts)  # fmt: skip
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        gen = ctx.Process(target=_loadgen.serve, args=(child,), name="loadgen", daemon=True)
        gen.start()
        if args.pin:
            _pin(args.pin, {"sim": sim.pid, "generator": gen.pid},
                 {**{n: c.pid for n, c in proxies.items()}, "nginx": nginx.pid if nginx else None, "bare": bare.pid if bare else None,
                  "litellm": litellm.pid if litellm else None})  # fmt: skip
    except BaseException:
        for c in [litellm, nginx, bare, *proxies.values(), sim]:
            if c is not None:
                c.stop()
        raise
    return Rig(workdir, sim, proxies, nginx, bare, litellm, ports, gen, parent, profile=args.profile)


def wrk_phases(args: argparse.Namespace, workdir: Path) -> tuple[list[str], list[tuple[str, str, bool | None]]]:
    """The request-rate and latency rig (bench/_wrk.py): its own processes, torn down after."""
    upstream_port = free_port()
    children: list[Child] = []
    try:
        upstream = _wrk.start_fast_upstream(workdir / "fast-upstream", upstream_port)
        children.append(upstream)
        targets = [_wrk.Target("direct", upstream_port, None)]
        if not args.no_nginx:
            port = free_port()
            nginx = start_nginx(_subdir(workdir, "nginx"), port, upstream_port)
            if nginx is not None:
                children.append(nginx)
                targets.append(_wrk.Target("nginx", port, nginx))
        if not args.no_bare:
            port = free_port()
            bare = start_bare(_subdir(workdir, "bare"), port, upstream_port)
            children.append(bare)
            targets.append(_wrk.Target("bare", port, bare))
        trees = [("proxy", ROOT)] + ([("baseline", args.compare_tree.resolve())] if args.compare_tree else [])
        for name, tree in trees:
            port = free_port()
            receipts = str(workdir / f"wrk-{name}-receipts.db") if args.receipts == "sqlite" else ":memory:"
            child = start_proxy(_subdir(workdir, f"wrk-{name}"), port, free_port(), upstream_port, meter=args.meter, name=name,
                                tree=tree, receipts=receipts)  # fmt: skip
            children.append(child)
            targets.append(_wrk.Target(name, port, child))
        if args.litellm:
            port = free_port()
            litellm = start_litellm(_subdir(workdir, "litellm"), port, upstream_port, args.litellm)
            children.append(litellm)
            targets.append(_wrk.Target("litellm", port, litellm))
        load_cpus: set[int] | None = None
        pinning = "Not pinned."
        if args.pin:
            load_cpus, target_cpus = ({int(c) for c in part.split(",")} for part in args.pin.split(":"))
            _set_affinity(upstream.pid, load_cpus)
            for target in targets:
                if target.child is not None:
                    _set_affinity(target.child.pid, target_cpus)
            pinning = (f"Pinned: wrk and the fast upstream on CPU {args.pin.split(':')[0]}, "
                       f"the target on CPU {args.pin.split(':')[1]} (direct: wrk and the upstream share their CPU).")  # fmt: skip
        per = _wrk.measure(targets, workdir=workdir, reps=args.wrk_reps, seconds=args.wrk_seconds, connections=args.connections,
                           moderate_connections=args.moderate_connections, load_cpus=load_cpus)  # fmt: skip
        return _wrk.table(per, connections=args.connections, moderate_connections=args.moderate_connections,
                          seconds=args.wrk_seconds, reps=args.wrk_reps, pinning=pinning)  # fmt: skip
    except BaseException:
        for child in children:
            sys.stderr.write(f"--- {child.name} log ---\n{child.log_tail()}\n")
        raise
    finally:
        for child in reversed(children):
            child.stop()


def _subdir(workdir: Path, name: str) -> Path:
    path = workdir / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def _pin(spec: str, load: dict[str, int], proxies: dict[str, int | None]) -> None:
    """--pin A:B: the sim and the generator on CPUs A, every proxy on CPUs B, so a proxy
    has its own core as it would beside a model server, and p99 measures the proxy
    rather than the scheduler sharing 2 cores among 3 busy processes."""
    load_cpus, proxy_cpus = ({int(c) for c in part.split(",")} for part in spec.split(":"))
    for pid in load.values():
        _set_affinity(pid, load_cpus)
    for pid in proxies.values():
        if pid is not None:
            _set_affinity(pid, proxy_cpus)


def _set_affinity(pid: int, cpus: set[int]) -> None:
    # Every thread: the proxy's receipts writer and nginx's workers too.
    for task in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(task), cpus)


def teardown(rig: Rig) -> None:
    try:
        rig.conn.send(None)
        rig.gen.join(10)
    except Exception:
        pass
    if rig.gen.is_alive():
        rig.gen.terminate()
    for child in [rig.litellm, rig.nginx, rig.bare, *rig.proxies.values(), rig.sim]:
        if child is not None:
            child.stop()


def order(targets: list[str], rep: int) -> list[str]:
    """Alternate the order between repetitions, so drift hits every target alike."""
    return targets if rep % 2 == 0 else list(reversed(targets))


def cpu_cell(usages: list[Usage], rig: Rig, target: str) -> str:
    """Median CPU (% of one core) of the generator, the sim and the target's own process."""
    names = ["generator", "sim"] + ([target] if target in rig.pids() and target != "direct" else [])
    return " / ".join(f"{median([u.cpu[n] for u in usages]):.0f}" for n in names)


def other_load(usages: list[Usage]) -> str:
    return spread([u.foreign_cores for u in usages])


def added_table(
    rig: Rig, per: dict[str, dict[str, list[float]]], added: dict[str, dict[str, list[float]]], rows: list[tuple[str, str, str]]
) -> list[str]:
    """Rows (label, key, fmt): a column per target, then 'added' per proxy (ours and peers) for keys in `added`."""
    others = [t for t in per if t != "direct"]
    targets = ["direct", *others]
    head = "| metric | " + " | ".join(_title(t) for t in targets)
    head += "".join(f" | added by {_title(t)}" for t in others) + " |"
    lines = [head, "| --- |" + " ---: |" * (len(targets) + len(others))]
    for label, key, fmt in rows:
        cells = [spread(per[t][key], fmt) for t in targets]
        extra = [f"**{spread(added[t][key], '{:+' + fmt[2:])}**" if key in added.get(t, {}) else "" for t in others]
        lines.append(f"| {label} | " + " | ".join(cells + extra) + " |")
    return lines


def _title(target: str) -> str:
    titles = {"proxy": "proxy", "baseline": "baseline proxy", "direct": "direct", "litellm": "LiteLLM", "bare": "bare data path"}
    return titles.get(target, target)


# -- phases ---------------------------------------------------------------------------------


def _usage_rows(rig: Rig, usages: dict[str, list[Usage]], targets: list[str]) -> list[str]:
    pad = " |" * (len(targets))
    return [
        "| CPU % of a core: generator / sim / proxy | " + " | ".join(cpu_cell(usages[t], rig, t) for t in targets) + pad,
        "| other load on the machine (cores) | " + " | ".join(other_load(usages[t]) for t in targets) + pad,
    ]


def streaming(rig: Rig, args: argparse.Namespace) -> list[str]:
    targets = ["direct", *rig.proxied]
    keys = ("ttft50", "ttft99", "gap50", "gap99", "chunks")
    per = {t: {k: [] for k in keys} for t in targets}
    added = {t: {"ttft50": [], "ttft99": [], "gap99": []} for t in rig.proxied}
    per_kchunk: dict[str, list[float]] = {t: [] for t in rig.proxied}
    rss_per_stream: dict[str, list[float]] = {t: [] for t in rig.proxied}
    usages: dict[str, list[Usage]] = {t: [] for t in targets}
    conns: dict[str, list[str]] = {t: [] for t in rig.proxied}
    completed = {t: 0 for t in targets}
    errors = 0
    for rep in range(args.stream_reps):
        for target in order(targets, rep):
            rss_before = {t: process_rss_bytes(c.pid) for t, c in rig.proxies.items()}
            result, usage = rig.run(
                "streams", target, f"streams-{target}-{rep}", count=args.streams, seconds=args.stream_seconds,
                max_tokens=args.stream_tokens,
            )  # fmt: skip
            errors += result["errors"]
            completed[target] += result["completed"]
            values = {
                "ttft50": percentile(result["ttft"], 50) * MS,
                "ttft99": percentile(result["ttft"], 99) * MS,
                "gap50": percentile(result["gaps"], 50) * MS,
                "gap99": percentile(result["gaps"], 99) * MS,
                "chunks": result["chunks"] / usage.wall,
            }
            for k in keys:
                per[target][k].append(values[k])
            usages[target].append(usage)
            if target in rig.proxies:
                if values["chunks"] > 0:
                    per_kchunk[target].append(usage.cpu[target] / (values["chunks"] / 1000.0))
                if target in result["rss_all_open"]:
                    rss_per_stream[target].append((result["rss_all_open"][target] - rss_before[target]) / args.streams / 1024.0)
                conns[target].append(f"{usage.opened[target]} opened/{usage.held[target]} held")
        for t in rig.proxied:
            for k in added[t]:
                added[t][k].append(per[t][k][-1] - per["direct"][k][-1])
    if "proxy" in added:
        got, direct = median(per["proxy"]["chunks"]), median(per["direct"]["chunks"])
        gap99 = median(added["proxy"]["gap99"])
        kept_up = got >= 0.95 * direct
        rig.goals += [
            (f"{args.streams} streams at {args.tokens_per_second:g} tokens/s (goal: 2,000), added inter-token p99 <= 5 ms",
             f"{gap99:+.2f} ms; {got:.0f} chunks/s delivered (direct {direct:.0f})" + ("" if kept_up else ": fell behind"),
             gap99 <= 5.0 and kept_up and args.streams >= 2000),
            ("RSS per open stream <= 40 KB", f"{median(rss_per_stream['proxy']):.1f} KB", median(rss_per_stream["proxy"]) <= 40.0),
            ("CPU per 1k chunks/s", f"{median(per_kchunk['proxy']):.1f} % of a core", None),
        ]  # fmt: skip
    step_ms = 1000.0 / args.tokens_per_second
    lines: list[str] = [
        f"### Streaming: {args.streams} concurrent streams at {args.tokens_per_second:g} tokens/s, "
        f"{args.stream_seconds:g} s x {args.stream_reps} rep(s) per target",
        "",
        f"Chat streams of {args.stream_tokens} tokens each; each slot starts a new stream when its stream ends. "
        f"Time to first token is quantised by the sim's {step_ms:.0f} ms decode step, so its added value is noisier "
        "than the inter-token one. Inter-token delay: gaps between token-bearing reads of one stream.",
        "",
    ]
    lines += added_table(rig, per, added, [
        ("time to first token p50 (ms)", "ttft50", "{:.2f}"), ("time to first token p99 (ms)", "ttft99", "{:.2f}"),
        ("inter-token delay p50 (ms)", "gap50", "{:.2f}"), ("inter-token delay p99 (ms)", "gap99", "{:.2f}"),
        ("token chunks/s received", "chunks", "{:.0f}"),
    ])  # fmt: skip
    lines += _usage_rows(rig, usages, targets)
    pad = " |" * (1 + len(rig.proxied))
    lines += [
        "| proxy CPU per 1k chunks/s (% of a core) | | " + " | ".join(spread(per_kchunk[t], "{:.1f}") for t in rig.proxied) + pad,
        "| proxy RSS per open stream (KB) | | " + " | ".join(spread(rss_per_stream[t], "{:.1f}") for t in rig.proxied) + pad,
        "",
        "Streams completed: " + ", ".join(f"{_title(t)} {completed[t]}" for t in targets) + f"; errors: {errors}. "
        f"Upstream connections per phase ({args.streams} streams at a time): "
        + "; ".join(f"{_title(t)} {', '.join(conns[t])}" for t in rig.proxied)
        + ". RSS per open stream: the proxy's RSS when every slot was streaming minus its RSS before the phase's "
        "warm-up, over the stream count (client and upstream connections included; the first repetition is the "
        "cold figure, later ones reuse memory the allocator and the upstream pool kept).",
        "",
    ]
    return lines


def goals_table(goals: list[tuple[str, str, bool | None]]) -> list[str]:
    """The goals (issues #8 and #13) against this run's figures for the proxy, in one table."""
    if not goals:
        return []
    verdict = {True: "met", False: "**not met**", None: ""}
    lines = ["### Goals, this run", "", "| goal | measured (proxy) | |", "| --- | --- | --- |"]
    lines += [f"| {goal} | {measured} | {verdict[met]} |" for goal, measured, met in goals]
    return lines + [""]


def _parser_kind() -> str:
    """Whether aiohttp runs its C HTTP parser in the children (same interpreter and env)."""
    code = "from aiohttp import http_parser as p; print(p.HttpRequestParser.__module__, p.HttpResponseParser.__module__)"
    out = subprocess.run([sys.executable, "-c", code], env=python_env(), capture_output=True, text=True).stdout.split()
    return "C parser" if out == ["aiohttp._http_parser"] * 2 else f"PURE-PYTHON parser: {out}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    load_before = load_average()
    import aiohttp

    out = [
        "## carbon-proxy overhead (bench/overhead.py)" + (" -- QUICK SMOKE RUN" if args.quick else ""),
        "",
        f"Machine: {os.cpu_count()} CPU(s), load average before {load_before}; Python {sys.version.split()[0]}, "
        f"aiohttp {aiohttp.__version__} ({_parser_kind()}); proxy meter: {args.meter}; receipts: {RECEIPTS[args.receipts]}"
        + (f"; pinned: load on CPU {args.pin.split(':')[0]}, targets on CPU {args.pin.split(':')[1]}." if args.pin else "."),
        "",
    ]
    goals: list[tuple[str, str, bool | None]] = []
    with tempfile.TemporaryDirectory(prefix="carbon-proxy-bench-") as tmp:
        if not args.skip_wrk:
            lines, wrk_goals = wrk_phases(args, Path(tmp) / "wrk")
            out += lines
            goals += wrk_goals
        if not args.skip_streams:
            workdir = _subdir(Path(tmp), "streams")
            rig = setup(args, workdir)
            try:
                out += streaming(rig, args)
                goals += rig.goals
                for name, child in rig.proxies.items():
                    if child.proc.poll() is not None:
                        raise RuntimeError(f"the {name} proxy exited during the run:\n" + child.log_tail())
            except BaseException:
                for child in [*rig.proxies.values(), rig.sim]:
                    sys.stderr.write(f"--- {child.name} log ---\n{child.log_tail()}\n")
                raise
            finally:
                teardown(rig)
            profiles = rig.profiles
        else:
            profiles = []
    out += goals_table(goals)
    out.append(f"Run took {time.perf_counter() - started:.0f} s; load average after {load_average()}.")
    if profiles:
        out.append("py-spy profiles (collapsed stacks): " + ", ".join(profiles))
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
