"""The vLLM server endpoints the project calls, and a way to list the ones a vLLM install serves.

:data:`SIDECAR_ENDPOINTS` is the one list of HTTP paths the trainer, the rollout client and the
evaluation call on the sidecar (a test greps the rollout code for path strings and fails on any
not listed here). :func:`probe_vllm` runs a Python interpreter (the sidecar's, see
:func:`sidecar_python`) on a short script that imports vLLM's OpenAI server module, builds its
FastAPI app the way ``python -m vllm.entrypoints.openai.api_server`` would (dev mode on, as the
sidecar runs it) and prints the version, the app's routes and vLLM's general plugins. No server starts, no model loads.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field

# Path -> why the project calls it. Query strings are not part of the path.
SIDECAR_ENDPOINTS: dict[str, str] = {
    "/health": "liveness while starting and watching the server",
    "/v1/completions": "rollouts, prompts and completions in token ids",
    "/v1/models": "the served model's name (evaluation)",
    "/weight_info": "the weight version the server holds",
    "/update_weight_version": "label the weights after a shm_reload push",
    "/collective_rpc": "shm_reload: reload_weights from a directory (needs VLLM_SERVER_DEV_MODE=1)",
    "/reset_prefix_cache": "drop prefix-cache entries computed with the old weights",
    "/get_world_size": "weight-transfer engine: how many vLLM workers join the transfer group",
    "/init_weight_transfer_engine": "weight-transfer engine: form the trainer-to-workers group",
    "/pause": "weight-transfer engine: hold generation while weights change",
    "/start_weight_update": "weight-transfer engine: begin a push",
    "/update_weights": "weight-transfer engine: receive one bucket",
    "/finish_weight_update": "weight-transfer engine: end a push and set the weight version",
    "/resume": "weight-transfer engine: generation continues on the new weights",
    "/shutdown_weight_transfer_engine": "weight-transfer engine: leave the group at the end",
}

# Run by the sidecar's interpreter (``python -c``), so it imports nothing from this package. It
# prints one JSON line after MARK; vLLM's own log lines may come before it.
MARK = "IGRPO_VLLM_PROBE "
_PROBE = """
import importlib.metadata, json, os, warnings
os.environ["VLLM_SERVER_DEV_MODE"] = "1"
warnings.simplefilter("ignore")
import vllm
from vllm.entrypoints.openai import api_server
try:
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
except ImportError:
    from vllm.entrypoints.openai.cli_args import make_arg_parser
try:
    from vllm.utils.argparse_utils import FlexibleArgumentParser
except ImportError:
    from vllm.utils import FlexibleArgumentParser
args = make_arg_parser(FlexibleArgumentParser()).parse_args([])
app = api_server.build_app(args, ("generate",))
routes = sorted({getattr(route, "path", "") for route in app.routes} - {""})
plugins = sorted(ep.value for ep in importlib.metadata.entry_points(group="vllm.general_plugins"))
print(MARK + json.dumps({"version": vllm.__version__, "routes": routes, "plugins": plugins}), flush=True)
"""


@dataclass(frozen=True)
class VllmProbe:
    """What :func:`probe_vllm` found: vLLM's version and routes, or why it could not tell."""

    python: str
    version: str | None = None
    routes: frozenset[str] = field(default_factory=frozenset)
    plugins: tuple[str, ...] = ()  # entry points of vllm.general_plugins ("module:function")
    error: str | None = None

    def missing_endpoints(self) -> list[str]:
        """Endpoints the project calls that this vLLM does not serve (empty when the probe failed)."""
        if self.error is not None:
            return []
        return [path for path in SIDECAR_ENDPOINTS if path not in self.routes]


def sidecar_python() -> str:
    """The interpreter that runs the vLLM sidecar: ``IGRPO_VLLM_PYTHON`` (the container's vLLM venv)
    or, unset, this one."""
    return os.environ.get("IGRPO_VLLM_PYTHON") or sys.executable


def probe_vllm(python: str | None = None, timeout_s: float = 300.0) -> VllmProbe:
    """Import vLLM's OpenAI server with ``python`` (default :func:`sidecar_python`) and list its routes."""
    return _probe(python or sidecar_python(), timeout_s)


@functools.cache  # an interpreter's vLLM does not change while this process runs; the import takes ~15 s
def _probe(python: str, timeout_s: float) -> VllmProbe:
    code = f"MARK = {MARK!r}\n{_PROBE}"
    try:
        proc = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=timeout_s,
                              env={**os.environ, "VLLM_SERVER_DEV_MODE": "1"})
    except FileNotFoundError:
        return VllmProbe(python, error=f"{python} does not exist (IGRPO_VLLM_PYTHON?)")
    except subprocess.TimeoutExpired:
        return VllmProbe(python, error=f"importing vLLM with {python} took more than {timeout_s:g} s")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MARK):
            found = json.loads(line[len(MARK):])
            return VllmProbe(python, version=found["version"], routes=frozenset(found["routes"]),
                             plugins=tuple(found["plugins"]))
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return VllmProbe(python, error=f"{python} cannot import vLLM's OpenAI server: {tail}")
