#!/usr/bin/env bash
# The tensor-core FP8 matrix-vector kernel in each of its forms (TANDEM_CUDA_FP8_MMA: chosen by
# shape, the first form, and each variant everywhere), the
# CUDA-core FP8 kernel and bf16, in one session on one GPU: each variant's kernel checks first
# (the FP8 group of `gpu-check`: float64 references, no models; it also exercises the cuBLASLt
# FP8 GEMM for 17 and 96 tokens), then `tandem bench engine --profile` at batch 1 and 8 and 512
# tokens of context. Expects a stripped release build at target/gpu/tandem; writes
# $OUT/fp8-variants.json and $OUT/fp8-variants.log, and prints a table last.
set -u
export LD_LIBRARY_PATH=/usr/local/cuda/lib64 NCCL_NVLS_ENABLE=0
B=target/gpu/tandem
LOG=$OUT/fp8-variants.log
W=$(mktemp -d)
SHAPES=${SHAPES:-llama-1b,llama-8b}
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader | tee -a $LOG
for v in ${VARIANTS:-auto base u8 w4 sx}; do
  env TANDEM_CUDA_FUSE=1 TANDEM_CUDA_SPLITK=1 TANDEM_CUDA_FP8_MMA=$v RUST_LOG=warn timeout 150 $B bench gpu-check --groups fp8 --output $W/check_$v.json >> $LOG 2>&1
  echo "checks $v rc=$? $(grep -c 'tensor-core kernel' $W/check_$v.json) tensor-core checks, failed: $(grep -c '"passed": false' $W/check_$v.json)"
done
W=$W python3 -c "
import json, glob, os
for f in sorted(glob.glob(os.environ['W'] + '/check_*.json')):
    for c in json.load(open(f)):
        if 'for 17 ' in c['name'] or 'for 96 ' in c['name'] or not c['passed']:
            print(os.path.basename(f), c['name'], c['passed'], c['rel_err'], c['detail'])"
grep -m3 cuBLASLt $LOG
run() { local tag=$1; shift; env "$@" timeout 120 $B bench engine --shape $SHAPES --batches 1,8 --contexts 512 --prefill= --iters 10 --profile --output $W/$tag.json >> $LOG 2>&1; echo "$tag rc=$?"; }
for i in ${REPS:-1 2}; do
  run bf16_$i TANDEM_CUDA_WEIGHTS=bf16
  run simt_$i TANDEM_CUDA_WEIGHTS=fp8 TANDEM_CUDA_FP8_GEMV=simt
  for v in auto base u8 w4 sx; do run ${v}_$i TANDEM_CUDA_WEIGHTS=fp8 TANDEM_CUDA_FP8_MMA=$v; done
done
python3 scripts/gpu/collect.py $W fp8-variants.json --stages qkv,o,gate_up,down
