#!/usr/bin/env bash
# The two decode attention kernels on one GPU in one session: `tandem bench engine` decode rows
# with TANDEM_CUDA_DECODE_ATTENTION=lanes and =mma alternated twice (batches 1 to 128, contexts
# 512 and 4,096, both shapes), one profiled run of each, then batches 1 and 8 at long contexts
# (32,768 and 131,000 tokens) with each kernel. The correctness checks of both kernels run in
# prefill_ab.sh (gpu-check covers every attention kernel). Expects a stripped release build at
# target/gpu/tandem; writes $OUT/decode_ab.json (every row, tagged) and $OUT/decode.log, and
# prints a table last.
set -u
export LD_LIBRARY_PATH=/usr/local/cuda/lib64 NCCL_NVLS_ENABLE=0
B=target/gpu/tandem
BATCHES=${BATCHES:-1,8,32,128}
LOG=$OUT/decode.log
W=$(mktemp -d)
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader | tee -a $LOG
for i in 1 2; do for k in lanes mma; do
  TANDEM_CUDA_DECODE_ATTENTION=$k timeout 150 $B bench engine --batches $BATCHES --contexts 512,4096 --prefill "" --output $W/engine_${k}_$i.json >> $LOG 2>&1; echo "$k run $i rc=$?"
done; done
for k in lanes mma; do
  TANDEM_CUDA_DECODE_ATTENTION=$k timeout 100 $B bench engine --batches 128 --contexts 4096 --prefill "" --iters 5 --profile --output $W/profile_$k.json >> $LOG 2>&1; echo "$k profile rc=$?"
  TANDEM_CUDA_DECODE_ATTENTION=$k timeout 100 $B bench engine --batches 1,8 --contexts 32768,131000 --prefill "" --iters 10 --output $W/long_$k.json >> $LOG 2>&1; echo "$k long rc=$?"
done
W=$W python3 - <<'PY'
import json, os, glob
w, o = os.environ['W'], os.environ['OUT']
merged, table = {}, {}
for f in sorted(glob.glob(w + '/*.json')):
    tag = os.path.basename(f)[:-5]
    r = json.load(open(f)); merged[tag] = r
    for d in r.get('rows', []):
        if d.get('phase') != 'decode' or d.get('engine') != 'tandem': continue
        k = (d.get('shape'), d.get('batch'), d.get('context'))
        v = d.get('error') or (round(d.get('tokens_per_s') or 0), round(100 * (d.get('mbu') or 0), 1))
        table.setdefault(k, {})[tag] = v
        if d.get('breakdown_ms'):
            print(tag, k, {s: round(ms, 2) for s, ms in d['breakdown_ms']})
json.dump(merged, open(o + '/decode_ab.json', 'w'), indent=1)
for k, v in sorted(table.items(), key=str): print(k, v)
PY
