#!/usr/bin/env bash
# Single-node launch: one process per visible GPU, or one CPU process when there is none.
#   scripts/train.sh train_configs/debug_remoe.toml [--section.key value ...]
# NGPU overrides the detected process count (e.g. NGPU=4 on an 8-GPU node, or NGPU=2 on CPU for a
# 2-process gloo run).
set -euo pipefail
if [[ $# -lt 1 || "$1" == -* ]]; then
    echo "usage: $0 CONFIG.toml [--section.key value ...]" >&2
    exit 2
fi
config="$1"
shift
if [[ ! -f "$config" ]]; then
    echo "config error: --job.config_file $config: no such file" >&2
    exit 2
fi
ngpu="${NGPU:-$(python -c 'import torch; print(torch.cuda.device_count())')}"
nproc=$(( ngpu > 0 ? ngpu : 1 ))
if [[ "$nproc" -eq 1 ]]; then
    exec python -m remoe_recipe.train --job.config_file "$config" "$@"
fi
exec torchrun --standalone --nproc_per_node "$nproc" -m remoe_recipe.train --job.config_file "$config" "$@"
