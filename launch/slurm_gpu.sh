#!/usr/bin/env bash
# Submits flowdistill to a SLURM GPU cluster: one process per GPU on every node, joined by
# jax.distributed (JAX reads the SLURM environment for the coordinator). For one GPU node
# without SLURM, use `launch/local.sh --gpus N` instead.
#
#   launch/slurm_gpu.sh [--dry-run] [--nodes 2] [--gpus-per-node 8] [--time 04:00:00]
#       [--partition P] [--account A] [--job-name flowdistill] [--grace 120]
#       -- --config=configs/mnist.py --workdir=/shared/runs/m
#
# Run it from the repository with the environment activated (the job inherits it); --workdir
# must be on a filesystem every node shares. SLURM sends SIGTERM --grace seconds before the
# time limit: every process saves a checkpoint at the same step and exits 0, and the job is
# requeued to resume. Watch: `tail -F <workdir>/logs/slurm-<jobid>.out`. Stop early (saving a
# checkpoint): `scancel --signal=TERM <jobid>`. --dry-run prints the batch script instead of
# submitting it.
set -euo pipefail

nodes=2 gpus=8 time_limit='04:00:00' partition='' account='' job_name='flowdistill' grace=120
dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --nodes) nodes="$2"; shift 2 ;;
    --gpus-per-node) gpus="$2"; shift 2 ;;
    --time) time_limit="$2"; shift 2 ;;
    --partition) partition="$2"; shift 2 ;;
    --account) account="$2"; shift 2 ;;
    --job-name) job_name="$2"; shift 2 ;;
    --grace) grace="$2"; shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "launch/slurm_gpu.sh: unknown option $1 (put flowdistill flags after --)" >&2; exit 2 ;;
  esac
done
args=("$@")
workdir=''
for a in "${args[@]}"; do [[ "$a" == --workdir=* ]] && workdir="${a#--workdir=}"; done
if [[ -z "$workdir" ]]; then
  echo "launch/slurm_gpu.sh: pass --workdir=DIR (on a shared filesystem) after --" >&2; exit 2
fi

script="#!/usr/bin/env bash
#SBATCH --job-name=$job_name
#SBATCH --nodes=$nodes
#SBATCH --ntasks-per-node=$gpus
#SBATCH --gpus-per-task=1
#SBATCH --time=$time_limit
#SBATCH --signal=TERM@$grace
#SBATCH --requeue
#SBATCH --output=$workdir/logs/slurm-%j.out
${partition:+#SBATCH --partition=$partition
}${account:+#SBATCH --account=$account
}cd $(printf '%q' "$PWD")
srun --kill-on-bad-exit=1 env FLOWDISTILL_DISTRIBUTED=1 ${PYTHON:-python} -m flowdistill.main $(printf '%q ' "${args[@]}")"

if [[ $dry_run == 1 ]]; then
  echo "# would run: mkdir -p $workdir/logs && sbatch <<'EOF'"
  echo "$script"
  echo "EOF"
  exit 0
fi
mkdir -p "$workdir/logs"
sbatch <<< "$script"
