#!/usr/bin/env bash
# FP8 weights against bf16 in one session on one GPU: the float64 checks (FP8 quantiser against
# the host's rounding, FP8 projections, whole models in bf16 and FP8 against transformers), then
# `tandem bench engine` with bf16 and FP8 projections (the FP8 kernels chosen by shape, and the
# first tensor-core form everywhere: TANDEM_CUDA_FP8_MMA=base) alternated REPS times (decode
# batches 1 to 8 and 16 to 128 at 512 tokens, batches 1 and 128 at 4,096, prefill at 512 and
# 2,048), and a per-stage profile of each at batch 1. PARTS (default checks,ab,long,profile)
# picks the stages so that they can be split across calls; `kchecks` runs only the FP8 kernel
# checks (no models), once per kernel choice. Expects a stripped release build at target/gpu/tandem;
# writes $OUT/checks.json, $OUT/fp8-<parts>.json (every run, tagged) and $OUT/fp8.log, and
# prints a table last.
set -u
export LD_LIBRARY_PATH=/usr/local/cuda/lib64 NCCL_NVLS_ENABLE=0
B=target/gpu/tandem
LOG=$OUT/fp8.log
W=$(mktemp -d)
SHAPES=${SHAPES:-llama-1b,llama-8b}
PARTS=${PARTS:-checks,ab,long,profile}
has() { [[ ",$PARTS," == *",$1,"* ]]; }
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader | tee -a $LOG
if has checks; then
( python3 scripts/gpu/reference.py --out /tmp/ref >> $LOG 2>&1 && TANDEM_CUDA_FUSE=1 TANDEM_CUDA_SPLITK=1 timeout 240 $B bench gpu-check --reference /tmp/ref --output $OUT/checks.json >> $LOG 2>&1 ); echo "checks rc=$?"
grep -c '"passed": true' $OUT/checks.json; grep -B3 '"passed": false' $OUT/checks.json | grep name
grep -A3 'FP8\|fp8' $OUT/checks.json | grep '"name"\|rel_err\|detail' | paste - - - | cut -c1-220
fi
if has kchecks; then for v in auto base u8 w4 sx; do
  TANDEM_CUDA_FP8_MMA=$v timeout 120 $B bench gpu-check --groups fp8 --output $W/kcheck_$v.json >> $LOG 2>&1
  echo "fp8 kernel checks, TANDEM_CUDA_FP8_MMA=$v: rc=$? passed $(grep -c '"passed": true' $W/kcheck_$v.json), failed $(grep -c '"passed": false' $W/kcheck_$v.json)"
done; fi
run() { local tag=$1; shift; env "$@" timeout ${T:-120} $B bench engine --shape $SHAPES --output $W/$tag.json $ARGS >> $LOG 2>&1; echo "$tag rc=$?"; }
ARGS="--batches 1,2,4,8,16,32,128 --contexts 512 --prefill 512,2048 --iters 10"
if has ab; then for i in ${REPS:-1 2}; do
  run bf16_$i TANDEM_CUDA_WEIGHTS=bf16; run fp8_$i TANDEM_CUDA_WEIGHTS=fp8
  run fp8base_$i TANDEM_CUDA_WEIGHTS=fp8 TANDEM_CUDA_FP8_MMA=base
done; fi
ARGS="--batches 1,128 --contexts 4096 --prefill= --iters 10"
if has long; then run long_bf16 TANDEM_CUDA_WEIGHTS=bf16; run long_fp8 TANDEM_CUDA_WEIGHTS=fp8; fi
ARGS="--batches 1 --contexts 512 --prefill= --iters 5 --profile"
if has profile; then
  run profile_bf16 TANDEM_CUDA_WEIGHTS=bf16; run profile_fp8 TANDEM_CUDA_WEIGHTS=fp8
  run profile_fp8base TANDEM_CUDA_WEIGHTS=fp8 TANDEM_CUDA_FP8_MMA=base
fi
python3 scripts/gpu/collect.py $W fp8-${PARTS//,/-}.json
