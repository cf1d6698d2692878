"""Shared by tests/deploy: the deploy files as data, and a real `carbon-proxy serve` process.

Parsers here are deliberately small: they read our own files (Dockerfile, compose,
kustomize) well enough to check what the proxy depends on, and the tests also use the
real tools (docker compose, kubectl, promtool) where the machine has them.
"""

from __future__ import annotations

import contextlib
import copy
import http.server
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import yaml

from proxy.cli import build_parser
from proxy.config import Config, load_config

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
PROMETHEUS_DIR = DEPLOY / "prometheus"
GRAFANA_DIR = REPO / "grafana"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def skip_or_fail(reason: str) -> None:
    """Skip on a developer machine; under CI=true a missing tool or file is a failure."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: required)")
    pytest.skip(reason)


# -- the proxy's own command line -----------------------------------------------------


def parse_serve(args: list[str]) -> Any:
    """Parse `carbon-proxy <args>` with the real parser; fails the test on a bad flag."""
    try:
        return build_parser().parse_args(args)
    except SystemExit as exc:  # argparse exits 2 on an unknown flag or bad value
        pytest.fail(f"carbon-proxy rejects {args}: exit {exc.code}")


def serve_flags() -> set[str]:
    parser = build_parser()
    for action in parser._subparsers._group_actions:  # type: ignore[union-attr]
        serve = action.choices["serve"]  # type: ignore[index]
        return {opt for a in serve._actions for opt in a.option_strings}
    raise AssertionError("no serve subcommand")


# -- Dockerfile -----------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str
    value: str
    stage: int

    def exec_form(self) -> list[str]:
        assert self.value.startswith("["), f"{self.keyword} must use the exec (JSON) form, got {self.value!r}"
        return json.loads(self.value)


def dockerfile(path: Path = DEPLOY / "Dockerfile") -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped; ARG defaults
    substituted into FROM."""
    lines: list[str] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or not stripped:
            continue  # Docker drops comment lines, also inside continuations
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    args: dict[str, str] = {}
    out: list[Instruction] = []
    stage = -1
    for line in lines:
        keyword, _, value = line.partition(" ")
        keyword = keyword.upper()
        value = value.strip()
        if keyword == "ARG" and stage < 0 and "=" in value:
            name, _, default = value.partition("=")
            args[name] = default
        if keyword == "FROM":
            stage += 1
            value = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), value)
        out.append(Instruction(keyword, value, stage))
    return out


def healthcheck_command(instructions: list[Instruction]) -> list[str]:
    (health,) = [i for i in instructions if i.keyword == "HEALTHCHECK"]
    _, _, command = health.value.partition(" CMD ")
    return json.loads(command.strip())


def dockerfile_env(instructions: list[Instruction], stage: int) -> dict[str, str]:
    env: dict[str, str] = {}
    for i in instructions:
        if i.keyword == "ENV" and i.stage == stage:
            for token in shlex.split(i.value):
                name, _, value = token.partition("=")
                env[name] = value
    return env


def _ignore_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as Go's filepath.Match reads it, plus `**` (any depth)."""
    out = ""
    for token in re.split(r"(\*\*/?|\*|\?)", pattern.strip("/")):
        if token.startswith("**"):
            out += "(?:.*/)?" if token.endswith("/") else ".*"
        elif token == "*":
            out += "[^/]*"
        elif token == "?":
            out += "[^/]"
        else:
            out += re.escape(token)
    return re.compile(out)


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore keeps `path` (relative, '/'-separated) out of the context:
    the last matching pattern wins; matching a parent directory counts as matching."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _ignore_regex(pattern[1:] if negate else pattern)
        if any(regex.fullmatch(c) for c in candidates):
            excluded = not negate
    return excluded


def dockerignore_patterns() -> list[str]:
    path = REPO / ".dockerignore"
    if not path.is_file():
        return []
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip() and not line.startswith("#")]


# -- docker compose -------------------------------------------------------------------

_VAR = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def interpolate(value: Any, env: dict[str, str] | None = None) -> Any:
    """Compose's ${VAR:-default} substitution, with the defaults (or `env`)."""
    env = env or {}
    if isinstance(value, str):
        return _VAR.sub(lambda m: env.get(m.group(1), m.group(2) or ""), value)
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    return value


def compose_file() -> dict[str, Any]:
    with (DEPLOY / "docker-compose.yml").open(encoding="utf-8") as fh:
        return interpolate(yaml.safe_load(fh))  # PyYAML resolves the <<: merge keys


def compose_plugin() -> list[str] | None:
    """The `docker compose` command where the plugin answers, else None."""
    docker = shutil.which("docker")
    if docker is None:
        return None
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, timeout=30)
    return [docker, "compose"] if probe.returncode == 0 else None


def duration_seconds(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text):
        total += float(number) * units[unit]
    return total


def service_mount(service: dict[str, Any], target: str) -> str | None:
    """Host source of the bind mount at `target` in a compose service (short syntax)."""
    for volume in service.get("volumes", []):
        parts = volume.split(":")
        if len(parts) >= 2 and parts[1] == target:
            return parts[0]
    return None


def flag_value(argv: list[str], flag: str) -> str | None:
    """`--flag=value` or `--flag value` in an argument list."""
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


# -- kustomize ------------------------------------------------------------------------


def kustomize_build(directory: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize` where kubectl exists, else mini_kustomize (same facts)."""
    kubectl = shutil.which("kubectl")
    if kubectl is not None:
        out = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, f"kubectl kustomize {directory} failed:\n{out.stderr}"
        return [d for d in yaml.safe_load_all(out.stdout) if d]
    return mini_kustomize(directory)


def mini_kustomize(directory: Path) -> list[dict[str, Any]]:
    """The subset of kustomize our manifests use: resources, configMapGenerator
    (create/replace, no hash suffix), labels without selectors, images, strategic-merge
    patches (maps merge, null deletes, named lists merge, `$patch: delete`)."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text(encoding="utf-8"))
    docs: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        if path.is_dir():
            docs += mini_kustomize(path)
        else:
            docs += [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]
    for generator in kustomization.get("configMapGenerator", []):
        data = {}
        for spec in generator.get("files", []):
            key, _, file = spec.rpartition("=") if "=" in spec else (Path(spec).name, "", spec)
            data[key] = (directory / file).read_text(encoding="utf-8")
        configmap = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": generator["name"]}, "data": data}
        if generator.get("behavior") in ("replace", "merge"):
            (old,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == generator["name"]]
            configmap["metadata"] = copy.deepcopy(old["metadata"])  # keeps the base's labels
            if generator["behavior"] == "merge":
                configmap["data"] = {**old["data"], **data}
            docs.remove(old)
        docs.append(configmap)
    for patch in kustomization.get("patches", []):
        body = yaml.safe_load((directory / patch["path"]).read_text(encoding="utf-8"))
        (target,) = [d for d in docs if d["kind"] == body["kind"] and d["metadata"]["name"] == body["metadata"]["name"]]
        docs[docs.index(target)] = _strategic_merge(target, body)
    for label in kustomization.get("labels", []):
        for doc in docs:
            doc.setdefault("metadata", {}).setdefault("labels", {}).update(label["pairs"])
    for image in kustomization.get("images", []):
        for container in _all_containers(docs):
            name, _, tag = container["image"].partition(":")
            if name == image["name"]:
                container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"
    return docs


_MERGE_KEYS = {"containers": "name", "initContainers": "name", "volumes": "name", "env": "name", "ports": "containerPort", "volumeMounts": "mountPath"}


def _strategic_merge(base: Any, patch: Any, key: str | None = None) -> Any:
    if isinstance(base, dict) and isinstance(patch, dict):
        out = copy.deepcopy(base)
        for k, v in patch.items():
            if v is None:
                out.pop(k, None)
            elif k in out:
                out[k] = _strategic_merge(out[k], v, k)
            else:
                out[k] = copy.deepcopy(v)
        return out
    if isinstance(base, list) and isinstance(patch, list) and key in _MERGE_KEYS:
        merge_key = _MERGE_KEYS[key]
        out = copy.deepcopy(base)
        for item in patch:
            index = next((i for i, b in enumerate(out) if b.get(merge_key) == item.get(merge_key)), None)
            if item.get("$patch") == "delete":
                if index is not None:
                    del out[index]
            elif index is None:
                out.insert(0, copy.deepcopy(item))
            else:
                out[index] = _strategic_merge(out[index], item)
        return out
    return copy.deepcopy(patch)


def _all_containers(docs: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for doc in docs:
        spec = doc.get("spec", {}).get("template", {}).get("spec", {})
        yield from spec.get("containers", [])
        yield from spec.get("initContainers", [])


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def container(pod_spec: dict[str, Any], name: str, init: bool = False) -> dict[str, Any]:
    found = [c for c in pod_spec.get("initContainers" if init else "containers", []) if c["name"] == name]
    assert len(found) == 1, f"expected one container {name!r}"
    return found[0]


def configmap_for_mount(docs: list[dict[str, Any]], pod_spec: dict[str, Any], volume_name: str) -> dict[str, Any]:
    (volume,) = [v for v in pod_spec["volumes"] if v["name"] == volume_name]
    assert "configMap" in volume, f"volume {volume_name!r} is not a ConfigMap"
    name = volume["configMap"]["name"]
    found = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == name]
    assert found, f"volume {volume_name!r} names ConfigMap {name!r}, which the build does not contain"
    return found[0]


# -- a live proxy ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_get(url: str, timeout: float = 3.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def status_of(url: str) -> int | None:
    try:
        return http_get(url, timeout=2.0)[0]
    except OSError:
        return None


def rewrite(text: str, replacements: dict[str, str]) -> str:
    """Replace strings that must be there: a config that drifts fails here, loudly."""
    for old, new in replacements.items():
        assert old in text, f"expected {old!r} in the config"
        text = text.replace(old, new)
    return text


def carbon_proxy_command() -> list[str]:
    """The `carbon-proxy` console script of this environment (the image's ENTRYPOINT)."""
    script = Path(sys.executable).with_name("carbon-proxy")
    return [str(script)] if script.exists() else [sys.executable, "-m", "proxy"]


@dataclass
class ProxyProcess:
    process: subprocess.Popen[str]
    config: Config
    log_path: Path

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.config.server.admin_listen.port}"

    @property
    def public(self) -> str:
        return f"http://127.0.0.1:{self.config.server.listen.port}"

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")


@contextlib.contextmanager
def running_proxy(args: list[str], workdir: Path, env: dict[str, str] | None = None) -> Iterator[ProxyProcess]:
    """`carbon-proxy <args>` (args as the image/manifests pass them), until /healthz answers."""
    parsed = parse_serve(args)
    config = load_config(parsed.config)
    log_path = workdir / "proxy.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            carbon_proxy_command() + args, cwd=workdir, stdout=log, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})}
        )
    proxy = ProxyProcess(process, config, log_path)
    try:
        wait_for(lambda: process.poll() is not None or status_of(proxy.admin + "/healthz") == 200, 30, "the proxy's /healthz")
        assert process.poll() is None, f"carbon-proxy exited {process.returncode}:\n{proxy.log()}"
        yield proxy
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=config.server.drain_seconds + 10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


# -- a model server and DCGM exporter stand-in ----------------------------------------


@dataclass
class FakeModelServer:
    """OpenAI chat completions (model "slow" answers after `slow_seconds`), GET /health,
    and /metrics in the DCGM exporter's format: one counter per (gpu, pod) in `gpus`,
    rising 300 W while the server runs."""

    gpus: list[dict[str, str]] = field(default_factory=lambda: [{"gpu": "0"}])
    slow_seconds: float = 1.5
    port: int = 0
    in_flight: int = 0
    _server: http.server.ThreadingHTTPServer | None = None
    _started: float = field(default_factory=time.monotonic)

    def start(self) -> "FakeModelServer":
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if self.path == "/metrics":
                    self._send(200, fake.metrics().encode(), "text/plain; version=0.0.4")
                elif self.path == "/health":
                    self._send(200, b"{}", "application/json")
                else:
                    self._send(404, b"{}", "application/json")

            def do_POST(self) -> None:
                request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                fake.in_flight += 1
                try:
                    if request.get("model") == "slow":
                        time.sleep(fake.slow_seconds)
                finally:
                    fake.in_flight -= 1
                body = {
                    "id": "chatcmpl-1",
                    "object": "chat.completion",
                    "model": request.get("model", "m"),
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
                }
                self._send(200, json.dumps(body).encode(), "application/json")

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def metrics(self) -> str:
        millijoules = int((time.monotonic() - self._started) * 300_000) + 1_000_000
        lines = ["# TYPE DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION counter"]
        for labels in self.gpus:
            rendered = ",".join(f'{k}="{v}"' for k, v in {**labels, "modelName": "NVIDIA H100 80GB HBM3"}.items())
            lines.append(f"DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{{{rendered}}} {millijoules}")
        return "\n".join(lines) + "\n"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def post_json(url: str, body: dict[str, Any], timeout: float = 10.0) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
