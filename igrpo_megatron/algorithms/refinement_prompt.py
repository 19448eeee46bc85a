"""The draft-conditioned prompt q' of iGRPO Stage 2: template, reasoning stripping, truncation.

Tokenizer-agnostic: token budgets are counted with callables the caller passes (``encode`` and
``decode`` for token-exact cuts, or only ``count_tokens``, which cuts at character boundaries).
Count the text the way the model will see it: pass an ``encode`` that applies the chat template,
or subtract the chat template's overhead from ``max_prompt_tokens``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from igrpo_megatron.config.algorithm import RefinementPromptConfig

logger = logging.getLogger(__name__)

Encode = Callable[[str], Sequence[int]]
Decode = Callable[[Sequence[int]], str]


@dataclass
class RefinementPrompt:
    """q' and how it was made."""

    text: str
    draft_shown: str  # the draft text inside q' (after stripping and truncation)
    think_stripped: bool
    truncated: bool
    prompt_tokens: int | None  # tokens of ``text``; None when no counter was given
    fits: bool  # prompt_tokens <= max_prompt_tokens (True when there is no budget)


def fill_template(template: str, problem: str, draft: str) -> str:
    """Replace ``{problem}`` and ``{draft}`` once each; every other brace is left alone (LaTeX)."""
    if template.count("{problem}") != 1 or template.count("{draft}") != 1:
        raise ValueError("algorithm.igrpo.prompt.template must contain {problem} and {draft} exactly once.")
    head, tail = template.split("{draft}")
    # Split first so a problem that itself contains the text "{draft}" is not filled twice.
    return head.replace("{problem}", problem) + draft + tail.replace("{problem}", problem)


def strip_think(text: str, open_tag: str = "<think>", close_tag: str = "</think>") -> tuple[str, bool]:
    """The draft without its reasoning, and whether anything was removed.

    In order: closed ``open...close`` blocks are removed; a stray ``close`` (the chat template opened
    the block inside the prompt) removes everything up to its last occurrence; a stray ``open`` (the
    generation stopped while thinking) removes everything from it on. If nothing but whitespace is
    left, the original text is returned unchanged (the reasoning is then all there is to show).
    """
    out = re.sub(re.escape(open_tag) + r".*?" + re.escape(close_tag), "", text, flags=re.DOTALL)
    if close_tag in out:
        out = out[out.rindex(close_tag) + len(close_tag):]
    if open_tag in out:
        out = out[:out.index(open_tag)]
    out = out.strip()
    if not out:
        return text, False
    return out, out != text


class _Cutter:
    """Keeps ``k`` units (tokens with encode/decode, else characters) from one end of the draft."""

    def __init__(self, draft: str, keep_tail: bool, marker: str, encode: Encode | None,
                 decode: Decode | None):
        self.keep_tail, self.marker, self.decode = keep_tail, marker, decode
        self.units: Sequence[int] | str = list(encode(draft)) if decode is not None else draft

    def __len__(self) -> int:
        return len(self.units)

    def __call__(self, k: int) -> str:
        if k <= 0:
            return ""
        piece = self.units[-k:] if self.keep_tail else self.units[:k]
        text = self.decode(piece) if self.decode is not None else piece
        if k >= len(self.units) or not self.marker:
            return text
        return f"{self.marker} {text}" if self.keep_tail else f"{text} {self.marker}"


def _counter(encode: Encode | None, count_tokens: Callable[[str], int] | None) -> Callable[[str], int] | None:
    if count_tokens is not None:
        return count_tokens
    if encode is not None:
        return lambda s: len(encode(s))
    return None


def build_refinement_prompt(
    problem_text: str,
    draft_text: str,
    cfg: RefinementPromptConfig | None = None,
    *,
    max_prompt_tokens: int | None = None,
    encode: Encode | None = None,
    decode: Decode | None = None,
    count_tokens: Callable[[str], int] | None = None,
) -> RefinementPrompt:
    """q' = template(problem, draft), with the draft's reasoning stripped and its length bounded.

    The draft is cut (from the end chosen by ``cfg.truncation``, marked by ``cfg.truncation_marker``)
    until q' has at most ``max_prompt_tokens`` tokens and the shown draft at most
    ``cfg.max_draft_tokens``; if even an empty draft does not fit, q' has an empty draft and
    ``fits`` is False (the caller decides: drop the prompt, or fall back to the plain one).

    Args:
        problem_text: the problem as the plain prompt states it.
        draft_text: the selected Stage-1 completion (decoded text).
        cfg: ``recipe.algorithm.igrpo.prompt`` (template, strip_think, truncation settings);
            None: the defaults.
        max_prompt_tokens: token budget of q' (the recipe's max prompt length less any chat
            template overhead not counted by ``encode``); None: no budget.
        encode / decode: token ids of a text and back; gives token-exact cuts.
        count_tokens: number of tokens of a text; used instead of ``encode`` when given.
    """
    cfg = cfg or RefinementPromptConfig()
    shown, stripped = (strip_think(draft_text, cfg.think_open, cfg.think_close) if cfg.strip_think
                       else (draft_text, False))
    if decode is not None and encode is None:
        raise ValueError("decode= needs encode= as well (token-exact cuts encode the draft first).")
    count = _counter(encode, count_tokens)
    if count is None and (max_prompt_tokens is not None or cfg.max_draft_tokens is not None):
        raise ValueError("a token budget (max_prompt_tokens or algorithm.igrpo.prompt.max_draft_tokens) "
                         "needs encode= (with decode=) or count_tokens= to count tokens.")
    if count is None:
        return RefinementPrompt(fill_template(cfg.template, problem_text, shown), shown, stripped,
                                False, None, True)

    def fits(draft: str) -> bool:
        if cfg.max_draft_tokens is not None and count(draft) > cfg.max_draft_tokens:
            return False
        return max_prompt_tokens is None or count(fill_template(cfg.template, problem_text, draft)) \
            <= max_prompt_tokens

    truncated = not fits(shown)
    if truncated:
        cut = _Cutter(shown, cfg.truncation == "keep_tail", cfg.truncation_marker, encode, decode)
        shown = cut(_largest_fitting(len(cut), lambda k: fits(cut(k))))
    text = fill_template(cfg.template, problem_text, shown)
    n = count(text)
    ok = max_prompt_tokens is None or n <= max_prompt_tokens
    if not ok:
        logger.warning("refinement prompt has %d tokens > max_prompt_tokens=%d even without the draft",
                       n, max_prompt_tokens)
    return RefinementPrompt(text, shown, stripped, truncated, n, ok)


def _largest_fitting(n: int, fits: Callable[[int], bool]) -> int:
    """Largest k in [0, n) with fits(k), by bisection (token counts grow with k); 0 if none."""
    lo, hi = 0, n - 1  # invariant: answer in [lo, hi]; k = n is known not to fit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo
