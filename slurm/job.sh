#!/usr/bin/env bash
# The body shared by slurm/finetune.sh (multi-node) and slurm/finetune-1node.sh: environment, rank
# layout, one srun, and requeue on preemption. Edit the "site setup" block for your cluster.
#
# Layout: one task per GPU, started by srun. Each task runs `python launch/train.py`, and dist_ft maps
# SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID to rank / world size / local rank (dist_ft/dist.py).
# Why not one torchrun/deepspeed per node: srun then owns every rank, so SLURM's signals (--signal,
# scancel --signal, preemption) reach each training process directly, and a dead rank ends the step.
set -euo pipefail

usage="usage: sbatch slurm/finetune.sh CONFIG.yaml [section.key=value ...]   (submit from the repository root)"
config=${1:?$usage}
shift
cd "${SLURM_SUBMIT_DIR:-.}"
[ -f launch/train.py ] || { echo "error: launch/train.py not found in $(pwd); $usage" >&2; exit 2; }
[ -f "$config" ] || { echo "error: config $config not found; $usage" >&2; exit 2; }

# ---- site setup: edit for your cluster -------------------------------------------------------
# module load cuda/12.4                       # if your site uses environment modules
# source "$HOME/venvs/dist-ft/bin/activate"  # the Python environment holding dist_ft
# export NCCL_SOCKET_IFNAME=ib0              # InfiniBand; for AWS EFA: export FI_PROVIDER=efa
# export NCCL_IB_HCA=mlx5                    # pick the HCAs NCCL should use
if [ -n "${DIST_FT_VENV:-}" ]; then
    # shellcheck disable=SC1091
    source "$DIST_FT_VENV/bin/activate"
fi
PYTHON=${PYTHON:-python3}
# ------------------------------------------------------------------------------------------------

# rank 0's host and a port derived from the job id: jobs sharing a node do not collide
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
export MASTER_ADDR MASTER_PORT
# Each task's cores: srun (SLURM >= 22.05) no longer inherits the job's --cpus-per-task, so without this a task may be
# given one core while OMP_NUM_THREADS says 8 (CPU Adam under optimizer offload and tokenizer workers then crawl).
# SRUN_CPUS_PER_TASK is what srun reads instead; OpenMP threads match the cores each task gets.
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
    export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

echo "[dist-ft] job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} | ${SLURM_NNODES} node(s), ${SLURM_NTASKS} tasks | master $MASTER_ADDR:$MASTER_PORT | $config $*"
echo "[dist-ft] each task: ${SRUN_CPUS_PER_TASK:-1} CPU(s) (SRUN_CPUS_PER_TASK), OMP_NUM_THREADS=$OMP_NUM_THREADS"

# A preemption notice (--signal, scancel --signal=USR1) goes to the training tasks: they agree at the
# next step boundary, checkpoint, and exit 75. SIGTERM to this shell (scheduler preemption) must not
# kill it before srun returns, so it is only noted here.
trap 'echo "[dist-ft] SIGTERM: the ranks checkpoint and exit"' TERM

set +e
srun --kill-on-bad-exit=1 "$PYTHON" launch/train.py "$config" "$@"
rc=$?
set -e

if [ "$rc" -eq 75 ]; then
    echo "[dist-ft] checkpoint saved after a preemption notice; requeueing job $SLURM_JOB_ID (it resumes from that checkpoint)"
    # this run ends here either way; once requeued, its end is not a failure
    if scontrol requeue "$SLURM_JOB_ID"; then
        exit 0
    fi
elif [ "$rc" -ne 0 ] && [ "$rc" -ne 2 ] && [ "$rc" -ne 3 ]; then
    # A failure that is not the input's fault (a node died, a rank was killed, a collective timed out) is retried
    # from the last complete checkpoint, at most DIST_FT_FAILURE_REQUEUES times per job (default 2; 0: never).
    # Bad input (exit 2) and divergence (exit 3) would fail again and are not. The count lives in the job's
    # comment, which survives requeues.
    failures=$(squeue -h -j "$SLURM_JOB_ID" -o %k 2>/dev/null | sed -n 's/.*dist-ft-failures=\([0-9]*\).*/\1/p')
    failures=${failures:-0}
    limit=${DIST_FT_FAILURE_REQUEUES:-2}
    if [ "$failures" -lt "$limit" ]; then
        echo "[dist-ft] job $SLURM_JOB_ID failed with exit $rc (failure $((failures + 1)) of at most $limit retried); requeueing it: it resumes from the last complete checkpoint once enough nodes are up"
        scontrol update JobId="$SLURM_JOB_ID" Comment="dist-ft-failures=$((failures + 1))" || true
        if scontrol requeue "$SLURM_JOB_ID"; then
            exit 0
        fi
    fi
fi
exit "$rc"
