#!/usr/bin/env bash
# The mid-sized FP8 GEMM (17 to 64 tokens) against cuBLASLt's FP8 GEMM (TANDEM_CUDA_FP8_MID=0)
# and bf16, in one session on one GPU: the FP8 kernel checks (float64 references), each
# projection alone (`--projections`, under the chosen K slices and forced ones), whole decode
# passes of 16 to 128 sequences alternated REPS times, and, where MODEL names a real model, FP8
# against bf16 on it (perplexity over the token ids in docs/benchmarks/engine/
# perplexity_2core.json, logits, top-1 agreement, greedy continuations). FORMS names the forms
# of the mid-sized GEMM checked (TANDEM_CUDA_FP8_MID), PROJS those timed per projection (off:
# cuBLASLt), SPLITS K slice counts to time besides. PARTS (default
# kchecks,proj,ab,quality) picks the stages. Expects a stripped release build at
# target/gpu/tandem; writes $OUT/fp8-mid-<parts>.json and $OUT/fp8-mid.log, prints a table last.
set -u
export LD_LIBRARY_PATH=/usr/local/cuda/lib64 NCCL_NVLS_ENABLE=0
B=target/gpu/tandem
LOG=$OUT/fp8-mid.log
W=$(mktemp -d)
SHAPES=${SHAPES:-llama-1b,llama-8b}
PARTS=${PARTS:-kchecks,proj,ab,quality}
has() { [[ ",$PARTS," == *",$1,"* ]]; }
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader | tee -a $LOG
if has kchecks; then for f in ${FORMS:-auto rows rowsb direct}; do
  TANDEM_CUDA_FP8_MID=$f timeout 120 $B bench gpu-check --groups fp8 --output $W/kcheck_$f.json >> $LOG 2>&1
  echo "fp8 kernel checks, TANDEM_CUDA_FP8_MID=$f: rc=$? passed $(grep -c '"passed": true' $W/kcheck_$f.json), failed $(grep -c '"passed": false' $W/kcheck_$f.json)"
  grep -E 'FP8 projection .* (1[7-9]|[2-9][0-9]) token' $LOG | tail -10 | cut -c1-150
done; fi
proj() { local tag=$1; shift; env TANDEM_CUDA_WEIGHTS=fp8 "$@" timeout 150 $B bench engine --shape $SHAPES --projections 17,24,32,48,64 --iters 20 --output $W/$tag.json >> $LOG 2>&1; echo "$tag rc=$?"; }
if has proj; then
  for f in ${PROJS:-auto rows rowsb direct off}; do proj proj_$f TANDEM_CUDA_FP8_MID=$f; done
  for s in ${SPLITS:-}; do proj proj_s$s TANDEM_CUDA_FP8_MID_SPLITS=$s; done
fi
run() { local tag=$1; shift; env "$@" timeout ${T:-150} $B bench engine --shape $SHAPES --output $W/$tag.json $ARGS >> $LOG 2>&1; echo "$tag rc=$?"; }
ARGS="--batches 16,24,32,48,64,128 --contexts 512 --prefill= --iters 10"
if has ab; then for i in ${REPS:-1 2}; do
  run bf16_$i TANDEM_CUDA_WEIGHTS=bf16; run fp8_$i TANDEM_CUDA_WEIGHTS=fp8
  run fp8lt_$i TANDEM_CUDA_WEIGHTS=fp8 TANDEM_CUDA_FP8_MID=0
done; fi
# Quality with cuBLASLt's FP8 GEMM in prefill (E4M3 activations too), and with the weights
# widened to bf16 there instead (FP8 weights alone, as the decode kernels multiply them).
if has quality && [ -n "${MODEL:-}" ]; then
  for q in lt widen; do
    env $([ $q = widen ] && echo TANDEM_CUDA_FP8_GEMM=widen) timeout 240 $B bench gpu-check --groups= --model $MODEL --fp8-text docs/benchmarks/engine/perplexity_2core.json --output $W/quality_$q.json >> $LOG 2>&1
    echo "quality ($q) rc=$?"; grep 'FP8 against bf16' $LOG | tail -4 | cut -c1-330
  done
fi
python3 scripts/gpu/collect.py $W fp8-mid-${PARTS//,/-}.json
