#!/usr/bin/env bash
# Tensor-parallel groups on one machine of two or more GPUs, in one go:
#   1. reference models (scripts/gpu/reference.py) at TP=1 and TP=2 against transformers in
#      float64, and TP=2 against TP=1 on the same weights (`tandem bench gpu-check --tp 1,2`);
#   2. decode and prefill speed of the 8B shape at TP=1 (one GPU) and TP=2 (two), with a per-stage
#      breakdown that shows the all-reduce's share of a step (`tandem bench engine --tp 1,2`).
# Usage: scripts/gpu/tp_run.sh BIN_DIR OUT_DIR   (BIN_DIR holds a release `tandem`)
set -euo pipefail
BIN=${1:?bin dir}
OUT=${2:?out dir}
mkdir -p "$OUT"
# NCCL's runtime package ships libnccl.so.2 only; the dynamic loader is asked for libnccl.so.
if ! ldconfig -p | grep -q 'libnccl\.so '; then
    lib=$(ldconfig -p | awk '/libnccl\.so\.2/ {print $NF; exit}')
    [ -n "$lib" ] || lib=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(nvidia.nccl.__path__[0], "lib", "libnccl.so.2"))')
    mkdir -p /tmp/nccl-lib && ln -sf "$lib" /tmp/nccl-lib/libnccl.so
    export LD_LIBRARY_PATH=/tmp/nccl-lib:${LD_LIBRARY_PATH:-}
fi
export NCCL_NVLS_ENABLE=0 NCCL_DEBUG=${NCCL_DEBUG:-WARN}
nvidia-smi topo -m | head -5 || true
python3 scripts/gpu/reference.py --out /tmp/reference >/dev/null
"$BIN/tandem" bench gpu-check --reference /tmp/reference --tp 1,2 --output "$OUT/tp_check.json" 2>&1 | grep -v "^kernel " || true
"$BIN/tandem" bench engine --shape llama-8b --tp 1,2 --batches 1,32,128 --contexts 512,4096 \
    --prefill 2048,8192 --profile --output "$OUT/tp_engine.json" 2>/dev/null
