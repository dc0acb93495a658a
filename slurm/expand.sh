#!/usr/bin/env bash
# LayerMoE lifelong expansion on Slurm: every stage of every round, on one or more nodes.
#
#   sbatch slurm/expand.sh CONFIG [KEY=VALUE ...]                         # submit from the repository root
#   sbatch --nodes=2 --gpus-per-node=8 slurm/expand.sh configs/qwen15_1.8b_lifelong.yaml
#   sbatch --export=ALL,LAYERMOE_PROCS_PER_NODE=2 slurm/expand.sh my.yaml   # CPU nodes: 2 processes per node
#
# How it runs. Stages run in order, round after round (round r+1 starts from round r's trained model); the
# stage list comes from the stage table (pipeline/stages.py) through `python -m pipeline.cluster preflight`.
# The stages that split their work over ranks (tokenize, analyze, train_stage1, train_stage2, evaluate) are one
# Slurm step each: one task per node starts the DeepSpeed launcher there (--no_ssh --node_rank $SLURM_NODEID
# --num_nodes $SLURM_NNODES), which starts one process per GPU of the node (SLURM_GPUS_ON_NODE /
# CUDA_VISIBLE_DEVICES), or on CPU-only nodes LAYERMOE_PROCS_PER_NODE processes (default 1); rank 0 is on the first
# node of the job. The other stages (allocate, upcycle) run once, in this script, on the first node. Each stage is a separate step
# rather than one `layermoe run`, because only srun can put a launcher on every node, and so that every stage
# gets its own log and exit status.
#
# The repository, the config, its data, run_dir and the cache (cache_dir: the token stores) must be on a filesystem
# every node sees (with working flock: the job holds <run_dir>/.lock from start to end, so a second job on the same
# run directory stops at once with exit status 2 and a line naming the holder). To tokenize on a CPU node first,
# see the README (data section).
# Resuming: resubmit the same command. The stages done from the start of the run (settings and inputs unchanged,
# outputs intact: the preflight asks each stage) are not launched; an interrupted training stage continues from
# its last DeepSpeed checkpoint.
# Time limit and preemption: Slurm sends USR1 to this script LAYERMOE_SIGNAL_SECONDS before the end (the
# --signal line below, default 300 s: more than a training step plus a checkpoint save takes); the trap
# forwards it to the running stage, whose training saves a checkpoint at the next step boundary and exits with
# status 75. The script then requeues the job (`scontrol requeue`, when the job may be requeued: --requeue below,
# or JobRequeue=1) and exits; the requeued job skips the finished stages and resumes training from that
# checkpoint. A job that may not be requeued exits with 75: resubmit it. Change the lead time with
# `sbatch --signal=B:USR1@600 ...`. SIGTERM (scancel, or a preemption: Slurm sends it to every process of the
# job) stops the stage the same way, but the job is not requeued by this script (a cancelled job stays
# cancelled; PreemptMode=REQUEUE requeues it by itself); it exits with 75.
# Failure: the job stops at the first failing stage, prints the end of its log and exits with its status
# (2 = a problem with the config or inputs, named in the log). A config that needs GPUs (a bf16/fp16
# train.ds_config, model.device cuda) on a node without any fails before anything is written.
# Logs: the job log (%x-%j.out in the submit directory) says which stage runs; each stage writes
# <run_dir>/logs/slurm-<job id>/<round>.<stage>.log.
# Environment: LAYERMOE_PYTHON (default: .venv/bin/python in the submit directory), LAYERMOE_PROCS_PER_NODE,
# MASTER_PORT (first rendezvous port; default derived from the job id; each multi-process stage uses the next).
#
# The #SBATCH lines are defaults: override any of them on the sbatch command line.
#SBATCH --job-name=layermoe-expand
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
## On GPU nodes, e.g.:  #SBATCH --gpus-per-node=8   #SBATCH --cpus-per-task=64   #SBATCH --time=2-00:00:00
set -euo pipefail

if [ $# -lt 1 ] || [ -z "${SLURM_JOB_ID:-}" ]; then
  echo "usage: sbatch slurm/expand.sh CONFIG [KEY=VALUE ...]" >&2
  exit 2
fi
CONFIG=$1
shift  # "$@" = the overrides, passed to every stage
PY=${LAYERMOE_PYTHON:-$PWD/.venv/bin/python}
[ -x "$PY" ] || { echo "[expand] no Python at $PY: submit from the repository root or set LAYERMOE_PYTHON" >&2; exit 2; }

say() { echo "[expand $(date +%T)] $*"; }
STOPPED=75  # EX_TEMPFAIL: a stage stopped at a safe point on SIGTERM/SIGUSR1 (pipeline/stop_signals.py)

# A stop signal (USR1 before the time limit, TERM on scancel or preemption) is passed on to the running stage: as
# USR1 to srun, which hands it to every process of the step, or to the single stage process; the launchers
# ignore it, the ranks stop at a safe point.
stop_signal=""
child=""
on_stop() {
  stop_signal=$1
  say "received SIG$1: asking the running stage to stop at a safe point"
  [ -z "$child" ] || kill -USR1 "$child" 2>/dev/null || true
}
trap 'on_stop USR1' USR1
trap 'on_stop TERM' TERM

requeue_or_exit() {
  if [ "$stop_signal" = USR1 ] && scontrol show job "$SLURM_JOB_ID" 2>/dev/null | grep -q "Requeue=1"; then
    say "requeueing job $SLURM_JOB_ID: the requeued job skips the finished stages and resumes training"
    scontrol requeue "$SLURM_JOB_ID" && exit "$STOPPED"
  fi
  say "stopped (SIG${stop_signal:-?}); not requeued: resubmit the same command to resume"
  exit "$STOPPED"
}

# The config checked against this node (nothing written when it fails): run directory, rounds, stages (and which
# of them split over ranks), GPUs and processes per node.
plan=$("$PY" -m pipeline.cluster preflight "$CONFIG" "$@")
get() { sed -n "s/^$1=//p" <<<"$plan"; }
RUN_DIR=$(get run_dir)
ROUNDS=$(get rounds)
STAGES=$(get stages)
MULTI_PROCESS=" $(get multi_process_stages) "
FINISHED=" $(get finished) "  # round/stage pairs done from the start of the run: not launched
GPUS=$(get gpus_per_node)
PROCS=$(get processes_per_node)
[ "$GPUS" -gt 0 ] || export DS_ACCELERATOR=cpu
[ -z "${SLURM_CPUS_PER_TASK:-}" ] || export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK  # srun 22.05-23.02 does not inherit it

NODES=${SLURM_NNODES:-1}
hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
mapfile -t HOSTS <<<"$hosts"
if [ "$NODES" -eq 1 ]; then HEAD=127.0.0.1; else HEAD=${HOSTS[0]}; fi  # one node stays on loopback
PORT_BASE=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 400 * 30))}

# One job per run directory: hold its lock (pipeline/run_lock.py) for the whole job; the stages inherit it.
exec {lock_fd}>>"$RUN_DIR/.lock"
if ! flock -n "$lock_fd"; then
  echo "[expand] run directory $RUN_DIR is in use by another run ($(cat "$RUN_DIR/.lock")); wait for it or stop it" >&2
  exit 2
fi
lock_token=$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')
printf '{"host": "%s", "pid": %d, "started": "%s", "command": "slurm job %s", "token": "%s"}\n' \
  "$(hostname)" "$$" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$SLURM_JOB_ID" "$lock_token" >"$RUN_DIR/.lock"
export LAYERMOE_RUN_LOCK="$lock_token@$RUN_DIR/.lock"

LOG_DIR="$RUN_DIR/logs/slurm-$SLURM_JOB_ID"
mkdir -p "$LOG_DIR"
HOSTFILE="$LOG_DIR/hostfile"  # node order = SLURM_NODEID order
printf '%s slots='"$PROCS"'\n' "${HOSTS[@]}" >"$HOSTFILE"
say "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $CONFIG${*:+ $*} | rounds: $ROUNDS | $NODES node(s) x $PROCS process(es), $GPUS GPU(s) per node | head $HEAD | logs $LOG_DIR"

launched=0
for round in $ROUNDS; do
  for stage in $STAGES; do
    if [[ "$FINISHED" == *" $round/$stage "* ]]; then
      say "$round/$stage: up to date, skipped (not launched)"
      continue
    fi
    log="$LOG_DIR/$round.$stage.log"
    if [[ "$MULTI_PROCESS" == *" $stage "* ]]; then
      port=$((PORT_BASE + launched % 30))
      launched=$((launched + 1))
      command=(srun --nodes="$NODES" --ntasks="$NODES" --ntasks-per-node=1 --kill-on-bad-exit=1
               "$PY" -m pipeline.cluster stage "$stage" --config "$CONFIG" --round "$round"
               --processes-per-node "$PROCS" --nodes "$NODES" --master-addr "$HEAD" --master-port "$port"
               --hostfile "$HOSTFILE" "$@")
    else
      command=("$PY" -m pipeline.cli "$stage" --config "$CONFIG" --round "$round" "$@")
    fi
    [ -z "$stop_signal" ] || requeue_or_exit  # a stop signal arrived between two stages
    say "$round/$stage: started ($log)"
    status=0
    "${command[@]}" >>"$log" 2>&1 &
    child=$!
    # wait returns early when a trapped signal arrives; wait again until the stage has ended
    while true; do
      wait "$child" && status=0 || status=$?
      kill -0 "$child" 2>/dev/null || break
    done
    child=""
    if [ "$status" -eq "$STOPPED" ] || [ -n "$stop_signal" ]; then
      say "$round/$stage: stopped (exit status $status) after SIG${stop_signal:-TERM/USR1}; its checkpoint is kept"
      requeue_or_exit
    fi
    if [ "$status" -ne 0 ]; then
      say "$round/$stage: FAILED with exit status $status; the end of $log:"
      tail -n 25 "$log"
      say "fix the cause and resubmit the same command to resume"
      exit "$status"
    fi
    say "$round/$stage: $(grep -q 'up to date' "$log" && echo 'up to date, skipped' || echo done)"
  done
done
say "expansion complete: $RUN_DIR"
