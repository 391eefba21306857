#!/usr/bin/env bash
# The GPU benchmark in one command (benchmarks/gpu.py): the 182M E=8 ReMoE and TopK training step on one
# GPU (tokens/s, MFU on active FLOPs, peak memory, host syncs under torch.cuda.set_sync_debug_mode) and the
# MoE layer against torchtitan's. Without a GPU it runs the same code at toy sizes only with --dry.
#   benchmarks/gpu.sh [--dry] [--no-compile] [--budget SECONDS] [--out FILE]
set -euo pipefail
cd "$(dirname "$0")/.."
# cuBLAS needs a fixed workspace for torch.use_deterministic_algorithms (the determinism check).
export CUBLAS_WORKSPACE_CONFIG=:4096:8
export PYTHONUNBUFFERED=1
if ! "${PYTHON:-python3}" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' \
    && [[ " $* " != *" --dry "* ]]; then
    echo "benchmarks/gpu.sh: no CUDA device; use --dry for a CPU smoke test" >&2
    exit 2
fi
exec "${PYTHON:-python3}" -m benchmarks.gpu "$@"
