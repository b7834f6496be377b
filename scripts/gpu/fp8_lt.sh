#!/usr/bin/env bash
# FP8 GEMMs for decode batches past the matrix-vector kernel: bf16 against FP8 through each of
# the first cuBLASLt candidates (TANDEM_CUDA_LT_ALGO) and FP8 widened to bf16, with per-stage
# profiles, at batches 32 and 128 and 512 tokens of context, plus prefill at 2,048. Expects a
# stripped release build at target/gpu/tandem; writes $OUT/fp8-lt.json and $OUT/fp8-lt.log and
# prints a table last.
set -u
export LD_LIBRARY_PATH=/usr/local/cuda/lib64 NCCL_NVLS_ENABLE=0
B=target/gpu/tandem
LOG=$OUT/fp8-lt.log
W=$(mktemp -d)
SHAPES=${SHAPES:-llama-1b,llama-8b}
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader | tee -a $LOG
run() { local tag=$1; shift; env "$@" timeout 120 $B bench engine --shape $SHAPES --batches ${BATCHES:-32,128} --contexts 512 --prefill 2048 --iters 10 --profile --output $W/$tag.json >> $LOG 2>&1; echo "$tag rc=$?"; }
run bf16 TANDEM_CUDA_WEIGHTS=bf16
for a in ${ALGOS:-0 1 2 3}; do run lt$a TANDEM_CUDA_WEIGHTS=fp8 TANDEM_CUDA_LT_ALGO=$a; done
run widen TANDEM_CUDA_WEIGHTS=fp8 TANDEM_CUDA_FP8_GEMM=widen
python3 scripts/gpu/collect.py $W fp8-lt.json --stages qkv,o,gate_up,down,attention
