"""Advantages, GRPO-family losses, iGRPO draft selection and prompts, TP log-probs. Pure PyTorch.

Nothing here imports Megatron or vLLM: the trainer and the rollout layer call these functions.
"""

from igrpo_megatron.algorithms.advantages import AdvantageMetrics, group_advantages, uniform_groups
from igrpo_megatron.algorithms.aggregation import loss_normalizers, register_aggregation
from igrpo_megatron.algorithms.draft_selection import DraftSelection, select_drafts
from igrpo_megatron.algorithms.igrpo import (
    IGRPOStepMetrics,
    RoundMetrics,
    igrpo_step_metrics,
    round_metrics,
    select_with_config,
)
from igrpo_megatron.algorithms.kl import register_kl_estimator
from igrpo_megatron.algorithms.logprobs import (
    vocab_parallel_entropy,
    vocab_parallel_logprobs,
    vocab_parallel_logprobs_and_entropy,
)
from igrpo_megatron.algorithms.losses import PolicyLossMetrics, needs_reference, policy_loss
from igrpo_megatron.algorithms.refinement_prompt import (
    RefinementPrompt,
    build_refinement_prompt,
    fill_template,
    strip_think,
)
from igrpo_megatron.algorithms.variants import LOSS_VARIANTS, with_variant

__all__ = [
    "LOSS_VARIANTS", "AdvantageMetrics", "DraftSelection", "IGRPOStepMetrics", "PolicyLossMetrics",
    "RefinementPrompt", "RoundMetrics", "build_refinement_prompt", "fill_template", "group_advantages",
    "igrpo_step_metrics", "loss_normalizers", "needs_reference", "policy_loss", "register_aggregation",
    "register_kl_estimator", "round_metrics", "select_drafts", "select_with_config", "strip_think",
    "uniform_groups", "vocab_parallel_entropy", "vocab_parallel_logprobs", "vocab_parallel_logprobs_and_entropy",
    "with_variant",
]
