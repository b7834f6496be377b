#!/usr/bin/env bash
# Each projection of the 1B and 8B shapes timed alone (`tandem bench engine --projections`), bf16
# against FP8, under each FP8 kernel choice: the default tensor-core matrix-vector kernel, its
# variants (TANDEM_CUDA_FP8_MMA), the CUDA-core kernel, and cuBLASLt's first candidates
# (TANDEM_CUDA_LT_ALGO) past 16 tokens. Expects a stripped release build at target/gpu/tandem;
# writes $OUT/fp8-sweep.json and $OUT/fp8-sweep.log and prints a table last.
set -u
export LD_LIBRARY_PATH=/usr/local/cuda/lib64 NCCL_NVLS_ENABLE=0
B=target/gpu/tandem
LOG=$OUT/fp8-sweep.log
W=$(mktemp -d)
SHAPES=${SHAPES:-llama-1b,llama-8b}
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader | tee -a $LOG
run() { local tag=$1 n=$2; shift 2; env "$@" timeout 120 $B bench engine --shape $SHAPES --projections $n --iters 20 --output $W/$tag.json >> $LOG 2>&1; echo "$tag rc=$?"; }
run mma 1,2,4,8,16 TANDEM_CUDA_WEIGHTS=fp8
for v in ${VARIANTS:-u8 w4 sx}; do run $v 1,8 TANDEM_CUDA_FP8_MMA=$v; done
run simt 1,8 TANDEM_CUDA_FP8_GEMV=simt
for a in ${ALGOS:-0 1 2 3}; do run lt$a 32,64,128 TANDEM_CUDA_LT_ALGO=$a; done
run widen 32,128 TANDEM_CUDA_FP8_GEMM=widen
python3 scripts/gpu/collect.py $W fp8-sweep.json
