"""The Dockerfiles, checked without a Docker engine: hadolint, the pins against pyproject.toml and the chart, the
install steps against the Makefile's (the ones CI runs), and what the images need from the build context."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"
MLFLOW_DOCKERFILE = REPO / "docker" / "mlflow.Dockerfile"


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in path.read_text().splitlines() if not line.startswith("#")))
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"(?m)^(\w+)\s+(.*)$", text)]


def arg_default(path: Path, name: str) -> str:
    (value,) = [a.split("=", 1)[1] for op, a in instructions(path) if op == "ARG" and a.startswith(f"{name}=")]
    return value


def pin(name: str) -> Requirement:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    (req,) = [Requirement(r) for r in project["dependencies"] if Requirement(r).name == name]
    return req


def test_hadolint_passes() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run([str(hadolint), str(DOCKERFILE), str(MLFLOW_DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_can_fail(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get install curl\n")
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run([str(hadolint), str(bad)], capture_output=True, text=True)
    assert result.returncode != 0 and "DL3007" in result.stdout  # `latest` is not a pin


def test_base_image_holds_the_pinned_torch() -> None:
    torch_pin = pin("torch")
    (version,) = [str(s.version) for s in torch_pin.specifier if s.operator == "=="]
    base = arg_default(DOCKERFILE, "BASE_IMAGE")
    assert re.fullmatch(r"pytorch/pytorch:[\w.-]+-devel", base), base  # a tag, and nvcc for DeepSpeed's ops
    assert base.split(":")[1].startswith(f"{version}-cuda"), f"{base} does not hold torch {version}"
    assert arg_default(DOCKERFILE, "TORCH_VERSION") == version


def test_image_installs_as_the_makefile_does() -> None:
    """torch pinned first, then the package with the deepspeed extra: the order that keeps pip from swapping torch
    builds, and the one CI runs."""
    makefile = (REPO / "Makefile").read_text()
    stamp_rule = makefile.split("$(STAMP): pyproject.toml", 1)[1].split("\n\n", 1)[0]
    make_steps = re.findall(r"pip install [^\n]*", stamp_rule)
    assert f"torch=={arg_default(DOCKERFILE, 'TORCH_VERSION')}" in make_steps[0]
    (make_extras,) = re.findall(r'"\.\[([\w,-]+)\]"', make_steps[1])

    runs = [a for op, a in instructions(DOCKERFILE) if op == "RUN" and "pip install" in a]
    assert 'pip install "torch==${TORCH_VERSION}"' in runs[0]
    assert 'pip install "./[${MOLE_EXTRAS}]"' in runs[1]
    image_extras = set(arg_default(DOCKERFILE, "MOLE_EXTRAS").split(","))
    assert image_extras == set(make_extras.split(",")) - {"dev"}
    assert "deepspeed" in image_extras


@pytest.mark.parametrize("path", [DOCKERFILE, MLFLOW_DOCKERFILE], ids=lambda p: p.name)
def test_images_run_as_a_fixed_non_root_user_with_oci_labels(path: Path) -> None:
    ops = instructions(path)
    users = [a for op, a in ops if op == "USER"]
    assert users and users[-1] == "10001:10001"
    chart = yaml.safe_load((REPO / "helm" / "mole" / "values.yaml").read_text())
    assert chart["podSecurityContext"]["runAsUser"] == 10001  # the chart runs the images' own user
    labels = " ".join(a for op, a in ops if op == "LABEL")
    for key in ("title", "description", "version", "created", "licenses", "base.name"):
        assert f"org.opencontainers.image.{key}=" in labels, key
    entrypoint = [a for op, a in ops if op == "ENTRYPOINT"]
    assert entrypoint == ['["mole"]' if path == DOCKERFILE else '["mlflow"]']


def test_mlflow_image_pins_the_projects_mlflow_and_the_chart_uses_it() -> None:
    reqs = [
        Requirement(line.split("#")[0])
        for line in (REPO / "docker" / "mlflow-requirements.txt").read_text().splitlines()
        if line.split("#")[0].strip()
    ]
    assert all(len(r.specifier) == 1 and next(iter(r.specifier)).operator == "==" for r in reqs), reqs
    (mlflow,) = [r for r in reqs if r.name == "mlflow"]
    version = next(iter(mlflow.specifier)).version
    assert "auth" in mlflow.extras
    assert pin("mlflow").specifier.contains(version), f"image mlflow {version} vs pyproject {pin('mlflow')}"
    assert arg_default(MLFLOW_DOCKERFILE, "MLFLOW_VERSION") == version
    values = yaml.safe_load((REPO / "helm" / "mole" / "values.yaml").read_text())
    assert values["mlflow"]["image"]["tag"] == version == values["tests"]["image"]["tag"]


def test_chart_and_images_follow_the_package_version() -> None:
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    chart = yaml.safe_load((REPO / "helm" / "mole" / "Chart.yaml").read_text())
    assert chart["appVersion"] == version == arg_default(DOCKERFILE, "VERSION")
    values = yaml.safe_load((REPO / "helm" / "mole" / "values.yaml").read_text())
    constants = REPO / "src" / "mole" / "pipeline" / "components" / "constants.py"
    if constants.is_file():  # the pipeline's steps and the chart name the same image
        (repository,) = re.findall(r'IMAGE_REPOSITORY = "([^"]+)"', constants.read_text())
        assert values["image"]["repository"] == repository


def test_build_context_holds_what_the_image_installs() -> None:
    """.dockerignore lets through only an allow-list; everything the image needs must be on it and exist."""
    lines = (REPO / ".dockerignore").read_text().splitlines()
    assert "*" in lines  # everything else stays out
    allowed = [line[1:].rstrip("/") for line in lines if line.startswith("!")]
    for needed in ("pyproject.toml", "README.md", "src", "configs", "pipelines"):
        assert needed in allowed, needed
        assert (REPO / needed).exists(), needed
