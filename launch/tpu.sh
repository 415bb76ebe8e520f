#!/usr/bin/env bash
# Runs flowdistill on a Cloud TPU VM: one host, or every host of a pod slice (--pod) at once
# through `gcloud compute tpus tpu-vm ssh --worker=all`.
#
#   launch/tpu.sh [--dry-run] --tpu NAME --zone ZONE [--project P] [--pod] [--repo URL]
#       [--ref main] [--dir flowdistill] [--log ~/flowdistill.log] [--worker 0]
#       setup|start|logs|stop [-- --config=configs/mnist.py --workdir=/mnt/shared/runs/m]
#
#   setup  clone (or update) the repository at --ref on every host; a venv with
#          requirements.txt and the jax[tpu] matching its jax pin
#   start  start training in the background on every host (--pod: jax.distributed, whose
#          coordinator JAX finds itself on a pod); output to --log on each host
#   logs   follow --log on host --worker (process 0 writes the metrics)
#   stop   SIGTERM the run on every host: each saves a checkpoint at the same step and exits;
#          `start` again resumes
#
# On a pod every host must see the same --workdir: a Cloud Storage URL (gs://bucket/run) or a
# shared filesystem mounted at the same path on every host (Filestore/NFS).
# --dry-run prints the gcloud commands instead of running them.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
tpu='' zone='' project='' pod=0 dry_run=0 worker=0
repo='https://github.com/flowdistill/flowdistill' ref='main' dir='flowdistill'
log='~/flowdistill.log'
action=''
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --tpu) tpu="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --pod) pod=1; shift ;;
    --repo) repo="$2"; shift 2 ;;
    --ref) ref="$2"; shift 2 ;;
    --dir) dir="$2"; shift 2 ;;
    --log) log="$2"; shift 2 ;;
    --worker) worker="$2"; shift 2 ;;
    setup|start|logs|stop) action="$1"; shift ;;
    --) shift; break ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "launch/tpu.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
args=("$@")
[[ -n "$tpu" && -n "$zone" ]] || { echo "launch/tpu.sh: pass --tpu NAME and --zone ZONE" >&2; exit 2; }
[[ -n "$action" ]] || { echo "launch/tpu.sh: say what to do: setup, start, logs or stop" >&2; exit 2; }
if [[ $action == start ]] && ! printf '%s\n' "${args[@]}" | grep -q '^--workdir='; then
  echo "launch/tpu.sh: start needs flowdistill flags after --, with --config=... and --workdir=..." >&2
  exit 2
fi

show() {  # prints a command so it can be pasted into a shell
  local w
  for w in "$@"; do
    if [[ $w =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then printf '%s ' "$w"
    else printf "'%s' " "${w//\'/\'\\\'\'}"; fi
  done
  echo
}

ssh_to() {  # ssh_to WORKERS REMOTE_COMMAND
  local cmd=(gcloud compute tpus tpu-vm ssh "$tpu" "--zone=$zone" "--worker=$1" "--command=$2")
  [[ -n "$project" ]] && cmd+=("--project=$project")
  if [[ $dry_run == 1 ]]; then show "${cmd[@]}"; else "${cmd[@]}"; fi
}

jax_pin="$(grep -E '^jax[<>=~!]' "$here/../requirements.txt")"
case "$action" in
  setup)
    ssh_to all "set -e; [ -d $dir/.git ] || git clone -q $repo $dir; cd $dir; git fetch -q origin;\
 git checkout -q $ref; git pull -q --ff-only || true; python3 -m venv .venv; . .venv/bin/activate;\
 pip install -q -r requirements.txt -e . '${jax_pin/jax/jax[tpu]}'" ;;
  start)
    distributed=''
    [[ $pod == 1 ]] && distributed='FLOWDISTILL_DISTRIBUTED=1'
    ssh_to all "cd $dir && . .venv/bin/activate && nohup env $distributed python -m flowdistill.main $(printf '%q ' "${args[@]}")> $log 2>&1 < /dev/null &" ;;
  logs)
    ssh_to "$worker" "tail -n 200 -F $log" ;;
  stop)
    ssh_to all "pkill -TERM -f '[f]lowdistill[.]main' || echo 'no run on this host'" ;;
esac
