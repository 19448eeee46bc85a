#!/usr/bin/env bash
# Run a recipe on this machine: torchrun starts the trainer ranks; rank 0 starts (and later stops)
# the vLLM sidecar itself unless the recipe points at one already running (rollout.server.url).
#
#   launchers/local.sh RECIPE [overrides...]
#   NPROC=2 launchers/local.sh recipes/tiny_cpu.yaml parallel.tensor_model_parallel_size=2
#
# NPROC defaults to the recipe's cluster.gpus_per_node.
set -euo pipefail
recipe=${1:?usage: launchers/local.sh RECIPE [overrides...]}
shift
here=$(cd "$(dirname "$0")/.." && pwd)
python=${IGRPO_PYTHON:-$here/.venv/bin/python}
[ -x "$python" ] || python=python3
nproc=${NPROC:-$("$python" -m igrpo_megatron.cli config get "$recipe" cluster.gpus_per_node "$@")}
exec "$python" -m torch.distributed.run --standalone --nproc-per-node "$nproc" \
  -m igrpo_megatron.cli train "$recipe" "$@"
