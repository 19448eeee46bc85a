"""Checkpoints: 4 straight RL steps equal 2 steps, save, resume in a fresh process, 2 more steps,
also when the resume uses a different tensor-parallel size. Saves are atomic."""

import pytest
import torch

from tests.helpers.distributed import run_on_ranks
from tests.training.test_rl_step_layouts import VOCAB, build_tiny_qwen2, fixed_batch, recipe

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(900)]


def _batch(step: int):
    """A different fixed batch per step (advantages flip sign with the step)."""
    batch = fixed_batch()
    for s in batch.sequences:
        s.advantage *= (-1) ** step
    return batch


def _run(rank, world_size, hf_path, ckpt_root, parallel, start, stop, save_at):
    from igrpo_megatron.runtime.cpu_mode import enable_cpu_mode
    from igrpo_megatron.runtime.parallel import destroy_distributed, init_distributed
    from igrpo_megatron.training.checkpoint import find_latest
    from igrpo_megatron.training.policy import MegatronPolicy

    enable_cpu_mode()
    r = recipe(hf_path, **parallel)
    r.optimizer.warmup_fraction = 0.25  # a schedule that changes every step: the scheduler must resume
    init_distributed(r.parallel, seed=1)
    policy = MegatronPolicy(r, total_optimizer_steps=4)
    policy.setup()
    step = 0
    if start > 0:
        step, loop = policy.load(str(find_latest(ckpt_root)))
        assert step == start and loop == {"marker": start}
    metrics = []
    for step in range(start, stop):
        metrics.append(policy.train_step(_batch(step)))
        if step + 1 == save_at:
            policy.save(ckpt_root, step + 1, {"marker": step + 1}, "recipe: test\n")
    weights = dict(policy.export_hf_weights())
    destroy_distributed()
    return metrics, weights


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return str(build_tiny_qwen2(tmp_path_factory.mktemp("hf") / "m", vocab_size=VOCAB, hidden=128, heads=2,
                                kv_heads=1, layers=2, intermediate=256, init_std=0.1, seed=5))


@pytest.fixture(scope="module")
def straight(hf_dir, tmp_path_factory):
    return run_on_ranks(_run, 1, args=(hf_dir, str(tmp_path_factory.mktemp("c0")), {}, 0, 4, -1))[0]


def _compare(resumed_metrics, resumed_weights, straight, rel=1e-5):
    metrics, weights = straight
    for key in ("loss", "grad_norm", "lr"):
        assert resumed_metrics[-1][key] == pytest.approx(metrics[-1][key], rel=rel), key
    for name, tensor in weights.items():
        diff = ((resumed_weights[name] - tensor).norm() / tensor.norm()).item()
        assert diff < rel, f"{name}: {diff:.2e}"


def test_resume_reproduces_the_straight_run(hf_dir, tmp_path, straight):
    root = str(tmp_path / "ckpt")
    run_on_ranks(_run, 1, args=(hf_dir, root, {}, 0, 2, 2))
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["latest", "step_000002"]  # no .tmp left
    metrics, weights = run_on_ranks(_run, 1, args=(hf_dir, root, {}, 2, 4, -1))[0]
    _compare(metrics, weights, straight)
    # The learning rate moved between steps, so a scheduler that restarted would have been caught.
    assert straight[0][1]["lr"] != straight[0][3]["lr"]


def test_save_at_tp2_resume_at_tp1(hf_dir, tmp_path, straight):
    root = str(tmp_path / "ckpt")
    run_on_ranks(_run, 2, args=(hf_dir, root, dict(tensor_model_parallel_size=2),
                                0, 2, 2))
    metrics, weights = run_on_ranks(_run, 1, args=(hf_dir, root, {}, 2, 4, -1))[0]
    _compare(metrics, weights, straight)


def test_incomplete_checkpoint_is_never_picked(tmp_path):
    from igrpo_megatron.training.checkpoint import CheckpointError, find_latest, load_training_checkpoint

    (tmp_path / "step_000003.tmp").mkdir()            # a save that died half-way
    (tmp_path / "step_000002").mkdir()                # a directory without its metadata
    (tmp_path / "latest").write_text("step_000003.tmp")
    assert find_latest(tmp_path) is None
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        load_training_checkpoint(tmp_path / "step_000002", [], None)


def _export(rank, world_size, root, hf_path, out):
    from igrpo_megatron.training.export import export_checkpoint_to_hf
    from tests.helpers.tiny_models import load_state_dict

    export_checkpoint_to_hf(root, recipe(hf_path), out, tokenizer_dir=hf_path)
    return load_state_dict(out)


def test_checkpoint_exports_to_the_trained_weights(hf_dir, tmp_path):
    """A TP=2 training checkpoint exported to HF layout holds exactly the weights training ended with."""
    root = str(tmp_path / "ckpt")
    _, trained = run_on_ranks(_run, 2, args=(hf_dir, root, dict(tensor_model_parallel_size=2), 0, 2, 2))[0]
    exported = run_on_ranks(_export, 1, args=(root, hf_dir, str(tmp_path / "hf")))[0]
    assert sorted(exported) == sorted(trained)
    for name, tensor in trained.items():
        assert torch.equal(exported[name], tensor), name
    assert (tmp_path / "hf" / "config.json").exists() and (tmp_path / "hf" / "tokenizer.json").exists()
