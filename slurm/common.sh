#!/bin/bash
# Shared by slurm/igrpo.sbatch and slurm/igrpo_colocated.sbatch (sourced, not run): where the project
# is, how a step runs (on the host or in the container), and stopping on USR1/TERM without losing work.
#
# Environment (all optional):
#   IGRPO_WORKDIR      the project on the host: recipes, .venv, logs/ (default: the submission directory)
#   IGRPO_LOG_DIR      folder for the job's log, made if missing (default: $IGRPO_WORKDIR/logs)
#   IGRPO_PYTHON       Python with the project installed (default: $IGRPO_WORKDIR/.venv/bin/python if
#                      there, else python3; in container mode: python, the image's)
#   IGRPO_CONTAINER    container image (pyxis: srun --container-image): every step runs in it, so the host
#                      needs only bash and Slurm; the recipe path is then read inside the image
#   IGRPO_CONTAINER_WORKDIR  the project inside the image (default /opt/igrpo-megatron, see Dockerfile)
#   IGRPO_MOUNTS       srun --container-mounts: whatever the run reads and writes (run.output_dir, data)
#   IGRPO_MASTER_PORT  port the trainer ranks meet on (default 20000 + job id mod 20000)
#   IGRPO_STOP_WAIT_S  seconds to wait for the trainer's checkpoint after USR1/TERM (default 150: the
#                      header asks for USR1 180 s before the time limit)

# `igrpo train` exits with this after a signal made it save a checkpoint and stop: requeue the job
# (PREEMPTED_EXIT_CODE in igrpo_megatron/training/preemption.py).
PREEMPTED_EXIT_CODE=75

IGRPO_WORKDIR=${IGRPO_WORKDIR:-${SLURM_SUBMIT_DIR:-$PWD}}
if [ -n "${IGRPO_CONTAINER:-}" ]; then
  IGRPO_PY=${IGRPO_PYTHON:-python}
elif [ -n "${IGRPO_PYTHON:-}" ]; then
  IGRPO_PY=$IGRPO_PYTHON
elif [ -x "$IGRPO_WORKDIR/.venv/bin/python" ]; then
  IGRPO_PY=$IGRPO_WORKDIR/.venv/bin/python
else
  IGRPO_PY=python3
fi

log() { echo "[$(date '+%F %T')] igrpo-slurm: $*"; }

# Everything the script and its steps print goes to <log dir>/<job name>-<job id>.out (appended
# across requeues); Slurm's own file (slurm-<job id>.out) keeps only what Slurm itself reports.
start_job_log() {
  local dir=${IGRPO_LOG_DIR:-$IGRPO_WORKDIR/logs}
  mkdir -p "$dir"
  JOB_LOG="$dir/${SLURM_JOB_NAME:-igrpo}-${SLURM_JOB_ID}.out"
  echo "igrpo-slurm: job log: $JOB_LOG"
  exec >>"$JOB_LOG" 2>&1
}

first_node() { scontrol show hostnames "$1" | sed -n 1p; }

# The address Slurm reaches a node at (NodeAddr; the node name where it is not set).
node_addr() {
  local addr
  addr=$(scontrol show node "$1" 2>/dev/null | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p' | sed -n 1p) || true
  echo "${addr:-$1}"
}

# srun options that run a step inside the container (pyxis), when one is configured.
container_args() {
  if [ -n "${IGRPO_CONTAINER:-}" ]; then
    printf -- "--container-image=%s --container-workdir=%s" "$IGRPO_CONTAINER" \
      "${IGRPO_CONTAINER_WORKDIR:-/opt/igrpo-megatron}"
    [ -n "${IGRPO_MOUNTS:-}" ] && printf -- " --container-mounts=%s" "$IGRPO_MOUNTS"
  fi
  return 0
}

# One task per trainer rank: torch.distributed reads its rank from the variables Slurm sets per task.
export MASTER_PORT=${IGRPO_MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
RANK_ENV='export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS; exec "$@"'

# ---------------------------------------------------------------- stopping without losing work
# USR1 (Slurm, --signal=B:USR1@180) or TERM reach this script: pass the first one to the trainer
# step (srun forwards it to every rank), which finishes its step, saves a checkpoint and exits
# PREEMPTED_EXIT_CODE. Later signals are only logged: a second one would make the trainer stop at
# once, without its checkpoint.
stop_signal=""
on_stop_signal() {
  if [ -n "$stop_signal" ]; then
    log "$1 received (already stopping on $stop_signal)"
    return
  fi
  stop_signal=$1
  stop_deadline=$((SECONDS + ${IGRPO_STOP_WAIT_S:-150}))
  log "$1 received: asking the trainer to save a checkpoint and stop (waiting up to ${IGRPO_STOP_WAIT_S:-150} s)"
  kill -s "$1" "$trainer_pid" 2>/dev/null || true
}

# Wait for the trainer step (srun, pid $trainer_pid); its exit status in $trainer_rc. After a stop
# signal the wait is bounded: a trainer still running at the deadline is left to the requeue.
wait_for_trainer() {
  trap 'on_stop_signal USR1' USR1
  trap 'on_stop_signal TERM' TERM
  local rc=0
  while [ -z "$stop_signal" ]; do
    # `wait` returns early (status > 128) when a trapped signal arrives; otherwise the step has ended.
    rc=0
    wait "$trainer_pid" || rc=$?
    if [ -z "$stop_signal" ]; then
      trainer_rc=$rc
      return
    fi
  done
  while kill -0 "$trainer_pid" 2>/dev/null; do
    if (( SECONDS >= stop_deadline )); then
      log "the trainer did not stop within ${IGRPO_STOP_WAIT_S:-150} s; requeueing anyway (it resumes from the newest complete checkpoint)"
      trainer_rc=$PREEMPTED_EXIT_CODE
      return
    fi
    sleep 1
  done
  trainer_rc=0
  wait "$trainer_pid" || trainer_rc=$?
  if (( trainer_rc == 127 )); then trainer_rc=$rc; fi  # already collected by the wait above
}

# Requeue after the trainer saved and stopped (exit PREEMPTED_EXIT_CODE); otherwise pass on its
# status. The requeued run resumes from the checkpoint (the scripts pass checkpoint.resume=auto).
finish_job() {
  trap '' USR1 TERM
  if (( trainer_rc == PREEMPTED_EXIT_CODE )); then
    log "trainer stopped after a checkpoint (exit $trainer_rc): requeueing job $SLURM_JOB_ID"
    stop_sidecar
    if scontrol requeue "$SLURM_JOB_ID"; then
      exit 0
    fi
    log "scontrol requeue failed: resubmit the same command to resume"
  else
    log "trainer finished (exit $trainer_rc)"
    stop_sidecar
  fi
  exit "$trainer_rc"
}

# The heterogeneous script runs the sidecar as its own step (pid $sidecar_pid); stop it with the job.
stop_sidecar() {
  if [ -n "${sidecar_pid:-}" ] && kill -0 "$sidecar_pid" 2>/dev/null; then
    kill -TERM "$sidecar_pid" 2>/dev/null || true
    wait "$sidecar_pid" 2>/dev/null || true
  fi
  return 0
}
