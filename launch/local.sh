#!/usr/bin/env bash
# Runs flowdistill on N local processes joined by jax.distributed on 127.0.0.1: on CPU each with
# D simulated devices (the multi-host code path on one machine, for tests and debugging); with
# --gpus N, one process per GPU (process i sees GPU i), as on one node of a GPU cluster.
#
#   launch/local.sh [--dry-run] [--processes 2] [--devices 4] [--gpus N] [--port 12355] \
#       [--timeout 3600] [--grace 120] [--logs DIR] -- --config=configs/quickstart.py --workdir=runs/q
#
# Logs: DIR/process_<i>.log (default: <workdir>/logs), pids in DIR/process_<i>.pid; process
# 0's output also goes to the terminal. If any process fails, the others are stopped.
# SIGTERM/SIGINT are forwarded to every process (each saves a checkpoint at the same step and
# exits; rerun to resume); a process still running --grace seconds after a signal (or after
# --timeout) is killed.
set -euo pipefail

processes=2 devices=4 gpus=0 port=12355 timeout_s=3600 grace=120 logs='' dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --processes) processes="$2"; shift 2 ;;
    --devices) devices="$2"; shift 2 ;;
    --gpus) gpus="$2"; processes="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --timeout) timeout_s="$2"; shift 2 ;;
    --grace) grace="$2"; shift 2 ;;
    --logs) logs="$2"; shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "launch/local.sh: unknown option $1 (put flowdistill flags after --)" >&2; exit 2 ;;
  esac
done
args=("$@")
workdir=''
for a in "${args[@]}"; do [[ "$a" == --workdir=* ]] && workdir="${a#--workdir=}"; done
if [[ -z "$workdir" ]]; then
  echo "launch/local.sh: pass --workdir=DIR after -- (with --config=...)" >&2; exit 2
fi
logs="${logs:-$workdir/logs}"
python="${PYTHON:-python}"

command_for() {  # the command of process $1, one word per line
  local platform=(JAX_PLATFORMS=cpu "XLA_FLAGS=--xla_force_host_platform_device_count=$devices")
  [[ $gpus -gt 0 ]] && platform=(JAX_PLATFORMS=cuda "CUDA_VISIBLE_DEVICES=$1")
  printf '%s\n' env FLOWDISTILL_DISTRIBUTED=1 "JAX_COORDINATOR_ADDRESS=127.0.0.1:$port" \
    "JAX_NUM_PROCESSES=$processes" "JAX_PROCESS_ID=$1" "${platform[@]}" \
    timeout -k "$grace" "$timeout_s" "$python" -m flowdistill.main "${args[@]}"
}

if [[ $dry_run == 1 ]]; then
  if [[ $gpus -gt 0 ]]; then what="1 GPU"; else what="$devices CPU devices"; fi
  echo "# would start $processes processes x $what, logs in $logs:"
  for ((i = 0; i < processes; i++)); do
    mapfile -t cmd < <(command_for "$i")
    echo "$(printf '%q ' "${cmd[@]}")> $logs/process_$i.log 2>&1 &"
  done
  echo "# then wait for all, stopping the rest if one fails"
  exit 0
fi

mkdir -p "$logs"
pids=()
stop_all() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; }
trap 'stop_all' TERM INT
for ((i = 0; i < processes; i++)); do
  mapfile -t cmd < <(command_for "$i")
  "${cmd[@]}" > "$logs/process_$i.log" 2>&1 &
  pids+=($!)
  echo $! > "$logs/process_$i.pid"
done
tail -n +1 -f "$logs/process_0.log" --pid="${pids[0]}" &
tail_pid=$!
status=0
remaining=("${pids[@]}")
while [[ ${#remaining[@]} -gt 0 ]]; do
  set +e
  wait -n -p done_pid "${remaining[@]}"
  rc=$?
  set -e
  [[ -z "${done_pid:-}" ]] && continue  # a trapped signal interrupted wait
  remaining=("${remaining[@]/$done_pid}")
  mapfile -t remaining < <(printf '%s\n' "${remaining[@]}" | grep -v '^$' || true)
  if [[ $rc -ne 0 && $status -eq 0 ]]; then
    status=$rc
    echo "launch/local.sh: a process exited with status $rc; stopping the others" \
         "(logs: $logs)" >&2
    stop_all
  fi
done
wait "$tail_pid" 2>/dev/null || true
exit "$status"
