"""Release hygiene (issue 19): a licence, one version shown everywhere, pinned images.

The wheel itself is built, installed and run by `.ci/wheel-smoke` (CI runs it after the
suite); these tests check the files that decide what it contains and what gets deployed.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path
from typing import Any, Iterator

import pytest

import proxy
from proxy.cli import main as cli_main

from .support import DEPLOY, REPO, compose_file, dockerfile, kustomize_build

KUSTOMIZE_DIRS = {"base": DEPLOY / "kubernetes" / "base", "dcgm": DEPLOY / "kubernetes" / "overlays" / "dcgm"}
# A tag that names a release: v0.11.0, 2.55.1, 4.2.3-4.1.3-ubuntu22.04, 3.11-slim-bookworm.
RELEASE_TAG = re.compile(r"v?\d+(\.\d+)+([.-][A-Za-z0-9.]+)*")


def pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def split_image(image: str) -> tuple[str, str | None]:
    """('registry/name', 'tag') of an image reference; a digest counts as pinned."""
    if "@sha256:" in image:
        name, _, digest = image.partition("@")
        return name, digest
    name, _, tag = image.rpartition(":")
    if not name or "/" in tag:  # no tag at all (a ':' there was a registry port)
        return image, None
    return name, tag


def assert_pinned(where: str, image: str) -> None:
    _, tag = split_image(image)
    assert tag is not None, f"{where}: {image!r} has no tag (that is :latest)"
    assert tag != "latest" and not tag.startswith("latest"), f"{where}: {image!r} uses :latest, not a tested release"
    assert tag.startswith("sha256:") or RELEASE_TAG.fullmatch(tag), f"{where}: {image!r} is not a release tag"


def compose_images() -> Iterator[tuple[str, str]]:
    for name, service in compose_file()["services"].items():
        yield f"compose service {name}", service["image"]


def kustomize_images(directory: Path) -> Iterator[tuple[str, str]]:
    for doc in kustomize_build(directory):
        spec = doc.get("spec", {}).get("template", {}).get("spec", {})
        for c in [*spec.get("containers", []), *spec.get("initContainers", [])]:
            yield f"{directory.name} {doc['kind']}/{doc['metadata']['name']} container {c['name']}", c["image"]


# -- licence and packaging ------------------------------------------------------------


def test_licence_file_holds_the_apache_2_text() -> None:
    text = (REPO / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    # The full text, not a pointer to it: the terms and the appendix are there.
    for section in ("1. Definitions.", "4. Redistribution.", "9. Accepting Warranty or Additional Liability.", "APPENDIX"):
        assert section in text, section


def test_pyproject_declares_the_licence_as_an_spdx_expression() -> None:
    data = pyproject()
    assert data["project"]["license"] == "Apache-2.0", "a plain SPDX string (PEP 639), not the deprecated table"
    assert data["project"]["license-files"] == ["LICENSE"]
    (setuptools,) = [r for r in data["build-system"]["requires"] if r.startswith("setuptools")]
    minimum = re.fullmatch(r"setuptools>=(\d+)(\.\d+)*", setuptools)
    assert minimum and int(minimum.group(1)) >= 77, f"SPDX license strings need setuptools 77, got {setuptools!r}"


def test_the_version_has_one_source() -> None:
    data = pyproject()
    assert "version" not in data["project"] and "version" in data["project"]["dynamic"]
    assert data["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "proxy.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+([ab]|rc)?\d*", proxy.__version__)


def test_cli_prints_the_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"carbon-proxy {proxy.__version__}"


def test_image_label_carries_the_package_version() -> None:
    labels: dict[str, str] = {}
    for instruction in dockerfile():
        if instruction.keyword == "LABEL":
            labels.update(token.split("=", 1) for token in shlex.split(instruction.value))  # type: ignore[misc]
    assert labels.get("org.opencontainers.image.version") == proxy.__version__
    assert labels.get("org.opencontainers.image.licenses") == "Apache-2.0"


def test_wheel_build_copies_the_licence_into_the_image_build() -> None:
    copies = " ".join(i.value for i in dockerfile() if i.keyword == "COPY")
    assert "LICENSE" in copies, "pyproject's license-files: the wheel build in the image needs it"


def test_ci_runs_the_wheel_smoke_after_the_suite() -> None:
    lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert "make test" in lines
    (smoke,) = [i for i, line in enumerate(lines) if line.startswith(".ci/wheel-smoke")]
    assert smoke > lines.index("make test")


# -- images: every one pinned, ours at the package version -----------------------------


def test_compose_pins_every_image() -> None:
    images = list(compose_images())
    assert any("vllm" in image for _, image in images)
    for where, image in images:
        assert_pinned(where, image)


@pytest.mark.parametrize("build", sorted(KUSTOMIZE_DIRS))
def test_kustomize_pins_every_image(build: str) -> None:
    images = list(kustomize_images(KUSTOMIZE_DIRS[build]))
    assert images
    for where, image in images:
        assert_pinned(where, image)


def test_manifests_pin_images_even_before_kustomize_rewrites_them() -> None:
    """`kubectl apply -f deployment.yaml` (no kustomize) must not pull :latest either."""
    for path in (DEPLOY / "kubernetes").rglob("*.yaml"):
        for match in re.finditer(r"^\s*(?:-\s*)?image:\s*(\S+)", path.read_text(encoding="utf-8"), re.M):
            assert_pinned(str(path.relative_to(REPO)), match.group(1))
        for match in re.finditer(r"^\s*newTag:\s*(\S+)", path.read_text(encoding="utf-8"), re.M):
            assert_pinned(str(path.relative_to(REPO)), f"image:{match.group(1)}")


def test_our_image_is_the_package_version_everywhere() -> None:
    ours = [(w, i) for w, i in compose_images() if split_image(i)[0] == "carbon-proxy"]
    for directory in KUSTOMIZE_DIRS.values():
        ours += [(w, i) for w, i in kustomize_images(directory) if split_image(i)[0] == "carbon-proxy"]
    assert len(ours) >= 4
    for where, image in ours:
        assert split_image(image)[1] == proxy.__version__, f"{where}: {image} is not version {proxy.__version__}"


@pytest.mark.parametrize(
    "image, pinned",
    [
        ("vllm/vllm-openai:latest", False),
        ("vllm/vllm-openai", False),
        ("registry:5000/vllm/vllm-openai", False),
        ("prom/prometheus:latest-arm64", False),
        ("vllm/vllm-openai:v0.11.0", True),
        ("registry:5000/grafana/grafana:11.3.0", True),
        ("python@sha256:" + "0" * 64, True),
    ],
)
def test_the_pin_check_itself(image: str, pinned: bool) -> None:
    if pinned:
        assert_pinned("example", image)
    else:
        with pytest.raises(AssertionError):
            assert_pinned("example", image)
