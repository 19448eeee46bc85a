"""build_refinement_prompt: template filling, <think> stripping, truncation to a token budget."""

import pytest

from igrpo_megatron.algorithms import build_refinement_prompt, fill_template, strip_think
from igrpo_megatron.config.algorithm import DEFAULT_REFINEMENT_TEMPLATE, RefinementPromptConfig


class WordTokenizer:
    """One token per whitespace-separated word: counts are easy to do by hand."""

    def __init__(self):
        self.vocab: list[str] = []

    def encode(self, text):
        ids = []
        for w in text.split():
            if w not in self.vocab:
                self.vocab.append(w)
            ids.append(self.vocab.index(w))
        return ids

    def decode(self, ids):
        return " ".join(self.vocab[i] for i in ids)


TEMPLATE = "Q: {problem}\nA: {draft}"
DRAFT = " ".join(f"w{i}" for i in range(1, 11))  # w1 ... w10: 10 tokens


def _cfg(**kw):
    return RefinementPromptConfig(template=TEMPLATE, **kw)


def test_template_keeps_latex_braces_and_fills_once():
    problem = r"Compute \frac{1}{2} + {x} and {draft}"
    out = fill_template(TEMPLATE, problem, "4 {problem}")
    assert out == "Q: Compute \\frac{1}{2} + {x} and {draft}\nA: 4 {problem}"
    with pytest.raises(ValueError, match="exactly once"):
        fill_template("{problem} only", "p", "d")


def test_default_template_says_what_the_paper_means():
    text = build_refinement_prompt("What is 2+2?", "It is 4.").text
    assert text.startswith("What is 2+2?") and text.rstrip().endswith("It is 4.")
    low = DEFAULT_REFINEMENT_TEMPLATE.lower()
    for phrase in ("earlier attempt", "may contain mistakes", "guidance", "strictly better", "do not copy"):
        assert phrase in low


@pytest.mark.parametrize("draft, shown, stripped", [
    ("<think>reason</think>The answer is 4.", "The answer is 4.", True),
    ("reasoning opened by the chat template</think>\nFinal: 4", "Final: 4", True),  # R1 style
    ("Intro <think>unfinished thought", "Intro", True),  # stopped mid-thought
    ("<think>a</think>Mid <think>b</think> End", "Mid  End", True),
    ("<think>never closed, nothing else", "<think>never closed, nothing else", False),  # all reasoning: kept
    ("No tags here", "No tags here", False),
])
def test_strip_think(draft, shown, stripped):
    assert strip_think(draft) == (shown, stripped)


def test_strip_think_switch_and_custom_tags():
    draft = "<think>x</think>y"
    assert build_refinement_prompt("p", draft, _cfg(strip_think=False)).draft_shown == draft
    r = build_refinement_prompt("p", "[R]x[/R]y", _cfg(think_open="[R]", think_close="[/R]"))
    assert r.draft_shown == "y" and r.think_stripped


def test_keep_tail_truncation_is_token_exact():
    tok = WordTokenizer()
    # overhead "Q: p1 p2 A:" = 4 tokens; budget 10 -> 6 for the draft: marker "[...]" + 5 words
    r = build_refinement_prompt("p1 p2", DRAFT, _cfg(), max_prompt_tokens=10, encode=tok.encode,
                                decode=tok.decode)
    assert r.draft_shown == "[...] w6 w7 w8 w9 w10"
    assert r.text == "Q: p1 p2\nA: [...] w6 w7 w8 w9 w10"
    assert (r.truncated, r.prompt_tokens, r.fits) == (True, 10, True)


def test_keep_head_truncation():
    tok = WordTokenizer()
    r = build_refinement_prompt("p1 p2", DRAFT, _cfg(truncation="keep_head"), max_prompt_tokens=10,
                                encode=tok.encode, decode=tok.decode)
    assert r.draft_shown == "w1 w2 w3 w4 w5 [...]"


def test_no_truncation_when_it_fits():
    tok = WordTokenizer()
    r = build_refinement_prompt("p1 p2", DRAFT, _cfg(), max_prompt_tokens=14, encode=tok.encode,
                                decode=tok.decode)  # 4 + 10 = 14
    assert r.draft_shown == DRAFT and not r.truncated and r.prompt_tokens == 14


def test_max_draft_tokens_alone():
    tok = WordTokenizer()
    r = build_refinement_prompt("p", DRAFT, _cfg(max_draft_tokens=3, truncation_marker=""),
                                encode=tok.encode, decode=tok.decode)
    assert r.draft_shown == "w8 w9 w10"


def test_count_tokens_only_cuts_at_characters():
    count = lambda s: len(s.split())  # noqa: E731
    r = build_refinement_prompt("p1 p2", DRAFT, _cfg(), max_prompt_tokens=10, count_tokens=count)
    # the longest tail with "[...] " + tail <= 6 words is " w6 w7 w8 w9 w10" (one more char adds "5")
    assert r.draft_shown == "[...]  w6 w7 w8 w9 w10"
    assert r.prompt_tokens == 10 and r.fits


def test_stripping_happens_before_counting():
    tok = WordTokenizer()
    draft = "<think>" + " ".join(["t"] * 50) + "</think> a b c"
    r = build_refinement_prompt("p", draft, _cfg(), max_prompt_tokens=6, encode=tok.encode, decode=tok.decode)
    # "Q: p A: a b c" = 6 tokens: the reasoning is gone, so no cut was needed
    assert r.draft_shown == "a b c" and not r.truncated and r.think_stripped


def test_prompt_that_cannot_fit_drops_the_draft_and_says_so():
    tok = WordTokenizer()
    r = build_refinement_prompt("p1 p2", DRAFT, _cfg(), max_prompt_tokens=3, encode=tok.encode,
                                decode=tok.decode)  # overhead alone is 4
    assert r.draft_shown == "" and r.truncated and not r.fits and r.prompt_tokens == 4


def test_budget_needs_a_counter():
    with pytest.raises(ValueError, match="count_tokens"):
        build_refinement_prompt("p", "d", max_prompt_tokens=10)
    with pytest.raises(ValueError, match="encode"):
        build_refinement_prompt("p", "d", max_prompt_tokens=10, decode=lambda ids: "")
