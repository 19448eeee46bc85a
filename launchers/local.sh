#!/usr/bin/env bash
# Run a recipe on this machine with the recipe's cluster.gpus_per_node ranks (NPROC overrides it); rank 0
# starts (and later stops) the vLLM sidecar itself unless the recipe points at one already running
# (rollout.server.url).
#
#   launchers/local.sh RECIPE [overrides...]
#   launchers/local.sh recipes/tiny_cpu.yaml cluster.gpus_per_node=2 parallel.tensor_model_parallel_size=2
#
# One rank runs `igrpo train` directly, so its exit code stays what it documents (0 finished, 2 bad
# input, 75 stopped on a signal after a checkpoint: run the same command again to resume); several
# ranks run under torchrun, which reports any failing rank as exit 1.
set -euo pipefail
recipe=${1:?usage: launchers/local.sh RECIPE [overrides...]}
shift
here=$(cd "$(dirname "$0")/.." && pwd)
python=${IGRPO_PYTHON:-$here/.venv/bin/python}
[ -x "$python" ] || python=python3
nproc=${NPROC:-$("$python" -m igrpo_megatron.cli config get "$recipe" cluster.gpus_per_node "$@")}
if [ "$nproc" = 1 ]; then
  exec "$python" -m igrpo_megatron.cli train "$recipe" "$@"
fi
exec "$python" -m torch.distributed.run --standalone --nproc-per-node "$nproc" \
  -m igrpo_megatron.cli train "$recipe" "$@"
