#!/usr/bin/env bash
# Single-node fine-tune:  sbatch slurm/finetune-1node.sh configs/gpt2-chat.yaml
# (submit from the repository root). Same job body as the multi-node template: slurm/job.sh.
#SBATCH --job-name=dist-ft
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=USR1@300
#SBATCH --requeue
set -euo pipefail
exec bash "${SLURM_SUBMIT_DIR:-.}/slurm/job.sh" "$@"
