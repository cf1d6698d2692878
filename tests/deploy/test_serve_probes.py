"""A real `carbon-proxy serve` started with the arguments the Dockerfile and the
Kubernetes manifests give it (only the config path, hosts and ports swapped for local
ones), probed the way Docker and kubelet probe it: /healthz, /readyz, SIGTERM."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest

from .support import (
    DEPLOY,
    KUBERNETES,
    FakeModelServer,
    compose_file,
    container,
    dockerfile,
    dockerfile_env,
    free_port,
    healthcheck_command,
    http_get,
    kustomize_build,
    one,
    post_json,
    rewrite,
    running_proxy,
    status_of,
    wait_for,
)

INSTRUCTIONS = dockerfile()
IMAGE_CMD = next(i for i in INSTRUCTIONS if i.keyword == "CMD").exec_form()
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def with_config(args: list[str], path: Path) -> list[str]:
    """The same arguments, the --config path swapped for a local file."""
    i = args.index("--config")
    return [*args[: i + 1], str(path), *args[i + 2 :]]


def local_ports(text: str) -> str:
    """Both listeners on free loopback ports (the files bind 0.0.0.0 on fixed ports)."""
    text = re.sub(r'(?m)^listen = ".*"$', f'listen = "127.0.0.1:{free_port()}"', text)
    return re.sub(r'(?m)^admin_listen = ".*"$', f'admin_listen = "127.0.0.1:{free_port()}"', text)


def healthcheck(url: str) -> int:
    """Exit status of the image's HEALTHCHECK command, pointed at `url` as the image and
    compose point it (CARBON_PROXY_HEALTH_URL)."""
    command = healthcheck_command(INSTRUCTIONS)
    assert command[0] == "python"
    return subprocess.run([sys.executable, *command[1:]], env={"CARBON_PROXY_HEALTH_URL": url}, capture_output=True, timeout=30).returncode


def compose_config(tmp_path: Path, upstream: FakeModelServer, drain_seconds: int = 30) -> Path:
    text = (DEPLOY / "carbon-proxy.toml").read_text()
    text = rewrite(text, {"http://sim:8000": upstream.url, "/var/lib/carbon-proxy/receipts.db": str(tmp_path / "receipts.db")})
    text = re.sub(r"(?m)^drain_seconds = .*$", f"drain_seconds = {drain_seconds}", text)
    path = tmp_path / "carbon-proxy.toml"
    path.write_text(local_ports(text))
    return path


def test_image_cmd_healthz_readyz_and_healthcheck(tmp_path: Path) -> None:
    upstream = FakeModelServer().start()
    try:
        with running_proxy(with_config(IMAGE_CMD, compose_config(tmp_path, upstream)), tmp_path) as proxy:
            assert http_get(proxy.admin + "/healthz")[0] == 200
            wait_for(lambda: status_of(proxy.admin + "/readyz") == 200, 15, "/readyz 200 with the upstream and its DCGM page up")
            assert post_json(proxy.public + "/v1/chat/completions", CHAT)[0] == 200
            # The Dockerfile's HEALTHCHECK (liveness), and compose's use of it on /readyz.
            image_url = dockerfile_env(INSTRUCTIONS, max(i.stage for i in INSTRUCTIONS))["CARBON_PROXY_HEALTH_URL"]
            assert image_url.endswith("/healthz")
            assert healthcheck(proxy.admin + "/healthz") == 0
            compose_url = compose_file()["services"]["proxy"]["environment"]["CARBON_PROXY_HEALTH_URL"]
            assert urlsplit(compose_url).path == "/readyz"
            assert healthcheck(proxy.admin + "/readyz") == 0

            upstream.stop()
            wait_for(lambda: status_of(proxy.admin + "/readyz") == 503, 15, "/readyz 503 with the upstream down")
            status, body = http_get(proxy.admin + "/readyz")
            assert b'"not_ready"' in body
            # Liveness does not depend on the upstream: no restart loop while it is away.
            assert http_get(proxy.admin + "/healthz")[0] == 200
            assert healthcheck(proxy.admin + "/healthz") == 0
            assert healthcheck(proxy.admin + "/readyz") != 0
        assert healthcheck(proxy.admin + "/healthz") != 0, "a stopped proxy fails the health check"
    finally:
        upstream.stop()


def test_sigterm_drains_an_in_flight_request_then_exits(tmp_path: Path) -> None:
    upstream = FakeModelServer(slow_seconds=1.5).start()
    try:
        with running_proxy(with_config(IMAGE_CMD, compose_config(tmp_path, upstream, drain_seconds=10)), tmp_path) as proxy:
            wait_for(lambda: status_of(proxy.admin + "/readyz") == 200, 15, "/readyz 200")
            result: dict[str, Any] = {}
            thread = threading.Thread(target=lambda: result.update(r=post_json(proxy.public + "/v1/chat/completions", {**CHAT, "model": "slow"})))
            thread.start()
            wait_for(lambda: upstream.in_flight > 0, 5, "the slow request to reach the model server")
            proxy.process.send_signal(signal.SIGTERM)
            thread.join(15)
            assert result["r"][0] == 200, "the in-flight request completes during the drain"
            assert proxy.process.wait(timeout=proxy.config.server.drain_seconds + 5) == 0, proxy.log()
    finally:
        upstream.stop()


def k8s_proxy(docs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    spec = one(docs, "Deployment")["spec"]["template"]["spec"]
    return spec, container(spec, "carbon-proxy")


def probe_url(proxy_container: dict[str, Any], probe: str, admin_port: int) -> str:
    """kubelet's URL for a probe: the named port resolved through the container's ports."""
    get = proxy_container[probe]["httpGet"]
    named = {p["name"]: p["containerPort"] for p in proxy_container["ports"]}
    port = named[get["port"]] if isinstance(get["port"], str) else get["port"]
    assert port == named["admin"]
    return f"http://127.0.0.1:{admin_port}{get['path']}"


def test_kubernetes_base_args_and_probes(tmp_path: Path) -> None:
    docs = kustomize_build(KUBERNETES / "base")
    _, proxy_container = k8s_proxy(docs)
    (configmap,) = [d for d in docs if d["kind"] == "ConfigMap"]
    text = configmap["data"]["carbon-proxy.toml"]
    upstream_port = free_port()
    # No GPU here: the estimate meter stands in for NVML; the rest is the manifest's.
    text = rewrite(
        text,
        {
            'kind = "nvml"': 'kind = "estimate"',
            "http://127.0.0.1:8000": f"http://127.0.0.1:{upstream_port}",
            "/var/lib/carbon-proxy/receipts.db": str(tmp_path / "receipts.db"),
        },
    )
    path = tmp_path / "carbon-proxy.toml"
    path.write_text(local_ports(text))
    with running_proxy(with_config(proxy_container["args"], path), tmp_path) as proxy:
        admin = proxy.config.server.admin_listen.port
        liveness, readiness = probe_url(proxy_container, "livenessProbe", admin), probe_url(proxy_container, "readinessProbe", admin)
        assert http_get(liveness)[0] == 200
        assert http_get(readiness)[0] == 503, "not ready while vLLM is still loading (port closed)"
        upstream = FakeModelServer(port=upstream_port).start()
        try:
            wait_for(lambda: status_of(readiness) == 200, 15, "readiness once vLLM answers")
            assert post_json(proxy.public + "/v1/chat/completions", CHAT)[0] == 200
        finally:
            upstream.stop()
        wait_for(lambda: status_of(readiness) == 503, 15, "readiness 503 once vLLM is gone")
        assert http_get(liveness)[0] == 200


def test_kubernetes_dcgm_overlay_meters_only_this_pods_gpu(tmp_path: Path) -> None:
    docs = kustomize_build(KUBERNETES / "overlays" / "dcgm")
    spec, proxy_container = k8s_proxy(docs)
    (configmap,) = [d for d in docs if d["kind"] == "ConfigMap"]
    upstream = FakeModelServer(
        gpus=[
            {"gpu": "0", "pod": "other-pod", "namespace": "llm"},
            {"gpu": "1", "pod": "vllm-7d9f-abc", "namespace": "llm"},
        ]
    ).start()
    try:
        text = rewrite(
            configmap["data"]["carbon-proxy.toml"],
            {
                "http://127.0.0.1:8000": upstream.url,
                "http://nvidia-dcgm-exporter.gpu-operator.svc:9400/metrics": upstream.url + "/metrics",
                "/var/lib/carbon-proxy/receipts.db": str(tmp_path / "receipts.db"),
            },
        )
        (tmp_path / "template").mkdir()
        (tmp_path / "config").mkdir()
        (tmp_path / "template" / "carbon-proxy.toml").write_text(local_ports(text))
        # The render-config init container's command, as written in the manifest.
        render = container(spec, "render-config", init=True)
        args = [a.replace("/etc/carbon-proxy-template", str(tmp_path / "template")).replace("/etc/carbon-proxy", str(tmp_path / "config")) for a in render["command"][1:]]
        out = subprocess.run([sys.executable, *args], env={"POD_NAME": "vllm-7d9f-abc", "POD_NAMESPACE": "llm"}, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        config_path = tmp_path / "config" / PurePosixPath(proxy_container["args"][proxy_container["args"].index("--config") + 1]).name
        with running_proxy(with_config(proxy_container["args"], config_path), tmp_path) as proxy:
            readiness = probe_url(proxy_container, "readinessProbe", proxy.config.server.admin_listen.port)
            wait_for(lambda: status_of(readiness) == 200, 15, "readiness with the exporter up")
            assert post_json(proxy.public + "/v1/chat/completions", CHAT)[0] == 200
            metrics = http_get(proxy.admin + "/metrics")[1].decode()
            devices = set(re.findall(r'^carbon_proxy_device_energy_joules(?:_total)?\{[^}]*device="([^"]+)"', metrics, re.M))
            if not devices:
                pytest.skip("the proxy exports no carbon_proxy_device_energy_joules yet")
            assert devices == {"1"}, "only the GPU the exporter attributes to this pod"
    finally:
        upstream.stop()


def test_default_compose_stack_without_docker(tmp_path: Path) -> None:
    """The default profile's processes with compose's own commands: the sim model server,
    the proxy (image CMD, deploy/carbon-proxy.toml) metering the sim's DCGM-style
    /metrics, and the traffic generator; requests show up per tenant."""
    services = compose_file()["services"]
    sim, traffic = services["sim"], services["traffic"]
    sim_port = free_port()
    assert sim["entrypoint"][0] == "python"
    sim_args = [sys.executable, *sim["entrypoint"][1:], *sim["command"]]
    sim_args[sim_args.index("--host") + 1] = "127.0.0.1"
    sim_args[sim_args.index("--port") + 1] = str(sim_port)
    sim_url = f"http://127.0.0.1:{sim_port}"
    processes: list[subprocess.Popen[bytes]] = []
    try:
        processes.append(subprocess.Popen(sim_args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_for(lambda: status_of(sim_url + "/health") == 200, 30, "the sim model server")
        text = rewrite((DEPLOY / "carbon-proxy.toml").read_text(), {"http://sim:8000": sim_url, "/var/lib/carbon-proxy/receipts.db": str(tmp_path / "receipts.db")})
        (tmp_path / "carbon-proxy.toml").write_text(local_ports(text))
        with running_proxy(with_config(IMAGE_CMD, tmp_path / "carbon-proxy.toml"), tmp_path) as proxy:
            wait_for(lambda: status_of(proxy.admin + "/readyz") == 200, 15, "/readyz 200 with the sim up")
            url = urlsplit(traffic["environment"]["TRAFFIC_URL"])
            assert traffic["entrypoint"] == ["python", "-c"]
            processes.append(
                subprocess.Popen([sys.executable, "-c", *traffic["command"]], env={"TRAFFIC_URL": proxy.public + url.path}, stdout=subprocess.DEVNULL)
            )

            def tenants_seen() -> set[str]:
                page = http_get(proxy.admin + "/metrics")[1].decode()
                return set(re.findall(r'^carbon_proxy_requests_total\{[^}]*tenant="([^"]+)"', page, re.M))

            wait_for(lambda: len(tenants_seen()) >= 2, 30, "traffic from several tenants in the proxy's metrics")
            assert tenants_seen() <= set(proxy.config.tenants["allow"])
    finally:
        for process in processes:
            process.kill()
            process.wait()
