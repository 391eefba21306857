#!/usr/bin/env bash
# Two "nodes" on one machine: two torchrun agents (--nnodes 2, --node_rank 0 and 1, c10d rendezvous on
# localhost) train one run together, exactly as scripts/train_multinode.sh runs on two hosts. Use it to
# try a multi-node config (and the rendezvous) before a cluster job.
#   scripts/multinode_local.sh CONFIG.toml [--section.key value ...]
# Environment: NPROC_PER_NODE (default 1), MASTER_PORT (default: a free port), LOG_DIR (default
# ./outputs/multinode_local; node0.log and node1.log), OMP_NUM_THREADS (default 1).
set -euo pipefail
if [[ $# -lt 1 ]]; then
    echo "usage: $0 CONFIG.toml [--section.key value ...]" >&2
    exit 2
fi
here="$(cd "$(dirname "$0")" && pwd)"
log_dir="${LOG_DIR:-./outputs/multinode_local}"
mkdir -p "$log_dir"
port="${MASTER_PORT:-$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
pids=()
for node in 0 1; do
    NNODES=2 NODE_RANK="$node" MASTER_ADDR=localhost MASTER_PORT="$port" RDZV_ID="local-$port" \
        NPROC_PER_NODE="${NPROC_PER_NODE:-1}" "$here/train_multinode.sh" "$@" >"$log_dir/node$node.log" 2>&1 &
    pids+=("$!")
done
status=0
for node in 0 1; do
    if ! wait "${pids[$node]}"; then
        status=1
        echo "node $node failed; last lines of $log_dir/node$node.log:" >&2
        tail -n 20 "$log_dir/node$node.log" >&2
    fi
done
[[ $status -eq 0 ]] && echo "both nodes finished; logs in $log_dir"
exit "$status"
