"""The request-rate and latency phases of bench/overhead.py, driven by `wrk` (a C load
generator) against a fast upstream, so that each proxy under test is the bottleneck and
not the generator or the model server.

- The fast upstream is nginx (one worker) answering every POST under /v1/ with a fixed
  OpenAI-shaped chat completion (`return 200 '...'`) and /metrics with a static
  DCGM-format counter for the proxy's scrape meter. `direct` measures it alone: it must
  outrun every proxy under test (the table says whether it did).
- Peers, each one process pointed at that upstream: nginx as a reverse proxy (one worker,
  keep-alive pool), the bare data path (bench/_bare.py: the proxy's forwarder, no
  metering), carbon-proxy (and a baseline tree with --compare-tree, LiteLLM with --litellm).
- wrk runs with one thread; a Lua `done` hook prints the figures as one JSON line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from _common import Child, spawn, wait_http

ANSWER = (
    '{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"bench",'
    '"choices":[{"index":0,"message":{"role":"assistant","content":"Hi"},"finish_reason":"stop"}],'
    '"usage":{"prompt_tokens":9,"completion_tokens":1,"total_tokens":10}}'
)
METRICS = (
    "# TYPE DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION counter\\n"
    'DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{gpu=\\"0\\",UUID=\\"GPU-bench-0\\"} 1000000\\n'
    "# TYPE DCGM_FI_DEV_POWER_USAGE gauge\\n"
    'DCGM_FI_DEV_POWER_USAGE{gpu=\\"0\\",UUID=\\"GPU-bench-0\\"} 100\\n'
)

FAST_UPSTREAM_CONF = """\
worker_processes 1;
daemon off;
master_process off;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location /v1/ {{ default_type application/json; return 200 '{answer}'; }}
        location = /metrics {{ default_type text/plain; return 200 "{metrics}"; }}
        location = /health {{ return 200 'ok'; }}
    }}
}}
"""

BODY = '{"model":"bench","messages":[{"role":"user","content":"Say hi"}],"max_tokens":1}'

LUA = """\
wrk.method = "POST"
wrk.body = '%s'
wrk.headers["Content-Type"] = "application/json"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%%d,"duration_us":%%d,"socket_errors":%%d,"non2xx":%%d,' ..
    '"p50_us":%%d,"p90_us":%%d,"p99_us":%%d,"max_us":%%d}\\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
""" % BODY


def nginx_binary() -> str | None:
    return shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)


def wrk_binary() -> str | None:
    return shutil.which("wrk")


def start_fast_upstream(workdir: Path, port: int) -> Child:
    binary = nginx_binary()
    if binary is None:
        raise RuntimeError("the wrk phases need nginx as the fast upstream (Debian: nginx-light)")
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "nginx.conf"
    text = FAST_UPSTREAM_CONF.format(dir=workdir, port=port, answer=ANSWER, metrics=METRICS)
    if os.geteuid() == 0:
        text = "user root;\n" + text
    conf.write_text(text)
    child = spawn("fast-upstream", [binary, "-p", str(workdir), "-c", str(conf), "-e", str(workdir / "nginx-error.log")], workdir)
    wait_http(f"http://127.0.0.1:{port}/health", timeout=10.0, proc=child.proc)
    return child


@dataclass
class WrkResult:
    requests: int
    seconds: float
    errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0


def run_wrk(url: str, *, connections: int, seconds: float, workdir: Path, cpus: set[int] | None = None) -> WrkResult:
    script = workdir / "bench.lua"
    if not script.exists():
        script.write_text(LUA)
    argv = [wrk_binary() or "wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "5s", "-s", str(script), url]
    preexec = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, preexec_fn=preexec)
    for line in out.stdout.splitlines():
        if line.startswith("WRKJSON "):
            data = json.loads(line[len("WRKJSON ") :])
            return WrkResult(
                requests=data["requests"],
                seconds=data["duration_us"] / 1e6,
                errors=data["socket_errors"] + data["non2xx"],
                p50_ms=data["p50_us"] / 1000.0,
                p90_ms=data["p90_us"] / 1000.0,
                p99_ms=data["p99_us"] / 1000.0,
            )
    raise RuntimeError(f"wrk printed no result (rc {out.returncode}):\n{out.stdout}\n{out.stderr}")


def warm(url: str, workdir: Path, cpus: set[int] | None) -> None:
    """A short run first: connections opened, upstream pools filled, caches warm."""
    run_wrk(url, connections=4, seconds=1, workdir=workdir, cpus=cpus)
    time.sleep(0.2)


# -- the phases ---------------------------------------------------------------------------


TITLES = {"direct": "direct (fast upstream alone)", "nginx": "nginx (1 worker)", "bare": "bare data path", "proxy": "carbon-proxy",
          "baseline": "baseline carbon-proxy", "litellm": "LiteLLM"}  # fmt: skip


@dataclass
class Target:
    name: str
    port: int
    child: Child | None  # None: the fast upstream itself (direct)


def _spread(values: list[float], fmt: str) -> str:
    ordered = sorted(values)
    mid = ordered[len(ordered) // 2] if len(ordered) % 2 else (ordered[len(ordered) // 2 - 1] + ordered[len(ordered) // 2]) / 2
    text = fmt.format(mid)
    if len(values) > 1:
        text += f" ({fmt.format(ordered[0])}..{fmt.format(ordered[-1])})"
    return text


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def measure(
    targets: list[Target],
    *,
    workdir: Path,
    reps: int,
    seconds: float,
    connections: int,
    moderate_connections: int,
    load_cpus: set[int] | None,
    path: str = "/v1/chat/completions",
) -> dict[str, dict[str, list[float]]]:
    """Per target: rate, p50, p90, p99 at saturation ('sat_*') and at moderate load ('mod_*'),
    one value per repetition; the order of targets alternates between repetitions."""
    from _common import process_cpu_seconds

    keys = ("sat_rate", "sat_p50", "sat_p99", "mod_rate", "mod_p50", "mod_p99", "cpu", "us_per_request", "errors")
    per: dict[str, dict[str, list[float]]] = {t.name: {k: [] for k in keys} for t in targets}
    for target in targets:
        warm(f"http://127.0.0.1:{target.port}{path}", workdir, load_cpus)
    for rep in range(reps):
        ordered = targets if rep % 2 == 0 else list(reversed(targets))
        for target in ordered:
            url = f"http://127.0.0.1:{target.port}{path}"
            cpu_before = process_cpu_seconds(target.child.pid) if target.child else 0.0
            sat = run_wrk(url, connections=connections, seconds=seconds, workdir=workdir, cpus=load_cpus)
            cpu_seconds = process_cpu_seconds(target.child.pid) - cpu_before if target.child else 0.0
            cpu = cpu_seconds / sat.seconds * 100
            mod = run_wrk(url, connections=moderate_connections, seconds=seconds, workdir=workdir, cpus=load_cpus)
            row = per[target.name]
            row["sat_rate"].append(sat.rate)
            row["sat_p50"].append(sat.p50_ms)
            row["sat_p99"].append(sat.p99_ms)
            row["mod_rate"].append(mod.rate)
            row["mod_p50"].append(mod.p50_ms)
            row["mod_p99"].append(mod.p99_ms)
            row["cpu"].append(cpu)
            row["us_per_request"].append(cpu_seconds / max(sat.requests, 1) * 1e6)
            row["errors"].append(sat.errors + mod.errors)
    return per


def table(
    per: dict[str, dict[str, list[float]]], *, connections: int, moderate_connections: int, seconds: float, reps: int, pinning: str
) -> tuple[list[str], list[tuple[str, str, bool | None]]]:
    names = list(per)
    lines = [
        f"### Request rate and latency: wrk, fast upstream, {seconds:g} s x {reps} rep(s) per target and load",
        "",
        f"Non-streaming chat completions (POST, fixed OpenAI-shaped answer from nginx). Saturation: wrk -t1 -c{connections}; "
        f"moderate load: wrk -t1 -c{moderate_connections} (closed loop, so each request's latency is the path's own time "
        f"with no queueing behind others). {pinning} Values: median of repetitions (min..max). "
        "Ratios: per repetition, then the median.",
        "",
        "| target | req/s at saturation | p50 (ms) | p99 (ms) | % of nginx | % of direct | target CPU (% of a core) "
        "| CPU per request (µs) | req/s moderate | p50 moderate (ms) | p99 moderate (ms) | added p50 moderate (ms) |",
        "| --- |" + " ---: |" * 11,
    ]
    direct = per["direct"]
    nginx = per.get("nginx")
    for name in names:
        row = per[name]
        share_nginx = [100 * a / b for a, b in zip(row["sat_rate"], nginx["sat_rate"])] if nginx else []
        share_direct = [100 * a / b for a, b in zip(row["sat_rate"], direct["sat_rate"])]
        added = [a - b for a, b in zip(row["mod_p50"], direct["mod_p50"])]
        lines.append(
            f"| {TITLES.get(name, name)} | {_spread(row['sat_rate'], '{:.0f}')} | {_spread(row['sat_p50'], '{:.2f}')} "
            f"| {_spread(row['sat_p99'], '{:.2f}')} | {_spread(share_nginx, '{:.0f}') if nginx else ''} "
            f"| {_spread(share_direct, '{:.0f}')} | {_spread(row['cpu'], '{:.0f}') if name != 'direct' else ''} "
            f"| {_spread(row['us_per_request'], '{:.1f}') if name != 'direct' else ''} "
            f"| {_spread(row['mod_rate'], '{:.0f}')} | {_spread(row['mod_p50'], '{:.3f}')} | {_spread(row['mod_p99'], '{:.3f}')} "
            f"| {_spread(added, '{:+.3f}') if name != 'direct' else ''} |"
        )
    errors = {n: int(sum(per[n]["errors"])) for n in names}
    lines += [
        "",
        "CPU per request: the target's CPU seconds over the requests it answered at saturation. On a shared machine a "
        "target may not get its whole core (see its CPU column), so req/s understates it; CPU per request does not "
        "depend on that, and 1e6 / (CPU per request) is what one core would carry.",
    ]
    lines += ["", "Errors (socket errors + non-2xx): " + ", ".join(f"{TITLES.get(n, n)} {e}" for n, e in errors.items()) + ".", ""]
    goals: list[tuple[str, str, bool | None]] = []
    proxies = [n for n in names if n != "direct"]
    slowest_margin = min(_median(direct["sat_rate"]) / max(_median(per[n]["sat_rate"]), 1e-9) for n in proxies) if proxies else 0
    goals.append(("the fast upstream outruns every proxy (direct req/s > each target's)",
                  f"direct {_median(direct['sat_rate']):.0f} req/s, {slowest_margin:.2f}x the fastest proxy", slowest_margin > 1.0))  # fmt: skip
    if "proxy" in per:
        if nginx:
            share = _median([100 * a / b for a, b in zip(per["proxy"]["sat_rate"], nginx["sat_rate"])])
            goals.append(("peak req/s >= 40% of one nginx worker's", f"{share:.0f} % ({_median(per['proxy']['sat_rate']):.0f} req/s)", share >= 40))
            by_cpu = _median([100 * b / a for a, b in zip(per["proxy"]["us_per_request"], nginx["us_per_request"]) if a > 0])
            goals.append(("... the same by CPU per request (one core's capacity, robust to a shared machine)",
                          f"{by_cpu:.0f} % ({_median(per['proxy']['us_per_request']):.0f} µs vs nginx {_median(nginx['us_per_request']):.0f} µs)",
                          by_cpu >= 40))  # fmt: skip
        added = _median([a - b for a, b in zip(per["proxy"]["mod_p50"], direct["mod_p50"])])
        goals.append((f"added p50 <= 0.5 ms at moderate load (wrk -c{moderate_connections})", f"{added:+.3f} ms", added <= 0.5))
    return lines, goals
