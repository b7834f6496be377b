#!/usr/bin/env bash
# Two builds of the decode attention kernel against each other in one session on one GPU:
# target/gpu/tandem.xz (the change) and target/gpu/tandem_old.xz (the build before it), each on a
# bf16 and an FP8 cache, alternated REPS times; the attention checks of the change first (cases
# up to MAXCTX tokens of context). Writes $OUT/decode-ab.json, $OUT/checks.log and $OUT/ab.log,
# prints a table last.
set -u
export LD_LIBRARY_PATH=/usr/local/cuda/lib64 NCCL_NVLS_ENABLE=0
for b in tandem tandem_old; do xz -dc target/gpu/$b.xz > target/gpu/$b; chmod +x target/gpu/$b; done
W=$OUT/raw; mkdir -p $W
timeout ${TC:-120} target/gpu/tandem bench gpu-check --groups attention --attention-max-context ${MAXCTX:-8192} --output $W/checks.json > $OUT/checks.log 2>&1
echo "checks rc=$? passed $(grep -c '^ok' $OUT/checks.log) failed $(grep -c '^FAIL' $OUT/checks.log)"
grep '^FAIL' $OUT/checks.log | head -5
for i in ${REPS:-1}; do for b in tandem tandem_old; do for kv in bf16 fp8; do
  TANDEM_CUDA_KV=$kv timeout 100 target/gpu/$b bench engine --shape ${SHAPES:-llama-8b} --batches ${BATCHES:-32,128} --contexts ${CONTEXTS:-512,4096} --prefill= --iters 10 --output $W/${b}_${kv}_$i.json >> $OUT/ab.log 2>&1
  echo "$b $kv $i rc=$?"
done; done; done
python3 scripts/gpu/collect.py $W decode-ab.json
