"""``igrpo doctor [RECIPE]``: what software stack this machine has, and which path each part of a recipe
takes on it.

The stack: Python, torch (with its CUDA and NCCL), the GPUs and their compute capability, Transformer
Engine, megatron-core, the Mamba kernels, and the vLLM of the sidecar's interpreter
(``IGRPO_VLLM_PYTHON``) with the routes its OpenAI server registers. For a recipe: the layer spec
(Transformer Engine or local), FP8, the Mamba kernels, the weight transport, and whether the
sidecar's vLLM serves every endpoint the project calls. Everything the recipe needs and this stack
lacks is one ``missing:`` line; the command then exits 1.

``--no-gpu`` (used while building the container, where no GPU is attached) checks that the GPU
packages are installed without importing them and skips what only a GPU can answer (is one there,
its compute capability). ``--constraints FILE`` also compares installed versions with the pins.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path

from igrpo_megatron.config import RecipeError, load_recipe
from igrpo_megatron.config.schema import RecipeConfig
from igrpo_megatron.rollout.endpoints import SIDECAR_ENDPOINTS, VllmProbe, probe_vllm

# Lowest compute capability per FP8 recipe (Transformer Engine): FP8 tensor cores arrived with Ada
# (8.9) and Hopper (9.0); block scaling needs Hopper; MXFP8 is Blackwell's (10.0).
FP8_MIN_CAPABILITY: dict[str, tuple[int, int]] = {
    "tensorwise": (8, 9), "delayed": (8, 9), "blockwise": (9, 0), "mxfp8": (10, 0)}
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)$")
_BASE_IMAGE = re.compile(r"^#\s*base-image:\s*(\S+)\s*$")


@dataclass(frozen=True)
class Gpu:
    name: str
    capability: tuple[int, int]


@dataclass
class Stack:
    """This machine's software and hardware, as far as the project cares."""

    python: str
    torch: str
    cuda: str | None                 # the CUDA torch was built with (None: a CPU build)
    nccl: str | None
    gpus: list[Gpu]
    gpu_checked: bool                # False under --no-gpu: nothing was asked of the driver
    transformer_engine: str | None   # installed version
    transformer_engine_usable: bool  # imports, with a GPU to run on (under --no-gpu: installed)
    megatron_core: str | None
    mamba_ssm: str | None
    causal_conv1d: str | None
    vllm_in_trainer: bool            # vLLM importable here too (the nccl transport's trainer side)
    sidecar: VllmProbe = field(default_factory=lambda: VllmProbe(""))


@dataclass
class Diagnosis:
    """Which path each part of a recipe takes, and what it needs that the stack lacks."""

    paths: list[tuple[str, str]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


def dist_version(name: str) -> str | None:
    """Installed version of distribution ``name`` (``-``/``_`` spellings alike), None if absent."""
    for spelling in (name, name.replace("-", "_"), name.replace("_", "-")):
        try:
            return importlib.metadata.version(spelling)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def probe_stack(no_gpu: bool = False, vllm_python: str | None = None) -> Stack:
    """Look at this machine. With ``no_gpu`` nothing touches the driver or imports GPU packages."""
    import torch

    from igrpo_megatron.models.capability import has_transformer_engine

    gpus: list[Gpu] = []
    nccl = None
    if not no_gpu and torch.cuda.is_available():
        gpus = [Gpu(torch.cuda.get_device_name(i), tuple(torch.cuda.get_device_capability(i)))
                for i in range(torch.cuda.device_count())]
    if torch.version.cuda is not None and hasattr(torch.cuda, "nccl"):
        try:
            nccl = ".".join(str(part) for part in torch.cuda.nccl.version())
        except (RuntimeError, AttributeError):  # a CUDA build without NCCL
            nccl = None
    te = dist_version("transformer-engine")
    return Stack(
        python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda, nccl=nccl,
        gpus=gpus, gpu_checked=not no_gpu, transformer_engine=te,
        transformer_engine_usable=te is not None if no_gpu else has_transformer_engine(),
        megatron_core=dist_version("megatron-core"), mamba_ssm=dist_version("mamba-ssm"),
        causal_conv1d=dist_version("causal-conv1d"),
        vllm_in_trainer=importlib.util.find_spec("vllm") is not None,
        sidecar=probe_vllm(vllm_python))


def stack_lines(stack: Stack) -> list[str]:
    """The stack as ``name: value`` lines."""
    if not stack.gpu_checked:
        gpus = "not checked (--no-gpu)"
    else:
        gpus = ", ".join(f"{g.name} (compute capability {g.capability[0]}.{g.capability[1]})"
                         for g in stack.gpus) or "none visible to torch"
    te = stack.transformer_engine or "not installed"
    if stack.transformer_engine and stack.gpu_checked and not stack.transformer_engine_usable:
        te += " (installed, but does not import here or has no GPU)"
    if stack.mamba_ssm and stack.causal_conv1d:
        kernels = f"mamba_ssm {stack.mamba_ssm}, causal_conv1d {stack.causal_conv1d} (CUDA kernels)"
    else:
        absent = [n for n, v in (("mamba_ssm", stack.mamba_ssm), ("causal_conv1d", stack.causal_conv1d)) if not v]
        kernels = (f"{' and '.join(absent)} not installed: hybrid models use the project's pure-PyTorch "
                   "kernels (igrpo_megatron.models.cpu_kernels)")
    sidecar = stack.sidecar
    vllm = sidecar.version or f"unavailable ({sidecar.error})"
    return [
        f"python: {stack.python}",
        f"torch: {stack.torch}",
        f"CUDA (torch build): {stack.cuda or 'none (CPU build)'}",
        f"NCCL: {stack.nccl or 'none'}",
        f"GPUs: {gpus}",
        f"Transformer Engine: {te}",
        f"megatron-core: {stack.megatron_core or 'not installed'}",
        f"Mamba kernels: {kernels}",
        f"sidecar Python: {sidecar.python}",
        f"sidecar vLLM: {vllm}",
    ]


def gpu_reasons(recipe: RecipeConfig) -> list[str]:
    """The recipe settings that only run on a GPU (empty: it runs on CPU as well)."""
    reasons = []
    if recipe.parallel.backend == "nccl":
        reasons.append("parallel.backend=nccl")
    if recipe.model.fp8 is not None:
        reasons.append(f"model.fp8={recipe.model.fp8}")
    if recipe.model.transformer_impl == "transformer_engine":
        reasons.append("model.transformer_impl=transformer_engine")
    if recipe.rollout.server.gpu_memory_utilization is not None:
        reasons.append("rollout.server.gpu_memory_utilization is set")
    return reasons


def diagnose(recipe: RecipeConfig, stack: Stack) -> Diagnosis:
    """Decide each part's path for ``recipe`` on ``stack``; collect what the recipe needs and lacks."""
    out = Diagnosis()
    reasons = gpu_reasons(recipe)
    on_gpu = bool(stack.gpus) or bool(reasons)  # where the recipe will run: its GPU settings decide
    if not stack.gpu_checked:
        out.paths.append(("device", f"not checked (--no-gpu); the recipe {_needs(reasons)}"))
    elif stack.gpus:
        out.paths.append(("device", f"GPU ({len(stack.gpus)} visible)"))
    else:
        out.paths.append(("device", f"CPU; the recipe {_needs(reasons)}"))
        if reasons:
            out.missing.append(f"GPU: none visible to torch, and the recipe runs only on GPUs ({', '.join(reasons)})")
    _layer_spec(recipe, stack, on_gpu, out)
    _fp8(recipe, stack, out)
    _mamba(recipe, stack, on_gpu, out)
    _transport(recipe, stack, out)
    _endpoints(recipe, stack, out)
    return out


def _needs(reasons: list[str]) -> str:
    return f"needs a GPU ({', '.join(reasons)})" if reasons else "needs no GPU"


def _layer_spec(recipe: RecipeConfig, stack: Stack, on_gpu: bool, out: Diagnosis) -> None:
    impl = recipe.model.transformer_impl
    te_ready = stack.transformer_engine_usable and on_gpu
    if impl == "local" or (impl == "auto" and not te_ready):
        out.paths.append(("layer spec", f"local Megatron-Core modules (model.transformer_impl={impl})"))
    else:
        out.paths.append(("layer spec", f"Transformer Engine (model.transformer_impl={impl})"))
    if impl == "transformer_engine" and not stack.transformer_engine_usable:
        out.missing.append(f"Transformer Engine: {_te_state(stack)}, but model.transformer_impl=transformer_engine")


def _te_state(stack: Stack) -> str:
    return "installed but not usable here (no GPU, or it fails to import)" if stack.transformer_engine \
        else "not installed"


def _fp8(recipe: RecipeConfig, stack: Stack, out: Diagnosis) -> None:
    fp8 = recipe.model.fp8
    if fp8 is None:
        out.paths.append(("FP8", "off (model.fp8=null)"))
        return
    need = FP8_MIN_CAPABILITY[fp8]
    need_s = f"{need[0]}.{need[1]}"
    if not stack.transformer_engine_usable:
        out.missing.append(f"Transformer Engine: {_te_state(stack)}; model.fp8={fp8} runs only through it "
                           f"(on a GPU of compute capability >= {need_s})")
    if not stack.gpu_checked:
        out.paths.append(("FP8", f"{fp8} through Transformer Engine; GPU not checked (needs compute "
                                 f"capability >= {need_s})"))
        return
    short = [g for g in stack.gpus if g.capability < need]
    if short:
        out.missing.append(f"FP8: model.fp8={fp8} needs compute capability >= {need_s}; "
                           f"{short[0].name} has {short[0].capability[0]}.{short[0].capability[1]}")
    possible = bool(stack.gpus) and not short and stack.transformer_engine_usable
    out.paths.append(("FP8", f"{fp8} through Transformer Engine: {'possible' if possible else 'not possible'} "
                             f"on this machine (needs compute capability >= {need_s} and TE)"))


def _mamba(recipe: RecipeConfig, stack: Stack, on_gpu: bool, out: Diagnosis) -> None:
    if recipe.model.architecture != "nemotron_h":
        out.paths.append(("Mamba kernels", f"not used (model.architecture={recipe.model.architecture})"))
        return
    installed = bool(stack.mamba_ssm and stack.causal_conv1d)
    if on_gpu and installed:
        out.paths.append(("Mamba kernels", "CUDA/Triton (mamba_ssm, causal_conv1d)"))
    elif not on_gpu:
        out.paths.append(("Mamba kernels", "pure-PyTorch stand-ins (igrpo_megatron.models.cpu_kernels)"))
    else:
        out.paths.append(("Mamba kernels", "none usable: mamba_ssm / causal_conv1d missing"))
        absent = " and ".join(n for n, v in (("mamba_ssm", stack.mamba_ssm), ("causal_conv1d", stack.causal_conv1d))
                              if not v)
        out.missing.append(f"Mamba kernels: {absent} not installed; model.architecture=nemotron_h on GPUs needs "
                           "them (the pure-PyTorch kernels are a CPU stand-in, far too slow for a GPU run)")


def _transport(recipe: RecipeConfig, stack: Stack, out: Diagnosis) -> None:
    from igrpo_megatron.rollout import weight_sync

    local_server = recipe.rollout.server.url is None
    configured = getattr(recipe.rollout.weight_sync, "transport", "shm_reload")
    resolve = getattr(weight_sync, "transport_name", None)  # resolves 'auto' where transports can be chosen
    name = resolve(recipe.rollout, local_server) if resolve is not None else configured
    where = "trainer starts the sidecar" if local_server else f"sidecar at {recipe.rollout.server.url}"
    detail = {
        "shm_reload": f"safetensors under {recipe.rollout.weight_sync.shm_root}, reloaded by vLLM "
                      "(/collective_rpc; trainer and sidecar must share that directory)",
        "gloo": "vLLM weight-transfer engine over a gloo group (the project's vLLM plugin, in the sidecar)",
        "nccl": "vLLM's NCCL weight-transfer engine (GPUs on both sides, vLLM importable in the trainer)",
    }.get(name, "")
    shown = name if configured == name else f"{name} (from {configured})"
    out.paths.append(("weight transport", f"{shown}: {detail}; {where}".replace(": ;", ";")))
    if name == "nccl" and not stack.vllm_in_trainer:
        out.missing.append("weight transport: rollout.weight_sync.transport resolves to nccl, whose trainer side "
                           "needs vLLM importable in this Python; install it here or use gloo")
    if name == "gloo" and local_server and stack.sidecar.version is not None \
            and not any(v.startswith("igrpo_megatron.") for v in stack.sidecar.plugins):
        out.missing.append(f"weight transport: gloo needs the project installed in the sidecar's Python "
                           f"({stack.sidecar.python}) so vLLM loads its engine plugin")


def _endpoints(recipe: RecipeConfig, stack: Stack, out: Diagnosis) -> None:
    sidecar = stack.sidecar
    if recipe.rollout.server.url is not None:
        out.paths.append(("sidecar endpoints", f"external server {recipe.rollout.server.url}: its vLLM is not "
                                               "checked here (run igrpo doctor on its machine)"))
        return
    if sidecar.version is None:
        out.paths.append(("sidecar endpoints", "not checked: no vLLM"))
        out.missing.append(f"vLLM: the sidecar's Python cannot serve ({sidecar.error}); set IGRPO_VLLM_PYTHON to "
                           "an interpreter with vLLM")
        return
    absent = sidecar.missing_endpoints()
    out.paths.append(("sidecar endpoints", f"vLLM {sidecar.version} serves {len(SIDECAR_ENDPOINTS) - len(absent)} "
                                           f"of the {len(SIDECAR_ENDPOINTS)} the project calls"))
    if absent:
        out.missing.append(f"vLLM endpoints: vLLM {sidecar.version} lacks {', '.join(absent)}")


def read_pins(path: str | Path) -> tuple[dict[str, str], str | None]:
    """``name -> version`` of every ``name==version`` line in a constraints file, and its base image."""
    pins: dict[str, str] = {}
    base_image = None
    for number, raw in enumerate(Path(path).read_text().splitlines(), 1):
        line = raw.strip()
        if match := _BASE_IMAGE.match(line):
            base_image = match.group(1)
        if not line or line.startswith("#"):
            continue
        match = _PIN.match(line)
        if match is None:
            raise RecipeError(f"{path}:{number}: {line!r} is not a `name==version` pin")
        pins[_normalise(match.group(1))] = match.group(2)
    return pins, base_image


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pin_mismatches(pins: dict[str, str], stack: Stack, constraints: str) -> list[str]:
    """One line per pinned package whose installed version differs (vllm: the sidecar's)."""
    found = {"vllm": stack.sidecar.version, "megatron-core": stack.megatron_core,
             "transformer-engine": stack.transformer_engine, "mamba-ssm": stack.mamba_ssm,
             "causal-conv1d": stack.causal_conv1d}
    out = []
    for name, wanted in pins.items():
        have = found[name] if name in found else dist_version(name)
        if have is None or have.split("+")[0] != wanted:
            where = "the sidecar's Python" if name == "vllm" else "this Python"
            out.append(f"pin: {name}=={wanted} ({constraints}), {where} has {have or 'none'}")
    return out


def run_doctor(recipe_path: str | None, overrides: list[str], *, no_gpu: bool = False,
               constraints: str | None = None) -> tuple[list[str], list[str]]:
    """The report lines and the missing lines (empty: the recipe, if any, can run on this stack)."""
    recipe, unset = (_load_for_doctor(recipe_path, overrides) if recipe_path else (None, []))
    stack = probe_stack(no_gpu=no_gpu)
    lines = ["stack:"] + [f"  {line}" for line in stack_lines(stack)]
    missing: list[str] = []
    if recipe is not None:
        diagnosis = diagnose(recipe, stack)
        lines += [f"recipe {recipe_path}:"] + [f"  {part}: {path}" for part, path in diagnosis.paths]
        if unset:
            lines.append(f"  not checked: {', '.join(unset)} (??? in the recipe: data and weights, not the stack)")
        missing += diagnosis.missing
    if constraints is not None:
        pins, _ = read_pins(constraints)
        missing += pin_mismatches(pins, stack, constraints)
    return lines, missing


def _load_for_doctor(recipe_path: str, overrides: list[str]) -> tuple[RecipeConfig, list[str]]:
    """Load the recipe; required values still ``???`` (paths to data and weights) get a placeholder,
    since the stack check does not read them."""
    from igrpo_megatron.config.loader import MissingValuesError

    try:
        return load_recipe(recipe_path, overrides), []
    except MissingValuesError as exc:
        unset = list(exc.keys)
    return load_recipe(recipe_path, [*overrides, *(f"{key}=unset-for-doctor" for key in unset)]), unset
