"""The GPU check: the project's real CUDA training path on one GPU, with figures, in a few minutes.

    bash bench/gpu_check.sh [--out DIR]          # on the GPU machine (see bench/RESULTS.md)
    python -m bench.gpu_check --cpu-tiny         # the same script at tiny size on CPU (the suite's test)

Builds a ~1B Qwen2-style model with the project's builders (``MegatronPolicy`` from a recipe: no
download, fresh weights; Megatron's local layer spec, so no Transformer Engine is needed) in
bf16, and runs:

1. the RL step (``MegatronPolicy.train_step``: bf16 forward/backward, the recipe's policy loss,
   the optimizer): tokens/s, model FLOP/s and MFU against a bf16 ``torch.matmul`` ceiling of an
   MLP shape measured in the same run (FLOP formula in bench/policy_step.py);
2. the log-prob pass (``compute_logprobs``) of the bf16 model against the same weights in float32
   (a reference model scored by the same code): mean and max |difference| per completion token;
3. a checkpoint save and load (``MegatronPolicy.save`` / ``load``): the loaded weights must equal
   the saved ones after a further step moved them;
4. the memory high-water mark (``torch.cuda.max_memory_allocated``).

Writes DIR/gpu_check.json (atomically) and prints a short table. Exit code 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.policy_step import (  # noqa: E402
    FLOP_FORMULA,
    input_lengths,
    matmul_ceiling,
    step_flops,
    synthetic_batch,
    time_train_steps,
)

logger = logging.getLogger("bench.gpu_check")
# ~1B parameters: 16 layers of hidden 2048 (GQA 16/2 heads, SwiGLU 5632) = 0.70B, and untied
# 65,536 x 2048 input and output embeddings = 0.27B.
SIZES = {
    "gpu": dict(model=dict(num_layers=16, hidden_size=2048, ffn_hidden_size=5632, num_attention_heads=16,
                           num_query_groups=2, vocab_size=65536, max_position_embeddings=4096),
                sequences=32, prompt=(128, 512), completion=(512, 1536), micro_batch_tokens=8192, steps=3),
    "cpu-tiny": dict(model=dict(num_layers=2, hidden_size=128, ffn_hidden_size=384, num_attention_heads=2,
                                num_query_groups=1, vocab_size=512, max_position_embeddings=256),
                     sequences=8, prompt=(8, 24), completion=(4, 24), micro_batch_tokens=128, steps=1),
}


def build_recipe(size: dict, cpu: bool):
    """A recipe whose model is ``size['model']`` in bf16 (local spec), one rank, the default RL loss."""
    from igrpo_megatron.config.schema import RecipeConfig

    r = RecipeConfig()
    for key, value in size["model"].items():
        setattr(r.model, key, value)
    r.model.architecture, r.model.params_dtype, r.model.transformer_impl = "qwen2", "bfloat16", "local"
    r.model.untie_embeddings_and_output_weights = True
    r.parallel.backend = "gloo" if cpu else "nccl"
    r.trainer.micro_batch_tokens = size["micro_batch_tokens"]
    r.optimizer.lr, r.optimizer.warmup_fraction = 1e-5, 0.0
    r.checkpoint.keep_last = 0
    return r


def _device_info(device: str) -> dict:
    if device == "cpu":
        return {"device": "cpu", "name": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    p = torch.cuda.get_device_properties(0)
    return {"device": device, "name": p.name, "memory_gib": p.total_memory / 2**30, "capability": f"{p.major}.{p.minor}"}


FUSED_SOFTMAX_KERNELS = ("scaled_upper_triang_masked_softmax_cuda", "scaled_masked_softmax_cuda", "scaled_softmax_cuda")


def fused_softmax_workaround(policy) -> list[str]:
    """Turn Megatron's fused-softmax path off where its compiled kernels are not installed.

    The project's transformer config asks for ``masked_softmax_fusion`` on any GPU; with the local
    layer spec (no Transformer Engine) Megatron then imports ``scaled_upper_triang_masked_softmax_cuda``
    (from Apex or TE) for bf16 attention whose key length is a multiple of 4, and fails where neither
    is installed. Returns what was changed (recorded in the JSON: a project issue, see RESULTS.md).
    """
    import importlib.util

    if not torch.cuda.is_available() or all(importlib.util.find_spec(k) for k in FUSED_SOFTMAX_KERNELS):
        return []
    from megatron.core.fusions.fused_softmax import FusedScaleMaskSoftmax

    changed = 0
    for chunk in policy.chunks:
        for module in chunk.modules():
            if isinstance(module, FusedScaleMaskSoftmax) and module.scaled_masked_softmax_fusion:
                module.scaled_masked_softmax_fusion = False
                changed += 1
    return [f"masked_softmax_fusion turned off in {changed} attention modules: Megatron's fused softmax kernels "
            f"({', '.join(FUSED_SOFTMAX_KERNELS)}) are not installed"] if changed else []


def check_logprobs(policy, recipe, batch) -> dict:
    """The bf16 policy's log-probs against a float32 copy of the same weights, scored by the same code."""
    import copy

    from igrpo_megatron.training.checkpoint import unwrap
    from igrpo_megatron.training.megatron_setup import build_model_chunks

    fp32 = copy.deepcopy(recipe.model)
    fp32.params_dtype = "float32"
    ref = build_model_chunks(fp32, recipe.parallel, wrap_ddp=False)
    for mine, theirs in zip(ref, policy.chunks, strict=True):
        unwrap(mine).load_state_dict(unwrap(theirs).state_dict())
        mine.eval()
    policy.reference = ref
    policy.compute_logprobs(batch)
    policy.compute_logprobs(batch, reference=True)
    diffs = torch.cat([(a.float() - b.float()).abs() for a, b in zip(batch.old_logprobs, batch.ref_logprobs,
                                                                       strict=True)])
    policy.reference = None
    del ref
    return {"tokens": diffs.numel(), "mean_abs_diff": diffs.mean().item(), "max_abs_diff": diffs.max().item(),
            "finite": bool(torch.isfinite(diffs).all())}


def check_checkpoint(policy, batch, root: Path) -> dict:
    """Save, take one more step (the weights move), load: the weights must be the saved ones again."""
    from igrpo_megatron.config.loader import recipe_to_yaml
    from igrpo_megatron.training.checkpoint import unwrap

    def snapshot() -> dict[str, torch.Tensor]:
        return {k: v.detach().float().cpu().clone() for k, v in unwrap(policy.chunks[0]).state_dict().items()
                if isinstance(v, torch.Tensor) and v.is_floating_point() and "_extra_state" not in k}

    saved = snapshot()
    t0 = time.perf_counter()
    path = policy.save(str(root), 1, {"note": "gpu_check"}, recipe_to_yaml(policy.recipe))
    save_s = time.perf_counter() - t0
    policy.train_step(batch)
    moved = max((snapshot()[k] - v).abs().max().item() for k, v in saved.items())
    t0 = time.perf_counter()
    step, _ = policy.load(path)
    load_s = time.perf_counter() - t0
    back = snapshot()
    worst = max((back[k] - v).abs().max().item() for k, v in saved.items())
    size = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
    return {"save_s": save_s, "load_s": load_s, "bytes": size, "step": step, "moved_by_step": moved,
            "max_abs_diff_after_load": worst, "ok": worst == 0.0 and moved > 0}


def run(size_name: str, out_dir: Path) -> dict:
    from igrpo_megatron.runtime.cpu_mode import enable_cpu_mode
    from igrpo_megatron.runtime.parallel import destroy_distributed, init_distributed

    cpu = size_name == "cpu-tiny"
    if not cpu and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here; run with --cpu-tiny for the CPU smoke test")
    enable_cpu_mode()  # does nothing where CUDA is available
    size = SIZES[size_name]
    recipe = build_recipe(size, cpu)
    device = "cpu" if cpu else "cuda"
    init_distributed(recipe.parallel, seed=1234)
    batch = synthetic_batch(recipe.model.vocab_size, size["sequences"], size["prompt"], size["completion"], seed=0)
    m = recipe.model
    ceiling = matmul_ceiling(size["micro_batch_tokens"], m.hidden_size, m.ffn_hidden_size, torch.bfloat16, device,
                             min_seconds=0.2 if cpu else 2.0)
    t0 = time.perf_counter()
    workarounds: list[str] = []
    timing = time_train_steps(recipe, batch, size["steps"], warmup=1,
                              after_setup=lambda p: workarounds.extend(fused_softmax_workaround(p)))
    policy = timing.pop("policy")
    build_and_steps_s = time.perf_counter() - t0
    tokens = sum(input_lengths(batch))
    flops = step_flops(timing["matmul_params"], m.num_layers, m.num_attention_heads * (m.hidden_size // m.num_attention_heads),
                       input_lengths(batch))
    total_params = sum(p.numel() for c in policy.chunks for p in c.parameters())
    small = synthetic_batch(m.vocab_size, min(8, size["sequences"]), size["prompt"], size["completion"], seed=1)
    logprobs = check_logprobs(policy, recipe, small)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        try:
            ckpt = check_checkpoint(policy, small, Path(tmp))
        except Exception as exc:  # reported, and the other figures still written
            logger.exception("checkpoint save/load failed")
            ckpt = {"ok": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
    result = {
        "size": size_name, "device": _device_info(device), "torch": torch.__version__, "python": platform.python_version(),
        "model": {**size["model"], "params": total_params, "matmul_params": timing["matmul_params"], "dtype": "bfloat16"},
        "batch": {"sequences": len(batch), "tokens": tokens, "micro_batch_tokens": size["micro_batch_tokens"]},
        "step": {"seconds": timing["seconds"], "median_s": timing["median_s"], "loss": timing["loss"],
                 "tokens_per_s": tokens / timing["median_s"], "model_flops": flops,
                 "flops_per_s": flops / timing["median_s"], "build_and_steps_s": build_and_steps_s},
        "flop_formula": FLOP_FORMULA, "matmul_ceiling": ceiling,
        "mfu_vs_measured_matmul": flops / timing["median_s"] / ceiling["flops_per_s"],
        "logprobs_vs_fp32": logprobs, "checkpoint": ckpt,
        "workarounds": workarounds,
        "memory_high_water_gib": (torch.cuda.max_memory_allocated() / 2**30) if not cpu else None,
    }
    result["ok"] = bool(logprobs["finite"] and ckpt["ok"] and all(map(_finite, timing["seconds"]))
                        and timing["loss"] is not None and _finite(timing["loss"]))
    destroy_distributed()
    return result


def _finite(x) -> bool:
    return x is not None and x == x and abs(x) != float("inf")


def table(r: dict) -> str:
    s, c, lp, ck = r["step"], r["matmul_ceiling"], r["logprobs_vs_fp32"], r["checkpoint"]
    mem = "-" if r["memory_high_water_gib"] is None else f"{r['memory_high_water_gib']:.1f} GiB"
    rows = [*(f"WORKAROUND: {w}" for w in r["workarounds"]),
        f"device: {r['device']['name']} ({r['size']}); model {r['model']['params'] / 1e9:.3f}B parameters, bf16",
        "| figure | value | ceiling | ratio |", "|---|---|---|---|",
        f"| RL step tokens/s | {s['tokens_per_s']:,.0f} | - | - |",
        f"| RL step model FLOP/s | {s['flops_per_s'] / 1e12:.2f} TFLOP/s | {c['flops_per_s'] / 1e12:.2f} TFLOP/s "
        f"(bf16 matmul {'x'.join(map(str, c['shape']))}) | MFU {r['mfu_vs_measured_matmul']:.1%} |",
        f"| log-prob bf16 vs fp32, mean / max abs | {lp['mean_abs_diff']:.2e} / {lp['max_abs_diff']:.2e} | - | - |",
        (f"| checkpoint save / load | {ck['save_s']:.1f} s / {ck['load_s']:.1f} s ({ck['bytes'] / 2**30:.2f} GiB) | - | "
         f"{'restored exactly' if ck['ok'] else 'NOT restored'} |") if "error" not in ck else
        f"| checkpoint save / load | FAILED: {ck['error'][:150]} | - | - |",
        f"| memory high-water mark | {mem} | - | - |",
    ]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-tiny", action="store_true", help="Tiny model on CPU (gloo): the smoke test of this script.")
    p.add_argument("--out", default="gpu_check_out", help="Directory for gpu_check.json (and the checkpoint, removed).")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result = run("cpu-tiny" if args.cpu_tiny else "gpu", out)
    result["wall_s"] = time.perf_counter() - t0
    from igrpo_megatron.evaluation.report import write_text

    write_text(out / "gpu_check.json", json.dumps(result, indent=1))
    print(table(result))
    print(f"wall {result['wall_s']:.0f} s; {'all checks passed' if result['ok'] else 'A CHECK FAILED'}; "
          f"JSON: {out / 'gpu_check.json'}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    sys.exit(main())
