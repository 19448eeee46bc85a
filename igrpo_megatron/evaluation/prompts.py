"""Evaluation prompts: problem -> user message (instruction template) -> chat template -> token ids.

The sidecar takes token ids (``RolloutEngine.generate``), so prompts are tokenized here, once, the
way the model was trained to see them: the chat template is rendered as text and encoded without
extra special tokens (the template already contains them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class PromptError(ValueError):
    """The tokenizer cannot build the prompts the settings ask for."""


class PromptBuilder:
    """Builds the token ids of plain and refinement prompts with one tokenizer and one template."""

    def __init__(self, tokenizer: Any, template: str, system_prompt: str | None = None,
                 use_chat_template: bool = True):
        if template.count("{problem}") != 1:
            raise PromptError("evaluation.prompt_template must contain {problem} exactly once.")
        if use_chat_template and not getattr(tokenizer, "chat_template", None):
            raise PromptError(f"the tokenizer ({getattr(tokenizer, 'name_or_path', '?')}) has no chat template, "
                              "but evaluation.use_chat_template is true; add a chat template to the tokenizer "
                              "or set evaluation.use_chat_template=false.")
        self.tokenizer = tokenizer
        self.template = template
        self.system_prompt = system_prompt
        self.use_chat_template = use_chat_template

    def user_text(self, problem: str) -> str:
        """The user message for a problem (plain replacement: LaTeX braces in the problem are safe)."""
        head, tail = self.template.split("{problem}")
        return head + problem + tail

    def render(self, user_text: str) -> str:
        """The full prompt text the model sees, assistant turn opened."""
        if not self.use_chat_template:
            return user_text
        messages = [{"role": "user", "content": user_text}]
        if self.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def ids(self, user_text: str) -> list[int]:
        """Token ids of the rendered prompt."""
        return self.encode(self.render(user_text))

    def count(self, user_text: str) -> int:
        """Tokens of the rendered prompt (the budget counter for refinement prompts)."""
        return len(self.ids(user_text))

    def encode(self, text: str) -> list[int]:
        """Token ids of raw text, no special tokens added (used to cut drafts token-exactly)."""
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)
