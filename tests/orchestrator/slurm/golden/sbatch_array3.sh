#!/bin/bash

# Parameters
#SBATCH --account=vision
#SBATCH --array=0-2%2
#SBATCH --constraint=a100
#SBATCH --cpus-per-task=6
#SBATCH --exclude=gpu13
#SBATCH --gpus-per-node=8
#SBATCH --job-name=grid
#SBATCH --mail-type=END
#SBATCH --mem=480GB
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --open-mode=append
#SBATCH --output=/shared/work/grid/slurm/%A_%a_0_log.out
#SBATCH --partition=dev
#SBATCH --qos=high
#SBATCH --reservation=paper-deadline
#SBATCH --signal=USR2@90
#SBATCH --time=2880

# setup
module load cuda/12.1
source /shared/venvs/orch/bin/activate

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output /shared/work/grid/slurm/%A_%a_%t_log.out --kill-on-bad-exit=1 {python} -u -m submitit.core._submit /shared/work/grid/slurm
# array tasks (each runs one resolved config):
#   0: grid-0  /shared/work/grid/0/config.yaml
#   1: grid-1  /shared/work/grid/1/config.yaml
#   2: grid-2  /shared/work/grid/2/config.yaml
