#!/usr/bin/env bash
# Launch addernet-train with torchrun on one node or many.
#
#   launch/torchrun.sh CONFIG [dotted.key=value ...]
#
# Environment (all optional on one node):
#   NPROC_PER_NODE  processes per node (default: number of GPUs, or 1 on a CPU-only machine)
#   NNODES          number of nodes (default 1)
#   RDZV_ENDPOINT   host:port of the c10d rendezvous, the first node's address (required when
#                   NNODES > 1; every node runs this same script with the same value)
#   RDZV_ID         job id shared by all nodes (default: addernet)
#   MAX_RESTARTS    torchrun --max-restarts (default 3): a failed worker group restarts and
#                   resumes from the newest valid checkpoint (config resume=auto)
#
# Examples:
#   launch/torchrun.sh configs/digits.yaml                                   # this machine
#   NNODES=4 RDZV_ENDPOINT=node001:29500 RDZV_ID=r50 \
#     launch/torchrun.sh configs/imagenet_resnet50.yaml data.root=/data/imagenet   # on each node
set -euo pipefail

if [[ $# -lt 1 ]]; then
  sed -n '2,20p' "$0"
  exit 2
fi
CONFIG=$1
shift

NNODES=${NNODES:-1}
MAX_RESTARTS=${MAX_RESTARTS:-3}
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE=$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")
fi

if [[ "$NNODES" == 1 && -z "${RDZV_ENDPOINT:-}" ]]; then
  RDZV=(--standalone)
else
  : "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port (the first node) when NNODES > 1}"
  RDZV=(--nnodes="$NNODES" --rdzv_backend=c10d --rdzv_endpoint="$RDZV_ENDPOINT"
        --rdzv_id="${RDZV_ID:-addernet}")
fi

exec torchrun "${RDZV[@]}" --nproc_per_node="$NPROC_PER_NODE" --max-restarts="$MAX_RESTARTS" \
  -m addernet_dist.train --config "$CONFIG" "$@"
