#!/usr/bin/env bash
# Runs flamingo-train (or another entry point) on this machine: one process, or N
# processes that talk over 127.0.0.1 the way the hosts of a pod do (multi-host code tested
# on one machine; CPU devices, gloo collectives).
#
#   launch/local.sh [options] -- --config experiments/demo.py --workdir workdirs/demo
#
# Options:
#   --num_processes N        processes (default 1: runs the command as is, in the foreground)
#   --devices_per_process K  fake CPU devices per process when N > 1 (default 4)
#   --port P                 coordinator port on 127.0.0.1 (default: a free one)
#   --logdir DIR             per-process logs DIR/process_<i>.log when N > 1 (default
#                            workdirs/local_logs)
#   --entry MODULE           python module to run (default flamingo_jax.train)
#   --python PATH            interpreter (default $PYTHON, else python3)
#   --dry-run                print the commands instead of running them
#
# With N > 1 it waits for every process; when one fails the others are stopped and the
# script exits with the failed process's status.
set -euo pipefail

num_processes=1
devices_per_process=4
port=""
logdir="workdirs/local_logs"
entry="flamingo_jax.train"
python="${PYTHON:-python3}"
dry_run=0

usage() {
  sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
  exit "${1:-0}"
}

while (($#)); do
  case "$1" in
    --num_processes) num_processes="$2"; shift 2 ;;
    --devices_per_process) devices_per_process="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --logdir) logdir="$2"; shift 2 ;;
    --entry) entry="$2"; shift 2 ;;
    --python) python="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h | --help) usage 0 ;;
    --) shift; break ;;
    *) echo "local.sh: unknown option $1 (program flags go after --)" >&2; usage 2 ;;
  esac
done

for value in "$num_processes" "$devices_per_process"; do
  if ! [[ "$value" =~ ^[1-9][0-9]*$ ]]; then
    echo "local.sh: --num_processes and --devices_per_process must be positive integers," \
      "got '$value'" >&2
    exit 2
  fi
done

# shellcheck source=launch/commands.sh
source "$(dirname "$0")/commands.sh"

program=("$python" -m "$entry" "$@")

if ((num_processes == 1)); then
  if ((dry_run)); then
    quoted "${program[@]}"
    exit 0
  fi
  exec "${program[@]}"
fi

if [[ -z "$port" ]]; then
  if ((dry_run)); then
    port=12355
  else
    free_port='import socket; s = socket.socket(); s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])'
    port="$("$python" -c "$free_port")"
  fi
fi

commands=()
for ((i = 0; i < num_processes; i++)); do
  command=(env
    "FLAMINGO_COORDINATOR=127.0.0.1:$port"
    "FLAMINGO_NUM_PROCESSES=$num_processes"
    "FLAMINGO_PROCESS_ID=$i"
    "JAX_PLATFORMS=cpu"
    "XLA_FLAGS=--xla_force_host_platform_device_count=$devices_per_process"
    "${program[@]}")
  commands+=("$(quoted "${command[@]}") > $(quoted "$logdir/process_$i.log") 2>&1")
done

if ((dry_run)); then
  quoted mkdir -p "$logdir"
  printf '%s &\n' "${commands[@]}"
  echo "wait"
  exit 0
fi

mkdir -p "$logdir"
pids=()
for command in "${commands[@]}"; do
  bash -c "exec $command" &
  pids+=("$!")
done
echo "local.sh: $num_processes processes on 127.0.0.1:$port, logs in $logdir/" >&2

status=0
for ((left = num_processes; left > 0; left--)); do
  wait -n "${pids[@]}" || status=$?
  if ((status)); then
    echo "local.sh: a process failed (exit $status); stopping the others" >&2
    kill "${pids[@]}" 2>/dev/null || true
    break
  fi
done
wait "${pids[@]}" 2>/dev/null || true
exit "$status"
