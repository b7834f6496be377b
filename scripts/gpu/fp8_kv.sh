#!/usr/bin/env bash
# The FP8 KV cache (E4M3 rows with one f32 scale per token and head) against the bf16 cache, in
# one session on one GPU: the attention kernel checks (float64 references; the FP8 cases beside
# the bf16 ones), whole decode passes with bf16 or FP8 weights and a bf16 or FP8 cache, each of
# the four alternated REPS times, prefill passes on both caches, and, where MODEL names a real
# model, FP8 weights, FP8 cache and both against bf16 on it (perplexity over the token ids in
# docs/benchmarks/engine/perplexity_2core.json, logits, top-1 agreement, greedy continuations).
# PARTS (default checks,decode,prefill,quality) picks the stages, CONFIGS the decode configurations
# (bf16 kv8 w8 w8kv8: weights and cache bf16; FP8 cache; FP8 weights; both). Expects a stripped release
# build at target/gpu/tandem; writes $OUT/fp8-kv-<parts>.json and $OUT/fp8-kv.log, prints a
# table last.
set -u
export LD_LIBRARY_PATH=/usr/local/cuda/lib64 NCCL_NVLS_ENABLE=0
B=target/gpu/tandem
LOG=$OUT/fp8-kv.log
W=$OUT/raw; mkdir -p $W
SHAPES=${SHAPES:-llama-1b,llama-8b}
PARTS=${PARTS:-checks,decode,prefill,quality}
has() { [[ ",$PARTS," == *",$1,"* ]]; }
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader | tee -a $LOG
if has checks; then
  timeout ${TC:-420} $B bench gpu-check --groups attention --attention-cache ${CACHES:-both} ${MAXCTX:+--attention-max-context $MAXCTX} --output $W/checks.json >> $LOG 2>&1
  echo "attention checks: rc=$? passed $(grep -c '"passed": true' $W/checks.json), failed $(grep -c '"passed": false' $W/checks.json)"
  grep -E '^(ok  |FAIL) FP8 cache' $LOG | awk '{print $NF, $0}' | sort -g | tail -3 | cut -c1-170
  grep -E '^FAIL' $LOG | head -5 | cut -c1-170
fi
run() { local tag=$1; shift; env "$@" timeout ${T:-200} $B bench engine --shape $SHAPES --output $W/$tag.json $ARGS >> $LOG 2>&1; echo "$tag rc=$?"; }
if has decode; then
  ARGS="--batches ${BATCHES:-1,32,128} --contexts ${CONTEXTS:-512,4096} --prefill= --iters 10"
  for i in ${REPS:-1 2}; do for c in ${CONFIGS:-bf16 kv8 w8 w8kv8}; do
    case $c in
      bf16) run bf16_$i TANDEM_CUDA_WEIGHTS=bf16 TANDEM_CUDA_KV=bf16 ;;
      kv8) run kv8_$i TANDEM_CUDA_WEIGHTS=bf16 TANDEM_CUDA_KV=fp8 ;;
      w8) run w8_$i TANDEM_CUDA_WEIGHTS=fp8 TANDEM_CUDA_KV=bf16 ;;
      w8kv8) run w8kv8_$i TANDEM_CUDA_WEIGHTS=fp8 TANDEM_CUDA_KV=fp8 ;;
    esac
  done; done
fi
if has prefill; then
  ARGS="--batches= --contexts= --prefill 512,2048,8192 --iters 5 --profile"
  run prefill_bf16 TANDEM_CUDA_KV=bf16
  run prefill_kv8 TANDEM_CUDA_KV=fp8
fi
if has quality && [ -n "${MODEL:-}" ]; then
  timeout 300 $B bench gpu-check --groups= --model $MODEL --fp8-text docs/benchmarks/engine/perplexity_2core.json --output $W/quality.json >> $LOG 2>&1
  echo "quality rc=$?"; grep -E 'against bf16' $LOG | tail -12 | cut -c1-330
fi
python3 scripts/gpu/collect.py $W fp8-kv-${PARTS//,/-}.json
