"""The ``mechanism/*`` metrics of one step's two-stage rollouts: refinement against the draft it was
shown, the answer copy rate, and plain-prompt accuracy (what each means: ``algorithms.mechanism``).
"""

from __future__ import annotations

from igrpo_megatron.algorithms.mechanism import RefinementPair, mechanism_metrics
from igrpo_megatron.config.reward import AnswerExtractionConfig
from igrpo_megatron.rewards.extraction import extract_answer
from igrpo_megatron.rollout.two_stage import RolloutBatch


def rollout_mechanism_metrics(rollout: RolloutBatch, extraction: AnswerExtractionConfig) -> dict[str, float]:
    """``mechanism/*`` metrics of one step's rollouts (see :mod:`igrpo_megatron.algorithms.mechanism`).

    Plain-prompt samples are the drafts (iGRPO) or the GRPO samples; a pair is every refinement whose
    prompt showed a draft (``draft_source`` set; every round), with the sample it was shown. Final
    answers are extracted with ``reward.extraction``, as the reward does.
    """
    plain = [s for s in rollout.samples if s.stage in ("draft", "grpo")]
    pairs = []
    for s in rollout.samples:
        if s.stage != "refine" or s.draft_source is None:
            continue
        d = rollout.samples[s.draft_source]
        pairs.append(RefinementPair(draft_reward=d.reward, draft_correct=d.correct,
                                    draft_answer=extract_answer(d.text, extraction),
                                    refine_reward=s.reward, refine_answer=extract_answer(s.text, extraction)))
    return mechanism_metrics([s.reward for s in plain], [s.correct for s in plain], pairs).as_dict()
