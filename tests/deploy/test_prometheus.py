"""promtool on what the deploy files hand to Prometheus: the compose stack's config (with
the rule files it loads) and the rule groups inside the Kubernetes PrometheusRule.
Skipped where promtool is missing, except under CI=true (.ci/run installs it)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

from .support import KUBERNETES, PROMETHEUS_DIR, skip_or_fail


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        skip_or_fail("promtool is not installed (Debian: apt-get install prometheus)")
    return path  # type: ignore[return-value]


def test_promtool_check_config() -> None:
    config = PROMETHEUS_DIR / "prometheus.yml"
    if not config.is_file():
        skip_or_fail("deploy/prometheus/prometheus.yml is not written yet (another engineer's part)")
    # Also checks every rule file that rule_files names.
    out = subprocess.run([promtool(), "check", "config", str(config)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_check_rules_of_the_prometheusrule(tmp_path: Path) -> None:
    rule = yaml.safe_load((KUBERNETES / "base" / "prometheusrule.yaml").read_text())
    groups = rule["spec"]["groups"]
    if not groups:
        skip_or_fail("the PrometheusRule has no groups yet: run python deploy/kubernetes/sync_rules.py")
    rules = tmp_path / "rules.yml"
    rules.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    out = subprocess.run([promtool(), "check", "rules", str(rules)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
