#!/usr/bin/env bash
# Prefill attention kernels on one GPU in one session: the float64 attention and whole-model
# checks (references from scripts/gpu/reference.py), then `tandem bench engine` prefill rows with
# TANDEM_CUDA_PREFILL_ATTENTION set to each of $KERNELS (default: staged pipelined) in turn,
# twice, one profiled pass of each at the longest prompt, and transformers (SDPA) prefill on the
# same GPU.
# Expects a stripped release build at target/gpu/tandem; writes $OUT/checks.json, $OUT/ab.json
# (every row, tagged) and $OUT/run.log, and prints a table last.
set -u
export LD_LIBRARY_PATH=/usr/local/cuda/lib64 NCCL_NVLS_ENABLE=0
B=target/gpu/tandem
LENS=${LENS:-512,2048,8192}
KERNELS=${KERNELS:-staged pipelined}
LOG=$OUT/run.log
W=$(mktemp -d)
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader | tee -a $LOG
( python3 scripts/gpu/reference.py --out /tmp/ref >> $LOG 2>&1 && $B bench gpu-check --reference /tmp/ref --output $OUT/checks.json >> $LOG 2>&1 ); echo "checks rc=$?"
grep -c '"passed": true' $OUT/checks.json; grep -B3 '"passed": false' $OUT/checks.json | grep name
for i in 1 2; do for k in $KERNELS; do
  TANDEM_CUDA_PREFILL_ATTENTION=$k timeout 200 $B bench engine --batches "" --prefill $LENS --iters 5 --output $W/engine_${k}_$i.json >> $LOG 2>&1; echo "$k run $i rc=$?"
done; done
for k in $KERNELS; do
  TANDEM_CUDA_PREFILL_ATTENTION=$k timeout 200 $B bench engine --batches "" --prefill ${LENS##*,} --iters 2 --profile --output $W/profile_$k.json >> $LOG 2>&1; echo "$k profile rc=$?"
done
timeout 300 python3 scripts/gpu/baseline.py --batches "" --contexts "" --prefill-lens $LENS --out $W/baseline.json >> $LOG 2>&1; echo "baseline rc=$?"
python3 scripts/gpu/collect.py $W ab.json --phase prefill
