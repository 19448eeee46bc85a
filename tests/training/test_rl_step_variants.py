"""The trainer's RL step with a KL reference, and with two optimizer steps per rollout batch.

Both go through ``RLTrainer._train_on``, the method the loop calls on every step (reference
log-probs when ``algorithm.loss.kl.coef > 0``, old log-probs and mini-batches when
``trainer.optimizer_steps_per_rollout > 1``), on the tiny Qwen2 checkpoint and fixed batch of
``test_rl_step_layouts``. Ranks: 1 (reference), then 2 (TP=2), which must give the same step.
Each run takes two RL steps on the batch, so the policy has moved away from its reference.
"""

import pytest
import torch

from tests.helpers.distributed import run_on_ranks
from tests.helpers.tiny_models import build_tiny_qwen2
from tests.training.test_rl_step_layouts import VOCAB, fixed_batch, recipe

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(900)]

KL_COEF = 0.5
VARIANTS = {
    "kl": {"kl_coef": KL_COEF, "steps": 1},
    "two_optimizer_steps": {"kl_coef": 0.0, "steps": 2},
}


def _two_rl_steps(rank, world_size, hf_path, parallel, kl_coef, steps):
    from igrpo_megatron.runtime.cpu_mode import enable_cpu_mode
    from igrpo_megatron.runtime.parallel import destroy_distributed, init_distributed
    from igrpo_megatron.training.loop import RLTrainer
    from igrpo_megatron.training.policy import MegatronPolicy

    enable_cpu_mode()
    r = recipe(hf_path, **parallel)
    r.algorithm.loss.kl.coef = kl_coef
    r.trainer.optimizer_steps_per_rollout = steps
    init_distributed(r.parallel, seed=1)
    trainer = RLTrainer(r)  # no setup(): only the policy is needed to train on a given batch
    trainer.policy = MegatronPolicy(r, total_optimizer_steps=10)
    trainer.policy.setup()
    initial = fixed_batch()
    trainer.policy.compute_logprobs(initial)
    metrics = [trainer._train_on(fixed_batch()) for _ in range(2)]
    after = fixed_batch()
    if trainer.policy.reference is not None:
        trainer.policy.compute_logprobs(after, reference=True)
    out = {"metrics": metrics, "weights": dict(trainer.policy.export_hf_weights()),
           "initial_logprobs": initial.old_logprobs, "reference_logprobs": after.ref_logprobs,
           "scheduler_steps": trainer.policy.scheduler.num_steps}
    destroy_distributed()
    return out


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    return str(build_tiny_qwen2(tmp_path_factory.mktemp("hf") / "qwen2", vocab_size=VOCAB, hidden=128, heads=2,
                                kv_heads=1, layers=2, intermediate=256, init_std=0.1, seed=5))


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request):
    return request.param


@pytest.fixture(scope="module")
def one_rank(qwen2_dir, variant):
    return run_on_ranks(_two_rl_steps, 1, args=(qwen2_dir, {}, *VARIANTS[variant].values()))[0]


def test_one_rank(one_rank, variant):
    first, second = one_rank["metrics"]
    if variant == "kl":
        # The reference is the initial policy: no KL before the first update, some after it.
        assert first["kl_mean"] == pytest.approx(0.0, abs=1e-6)
        assert second["kl_mean"] > 1e-6 and second["kl_loss"] > 0
        # ...and it stays the initial policy: its log-probs are the ones the untrained model gave.
        for ref, init in zip(one_rank["reference_logprobs"], one_rank["initial_logprobs"], strict=True):
            torch.testing.assert_close(ref, init, rtol=0, atol=1e-6)
        assert one_rank["scheduler_steps"] == 2
    else:
        assert "kl_mean" not in first or first["kl_loss"] == 0
        assert one_rank["reference_logprobs"] is None  # coef 0: no reference model
        # Two mini-batches per rollout batch: four optimizer steps in two RL steps, and the last
        # mini-batch of a step sees a policy that the first one already moved (ratio != 1).
        assert one_rank["scheduler_steps"] == 4
        assert abs(second["ratio_mean"] - 1.0) > 1e-5


def test_tp2_gives_the_same_step(one_rank, qwen2_dir, variant):
    tp2 = run_on_ranks(_two_rl_steps, 2, args=(qwen2_dir, dict(tensor_model_parallel_size=2,
                                                              use_distributed_optimizer=False),
                                               *VARIANTS[variant].values()))[0]
    for ref, got in zip(one_rank["metrics"], tp2["metrics"], strict=True):
        for key in ("loss", "pg_loss", "kl_loss", "kl_mean", "grad_norm", "ratio_mean"):
            if key in ref:
                assert got[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-9), key
    # Whole-tensor differences, as in test_rl_step_layouts. The key bias has an exactly-zero true
    # gradient (see recipe() there), so each Adam step moves it by rounding noise that differs with
    # the reduction order; over four steps (two_optimizer_steps) that noise reaches ~2e-5 of its norm.
    for name, tensor in one_rank["weights"].items():
        rel = ((tp2["weights"][name] - tensor).norm() / tensor.norm()).item()
        assert rel < (1e-4 if name.endswith("k_proj.bias") else 1e-5), f"{name}: relative difference {rel:.2e}"
