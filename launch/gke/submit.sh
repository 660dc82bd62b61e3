#!/usr/bin/env bash
# Runs flamingo-train as a JobSet on a GKE TPU slice node pool or GPU node pool: renders
# launch/gke/{tpu,gpu}_jobset.yaml, applies it, waits for process 0's pod and streams its log.
# The image must hold this checkout installed (pip install -e .) with jax for its devices.
#
#   launch/gke/submit.sh --accelerator tpu --name flamingo-9b --image IMAGE --hosts 16 \
#       [--tpu_accelerator tpu-v5p-slice] [--tpu_topology 4x4x4] [--devices_per_host 4] \
#       -- --config experiments/flamingo_9b.py --workdir /mnt/shared/runs/9b
#   launch/gke/submit.sh --accelerator gpu --name flamingo-9b --image IMAGE --hosts 8 \
#       [--gpu_type nvidia-h100-80gb] [--devices_per_host 8] [--port 12345] -- ...
#   launch/gke/submit.sh --delete --name flamingo-9b
#
# Other options: --max_restarts N (JobSet restarts after a failure, default 0), --entry
# MODULE (default flamingo_jax.train), --out FILE (rendered manifest, default
# workdirs/gke/NAME.yaml), --dry-run (print the manifest and the commands instead).
# --workdir must be storage every pod shares: orbax writes one checkpoint from all hosts.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=launch/commands.sh
source "$here/../commands.sh"

accelerator=""
name=""
image=""
hosts=""
devices_per_host=""
tpu_accelerator="tpu-v5p-slice"
tpu_topology="4x4x4"
gpu_type="nvidia-h100-80gb"
port=12345
max_restarts=0
entry="flamingo_jax.train"
out=""
delete=0
dry_run=0

usage() {
  sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
  exit "${1:-0}"
}

while (($#)); do
  case "$1" in
    --accelerator) accelerator="$2"; shift 2 ;;
    --name) name="$2"; shift 2 ;;
    --image) image="$2"; shift 2 ;;
    --hosts) hosts="$2"; shift 2 ;;
    --devices_per_host) devices_per_host="$2"; shift 2 ;;
    --tpu_accelerator) tpu_accelerator="$2"; shift 2 ;;
    --tpu_topology) tpu_topology="$2"; shift 2 ;;
    --gpu_type) gpu_type="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --max_restarts) max_restarts="$2"; shift 2 ;;
    --entry) entry="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --delete) delete=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h | --help) usage 0 ;;
    --) shift; break ;;
    *) echo "submit.sh: unknown option $1 (program flags go after --)" >&2; usage 2 ;;
  esac
done

if [[ -z "$name" ]]; then
  echo "submit.sh: --name is required" >&2
  exit 2
fi
if ((delete)); then
  run kubectl delete jobset "$name"
  exit 0
fi
case "$accelerator" in
  tpu) devices_per_host="${devices_per_host:-4}" ;;
  gpu) devices_per_host="${devices_per_host:-8}" ;;
  *) echo "submit.sh: --accelerator must be tpu or gpu, got '$accelerator'" >&2; exit 2 ;;
esac
if [[ -z "$image" ]] || ! [[ "$hosts" =~ ^[1-9][0-9]*$ ]]; then
  echo "submit.sh: --image and --hosts (a positive integer) are required" >&2
  exit 2
fi
if (($# == 0)); then
  echo "submit.sh: give the program flags after --, e.g. -- --config X --workdir DIR" >&2
  exit 2
fi

# The program flags as a YAML flow sequence of double-quoted strings.
args=""
for word in "$@"; do
  word="${word//\\/\\\\}"
  args+="${args:+, }\"${word//\"/\\\"}\""
done

manifest="$(<"$here/${accelerator}_jobset.yaml")"
for key in NAME IMAGE HOSTS DEVICES_PER_HOST TPU_ACCELERATOR TPU_TOPOLOGY GPU_TYPE PORT \
  MAX_RESTARTS ENTRY ARGS; do
  case "$key" in
    NAME) value="$name" ;;
    IMAGE) value="$image" ;;
    HOSTS) value="$hosts" ;;
    DEVICES_PER_HOST) value="$devices_per_host" ;;
    TPU_ACCELERATOR) value="$tpu_accelerator" ;;
    TPU_TOPOLOGY) value="$tpu_topology" ;;
    GPU_TYPE) value="$gpu_type" ;;
    PORT) value="$port" ;;
    MAX_RESTARTS) value="$max_restarts" ;;
    ENTRY) value="$entry" ;;
    ARGS) value="[$args]" ;;
  esac
  manifest="${manifest//"{{$key}}"/"$value"}"
done

out="${out:-workdirs/gke/$name.yaml}"
first_pod="jobset.sigs.k8s.io/jobset-name=$name,batch.kubernetes.io/job-completion-index=0"
if ((dry_run)); then
  echo "# $out"
  printf '%s\n' "$manifest"
else
  mkdir -p "$(dirname "$out")"
  printf '%s\n' "$manifest" >"$out"
fi
run kubectl apply -f "$out"
run kubectl wait --for=condition=Ready pod -l "$first_pod" --timeout=60m
run kubectl logs -f -l "$first_pod" --tail=-1
