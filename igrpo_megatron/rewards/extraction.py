"""Find the final answer in a completion written in the recipe's output format.

Runs in the trainer process before anything is sent to the verification workers: only the short
answer string crosses the process boundary, and a completion with no answer never costs a worker.
"""

from __future__ import annotations

import re
from functools import lru_cache

from igrpo_megatron.config.reward import AnswerExtractionConfig

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_MATH_DELIMITERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))


def answer_region(completion: str, cfg: AnswerExtractionConfig) -> str | None:
    """The part of ``completion`` after its thinking, or None when the thinking was cut off."""
    if cfg.think_close and cfg.think_close in completion:
        return completion.rsplit(cfg.think_close, 1)[1]
    if cfg.require_think_close:
        return None
    if cfg.think_open and cfg.think_open in completion:
        return None  # opened, never closed: truncated
    return completion


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) with nested braces; None if none or unclosed."""
    last = None
    for last in _BOXED.finditer(text):  # noqa: B007 (we want the last match)
        pass
    # An unclosed last box means the output was cut inside it: no answer (not an earlier box).
    return _balanced(text, last.end()) if last is not None else None


def _balanced(text: str, start: int) -> str | None:
    """Text from ``start`` to the brace closing the one just before ``start`` (escaped braces skipped)."""
    depth = 1
    i = start
    n = len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2  # skip \{ and \} (set braces) as well as any other escaped character
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start:i]
        i += 1
    return None


def answer_block(text: str, open_tag: str, close_tag: str) -> tuple[bool, str | None]:
    """(found, content) of the last ``open_tag ... close_tag`` block; content None when it never closes."""
    pos = text.rfind(open_tag)
    if pos < 0:
        return False, None
    rest = text[pos + len(open_tag):]
    end = rest.find(close_tag)
    if end < 0:
        return True, None
    return True, rest[:end]


@lru_cache(maxsize=32)
def _compile(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern, re.DOTALL)


def _regex_answer(text: str, pattern: str) -> str | None:
    compiled = _compile(pattern)
    last = None
    for last in compiled.finditer(text):  # noqa: B007 (we want the last match)
        pass
    if last is None:
        return None
    if "answer" in compiled.groupindex:
        return last.group("answer")
    return last.group(1) if compiled.groups else last.group(0)


def extract_answer(completion: str, cfg: AnswerExtractionConfig) -> str | None:
    """The final answer of ``completion`` (stripped), or None when it has none."""
    region = answer_region(completion, cfg)
    if region is None:
        return None
    answer: str | None = None
    if cfg.source == "regex":
        if not cfg.regex:
            raise ValueError("reward.extraction.source is 'regex' but reward.extraction.regex is null; "
                             "set a pattern.")
        answer = _regex_answer(region, cfg.regex)
    else:
        found = False
        if cfg.source in ("auto", "answer_tag"):
            found, answer = answer_block(region, cfg.answer_open, cfg.answer_close)
            if answer is not None and cfg.boxed_inside_answer and _BOXED.search(answer):
                answer = last_boxed(answer)
        if not found and cfg.source in ("auto", "boxed"):
            answer = last_boxed(region)
    if answer is None:
        return None
    answer = answer.strip()
    return answer or None


def to_latex_input(answer: str) -> str:
    """Wrap an answer string in ``$...$`` for math-verify's LaTeX extractor (existing delimiters kept)."""
    s = answer.strip()
    if "\\boxed" in s:
        return s
    for left, right in _MATH_DELIMITERS:
        if s.startswith(left) and s.endswith(right) and len(s) > len(left) + len(right):
            s = s[len(left):-len(right)].strip()
            break
    return f"${s}$"
