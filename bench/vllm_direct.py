"""The rollout ceiling: the same vLLM engine driven directly (offline ``LLM.generate``), no HTTP server.

    python -m bench.vllm_direct SPEC.json OUT.json

SPEC holds the sidecar's own engine arguments (its command line, parsed by vLLM's ``EngineArgs``
parser, so both engines get exactly the same settings), the prompts (token ids), the sampling
settings and one seed per prompt. Generates once untimed (warm-up), then ``repeats`` timed rounds of
all prompts in one ``LLM.generate`` call, and writes generated tokens and seconds per round.
Started in its own process by bench/rollout.py (vLLM needs the ``__main__`` guard).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time


def engine_kwargs(server_args: list[str]) -> dict:
    """LLM(...) keyword arguments from the server's command-line arguments (vLLM parses them)."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    ns, _server_only = parser.parse_known_args(server_args)  # --host/--port etc. belong to the HTTP server
    args = EngineArgs.from_cli_args(ns)
    default = EngineArgs(model=args.model)
    # Only what the command line changed: LLM() passes these on to EngineArgs.
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(args)
            if getattr(args, f.name) != getattr(default, f.name) or f.name == "model"}


def main(spec_path: str, out_path: str) -> int:
    from vllm import LLM, SamplingParams, TokensPrompt

    spec = json.loads(open(spec_path).read())
    kwargs = engine_kwargs(spec["server_args"])
    llm = LLM(**kwargs)
    params = [SamplingParams(seed=seed, **spec["sampling"]) for seed in spec["seeds"]]
    prompts = [TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]]
    llm.generate(prompts[:1], params[:1], use_tqdm=False)  # warm-up
    rounds = []
    for _ in range(spec["repeats"]):
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - t0
        tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
        rounds.append({"seconds": seconds, "tokens": tokens})
    with open(out_path + ".tmp", "w") as f:
        json.dump({"engine_kwargs": {k: str(v) for k, v in kwargs.items()}, "rounds": rounds}, f)
    import os

    os.replace(out_path + ".tmp", out_path)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
