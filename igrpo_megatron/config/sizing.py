"""How big a recipe's model is and what one GPU holds for it: arithmetic over the recipe, no torch.

Parameter counts follow the modules ``igrpo_megatron.models`` builds on Megatron-Core:

* qwen2 layer: RMSNorm + QKV (h x (a*d + 2*g*d), bias a*d + 2*g*d when ``add_qkv_bias``) + output
  projection (a*d x h), RMSNorm + SwiGLU MLP (h x 2f, f x h), no other biases;
* nemotron_h layers: ``M`` = RMSNorm + Megatron's MambaMixer (in_proj h x (2*di + 2*ng*ds + nh),
  depthwise conv1d over di + 2*ng*ds channels with kernel 4 and bias, dt_bias, A_log and D of nh
  each, gated RMSNorm of di, out_proj di x h; di = nh * head_dim), ``*`` = RMSNorm + attention
  (no bias), ``-`` = RMSNorm + squared-ReLU MLP (h x f, f x h);
* input embedding V x h, final RMSNorm h, output layer V x h when untied.

Tensor parallelism splits every matrix, the QKV bias and the Mamba mixer's own parameters over TP;
the pre-layer RMSNorms and the final norm are replicated. Pipeline stages take equal runs of layers
(or the runs between ``|`` in a hybrid pattern); the first holds the embedding, the last the final
norm and output layer.

Memory of one trainer GPU (bytes), Megatron mixed precision as ``training/megatron_setup.py``
configures it (fp32 gradient buffers, ``grad_reduce_in_fp32=True``)::

    weights    = P_rank * b              b = 2 for bf16/fp16 parameters, 4 for fp32
    gradients  = P_rank * 4              fp32 main_grad buffers
    optimizer  = P_rank * (4 + 8) / d    fp32 main copy + Adam m and v (fp32 params: 8 / d, the
                                         parameter is its own main copy); d = DP with the
                                         distributed optimizer, else 1

so bf16 parameters cost 6 + 12/DP bytes each with the distributed optimizer and 18 without.
A KL reference model (``algorithm.loss.kl.coef > 0``) adds P_rank * b.

Activations (bf16, dropout 0 as RL recipes use) are counted per token and layer from what backward
keeps: the inputs of the RMSNorm and of the first linear of every block (4h bytes: replicated over
TP, divided by TP with sequence parallelism) and the TP-split tensors inside the block (attention:
q, k, v and the attention output; SwiGLU: fc1 output 2f and its product f; squared ReLU: fc1
output and activation; Mamba: in_proj output, conv output, scan output and gated-norm output).
Unfused attention (``transformer_impl: local``) also keeps the a x s scores and probabilities
(4 * a * s bytes per token); flash attention (Transformer Engine) does not. Recomputation:

* ``none``: every layer keeps all of the above;
* ``selective``: Megatron recomputes the core attention, dropping the scores term (no change with
  flash attention);
* ``full``: a recomputed layer keeps only its input (2h bytes per token, /TP with sequence
  parallelism). With ``recompute_method: uniform`` and k layers per run, each run of k keeps its
  input and backward needs one run's full activations at a time; with ``block`` and n layers, the
  first n layers of each model chunk are recomputed and the others keep everything.

Sequence parallelism splits the sequence over TP wherever the tensor is not TP-split, so only the
replicated inputs of the norms and blocks shrink (by TP); the TP-split tensors are unchanged.

Logits (bf16, [tokens, V/TP]) and their gradient add 4 * V / TP bytes per token on the last stage.
With FP8 (Transformer Engine) some saved inputs take 1 byte; the estimate counts bf16, an upper bound.
With the 1F1B pipeline schedule stage i holds up to PP - i micro-batches of activations.
These are estimates: allocator fragmentation, NCCL buffers and Transformer Engine workspaces are
not modelled (the plan keeps a fixed reserve for them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from igrpo_megatron.config.model import HYBRID_PIPE, ModelConfig, ParallelConfig

GIB = 1024**3
MAMBA_CONV_KERNEL = 4  # Megatron's MambaMixer d_conv
RECOMPUTE_MODES = ("none", "selective", "full")
_PARAM_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def param_bytes(dtype: str) -> int:
    """Bytes per element of a parameter/activation dtype name ('bfloat16' -> 2)."""
    return _PARAM_BYTES.get(dtype, 2)


# ------------------------------------------------------------------------------------------- params
@dataclass
class ParamCount:
    """Parameters by component (whole model, no parallelism)."""

    embedding: int = 0
    attention: int = 0
    mlp: int = 0
    mamba: int = 0
    norms: int = 0
    output: int = 0

    @property
    def total(self) -> int:
        return self.embedding + self.attention + self.mlp + self.mamba + self.norms + self.output

    def as_dict(self) -> dict[str, int]:
        return {"embedding": self.embedding, "attention": self.attention, "mlp": self.mlp,
                "mamba": self.mamba, "norms": self.norms, "output": self.output, "total": self.total}


def head_dim(model: ModelConfig) -> int:
    return model.kv_channels or model.hidden_size // model.num_attention_heads


def mamba_heads(model: ModelConfig) -> int:
    """Mamba2 heads: ``model.mamba_num_heads``, or Megatron's default 2 * hidden / head size."""
    return model.mamba_num_heads or 2 * model.hidden_size // model.mamba_head_dim


def layer_kinds(model: ModelConfig) -> list[str]:
    """One letter per layer: 'T' (qwen2 attention + MLP), or the hybrid pattern's 'M', '*', '-'."""
    if model.architecture == "nemotron_h":
        return list((model.hybrid_pattern or "").replace(HYBRID_PIPE, ""))
    return ["T"] * model.num_layers


def _mamba_dims(model: ModelConfig) -> tuple[int, int, int]:
    """(d_inner, conv channels, in_proj output width)."""
    nh = mamba_heads(model)
    d_inner = nh * model.mamba_head_dim
    groups_state = 2 * model.mamba_num_groups * model.mamba_state_dim
    return d_inner, d_inner + groups_state, 2 * d_inner + groups_state + nh


def _block_params(model: ModelConfig, kind: str) -> dict[str, int]:
    """Parameters of one block ('attention', 'mlp', 'mamba') without its pre-norm."""
    h, f = model.hidden_size, model.ffn_hidden_size
    if kind == "attention":
        d, a, g = head_dim(model), model.num_attention_heads, model.num_query_groups
        qkv = a * d + 2 * g * d
        bias = qkv if model.add_qkv_bias and model.architecture == "qwen2" else 0
        return {"attention": h * qkv + bias + a * d * h}
    if kind == "mlp":
        return {"mlp": (3 if model.architecture == "qwen2" else 2) * h * f}
    d_inner, conv, in_out = _mamba_dims(model)
    nh = mamba_heads(model)
    return {"mamba": h * in_out + conv * MAMBA_CONV_KERNEL + conv + 3 * nh + d_inner + d_inner * h}


_BLOCKS = {"T": ("attention", "mlp"), "*": ("attention",), "-": ("mlp",), "M": ("mamba",)}


def count_parameters(model: ModelConfig) -> ParamCount:
    """Parameters of the whole model by component (see the module docstring for what is counted)."""
    h, v = model.hidden_size, model.vocab_size
    out = ParamCount(embedding=v * h, norms=h, output=v * h if model.untie_embeddings_and_output_weights else 0)
    for kind in layer_kinds(model):
        for block in _BLOCKS.get(kind, ()):
            for name, n in _block_params(model, block).items():
                setattr(out, name, getattr(out, name) + n)
            out.norms += h
    return out


def _layer_params_per_rank(model: ModelConfig, kind: str, tp: int) -> float:
    blocks = _BLOCKS.get(kind, ())
    return sum(sum(_block_params(model, b).values()) for b in blocks) / tp + model.hidden_size * len(blocks)


def stage_chunks(model: ModelConfig, parallel: ParallelConfig) -> list[list[list[str]]]:
    """Layer kinds of each model chunk, by pipeline rank (virtual chunks r, r + PP, ... belong to rank r)."""
    pp = parallel.pipeline_model_parallel_size
    chunks_n = pp * (parallel.virtual_pipeline_model_parallel_size or 1)
    pattern = model.hybrid_pattern or ""
    if model.architecture == "nemotron_h" and HYBRID_PIPE in pattern:
        chunks = [list(part) for part in pattern.split(HYBRID_PIPE)]
    else:
        kinds = layer_kinds(model)
        size = -(-len(kinds) // chunks_n)
        chunks = [kinds[i * size:(i + 1) * size] for i in range(chunks_n)]
    return [chunks[r::pp] for r in range(pp)]


def stage_layers(model: ModelConfig, parallel: ParallelConfig) -> list[list[str]]:
    """Layer kinds of each pipeline rank (virtual chunks r, r + PP, ... belong to rank r)."""
    return [[k for c in chunks for k in c] for chunks in stage_chunks(model, parallel)]


def parameters_per_rank(model: ModelConfig, parallel: ParallelConfig) -> list[int]:
    """Parameters one GPU holds, per pipeline rank (TP-split matrices, replicated norms)."""
    tp = parallel.tensor_model_parallel_size
    h, v = model.hidden_size, model.vocab_size
    stages = stage_layers(model, parallel)
    out = []
    for i, kinds in enumerate(stages):
        n = sum(_layer_params_per_rank(model, k, tp) for k in kinds)
        if i == 0:
            n += v * h / tp
        if i == len(stages) - 1:
            n += h + (v * h / tp if model.untie_embeddings_and_output_weights or len(stages) > 1 else 0)
        out.append(int(n))
    return out


# ------------------------------------------------------------------------------------------- memory
@dataclass
class StateMemory:
    """Bytes one trainer GPU holds for weights, gradients and optimizer state (and a KL reference)."""

    weights: int
    gradients: int
    optimizer: int
    reference: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.reference


def state_memory(params_rank: int, params_dtype: str, data_parallel: int, distributed_optimizer: bool,
                 reference_model: bool = False) -> StateMemory:
    """Weights, fp32 gradients and Adam state of ``params_rank`` parameters (formula in the module doc)."""
    b = param_bytes(params_dtype)
    main_copy = 0 if b == 4 else 4
    shards = data_parallel if distributed_optimizer else 1
    return StateMemory(weights=params_rank * b, gradients=params_rank * 4,
                       optimizer=params_rank * (main_copy + 8) // max(shards, 1),
                       reference=params_rank * b if reference_model else 0)


def _split_bytes_per_token(model: ModelConfig, block: str, seq_len: int, recompute: str) -> int:
    """Bytes per token of the TP-split tensors a block keeps for backward (whole model width)."""
    f = model.ffn_hidden_size
    if block == "attention":
        d, a, g = head_dim(model), model.num_attention_heads, model.num_query_groups
        kept = 2 * (a * d + 2 * g * d) + 2 * a * d
        if model.transformer_impl == "local" and recompute == "none":
            kept += 4 * a * seq_len  # unfused scores and probabilities, bf16
        return kept
    if block == "mlp":
        return 6 * f if model.architecture == "qwen2" else 4 * f
    d_inner, conv, in_out = _mamba_dims(model)
    return 2 * in_out + 2 * conv + 2 * d_inner + 2 * d_inner


def layer_activation_bytes_per_token(model: ModelConfig, kind: str, tp: int, sequence_parallel: bool,
                                     seq_len: int, recompute: str = "none") -> float:
    """What one layer keeps for backward, per token of a micro-batch (module docstring)."""
    replicated_div = tp if sequence_parallel else 1
    blocks = _BLOCKS.get(kind, ())
    if recompute == "full":
        return 2 * model.hidden_size / replicated_div
    return sum(4 * model.hidden_size / replicated_div + _split_bytes_per_token(model, b, seq_len, recompute) / tp
               for b in blocks)


@dataclass
class ActivationMemory:
    """Peak activation bytes of one trainer GPU, by pipeline rank (max taken by the caller)."""

    recompute: str
    tokens: int
    per_rank: list[int] = field(default_factory=list)

    @property
    def peak(self) -> int:
        return max(self.per_rank) if self.per_rank else 0


def _full_recompute_bytes_per_token(model: ModelConfig, chunks: list[list[str]], tp: int, sp: bool, seq_len: int,
                                    method: str, num_layers: int) -> float:
    """What one pipeline rank keeps per token under full recomputation, Megatron's way per model chunk.

    'uniform' k: each run of k layers keeps its input; backward re-runs one run at a time, so the
    working set is the largest run's activations. 'block' n: the first n layers of each chunk keep only
    their input, the rest keep everything; the working set is one recomputed layer.
    """
    def keep(kind: str, mode: str) -> float:
        return layer_activation_bytes_per_token(model, kind, tp, sp, seq_len, mode)

    kept, working = 0.0, 0.0
    for kinds in chunks:
        if method == "uniform":
            runs = [kinds[i:i + num_layers] for i in range(0, len(kinds), num_layers)]
            kept += sum(keep(run[0], "full") for run in runs)
            working = max([working, *(sum(keep(k, "none") for k in run) for run in runs)])
        else:
            kept += sum(keep(k, "full") for k in kinds[:num_layers]) + sum(keep(k, "none") for k in kinds[num_layers:])
            working = max([working, *(keep(k, "none") for k in kinds[:num_layers])])
    return kept + working


def activation_memory(model: ModelConfig, parallel: ParallelConfig, tokens: int, seq_len: int,
                      recompute: str = "none", sequence_parallel: bool | None = None,
                      recompute_method: str = "uniform", recompute_num_layers: int = 1) -> ActivationMemory:
    """Activations for micro-batches of ``tokens`` tokens (longest sequence ``seq_len``) per pipeline rank.

    ``recompute`` is 'none', 'selective' or 'full' (with ``recompute_method`` 'uniform' or 'block' and
    ``recompute_num_layers``, as ``model.recompute_*``); ``sequence_parallel`` defaults to the recipe's.
    """
    if recompute not in RECOMPUTE_MODES:
        raise ValueError(f"recompute must be one of {RECOMPUTE_MODES}, got {recompute!r}")
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    sp = parallel.sequence_parallel if sequence_parallel is None else sequence_parallel
    out = ActivationMemory(recompute, tokens)
    ranks = stage_chunks(model, parallel)
    for i, chunks in enumerate(ranks):
        if recompute == "full":
            kept = _full_recompute_bytes_per_token(model, chunks, tp, sp, seq_len, recompute_method,
                                                   max(recompute_num_layers, 1))
        else:
            kept = sum(layer_activation_bytes_per_token(model, k, tp, sp, seq_len, recompute)
                       for kinds in chunks for k in kinds)
        per_mb = kept * tokens
        if i == len(ranks) - 1:
            per_mb += 4 * model.vocab_size / tp * tokens  # bf16 logits and their gradient
        out.per_rank.append(int(per_mb * (pp - i)))
    return out


# ---------------------------------------------------------------------------------------- sidecar
def kv_bytes_per_token(model: ModelConfig, tp: int, dtype_bytes: int) -> float:
    """vLLM's KV cache per token on one GPU of a TP-``tp`` replica (attention layers only)."""
    attention_layers = sum(1 for k in layer_kinds(model) if k in ("T", "*"))
    kv_heads = max(model.num_query_groups // tp, 1)  # KV heads are replicated when TP > groups
    return attention_layers * 2 * kv_heads * head_dim(model) * dtype_bytes


def mamba_state_bytes_per_sequence(model: ModelConfig, tp: int, dtype_bytes: int) -> float:
    """Mamba conv + SSM state of one sequence on one GPU (constant in its length)."""
    layers = sum(1 for k in layer_kinds(model) if k == "M")
    if not layers:
        return 0.0
    _, conv, _ = _mamba_dims(model)
    ssm = mamba_heads(model) * model.mamba_head_dim * model.mamba_state_dim
    return layers * (conv * (MAMBA_CONV_KERNEL - 1) + ssm) * dtype_bytes / tp
