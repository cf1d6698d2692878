"""deploy/docker-compose.yml: `docker compose config` where the plugin exists, and
everywhere a structural check that the services, configs, ports, health checks and
drain time agree with the proxy's config files and flags."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from proxy.config import Config, load_config

from .support import (
    DEPLOY,
    GRAFANA_DIR,
    PROMETHEUS_DIR,
    REPO,
    compose_file,
    compose_plugin,
    dockerfile,
    duration_seconds,
    flag_value,
    parse_serve,
    service_mount,
)

COMPOSE = compose_file()
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
PROXIES = ("proxy", "proxy-gpu", "fleet-a", "fleet-b")
DEFAULT = {"sim", "proxy", "traffic", "prometheus", "grafana"}
GPU = {"vllm", "dcgm-exporter", "proxy-gpu"}
FLEET = {"postgres", "fleet-a", "fleet-b"}
IMAGE_CMD = next(i for i in dockerfile() if i.keyword == "CMD").exec_form()


def image_config_path() -> str:
    return parse_serve(IMAGE_CMD).config


def host_path(source: str) -> Path:
    return (DEPLOY / source).resolve()


def proxy_config(name: str) -> Config:
    source = service_mount(SERVICES[name], image_config_path())
    assert source is not None, f"{name} must mount its config at {image_config_path()}, the path the image's CMD reads"
    return load_config(host_path(source))


def listen_port(service: dict[str, Any]) -> int:
    """The port a model server listens on, from its --port flag."""
    command = service.get("command", [])
    return int(flag_value(command, "--port") or 0)


@pytest.mark.parametrize("profiles", [[], ["gpu"], ["fleet"]], ids=["default", "gpu", "fleet"])
def test_docker_compose_config_accepts_the_file(profiles: list[str]) -> None:
    compose = compose_plugin()
    if compose is None:
        pytest.skip("no `docker compose` plugin on this machine; the structural tests below still run")
    flags = [arg for p in profiles for arg in ("--profile", p)]
    out = subprocess.run([*compose, "-f", str(DEPLOY / "docker-compose.yml"), *flags, "config", "--quiet"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_default_profile_is_the_sim_stack_and_gpu_profile_adds_real_hardware() -> None:
    assert {name for name, s in SERVICES.items() if not s.get("profiles")} == DEFAULT
    assert {name for name, s in SERVICES.items() if s.get("profiles")} == GPU | FLEET
    assert all(SERVICES[name]["profiles"] == ["gpu"] for name in GPU)
    assert all(SERVICES[name]["profiles"] == ["fleet"] for name in FLEET)


def test_fleet_replicas_share_one_pinned_postgres() -> None:
    image = SERVICES["postgres"]["image"]
    assert not image.endswith(":latest") and ":" in image and "latest" not in image.split(":", 1)[1]
    dsns = set()
    for name in ("fleet-a", "fleet-b"):
        service = SERVICES[name]
        assert "postgres" in service["depends_on"] and service["depends_on"]["postgres"]["condition"] == "service_healthy"
        dsn = service["environment"]["CARBON_PROXY_DSN"]
        assert urlsplit(dsn).hostname == "postgres" and urlsplit(dsn).port == 5432
        dsns.add(dsn)
    assert len(dsns) == 1, "both replicas ship to the same database"
    volumes = {name: service_mount(SERVICES[name], "/var/lib/carbon-proxy") for name in ("fleet-a", "fleet-b")}
    assert len(set(volumes.values())) == 2, "each replica keeps its own outbox"


@pytest.mark.parametrize("name", PROXIES)
def test_proxies_run_the_image_cmd_from_deploy_dockerfile(name: str) -> None:
    service = SERVICES[name]
    assert service["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
    assert (host_path(service["build"]["context"]) / service["build"]["dockerfile"]).is_file()
    assert "command" not in service and "entrypoint" not in service, "the same arguments as the image and the manifests"
    proxy_config(name)  # parses and validates, as `serve` would


@pytest.mark.parametrize("name", PROXIES)
def test_proxy_ports_and_health_match_its_config(name: str) -> None:
    service, config = SERVICES[name], proxy_config(name)
    targets = {}
    for mapping in service["ports"]:
        *host, container = mapping.split(":")
        targets[int(container)] = host
    assert set(targets) == {config.server.listen.port, config.server.admin_listen.port}
    assert config.server.listen.host == config.server.admin_listen.host == "0.0.0.0"
    admin_host = targets[config.server.admin_listen.port]
    assert admin_host[0] == "127.0.0.1", "the admin port (metrics, health) is published on the loopback only"
    # Health: the image's HEALTHCHECK command, pointed at /readyz of this config's admin port.
    assert service["environment"]["CARBON_PROXY_HEALTH_URL"] == f"http://127.0.0.1:{config.server.admin_listen.port}/readyz"
    assert "test" not in service["healthcheck"], "inherits the image's HEALTHCHECK command"


@pytest.mark.parametrize("name", PROXIES)
def test_stop_grace_period_covers_the_sigterm_drain(name: str) -> None:
    config = proxy_config(name)
    grace = duration_seconds(SERVICES[name]["stop_grace_period"])
    assert grace >= config.server.drain_seconds + 5, f"{name}: stop_grace_period {grace:g}s < drain {config.server.drain_seconds:g}s + 5s"


@pytest.mark.parametrize("name", PROXIES)
def test_proxy_urls_name_compose_services_on_their_ports(name: str) -> None:
    config = proxy_config(name)
    urls = [u.url for u in config.upstreams]
    if "url" in config.meter.options:
        urls.append(config.meter.options["url"])
    for url in urls:
        parts = urlsplit(url)
        assert parts.hostname in SERVICES, f"{url}: no compose service {parts.hostname!r}"
        target = SERVICES[parts.hostname]
        assert set(target.get("profiles", [])) <= set(SERVICES[name].get("profiles", [])), f"{url}: not started with {name}"
        if parts.hostname in ("sim", "vllm"):
            assert parts.port == listen_port(target), f"{url}: {parts.hostname} listens on {listen_port(target)}"
        depends = SERVICES[name].get("depends_on", {})
        if parts.hostname != "dcgm-exporter":
            assert parts.hostname in depends


def test_default_proxy_meters_the_sim_like_a_dcgm_exporter() -> None:
    config = proxy_config("proxy")
    assert config.meter.kind == "scrape"
    assert urlsplit(config.meter.options["url"]).path == "/metrics"
    assert config.meter.options.get("preset", "dcgm") == "dcgm"


def test_gpu_proxy_sees_the_gpu_that_vllm_runs_on() -> None:
    def devices(service: dict[str, Any]) -> list[dict[str, Any]]:
        return service["deploy"]["resources"]["reservations"]["devices"]

    (vllm_gpu,) = devices(SERVICES["vllm"])
    (proxy_gpu,) = devices(SERVICES["proxy-gpu"])
    assert vllm_gpu["driver"] == proxy_gpu["driver"] == "nvidia"
    assert proxy_gpu["device_ids"] == vllm_gpu["device_ids"] and len(vllm_gpu["device_ids"]) == 1
    config = proxy_config("proxy-gpu")
    assert config.meter.kind in ("nvml", "scrape")
    if config.meter.kind == "nvml":
        # One GPU is visible in the container, so NVML numbers it 0.
        assert [u.devices for u in config.upstreams] == [("0",)]
    assert SERVICES["dcgm-exporter"]["environment"]["DCGM_EXPORTER_INTERVAL"] == "1000"


def test_sim_runs_from_the_same_image_with_its_own_entry_point() -> None:
    sim = SERVICES["sim"]
    assert sim["image"] == SERVICES["proxy"]["image"]
    assert sim["entrypoint"] == ["python", "-m", "proxy.sim"]
    assert flag_value(sim["command"], "--host") == "0.0.0.0"
    # Inherits the image's HEALTHCHECK command, pointed at the sim's health endpoint.
    assert sim["environment"]["CARBON_PROXY_HEALTH_URL"] == f"http://127.0.0.1:{listen_port(sim)}/health"


def test_sim_accepts_the_flags_compose_passes() -> None:
    if not (REPO / "proxy" / "sim" / "__main__.py").is_file():
        pytest.skip("proxy/sim/__main__.py (`python -m proxy.sim`) is not written yet")
    out = subprocess.run([sys.executable, "-m", "proxy.sim", "--help"], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stderr
    for flag in SERVICES["sim"]["command"][::2]:
        assert flag in out.stdout, f"python -m proxy.sim has no {flag}"


def test_traffic_goes_through_the_proxy_as_allowed_tenants() -> None:
    traffic, config = SERVICES["traffic"], proxy_config("proxy")
    url = urlsplit(traffic["environment"]["TRAFFIC_URL"])
    assert (url.hostname, url.port) == ("proxy", config.server.listen.port)
    assert any(url.path.startswith(route) for u in config.upstreams for route in u.routes)
    script = traffic["command"][0]
    compile(script, "traffic", "exec")
    assert config.tenants["header"] in script
    assert all(f'"{tenant}"' in script for tenant in config.tenants["allow"])
    assert "$" not in script, "compose would interpolate it"
    assert traffic["healthcheck"] == {"disable": True}


def test_depends_on_waits_only_for_services_with_a_health_check() -> None:
    for name, service in SERVICES.items():
        for dependency, rule in service.get("depends_on", {}).items():
            assert dependency in SERVICES, f"{name} depends on unknown {dependency}"
            if rule.get("condition") == "service_healthy":
                target = SERVICES[dependency]
                assert "healthcheck" in target, f"{name} waits for {dependency} to be healthy, which has no health check"
                inherits = "test" not in target["healthcheck"]
                assert not inherits or target.get("build", {}).get("dockerfile") == "deploy/Dockerfile"


def test_named_volumes_are_declared() -> None:
    declared = set(COMPOSE.get("volumes", {}))
    for name, service in SERVICES.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith("."):
                assert source in declared, f"{name}: volume {source!r} is not declared"


def test_own_bind_mounts_exist() -> None:
    for name, service in SERVICES.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith(".") and not host_path(source).is_relative_to(PROMETHEUS_DIR) and not host_path(source).is_relative_to(GRAFANA_DIR):
                assert host_path(source).exists(), f"{name} mounts {source}, which does not exist"


# -- the parts that deploy/prometheus and grafana/ provide ----------------------------


def test_prometheus_mount_holds_the_config_it_is_started_with() -> None:
    prometheus = SERVICES["prometheus"]
    source = service_mount(prometheus, "/etc/prometheus")
    assert source is not None and host_path(source) == PROMETHEUS_DIR
    config_flag = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    relative = Path(config_flag.split("=", 1)[1]).relative_to("/etc/prometheus")
    if not PROMETHEUS_DIR.is_dir():
        pytest.skip("deploy/prometheus/ is not written yet (another engineer's part)")
    assert (PROMETHEUS_DIR / relative).is_file(), f"compose starts Prometheus with {config_flag}"


def _scrape_targets() -> list[str]:
    """host:port of every static target and every DNS-discovered name (A records)."""
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    targets = []
    for job in config.get("scrape_configs", []):
        for static in job.get("static_configs", []):
            targets += static.get("targets", [])
        for dns in job.get("dns_sd_configs", []):
            if dns.get("type", "SRV") in ("A", "AAAA"):
                targets += [f"{name}:{dns['port']}" for name in dns.get("names", [])]
    return targets


def test_prometheus_scrapes_the_proxies_admin_ports() -> None:
    if not (PROMETHEUS_DIR / "prometheus.yml").is_file():
        pytest.skip("deploy/prometheus/prometheus.yml is not written yet (another engineer's part)")
    targets = _scrape_targets()
    for name in PROXIES:
        wanted = f"{name}:{proxy_config(name).server.admin_listen.port}"
        assert wanted in targets, f"Prometheus does not scrape {wanted} (targets: {targets})"
    for target in targets:
        host, _, port = target.rpartition(":")
        if host in PROXIES:
            assert int(port) == proxy_config(host).server.admin_listen.port, target
        elif host in ("sim", "vllm"):
            assert int(port) == listen_port(SERVICES[host]), target


def test_grafana_provisioning_is_mounted_where_grafana_reads_it() -> None:
    grafana = SERVICES["grafana"]
    provisioning = service_mount(grafana, "/etc/grafana/provisioning")
    dashboards = service_mount(grafana, "/var/lib/grafana/dashboards")
    assert provisioning is not None and host_path(provisioning) == GRAFANA_DIR / "provisioning"
    assert dashboards is not None and host_path(dashboards) == GRAFANA_DIR / "dashboards"
    if not (GRAFANA_DIR / "provisioning").is_dir():
        pytest.skip("grafana/provisioning/ is not written yet (another engineer's part)")
    home = Path(grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert (host_path(dashboards) / home.relative_to("/var/lib/grafana/dashboards")).is_file(), f"no home dashboard {home}"
    for path in sorted((GRAFANA_DIR / "provisioning" / "datasources").glob("*.y*ml")):
        for source in yaml.safe_load(path.read_text()).get("datasources", []):
            if source.get("type") == "prometheus":
                assert urlsplit(source["url"]).netloc == "prometheus:9090", f"{path.name}: {source['url']}"
    for path in sorted((GRAFANA_DIR / "provisioning" / "dashboards").glob("*.y*ml")):
        for provider in yaml.safe_load(path.read_text()).get("providers", []):
            folder = provider.get("options", {}).get("path", "")
            assert folder.startswith("/var/lib/grafana/dashboards"), f"{path.name}: provider reads {folder}, not the mounted dashboards"
