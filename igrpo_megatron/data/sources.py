"""Where a run's prompts and tokenizer come from: files named in the recipe, or the synthetic task."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from igrpo_megatron.config.schema import RecipeConfig
from igrpo_megatron.data.datasets import PromptRecord, drop_long_prompts, load_prompts
from igrpo_megatron.data.rows import DataError
from igrpo_megatron.data.synthetic import build_task

logger = logging.getLogger(__name__)


def training_records(recipe: RecipeConfig, prompt_tokens: Callable[[str], int] | None = None
                     ) -> tuple[list[PromptRecord], int]:
    """The training prompts (``data.train_path``, else ``data.synthetic_task``'s train split) and how
    many rows were skipped as unusable (see :func:`load_prompts`).

    ``prompt_tokens`` (a problem's prompt length in tokens, as sampled) also drops prompts longer than
    ``data.max_prompt_length``. ``data.strict`` turns every skip into a :class:`DataError`.
    """
    d = recipe.data
    skipped = 0
    if d.train_path:
        records, report = load_prompts(d.train_path, d.problem_field, d.answer_field, id_field=d.id_field,
                                       strict=d.strict)
        skipped = report.skipped
    elif d.synthetic_task:
        items = build_task(d.synthetic_task, d.synthetic_options).generate(d.synthetic_train_size, "train", seed=recipe.run.seed)
        records = [PromptRecord(p.problem, p.answer, f"{d.synthetic_task}:train:{i}") for i, p in enumerate(items)]
    else:
        raise DataError("the recipe names no training prompts: set data.train_path (JSONL/Parquet) or "
                        "data.synthetic_task (e.g. 'arithmetic')")
    if prompt_tokens is not None:
        records, too_long = drop_long_prompts(records, prompt_tokens, d.max_prompt_length, strict=d.strict)
        skipped += too_long
    return records, skipped


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
