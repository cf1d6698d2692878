"""Helpers the benchmarks share: child processes, /proc sampling, percentiles.

Everything here runs in the orchestrating process (plain, synchronous code); the load
itself comes from bench/_loadgen.py in a process of its own.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


# -- numbers --------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of a list; NaN when empty."""
    if not values:
        return float("nan")
    data = sorted(values)
    if len(data) == 1:
        return data[0]
    pos = (len(data) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def median(values: Sequence[float]) -> float:
    return percentile(values, 50.0)


def spread(values: Sequence[float], fmt: str = "{:.2f}") -> str:
    """'median (min..max)' of per-repetition values, or just the value for one."""
    clean = [v for v in values if v == v]
    if not clean:
        return "n/a"
    if len(clean) == 1:
        return fmt.format(clean[0])
    return f"{fmt.format(median(clean))} ({fmt.format(min(clean))}..{fmt.format(max(clean))})"


# -- ports and child processes ----------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float = 20.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before serving {url}")
        try:
            with urllib.request.urlopen(url, timeout=1.0) as response:
                response.read()
                return
        except Exception as exc:  # connection refused while it starts
            last = exc
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within {timeout:g} s: {last}")


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def spawn(name: str, argv: list[str], workdir: Path, env: dict[str, str] | None = None, cwd: Path = ROOT) -> Child:
    log_path = workdir / f"{name}.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env={**os.environ, **(env or {})})
    log.close()
    return Child(name, proc, log_path)


def python_env(tree: Path = ROOT) -> dict[str, str]:
    """Children import `proxy` from `tree`, and must use aiohttp's C extensions: never
    inherit AIOHTTP_NO_EXTENSIONS."""
    env = {k: v for k, v in os.environ.items() if k != "AIOHTTP_NO_EXTENSIONS"}
    env["PYTHONPATH"] = str(tree) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def start_sim(workdir: Path, port: int, *, tokens_per_second: float = 50.0, natural_tokens: int | None = None) -> Child:
    """The sim model server. `natural_tokens`: the length every reply wants, so that
    max_tokens alone decides how long a stream runs (the sim's default is 16..128)."""
    argv = [
        sys.executable, "-m", "proxy.sim", "--port", str(port), "--tokens-per-second", f"{tokens_per_second:g}",
        "--max-batch", "4096", "--prefill-seconds-per-token", "0.00001",
    ]  # fmt: skip
    if natural_tokens is not None:
        argv += ["--natural-tokens-min", str(natural_tokens), "--natural-tokens-max", str(natural_tokens)]
    child = spawn("sim", argv, workdir, python_env())
    wait_http(f"http://127.0.0.1:{port}/health", proc=child.proc)
    return child


def start_proxy(
    workdir: Path,
    port: int,
    admin_port: int,
    sim_port: int,
    meter: str = "scrape",
    *,
    name: str = "proxy",
    tree: Path = ROOT,
    receipts: str = ":memory:",
) -> Child:
    """`carbon-proxy serve` in its own process; the scrape meter reads the sim's DCGM /metrics.
    `tree`: the source tree whose `proxy` package runs (to compare two versions in one run).
    `receipts`: the receipts database (":memory:" keeps up to 100k receipts in a dict)."""
    config = workdir / f"{name}.toml"
    meter_table = (
        f'[meter]\nkind = "scrape"\n[meter.scrape]\nurl = "http://127.0.0.1:{sim_port}/metrics"\n'
        if meter == "scrape"
        else '[meter]\nkind = "estimate"\n'
    )
    config.write_text(
        f'[server]\nlisten = "127.0.0.1:{port}"\nadmin_listen = "127.0.0.1:{admin_port}"\n\n'
        f'[[upstreams]]\nname = "sim"\nurl = "http://127.0.0.1:{sim_port}"\ndialect = "openai"\n\n'
        + meter_table
    )
    argv = [sys.executable, "-m", "proxy", "serve", "--config", str(config), "--receipts", receipts, "--log-level", "warning"]
    child = spawn(name, argv, workdir, python_env(tree), cwd=tree)
    wait_http(f"http://127.0.0.1:{admin_port}/healthz", proc=child.proc)
    return child


NGINX_CONF = """\
worker_processes 1;
daemon off;
master_process off;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {dir}/nginx-body;
    proxy_temp_path {dir}/nginx-proxy;
    fastcgi_temp_path {dir}/nginx-fastcgi;
    uwsgi_temp_path {dir}/nginx-uwsgi;
    scgi_temp_path {dir}/nginx-scgi;
    upstream sim {{ server 127.0.0.1:{sim_port}; keepalive 512; }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://sim;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
"""


def start_bare(workdir: Path, port: int, sim_port: int) -> Child:
    """The proxy's data path without metering (bench/_bare.py): the cost of the hop alone."""
    argv = [sys.executable, str(ROOT / "bench" / "_bare.py"), "--port", str(port), "--upstream", f"http://127.0.0.1:{sim_port}"]
    child = spawn("bare", argv, workdir, python_env())
    wait_http(f"http://127.0.0.1:{port}/health", proc=child.proc)
    return child


def start_nginx(workdir: Path, port: int, sim_port: int) -> Child | None:
    """nginx (one worker, keep-alive pool) as the reference reverse proxy, when installed."""
    binary = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if binary is None:
        return None
    conf = workdir / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=workdir, port=port, sim_port=sim_port))
    if os.geteuid() == 0:  # the worker would switch to 'nobody', which cannot use workdir
        conf.write_text("user root;\n" + conf.read_text())
    child = spawn("nginx", [binary, "-p", str(workdir), "-c", str(conf), "-e", str(workdir / "nginx-error.log")], workdir)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout=10.0, proc=child.proc)
    except RuntimeError:
        child.stop()
        return None
    return child


LITELLM_CONFIG = """\
model_list:
  - model_name: sim-llm
    litellm_params:
      model: openai/sim-llm
      api_base: http://127.0.0.1:{sim_port}/v1
      api_key: x
litellm_settings:
  telemetry: false
  drop_params: true
"""


def start_litellm(workdir: Path, port: int, sim_port: int, binary: str, timeout: float = 180.0) -> Child:
    """LiteLLM's proxy (`litellm[proxy]`, its own venv) as the peer users would pick instead:
    one worker, no database, an openai-compatible model `sim-llm` pointed at the sim."""
    config = workdir / "litellm.yaml"
    config.write_text(LITELLM_CONFIG.format(sim_port=sim_port))
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "PYTHONPATH", "VIRTUAL_ENV")}
    # No network here: use the bundled model cost map instead of fetching it; quiet logs.
    env.update(LITELLM_LOCAL_MODEL_COST_MAP="True", LITELLM_LOG="ERROR", LITELLM_MODE="PRODUCTION")
    # Recent LiteLLM refuses to start without a master key; it listens on 127.0.0.1 only and
    # our proxy runs without auth here too, so take its local-development opt-out (no key
    # check per request: if anything, flattering to LiteLLM).
    env["LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY"] = "true"
    argv = [binary, "--config", str(config), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1",
            "--telemetry", "False"]  # fmt: skip
    log_path = workdir / "litellm.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=workdir, env=env)
    child = Child("litellm", proc, log_path)
    try:
        wait_http(f"http://127.0.0.1:{port}/health/liveliness", timeout=timeout, proc=proc)
    except RuntimeError as exc:
        child.stop()
        raise RuntimeError(f"LiteLLM did not start: {exc}\n{child.log_tail()}") from None
    return child


# -- /proc sampling -------------------------------------------------------------------------


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    except (OSError, IndexError, ValueError):
        return float("nan")


def process_rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return 0


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, all cores."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
    total = sum(parts[:8])
    return (total - idle) / CLOCK_TICKS, total / CLOCK_TICKS


def load_average() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "n/a"


_TCP_ESTABLISHED = "01"


def socket_inodes(pid: int) -> set[str]:
    """Inodes of the sockets a process holds open."""
    inodes: set[str] = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        pass
    return inodes


def connections_to(port: int, pid: int | None = None) -> set[int]:
    """Local ports of the established TCP connections to 127.0.0.1:`port` (held by `pid`, if given)."""
    wanted = f"{port:04X}"
    inodes = socket_inodes(pid) if pid is not None else None
    seen: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            local, remote, state, inode = parts[1], parts[2], parts[3], parts[9]
            if state != _TCP_ESTABLISHED or remote.rsplit(":", 1)[1] != wanted:
                continue
            if inodes is None or inode in inodes:  # the client side of a connection to `port`
                seen.add(int(local.rsplit(":", 1)[1], 16))
    return seen


@dataclass
class Usage:
    """CPU of the named processes and of the whole machine over one measured window."""

    wall: float
    cpu: dict[str, float]
    """Share of one core per process, in %."""
    machine_busy_pct: float
    """Busy share of all cores, in % of the whole machine."""
    foreign_cores: float
    """Cores busy with processes other than ours (other engineers' tests...)."""
    rss_peak: dict[str, int] = field(default_factory=dict)
    opened: dict[str, int] = field(default_factory=dict)
    """Per watched process: connections to the upstream it opened during the phase (seen
    while sampling every period, and absent at the start: short-lived ones can be missed)."""
    held: dict[str, int] = field(default_factory=dict)
    """Per watched process: most connections to the upstream open at one sample."""


class Sampler:
    """Samples CPU, RSS and connections of our processes while a phase runs (a thread)."""

    def __init__(
        self, pids: dict[str, int], upstream_port: int | None = None, watch: tuple[str, ...] = (), period: float = 0.1
    ) -> None:
        self._pids = pids
        self._upstream_port = upstream_port
        self._watch = watch if upstream_port is not None else ()
        self._period = period
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.rss_peak: dict[str, int] = {}
        self._initial = {name: connections_to(upstream_port, pids[name]) for name in self._watch} if upstream_port else {}
        self._seen: dict[str, set[int]] = {name: set() for name in self._watch}
        self._held: dict[str, int] = {name: 0 for name in self._watch}

    def start(self) -> None:
        self._t0 = time.perf_counter()
        self._cpu0 = {name: process_cpu_seconds(pid) for name, pid in self._pids.items()}
        self._machine0 = machine_cpu_seconds()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self._period)

    def _sample(self) -> None:
        for name, pid in self._pids.items():
            rss = process_rss_bytes(pid)
            if rss > self.rss_peak.get(name, 0):
                self.rss_peak[name] = rss
        for name in self._watch:
            ports = connections_to(self._upstream_port, self._pids[name])  # type: ignore[arg-type]
            self._seen[name] |= ports
            self._held[name] = max(self._held[name], len(ports))

    def stop(self) -> Usage:
        wall = time.perf_counter() - self._t0
        cpu1 = {name: process_cpu_seconds(pid) for name, pid in self._pids.items()}
        machine1 = machine_cpu_seconds()
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        cpu = {name: 100.0 * (cpu1[name] - self._cpu0[name]) / wall for name in self._pids}
        busy = machine1[0] - self._machine0[0]
        total = machine1[1] - self._machine0[1]
        ours = sum(cpu1[name] - self._cpu0[name] for name in self._pids)
        return Usage(
            wall=wall,
            cpu=cpu,
            machine_busy_pct=100.0 * busy / total if total > 0 else float("nan"),
            foreign_cores=max(0.0, busy - ours) / wall,
            rss_peak=dict(self.rss_peak),
            opened={name: len(self._seen[name] - self._initial[name]) for name in self._watch},
            held=dict(self._held),
        )
