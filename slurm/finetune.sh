#!/usr/bin/env bash
# Multi-node fine-tune:   sbatch slurm/finetune.sh configs/gpt2-chat.yaml train.lr=2e-5
# (submit from the repository root; logs go to dist-ft-<jobid>.out there). Edit the #SBATCH lines and
# the site-setup block in slurm/job.sh. One task per GPU: ntasks-per-node = gpus-per-node.
#SBATCH --job-name=dist-ft
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
# (or --gpus-per-task=1: each task then sees one GPU and takes it; dist_ft maps either layout)
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=USR1@300
#SBATCH --requeue
# --signal: 300 s before the time limit every rank gets USR1, checkpoints and exits 75; job.sh then
# requeues the job, which resumes from that checkpoint. --open-mode=append keeps the log across requeues.
set -euo pipefail
exec bash "${SLURM_SUBMIT_DIR:-.}/slurm/job.sh" "$@"
