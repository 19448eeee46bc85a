"""One RL step on a fixed batch gives the same loss and updated weights at every layout.

Ranks: 1 (reference), then 2 each for TP=2, PP=2 and DP=2 (distributed optimizer). The weights
start from one HF checkpoint (imported at each layout); the batch mixes lengths so micro-batches
differ between layouts (token budget 96 over the rank's share of the batch).

Both architectures: the Qwen2-style GPT and the Nemotron-H hybrid (pattern ``M*M-``: Mamba2,
attention, Mamba2, MLP; PP=2 splits it into ``M*`` and ``M-``; TP=2 splits the Mamba heads and
groups, and the export merges ``in_proj`` / ``conv1d`` per component).

The memory features of 7-8B training run at TP=2 against the same single-rank reference, log-probs
included: selective and full activation recomputation, and sequence parallelism (whose micro-batches
are padded to a multiple of TP; the batch's sequence lengths are mostly odd, so padding happens).
"""

import random

import pytest
import torch

from igrpo_megatron.config.schema import RecipeConfig
from tests.helpers.distributed import run_on_ranks
from tests.helpers.tiny_models import build_tiny_nemotron_h, build_tiny_qwen2

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(900)]

VOCAB = 128
ARCHITECTURES = ["qwen2", "nemotron_h"]
HYBRID_PATTERN = "M*M-"
MAMBA = dict(mamba_head_dim=32, mamba_groups=2, state_dim=16)  # 8 Mamba heads of 32 in 2 groups


def recipe(hf_path: str, arch: str = "qwen2", **parallel) -> RecipeConfig:
    """The tiny recipe; ``parallel`` sets parallel.* keys, and model.* keys when prefixed ``model.``."""
    r = RecipeConfig()
    m = r.model
    m.num_layers, m.hidden_size, m.ffn_hidden_size = 2, 128, 256
    m.num_attention_heads, m.num_query_groups, m.vocab_size = 2, 1, VOCAB
    m.max_position_embeddings, m.hf_path, m.transformer_impl = 1024, hf_path, "local"
    if arch == "nemotron_h":  # the sizes build_tiny_nemotron_h writes
        m.architecture, m.hybrid_pattern, m.num_layers = arch, HYBRID_PATTERN, len(HYBRID_PATTERN)
        m.mamba_head_dim, m.mamba_num_groups, m.mamba_state_dim = (MAMBA["mamba_head_dim"], MAMBA["mamba_groups"],
                                                                   MAMBA["state_dim"])
        m.norm_epsilon, m.add_qkv_bias = 1e-5, False
    for key, value in parallel.items():
        section, _, name = key.rpartition(".")
        setattr(r.model if section == "model" else r.parallel, name, value)
    r.optimizer.lr, r.optimizer.warmup_fraction, r.optimizer.weight_decay = 1e-3, 0.0, 0.0
    # The key bias has an exactly-zero true gradient (softmax ignores a per-query constant), so its
    # computed gradient is rounding noise of ~1e-10 that Adam's g / (|g| + eps) turns into +-lr with
    # eps = 1e-8. eps = 1e-5 keeps noise from being amplified and leaves real updates (|g| ~ 1e-3) alone.
    r.optimizer.adam_eps = 1e-5
    r.trainer.micro_batch_tokens = 96
    r.rollout.sampling.temperature = 0.7
    r.algorithm.loss.kl.coef = 0.0
    return r


def fixed_batch():
    from igrpo_megatron.training.batch import Sequence, TrainBatch

    rng = random.Random(0)
    seqs = []
    for i in range(8):
        prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(3, 9))]
        completion = [rng.randrange(VOCAB) for _ in range(rng.randint(0 if i == 5 else 2, 14))]
        seqs.append(Sequence(prompt, completion, advantage=rng.uniform(-1.5, 1.5), group=i // 4,
                             rollout_logprobs=[-rng.uniform(3, 6) for _ in completion]))
    return TrainBatch(seqs)


def _one_step(rank, world_size, hf_path, arch, parallel):
    from igrpo_megatron.runtime.cpu_mode import enable_cpu_mode
    from igrpo_megatron.runtime.parallel import destroy_distributed, init_distributed
    from igrpo_megatron.training.policy import MegatronPolicy

    enable_cpu_mode()
    r = recipe(hf_path, arch, **parallel)
    init_distributed(r.parallel, seed=1)
    policy = MegatronPolicy(r, total_optimizer_steps=10)
    policy.setup()
    scored = fixed_batch()  # old-policy log-probs on a copy: the step itself is as training runs it
    policy.compute_logprobs(scored)
    widths = [mb.tokens.shape[1] for mb in policy._micro_batches(scored)]
    metrics = policy.train_step(fixed_batch())
    weights = dict(policy.export_hf_weights())
    destroy_distributed()
    return metrics, weights, scored.old_logprobs, widths


@pytest.fixture(scope="module", params=ARCHITECTURES)
def arch(request):
    return request.param


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, arch):
    out = tmp_path_factory.mktemp("hf") / arch
    if arch == "nemotron_h":
        return str(build_tiny_nemotron_h(out, vocab_size=VOCAB, hidden=128, heads=2, kv_heads=1,
                                         pattern=HYBRID_PATTERN, intermediate=256, init_std=0.1, seed=5, **MAMBA))
    return str(build_tiny_qwen2(out, vocab_size=VOCAB, hidden=128, heads=2, kv_heads=1, layers=2,
                                intermediate=256, init_std=0.1, seed=5))


@pytest.fixture(scope="module")
def reference(hf_dir, arch):
    return run_on_ranks(_one_step, 1, args=(hf_dir, arch, {}))[0]


def test_reference_step_moves_the_weights(reference, hf_dir):
    from tests.helpers.tiny_models import load_state_dict

    metrics, weights, _, _ = reference
    assert torch.isfinite(torch.tensor(metrics["loss"]))
    assert metrics["grad_norm"] > 0
    assert 0 < metrics["entropy"] < torch.log(torch.tensor(float(VOCAB))).item() + 1e-3
    before = load_state_dict(hf_dir)
    moved = [n for n in before if not torch.equal(before[n], weights[n])]
    assert len(moved) == len(before)  # Adam moves every tensor on the first step


@pytest.mark.parametrize("world_size, layout", [
    (2, dict(tensor_model_parallel_size=2, use_distributed_optimizer=False)),
    (2, dict(pipeline_model_parallel_size=2, use_distributed_optimizer=False)),
    (2, dict(use_distributed_optimizer=True)),
], ids=["tp2", "pp2", "dp2"])
def test_layout_gives_the_same_step(reference, hf_dir, arch, world_size, layout):
    metrics, weights, _, _ = run_on_ranks(_one_step, world_size, args=(hf_dir, arch, layout))[0]
    _assert_same_step(reference, metrics, weights)


def _assert_same_step(reference, metrics, weights):
    ref_metrics, ref_weights, _, _ = reference
    for key in ("loss", "grad_norm", "entropy", "ratio_mean"):
        assert metrics[key] == pytest.approx(ref_metrics[key], rel=1e-5), key
    # Weights are compared as whole tensors, ||w - w_ref|| / ||w_ref||: Adam's first step is
    # lr * g / (|g| + eps) per element, so an element whose gradient is ~eps may move by a
    # different fraction of lr when the reduction order changes; the tensor as a whole may not.
    for name, tensor in ref_weights.items():
        rel = ((weights[name] - tensor).norm() / tensor.norm()).item()
        assert rel < 1e-5, f"{name}: relative difference {rel:.2e}"


TP2 = dict(tensor_model_parallel_size=2, use_distributed_optimizer=False)
MEMORY_LAYOUTS = {
    "tp2-selective": {**TP2, "model.recompute_granularity": "selective",
                      "model.recompute_modules": ["core_attn", "mlp"]},  # layernorm: TE only
    "tp2-full": {**TP2, "model.recompute_granularity": "full", "model.recompute_method": "uniform",
                 "model.recompute_num_layers": 1},
    "tp2-sp": {**TP2, "sequence_parallel": True},
    "tp2-sp-full-block": {**TP2, "sequence_parallel": True, "model.recompute_granularity": "full",
                          "model.recompute_method": "block", "model.recompute_num_layers": 1},
}


@pytest.mark.parametrize("name", list(MEMORY_LAYOUTS))
def test_recompute_and_sequence_parallel_give_the_same_step(reference, hf_dir, arch, name):
    """1 rank vs 2 ranks (TP=2) with the layout's memory features: same step, same log-probs."""
    layout = MEMORY_LAYOUTS[name]
    full = layout.get("model.recompute_granularity") == "full"
    if arch == "nemotron_h" and full and not run_on_ranks(_hybrid_stack_recomputes, 1)[0]:
        # megatron-core 0.16's MambaStack ignores full recompute: the builder must refuse, naming the key.
        with pytest.raises(RuntimeError, match="model.recompute_granularity=full"):
            run_on_ranks(_one_step, 2, args=(hf_dir, arch, layout))
        return
    metrics, weights, logprobs, widths = run_on_ranks(_one_step, 2, args=(hf_dir, arch, layout))[0]
    _assert_same_step(reference, metrics, weights)
    ref_logprobs = reference[2]
    assert len(logprobs) == len(ref_logprobs) == 8
    for mine, ref in zip(logprobs, ref_logprobs, strict=True):
        assert mine.shape == ref.shape
        torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-5)
    if layout.get("sequence_parallel"):
        # Widths are the longest sequence - 1 of each micro-batch; the reference's include odd ones,
        # which sequence parallelism must round up to a multiple of TP (2): padding really happened.
        assert any(w % 2 for w in reference[3])
        assert all(w % 2 == 0 for w in widths), widths


def _hybrid_stack_recomputes(rank, world_size) -> bool:
    """Whether this megatron-core's hybrid stack does full recompute (asked in a fresh process: the
    stack classes import Megatron's mixer, which needs the CPU kernels installed first)."""
    from igrpo_megatron.models import compat
    from igrpo_megatron.models.hybrid import _ensure_mamba_kernels

    _ensure_mamba_kernels()
    return compat.stack_recomputes_layers(compat.hybrid_api().stack_cls)


def _direction(rank, world_size, hf_path, arch):
    """Three RL steps on a group where one completion has a positive and one a negative advantage."""
    from igrpo_megatron.runtime.cpu_mode import enable_cpu_mode
    from igrpo_megatron.runtime.parallel import destroy_distributed, init_distributed
    from igrpo_megatron.training.batch import Sequence, TrainBatch
    from igrpo_megatron.training.policy import MegatronPolicy

    enable_cpu_mode()
    r = recipe(hf_path, arch)
    init_distributed(r.parallel, seed=1)
    policy = MegatronPolicy(r, total_optimizer_steps=3)
    policy.setup()
    good = Sequence([1, 2, 3], [10, 11, 12], advantage=1.0)
    bad = Sequence([1, 2, 3], [20, 21, 22], advantage=-1.0)

    def logps() -> list[float]:
        batch = TrainBatch([good, bad])
        policy.compute_logprobs(batch)
        return [float(t.sum()) for t in batch.old_logprobs]

    before = logps()
    for _ in range(3):
        policy.train_step(TrainBatch([good, bad]))
    after = logps()
    destroy_distributed()
    return before, after


def test_rl_steps_move_probability_towards_positive_advantage(hf_dir, arch):
    (good0, bad0), (good1, bad1) = run_on_ranks(_direction, 1, args=(hf_dir, arch))[0]
    assert good1 > good0 + 0.1  # the rewarded completion became more likely
    assert bad1 < bad0 - 0.1    # the penalised one less likely
