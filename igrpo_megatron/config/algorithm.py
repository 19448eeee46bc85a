"""Recipe section ``algorithm``: group advantages, the GRPO-family policy loss and the iGRPO wrapper.

The reference settings of the iGRPO paper (arXiv 2602.09000) are the defaults: per-sequence token
mean, symmetric clip 0.2, KL estimator k3 with coefficient 0, N = G = 4 against a GRPO budget of 8.
Other members of the family are a few field changes: :data:`LOSS_VARIANTS`, chosen by
``algorithm.variant`` (the loader writes the fields; a field the recipe sets itself wins).
This module only declares and validates settings; it imports nothing heavier than dataclasses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from igrpo_megatron.config.fields import choice_errors, param

AGGREGATIONS = ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm")
RATIO_LEVELS = ("token", "sequence")
KL_ESTIMATORS = ("k1", "k2", "k3")
SELECTION_RULES = ("best", "worst", "random", "best_incorrect")
TIE_BREAKS = ("first", "shortest", "random")
ALL_ZERO_POLICIES = ("keep", "skip", "no_draft")
DRAFT_TRUNCATIONS = ("keep_tail", "keep_head")
TRAIN_ROUNDS = ("all", "last")

# Named members of the GRPO family: section -> field -> value, relative to ``algorithm``.
# Sources: GRPO arXiv 2402.03300, Dr.GRPO 2503.20783, DAPO 2503.14476, GSPO 2507.18071.
# Only DAPO samples dynamically and shapes over-long rewards; the others switch both off, so a
# variant named over a base that turned them on gives that variant's own settings.
_DAPO_EXTRAS_OFF = {"dynamic_sampling": {"enabled": False}, "overlong_penalty": {"enabled": False}}
LOSS_VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    "grpo": {
        "advantage": {"normalize_by_std": True},
        "loss": {"ratio_level": "token", "clip_low": 0.2, "clip_high": 0.2,
                 "aggregation": "seq_mean_token_mean"},
        **_DAPO_EXTRAS_OFF,
    },
    "dr_grpo": {
        "advantage": {"normalize_by_std": False},
        "loss": {"ratio_level": "token", "clip_low": 0.2, "clip_high": 0.2,
                 "aggregation": "seq_mean_token_sum_norm"},
        **_DAPO_EXTRAS_OFF,
    },
    "dapo": {
        "advantage": {"normalize_by_std": True},
        "loss": {"ratio_level": "token", "clip_low": 0.2, "clip_high": 0.28, "aggregation": "token_mean"},
        "dynamic_sampling": {"enabled": True},
        # The buffer stays null: a fifth of the completion budget, DAPO's 4,096 of 20,480.
        "overlong_penalty": {"enabled": True, "penalty_factor": 1.0},
    },
    "gspo": {
        "advantage": {"normalize_by_std": True},
        "loss": {"ratio_level": "sequence", "clip_low": 3e-4, "clip_high": 4e-4,
                 "aggregation": "seq_mean_token_mean"},
        **_DAPO_EXTRAS_OFF,
    },
}
# Dr.GRPO's constant divisor: the rollout's maximum completion length unless the recipe sets one.
VARIANT_LENGTH_KEY = "loss.max_length_normalizer"


def variant_fields(name: str, max_length: int | None = None) -> dict[str, Any]:
    """The fields variant ``name`` sets, as dotted keys below ``algorithm`` (``{"loss.clip_high": 0.28}``).

    ``max_length`` fills ``loss.max_length_normalizer`` for variants that divide by it (Dr.GRPO).
    """
    if name not in LOSS_VARIANTS:
        raise ValueError(f"unknown loss variant {name!r}; known: {sorted(LOSS_VARIANTS)}.")
    out = {f"{section}.{key}": value for section, values in LOSS_VARIANTS[name].items()
           for key, value in values.items()}
    if max_length is not None and out.get("loss.aggregation") == "seq_mean_token_sum_norm":
        out[VARIANT_LENGTH_KEY] = max_length
    return out


# Our own wording of the paper's instruction. ``{problem}`` and ``{draft}`` are filled by plain
# string replacement (not str.format), so braces in LaTeX problems are safe.
DEFAULT_REFINEMENT_TEMPLATE = (
    "{problem}\n\n"
    "Below is an earlier attempt at this problem. Use it as guidance only: it may contain mistakes, "
    "so check every step instead of trusting it. Write a new, complete solution whose final answer "
    "is strictly better than the earlier one. Do not copy the earlier attempt.\n\n"
    "Earlier attempt:\n{draft}\n"
)


@dataclass
class AdvantageConfig:
    """How rewards of one group become advantages (``algorithms.group_advantages``).

    The field names equal the keyword arguments of ``group_advantages``, so
    ``group_advantages(r, **dataclasses.asdict(cfg))`` works.
    """

    normalize_by_std: bool = param(
        True, help="Divide (reward - baseline) by the group's reward std (GRPO). false: Dr.GRPO "
                   "(arXiv 2503.20783), which removes this scaling.")
    leave_one_out: bool = param(
        False, help="Baseline of completion i is the mean of the other G-1 rewards (RLOO) instead of "
                    "the group mean. Needs group size >= 2.")
    eps: float = param(1e-6, help="Added to the std before dividing; only used when normalize_by_std.")


@dataclass
class KLConfig:
    """KL penalty to a frozen reference policy, added per token to the loss."""

    coef: float = param(
        0.0, help="beta in loss + beta * KL(pi_theta || pi_ref). 0 (paper default) turns the penalty "
                  "off and the reference model is never loaded or run; the paper's ablation used 1e-4.")
    estimator: str = param(
        "k3", choices=KL_ESTIMATORS,
        help="Per-token estimator of KL with x = log pi_ref - log pi_theta: 'k1' = -x, "
             "'k2' = x^2 / 2, 'k3' = exp(x) - x - 1 (unbiased, non-negative; the paper's choice).")


@dataclass
class TruncatedISConfig:
    """Truncated importance weight for the rollout engine's log-probs differing from the trainer's."""

    enabled: bool = param(
        False, help="Multiply the per-token policy-gradient term by min(pi_old_trainer / pi_rollout, cap) "
                    "(detached), correcting for vLLM and the trainer computing different log-probs for the "
                    "same weights. Needs the rollout log-probs. false: no correction (the mismatch is "
                    "still logged when rollout log-probs are given).")
    cap: float = param(2.0, help="Upper bound C of the truncated weight; must be > 0.")


@dataclass
class PolicyLossConfig:
    """The clipped surrogate and its variants (GRPO, Dr.GRPO, DAPO, GSPO)."""

    ratio_level: str = param(
        "token", choices=RATIO_LEVELS,
        help="'token': ratio pi_theta / pi_old per token (GRPO, DAPO). 'sequence': GSPO's length-"
             "normalised sequence ratio exp(mean_t log ratio) shared by every token of a sequence "
             "(arXiv 2507.18071; use much smaller clips, e.g. 3e-4 / 4e-4).")
    clip_low: float = param(0.2, help="epsilon_low: the ratio is clipped below at 1 - clip_low.")
    clip_high: float = param(
        0.2, help="epsilon_high: the ratio is clipped above at 1 + clip_high. DAPO's clip-higher uses "
                  "0.28 (arXiv 2503.14476); equal to clip_low for symmetric PPO clipping.")
    aggregation: str = param(
        "seq_mean_token_mean", choices=AGGREGATIONS,
        help="How per-token losses become one number: 'seq_mean_token_mean' (mean over a sequence's "
             "tokens, then over sequences: the paper's), 'token_mean' (mean over every valid token of "
             "the batch: DAPO), 'seq_mean_token_sum_norm' (sum over a sequence's tokens divided by the "
             "constant max_length_normalizer, then mean over sequences: Dr.GRPO).")
    max_length_normalizer: int | None = param(
        None, help="Constant divisor of 'seq_mean_token_sum_norm', normally the maximum completion "
                   "length of the rollout. Required with that aggregation, unused otherwise.")
    log_ratio_clamp: float = param(
        20.0, help="Log-ratios are clamped to [-c, c] before exp() so that extreme log-probs give "
                   "finite losses; beyond it the ratio is clipped anyway. Must be > 0.")
    kl: KLConfig = param(default_factory=KLConfig, help="KL penalty to the reference policy.")
    truncated_is: TruncatedISConfig = param(
        default_factory=TruncatedISConfig, help="Truncated importance weighting for rollout/trainer "
                                                "log-prob mismatch.")


@dataclass
class DraftSelectionConfig:
    """Which Stage-1 draft conditions Stage 2 (``algorithms.select_drafts``)."""

    rule: str = param(
        "best", choices=SELECTION_RULES,
        help="'best': highest reward (the paper's). 'worst': lowest reward (a later study found the "
             "worst well-formatted draft can help more). 'random': uniform among drafts. "
             "'best_incorrect': highest reward among incorrect drafts (falls back to 'best' when all "
             "are correct).")
    tie_break: str = param(
        "first", choices=TIE_BREAKS,
        help="Among drafts equal under the rule: 'first' takes the lowest draft index, 'shortest' the "
             "fewest tokens (then lowest index), 'random' a seeded random one. All deterministic for "
             "a given seed.")
    all_zero_policy: str = param(
        "keep", choices=ALL_ZERO_POLICIES,
        help="When every draft of a prompt scores <= all_zero_threshold: 'keep' conditions on the "
             "selected draft anyway, 'skip' does no refinement and trains plain GRPO on the drafts, "
             "'no_draft' refines from the plain prompt without a draft.")
    all_zero_threshold: float = param(
        0.0, help="A prompt is 'all-zero' when every draft's reward is <= this value.")
    correct_threshold: float = param(
        1.0, help="A draft counts as correct when its reward is >= this value (used by 'best_incorrect' "
                  "when no correctness mask is given).")


@dataclass
class RefinementPromptConfig:
    """How the draft-conditioned prompt q' is written (``algorithms.build_refinement_prompt``)."""

    template: str = param(
        DEFAULT_REFINEMENT_TEMPLATE,
        help="Text of q' with the placeholders {problem} and {draft}, each exactly once. Filled by plain "
             "replacement, so other braces (LaTeX) are kept as they are.")
    strip_think: bool = param(
        True, help="Remove the draft's <think>...</think> reasoning and keep only what follows it. "
                   "false: the whole draft is shown.")
    think_open: str = param("<think>", help="Tag that opens a reasoning block.")
    think_close: str = param("</think>", help="Tag that closes a reasoning block.")
    truncation: str = param(
        "keep_tail", choices=DRAFT_TRUNCATIONS,
        help="Which end of an over-long draft survives: 'keep_tail' (the final answer is usually at "
             "the end) or 'keep_head'.")
    truncation_marker: str = param(
        "[...]", help="Text put where a draft was cut (counted in the budget). '' for none.")
    max_draft_tokens: int | None = param(
        None, help="Extra cap on the draft's tokens. null: only the prompt budget (max prompt length) "
                   "limits it.")


@dataclass
class IGRPOConfig:
    """The iGRPO wrapper: N drafts, draft selection, then G refinements that get the GRPO update."""

    enabled: bool = param(
        True, help="Run iGRPO (drafts then refinements). false: plain GRPO with algorithm.group_size "
                   "completions per prompt and the same loss.")
    num_drafts: int = param(4, help="N: Stage-1 drafts per prompt (no gradient; only selected).")
    num_refinements: int = param(4, help="G: completions per draft-conditioned prompt, per round; "
                                         "each round's G form one GRPO group.")
    num_rounds: int = param(
        1, help="K: refinement rounds. Round k conditions on the completion of round k-1 chosen by the "
                "selection rule (round 1 on the drafts). 1 is the paper's method.")
    train_on_rounds: str = param(
        "all", choices=TRAIN_ROUNDS,
        help="Which refinement groups get the GRPO update when num_rounds > 1: 'all' rounds or only "
             "the 'last' one. Same thing when num_rounds = 1.")
    grpo_equivalent_budget: int = param(
        8, help="Completions per prompt of the GRPO baseline this run is matched against. "
                "num_drafts + num_rounds * num_refinements must equal it (paper: 4 + 4 = 8).")
    allow_budget_mismatch: bool = param(
        False, help="Accept a budget other than grpo_equivalent_budget (logged as a warning). "
                    "false: a mismatch is a configuration error.")
    selection: DraftSelectionConfig = param(default_factory=DraftSelectionConfig,
                                            help="Draft selection rule and edge cases.")
    prompt: RefinementPromptConfig = param(default_factory=RefinementPromptConfig,
                                           help="Template and truncation of the draft-conditioned prompt.")

    def completions_per_prompt(self) -> int:
        """N + K * G: completions sampled for one prompt in one step."""
        return self.num_drafts + self.num_rounds * self.num_refinements

    def errors(self, prefix: str = "algorithm.igrpo") -> list[str]:
        """Every rule this section breaks, one message each (empty when valid)."""
        errs = choice_errors(self, prefix, recursive=False)
        for key in ("num_drafts", "num_refinements", "num_rounds", "grpo_equivalent_budget"):
            if getattr(self, key) < 1:
                errs.append(f"{prefix}.{key} = {getattr(self, key)}: must be >= 1.")
        if self.enabled and not self.allow_budget_mismatch:
            total = self.completions_per_prompt()
            if total != self.grpo_equivalent_budget:
                errs.append(
                    f"{prefix}: num_drafts + num_rounds * num_refinements = {self.num_drafts} + "
                    f"{self.num_rounds} * {self.num_refinements} = {total}, but "
                    f"{prefix}.grpo_equivalent_budget = {self.grpo_equivalent_budget}. Change the counts "
                    f"or the budget so they agree, or set {prefix}.allow_budget_mismatch: true.")
        template = self.prompt.template
        for name in ("{problem}", "{draft}"):
            if template.count(name) != 1:
                errs.append(f"{prefix}.prompt.template must contain {name} exactly once "
                            f"(found {template.count(name)}).")
        errs += choice_errors(self.selection, f"{prefix}.selection", recursive=False)
        errs += choice_errors(self.prompt, f"{prefix}.prompt", recursive=False)
        if self.prompt.max_draft_tokens is not None and self.prompt.max_draft_tokens < 0:
            errs.append(f"{prefix}.prompt.max_draft_tokens must be >= 0 or null.")
        return errs


@dataclass
class DynamicSamplingConfig:
    """DAPO's dynamic sampling (arXiv 2503.14476): train only on groups that carry a learning signal."""

    enabled: bool = param(
        False, help="Drop every trained group whose rewards are all equal (zero advantage: nothing to learn) "
                    "and roll out more prompts (trainer.prompts_per_step more per extra round) until "
                    "trainer.prompts_per_step prompts have a group left; surplus prompts of the last round are "
                    "not trained on. Under iGRPO the refinement groups are the trained ones: a prompt whose "
                    "refinement group is all-equal is dropped and the refill runs the whole two-stage rollout "
                    "on new prompts. The test is on the reward that becomes the advantage (after "
                    "algorithm.overlong_penalty): with a 0/1 reward and no penalty it is DAPO's all-right/"
                    "all-wrong filter; with the penalty, right answers of different penalties still differ "
                    "(a nonzero advantage) and are kept. false: every group is trained on.")
    max_extra_rounds: int = param(
        4, help="Most extra rollout rounds per step (0: filter only, never refill). When they are spent the "
                "step trains on the groups it has (a warning and dynamic_sampling/short_batch = 1), and a step "
                "with none left takes no update, like any all-uniform step. DAPO's paper sets no bound.")

    def errors(self, prefix: str = "algorithm.dynamic_sampling") -> list[str]:
        if self.max_extra_rounds < 0:
            return [f"{prefix}.max_extra_rounds = {self.max_extra_rounds}: must be >= 0 (0: drop uniform groups "
                    "without sampling more prompts)."]
        return []


@dataclass
class OverlongPenaltyConfig:
    """DAPO's soft overlong punishment (arXiv 2503.14476): a length penalty added to every reward.

    With L_max = rollout.sampling.max_tokens and L_cache = overlong_buffer, a completion of |y| tokens
    gets ``penalty_factor`` times 0 (|y| <= L_max - L_cache), (L_max - L_cache - |y|) / L_cache (inside
    the buffer) or -1 (beyond L_max).
    """

    enabled: bool = param(
        False, help="Add the soft overlong penalty to the reward of every sampled completion, drafts included, "
                    "before anything reads it: the advantages (as in DAPO), dynamic sampling, and iGRPO's draft "
                    "selection (the paper selects drafts with the training reward, so a draft that ran into the "
                    "limit loses to an equally good shorter one). Logged as overlong/penalty_mean and "
                    "overlong/penalised_fraction. false: rewards as scored.")
    overlong_buffer: int | None = param(
        None, help="L_cache: the last tokens before rollout.sampling.max_tokens over which the penalty grows "
                   "linearly from 0 to -penalty_factor. Must be between 1 and max_tokens. null: a fifth of "
                   "max_tokens (DAPO: 4,096 of 20,480).")
    penalty_factor: float = param(
        1.0, help="Scale of the penalty: -penalty_factor at max_tokens. DAPO: 1.0. Must be >= 0.")

    def buffer_tokens(self, max_tokens: int) -> int:
        """L_cache for a rollout of at most ``max_tokens`` completion tokens."""
        return self.overlong_buffer if self.overlong_buffer is not None else max(max_tokens // 5, 1)

    def errors(self, max_tokens: int, prefix: str = "algorithm.overlong_penalty") -> list[str]:
        """Rules of this section against the rollout's ``max_tokens`` (``rollout.sampling.max_tokens``)."""
        errs = []
        if self.penalty_factor < 0:
            errs.append(f"{prefix}.penalty_factor = {self.penalty_factor}: must be >= 0 (it scales a penalty).")
        if self.overlong_buffer is not None and not 1 <= self.overlong_buffer <= max_tokens:
            errs.append(f"{prefix}.overlong_buffer = {self.overlong_buffer}: must be between 1 and "
                        f"rollout.sampling.max_tokens = {max_tokens} (the penalty grows over the last "
                        "overlong_buffer tokens); lower it, or null for a fifth of max_tokens.")
        return errs


@dataclass
class AlgorithmConfig:
    """Recipe section ``algorithm``: everything that turns rewards into a loss."""

    variant: str | None = param(
        None, choices=(None, *LOSS_VARIANTS),
        help="Named loss family member: 'grpo', 'dr_grpo' (no std scaling, sum / max completion length), "
             "'dapo' (clip-higher 0.28, token mean, dynamic sampling and overlong penalty on) or 'gspo' "
             "(sequence ratio, clips 3e-4 / 4e-4); all but 'dapo' turn dynamic_sampling and overlong_penalty "
             "off. The loader writes its advantage.*, loss.*, dynamic_sampling.enabled and "
             "overlong_penalty.enabled (DAPO: and penalty_factor 1.0) fields (LOSS_VARIANTS); a field set in the same recipe file, a file "
             "that inherits it, or on the command line wins (fields set only in files it inherits from do "
             "not). Independent of igrpo.enabled. null: the fields as written.")
    group_size: int = param(
        8, help="Completions per prompt for plain GRPO (igrpo.enabled: false); the GRPO baseline's G. "
                "Ignored when iGRPO is on (it uses igrpo.num_drafts / num_refinements).")
    advantage: AdvantageConfig = param(default_factory=AdvantageConfig, help="Group advantages.")
    loss: PolicyLossConfig = param(default_factory=PolicyLossConfig, help="Policy loss.")
    igrpo: IGRPOConfig = param(default_factory=IGRPOConfig, help="iGRPO wrapper.")
    dynamic_sampling: DynamicSamplingConfig = param(default_factory=DynamicSamplingConfig,
                                                    help="DAPO's dynamic sampling (drop uniform groups, refill).")
    overlong_penalty: OverlongPenaltyConfig = param(default_factory=OverlongPenaltyConfig,
                                                    help="DAPO's soft overlong reward shaping.")

    def errors(self, prefix: str = "algorithm") -> list[str]:
        """Every rule the section breaks, one message each (empty when valid)."""
        errs: list[str] = []
        if self.group_size < 1:
            errs.append(f"{prefix}.group_size = {self.group_size}: must be >= 1.")
        if self.advantage.leave_one_out:
            sizes = [self.igrpo.num_refinements] if self.igrpo.enabled else [self.group_size]
            if min(sizes) < 2:
                errs.append(f"{prefix}.advantage.leave_one_out needs groups of >= 2 completions; raise "
                            f"the group size or set leave_one_out: false.")
        if self.advantage.eps < 0:
            errs.append(f"{prefix}.advantage.eps must be >= 0.")
        errs += _loss_errors(self.loss, f"{prefix}.loss")
        errs += self.igrpo.errors(f"{prefix}.igrpo")
        errs += self.dynamic_sampling.errors(f"{prefix}.dynamic_sampling")
        return errs


def _loss_errors(cfg: PolicyLossConfig, prefix: str) -> list[str]:
    errs = choice_errors(cfg, prefix, recursive=False) + choice_errors(cfg.kl, f"{prefix}.kl", recursive=False)
    for key in ("clip_low", "clip_high"):
        if getattr(cfg, key) < 0:
            errs.append(f"{prefix}.{key} must be >= 0 (it is an epsilon around ratio 1).")
    if cfg.clip_low >= 1:
        errs.append(f"{prefix}.clip_low must be < 1 (the lower clip bound is 1 - clip_low).")
    if cfg.aggregation == "seq_mean_token_sum_norm" and (cfg.max_length_normalizer or 0) < 1:
        errs.append(f"{prefix}.max_length_normalizer must be a positive integer with aggregation "
                    f"'seq_mean_token_sum_norm' (use the rollout's maximum completion length).")
    if cfg.log_ratio_clamp <= 0:
        errs.append(f"{prefix}.log_ratio_clamp must be > 0.")
    if cfg.kl.coef < 0:
        errs.append(f"{prefix}.kl.coef must be >= 0 (0 turns the KL penalty off).")
    if cfg.truncated_is.cap <= 0:
        errs.append(f"{prefix}.truncated_is.cap must be > 0.")
    return errs

