"""Weight sync from a tensor-parallel trainer: 2 gloo ranks (TP=2) train one step on the model the
sidecar serves, then push ``MegatronPolicy.export_hf_weights()`` into the running sidecar.

The export is collective (the TP ranks all-gather every parameter), and the synchronizer consumes
the iterable in a worker thread: rank 0 streams the generator straight into ``WeightSynchronizer``
(its main thread waits in the event loop meanwhile, so only one of its threads issues
collectives), while rank 1 iterates its own, empty, export in lock-step. This is the path the
training loop takes, so nothing is materialised on rank 0 first.

After the push the sidecar's greedy tokens and log-probs must be those of transformers on the
exported tensors, not on the served checkpoint, and the policy version must have advanced.
The session's tiny model has a 512-token vocabulary, which TP=2 splits evenly.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterable, Iterator

import pytest
import torch

from igrpo_megatron.rollout.client import RolloutClient
from igrpo_megatron.rollout.interfaces import SamplingParams
from igrpo_megatron.rollout.weight_sync import SharedMemoryReloadTransport, WeightSynchronizer
from tests.helpers.distributed import run_on_ranks
from tests.helpers.tiny_models import hf_token_logprobs, load_state_dict

pytestmark = [pytest.mark.vllm, pytest.mark.multiprocess, pytest.mark.timeout(300)]

VOCAB = 512
PROMPTS = [[5, 17, 42, 99, 7], [300, 12, 9, 44]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12)


def _recipe(hf_path: str):
    from igrpo_megatron.config.schema import RecipeConfig

    r = RecipeConfig()
    m = r.model  # the session model (tests/helpers/tiny_models.build_tiny_qwen2 defaults)
    m.num_layers, m.hidden_size, m.ffn_hidden_size = 2, 128, 256
    m.num_attention_heads, m.num_query_groups, m.vocab_size = 2, 1, VOCAB
    m.max_position_embeddings, m.hf_path, m.transformer_impl = 1024, hf_path, "local"
    r.parallel.tensor_model_parallel_size = 2
    r.parallel.use_distributed_optimizer = False
    # A large step (Adam moves every element by ~lr) so old and new outputs differ clearly.
    r.optimizer.lr, r.optimizer.warmup_fraction, r.optimizer.weight_decay = 5e-3, 0.0, 0.0
    r.trainer.micro_batch_tokens = 128
    r.algorithm.loss.kl.coef = 0.0
    return r


def _batch():
    from igrpo_megatron.training.batch import Sequence, TrainBatch

    rng = random.Random(0)
    seqs = []
    for i in range(4):
        prompt = [rng.randrange(VOCAB) for _ in range(6)]
        completion = [rng.randrange(VOCAB) for _ in range(10)]
        seqs.append(Sequence(prompt, completion, advantage=(1.0 if i % 2 else -1.0), group=i // 2,
                             rollout_logprobs=[-6.0] * len(completion)))
    return TrainBatch(seqs)


def _recorded(pairs: Iterable[tuple[str, torch.Tensor]], into: dict[str, torch.Tensor]) -> Iterator:
    """Pass the pairs through, keeping a copy: what was pushed is what the test compares against."""
    for name, tensor in pairs:
        into[name] = tensor.detach().clone()
        yield name, tensor


async def _push_and_generate(url: str, pairs: Iterable[tuple[str, torch.Tensor]]) -> dict:
    async with RolloutClient(url) as client:
        sync = WeightSynchronizer(client, SharedMemoryReloadTransport(client, bucket_bytes=256 * 1024))
        version = await sync.sync(pairs)
        groups = await client.generate(PROMPTS, GREEDY)
        return dict(version=version, client_version=client.policy_version, groups=groups,
                    server_version=await sync.server_version(), in_sync=await sync.server_in_sync())


def _train_and_push(rank: int, world_size: int, hf_path: str, url: str) -> dict | None:
    import torch.distributed as dist

    from igrpo_megatron.runtime.cpu_mode import enable_cpu_mode
    from igrpo_megatron.runtime.parallel import destroy_distributed, init_distributed
    from igrpo_megatron.training.policy import MegatronPolicy

    enable_cpu_mode()
    r = _recipe(hf_path)
    init_distributed(r.parallel, seed=1)
    policy = MegatronPolicy(r, total_optimizer_steps=10)
    policy.setup()
    metrics = policy.train_step(_batch())
    result = None
    if rank == 0:
        pushed: dict[str, torch.Tensor] = {}
        result = asyncio.run(_push_and_generate(url, _recorded(policy.export_hf_weights(), pushed)))
        result.update(weights=pushed, grad_norm=metrics["grad_norm"])
    else:
        assert list(policy.export_hf_weights()) == []  # only global rank 0 receives tensors
    dist.barrier()
    destroy_distributed()
    return result


async def _push_state(url: str, state: dict[str, torch.Tensor]) -> int:
    async with RolloutClient(url) as client:
        return await WeightSynchronizer(client, SharedMemoryReloadTransport(client)).sync(state.items())


def _gap(completion, prompt: list[int], model_dir, state) -> float:
    ref = hf_token_logprobs(model_dir, prompt, completion.token_ids, state=state)
    return max(abs(a - b) for a, b in zip(completion.logprobs, ref, strict=True))


def _hf_greedy(model_dir, state, prompt: list[int], max_tokens: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    model.load_state_dict(state, strict=True)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_tokens):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_tp2_trainer_weights_reach_the_sidecar(sidecar, tiny_model_dir):
    old = load_state_dict(tiny_model_dir)
    try:
        out = run_on_ranks(_train_and_push, 2, args=(str(tiny_model_dir), sidecar.url), timeout=240)[0]
        new = out["weights"]
        assert set(new) == set(old) and out["grad_norm"] > 0
        # Every tensor moved (Adam's first step), the output layer included.
        assert all(not torch.equal(new[n], old[n]) for n in old)
        assert (out["version"], out["client_version"], out["server_version"], out["in_sync"]) == (1, 1, "1", True)
        for prompt, group in zip(PROMPTS, out["groups"], strict=True):
            c = group.completions[0]
            assert group.policy_version == 1 and c.policy_version == 1
            assert c.token_ids == _hf_greedy(tiny_model_dir, new, prompt, GREEDY.max_tokens)
            gap_new, gap_old = _gap(c, prompt, tiny_model_dir, new), _gap(c, prompt, tiny_model_dir, old)
            assert gap_new < 1e-3, f"outputs do not follow the trainer's weights (gap {gap_new:.2e})"
            assert gap_old > 1e-2, f"outputs still look like the served checkpoint (gap {gap_old:.2e})"
    finally:
        # Other modules share this sidecar: give it back its checkpoint's weights.
        asyncio.run(_push_state(sidecar.url, old))
