"""Soak: a steady mixed load through the proxy for a bounded time, watching the proxy's
RSS and open file descriptors for growth (issue #8: "RSS and open file descriptors flat").

Processes as in bench/overhead.py: the sim model server, the proxy (`python -m proxy
serve`, scrape meter on the sim's /metrics, receipts in a SQLite file by default) and the load generator
(bench/_loadgen.py, job `mixed`), each its own process; this one only orchestrates and
reads /proc/PID/status (VmRSS) and /proc/PID/fd of the proxy every `--every` seconds.

Load: requests started at `--rate`/s: non-streaming (max_tokens=1), full streams of
`--stream-tokens` tokens at the sim's 50 tokens/s, and client disconnects (streams dropped
after their first token; non-streaming requests dropped before their answer).

Verdict: least-squares slopes of RSS (KB/min) over the samples after `--warmup` seconds
and over the last half of the run, and the fd count at the first post-warm-up sample vs the
last. RSS growth is flagged when both slopes exceed `--max-slope` KB/min (a process that
fills bounded caches early and then levels off has a steep post-warm-up slope but a flat
last half; a leak keeps both steep); fds when they end more than `--max-fd-growth` above.

    .venv/bin/python bench/soak.py                 # 3 minutes
    .venv/bin/python bench/soak.py --minutes 0.5   # a short check
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

import _loadgen  # noqa: E402
from _common import free_port, load_average, process_cpu_seconds, start_proxy, start_sim  # noqa: E402


def vm_rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return -1


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def slope_per_minute(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) points, per minute; NaN under 2 points."""
    if len(points) < 2:
        return float("nan")
    n = len(points)
    mx = sum(t for t, _ in points) / n
    my = sum(v for _, v in points) / n
    sxx = sum((t - mx) ** 2 for t, _ in points)
    if sxx == 0:
        return float("nan")
    return 60.0 * sum((t - mx) * (v - my) for t, v in points) / sxx


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/soak.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=3.0, help="length of the soak (bounded: at most 60)")
    p.add_argument("--rate", type=float, default=60.0, help="requests started per second")
    p.add_argument("--every", type=float, default=5.0, help="sampling period, seconds")
    p.add_argument("--warmup", type=float, default=30.0, help="seconds left out of the RSS slope")
    p.add_argument("--stream-share", type=float, default=0.3)
    p.add_argument("--disconnect-share", type=float, default=0.1)
    p.add_argument("--stream-tokens", type=int, default=20)
    p.add_argument("--meter", choices=("scrape", "estimate"), default="scrape")
    p.add_argument("--receipts", choices=("sqlite", "memory"), default="sqlite",
                   help="sqlite: a database file in the run's temp dir (as deployed); memory: ':memory:', which keeps "
                   "up to 100k receipts and so grows by design")
    p.add_argument("--max-slope", type=float, default=200.0, help="RSS growth flagged above this, KB/min after warm-up")
    p.add_argument("--max-fd-growth", type=int, default=8, help="fd growth flagged above this, end vs start after warm-up")
    args = p.parse_args(argv)
    if not 0 < args.minutes <= 60:
        p.error("--minutes: between 0 and 60")
    args.warmup = min(args.warmup, args.minutes * 60 / 3)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_before = load_average()
    seconds = args.minutes * 60
    rows: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="carbon-proxy-soak-") as tmp:
        workdir = Path(tmp)
        sim_port = free_port()
        sim = start_sim(workdir, sim_port, natural_tokens=100_000)
        proxy = None
        gen = None
        try:
            proxy_port = free_port()
            proxy = start_proxy(
                workdir, proxy_port, free_port(), sim_port, meter=args.meter,
                receipts=str(workdir / "receipts.db") if args.receipts == "sqlite" else ":memory:",
            )  # fmt: skip
            ctx = multiprocessing.get_context("spawn")
            conn, child_conn = ctx.Pipe()
            gen = ctx.Process(target=_loadgen.serve, args=(child_conn,), name="loadgen", daemon=True)
            gen.start()
            pid = proxy.pid
            rows.append({"t": 0.0, "rss": vm_rss_kb(pid), "fds": fd_count(pid), "cpu": process_cpu_seconds(pid), "done": 0,
                         "errors": 0, "in_flight": 0})  # fmt: skip
            conn.send(("mixed", {
                "base": f"http://127.0.0.1:{proxy_port}", "seconds": seconds, "rate": args.rate, "report_every": args.every,
                "stream_share": args.stream_share, "disconnect_share": args.disconnect_share,
                "stream_tokens": args.stream_tokens,
            }))  # fmt: skip
            kind, payload = conn.recv()
            if kind == "error":
                raise RuntimeError(f"load generator: {payload}")
            while True:
                if not conn.poll(seconds + 120):
                    raise RuntimeError("load generator went silent")
                kind, payload = conn.recv()
                if kind == "error":
                    raise RuntimeError(f"load generator: {payload}")
                if kind == "done":
                    result = payload
                    break
                if proxy.proc.poll() is not None:
                    raise RuntimeError("the proxy exited during the soak:\n" + proxy.log_tail())
                done = sum(payload[k] for k in ("nonstream", "stream", "drop_stream", "drop_wait"))
                rows.append({"t": payload["t"], "rss": vm_rss_kb(pid), "fds": fd_count(pid), "cpu": process_cpu_seconds(pid),
                             "done": done, "errors": payload["errors"], "in_flight": payload["in_flight"]})  # fmt: skip
            time.sleep(1.0)  # let the proxy finish what the generator dropped
            idle = {"rss": vm_rss_kb(pid), "fds": fd_count(pid)}
        except BaseException:
            for child in (proxy, sim):
                if child is not None:
                    sys.stderr.write(f"--- {child.name} log ---\n{child.log_tail()}\n")
            raise
        finally:
            if gen is not None:
                try:
                    conn.send(None)
                    gen.join(10)
                except Exception:
                    pass
                if gen.is_alive():
                    gen.terminate()
            for child in (proxy, sim):
                if child is not None:
                    child.stop()

    out = [
        f"## carbon-proxy soak (bench/soak.py): {args.minutes:g} min at {args.rate:g} req/s",
        "",
        f"Machine: {os.cpu_count()} CPU(s), load average before {load_before}, after {load_average()}. Mix: "
        f"{100 * (1 - args.stream_share - args.disconnect_share):.0f} % non-streaming (max_tokens=1), "
        f"{100 * args.stream_share:.0f} % streams of {args.stream_tokens} tokens, {100 * args.disconnect_share:.0f} % "
        "client disconnects (half mid-stream, half before a non-streaming answer). Proxy meter: "
        f"{args.meter}; receipts: {'SQLite file' if args.receipts == 'sqlite' else ':memory:'}. RSS: VmRSS of the proxy process; fds: entries in /proc/PID/fd.",
        "",
        "| t (s) | RSS (MB) | open fds | requests done | req/s since last | in flight | errors | proxy CPU % of a core |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    prev = None
    for r in rows:
        rate = cpu = ""
        if prev is not None and r["t"] > prev["t"]:
            dt = r["t"] - prev["t"]
            rate = f"{(r['done'] - prev['done']) / dt:.0f}"
            cpu = f"{100 * (r['cpu'] - prev['cpu']) / dt:.0f}"
        out.append(f"| {r['t']:.0f} | {r['rss'] / 1024:.1f} | {r['fds']:.0f} | {r['done']:.0f} | {rate} | {r['in_flight']:.0f} "
                   f"| {r['errors']:.0f} | {cpu} |")  # fmt: skip
        prev = r
    steady = [r for r in rows if r["t"] >= args.warmup]
    slope = slope_per_minute([(r["t"], r["rss"]) for r in steady])
    late = [r for r in rows if r["t"] >= rows[-1]["t"] / 2]
    late_slope = slope_per_minute([(r["t"], r["rss"]) for r in late])
    fd_start, fd_end = (steady[0]["fds"], steady[-1]["fds"]) if steady else (float("nan"), float("nan"))
    rss_start, rss_end = (steady[0]["rss"], steady[-1]["rss"]) if steady else (float("nan"), float("nan"))
    rss_grows = slope == slope and slope > args.max_slope and not late_slope <= args.max_slope
    fds_grow = fd_end - fd_start > args.max_fd_growth
    out += [
        "",
        f"Totals: {result['nonstream']} non-streaming, {result['stream']} streams, {result['drop_stream']} dropped "
        f"mid-stream, {result['drop_wait']} dropped before the answer; {result['errors']} errors, {result['skipped']} "
        f"starts skipped (in-flight cap); {result['elapsed']:.0f} s. One second after the load: RSS "
        f"{idle['rss'] / 1024:.1f} MB, {idle['fds']} fds.",
        "",
        f"**Verdict** (after {args.warmup:.0f} s warm-up, {len(steady)} samples): RSS slope **{slope:+.1f} KB/min** "
        f"({rss_start / 1024:.1f} -> {rss_end / 1024:.1f} MB), over the last half ({late[0]['t']:.0f} s on, "
        f"{len(late)} samples) **{late_slope:+.1f} KB/min** ({late[0]['rss'] / 1024:.1f} -> {late[-1]['rss'] / 1024:.1f} MB); "
        f"flagged when both exceed {args.max_slope:g}: "
        + ("**GROWING**" if rss_grows else "flat")
        + f"; open fds {fd_start:.0f} -> {fd_end:.0f} (flagged above +{args.max_fd_growth}): "
        + ("**GROWING**" if fds_grow else "flat")
        + ".",
    ]
    print("\n".join(out))
    return 1 if rss_grows or fds_grow else 0


if __name__ == "__main__":
    sys.exit(main())
