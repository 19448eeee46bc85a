"""Re-shardable model weights through ``megatron.core.dist_checkpointing``.

A checkpoint saved at one TP/PP layout loads at any other, because every tensor is stored
under its global name with its global shape. Writes go to a temporary directory that is
renamed into place only once complete, so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.dist_checkpointing.core import CheckpointingException
from torch.distributed.checkpoint.api import CheckpointException as TorchCheckpointException

from igrpo_megatron.config.errors import UserError
from igrpo_megatron.config.files import replace_directory, write_text
from igrpo_megatron.models import unwrap

logger = logging.getLogger(__name__)

_MODEL_KEY = "model"


def _model_sharded_state_dict(chunks: list[torch.nn.Module]) -> dict:
    if len(chunks) == 1:
        return {_MODEL_KEY: unwrap(chunks[0]).sharded_state_dict()}
    return {f"{_MODEL_KEY}{i}": unwrap(c).sharded_state_dict() for i, c in enumerate(chunks)}


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_model_weights(chunks: list[torch.nn.Module], directory: str | os.PathLike) -> Path:
    """Save the model (all ranks call this) to ``directory`` atomically; returns the final path."""
    final = Path(directory)
    tmp = final.with_name(final.name + ".tmp")
    if _is_rank0():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    dist_checkpointing.save(_model_sharded_state_dict(chunks), str(tmp))
    _barrier()
    if _is_rank0():
        replace_directory(tmp, final)
    _barrier()
    logger.info("saved model weights to %s", final)
    return final


def load_model_weights(chunks: list[torch.nn.Module], directory: str | os.PathLike) -> None:
    """Load weights saved by :func:`save_model_weights` at any TP/PP layout into ``chunks``."""
    path = Path(directory)
    if not path.is_dir() or not (path / "metadata.json").exists():
        raise FileNotFoundError(
            f"{path} is not a complete Megatron checkpoint (no metadata.json); "
            "was the save interrupted? Point at another checkpoint or start fresh."
        )
    sharded = _model_sharded_state_dict(chunks)
    state = dist_checkpointing.load(sharded, str(path))
    if len(chunks) == 1:
        unwrap(chunks[0]).load_state_dict(state[_MODEL_KEY], strict=True)
    else:
        for i, c in enumerate(chunks):
            unwrap(c).load_state_dict(state[f"{_MODEL_KEY}{i}"], strict=True)
    logger.info("loaded model weights from %s", path)


# ---------------------------------------------------------------------------------------------
# Full training checkpoints: model + optimizer (re-shardable) + the loop's own state.
#
#   <root>/step_000012/          dist_checkpointing files (model, optimizer), written as .tmp first
#   <root>/step_000012/trainer_state.pt   scheduler, step, data position, metrics history (rank 0)
#   <root>/step_000012/rng/rank_00003.pt  each rank's RNG states (restored when the layout matches)
#   <root>/step_000012/recipe.yaml        the resolved recipe
#   <root>/step_000012/manifest.json      every file's size (see verify_checkpoint)
#   <root>/latest                         name of the newest complete checkpoint, updated last
# ---------------------------------------------------------------------------------------------

TRAINER_STATE = "trainer_state.pt"
LATEST = "latest"
# Written last into a finished save: every file's size, checked (cheaply, by stat) before a load, so a
# truncated or missing file is found before anything is built or started, naming the file. Sizes, not
# checksums: hashing a 7B model and its optimizer on every save costs minutes.
MANIFEST = "manifest.json"


class CheckpointError(UserError, ValueError):
    """A checkpoint is incomplete, damaged or cannot be loaded; the message names the file."""
# The distributed optimizer's only format that re-shards across TP/PP as well as DP.
_OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def step_dir(root: Path, step: int) -> Path:
    """Where the checkpoint of ``step`` lives under ``root``."""
    return root / f"step_{step:06d}"


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _ensure_optimizer_state(optimizer) -> None:
    """Give every parameter without Adam state the state Adam starts from (zeros, step 0).

    A fresh torch Adam has no state until its first step, and Megatron's distributed optimizer
    (without TE/Apex) reads the step count out of that state when it describes what to load;
    the placeholder is dropped again before the loaded state goes in.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                if not inner.state[p]:
                    inner.state[p].update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p.data),
                                          exp_avg_sq=torch.zeros_like(p.data))


def _is_distributed(opt) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return isinstance(opt, DistributedOptimizer)


def _restore_zero_step(sd) -> None:
    """megatron-core saves the Adam step shared by all parameters only when it is non-zero (``if step:``),
    so a checkpoint taken before the first update (every step so far skipped) has none: its step is 0."""
    if isinstance(sd, list):
        for v in sd:
            _restore_zero_step(v)
        return
    if not isinstance(sd, dict):
        return
    st = sd.get("state")
    if (isinstance(st, dict) and "common_step" not in st
            and any(isinstance(v, dict) and "exp_avg" in v and "step" not in v for v in st.values())):
        st["common_step"] = torch.tensor(0.0)
    for v in sd.values():
        if isinstance(v, dict | list):
            _restore_zero_step(v)


def _tolerate_missing_step(opt) -> None:
    """Work around megatron-core's fully-reshardable load with torch Adam (no TE/Apex).

    Its loader sets each parameter's Adam ``step`` from the param groups, then copies *every*
    state key from the checkpoint's per-parameter tensors, which never hold ``step`` (it skips
    them on purpose): a KeyError. Supplying the step it has just set makes that copy a no-op.
    """
    setter = getattr(opt, "_set_main_param_and_optimizer_states", None)
    if setter is None or getattr(setter, "_igrpo_tolerant", False):
        return

    def tolerant(model_param, tensors):
        group_index, group_order = opt.model_param_group_index_map[model_param]
        main_param = opt.optimizer.param_groups[group_index]["params"][group_order]
        current = opt.optimizer.state[main_param]
        if "step" in current and "step" not in tensors:
            tensors = {**tensors, "step": current["step"]}
        return setter(model_param, tensors)

    tolerant._igrpo_tolerant = True
    opt._set_main_param_and_optimizer_states = tolerant


def _unshare_adam_steps(optimizer) -> None:
    """Give each parameter its own Adam ``step`` tensor.

    megatron-core's distributed optimizer (torch Adam path) loads one step tensor into every
    parameter's state; torch Adam increments it in place per parameter, so a shared tensor would
    count N steps per optimizer step and skew the bias correction after a resume.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for st in opt.optimizer.state.values():
            if torch.is_tensor(st.get("step")):
                st["step"] = st["step"].clone()


def _full_sharded_state(chunks, optimizer, is_loading: bool) -> dict:
    # Also before a save: a run stopped before its first optimizer update (every step so far had
    # uniform groups) must still save Adam state, or its checkpoint could not be loaded. The zeros
    # and step 0 are exactly what torch Adam would create at its first step.
    _ensure_optimizer_state(optimizer)
    model_sd = _model_sharded_state_dict(chunks)
    state = dict(model_sd)
    state["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=_OPTIM_METADATA)
    return state


def is_complete(path: Path) -> bool:
    """A checkpoint directory that a finished save left behind (not a .tmp leftover)."""
    return (path.is_dir() and not path.name.endswith(".tmp") and (path / "metadata.json").exists()
            and (path / TRAINER_STATE).exists())


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Raise :class:`CheckpointError` naming the file when ``path`` is not a complete, undamaged checkpoint.

    Every file listed in the manifest must exist with the size it was saved with. (Checkpoints saved
    before manifests existed are checked for their metadata and trainer state only.)
    """
    path = Path(path)
    if not is_complete(path):
        raise CheckpointError(f"{path} is not a complete checkpoint (missing metadata.json or {TRAINER_STATE}); "
                              "point checkpoint.resume at another one, or use checkpoint.resume=none")
    manifest = path / MANIFEST
    if not manifest.exists():
        return
    try:
        sizes = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{manifest}: unreadable manifest ({exc}); the checkpoint is damaged") from None
    for name, size in sorted(sizes.items()):
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f}: missing from the checkpoint (listed in {MANIFEST}); the checkpoint is "
                                  "damaged: resume from another one")
        if f.stat().st_size != size:
            raise CheckpointError(f"{f}: {f.stat().st_size} bytes, but it was saved with {size} (truncated or "
                                  "overwritten); the checkpoint is damaged: resume from another one")


def _write_manifest(directory: Path) -> None:
    files = {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file()}
    write_text(directory / MANIFEST, json.dumps({"files": files}, indent=1))


def find_latest(root: str | os.PathLike) -> Path | None:
    """The newest complete, undamaged checkpoint under ``root``: the ``latest`` pointer, else a scan.

    A damaged checkpoint (see :func:`verify_checkpoint`) is skipped with a warning that says which
    one is used instead, so a requeued job resumes from the one before rather than failing forever.
    """
    root = Path(root)
    pointer = root / LATEST
    candidates = sorted((p for p in root.glob("step_*") if is_complete(p)), key=lambda p: p.name, reverse=True)
    if pointer.exists():
        named = root / pointer.read_text().strip()
        if is_complete(named):
            candidates = [named] + [p for p in candidates if p != named]
        else:
            logger.warning("%s points at %s, which is incomplete; scanning %s", pointer, named, root)
    damaged = []
    for candidate in candidates:
        try:
            verify_checkpoint(candidate)
        except CheckpointError as exc:
            logger.warning("skipping a damaged checkpoint: %s", exc)
            damaged.append(candidate.name)
            continue
        if damaged:
            logger.warning("resuming from %s instead of the damaged %s", candidate, ", ".join(damaged))
        return candidate
    return None


def save_training_checkpoint(root: str | os.PathLike, step: int, chunks: list[torch.nn.Module], optimizer,
                             trainer_state: dict, recipe_yaml: str, keep_last: int = 0) -> Path:
    """Save everything needed to continue at ``step`` (collective). Atomic: temp dir, rename, pointer."""
    root = Path(root)
    final = step_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    rank0 = _is_rank0()
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)  # empty: dist_checkpointing warns about (and overwrites) anything in it
    _barrier()
    try:
        dist_checkpointing.save(_full_sharded_state(chunks, optimizer, is_loading=False), str(tmp))
    except BaseException:
        if rank0:  # a save that failed part-way (disk full) must not keep holding the space it took
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _barrier()
    if rank0:
        (tmp / "rng").mkdir()
    _barrier()
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.save(_rng_state(), tmp / "rng" / f"rank_{rank:05d}.pt")
    _barrier()
    if rank0:
        world = dist.get_world_size() if dist.is_initialized() else 1
        torch.save({**trainer_state, "step": step, "world_size": world}, tmp / TRAINER_STATE)
        (tmp / "recipe.yaml").write_text(recipe_yaml)
        _write_manifest(tmp)  # last: lists what the finished save holds
        replace_directory(tmp, final)
        write_text(root / LATEST, final.name)  # updated last: a crash before here keeps the old one
        _prune(root, keep_last)
    _barrier()
    logger.info("saved checkpoint %s", final)
    return final


SAVE_ERRORS = (OSError, CheckpointingException, TorchCheckpointException)  # what a failed write raises


def storage_problem(directory: str | os.PathLike, need_bytes: int = 0) -> str | None:
    """Why files cannot be saved in ``directory`` now (None: they can): it cannot be created or written
    (read-only, permissions, disk full), or it has less free space than ``need_bytes``."""
    directory = Path(directory)
    probe = directory / f".write_probe.{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as fh:
            fh.write(b"\0" * 4096)  # a real block: a full disk refuses it, an empty file might pass
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        return f"cannot write in {directory}: {exc.strerror or exc}"
    finally:
        with contextlib.suppress(OSError):  # a read-only directory refuses even the unlink of a missing file
            probe.unlink()
    free = shutil.disk_usage(directory).free
    if free < need_bytes:
        return f"{directory} has {free / 2**20:.1f} MiB free; the last checkpoint took {need_bytes / 2**20:.1f} MiB"
    return None


def checkpoint_bytes(root: str | os.PathLike) -> int:
    """Size of the newest complete checkpoint under ``root`` (0 when there is none): what the next save needs."""
    complete = sorted((p for p in Path(root).glob("step_*") if is_complete(p)), key=lambda p: p.name)
    return sum(f.stat().st_size for f in complete[-1].rglob("*") if f.is_file()) if complete else 0


def _prune(root: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    complete = sorted((p for p in root.glob("step_*") if is_complete(p)), key=lambda p: p.name)
    for old in complete[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def load_training_checkpoint(path: str | os.PathLike, chunks: list[torch.nn.Module], optimizer) -> dict:
    """Restore model and optimizer (any TP/PP/DP layout) and return the trainer state.

    RNG states are restored only when the world size matches the one that saved them; after a
    layout change they cannot correspond rank for rank (the loop derives its sampling seeds
    from the step, so that does not change what is sampled).
    """
    path = Path(path)
    verify_checkpoint(path)
    try:
        state = dist_checkpointing.load(_full_sharded_state(chunks, optimizer, is_loading=True), str(path))
        trainer_state = torch.load(path / TRAINER_STATE, weights_only=False)
    except (OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError, CheckpointingException) as exc:
        logger.debug("loading %s failed", path, exc_info=True)
        raise CheckpointError(f"{path}: cannot load it ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                              "if the model or layout in the recipe changed, resume with the recipe that saved it "
                              f"({path / 'recipe.yaml'}); otherwise the checkpoint is damaged: resume from another one"
                              ) from exc
    if len(chunks) == 1:
        unwrap(chunks[0]).load_state_dict(state[_MODEL_KEY], strict=True)
    else:
        for i, c in enumerate(chunks):
            unwrap(c).load_state_dict(state[f"{_MODEL_KEY}{i}"], strict=True)
    # Megatron's distributed optimizer allocates state itself while loading; drop the placeholder.
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        opt.optimizer.state.clear()
        _tolerate_missing_step(opt)
    if not any(_is_distributed(opt) for opt in getattr(optimizer, "chained_optimizers", [optimizer])):
        _restore_zero_step(state["optimizer"])
    optimizer.load_state_dict(state["optimizer"])
    _unshare_adam_steps(optimizer)
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    rng_file = path / "rng" / f"rank_{rank:05d}.pt"
    if trainer_state.get("world_size") == world and rng_file.exists():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    logger.info("resumed from %s (step %d)", path, trainer_state["step"])
    return trainer_state
