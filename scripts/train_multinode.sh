#!/usr/bin/env bash
# Multi-node launch with torchrun's c10d rendezvous; run the same command on every node.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 scripts/train_multinode.sh train_configs/paper_182M_remoe.toml [overrides]
# Environment: NNODES (required), NODE_RANK (required), MASTER_ADDR (required: the rendezvous host,
# usually node 0), MASTER_PORT (default 29500), NPROC_PER_NODE (default: GPUs on this node, else 1),
# RDZV_ID (default remoe; give concurrent jobs different ids).
set -euo pipefail
if [[ $# -lt 1 ]]; then
    echo "usage: NNODES=.. NODE_RANK=.. MASTER_ADDR=.. $0 CONFIG.toml [--section.key value ...]" >&2
    exit 2
fi
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}"
config="$1"
shift
gpus=$(python -c 'import torch; print(torch.cuda.device_count())')
nproc="${NPROC_PER_NODE:-$(( gpus > 0 ? gpus : 1 ))}"
exec torchrun \
    --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$nproc" \
    --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv_id "${RDZV_ID:-remoe}" \
    -m remoe_recipe.train --job.config_file "$config" "$@"
