#!/usr/bin/env bash
# Every lever of the engine, off and on, in one short session on one GPU: the float64 checks
# (attention kernels, split-K and fused projections, whole models; split-K and fusion on), then `tandem bench engine`
# with one setting changed at a time against the defaults: prefill attention pipelined and wide
# (with transformers SDPA prefill in the same session), split-K off and on at decode batches
# 8 to 128, the fused norm/SiLU matrix-vector kernels off and on at batches 1 and 2, and batch-1
# decode at 32,768 and 131,000 tokens. Expects a stripped release build at target/gpu/tandem;
# writes $OUT/checks.json, $OUT/levers.json (every run, tagged) and $OUT/levers.log, and prints a
# table last.
set -u
export LD_LIBRARY_PATH=/usr/local/cuda/lib64 NCCL_NVLS_ENABLE=0
B=target/gpu/tandem
LOG=$OUT/levers.log
W=$(mktemp -d)
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader | tee -a $LOG
( python3 scripts/gpu/reference.py --out /tmp/ref >> $LOG 2>&1 && TANDEM_CUDA_FUSE=1 TANDEM_CUDA_SPLITK=1 timeout 200 $B bench gpu-check --reference /tmp/ref --output $OUT/checks.json >> $LOG 2>&1 ); echo "checks rc=$?"
grep -c '"passed": true' $OUT/checks.json; grep -B3 '"passed": false' $OUT/checks.json | grep name
run() { local tag=$1; shift; env "$@" timeout 100 $B bench engine --output $W/$tag.json $ARGS >> $LOG 2>&1; echo "$tag rc=$?"; }
ARGS="--batches= --prefill 512,2048,8192 --iters 5"
run prefill_pipelined TANDEM_CUDA_PREFILL_ATTENTION=pipelined
run prefill_wide TANDEM_CUDA_PREFILL_ATTENTION=wide
ARGS="--batches 8,32,128 --contexts 512,4096 --prefill="
run splitk_0 TANDEM_CUDA_SPLITK=0
run splitk_1 TANDEM_CUDA_SPLITK=1
ARGS="--batches 1,2 --contexts 512 --prefill="
run fuse_0 TANDEM_CUDA_FUSE=0
run fuse_1 TANDEM_CUDA_FUSE=1
ARGS="--batches 128 --contexts 512 --prefill= --iters 5 --profile"
run profile_128 TANDEM_CUDA_SPLITK=1 TANDEM_CUDA_FUSE=1
ARGS="--batches 1 --contexts 32768,131000 --prefill= --iters 10"
run long TANDEM_CUDA_FUSE=1
timeout 150 python3 scripts/gpu/baseline.py --batches "" --contexts "" --prefill-lens 512,2048,8192 --out $W/baseline.json >> $LOG 2>&1; echo "baseline rc=$?"
python3 scripts/gpu/collect.py $W levers.json
