"""``igrpo plan``: what a run checks before it touches a GPU, and what it will cost.

:func:`make_plan` runs every check the real run would make before building a model (parallel layout
against the model and the world size, data and evaluation files, tokenizer and checkpoint paths,
FP8 rules, the sidecar against its model, memory per GPU against ``cluster.gpu_memory_gb``) and
the arithmetic of :mod:`igrpo_megatron.config.sizing`; :func:`check_plan` raises :class:`PlanError`
listing every problem, each naming its key; :func:`format_plan` is the report ``igrpo plan`` prints.
The training loop calls :func:`check_plan` first thing in ``setup`` and ``launchers/submit.py``
before ``sbatch``, so a recipe that cannot start fails in seconds, not after the model is built.
Pure arithmetic and file-system look-ups over the recipe: nothing here imports torch.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from igrpo_megatron.config.errors import UserError
from igrpo_megatron.config.evaluation import EVAL_DATA_DIR_ENV, benchmark_kind, known_benchmarks
from igrpo_megatron.config.layout import layout_errors, micro_batch_pad_multiple
from igrpo_megatron.config.schema import RecipeConfig
from igrpo_megatron.config.sizing import (
    GIB,
    RECOMPUTE_MODES,
    ActivationMemory,
    ParamCount,
    StateMemory,
    activation_memory,
    count_parameters,
    kv_bytes_per_token,
    layer_kinds,
    mamba_heads,
    mamba_state_bytes_per_sequence,
    param_bytes,
    parameters_per_rank,
    state_memory,
)

TRAINER_RESERVE_GIB = 4.0  # CUDA context, NCCL buffers, allocator fragmentation, TE workspaces (estimate)
SIDECAR_RESERVE_GIB = 2.0  # vLLM's forward-pass activations and CUDA graphs outside the KV cache (estimate)
VLLM_DEFAULT_UTILIZATION = 0.9
FP8_DIM_MULTIPLE = 16  # Transformer Engine's FP8 GEMMs need both matrix dimensions divisible by 16


class PlanError(UserError, ValueError):
    """The recipe cannot run as planned (layout, files, memory); the message names every key at fault."""


@dataclass
class SidecarPlan:
    """The vLLM sidecar: its GPUs and, on GPUs, its weights and KV-cache budget per GPU."""

    gpus: int
    external: bool
    max_model_len: int
    weights_gib: float | None = None
    kv_cache_gib: float | None = None
    kv_tokens: int | None = None
    full_length_sequences: int | None = None  # max_model_len-long sequences one replica holds at once
    stage_one_requests: int = 0  # sequences one replica is asked for at once by a step's first stage


@dataclass
class Plan:
    """Everything ``igrpo plan`` reports; ``errors`` empty means the recipe can start."""

    world_size: int
    data_parallel: int
    params: ParamCount
    params_per_rank: list[int]
    state_per_rank: list[StateMemory]
    activations: dict[str, ActivationMemory]
    recompute: str
    micro_batch_tokens: int
    longest_sequence: int
    trainer_budget_gib: float | None
    samples_per_step: int
    trained_sequences_per_step: int
    generated_tokens_max: int
    trained_tokens_max: int
    budget: str
    budget_matched: bool
    sidecar: SidecarPlan | None = None
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def peak_gib(self, recompute: str | None = None) -> float:
        """Largest trainer memory of one GPU over the pipeline ranks (GiB)."""
        acts = self.activations[recompute or self.recompute].per_rank
        return max(s.total + a for s, a in zip(self.state_per_rank, acts, strict=True)) / GIB


def recipe_recompute(recipe: RecipeConfig) -> str:
    """The recipe's activation recomputation: ``model.recompute_granularity``, 'none' when null."""
    return recipe.model.recompute_granularity or "none"


def full_recompute_shape(recipe: RecipeConfig) -> tuple[str, int]:
    """(method, layers) the 'full' row is sized with: the recipe's own when it recomputes fully,
    otherwise uniform over single layers (every layer recomputed: the least memory)."""
    m = recipe.model
    if m.recompute_granularity == "full" and m.recompute_method and m.recompute_num_layers:
        return m.recompute_method, m.recompute_num_layers
    return "uniform", 1


def make_plan(recipe: RecipeConfig, world_size: int | None = None, *, check_files: bool = True) -> Plan:
    """Check and size ``recipe``; ``world_size`` defaults to cluster.nodes x cluster.gpus_per_node."""
    m, p, c, t = recipe.model, recipe.parallel, recipe.cluster, recipe.trainer
    world = world_size if world_size is not None else c.nodes * c.gpus_per_node
    errors = layout_errors(m, p, world)
    model_parallel = p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size
    dp = max(world // max(model_parallel, 1), 1)
    if p.context_parallel_size > 1:
        errors.append("parallel.context_parallel_size > 1 is not supported by the RL step (log-probs would need "
                      "the CP-split sequence); set it to 1 and use TP/PP/DP.")
    longest = recipe.data.max_prompt_length + recipe.rollout.sampling.max_tokens
    pad = micro_batch_pad_multiple(m, p)  # sequence parallelism / FP8 pad each micro-batch's length
    tokens = max(t.micro_batch_tokens, -(-longest // pad) * pad)
    sizable = not errors  # a layout that cannot work has no per-GPU sizes (and may divide by zero)
    stages = max(p.pipeline_model_parallel_size, 1)
    per_rank = parameters_per_rank(m, p) if sizable else [0] * stages
    reference = recipe.algorithm.loss.kl.coef > 0
    states = [state_memory(n, m.params_dtype, dp, p.use_distributed_optimizer, reference) for n in per_rank]
    method, layers = full_recompute_shape(recipe)
    acts = {mode: activation_memory(m, p, tokens, longest, mode, recompute_method=method,
                                    recompute_num_layers=layers) if sizable
            else ActivationMemory(mode, tokens, [0] * stages) for mode in RECOMPUTE_MODES}
    plan = Plan(world_size=world, data_parallel=dp, params=count_parameters(m), params_per_rank=per_rank,
                state_per_rank=states, activations=acts, recompute=recipe_recompute(recipe),
                micro_batch_tokens=tokens, longest_sequence=longest, trainer_budget_gib=None,
                errors=errors, **_rollout_numbers(recipe, longest))
    if not plan.budget_matched:
        plan.warnings.append(f"the GRPO and iGRPO completion budgets differ ({plan.budget}): the comparison is not "
                             "at a matched budget (the paper's is GRPO G = N + G of iGRPO).")
    if t.micro_batch_tokens < longest:
        plan.warnings.append(f"trainer.micro_batch_tokens = {t.micro_batch_tokens} is below the longest sequence "
                             f"(data.max_prompt_length + rollout.sampling.max_tokens = {longest}); such sequences "
                             f"get a micro-batch of their own, so activations are sized for {longest} tokens.")
    if check_files:
        plan.errors += file_errors(recipe)
    plan.errors += fp8_errors(recipe, plan.warnings)
    judged = {*recipe.reward.weights, *(recipe.reward.draft_weights or {})}
    if "judge" in judged:
        plan.warnings.append(f"the reward uses the generative judge at reward.judge.url = {recipe.reward.judge.url}; "
                             "the launchers do not start it: it must be serving before the run starts.")
    plan.sidecar = _sidecar(recipe, plan)
    _memory_fit(recipe, plan)
    return plan


def check_plan(recipe: RecipeConfig, world_size: int | None = None, *, check_files: bool = True) -> Plan:
    """:func:`make_plan`, raising :class:`PlanError` with every problem when the recipe cannot run."""
    plan = make_plan(recipe, world_size, check_files=check_files)
    if plan.errors:
        raise PlanError("the recipe cannot run as planned:\n" + "\n".join(f"  - {e}" for e in plan.errors))
    return plan


# ----------------------------------------------------------------------------------------- rollout
def _rollout_numbers(recipe: RecipeConfig, longest: int) -> dict[str, object]:
    a, prompts, max_tokens = recipe.algorithm, recipe.trainer.prompts_per_step, recipe.rollout.sampling.max_tokens
    ig = a.igrpo
    igrpo_total = ig.completions_per_prompt()
    if ig.enabled:
        per_prompt, grpo_g = igrpo_total, ig.grpo_equivalent_budget
        trained = ig.num_refinements * (ig.num_rounds if ig.train_on_rounds == "all" else 1)
        budget = (f"iGRPO N + K x G = {ig.num_drafts} + {ig.num_rounds} x {ig.num_refinements} = {igrpo_total} "
                  f"completions per prompt; GRPO budget algorithm.igrpo.grpo_equivalent_budget = {grpo_g}")
    else:
        per_prompt = trained = grpo_g = a.group_size
        budget = (f"GRPO G = {grpo_g} completions per prompt (algorithm.group_size); the iGRPO settings "
                  f"beside it (algorithm.igrpo) spend N + K x G = {igrpo_total}")
    matched = igrpo_total == grpo_g
    return dict(samples_per_step=prompts * per_prompt, trained_sequences_per_step=prompts * trained,
                generated_tokens_max=prompts * per_prompt * max_tokens, trained_tokens_max=prompts * trained * longest,
                budget=f"{budget}: {'matched' if matched else 'NOT matched'}", budget_matched=matched)


# ------------------------------------------------------------------------------------------- files
def _need(errors: list[str], key: str, value: str, kind: str, contains: tuple[str, ...] = ()) -> None:
    path = Path(value).expanduser()
    if kind == "file" and not path.is_file():
        errors.append(f"{key} = {value!r}: file not found; check the path.")
    elif kind == "dir" and not path.is_dir():
        errors.append(f"{key} = {value!r}: directory not found; check the path.")
    elif contains and not any((path / name).is_file() for name in contains):
        errors.append(f"{key} = {value!r} has no {' or '.join(contains)}; point it at a Hugging Face "
                      "checkpoint or tokenizer directory.")


def file_errors(recipe: RecipeConfig) -> list[str]:
    """Data, tokenizer, checkpoint and evaluation files the run reads before its first step."""
    d, m, s, errs = recipe.data, recipe.model, recipe.rollout.server, []
    if d.train_path:
        _need(errs, "data.train_path", d.train_path, "file")
    elif not d.synthetic_task:
        errs.append("data.train_path is null and data.synthetic_task is null: set data.train_path to the "
                    "training prompts (JSONL/Parquet).")
    if d.eval_path:
        _need(errs, "data.eval_path", d.eval_path, "file")
    if m.hf_path:
        _need(errs, "model.hf_path", m.hf_path, "dir", ("config.json",))
    if s.model_path:
        _need(errs, "rollout.server.model_path", s.model_path, "dir", ("config.json",))
    tokenizer_key = "data.tokenizer_path" if d.tokenizer_path else "model.hf_path"
    tokenizer = d.tokenizer_path or m.hf_path
    if tokenizer and Path(tokenizer).expanduser().is_dir():
        _need(errs, tokenizer_key, tokenizer, "dir", ("tokenizer.json", "tokenizer_config.json"))
    elif d.tokenizer_path:
        _need(errs, "data.tokenizer_path", d.tokenizer_path, "dir")
    elif not tokenizer and not d.synthetic_task:
        errs.append("no tokenizer: set data.tokenizer_path or model.hf_path.")
    warm = recipe.trainer.warmstart.enabled
    if warm and not d.synthetic_task:
        errs.append("trainer.warmstart.enabled needs data.synthetic_task (it trains on the task's worked "
                    "solutions); set it to false.")
    if s.url is None and not (s.model_path or m.hf_path or warm):
        errs.append("the sidecar has no weights to start from: set model.hf_path (or rollout.server.model_path), "
                    "or enable trainer.warmstart for a synthetic task.")
    if recipe.trainer.eval_every > 0:
        errs += benchmark_errors(recipe)
    return errs


def benchmark_errors(recipe: RecipeConfig) -> list[str]:
    """Whether every benchmark of the in-training evaluation hook can be found (looked up as
    ``evaluation.benchmarks.resolve_spec`` does, through ``benchmark_kind``)."""
    ev, d, errs = recipe.evaluation, recipe.data, []
    hook = f"trainer.eval_every = {recipe.trainer.eval_every} runs evaluation.hook.benchmarks"
    for name in ev.hook.benchmarks:
        kind = benchmark_kind(name, ev.datasets)
        if kind == "dataset":
            path = ev.datasets[name].get("path")
            if isinstance(path, str):
                _need(errs, f"evaluation.datasets.{name}.path", path, "file")
        elif kind == "builtin":
            data_dir = ev.data_dir or os.environ.get(EVAL_DATA_DIR_ENV)
            if not data_dir:
                errs.append(f"{hook} with built-in {name!r}, read from evaluation.data_dir, which is null (and "
                            f"${EVAL_DATA_DIR_ENV} is unset): set evaluation.data_dir=DIR (`igrpo data fetch "
                            f"{name} --to DIR` writes it), name other benchmarks, or set trainer.eval_every=0.")
            else:
                _need(errs, "evaluation.data_dir" if ev.data_dir else f"${EVAL_DATA_DIR_ENV}",
                      str(Path(data_dir) / f"{name}.jsonl"), "file")
        elif kind == "heldout":
            if not d.eval_path and not d.synthetic_task:
                errs.append(f"{hook} = {list(ev.hook.benchmarks)}; 'heldout' reads data.eval_path, which is null: "
                            "set data.eval_path to the held-out prompts (JSONL/Parquet), name other benchmarks "
                            "in evaluation.hook.benchmarks, or set trainer.eval_every=0.")
        elif kind == "file":
            _need(errs, "evaluation.hook.benchmarks", name, "file")
        else:
            errs.append(f"evaluation.hook.benchmarks: unknown benchmark {name!r}; use one of "
                        f"{known_benchmarks(ev.datasets)} or a .jsonl/.parquet path.")
    return errs


# ---------------------------------------------------------------------------------------------- FP8
def fp8_errors(recipe: RecipeConfig, warnings: list[str]) -> list[str]:
    """FP8 rules beyond ``ModelConfig.errors`` (which checks the dtype and the Nemotron-H recipe)."""
    m, tp = recipe.model, recipe.parallel.tensor_model_parallel_size
    if not m.fp8:
        return []
    errs = []
    if m.transformer_impl == "local":
        errs.append(f"model.fp8 = {m.fp8!r} runs through Transformer Engine; model.transformer_impl = 'local' has "
                    "no FP8 path: set it to 'auto' or 'transformer_engine', or model.fp8=null.")
    dims = {"model.hidden_size": m.hidden_size}
    if any(k in ("T", "-") for k in layer_kinds(m)):
        dims["model.ffn_hidden_size / TP"] = m.ffn_hidden_size // tp
    if m.architecture == "nemotron_h":
        nh = mamba_heads(m)
        dims["Mamba in_proj width (2*di + 2*groups*state + heads)"] = (
            2 * nh * m.mamba_head_dim + 2 * m.mamba_num_groups * m.mamba_state_dim + nh)
    for key, value in dims.items():
        if value % FP8_DIM_MULTIPLE:
            errs.append(f"model.fp8 needs {key} = {value} divisible by {FP8_DIM_MULTIPLE}; change the size or "
                        "set model.fp8=null.")
    if recipe.cluster.gpu_memory_gb is None:
        warnings.append("model.fp8 is set but cluster.gpu_memory_gb is null: FP8 needs GPUs with Transformer Engine.")
    if m.fp8 == "mxfp8":
        warnings.append("model.fp8 = 'mxfp8' needs Blackwell GPUs (B200/GB200); H100/H200 support the others.")
    return errs


# ------------------------------------------------------------------------------------------ sidecar
def _sidecar(recipe: RecipeConfig, plan: Plan) -> SidecarPlan:
    m, s, c = recipe.model, recipe.rollout.server, recipe.cluster
    model_len = s.max_model_len or m.max_position_embeddings
    rtp = s.tensor_parallel_size
    side = SidecarPlan(gpus=rtp * s.data_parallel_size, external=s.url is not None, max_model_len=model_len)
    errs = plan.errors
    if model_len < plan.longest_sequence:
        errs.append(f"rollout.server.max_model_len = {model_len} is below data.max_prompt_length + "
                    f"rollout.sampling.max_tokens = {plan.longest_sequence}: raise it.")
    if model_len > m.max_position_embeddings:
        errs.append(f"rollout.server.max_model_len = {model_len} exceeds model.max_position_embeddings = "
                    f"{m.max_position_embeddings}: lower it.")
    kinds = set(layer_kinds(m))
    if kinds & {"T", "*"} and (m.num_attention_heads % rtp or (m.num_query_groups % rtp and rtp % m.num_query_groups)):
        errs.append(f"rollout.server.tensor_parallel_size = {rtp} must divide model.num_attention_heads = "
                    f"{m.num_attention_heads} and divide or be a multiple of model.num_query_groups = "
                    f"{m.num_query_groups} (vLLM's rule).")
    if "M" in kinds and (mamba_heads(m) % rtp or m.mamba_num_groups % rtp):
        errs.append(f"rollout.server.tensor_parallel_size = {rtp} must divide the Mamba heads ({mamba_heads(m)}) "
                    f"and model.mamba_num_groups = {m.mamba_num_groups}.")
    ig = recipe.algorithm.igrpo
    first_stage = ig.num_drafts if ig.enabled else recipe.algorithm.group_size
    side.stage_one_requests = math.ceil(recipe.trainer.prompts_per_step * first_stage / s.data_parallel_size)
    if side.external:
        return side
    available = c.rollout_nodes * c.gpus_per_node if c.rollout_nodes > 0 else c.gpus_per_node
    where = ("cluster.rollout_nodes x cluster.gpus_per_node" if c.rollout_nodes > 0
             else "cluster.gpus_per_node (sidecar on the trainer's first node)")
    if side.gpus > available:
        errs.append(f"rollout.server.tensor_parallel_size x data_parallel_size = {side.gpus} GPUs, more than "
                    f"{where} = {available}: lower one or add rollout nodes.")
    elif c.rollout_nodes > 0 and side.gpus < available:
        plan.warnings.append(f"the sidecar uses {side.gpus} of its {available} GPUs (rollout.server."
                             "tensor_parallel_size x data_parallel_size); raise data_parallel_size to use them.")
    if c.gpu_memory_gb is not None:
        _sidecar_memory(recipe, plan, side)
    return side


def _sidecar_memory(recipe: RecipeConfig, plan: Plan, side: SidecarPlan) -> None:
    m, s, gpu = recipe.model, recipe.rollout.server, recipe.cluster.gpu_memory_gb
    util = s.gpu_memory_utilization or VLLM_DEFAULT_UTILIZATION
    b = param_bytes(m.params_dtype if s.dtype == "auto" else s.dtype)
    rtp = s.tensor_parallel_size
    weights = plan.params.total * b / rtp
    kv = gpu * util * GIB - SIDECAR_RESERVE_GIB * GIB - weights
    side.weights_gib, side.kv_cache_gib = weights / GIB, max(kv, 0) / GIB
    per_token = kv_bytes_per_token(m, rtp, b)
    per_sequence = side.max_model_len * per_token + mamba_state_bytes_per_sequence(m, rtp, b)
    if kv <= 0:
        plan.errors.append(f"the sidecar's weights ({weights / GIB:.1f} GiB per GPU at rollout.server.tensor_parallel_"
                           f"size = {rtp}) leave no KV cache in rollout.server.gpu_memory_utilization ({util}) x "
                           f"cluster.gpu_memory_gb ({gpu}) less {SIDECAR_RESERVE_GIB} GiB: raise the TP size or "
                           "the utilization.")
        return
    side.kv_tokens = int(kv // per_token) if per_token else None
    side.full_length_sequences = int(kv // per_sequence) if per_sequence else None
    if side.full_length_sequences is not None and side.full_length_sequences < 1:
        plan.errors.append(f"the sidecar's KV cache ({kv / GIB:.1f} GiB) cannot hold one sequence of "
                           f"rollout.server.max_model_len = {side.max_model_len}: lower it or raise the TP size.")
    elif side.full_length_sequences is not None and side.full_length_sequences < side.stage_one_requests:
        plan.warnings.append(f"a replica holds {side.full_length_sequences} full-length sequences at once and a step's "
                             f"first stage asks it for {side.stage_one_requests}: vLLM queues (or pre-empts) the "
                             "rest, slower but correct.")


# ------------------------------------------------------------------------------------------- memory
def _memory_fit(recipe: RecipeConfig, plan: Plan) -> None:
    c, s = recipe.cluster, recipe.rollout.server
    if c.gpu_memory_gb is None or not any(plan.params_per_rank):
        return
    budget = c.gpu_memory_gb
    colocated = c.rollout_nodes == 0 and s.url is None
    if colocated:
        budget *= 1 - (s.gpu_memory_utilization or VLLM_DEFAULT_UTILIZATION)
    plan.trainer_budget_gib = budget - TRAINER_RESERVE_GIB
    peak = plan.peak_gib()
    if peak <= plan.trainer_budget_gib:
        return
    others = ", ".join(f"{mode}: {plan.peak_gib(mode):.1f} GiB" for mode in RECOMPUTE_MODES if mode != plan.recompute)
    plan.errors.append(
        f"estimated trainer memory per GPU {peak:.1f} GiB exceeds cluster.gpu_memory_gb = {c.gpu_memory_gb} less a "
        f"{TRAINER_RESERVE_GIB:.0f} GiB reserve" + (" and the colocated sidecar's rollout.server.gpu_memory_utilization"
                                                   if colocated else "")
        + f" ({plan.trainer_budget_gib:.1f} GiB): lower trainer.micro_batch_tokens (now {plan.micro_batch_tokens}, "
        f"not below the longest sequence {plan.longest_sequence}), raise parallel.tensor_model_parallel_size or "
        f"parallel.pipeline_model_parallel_size, " + _sequence_parallel_hint(recipe, plan)
        + f"or recompute activations with model.recompute_granularity (peak with {others}).")


def _sequence_parallel_hint(recipe: RecipeConfig, plan: Plan) -> str:
    """'set parallel.sequence_parallel=true (peak N GiB), ' when TP > 1 and it is off; '' otherwise."""
    m, p = recipe.model, recipe.parallel
    if p.sequence_parallel or p.tensor_model_parallel_size < 2:
        return ""
    method, layers = full_recompute_shape(recipe)
    acts = activation_memory(m, p, plan.micro_batch_tokens, plan.longest_sequence, plan.recompute,
                             sequence_parallel=True, recompute_method=method, recompute_num_layers=layers)
    peak = max(s.total + a for s, a in zip(plan.state_per_rank, acts.per_rank, strict=True)) / GIB
    return f"set parallel.sequence_parallel=true (peak {peak:.1f} GiB), "


# ------------------------------------------------------------------------------------------- report
def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def format_plan(plan: Plan, recipe: RecipeConfig) -> str:
    """The report ``igrpo plan`` prints."""
    p, m = recipe.parallel, recipe.model
    lines = [f"model: {m.architecture}, {m.num_layers} layers, hidden {m.hidden_size}, vocabulary {m.vocab_size}",
             f"parameters: {plan.params.total / 1e9:.3f} B"]
    lines += [f"  {name:<10} {n:>15,}" for name, n in plan.params.as_dict().items() if name != "total"]
    lines.append(f"layout: world {plan.world_size} = TP {p.tensor_model_parallel_size} x PP "
                 f"{p.pipeline_model_parallel_size} x CP {p.context_parallel_size} x DP {plan.data_parallel}"
                 f" (sequence parallel {'on' if p.sequence_parallel else 'off'}, distributed optimizer "
                 f"{'on' if p.use_distributed_optimizer else 'off'})")
    worst = max(range(len(plan.state_per_rank)), key=lambda i: plan.state_per_rank[i].total)
    st = plan.state_per_rank[worst]
    lines.append(f"trainer memory per GPU (pipeline rank {worst}, {plan.params_per_rank[worst]:,} parameters):")
    lines.append(f"  weights {_gib(st.weights)}, gradients {_gib(st.gradients)}, optimizer {_gib(st.optimizer)}"
                 + (f", KL reference {_gib(st.reference)}" if st.reference else ""))
    lines.append(f"  activations at {plan.micro_batch_tokens} tokens per micro-batch (longest sequence "
                 f"{plan.longest_sequence}):")
    method, layers = full_recompute_shape(recipe)
    for mode in RECOMPUTE_MODES:
        mark = "  <- this recipe (model.recompute_granularity)" if mode == plan.recompute else ""
        shape = f" ({method}, {layers} layer{'s' if layers > 1 else ''})" if mode == "full" else ""
        lines.append(f"    recompute {mode:<9} activations {_gib(plan.activations[mode].peak)}, "
                     f"peak {plan.peak_gib(mode):.1f} GiB{shape}{mark}")
    if plan.trainer_budget_gib is not None:
        lines.append(f"  budget per GPU: {plan.trainer_budget_gib:.1f} GiB (cluster.gpu_memory_gb "
                     f"{recipe.cluster.gpu_memory_gb} less reserves)")
    lines += _sidecar_lines(plan.sidecar, recipe)
    lines.append(f"rollout per step: {recipe.trainer.prompts_per_step} prompts, {plan.samples_per_step} samples "
                 f"(<= {plan.generated_tokens_max:,} generated tokens), {plan.trained_sequences_per_step} trained "
                 f"sequences (<= {plan.trained_tokens_max:,} tokens)")
    if recipe.algorithm.dynamic_sampling.enabled:  # each extra round rolls out as many prompts again
        rounds = 1 + recipe.algorithm.dynamic_sampling.max_extra_rounds
        lines.append(f"  dynamic sampling: up to {rounds - 1} extra rounds, <= {rounds * plan.samples_per_step} "
                     f"samples (<= {rounds * plan.generated_tokens_max:,} generated tokens) per step")
    lines.append(f"budget: {plan.budget}")
    lines += [f"warning: {w}" for w in plan.warnings]
    lines += [f"error: {e}" for e in plan.errors]
    lines.append("plan: OK" if not plan.errors else f"plan: {len(plan.errors)} error(s)")
    return "\n".join(lines) + "\n"


def _sidecar_lines(side: SidecarPlan | None, recipe: RecipeConfig) -> list[str]:
    if side is None:
        return []
    s = recipe.rollout.server
    unit = "GPU(s)" if recipe.cluster.gpu_memory_gb is not None else "engine rank(s)"
    head = (f"sidecar: external server at {s.url}" if side.external else
            f"sidecar: {side.gpus} {unit} = TP {s.tensor_parallel_size} x DP {s.data_parallel_size}, "
            f"max_model_len {side.max_model_len}")
    if side.kv_cache_gib is None:
        extra = (f", CPU KV cache {s.kv_cache_space_gib} GiB" if s.kv_cache_space_gib and not side.external else "")
        return [head + extra]
    return [head, f"  per GPU: weights {side.weights_gib:.1f} GiB, KV cache {side.kv_cache_gib:.1f} GiB"
                  + (f" = {side.kv_tokens:,} tokens" if side.kv_tokens else "")
                  + f", {side.full_length_sequences} full-length sequences at once (a step's first stage asks "
                    f"a replica for {side.stage_one_requests})"]
