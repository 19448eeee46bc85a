"""Answer extraction: answer blocks, last \\boxed{} with nested braces, regex, cut-off thinking."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from igrpo_megatron.config.reward import AnswerExtractionConfig
from igrpo_megatron.rewards.extraction import answer_region, extract_answer, last_boxed, to_latex_input

AUTO = AnswerExtractionConfig()
NO_THINK = AnswerExtractionConfig(require_think_close=False)


@pytest.mark.parametrize("completion, expected", [
    # The answer block wins; a \boxed{} inside it is unwrapped (boxed_inside_answer).
    ("<think>a</think><answer>42</answer>", "42"),
    ("<think>a</think><answer>So \\boxed{\\frac{1}{2}}.</answer>", "\\frac{1}{2}"),
    # No answer block: the last \boxed{} after the thinking, nested braces kept whole.
    ("<think>a</think>We get \\boxed{\\frac{\\sqrt{3}}{2}} done", "\\frac{\\sqrt{3}}{2}"),
    # Several boxes: the last one.
    ("<think>a</think>first \\boxed{3}, corrected: \\boxed{4}", "4"),
    # A box inside the thinking does not count.
    ("<think>maybe \\boxed{7}</think>The answer is \\boxed{8}.", "8"),
    # Escaped set braces are not structure.
    ("<think>a</think>\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
    ("<think>a</think>\\fbox{5}", "5"),
    ("<think>a</think>\\boxed {5}", "5"),
    # Last of several answer blocks; surrounding whitespace stripped.
    ("<think>a</think><answer>1</answer><answer>  2 </answer>", "2"),
])
def test_auto_source_finds_the_final_answer(completion, expected):
    assert extract_answer(completion, AUTO) == expected


@pytest.mark.parametrize("completion", [
    "<think>still thinking \\boxed{3}",               # thinking cut off (no </think>)
    "I think the answer is \\boxed{3}",               # no </think> at all, require_think_close
    "<think>a</think><answer>5",                       # answer block opened, never closed
    "<think>a</think>so \\boxed{\\frac{1}{2}",         # last box cut off mid-expression
    "<think>a</think>no boxed answer here",           # nothing to extract
    "<think>a</think><answer>   </answer>",           # empty answer
    "<think>a</think>\\boxed{3} then \\boxed{4",       # the last box is open: not an earlier one
])
def test_completions_without_an_answer(completion):
    assert extract_answer(completion, AUTO) is None


def test_thinking_rules_without_require_think_close():
    # Without require_think_close, a completion with no thinking at all is searched whole...
    assert extract_answer("The answer is \\boxed{3}", NO_THINK) == "3"
    # ...but one that opened <think> and never closed it was cut off.
    assert extract_answer("<think>\\boxed{3}", NO_THINK) is None
    assert answer_region("<think>x</think> tail", NO_THINK) == " tail"
    no_tags = AnswerExtractionConfig(think_open=None, think_close=None, require_think_close=False)
    assert extract_answer("<think>\\boxed{3}", no_tags) == "3"


def test_answer_tag_source_ignores_boxes_outside_the_block():
    cfg = AnswerExtractionConfig(source="answer_tag")
    assert extract_answer("<think>a</think>\\boxed{3}", cfg) is None
    assert extract_answer("<think>a</think><answer>\\boxed{3}</answer>", cfg) == "3"
    keep = AnswerExtractionConfig(source="answer_tag", boxed_inside_answer=False)
    assert extract_answer("<think>a</think><answer>x = \\boxed{3}</answer>", keep) == "x = \\boxed{3}"


def test_boxed_source_ignores_answer_blocks():
    cfg = AnswerExtractionConfig(source="boxed")
    assert extract_answer("<think>a</think><answer>3</answer>", cfg) is None
    assert extract_answer("<think>a</think><answer>\\boxed{3}</answer>", cfg) == "3"


def test_regex_source_uses_named_group_then_group_one_then_whole_match():
    named = AnswerExtractionConfig(source="regex", regex=r"Final: (?P<pre>\s*)(?P<answer>\S+)")
    assert extract_answer("<think>a</think>Final: 1 and Final: 22", named) == "22"
    group1 = AnswerExtractionConfig(source="regex", regex=r"#### (\S+)")
    assert extract_answer("<think>a</think>#### 7\n#### 9", group1) == "9"
    whole = AnswerExtractionConfig(source="regex", regex=r"\d+")
    assert extract_answer("<think>1</think> 5 then 6", whole) == "6"
    missing = AnswerExtractionConfig(source="regex", regex=None)
    with pytest.raises(ValueError, match="reward.extraction.regex"):
        extract_answer("<think>a</think>x", missing)


def test_last_boxed_edge_cases():
    assert last_boxed("no box") is None
    assert last_boxed("\\boxed{}") == ""
    assert last_boxed("\\boxed{a{b}c}") == "a{b}c"
    assert last_boxed("\\boxed{\\boxed{3}}") == "3"  # the innermost box is the last to start


@given(st.recursive(st.text(alphabet="abc123+-= ", max_size=5),
                    lambda inner: st.lists(inner, min_size=1, max_size=3).map(lambda xs: "{" + "".join(xs) + "}"),
                    max_leaves=8))
def test_boxed_content_with_any_balanced_braces_comes_back_whole(content):
    assert last_boxed(f"text \\boxed{{{content}}} more") == content


@pytest.mark.parametrize("answer, expected", [
    ("\\frac{1}{2}", "$\\frac{1}{2}$"),
    ("$3$", "$3$"),                 # delimiters not doubled
    ("\\(x+1\\)", "$x+1$"),
    ("$$5$$", "$5$"),
    ("\\boxed{3}", "\\boxed{3}"),   # already in a form math-verify extracts
    ("  7 ", "$7$"),
])
def test_to_latex_input(answer, expected):
    assert to_latex_input(answer) == expected
