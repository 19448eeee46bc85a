"""Faults inside a training step, on the real Megatron policy and the loop's own step functions (issue 17).

Ranks: 1 (one spawned gloo process runs every scenario in order; the tests assert on what it saw).
Injected: a NaN advantage (NaN loss and gradients), an Inf advantage, an Inf in one parameter's
gradient through a tensor hook (finite loss), an all-uniform batch (every advantage 0), and a
checkpoint directory on a 1 MiB / read-only tmpfs (mounted as root in a private mount namespace).
What must hold: a bad update is skipped with the weights, Adam state and LR schedule untouched and
counted; ``trainer.max_consecutive_bad_steps`` in a row save the last good state and stop with a
clear error; a uniform step takes no update; a save that cannot be done is reported, counted and
retried by the next save; an unwritable run directory fails before anything is built.
"""

from __future__ import annotations

import math
import os
import subprocess

import pytest
import torch

from tests.helpers.distributed import run_on_ranks
from tests.helpers.tiny_models import build_tiny_qwen2
from tests.training.test_rl_step_layouts import VOCAB, fixed_batch, recipe

pytestmark = [pytest.mark.faults, pytest.mark.multiprocess, pytest.mark.timeout(900)]


def _mount_tmpfs(path: str, size: str, *extra: str) -> str | None:
    """Mount a tmpfs (None) or say why it cannot be done here."""
    os.makedirs(path, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *extra]), "none", path],
                          capture_output=True, text=True)
    return None if done.returncode == 0 else f"mount -t tmpfs failed: {done.stderr.strip() or done.returncode}"


def _snapshot(policy) -> tuple[dict[str, torch.Tensor], list[torch.Tensor], int]:
    """Weights, every Adam tensor (moments and step, in parameter order), and the schedule's step count."""
    weights = {k: v.clone() for k, v in policy.export_hf_weights()}
    inner = policy.optimizer.optimizer
    moments = [inner.state[p][k].detach().clone() for group in inner.param_groups for p in group["params"]
               for k in sorted(inner.state.get(p, {})) if torch.is_tensor(inner.state[p][k])]
    return weights, moments, policy.scheduler.num_steps


def _differ(a, b) -> list[str]:
    """Which of weights / Adam state / schedule differ between two snapshots ([] when none)."""
    (wa, ma, sa), (wb, mb, sb) = a, b
    out = [] if wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa) else ["weights"]
    if len(ma) != len(mb) or not all(torch.equal(x, y) for x, y in zip(ma, mb, strict=True)):
        out.append("adam")
    return out + ([] if sa == sb else [f"schedule {sa} != {sb}"])


def _same(a, b) -> bool:
    return not _differ(a, b)


def _batch_with(advantage: float):
    batch = fixed_batch()
    batch.sequences[0].advantage = advantage
    return batch


def _scenarios(rank, world_size, hf_path, run_root):
    from igrpo_megatron.data.datasets import PromptLoader, PromptRecord
    from igrpo_megatron.runtime.cpu_mode import enable_cpu_mode
    from igrpo_megatron.runtime.parallel import init_distributed
    from igrpo_megatron.training.checkpoint import find_latest, verify_checkpoint
    from igrpo_megatron.training.loop import RLTrainer, TrainingDivergedError
    from igrpo_megatron.training.policy import MegatronPolicy

    enable_cpu_mode()
    seen: dict = {}
    r = recipe(hf_path)
    r.run.output_dir, r.run.name = run_root, "faults"
    r.trainer.max_consecutive_bad_steps = 3
    init_distributed(r.parallel, seed=1)
    trainer = RLTrainer(r)
    trainer.policy = MegatronPolicy(r, total_optimizer_steps=20)
    trainer.policy.setup()
    trainer.loader = PromptLoader([PromptRecord(f"p{i}", "1") for i in range(4)], 2, seed=0)

    # A good step first, so Adam has moments to compare.
    seen["good"] = trainer._train_guarded(fixed_batch())
    trainer.step += 1
    before = _snapshot(trainer.policy)

    # 1. NaN advantage -> NaN loss and gradients; 2. Inf advantage; 3. Inf gradient with a finite loss.
    seen["nan"] = trainer._train_guarded(_batch_with(float("nan")))
    seen["nan_unchanged"] = _same(before, _snapshot(trainer.policy))
    trainer._stop_if_diverged()  # 1 of 3: goes on
    seen["inf"] = trainer._train_guarded(_batch_with(float("inf")))
    trainer._stop_if_diverged()  # 2 of 3
    param = next(p for p in trainer.policy.chunks[0].parameters() if p.requires_grad)
    hook = param.register_hook(lambda g: g * float("inf"))
    seen["inf_grad"] = trainer._train_guarded(fixed_batch())
    hook.remove()
    seen["three_bad_unchanged"] = _same(before, _snapshot(trainer.policy))
    try:
        trainer._stop_if_diverged()  # 3 of 3: saves the last good state, then stops
        seen["stopped"] = None
    except TrainingDivergedError as exc:
        seen["stopped"] = str(exc)
    saved = find_latest(trainer._checkpoint_root())
    verify_checkpoint(saved)
    seen["saved"] = str(saved)

    # A good step ends the run of bad ones (and moves the weights again).
    seen["recovered"] = trainer._train_guarded(fixed_batch())
    seen["recovered_moved"] = not _same(before, _snapshot(trainer.policy))
    seen["bad_in_a_row_after_good"] = trainer.bad_in_a_row

    # The saved checkpoint holds the last good weights (= before the bad steps).
    # A resumed run loads into a fresh schedule; Megatron's load_state_dict adds the saved step count to it.
    trainer.policy.scheduler.num_steps = 0
    trainer.policy.load(str(saved))
    seen["saved_differs_from_last_good"] = _differ(before, _snapshot(trainer.policy))

    # An all-uniform batch: no update, counted, nothing NaN.
    uniform = fixed_batch()
    for s in uniform.sequences:
        s.advantage = 0.0
    now = _snapshot(trainer.policy)
    seen["uniform"] = trainer._train_guarded(uniform)
    seen["uniform_unchanged"] = _same(now, _snapshot(trainer.policy))

    _sidecar_scenarios(trainer, r, run_root, seen)

    # Checkpoints on a small tmpfs: a save that does not fit is deferred, the next one (space freed) succeeds.
    small = os.path.join(run_root, "small")
    seen["mount"] = _mount_tmpfs(small, "1m")
    try:
        if seen["mount"] is None:
            _storage_scenarios(trainer, r, small, seen)
    finally:
        if seen["mount"] is None:
            subprocess.run(["umount", small], check=True)
    return seen


def _storage_scenarios(trainer, r, small, seen):
    from igrpo_megatron.config.errors import UserError
    from igrpo_megatron.training.checkpoint import find_latest
    from igrpo_megatron.training.loop import RLTrainer

    r.checkpoint.save_dir = small
    trainer.step = 4
    seen["full_save"] = trainer._save_or_defer(final=False)
    seen["full_latest"] = str(find_latest(small))
    try:
        trainer._save_or_defer(final=True)
        seen["full_final"] = None
    except UserError as exc:
        seen["full_final"] = str(exc)
    subprocess.run(["mount", "-o", "remount,size=64m", small], check=True)  # the disk has room again
    seen["retried_save"] = trainer._save_or_defer(final=False)
    seen["retried_latest"] = str(find_latest(small))
    subprocess.run(["mount", "-o", "remount,ro", small], check=True)  # read-only from now on
    seen["ro_save"] = trainer._save_or_defer(final=False)
    seen["failed_saves"] = trainer.faults["failed_saves"]
    r.run.output_dir = small  # the run directory itself unwritable: refused before anything is built
    unwritable = RLTrainer(r)
    try:
        unwritable._setup_run_dir()
        seen["setup"] = None
    except UserError as exc:
        seen["setup"] = str(exc)


def _sidecar_scenarios(trainer, r, run_root, seen):
    """The loop's weight push and rollout retry against the fake vLLM API (served from a thread here):
    a refused push is counted and not fatal; the next rollout comes back tagged with the old version,
    so the loop pushes again and samples again; a sidecar refusing every push ends the run, bounded."""
    import asyncio
    import threading

    from transformers import AutoTokenizer

    from igrpo_megatron.data.datasets import PromptRecord
    from igrpo_megatron.data.prompts import PromptFormatter
    from igrpo_megatron.rewards.registry import build_rewards
    from igrpo_megatron.rollout.client import BlockingRolloutClient, RolloutClient
    from igrpo_megatron.rollout.interfaces import SamplingParams
    from igrpo_megatron.rollout.server import RolloutServer
    from igrpo_megatron.rollout.two_stage import TwoStageRollout
    from igrpo_megatron.rollout.weight_sync import WeightSynchronizer, build_transport
    from tests.helpers.tiny_models import build_tiny_tokenizer
    from tests.rollout.fake_server import FakeVLLM, serve

    fake = FakeVLLM()
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    runner, url = asyncio.run_coroutine_threadsafe(serve(fake), loop).result(60)
    r.rollout.server.url, r.rollout.server.max_restarts = url, 2
    r.rollout.retry.initial_backoff_s, r.rollout.retry.max_backoff_s = 0.05, 0.1
    r.rollout.weight_sync.transport, r.rollout.weight_sync.shm_root = "shm_reload", os.path.join(run_root, "shm")
    os.makedirs(r.rollout.weight_sync.shm_root)
    r.algorithm.igrpo.enabled, r.rollout.sampling.max_tokens = False, 4
    r.reward.math.num_workers = 1
    tok = AutoTokenizer.from_pretrained(str(build_tiny_tokenizer(os.path.join(run_root, "tok"))))
    rewards = build_rewards(r.reward)
    trainer.server = RolloutServer(r.rollout.server, log_dir=os.path.join(run_root, "sidecar"))
    trainer.client = BlockingRolloutClient(RolloutClient.from_config(r.rollout, url))
    trainer.sync = WeightSynchronizer(trainer.client.client, build_transport(r.rollout, trainer.client.client, False))
    trainer.rollout = TwoStageRollout(trainer.client.client, PromptFormatter(tok, r.data), rewards.train, r.algorithm,
                                      SamplingParams.from_config(r.rollout.sampling), max_prompt_length=256,
                                      run_seed=1, draft_reward=rewards.draft)
    records = [PromptRecord("1+1?", "2"), PromptRecord("2+2?", "4")]
    try:
        trainer.step = 1
        trainer._push_weights(1)
        fake.refuse_weight_reloads = 1
        trainer.step = 2
        trainer._push_weights(2)  # refused: counted, version stays 1
        seen["refused_push"] = (trainer.faults["failed_weight_pushes"], trainer.client.client.policy_version)
        before = len(fake.requests)
        batch, _ = trainer._rollout(records)  # tagged 1 at step 2: pushed again, sampled again
        seen["stale_retry"] = (batch is not None, trainer.faults["rollout_retries"],
                               trainer.client.client.policy_version, len(fake.requests) - before, fake.weight_version)
        fake.refuse_weight_reloads = 100
        trainer.step = 3
        trainer._push_weights(3)
        try:
            trainer._rollout(records)
            seen["gave_up"] = None
        except RuntimeError as exc:
            seen["gave_up"] = str(exc)
        seen["gave_up_counts"] = (trainer.faults["rollout_retries"], trainer.faults["failed_weight_pushes"])
    finally:
        for part in (trainer.rollout, rewards, trainer.sync, trainer.client):
            part.close()
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)


@pytest.fixture(scope="module")
def seen(tmp_path_factory):
    hf = build_tiny_qwen2(tmp_path_factory.mktemp("hf") / "qwen2", vocab_size=VOCAB, hidden=128, heads=2,
                          kv_heads=1, layers=2, intermediate=256, init_std=0.1, seed=5)
    root = str(tmp_path_factory.mktemp("runs"))
    return run_on_ranks(_scenarios, 1, args=(str(hf), root))[0]


def test_a_good_step_updates_and_counts_nothing(seen):
    good = seen["good"]
    assert math.isfinite(good["loss"]) and good["grad_norm"] > 0
    assert good["updates_skipped"] == 0 and good["faults/bad_steps"] == 0
    assert good["data/skipped_rows"] == 0  # the loader's skip count rides in every step's metrics


@pytest.mark.parametrize("case", ["nan", "inf", "inf_grad"])
def test_a_non_finite_step_is_skipped_and_counted(seen, case):
    out = seen[case]
    assert out["updates_skipped"] == 1
    assert out["faults/bad_steps"] == ["nan", "inf", "inf_grad"].index(case) + 1
    if case == "inf_grad":  # the loss was fine: only the gradient norm was not
        assert math.isfinite(out["loss"]) and not math.isfinite(out["grad_norm"])
    else:
        assert not math.isfinite(out["loss"])


def test_skipped_updates_leave_weights_adam_state_and_schedule_unchanged(seen):
    assert seen["nan_unchanged"] and seen["three_bad_unchanged"]


def test_too_many_bad_steps_in_a_row_save_the_last_good_state_and_stop(seen):
    message = seen["stopped"]
    assert message is not None, "three bad steps in a row did not stop the run"
    assert "3 steps in a row" in message and "trainer.max_consecutive_bad_steps = 3" in message
    assert seen["saved"] and seen["saved_differs_from_last_good"] == []


def test_a_good_step_resets_the_bad_run(seen):
    assert seen["recovered"]["updates_skipped"] == 0 and seen["recovered_moved"]
    assert seen["bad_in_a_row_after_good"] == 0


def test_an_all_uniform_step_takes_no_update(seen):
    out = seen["uniform"]
    assert out["updates_skipped"] == 1 and out["faults/uniform_steps_skipped"] == 1
    assert seen["uniform_unchanged"]
    assert all(not (isinstance(v, float) and math.isnan(v)) for v in out.values())


def _needs_tmpfs(seen):
    if seen["mount"] is not None:
        pytest.skip(f"needs root and tmpfs mounts: {seen['mount']}")


def test_a_save_on_a_full_disk_is_deferred_and_the_next_save_retries(seen):
    _needs_tmpfs(seen)
    assert seen["full_save"] is False and seen["full_latest"] == "None"  # nothing half-written became latest
    assert seen["full_final"] and "final checkpoint could not be saved" in seen["full_final"]
    assert seen["retried_save"] is True and seen["retried_latest"].endswith("step_000004")
    assert seen["ro_save"] is False and seen["failed_saves"] == 3


def test_an_unwritable_run_directory_fails_before_training(seen):
    _needs_tmpfs(seen)
    assert seen["setup"] and "cannot write in" in seen["setup"] and "nothing was started" in seen["setup"]


def test_a_refused_weight_push_is_counted_and_not_fatal(seen):
    assert seen["refused_push"] == (1, 1)  # one failure counted; the client still says version 1


def test_rollouts_tagged_with_a_stale_version_are_pushed_again_and_resampled(seen):
    got_batch, retries, version, requests, server_version = seen["stale_retry"]
    assert got_batch and retries == 1 and version == 2 and server_version == "2"
    assert requests == 4  # 2 prompts sampled twice: the stale samples were dropped, never trained on


def test_a_sidecar_refusing_every_push_stops_the_run_after_bounded_retries(seen):
    assert seen["gave_up"] and "the sidecar kept failing" in seen["gave_up"]
    retries, failed_pushes = seen["gave_up_counts"]
    assert retries == 1 + 3  # rollout.server.max_restarts = 2: three attempts at step 3, each retried
    assert failed_pushes == 1 + 1 + 3  # step 2's, step 3's, and the three re-pushes
