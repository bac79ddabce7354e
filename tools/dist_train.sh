#!/usr/bin/env bash
# The original's training command:  bash tools/dist_train.sh CONFIG [GPUS] [larvseg train args ...]
#
#   CONFIG  a config file or packaged config name (larvseg/configs)
#   GPUS    processes on this node; default: all visible GPUs (nvidia-smi / torch.cuda.device_count),
#           or 1 on a machine without GPU (then the processes run on the CPU with gloo)
#   extra   passed to `larvseg train`: key=value overrides, --work-dir DIR, --resume auto|none|PATH
#
# Multi-node: on every node run the same command with NNODES, NODE_RANK (0..NNODES-1), MASTER_ADDR (node
# 0's address) and MASTER_PORT (or PORT; default 29500) set, as for torchrun; GPUS is per node. On one
# node without them, torchrun --standalone picks a free port.
set -euo pipefail

if [ $# -lt 1 ]; then
    echo "usage: bash $0 CONFIG [GPUS] [key=value ...] [--work-dir DIR] [--resume auto|none|PATH]" >&2
    exit 2
fi
CONFIG=$1
shift
if [ $# -ge 1 ] && [[ $1 =~ ^[0-9]+$ ]]; then
    GPUS=$1
    shift
else
    GPUS=""
fi
PYTHON=${PYTHON:-python}

if [ -z "$GPUS" ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
    else
        GPUS=0
    fi
    [ "$GPUS" -ge 1 ] || GPUS=1   # no GPU: one CPU process
fi

if [ "${NNODES:-1}" = 1 ] && [ -z "${MASTER_ADDR:-}" ] && [ -z "${MASTER_PORT:-}" ] && [ -z "${PORT:-}" ]; then
    # one node: torchrun's standalone rendezvous picks a free port (several jobs can share a machine)
    RDZV=(--standalone)
else
    RDZV=(--nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}"
          --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${MASTER_PORT:-${PORT:-29500}}")
fi

exec "$PYTHON" -m torch.distributed.run "${RDZV[@]}" --nproc_per_node="$GPUS" \
    -m larvseg.cli train "$CONFIG" "$@"
