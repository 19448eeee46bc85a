"""Named members of the GRPO family as settings of ``recipe.algorithm``.

A variant is data, not code: the fields it changes (:data:`LOSS_VARIANTS`, kept in
``config/algorithm.py`` so that the recipe loader applies ``algorithm.variant`` from the same
table). iGRPO is orthogonal to all of them (it changes what is sampled and for which prompt), so
``with_variant(cfg, "dapo")`` keeps ``cfg.igrpo``. DAPO's dynamic sampling and overlong reward
shaping are switched on here (``dynamic_sampling.enabled``, ``overlong_penalty.enabled``); their
functions are ``algorithms.dynamic_sampling`` and ``algorithms.overlong``, which the rollout applies.
"""

from __future__ import annotations

import copy

from igrpo_megatron.config.algorithm import LOSS_VARIANTS, AlgorithmConfig, variant_fields

__all__ = ["LOSS_VARIANTS", "with_variant"]


def with_variant(cfg: AlgorithmConfig, name: str, *, max_length: int | None = None) -> AlgorithmConfig:
    """A copy of ``cfg`` with variant ``name``'s fields set (and ``cfg.variant = name``).

    ``max_length`` fills ``loss.max_length_normalizer`` (needed by Dr.GRPO; kept when None).
    """
    out = copy.deepcopy(cfg)
    for dotted, value in variant_fields(name).items():
        section, key = dotted.split(".")
        setattr(getattr(out, section), key, value)
    if max_length is not None:
        out.loss.max_length_normalizer = max_length
    out.variant = name
    return out
