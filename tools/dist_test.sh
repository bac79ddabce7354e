#!/usr/bin/env bash
# The original's test command:  bash tools/dist_test.sh CONFIG CHECKPOINT NUM_GPUS --eval mIoU [args ...]
#
#   NUM_GPUS  processes on this node; on a machine without GPU they run on the CPU with gloo.
#             Empty or "auto" = all visible GPUs (1 process without GPU).
#   the rest  passed to `larvseg eval`: --eval mIoU, --out DIR, key=value overrides
# Multi-node / fixed port: NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT (or PORT) as in dist_train.sh.
set -euo pipefail

if [ $# -lt 2 ]; then
    echo "usage: bash $0 CONFIG CHECKPOINT [NUM_GPUS] --eval mIoU [key=value ...] [--out DIR]" >&2
    exit 2
fi
CONFIG=$1
CHECKPOINT=$2
shift 2
if [ $# -ge 1 ] && [[ $1 =~ ^([0-9]+|auto)$ ]]; then
    GPUS=$1
    shift
else
    GPUS=auto
fi
PYTHON=${PYTHON:-python}

if [ "$GPUS" = auto ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
    else
        GPUS=0
    fi
    [ "$GPUS" -ge 1 ] || GPUS=1
fi

if [ "${NNODES:-1}" = 1 ] && [ -z "${MASTER_ADDR:-}" ] && [ -z "${MASTER_PORT:-}" ] && [ -z "${PORT:-}" ]; then
    # one node: torchrun's standalone rendezvous picks a free port (several jobs can share a machine)
    RDZV=(--standalone)
else
    RDZV=(--nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}"
          --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${MASTER_PORT:-${PORT:-29500}}")
fi

exec "$PYTHON" -m torch.distributed.run "${RDZV[@]}" --nproc_per_node="$GPUS" \
    -m larvseg.cli eval "$CONFIG" "$CHECKPOINT" "$@"
