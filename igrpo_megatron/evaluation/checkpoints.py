"""What `igrpo eval` serves: a recipe's model, a Hugging Face checkpoint directory, or a Megatron checkpoint.

- a recipe (``.yaml``): serves ``rollout.server.model_path``, else ``model.hf_path`` (or uses
  ``rollout.server.url`` when the recipe points at a running server);
- an HF checkpoint directory (has ``config.json``): served as it is. Its settings come from
  ``--recipe`` when given, else ``recipe.yaml`` inside the directory, else the schema defaults, with
  the command-line overrides applied in every case;
- a training checkpoint (a ``step_*`` directory with ``metadata.json``, or the checkpoints root with
  its ``latest`` pointer): exported to HF layout with :func:`export_megatron_checkpoint`. Without
  ``--recipe`` its settings come from the ``recipe.yaml`` inside it, else the one beside it (the run
  directory's), else the checkpoint's own. :func:`resolve_target` only checks that the checkpoint is
  complete; the export (minutes at 7B) happens in :func:`export_if_needed`, which ``igrpo eval``
  calls once the benchmarks have loaded.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from igrpo_megatron.config import load_recipe

logger = logging.getLogger(__name__)

RECIPE_SUFFIXES = (".yaml", ".yml")
HF_CONFIG = "config.json"
RUN_RECIPE = "recipe.yaml"


class CheckpointExportError(RuntimeError):
    """A checkpoint cannot be turned into something the vLLM sidecar can serve."""


@dataclass
class EvalTarget:
    """The model an evaluation serves and the recipe that configures it."""

    recipe: Any  # RecipeConfig
    hf_dir: Path | None  # served by a local sidecar; None when server_url is set
    server_url: str | None  # a running server to use instead of starting one
    tokenizer_dir: Path | None
    label: str
    export_from: Path | None = None  # a training checkpoint still to be exported to hf_dir


def is_megatron_checkpoint(path: Path) -> bool:
    """A ``dist_checkpointing`` directory, or a checkpoints root (``latest`` pointer / ``step_*``)."""
    if (path / "metadata.json").is_file() and not (path / HF_CONFIG).is_file():
        return True
    return (path / "latest").is_file() or any(path.glob("step_*"))


def export_megatron_checkpoint(checkpoint_dir: str | os.PathLike, recipe: Any, out_dir: str | os.PathLike) -> Path:
    """Export a training checkpoint (``step_*`` directory, or the checkpoints root with ``latest``) to HF layout.

    The model is loaded at TP = PP = 1 in this process (re-sharded from whatever layout saved it) and
    written with the recipe's tokenizer, so the sidecar can serve it.
    """
    from igrpo_megatron.training.export import export_checkpoint_to_hf

    checkpoint_dir = _resolve_checkpoint(Path(checkpoint_dir))  # fail fast, before any model is built
    tokenizer = recipe.data.tokenizer_path or recipe.model.hf_path
    try:
        return export_checkpoint_to_hf(checkpoint_dir, recipe, out_dir, tokenizer_dir=tokenizer)
    except FileNotFoundError as exc:
        raise CheckpointExportError(str(exc)) from None


def _resolve_checkpoint(path: Path) -> Path:
    from igrpo_megatron.training.export import resolve_checkpoint

    try:
        return resolve_checkpoint(path)
    except (FileNotFoundError, ValueError) as exc:  # ValueError: a damaged checkpoint (CheckpointError)
        raise CheckpointExportError(str(exc)) from None


def _run_recipe(src: Path, checkpoint: Path | None) -> Path | None:
    """The recipe.yaml inside ``src``, else beside it (a run's checkpoints root), else the checkpoint's own."""
    candidates = [src / RUN_RECIPE]
    if checkpoint is not None:
        candidates += [src.parent / RUN_RECIPE, checkpoint / RUN_RECIPE]
    return next((c for c in candidates if c.is_file()), None)


def export_if_needed(target: EvalTarget) -> EvalTarget:
    """Export the target's training checkpoint to ``hf_dir`` when it has one (the slow step; call it last)."""
    if target.export_from is not None:
        export_megatron_checkpoint(target.export_from, target.recipe, target.hf_dir)
        target.export_from = None
    return target


def _defaults_recipe(overrides: list[str]) -> Any:
    """The schema defaults with overrides, through the normal loader (so overrides are validated)."""
    with tempfile.TemporaryDirectory(prefix="igrpo-eval-") as tmp:
        empty = Path(tmp) / "defaults.yaml"
        empty.write_text("{}\n")
        return load_recipe(empty, overrides)


def _recipe_model(recipe: Any, where: str) -> tuple[Path | None, str | None]:
    url = recipe.rollout.server.url
    path = recipe.rollout.server.model_path or recipe.model.hf_path
    if url is None and path is None:
        raise CheckpointExportError(
            f"{where} names no model to evaluate: set rollout.server.model_path or model.hf_path to an HF "
            "checkpoint directory, set rollout.server.url to a running server, or pass the checkpoint directory "
            "to `igrpo eval` instead of the recipe.")
    return (Path(path).expanduser() if path is not None and url is None else None), url


def resolve_target(recipe_or_checkpoint: str, overrides: list[str] | None = None, *, recipe_path: str | None = None,
                   server_url: str | None = None, export_dir: str | os.PathLike | None = None) -> EvalTarget:
    """Work out what to serve and with which settings (see the module doc); nothing is started here."""
    overrides = list(overrides or [])
    if server_url is not None:
        overrides.append(f"rollout.server.url={server_url}")
    src = Path(recipe_or_checkpoint).expanduser()
    if src.suffix in RECIPE_SUFFIXES:
        if recipe_path is not None:
            raise CheckpointExportError(f"got a recipe ({src}) and --recipe {recipe_path}; give only one.")
        recipe = load_recipe(src, overrides)
        hf_dir, url = _recipe_model(recipe, str(src))
        return EvalTarget(recipe, hf_dir, url, _tokenizer_dir(recipe, hf_dir), recipe.run.name)
    if not src.is_dir():
        raise CheckpointExportError(f"{src}: not a recipe (.yaml) nor a checkpoint directory; check the path.")
    checkpoint = None
    if (src / HF_CONFIG).is_file():
        hf_dir = src
    elif is_megatron_checkpoint(src):
        checkpoint = _resolve_checkpoint(src)
        hf_dir = Path(export_dir or src.with_name(src.name + "-hf"))
    else:
        raise CheckpointExportError(f"{src}: neither an HF checkpoint (no {HF_CONFIG}) nor a training checkpoint "
                                    "(no metadata.json, step_* directories or 'latest' pointer); point at the "
                                    "checkpoint directory.")
    saved = _run_recipe(src, checkpoint) if recipe_path is None else Path(recipe_path)
    if saved is not None:
        logger.info("settings from %s", saved)
    recipe = load_recipe(saved, overrides) if saved is not None else _defaults_recipe(overrides)
    url = recipe.rollout.server.url
    return EvalTarget(recipe, None if url else hf_dir, url, _tokenizer_dir(recipe, hf_dir), src.name,
                      export_from=checkpoint)


def _tokenizer_dir(recipe: Any, hf_dir: Path | None) -> Path | None:
    """data.tokenizer_path, else the served checkpoint (HF checkpoints carry their tokenizer)."""
    if recipe.data.tokenizer_path:
        return Path(recipe.data.tokenizer_path).expanduser()
    if hf_dir is not None:
        return hf_dir
    path = recipe.rollout.server.model_path or recipe.model.hf_path
    return Path(path).expanduser() if path else None
