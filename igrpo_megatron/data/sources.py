"""Where a run's prompts and tokenizer come from: files named in the recipe, or the synthetic task."""

from __future__ import annotations

import logging
from pathlib import Path

from igrpo_megatron.config.schema import RecipeConfig
from igrpo_megatron.data.datasets import PromptRecord, load_prompts
from igrpo_megatron.data.rows import DataError
from igrpo_megatron.data.synthetic import build_task

logger = logging.getLogger(__name__)


def training_records(recipe: RecipeConfig) -> list[PromptRecord]:
    """The training prompts: ``data.train_path``, else ``data.synthetic_task``'s train split."""
    d = recipe.data
    if d.train_path:
        records, _ = load_prompts(d.train_path, d.problem_field, d.answer_field)
        return records
    if d.synthetic_task:
        items = build_task(d.synthetic_task, d.synthetic_options).generate(d.synthetic_train_size, "train", seed=recipe.run.seed)
        return [PromptRecord(p.problem, p.answer, f"{d.synthetic_task}:train:{i}") for i, p in enumerate(items)]
    raise DataError("the recipe names no training prompts: set data.train_path (JSONL/Parquet) or "
                     "data.synthetic_task (e.g. 'arithmetic')")


def ensure_tokenizer(recipe: RecipeConfig, run_dir: Path) -> Path:
    """The tokenizer directory: ``data.tokenizer_path``, the model's checkpoint, or one trained here.

    A tokenizer is trained only for a synthetic task without any checkpoint (the tiny recipe): on the
    task's prompts and worked solutions, with ``data.tokenizer_vocab_size`` tokens. Call on one rank.
    """
    d = recipe.data
    if d.tokenizer_path:
        return Path(d.tokenizer_path)
    if recipe.model.hf_path:
        return Path(recipe.model.hf_path)
    if not d.synthetic_task:
        raise DataError("no tokenizer: set data.tokenizer_path or model.hf_path")
    out = run_dir / "tokenizer"
    if (out / "tokenizer.json").exists():
        return out
    from igrpo_megatron.data.tokenizer import build_tokenizer

    task = build_task(d.synthetic_task, d.synthetic_options)
    items = task.generate(2000, "train", seed=recipe.run.seed + 7)
    texts = [d.prompt_template.replace("{problem}", p.problem) + "\n" + p.solution for p in items]
    texts += [recipe.algorithm.igrpo.prompt.template] * 50  # frequent enough for its words to become tokens
    build_tokenizer(texts, out, d.tokenizer_vocab_size)
    return out
