"""The one prompt path: problem -> user message -> chat template -> token ids, plain or draft-conditioned.

Training rollouts, the supervised warm-start and evaluation all build their prompts with
:class:`PromptFormatter`, so a model is evaluated on exactly the prompts it was trained on (given
the same settings: ``evaluation.prompt_template`` etc. default to their own values, and the tiny
recipe points them at ``data.*``). The rules, in one place:

- ``{problem}`` appears exactly once in the template and is filled by plain replacement, so LaTeX
  braces in a problem are safe and a problem containing the text ``{problem}`` is not filled twice.
- ``system_prompt`` None: no system message; any string, even empty, is sent as the system message
  (chat templates that add a default system message when none is given then add none).
- With the chat template the conversation is rendered to text and that text is encoded without
  extra special tokens (the template already contains them), as ``apply_chat_template`` does.
- Drafts are cut token-exactly and decoded with special tokens kept, so a cut draft reads as the
  uncut one does.
- The refinement prompt q' wraps the *user message* (template applied) with
  ``algorithm.igrpo.prompt`` and must fit a token budget that counts the chat template; when no
  part of the draft fits, the caller falls back to the plain prompt.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from igrpo_megatron.algorithms.refinement_prompt import build_refinement_prompt
from igrpo_megatron.config.algorithm import RefinementPromptConfig

logger = logging.getLogger(__name__)


class PromptError(ValueError):
    """The template or the tokenizer cannot build the prompts the settings ask for."""


class PromptSettings(Protocol):
    """The prompt fields shared by ``data`` (training) and ``evaluation``."""

    prompt_template: str
    system_prompt: str | None
    use_chat_template: bool


@dataclass(frozen=True)
class RefinementIds:
    """A draft-conditioned prompt q' that fits its budget."""

    ids: list[int]  # token ids, chat template included
    user_text: str  # the user message of q' (refinement template filled)
    truncated: bool  # the draft was cut to fit


class PromptFormatter:
    """Builds prompt token ids with one tokenizer and one set of prompt settings.

    ``tokenizer`` is a Hugging Face tokenizer; ``cfg`` is ``recipe.data`` or ``recipe.evaluation``
    (anything with the :class:`PromptSettings` fields); ``section`` names it in error messages.
    """

    def __init__(self, tokenizer: Any, cfg: PromptSettings, *, section: str = "data"):
        found = cfg.prompt_template.count("{problem}")
        if found != 1:
            raise PromptError(f"{section}.prompt_template must contain {{problem}} exactly once (found {found}).")
        if cfg.use_chat_template and not getattr(tokenizer, "chat_template", None):
            raise PromptError(f"the tokenizer ({getattr(tokenizer, 'name_or_path', '?')}) has no chat template, "
                              f"but {section}.use_chat_template is true; add a chat template to the tokenizer "
                              f"or set {section}.use_chat_template=false.")
        self.tokenizer = tokenizer
        self.cfg = cfg
        self._overhead: int | None = None

    # -- plain prompts ----------------------------------------------------------------------------

    def message(self, problem: str) -> str:
        """The user message for a problem."""
        head, tail = self.cfg.prompt_template.split("{problem}")
        return head + problem + tail

    def render(self, user_text: str) -> str:
        """The full prompt text the model sees, assistant turn opened."""
        if not self.cfg.use_chat_template:
            return user_text
        chat = [] if self.cfg.system_prompt is None else [{"role": "system", "content": self.cfg.system_prompt}]
        chat.append({"role": "user", "content": user_text})
        return self.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)

    def encode_message(self, user_text: str) -> list[int]:
        """Token ids of a finished user message, ready for generation."""
        return self.encode_text(self.render(user_text))

    def encode_problem(self, problem: str) -> list[int]:
        """Token ids of the plain prompt of a problem."""
        return self.encode_message(self.message(problem))

    # -- the draft-conditioned prompt -------------------------------------------------------------

    def refinement(self, problem: str, draft: str, cfg: RefinementPromptConfig,
                   max_prompt_tokens: int | None) -> RefinementIds | None:
        """q' for ``problem`` showing ``draft``, within ``max_prompt_tokens`` (chat template included).

        ``build_refinement_prompt`` counts the user text only, so the chat template's own tokens come
        off the budget first and the finished ids are checked exactly. None when no part of the draft
        fits (an empty "earlier attempt" helps nobody; a longer prompt the server would reject): the
        caller then uses the plain prompt. ``max_prompt_tokens`` None: no budget.
        """
        text_budget = None if max_prompt_tokens is None else max_prompt_tokens - self.chat_overhead()
        built = build_refinement_prompt(self.message(problem), draft, cfg, max_prompt_tokens=text_budget,
                                        encode=self.encode_text, decode=self.decode)
        ids = self.encode_message(built.text)
        if not built.fits or not built.draft_shown.strip() or (
                max_prompt_tokens is not None and len(ids) > max_prompt_tokens):
            logger.debug("no room for the draft in a %d-token refinement prompt (budget %s)", len(ids),
                         max_prompt_tokens)
            return None
        return RefinementIds(ids, built.text, built.truncated)

    def chat_overhead(self) -> int:
        """Tokens the chat template adds around an empty user message."""
        if self._overhead is None:
            self._overhead = len(self.encode_message(""))
        return self._overhead

    # -- tokens -----------------------------------------------------------------------------------

    def encode_text(self, text: str) -> list[int]:
        """Token ids of raw text, no special tokens added."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids, special tokens kept (so ``decode(encode_text(t)) == t``)."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    @property
    def eos_token_id(self) -> int | None:
        return self.tokenizer.eos_token_id
