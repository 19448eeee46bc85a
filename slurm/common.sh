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
# Rank 0 also prints its PID and node (for stop_trainer), then becomes the trainer (exec keeps the PID).
export MASTER_PORT=${IGRPO_MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
RANK_ENV='export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS
[ "$SLURM_PROCID" != 0 ] || echo "igrpo-slurm: rank 0 is pid $$ on $SLURMD_NODENAME (restart ${SLURM_RESTART_COUNT:-0})"
exec "$@"'

# ---------------------------------------------------------------- stopping without losing work
# USR1 (Slurm, --signal=B:USR1@180) or TERM reach this script: pass the first one to the trainer,
# which finishes its step, saves a checkpoint and exits PREEMPTED_EXIT_CODE. Later signals are only
# logged: a second one would make the trainer stop at once, without its checkpoint.
stop_signal=""
on_stop_signal() {
  if [ -n "$stop_signal" ]; then
    log "$1 received (already stopping on $stop_signal)"
    return
  fi
  stop_signal=$1
  stop_deadline=$((SECONDS + ${IGRPO_STOP_WAIT_S:-150}))
  # When Slurm ends the job (scancel, time limit, preemption) it signals every step itself: a relayed
  # TERM would be the trainer's second, which means "stop now, without a checkpoint".
  if [ "$1" = TERM ] && [ "$(squeue -h -j "$SLURM_JOB_ID" -o %T 2>/dev/null | sed -n 1p)" != RUNNING ]; then
    log "TERM received: Slurm is ending the job and signals the trainer itself"
    return
  fi
  log "$1 received: asking the trainer to save a checkpoint and stop (waiting up to ${IGRPO_STOP_WAIT_S:-150} s)"
  stop_trainer "$1"
}

# Signal rank 0 alone: the ranks agree at the next step boundary (any rank's request stops all), and
# a signal to the whole step (what srun passes on) would also reach rank 0's children, the vLLM
# sidecar and the reward workers, which would die of it mid-step. Before rank 0 has started (no PID
# printed yet) the step gets it through srun. $trainer_srun_args: the trainer step's component.
stop_trainer() {
  local line pid node
  line=$(grep -a "^igrpo-slurm: rank 0 is pid [0-9]* on .* (restart ${SLURM_RESTART_COUNT:-0})\$" "$JOB_LOG" | tail -n 1) || true
  pid=$(echo "$line" | awk '{print $6}')
  node=$(echo "$line" | awk '{print $8}')
  if [ -z "$pid" ]; then
    kill -s "$1" "$trainer_pid" 2>/dev/null || true
  elif [ "$node" = "${SLURMD_NODENAME:-}" ]; then
    kill -s "$1" "$pid" 2>/dev/null || true
  else
    # shellcheck disable=SC2086  # a list of options
    srun --overlap ${trainer_srun_args:-} --nodelist="$node" --nodes=1 --ntasks=1 \
      kill -s "$1" "$pid" || log "could not signal rank 0 (pid $pid on $node)"
  fi
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
      log "the trainer did not stop within ${IGRPO_STOP_WAIT_S:-150} s; requeueing anyway (the next run resumes from the newest complete checkpoint)"
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
    log "trainer stopped (exit $trainer_rc): requeueing job $SLURM_JOB_ID"
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

# The heterogeneous script runs the sidecar as its own step (srun --job-name=igrpo-sidecar, pid
# $sidecar_pid): TERM it through Slurm, which reaches serve-rollout (it then stops vLLM) rather than
# srun (which would kill the step outright), and wait for it a while.
stop_sidecar() {
  if [ -z "${sidecar_pid:-}" ] || ! kill -0 "$sidecar_pid" 2>/dev/null; then
    return 0
  fi
  local step deadline=$((SECONDS + 60))
  step=$(squeue -h -s -j "$SLURM_JOB_ID" -o '%i %j' 2>/dev/null | awk '$2 == "igrpo-sidecar" {print $1; exit}') || true
  if [ -n "$step" ]; then
    scancel --signal=TERM "$step" 2>/dev/null || true
  fi
  while kill -0 "$sidecar_pid" 2>/dev/null && (( SECONDS < deadline )); do sleep 1; done
  kill -TERM "$sidecar_pid" 2>/dev/null || true
  wait "$sidecar_pid" 2>/dev/null || true
  return 0
}
