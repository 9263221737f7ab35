#!/usr/bin/env bash
# addernet-train under DeepSpeed's own launcher; forces engine=deepspeed (see docs/deepspeed.md).
#
#   one node, every GPU:   launch/deepspeed.sh configs/X.yaml deepspeed.zero_stage=2
#   one node, CPU (CI):    DS_ACCELERATOR=cpu NPROC=2 launch/deepspeed.sh configs/debug.yaml
#   several nodes:         HOSTFILE=launch/hostfile launch/deepspeed.sh configs/X.yaml [key=value ...]
#     (run on the first host of the file; needs passwordless ssh to every host, the same checkout
#      path and Python env everywhere, and output_dir on a shared file system: each rank writes its
#      own ZeRO shard into the checkpoint folder. Variables the remote ranks need, e.g.
#      NCCL_SOCKET_IFNAME, go into ~/.deepspeed_env or ./.deepspeed_env as NAME=value lines.)
#
# The same run under torchrun (one torchrun per node) needs no script:
#   torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST0:29500 \
#       -m addernet_dist.train --config configs/X.yaml engine=deepspeed
#
# Environment: NPROC processes per node (default: every visible GPU; required on CPU),
# HOSTFILE, MASTER_ADDR (default: first host of HOSTFILE, else 127.0.0.1), MASTER_PORT (29500),
# DRY_RUN=1 prints the command instead of running it.
set -euo pipefail

if [[ $# -lt 1 || "$1" == -h || "$1" == --help ]]; then
  sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
config=$1
shift
if [[ ! -f "$config" ]]; then
  echo "error: config file '$config' not found; pass configs/<name>.yaml" >&2
  exit 2
fi

launcher=()
if [[ -n "${HOSTFILE:-}" ]]; then
  if [[ ! -f "$HOSTFILE" ]]; then
    echo "error: HOSTFILE '$HOSTFILE' not found; see launch/hostfile.example" >&2
    exit 2
  fi
  launcher+=(--hostfile "$HOSTFILE")
  # The rendezvous runs on the first host listed (comments and blank lines skipped).
  MASTER_ADDR=${MASTER_ADDR:-$(awk '!/^[[:space:]]*(#|$)/ {print $1; exit}' "$HOSTFILE")}
fi
if [[ -n "${NPROC:-}" ]]; then
  launcher+=(--num_gpus "$NPROC")
elif [[ "${DS_ACCELERATOR:-}" == cpu ]]; then
  echo "error: set NPROC (processes per node) for a CPU run, e.g. NPROC=2" >&2
  exit 2
fi

cmd=(
  deepspeed "${launcher[@]}"
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}"
  # our argparse takes no --local_rank: ranks read LOCAL_RANK from the environment
  --no_local_rank
  --module addernet_dist.train --config "$config" engine=deepspeed "$@"
)
if [[ -n "${DRY_RUN:-}" ]]; then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
exec "${cmd[@]}"
