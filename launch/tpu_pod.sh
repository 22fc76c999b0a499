#!/usr/bin/env bash
# Run the same training command on every worker of an EXISTING Cloud TPU VM (single host or pod
# slice); creates nothing. JAX finds the coordinator and process ids on TPU VMs itself.
#
#   launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.key=value ...]
#   launch/tpu_pod.sh my-v5p-64 us-east5-a configs/grain_cc12m.py:variant=B/16 /mnt/shared/grain_b16 \
#       --config.data.dir=/mnt/shared/cc12m_prepared
#
# Environment: REPO (git URL to install from, default: this checkout's origin), BRANCH (default:
# main), PROJECT (gcloud project, default: the active one). WORKDIR and data.dir must be
# reachable from every worker at the same path: a shared filesystem mount (NFS/Filestore, or a
# bucket mounted with GCS FUSE); gs:// URLs are not read directly. Rerun to resume; SIGTERM/maintenance events
# save a checkpoint at the next step (JAX preemption service).
set -euo pipefail
if [[ $# -lt 4 ]]; then
  sed -n '2,13p' "$0"; exit 2
fi
tpu=$1; zone=$2; config=$3; workdir=$4; shift 4
repo=${REPO:-$(git -C "$(dirname "$0")/.." remote get-url origin)}
branch=${BRANCH:-main}
project_flag=${PROJECT:+--project=$PROJECT}

quote() { if (( $# )); then printf '%q ' "$@"; fi; }  # nothing (not '') for no arguments
remote="set -euo pipefail
if [ ! -d grain_jax ]; then git clone --branch $(quote "$branch") $(quote "$repo") grain_jax; fi
cd grain_jax && git fetch -q origin && git checkout -q $(quote "$branch") && git pull -q
python3 -m pip install -q -U 'jax[tpu]>=0.10.2,<0.11' && python3 -m pip install -q -e .
python3 -m grain_jax.cli.train --config $(quote "$config") --workdir $(quote "$workdir") $(quote "$@")"

# shellcheck disable=SC2086
exec gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" $project_flag --worker=all --command="$remote"
