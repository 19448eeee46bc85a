"""Named members of the GRPO family as settings of ``recipe.algorithm``.

A variant is data, not code: the fields it changes. iGRPO is orthogonal to all of them (it changes
what is sampled and for which prompt), so ``with_variant(cfg, "dapo")`` keeps ``cfg.igrpo``.
DAPO's dynamic sampling and overlong reward shaping live in the rollout and reward layers.
"""

from __future__ import annotations

import copy
from typing import Any

from igrpo_megatron.config.algorithm import AlgorithmConfig

# section -> field -> value. Sources: GRPO arXiv 2402.03300, Dr.GRPO 2503.20783, DAPO 2503.14476,
# GSPO 2507.18071.
LOSS_VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    "grpo": {
        "advantage": {"normalize_by_std": True},
        "loss": {"ratio_level": "token", "clip_low": 0.2, "clip_high": 0.2,
                 "aggregation": "seq_mean_token_mean"},
    },
    "dr_grpo": {
        "advantage": {"normalize_by_std": False},
        "loss": {"ratio_level": "token", "clip_low": 0.2, "clip_high": 0.2,
                 "aggregation": "seq_mean_token_sum_norm"},
    },
    "dapo": {
        "advantage": {"normalize_by_std": True},
        "loss": {"ratio_level": "token", "clip_low": 0.2, "clip_high": 0.28, "aggregation": "token_mean"},
    },
    "gspo": {
        "advantage": {"normalize_by_std": True},
        "loss": {"ratio_level": "sequence", "clip_low": 3e-4, "clip_high": 4e-4,
                 "aggregation": "seq_mean_token_mean"},
    },
}


def with_variant(cfg: AlgorithmConfig, name: str, *, max_length: int | None = None) -> AlgorithmConfig:
    """A copy of ``cfg`` with variant ``name``'s fields set.

    ``max_length`` fills ``loss.max_length_normalizer`` (needed by Dr.GRPO; kept when None).
    """
    if name not in LOSS_VARIANTS:
        raise ValueError(f"unknown loss variant {name!r}; known: {sorted(LOSS_VARIANTS)}.")
    out = copy.deepcopy(cfg)
    for section, values in LOSS_VARIANTS[name].items():
        for key, value in values.items():
            setattr(getattr(out, section), key, value)
    if max_length is not None:
        out.loss.max_length_normalizer = max_length
    return out
