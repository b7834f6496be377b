#!/usr/bin/env bash
# One setting of the CUDA engine, A/B, on decode, on one GPU in one session: `tandem bench
# engine` decode rows with $VAR set to each of $VALUES in turn, twice (batches $BATCHES, contexts
# $CONTEXTS, both shapes), one profiled run of each at batch $PROFILE_BATCH and the longest
# context, and with LONG=1 batch 1 at 32,768 and 131,000 tokens with each value. Defaults: the
# two decode attention kernels (TANDEM_CUDA_DECODE_ATTENTION=lanes|mma), batches 1 to 128,
# contexts 512 and 4,096. The correctness checks run in prefill_ab.sh (gpu-check covers every
# kernel). Expects a stripped release build at target/gpu/tandem; writes $OUT/$TAG.json (every
# row, tagged) and $OUT/$TAG.log, and prints a table last.
set -u
export LD_LIBRARY_PATH=/usr/local/cuda/lib64 NCCL_NVLS_ENABLE=0
B=target/gpu/tandem
VAR=${VAR:-TANDEM_CUDA_DECODE_ATTENTION}
VALUES=${VALUES:-lanes mma}
BATCHES=${BATCHES:-1,8,32,128}
CONTEXTS=${CONTEXTS:-512,4096}
PROFILE_BATCH=${PROFILE_BATCH:-128}
LONG=${LONG:-0}
TAG=${TAG:-decode_ab}
LOG=$OUT/$TAG.log
W=$(mktemp -d)
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader | tee -a $LOG
for i in 1 2; do for v in $VALUES; do
  env $VAR=$v timeout 150 $B bench engine --batches $BATCHES --contexts $CONTEXTS --prefill "" --output $W/engine_${v}_$i.json >> $LOG 2>&1; echo "$VAR=$v run $i rc=$?"
done; done
for v in $VALUES; do
  env $VAR=$v timeout 100 $B bench engine --batches $PROFILE_BATCH --contexts ${CONTEXTS##*,} --prefill "" --iters 5 --profile --output $W/profile_$v.json >> $LOG 2>&1; echo "$v profile rc=$?"
  if [ "$LONG" = 1 ]; then
    env $VAR=$v timeout 100 $B bench engine --batches 1 --contexts 32768,131000 --prefill "" --iters 10 --output $W/long_$v.json >> $LOG 2>&1; echo "$v long rc=$?"
  fi
done
python3 scripts/gpu/collect.py $W $TAG.json --phase decode
