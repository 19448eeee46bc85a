"""The GRPO-family policy loss: clipped surrogate, optional KL and truncated importance weighting.

One function, :func:`policy_loss`, covers GRPO, Dr.GRPO, DAPO and GSPO; the variant is chosen by
settings (see ``variants.py``), and the parts that differ (ratio level, aggregation, KL estimator)
are small registered functions, not branches of this function.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

from igrpo_megatron.algorithms.aggregation import get_aggregation, loss_normalizers
from igrpo_megatron.algorithms.kl import kl_penalty
from igrpo_megatron.config.algorithm import PolicyLossConfig

logger = logging.getLogger(__name__)

LogRatioFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (delta [B,T], mask [B,T]) -> [B,T]

_RATIO_LEVELS: dict[str, LogRatioFn] = {}


def register_ratio_level(name: str) -> Callable[[LogRatioFn], LogRatioFn]:
    """Decorator: make a log-ratio rule selectable as ``algorithm.loss.ratio_level: name``."""

    def deco(fn: LogRatioFn) -> LogRatioFn:
        _RATIO_LEVELS[name] = fn
        return fn

    return deco


def ratio_level_names() -> tuple[str, ...]:
    return tuple(_RATIO_LEVELS)


@register_ratio_level("token")
def token_log_ratio(delta: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log r_t = log pi_theta(y_t) - log pi_old(y_t), per token (GRPO, DAPO)."""
    return delta


@register_ratio_level("sequence")
def sequence_log_ratio(delta: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GSPO: log s_i = (1/|y_i|) sum_t (log pi_theta - log pi_old), the same for every token of y_i.

    The gradient flows through s_i, so each token gets s_i * A_i / |y_i| * grad log pi (GSPO eq. 10).
    """
    lengths = mask.sum(dim=-1, keepdim=True).clamp_min(1)  # [B, 1]
    seq = delta.sum(dim=-1, keepdim=True) / lengths  # [B, 1]; delta is already 0 on padding
    return seq.expand_as(delta)


@dataclass
class PolicyLossMetrics:
    """Detached scalars of one ``policy_loss`` call; means are over this batch's valid tokens.

    Optional entries are None when their input was not given (no reference, no rollout log-probs).
    ``num_tokens``/``num_seqs`` are the local counts, for weighting means across micro-batches.
    """

    loss: torch.Tensor
    pg_loss: torch.Tensor
    kl_loss: torch.Tensor  # aggregated KL term before multiplying by the coefficient
    ratio_mean: torch.Tensor
    clip_frac_low: torch.Tensor  # tokens with A < 0 and ratio < 1 - clip_low (gradient cut)
    clip_frac_high: torch.Tensor  # tokens with A > 0 and ratio > 1 + clip_high (gradient cut)
    num_tokens: torch.Tensor
    num_seqs: torch.Tensor
    kl_mean: torch.Tensor | None = None  # mean per-token KL(pi_theta || pi_ref)
    logprob_mismatch: torch.Tensor | None = None  # mean |log pi_old_trainer - log pi_rollout|
    rollout_kl: torch.Tensor | None = None  # mean k3 estimate of KL(pi_rollout || pi_old_trainer)
    tis_weight_mean: torch.Tensor | None = None
    tis_clip_frac: torch.Tensor | None = None  # tokens whose weight hit the cap

    def as_dict(self) -> dict[str, float]:
        """Floats for the metrics logger (this is where the device sync happens); None entries dropped."""
        return {f.name: float(v) for f in fields(self) if (v := getattr(self, f.name)) is not None}


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    total = torch.where(mask, x, torch.zeros_like(x)).sum()
    return (total / mask.sum().clamp_min(1)).detach()


def _as_count(value: float | int | torch.Tensor | None, local: torch.Tensor) -> torch.Tensor:
    if value is None:
        return local
    return torch.as_tensor(value, dtype=torch.float32, device=local.device)


def _check_inputs(logprobs: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor,
                  cfg: PolicyLossConfig, others: dict[str, torch.Tensor | None]) -> None:
    """Shapes, and the inputs that the settings make mandatory; errors name the recipe key."""
    if cfg.ratio_level not in _RATIO_LEVELS:
        raise ValueError(f"algorithm.loss.ratio_level = {cfg.ratio_level!r} is not registered; use one "
                         f"of {sorted(_RATIO_LEVELS)}.")
    if needs_reference(cfg) and others["ref_logprobs"] is None:
        raise ValueError(f"algorithm.loss.kl.coef = {cfg.kl.coef} needs ref_logprobs; compute the "
                         f"reference log-probs or set the coefficient to 0.")
    if cfg.truncated_is.enabled and others["rollout_logprobs"] is None:
        raise ValueError("algorithm.loss.truncated_is.enabled is true but no rollout_logprobs were "
                         "given; return log-probs from the rollout engine or disable it.")
    if logprobs.dim() != 2 or mask.shape != logprobs.shape:
        raise ValueError(f"policy_loss wants logprobs and mask of shape [B, T]; got {tuple(logprobs.shape)} "
                         f"and {tuple(mask.shape)}.")
    if advantages.shape not in ((logprobs.shape[0],), (logprobs.shape[0], 1)):
        raise ValueError(f"advantages must be [B] = [{logprobs.shape[0]}] (one per sequence); got "
                         f"{tuple(advantages.shape)}.")
    for name, t in others.items():
        if t is not None and t.shape != logprobs.shape:
            raise ValueError(f"{name} must have the shape of logprobs {tuple(logprobs.shape)}; got "
                             f"{tuple(t.shape)}.")


def needs_reference(cfg: PolicyLossConfig) -> bool:
    """Whether the trainer must compute reference log-probs (only when the KL coefficient is > 0)."""
    return cfg.kl.coef > 0


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cfg: PolicyLossConfig,
    ref_logprobs: torch.Tensor | None = None,
    rollout_logprobs: torch.Tensor | None = None,
    *,
    num_global_tokens: float | int | torch.Tensor | None = None,
    num_global_seqs: float | int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, PolicyLossMetrics]:
    """Clipped-surrogate policy loss with optional KL penalty and truncated importance weight.

    Per token t of sequence i, with advantage A_i and r = ratio (token or GSPO sequence level):

        l_it = -w_it * min(r A_i, clip(r, 1 - eps_low, 1 + eps_high) A_i) + beta * KL_it
        L    = aggregate(l, mask)         (seq_mean_token_mean | token_mean | seq_mean_token_sum_norm)

    r = exp(log pi_theta - log pi_old) (GRPO/PPO, arXiv 2402.03300); DAPO: eps_high > eps_low and
    token_mean (arXiv 2503.14476); Dr.GRPO: seq_mean_token_sum_norm and advantages without std
    (arXiv 2503.20783); GSPO: ratio_level 'sequence' (arXiv 2507.18071). KL_it estimates
    KL(pi_theta || pi_ref) with k1/k2/k3 and is skipped entirely when beta = 0. With truncated IS,
    w_it = min(pi_old / pi_rollout, C) (detached; Yao et al. 2025, "Your efficient RL framework
    secretly brings you off-policy RL training"), else w = 1. The KL term is not weighted.

    Args:
        logprobs: ``[B, T]`` log pi_theta of the sampled tokens (with grad).
        old_logprobs: ``[B, T]`` trainer log-probs under the weights that sampled the batch;
            None means fully on-policy (uses ``logprobs.detach()``, so r = 1).
        advantages: ``[B]`` one advantage per sequence (from ``group_advantages``).
        mask: ``[B, T]`` True (or 1) on completion tokens that count; rows may be all False.
            Values at masked positions are ignored, even inf/NaN, and get zero gradient.
        cfg: ``recipe.algorithm.loss``.
        ref_logprobs: ``[B, T]`` reference-policy log-probs; required only when cfg.kl.coef > 0
            (if given with coef 0, only the ``kl_mean`` metric uses it).
        rollout_logprobs: ``[B, T]`` log-probs reported by the rollout engine; required with
            truncated IS, and used for the mismatch metrics whenever given.
        num_global_tokens / num_global_seqs: normalisers summed over every micro-batch and
            data-parallel rank of the step (see ``loss_normalizers``). None: this batch's own.
            With global values the returned loss is this micro-batch's *share* of the step's loss:
            sum the losses (and gradients) over micro-batches and ranks instead of averaging.

    Returns:
        ``(loss, PolicyLossMetrics)``; loss is a float32 scalar.
    """
    _check_inputs(logprobs, mask, advantages, cfg, {"old_logprobs": old_logprobs,
                                                    "ref_logprobs": ref_logprobs,
                                                    "rollout_logprobs": rollout_logprobs})
    mask = mask.bool()
    logp = _clean(logprobs, mask)  # [B, T] float32, 0 on padding (so no NaN can reach the backward)
    old = logp.detach() if old_logprobs is None else _clean(old_logprobs, mask).detach()
    adv = advantages.float().reshape(-1, 1).detach()  # [B, 1]
    c = cfg.log_ratio_clamp
    local_tokens, local_seqs = loss_normalizers(mask)
    aggregate = get_aggregation(cfg.aggregation)
    agg_kwargs = dict(num_tokens=_as_count(num_global_tokens, local_tokens),
                      num_seqs=_as_count(num_global_seqs, local_seqs), max_length=cfg.max_length_normalizer)

    log_ratio = _RATIO_LEVELS[cfg.ratio_level](logp - old, mask).clamp(-c, c)  # [B, T]
    ratio = torch.exp(log_ratio)  # [B, T]
    clipped = ratio.clamp(1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
    pg = -torch.minimum(ratio * adv, clipped * adv)  # [B, T]

    extra: dict[str, torch.Tensor | None] = {}
    if rollout_logprobs is not None:
        weight, extra = _rollout_terms(old, _clean(rollout_logprobs, mask).detach(), mask, cfg)
        pg = pg * weight
    pg_loss = aggregate(pg, mask, **agg_kwargs)

    kl_loss = torch.zeros((), dtype=torch.float32, device=logp.device)
    if ref_logprobs is not None:
        kl = kl_penalty(logp, _clean(ref_logprobs, mask).detach(), cfg.kl.estimator, c)  # [B, T]
        extra["kl_mean"] = _masked_mean(kl, mask)
        if needs_reference(cfg):
            kl_loss = aggregate(kl, mask, **agg_kwargs)
    loss = pg_loss + cfg.kl.coef * kl_loss if needs_reference(cfg) else pg_loss

    metrics = PolicyLossMetrics(
        loss=loss.detach(), pg_loss=pg_loss.detach(), kl_loss=kl_loss.detach(),
        ratio_mean=_masked_mean(ratio, mask),
        clip_frac_low=_masked_mean(((ratio < 1.0 - cfg.clip_low) & (adv < 0)).float(), mask),
        clip_frac_high=_masked_mean(((ratio > 1.0 + cfg.clip_high) & (adv > 0)).float(), mask),
        num_tokens=local_tokens, num_seqs=local_seqs, **extra,
    )
    return loss, metrics


def _clean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """float32 copy with padding set to 0: garbage there must not reach values or gradients."""
    x = x.float()
    return torch.where(mask, x, torch.zeros_like(x))


def _rollout_terms(old: torch.Tensor, rollout: torch.Tensor, mask: torch.Tensor, cfg: PolicyLossConfig
                   ) -> tuple[torch.Tensor | float, dict[str, torch.Tensor | None]]:
    """Train/rollout mismatch metrics and the truncated IS weight (1.0 when TIS is off).

    w_t = min(pi_old_trainer(y_t) / pi_rollout(y_t), C), detached.
    """
    c = cfg.log_ratio_clamp
    gap = (old - rollout).clamp(-c, c)  # [B, T]; 0 on padding
    extra: dict[str, torch.Tensor | None] = {
        "logprob_mismatch": _masked_mean(gap.abs(), mask),
        "rollout_kl": _masked_mean(torch.expm1(gap) - gap, mask),  # k3 with samples from the rollout
    }
    if not cfg.truncated_is.enabled:
        return 1.0, extra
    raw = torch.exp(gap)  # [B, T]
    weight = raw.clamp(max=cfg.truncated_is.cap).detach()
    extra["tis_weight_mean"] = _masked_mean(weight, mask)
    extra["tis_clip_frac"] = _masked_mean((raw >= cfg.truncated_is.cap).float(), mask)
    return weight, extra
