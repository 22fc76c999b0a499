#!/usr/bin/env bash
# Train on this machine with all its local devices (CPU cores, GPUs or one TPU VM host).
#
#   launch/local.sh CONFIG WORKDIR [--config.key=value ...]
#   launch/local.sh configs/demo.py workdirs/demo
#   launch/local.sh configs/grain_cc12m.py:variant=B/16 /data/runs/grain_b16 --config.data.dir=/data/cc12m_prepared
#
# Rerunning the same command resumes from WORKDIR's newest checkpoint.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  sed -n '2,9p' "$0"; exit 2
fi
config=$1; workdir=$2; shift 2
cd "$(dirname "$0")/.."
exec grain-jax-train --config "$config" --workdir "$workdir" "$@"
