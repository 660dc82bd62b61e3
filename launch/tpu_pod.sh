#!/usr/bin/env bash
# Trains on a Cloud TPU VM slice: every worker (host) runs the same flamingo-train command;
# flamingo_jax.distributed finds the other workers itself.
#
#   launch/tpu_pod.sh run    --name NAME --zone ZONE --project PROJECT \
#       [--type v5p-128] [--runtime v2-alpha-tpuv5] [--queued] [--spot] \
#       -- --config experiments/flamingo_9b.py --workdir /mnt/shared/runs/9b
#   launch/tpu_pod.sh logs   --name NAME --zone ZONE --project PROJECT
#   launch/tpu_pod.sh stop   --name NAME --zone ZONE --project PROJECT
#   launch/tpu_pod.sh delete --name NAME --zone ZONE --project PROJECT [--queued]
#
# run:    creates the slice unless it exists (a queued resource with --queued, waiting
#         until it is ACTIVE), copies this checkout to every worker, installs it, starts the
#         command on every worker (--worker=all) in the background and streams worker 0's
#         log. --workdir must be storage every worker shares (e.g. an NFS or gcsfuse mount):
#         orbax writes one checkpoint from all hosts.
# logs:   streams worker 0's log again.
# stop:   stops the training process on every worker (the slice stays).
# delete: deletes the slice (or the queued resource).
#
# Options: --entry MODULE (default flamingo_jax.train), --dry-run (print the commands).
set -euo pipefail

subcommand="${1:-}"
[[ -n "$subcommand" ]] && shift
name=""
zone=""
project=""
type="v5p-128"
runtime="v2-alpha-tpuv5"
queued=0
spot=0
entry="flamingo_jax.train"
dry_run=0

usage() {
  sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'
  exit "${1:-0}"
}

while (($#)); do
  case "$1" in
    --name) name="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --type) type="$2"; shift 2 ;;
    --runtime) runtime="$2"; shift 2 ;;
    --queued) queued=1; shift ;;
    --spot) spot=1; shift ;;
    --entry) entry="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h | --help) usage 0 ;;
    --) shift; break ;;
    *) echo "tpu_pod.sh: unknown option $1 (program flags go after --)" >&2; usage 2 ;;
  esac
done

case "$subcommand" in
  run | logs | stop | delete) ;;
  -h | --help) usage 0 ;;
  *) echo "tpu_pod.sh: first argument must be run, logs, stop or delete, got '$subcommand'" >&2
    usage 2 ;;
esac
for required in name zone project; do
  if [[ -z "${!required}" ]]; then
    echo "tpu_pod.sh: --$required is required" >&2
    exit 2
  fi
done
if [[ "$subcommand" == run && $# -eq 0 ]]; then
  echo "tpu_pod.sh run: give the program flags after --, e.g. -- --config X --workdir DIR" >&2
  exit 2
fi

# shellcheck source=launch/commands.sh
source "$(dirname "$0")/commands.sh"


where=(--zone "$zone" --project "$project")
remote_dir="flamingo_jax"  # in each worker's home directory
log="flamingo_train.log"
pid_file="flamingo_train.pid"

ssh_all() {
  run gcloud compute tpus tpu-vm ssh "$name" "${where[@]}" --worker=all --command "$1"
}

slice_exists() {
  if ((dry_run)); then
    quoted gcloud compute tpus tpu-vm describe "$name" "${where[@]}" --format=value\(state\)
    echo "# when it does not exist:"
    return 1
  fi
  gcloud compute tpus tpu-vm describe "$name" "${where[@]}" --format='value(state)' \
    >/dev/null 2>&1
}

create_slice() {
  local extra=()
  ((spot)) && extra+=(--spot)
  if ((queued)); then
    run gcloud compute tpus queued-resources create "$name" "${where[@]}" --node-id "$name" \
      --accelerator-type "$type" --runtime-version "$runtime" "${extra[@]}"
    if ((dry_run)); then
      echo "# then every 30 s until it prints ACTIVE:"
      quoted gcloud compute tpus queued-resources describe "$name" "${where[@]}" \
        --format=value\(state.state\)
      return
    fi
    local state=""
    until [[ "$state" == ACTIVE ]]; do
      state="$(gcloud compute tpus queued-resources describe "$name" "${where[@]}" \
        --format='value(state.state)')"
      echo "tpu_pod.sh: queued resource $name is $state" >&2
      case "$state" in
        FAILED | SUSPENDED) exit 1 ;;
        ACTIVE) ;;
        *) sleep 30 ;;
      esac
    done
  else
    run gcloud compute tpus tpu-vm create "$name" "${where[@]}" --accelerator-type "$type" \
      --version "$runtime" "${extra[@]}"
  fi
}

case "$subcommand" in
  run)
    slice_exists || create_slice
    archive="${TMPDIR:-/tmp}/$name-code.tar.gz"
    run tar --exclude=./.git --exclude=./.venv --exclude=./workdirs -czf "$archive" \
      -C "$(cd "$(dirname "$0")/.." && pwd)" .
    run gcloud compute tpus tpu-vm scp "$archive" "$name:code.tar.gz" "${where[@]}" --worker=all
    unpack="rm -rf $remote_dir && mkdir -p $remote_dir && tar -xzf code.tar.gz -C $remote_dir"
    install="python3 -m pip install --quiet -c constraints.txt -e . 'jax[tpu]'"
    ssh_all "$unpack && cd $remote_dir && $install"
    program="$(quoted python3 -m "$entry" "$@")"
    ssh_all "cd $remote_dir && nohup $program < /dev/null > ~/$log 2>&1 & echo \$! > ~/$pid_file"
    run gcloud compute tpus tpu-vm ssh "$name" "${where[@]}" --worker=0 --command "tail -F ~/$log"
    ;;
  logs)
    run gcloud compute tpus tpu-vm ssh "$name" "${where[@]}" --worker=0 --command "tail -F ~/$log"
    ;;
  stop)
    ssh_all "if [ -f ~/$pid_file ]; then kill \$(cat ~/$pid_file) || true; rm -f ~/$pid_file; fi"
    ;;
  delete)
    if ((queued)); then
      run gcloud compute tpus queued-resources delete "$name" "${where[@]}" --force --quiet
    else
      run gcloud compute tpus tpu-vm delete "$name" "${where[@]}" --quiet
    fi
    ;;
esac
