#!/bin/bash
# Helpers shared by the sbatch scripts (sourced, not run).

IGRPO_PY=${IGRPO_PYTHON:-python}
[ -x "${IGRPO_WORKDIR:-$PWD}/.venv/bin/python" ] && [ -z "${IGRPO_CONTAINER:-}" ] && IGRPO_PY="${IGRPO_WORKDIR:-$PWD}/.venv/bin/python"

log() { echo "[$(date '+%F %T')] igrpo-slurm: $*"; }

first_host() { scontrol show hostnames "$1" | head -n 1; }

igrpo_cmd() { "$IGRPO_PY" -m igrpo_megatron.cli "$@"; }

# srun options that run a step inside the container (pyxis), when one is configured.
container_args() {
  if [ -n "${IGRPO_CONTAINER:-}" ]; then
    printf -- "--container-image=%s --container-workdir=%s" "$IGRPO_CONTAINER" "${IGRPO_WORKDIR:-$PWD}"
    [ -n "${IGRPO_MOUNTS:-}" ] && printf -- " --container-mounts=%s" "$IGRPO_MOUNTS"
  fi
}

# Quote arguments for a nested `bash -c`.
quote_args() { local out="" a; for a in "$@"; do out+=" $(printf '%q' "$a")"; done; echo "$out"; }

# Time limit is near (Slurm sent USR1): requeue this job; the next run resumes from the newest
# complete checkpoint. Requeue kills the running steps, so nothing else is needed here.
on_preempt() {
  log "USR1 received: requeueing job ${SLURM_JOB_ID}"
  scontrol requeue "${SLURM_JOB_ID}"
}
