"""Recipe section for rewards: answer extraction, format rule, math verification pool, LLM judge.

Composed into the recipe as ``recipe.reward``. ``igrpo_megatron.rewards.build_rewards`` reads it and
returns the reward used for Stage-2 (and plain GRPO) updates and the one used for iGRPO draft
selection. Each reward is a weighted sum of named components (``math``, ``format``, ``judge``, or any
name registered with ``igrpo_megatron.rewards.register_reward``). ``validate()`` returns every problem
at once so that the loader can report them together.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from igrpo_megatron.config.fields import choice_errors, param

ANSWER_SOURCES = ("auto", "answer_tag", "boxed", "regex")
START_METHODS = ("forkserver", "spawn")
JUDGE_APIS = ("chat", "completions")
JUDGE_SOLUTION_VIEWS = ("after_think", "full")

DEFAULT_JUDGE_TEMPLATE = (
    "You are grading a student's solution to a math problem.\n\n"
    "Problem:\n{problem}\n\n"
    "Reference answer:\n{reference}\n\n"
    "Student solution:\n{solution}\n\n"
    "Decide how correct the student's final answer is compared with the reference answer (equivalent "
    "forms count as correct). Reply with one line of the form 'SCORE: x' where x is a number between "
    "0 and 1 (1: correct, 0: wrong)."
)


@dataclass
class AnswerExtractionConfig:
    """Where the final answer sits in a completion (the recipe's output format)."""

    source: str = param("auto", choices=ANSWER_SOURCES,
                        help="'answer_tag': the last <answer>...</answer> block; 'boxed': the last "
                             "\\boxed{...} (nested braces handled); 'auto': the answer block when the "
                             "completion has one, else the last \\boxed{}; 'regex': the last match of "
                             "`regex`.")
    answer_open: str = param("<answer>", help="Opening tag of the answer block ('answer_tag'/'auto').")
    answer_close: str = param("</answer>", help="Closing tag of the answer block. An opened block that is "
                                                "never closed (truncated output) gives no answer.")
    boxed_inside_answer: bool = param(True, help="When the answer block holds \\boxed{...}, keep only the "
                                                 "last boxed content. false: the whole block is the answer.")
    regex: str | None = param(None, help="Python regex for source 'regex' (DOTALL). The answer is the group "
                                         "named 'answer', else group 1, else the whole match, of the last "
                                         "match. null: not used.")
    think_open: str | None = param("<think>", help="Tag that opens the thinking part. A completion that "
                                                   "opens it and never closes it has no answer. null: "
                                                   "completions have no thinking part.")
    think_close: str | None = param("</think>", help="Tag that closes the thinking part; the answer is "
                                                     "searched only after its last occurrence. null: search "
                                                     "the whole completion.")
    require_think_close: bool = param(
        True, help="A completion without think_close has no answer (its thinking was cut off). Right for "
                   "chat templates that open <think> inside the prompt (R1-Distill, OpenReasoning). Set "
                   "false for models that do not think before answering.")


@dataclass
class FormatRewardConfig:
    """The structure rule behind the ``format`` reward component (1 when followed, else 0)."""

    require_think: bool = param(True, help="The thinking part is closed exactly once (think_close appears "
                                           "once, think_open at most once and before it). false: no rule.")
    require_answer: bool = param(True, help="An answer can be extracted with reward.extraction (so with "
                                            "source 'answer_tag' the answer block must be present and closed).")
    pattern: str | None = param(None, help="Extra Python regex the whole completion must match (DOTALL, "
                                           "full match), e.g. '\\s*<think>.*</think>\\s*<answer>.*</answer>\\s*'. "
                                           "null: no extra rule.")


@dataclass
class MathVerifyConfig:
    """The ``math`` component: math-verify in a pool of worker processes with a hard per-item deadline."""

    num_workers: int | None = param(None, help="Worker processes (started once, reused every step). null: "
                                               "the number of CPU cores this process may run on.")
    item_timeout_s: float = param(5.0, help="Hard deadline per (gold, answer) pair. A worker still busy after "
                                            "it is killed and replaced; the item scores 0 and counts as a "
                                            "timeout. A worker starved of CPU by other processes gets up to 3x "
                                            "this in wall time, as long as it has used less than this in CPU.")
    chunk_size: int = param(32, help="Most items sent to a worker in one message (fewer when a batch is "
                                     "small, so all workers get work). Larger: less IPC; smaller: better "
                                     "load balance.")
    start_method: str = param("forkserver", choices=START_METHODS,
                              help="How workers start. 'forkserver' preloads math-verify once so a killed "
                                   "worker is replaced in milliseconds; 'spawn' imports it in every worker.")
    float_rounding: int = param(6, help="math-verify float_rounding: decimal places floats are rounded to.")
    numeric_precision: int = param(15, help="math-verify numeric_precision: digits used in numeric "
                                            "comparisons.")
    strict: bool = param(True, help="math-verify strict mode: variable names matter and sets are not equal "
                                    "to tuples. false: compare variables by position.")


@dataclass
class JudgeConfig:
    """The ``judge`` component: an LLM behind a vLLM OpenAI-compatible server scores each solution in [0, 1]."""

    url: str = param("http://127.0.0.1:8001", help="Base URL of the judge server (with or without '/v1').")
    model: str | None = param(None, help="Model name sent with each request. null: the first model the "
                                         "server lists at /v1/models.")
    api: str = param("chat", choices=JUDGE_APIS,
                     help="'chat': /v1/chat/completions (the server applies the model's chat template); "
                          "'completions': /v1/completions with the filled template as the raw prompt.")
    prompt_template: str = param(DEFAULT_JUDGE_TEMPLATE,
                                 help="Judge prompt. The literal placeholders {problem}, {reference} and "
                                      "{solution} are replaced (no other braces are interpreted, so LaTeX "
                                      "is safe).")
    system_prompt: str | None = param(None, help="System message for api 'chat'. null: none.")
    solution_view: str = param("after_think", choices=JUDGE_SOLUTION_VIEWS,
                               help="What the judge sees as the solution: 'after_think' drops the thinking "
                                    "part (a completion whose thinking was cut off scores 0 without a "
                                    "request); 'full': the whole completion.")
    max_solution_chars: int = param(8000, help="Longer solutions are cut to their last this-many characters.")
    score_regex: str = param(r"SCORE\s*[:=]\s*\**\s*([01](?:\.\d+)?|\.\d+)",
                             help="Python regex (case-insensitive) whose group 1 in its last match is the "
                                  "score; a match followed by a digit is refused ('SCORE: 10' is not 1). Text "
                                  "before a closing </think> is ignored. A score outside [0, 1] or no match "
                                  "falls back.")
    max_tokens: int = param(512, help="Most tokens the judge may generate per reply.")
    temperature: float = param(0.0, help="Judge sampling temperature (0: greedy).")
    extra_body: dict[str, Any] = param(default_factory=dict,
                                          help="More fields merged into every request body, e.g. "
                                               "{'structured_outputs': {'regex': 'SCORE: (0|1)'}} for vLLM "
                                               "constrained decoding.")
    max_concurrency: int = param(64, help="Most requests in flight at once.")
    request_timeout_s: float = param(120.0, help="Seconds one request may take before it counts as failed.")
    max_retries: int = param(3, help="Retries after a connection error, timeout, HTTP 429 or 5xx (other "
                                     "errors are not retried). 0: no retries.")
    backoff_s: float = param(0.5, help="Wait before the first retry; doubles after each (with +-25% jitter).")
    backoff_max_s: float = param(8.0, help="Longest wait between two tries.")
    correct_threshold: float = param(0.5, help="A judged score >= this marks the item correct (used by "
                                               "draft selection rules such as best_incorrect).")
    fallback: str = param("math", help="Reward component that scores an item when the judge's reply cannot be "
                                       "parsed or the judge is down (counted as judge_fallback).")
    api_key_env: str | None = param(None, help="Environment variable holding a bearer token for the judge "
                                               "server. null: no Authorization header.")


@dataclass
class RewardConfig:
    """Rewards for Stage-2/GRPO updates and for iGRPO draft selection, as weighted sums of components."""

    weights: dict[str, float] = param(
        default_factory=lambda: {"math": 1.0, "format": 1.0},
        help="Training reward = sum of weight * component score (paper: accuracy + format, weight 1 each). "
             "Components: 'math', 'format', 'judge', or any registered name. Weight 0: computed and logged "
             "but not rewarded.")
    draft_weights: dict[str, float] | None = param(
        None, help="Reward used to select the iGRPO Stage-1 draft, same form as `weights` (e.g. {judge: 1.0} "
                   "to select drafts with the judge). null: same as `weights`.")
    correct_from: str | None = param(
        None, help="Component whose per-item correct flag the combined reward reports (draft rules such as "
                   "best_incorrect read it); it must be in the weights it applies to. null: the first component in "
                   "the weights that judges correctness ('math' or 'judge').")
    extraction: AnswerExtractionConfig = param(default_factory=AnswerExtractionConfig,
                                               help="Where the final answer sits in a completion.")
    format: FormatRewardConfig = param(default_factory=FormatRewardConfig,
                                       help="The rule behind the 'format' component.")
    math: MathVerifyConfig = param(default_factory=MathVerifyConfig,
                                   help="The 'math' component: math-verify worker pool.")
    judge: JudgeConfig = param(default_factory=JudgeConfig,
                               help="The 'judge' component: generative judge over HTTP.")

    def errors(self, prefix: str = "reward") -> list[str]:
        """Every rule this section breaks, each naming the key and the fix (empty when valid).

        The keys are named from ``reward.`` whatever ``prefix`` is (the section has one place in a recipe).
        """
        errors: list[str] = []
        errors.extend(choice_errors(self, "reward"))
        for key, weights in (("reward.weights", self.weights), ("reward.draft_weights", self.draft_weights)):
            if weights is None:
                continue
            if not weights:
                errors.append(f"{key} is empty: give at least one component, e.g. {{math: 1.0}}.")
            for name, w in weights.items():
                if not isinstance(w, int | float) or w != w:
                    errors.append(f"{key}.{name} = {w!r}: must be a number.")
        m, j, x = self.math, self.judge, self.extraction
        positive = {
            "reward.math.item_timeout_s": m.item_timeout_s,
            "reward.math.chunk_size": m.chunk_size,
            "reward.judge.max_tokens": j.max_tokens,
            "reward.judge.max_concurrency": j.max_concurrency,
            "reward.judge.request_timeout_s": j.request_timeout_s,
            "reward.judge.max_solution_chars": j.max_solution_chars,
        }
        if m.num_workers is not None:
            positive["reward.math.num_workers"] = m.num_workers
        for key, value in positive.items():
            if value <= 0:
                errors.append(f"{key} = {value}: must be > 0; set it to a positive value.")
        if j.max_retries < 0:
            errors.append(f"reward.judge.max_retries = {j.max_retries}: must be >= 0 (0: no retries).")
        if j.backoff_s < 0 or j.backoff_max_s < 0:
            errors.append("reward.judge.backoff_s / backoff_max_s: must be >= 0.")
        if not 0 <= j.correct_threshold <= 1:
            errors.append(f"reward.judge.correct_threshold = {j.correct_threshold}: must be in [0, 1].")
        if "{solution}" not in j.prompt_template:
            errors.append("reward.judge.prompt_template has no {solution} placeholder: the judge would not "
                          "see the solution; add {solution} (and {problem}, {reference}).")
        if not j.url.startswith(("http://", "https://")):
            errors.append(f"reward.judge.url = {j.url!r}: must start with http:// or https://.")
        if x.source == "regex" and not x.regex:
            errors.append("reward.extraction.source = 'regex' needs reward.extraction.regex; set a pattern "
                          "or pick another source.")
        for key, pattern in (("reward.extraction.regex", x.regex), ("reward.format.pattern", self.format.pattern),
                             ("reward.judge.score_regex", j.score_regex)):
            if pattern is None:
                continue
            try:
                compiled = re.compile(pattern)
            except re.error as e:
                errors.append(f"{key} = {pattern!r} is not a valid regex ({e}); fix the pattern.")
                continue
            if key == "reward.judge.score_regex" and compiled.groups < 1:
                errors.append(f"{key} = {pattern!r} has no group: put the score in group 1, e.g. "
                              "'SCORE: ([01](?:\\.\\d+)?)'.")
        if x.require_think_close and not x.think_close:
            errors.append("reward.extraction.require_think_close is true but think_close is null: set "
                          "think_close (e.g. '</think>') or set require_think_close: false.")
        return errors

