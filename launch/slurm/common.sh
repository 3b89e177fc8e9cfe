# Sourced by the sbatch scripts in this folder (sbatch runs a copy of the script, so they find this file
# through $SLURM_SUBMIT_DIR: submit from the repository root). Needs CONFIG and the OVERRIDES array.
#
# What it adds to a plain `srun accelerate launch ...`:
# - the run folder is resolved from the config; the job's output and one log per node go to <run_dir>/logs/
# - the step runs in the background so that the batch shell can take signals while it waits
# - USR1 (the advance warning from `#SBATCH --signal=B:USR1@120`): every training process gets SIGTERM,
#   finishes its step, writes a checkpoint and exits; then this job requeues itself (not where the run finished
#   meanwhile, exit 0). The requeued job runs the same command, and the trainer resumes from the newest
#   checkpoint of the run folder (auto_resume).
#   The trainer reads the stop flag often enough that its steps plus the checkpoint fit in
#   train.preempt_budget_s (default 90 s: keep it below the --signal lead time; train/collective.py).
# - USR2 (`scancel --batch --signal=USR2 JOB`: stop with a checkpoint, no requeue): passed on the same way.
# - either way the job exits 75 (EX_TEMPFAIL, as the trainer: stopped, the same command continues), also where
#   `accelerate launch` exits 143 (128 + TERM: torch's launcher reports the TERM it got, not its ranks' 75).
# - A plain `scancel JOB`, a time limit reached or a preemption without the advance signal end the job at once:
#   SLURM's TERM reaches srun too, which answers it by killing its tasks (SIGKILL), and KillWait (30 s) is shorter
#   than a checkpoint may take. The run then resumes from its last periodic checkpoint (train.ckpt_every). For
#   preemption with a checkpoint, the cluster needs PreemptParameters=send_user_signal and a GraceTime of at least
#   the --signal lead time (ask its admins).
# - In a job array the signals and the requeue name this task (JOBID_TASKID), never the whole array.

dd_fail() {
  echo "error: $*" >&2
  exit 2
}

dd_setup() {
  cd "${SLURM_SUBMIT_DIR:?submit this script with sbatch}" || exit 1
  PYTHON=${PYTHON:-python}  # the environment's python: sbatch passes on the submitting shell's PATH
  # a python without the project fails here, in one line, not with a traceback on every node (find_spec: no imports)
  "$PYTHON" -c 'import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in sys.argv[1:]))' \
    dist_dejpeg accelerate torch 2>/dev/null \
    || dd_fail "PYTHON=$PYTHON cannot import dist_dejpeg, accelerate and torch: activate the project's environment" \
               "before sbatch, or set PYTHON=/path/to/venv/bin/python"
  RUN_DIR=$("$PYTHON" -m dist_dejpeg.cli train --config "$CONFIG" ${OVERRIDES[@]+"${OVERRIDES[@]}"} --get train.run_dir) || exit 2
  BUDGET=$("$PYTHON" -m dist_dejpeg.cli train --config "$CONFIG" ${OVERRIDES[@]+"${OVERRIDES[@]}"} --get train.preempt_budget_s) || exit 2
  LOG_DIR=$RUN_DIR/logs
  mkdir -p "$LOG_DIR" 2>/dev/null && : 2>/dev/null >>"$LOG_DIR/job-$SLURM_JOB_ID.log" \
    || dd_fail "cannot write the run folder's logs in $LOG_DIR (train.run_dir)"
  echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): run folder $RUN_DIR, logs in $LOG_DIR"
  exec >>"$LOG_DIR/job-$SLURM_JOB_ID.log" 2>&1
  echo "[$(date +%FT%T)] job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NODELIST"
  # A requeued job continues the run as it began: with the config the run saved (its config.yaml, resolved), not the
  # repository's file, which may have been edited while the job waited (every key but the model's shapes would have
  # changed quietly, a phase's steps included). A new submission reads CONFIG, and resume says what changed.
  if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ] && [ -f "$RUN_DIR/config.yaml" ]; then
    echo "[$(date +%FT%T)] requeued: the run's own $RUN_DIR/config.yaml, not $CONFIG (it may have changed since)"
    CONFIG=$RUN_DIR/config.yaml
  fi

  # processes per node: one per GPU the job got there: SLURM_GPUS_ON_NODE, else --gpus-per-node's "[type:]N",
  # else CUDA_VISIBLE_DEVICES, and only then what nvidia-smi lists (every GPU of the node, the job's or not).
  # No GPU: CPU processes over gloo (one, or PROCS_PER_NODE), for debugging; ACCELERATE_USE_CPU makes
  # `--multi_gpu` start real CPU processes instead of lone ones.
  GPUS=${SLURM_GPUS_ON_NODE:-}
  [ -n "$GPUS" ] || { GPUS=${SLURM_GPUS_PER_NODE:-}; GPUS=${GPUS##*:}; }
  if [ -z "$GPUS" ] && [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    IFS=, read -ra DD_VISIBLE <<<"$CUDA_VISIBLE_DEVICES"
    GPUS=${#DD_VISIBLE[@]}
  fi
  [ -n "$GPUS" ] || GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  if [ "${GPUS:-0}" -lt 1 ]; then
    echo "[$(date +%FT%T)] no GPU on this node for the job (sbatch --gpus-per-node=N): CPU processes over gloo"
    export ACCELERATE_USE_CPU=1
  fi
  PROCS=${PROCS_PER_NODE:-$(( ${GPUS:-0} > 0 ? GPUS : 1 ))}
  # scancel's TERM reaches the launcher too, and torch's launcher SIGKILLs the processes 30 s after it, before a
  # checkpoint that needs up to train.preempt_budget_s (90 s): let it wait 25 s past the budget (115 s of SLURM's
  # 120; a budget raised with --signal's lead time raises it too)
  export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-$(( ${BUDGET%.*} + 25 ))}
  TRAIN=(-m dist_dejpeg.cli train --config "$CONFIG" ${OVERRIDES[@]+"${OVERRIDES[@]}"})
}

# dd_free_port START: START, else the next port up (wrapping within 15000-28999) that this node can bind; the
# batch shell runs on the allocation's first node, which hosts the rendezvous: another job there may hold START
# (job ids 14000 apart share it). Jobs that start together get different STARTs (their ids differ), so they do not
# race for one port as they did for accelerate's default 29500.
dd_free_port() {
  "$PYTHON" - "$1" <<'PY'
import socket
import sys

start = int(sys.argv[1]) - 15000
for i in range(14000):
    port = 15000 + (start + i) % 14000
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            continue
    print(port)
    break
else:
    sys.exit("error: no free port in 15000-28999 on this node for the rendezvous: set MAIN_PROCESS_PORT")
PY
}

dd_on_signal() {
  [ "$1" = USR1 ] && DD_REQUEUE=1
  DD_STOPPED=1
  echo "[$(date +%FT%T)] got SIG$1: the training processes checkpoint after their current step and stop"
  scancel --signal=TERM "$DD_JOB"  # the job's steps (every process in them), not this shell
}

# dd_run_step SRUN_ARGS... : run one srun step, wait for it through signals, requeue after USR1.
dd_run_step() {
  DD_REQUEUE=0 DD_STOPPED=0
  # this job's own id for scancel and scontrol: an array task's JOBID_TASKID (an array's first id alone is every task)
  DD_JOB=${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID:-}}
  DD_JOB=${DD_JOB:-$SLURM_JOB_ID}
  trap 'dd_on_signal USR1' USR1
  trap 'dd_on_signal USR2' USR2
  trap 'dd_on_signal TERM' TERM
  # --kill-on-bad-exit: a node whose training fails takes the others down instead of leaving them waiting.
  # --cpus-per-task: since Slurm 22.05 a step no longer inherits the job's; without it, one core per node
  srun --kill-on-bad-exit=1 ${SLURM_CPUS_PER_TASK:+--cpus-per-task="$SLURM_CPUS_PER_TASK"} \
    --output="${LOG_DIR//%/%%}/train-$SLURM_JOB_ID-node%n.log" --open-mode=append "$@" &  # (% is srun's pattern sign)
  local step=$! rc=0
  while :; do
    wait "$step" && rc=0 || rc=$?
    kill -0 "$step" 2>/dev/null || break  # a trap interrupted the wait: keep waiting for the step
  done
  # a step that ended while a trap ran: that wait's status was the signal's (138, 143), the step's is still to collect
  if [ "$rc" -gt 128 ]; then wait "$step" 2>/dev/null; local last=$?; [ "$last" = 127 ] || rc=$last; fi
  echo "[$(date +%FT%T)] training step ended with status $rc"
  if [ "$DD_STOPPED" = 1 ] && [ "$rc" = 143 ]; then
    # the launcher's own exit on the TERM passed on; its ranks stopped after checkpointing (their log says where),
    # or, still building, with nothing new to save: either way the same command continues the run
    echo "[$(date +%FT%T)] (143: the launcher's code for the TERM it got) stopped by the signal: exit 75"
    rc=75
  fi
  if [ "$DD_REQUEUE" = 1 ] && [ "$rc" = 0 ]; then
    echo "[$(date +%FT%T)] the run finished before the stop: no requeue"
  elif [ "$DD_REQUEUE" = 1 ]; then
    echo "[$(date +%FT%T)] requeueing job $DD_JOB; it resumes from the newest checkpoint in $RUN_DIR"
    scontrol requeue "$DD_JOB" \
      || echo "[$(date +%FT%T)] SLURM refused the requeue (scontrol: $?): submit the same command again to resume"
  fi
  return "$rc"
}
