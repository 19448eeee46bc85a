"""Weight transfer through vLLM's weight-transfer engine API with the project's ``gloo`` engine.

The sidecar here is a real vLLM server started with ``--weight-transfer-config {"backend":"gloo"}``
(the engine is found through the ``vllm.general_plugins`` entry point). Where ``unshare`` works, it
runs in its own mount namespace with private tmpfs mounts on ``/dev/shm`` and ``/tmp`` (only the
model directory is carried in), so the two sides share nothing but the network and a file-based
transport could not work.

Tolerances: vLLM and transformers run the same fp32 weights on the same CPU with different
kernels; log-probs of the same tokens then agree to ~1e-5 (DESIGN.md measured 3e-6), so 1e-3 is
a wide margin that still separates them from the old weights (gaps > 1e-2). Megatron at TP=1
and TP=2 reduces gradients in different orders, and Adam's first step (lr 5e-3, update ~lr *
g / |g|) turns a last-bit difference in a tiny gradient into a visible one: measured 2.8e-5 on one
element of 16k. So the TP=2 and TP=1 exports must agree to 2e-4 and their served log-probs to 1e-3,
greedy tokens exactly; each must match transformers on its own exported tensors to 1e-3.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid
from pathlib import Path

import pytest
import torch

from igrpo_megatron.config.rollout import RolloutConfig, WeightSyncConfig
from igrpo_megatron.rollout import weight_sync
from igrpo_megatron.rollout.client import RolloutClient
from igrpo_megatron.rollout.interfaces import SamplingParams, WeightSyncError, WeightTransport
from igrpo_megatron.rollout.server import RolloutServer, live_group_members
from igrpo_megatron.rollout.weight_channels import (
    ALIGN_BYTES,
    bucket_layout,
    iter_buckets,
    pack_bucket,
    unpack_bucket,
    update_info,
)
from igrpo_megatron.rollout.weight_sync import (
    EngineTransport,
    SharedMemoryReloadTransport,
    WeightSynchronizer,
    build_transport,
    engine_backend,
    transport_name,
)
from tests.helpers.distributed import run_on_ranks
from tests.helpers.tiny_models import build_tiny_qwen2, hf_token_logprobs, load_state_dict
from tests.rollout.conftest import sidecar_config
from tests.rollout.test_weight_sync_tp import _batch, _hf_greedy, _recipe, _recorded

ROOT = Path(__file__).resolve().parents[2]

PROMPTS = [[5, 17, 42, 99, 7], [300, 12, 9, 44]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12)
BUCKET_BYTES = 256 * 1024  # the tiny model (~1.5 MB) goes in several buckets


# ----------------------------------------------------------------------------- without vLLM
def test_buckets_are_bounded_and_keep_names_shapes_dtypes():
    state = {
        "a.weight": torch.randn(64, 64),                        # 16 KiB fp32
        "b.weight": torch.randn(64, 64).to(torch.bfloat16),     # 8 KiB
        "c.bias": torch.randn(3),                               # 12 B: forces padding after it
        "d.index": torch.arange(5, dtype=torch.int64),           # 40 B
        "e.view": torch.randn(8, 64)[:, :32],                   # non-contiguous view, 1 KiB
        "f.big": torch.randn(128, 64),                          # 32 KiB: larger than a bucket alone
        "g.scalar": torch.tensor(2.5),
    }
    bucket_bytes = 20 * 1024
    buckets = list(iter_buckets(state.items(), bucket_bytes))
    # In order: a+b would be 24 KiB > 20 -> [a] [b c d e] [f] [g]
    assert [list(b) for b in buckets] == [["a.weight"], ["b.weight", "c.bias", "d.index", "e.view"],
                                          ["f.big"], ["g.scalar"]]
    for bucket in buckets:
        size = sum(t.numel() * t.element_size() for t in bucket.values())
        assert size <= bucket_bytes or len(bucket) == 1
        info = update_info(bucket)
        offsets, total = bucket_layout(info["dtype_names"], info["shapes"])
        assert all(off % ALIGN_BYTES == 0 for off in offsets)
        buf = pack_bucket(bucket)
        assert buf.dtype == torch.uint8 and buf.numel() == total
        # What a worker rebuilds from the buffer and the JSON it was sent.
        received = unpack_bucket(buf.clone(), info)
        assert [n for n, _ in received] == list(bucket)
        for name, t in received:
            assert t.dtype == state[name].dtype and t.shape == state[name].shape
            assert torch.equal(t, state[name])


def test_bucket_errors_name_the_problem():
    with pytest.raises(WeightSyncError, match="given twice"):
        list(iter_buckets([("a", torch.zeros(2)), ("a", torch.ones(2))], 1 << 20))
    with pytest.raises(WeightSyncError, match="no weights"):
        list(iter_buckets([], 1 << 20))
    info = update_info({"a": torch.zeros(4)})
    with pytest.raises(WeightSyncError, match="holds 8 bytes"):
        unpack_bucket(torch.zeros(8, dtype=torch.uint8), info)


def test_transport_follows_where_the_server_runs(monkeypatch):
    cfg = RolloutConfig()
    assert cfg.weight_sync.transport == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert transport_name(cfg, local_server=True) == "shm_reload"
    assert engine_backend(cfg, local_server=True) is None
    assert transport_name(cfg, local_server=False) == "gloo" == engine_backend(cfg, local_server=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(weight_sync, "vllm_importable", lambda: True)
    assert transport_name(cfg, local_server=False) == "nccl"
    # vLLM's NCCL engine needs vLLM on the trainer's side too; a trainer without it (the container's
    # trainer venv) and its serve-rollout twin both fall back to gloo.
    monkeypatch.setattr(weight_sync, "vllm_importable", lambda: False)
    assert transport_name(cfg, local_server=False) == "gloo"
    cfg.weight_sync.transport = "gloo"
    assert transport_name(cfg, local_server=True) == "gloo"  # an explicit choice wins
    client = RolloutClient("http://10.1.2.3:8000")
    transport = build_transport(cfg, client, local_server=True)
    assert isinstance(transport, EngineTransport) and isinstance(transport, WeightTransport)
    assert transport.backend == "gloo" and transport.bucket_bytes == 512 << 20
    cfg.weight_sync.transport = "shm_reload"
    assert isinstance(build_transport(cfg, client, local_server=False), SharedMemoryReloadTransport)


def test_server_command_carries_the_engine():
    server = RolloutServer(sidecar_config(port=8123), model_path="/m", weight_transfer_backend="gloo")
    cmd = server.command()
    assert cmd[cmd.index("--weight-transfer-config") + 1] == '{"backend": "gloo"}'
    assert "--weight-transfer-config" not in RolloutServer(sidecar_config(port=8123), model_path="/m").command()


def test_bad_weight_sync_keys_are_reported():
    cfg = RolloutConfig(weight_sync=WeightSyncConfig(transport="carrier_pigeon", master_port=70000))
    errors = "\n".join(cfg.errors())
    assert "rollout.weight_sync.transport" in errors and "rollout.weight_sync.master_port = 70000" in errors


# ----------------------------------------------------------------------------- with vLLM
def _unshare_works() -> str | None:
    """None when a private mount namespace can be made here, else why not."""
    try:
        out = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                              "mount -t tmpfs none /dev/shm"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unshare cannot run: {exc}"
    return None if out.returncode == 0 else f"unshare --mount failed: {out.stderr.strip()[:200]}"


# Runs vLLM in a private mount namespace: fresh tmpfs on /dev/shm and /tmp, with only the
# directories in $IGRPO_KEEP_DIRS that live under /tmp (the model; the project and its venv when
# the checkout itself is under /tmp) carried over at their own paths.
_PRIVATE_MOUNTS = """#!/bin/sh
exec unshare --mount --propagation private /bin/sh -c '
set -e
mount -t tmpfs none /dev/shm
i=0
for d in $IGRPO_KEEP_DIRS; do mkdir /dev/shm/.keep$i; mount --bind "$d" /dev/shm/.keep$i; i=$((i+1)); done
mount -t tmpfs none /tmp
i=0
for d in $IGRPO_KEEP_DIRS; do mkdir -p "$d"; mount --move /dev/shm/.keep$i "$d"; i=$((i+1)); done
exec "$0" "$@"' "{python}" "$@"
"""


def _keep_dirs(*paths: Path) -> str:
    """The given directories that lie under /tmp, outermost only (a bind of a parent carries its children)."""
    under = sorted({p.resolve() for p in paths if p.resolve().is_relative_to("/tmp")}, key=lambda p: len(p.parts))
    keep: list[Path] = []
    for p in under:
        if not any(p.is_relative_to(k) for k in keep):
            keep.append(p)
    return " ".join(str(p) for p in keep)


@pytest.fixture(scope="module")
def gloo_sidecar(tmp_path_factory):
    """A vLLM server with the gloo weight-transfer engine, isolated from our files where possible."""
    import sys

    model_dir = build_tiny_qwen2(tmp_path_factory.mktemp("gloo_model"), seed=0)
    why_not = _unshare_works()
    python, env = None, {}
    if why_not is None:
        wrapper = tmp_path_factory.mktemp("wrapper") / "python-in-private-mounts"
        wrapper.write_text(_PRIVATE_MOUNTS.replace("{python}", os.environ.get("IGRPO_VLLM_PYTHON", sys.executable)))
        wrapper.chmod(0o755)
        python, env = str(wrapper), {"IGRPO_KEEP_DIRS": _keep_dirs(Path(model_dir), ROOT, Path(sys.prefix))}
    server = RolloutServer(sidecar_config(extra_env=env), model_path=model_dir, python=python,
                           log_dir=tmp_path_factory.mktemp("gloo_logs"), weight_transfer_backend="gloo")
    server.start()
    server.private_mounts_skip_reason = why_not
    server.model_dir = model_dir
    yield server
    pgid = server.pid
    server.close()
    if pgid is not None:
        assert not live_group_members(pgid), f"vLLM processes left behind: {live_group_members(pgid)}"


@pytest.mark.vllm
def test_sidecar_shares_no_files_with_the_trainer(gloo_sidecar):
    if gloo_sidecar.private_mounts_skip_reason:
        pytest.skip(f"no private mount namespace here ({gloo_sidecar.private_mounts_skip_reason})")
    marker = f"igrpo-marker-{uuid.uuid4().hex}"
    for root in ("/dev/shm", "/tmp"):
        Path(root, marker).write_text("trainer side")
        try:
            # /proc/PID/root is the server's own view of the filesystem.
            assert not Path(f"/proc/{gloo_sidecar.pid}/root{root}/{marker}").exists(), f"{root} is shared"
        finally:
            Path(root, marker).unlink()
    assert Path(f"/proc/{gloo_sidecar.pid}/root{gloo_sidecar.model_dir}/config.json").exists()


def _gap(completion, prompt, model_dir, state) -> float:
    ref = hf_token_logprobs(model_dir, prompt, completion.token_ids, state=state)
    return max(abs(a - b) for a, b in zip(completion.logprobs, ref, strict=True))


def _check_serves(groups, model_dir, state, old=None) -> None:
    for prompt, group in zip(PROMPTS, groups, strict=True):
        c = group.completions[0]
        assert c.token_ids == _hf_greedy(model_dir, state, prompt, GREEDY.max_tokens)
        gap = _gap(c, prompt, model_dir, state)
        assert gap < 1e-3, f"outputs do not follow the pushed weights (gap {gap:.2e})"
        if old is not None:
            assert _gap(c, prompt, model_dir, old) > 1e-2, "outputs still follow the previous weights"


def _running_requests(url: str) -> float:
    """Requests the engine is decoding now (its Prometheus gauge)."""
    import urllib.request

    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
        lines = resp.read().decode().splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith("vllm:num_requests_running"))


async def _push_three_times(url: str, states: list[dict[str, torch.Tensor]]) -> dict:
    """Push states[0], then states[1] while another client's long request runs, then states[2]."""
    out: dict = {"groups": [], "stats": [], "versions": []}
    async with RolloutClient(url) as client, RolloutClient(url) as other:
        transport = EngineTransport(client, backend="gloo", bucket_bytes=BUCKET_BYTES, timeout_s=120)
        sync = WeightSynchronizer(client, transport)
        for i, state in enumerate(states):
            inflight = None
            if i == 1:  # a request of another client (not held back by our synchronizer) is running
                inflight = asyncio.ensure_future(other.generate_one(PROMPTS[0], SamplingParams(
                    temperature=1.0, max_tokens=500, seed=3)))
                while not inflight.done() and await asyncio.to_thread(_running_requests, url) == 0:
                    await asyncio.sleep(0.01)
                out["inflight_running_at_push"] = not inflight.done()
            version = await sync.sync(state.items())
            out["versions"].append((version, await sync.server_version()))
            out["stats"].append(transport.last_push)
            out["groups"].append(await client.generate(PROMPTS, GREEDY))
            if inflight is not None:
                done = (await inflight).completions[0]
                out["inflight_finish"] = (done.finish_reason, len(done.token_ids))
        transport.close()
    return out


@pytest.mark.vllm
def test_gloo_pushes_switch_the_server_to_the_new_weights(gloo_sidecar, tmp_path):
    model_dir = gloo_sidecar.model_dir
    old = load_state_dict(model_dir)
    a = load_state_dict(build_tiny_qwen2(tmp_path / "a", tokenizer=model_dir, seed=1, init_std=0.05))
    b = load_state_dict(build_tiny_qwen2(tmp_path / "b", tokenizer=model_dir, seed=2, init_std=0.05))
    out = asyncio.run(_push_three_times(gloo_sidecar.url, [a, b, a]))

    assert out["versions"] == [(1, "1"), (2, "2"), (3, "3")]  # the server reports each pushed version
    nbytes = sum(t.numel() * t.element_size() for t in a.values())
    for stats in out["stats"]:
        assert stats.bytes == nbytes and stats.tensors == len(a) and stats.buckets >= nbytes // BUCKET_BYTES
    _check_serves(out["groups"][0], model_dir, a, old=old)
    _check_serves(out["groups"][1], model_dir, b, old=a)
    _check_serves(out["groups"][2], model_dir, a, old=b)
    assert out["inflight_running_at_push"], "the long request had finished before the push: nothing was tested"
    # Frozen during the push, then finished (max_tokens or EOS), not aborted.
    assert out["inflight_finish"][0] in ("length", "stop") and out["inflight_finish"][1] > 0


def _train_and_push_gloo(rank: int, world_size: int, hf_path: str, url: str) -> dict | None:
    """One RL step at TP=world_size, then the export streamed into the sidecar through gloo."""
    import torch.distributed as dist

    from igrpo_megatron.runtime.cpu_mode import enable_cpu_mode
    from igrpo_megatron.runtime.parallel import destroy_distributed, init_distributed
    from igrpo_megatron.training.policy import MegatronPolicy

    enable_cpu_mode()
    r = _recipe(hf_path)
    r.parallel.tensor_model_parallel_size = world_size
    init_distributed(r.parallel, seed=1)
    policy = MegatronPolicy(r, total_optimizer_steps=10)
    policy.setup()
    policy.train_step(_batch())
    result = None
    if rank == 0:
        pushed: dict[str, torch.Tensor] = {}

        async def push():
            async with RolloutClient(url) as client:
                transport = EngineTransport(client, backend="gloo", bucket_bytes=BUCKET_BYTES, timeout_s=120)
                version = await WeightSynchronizer(client, transport).sync(
                    _recorded(policy.export_hf_weights(), pushed))
                groups = await client.generate(PROMPTS, GREEDY)
                transport.close()
                return dict(version=version, groups=groups, buckets=transport.last_push.buckets)

        result = asyncio.run(push())
        result["weights"] = pushed
    else:
        assert list(policy.export_hf_weights()) == []  # only global rank 0 receives tensors
    dist.barrier()
    destroy_distributed()
    return result


@pytest.mark.vllm
@pytest.mark.multiprocess
@pytest.mark.timeout(600)
def test_tp2_trainer_pushes_through_gloo_like_one_rank(gloo_sidecar):
    model_dir = gloo_sidecar.model_dir
    old = load_state_dict(model_dir)
    one = run_on_ranks(_train_and_push_gloo, 1, args=(str(model_dir), gloo_sidecar.url), timeout=300)[0]
    two = run_on_ranks(_train_and_push_gloo, 2, args=(str(model_dir), gloo_sidecar.url), timeout=300)[0]
    assert one["version"] == two["version"] == 1 and two["buckets"] > 1
    assert set(two["weights"]) == set(one["weights"]) == set(old)
    for name, t in two["weights"].items():
        assert not torch.equal(t, old[name]), f"{name} did not change in the RL step"
        torch.testing.assert_close(t, one["weights"][name], rtol=0, atol=2e-4)
    _check_serves(two["groups"], model_dir, two["weights"], old=old)
    for g1, g2 in zip(one["groups"], two["groups"], strict=True):
        c1, c2 = g1.completions[0], g2.completions[0]
        assert c2.token_ids == c1.token_ids
        assert max(abs(x - y) for x, y in zip(c1.logprobs, c2.logprobs, strict=True)) < 1e-3


_VLLM_TRAINER_SIDE = """
import sys
from transformers import AutoModelForCausalLM
from vllm.distributed.weight_transfer import HTTPVLLMWeightSyncClient, ModuleSource, WeightTransferTrainerFactory
from vllm.plugins import load_general_plugins

from igrpo_megatron.rollout.vllm_gloo import GlooTrainerInitInfo

load_general_plugins()  # what registers 'gloo' with the trainer factory: the entry point
url, model_dir = sys.argv[1], sys.argv[2]
client = HTTPVLLMWeightSyncClient(url)
info = GlooTrainerInitInfo(master_address="127.0.0.1", num_workers=1, bucket_bytes=256 * 1024, rank=0)
engine = WeightTransferTrainerFactory.trainer_init(info, client=client,
                                                   source=ModuleSource(AutoModelForCausalLM.from_pretrained(model_dir)))
engine.send_weights()
client.shutdown_weight_transfer_engine()
engine.shutdown()
"""


@pytest.mark.vllm
def test_vllm_trainer_factory_drives_the_gloo_engine(gloo_sidecar, tmp_path):
    """The same engine through vLLM's own trainer-side API (WeightTransferTrainerFactory + HTTP client)."""
    import sys

    model_dir = gloo_sidecar.model_dir
    new_dir = build_tiny_qwen2(tmp_path / "c", tokenizer=model_dir, seed=4, init_std=0.05)
    before = asyncio.run(_generate(gloo_sidecar.url))
    done = subprocess.run([sys.executable, "-c", _VLLM_TRAINER_SIDE, gloo_sidecar.url, str(new_dir)],
                          capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr[-3000:]
    after = asyncio.run(_generate(gloo_sidecar.url, reset_cache=True))
    new = load_state_dict(new_dir)
    _check_serves(after, model_dir, new, old=None)
    assert [g.completions[0].token_ids for g in after] != [g.completions[0].token_ids for g in before]


async def _generate(url: str, reset_cache: bool = False):
    async with RolloutClient(url) as client:
        if reset_cache:
            await client.post("/reset_prefix_cache")
        return await client.generate(PROMPTS, GREEDY)
