"""Turn problem texts into prompt token ids (template + chat template) and completions back into text."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from igrpo_megatron.config.training import DataConfig


@dataclass
class PromptFormatter:
    """Applies ``data.prompt_template`` / ``data.system_prompt`` and the tokenizer's chat template.

    ``tokenizer`` is a Hugging Face tokenizer (``PreTrainedTokenizerBase``).
    """

    tokenizer: Any
    cfg: DataConfig

    def message(self, problem: str) -> str:
        return self.cfg.prompt_template.replace("{problem}", problem)

    def encode_message(self, text: str) -> list[int]:
        """Token ids of a finished user message, ready for generation."""
        if not self.cfg.use_chat_template:
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        chat = [{"role": "system", "content": self.cfg.system_prompt}] if self.cfg.system_prompt else []
        chat.append({"role": "user", "content": text})
        ids = self.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # BatchEncoding in newer transformers
            ids = ids["input_ids"]
        return list(ids)

    def encode_problem(self, problem: str) -> list[int]:
        return self.encode_message(self.message(problem))

    def encode_text(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    @property
    def eos_token_id(self) -> int | None:
        return self.tokenizer.eos_token_id
