#!/usr/bin/env bash
# Programmatic dependent launch, on and off, on one GPU in one session: the correctness checks
# (float64 references written by scripts/gpu/reference.py), then `tandem bench engine` with
# TANDEM_CUDA_PDL=0 and unset, alternated twice; a table of both last. Expects a stripped release
# build at target/gpu/tandem and writes JSON under $OUT (docs/benchmarks/engine/h200-pdl-ab.json).
set -u
export LD_LIBRARY_PATH=/usr/local/cuda/lib64 NCCL_NVLS_ENABLE=0
B=target/gpu/tandem
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
( python3 scripts/gpu/reference.py --out /tmp/ref > $OUT/ref.log 2>&1 && $B bench gpu-check --reference /tmp/ref --output $OUT/checks.json > $OUT/checks.log 2>&1 ); echo "checks rc=$?"; tail -4 $OUT/checks.log
for i in 1 2; do for pdl in 0 1; do
  TANDEM_CUDA_PDL=$pdl timeout 150 $B bench engine --shape llama-1b,llama-8b --batches 1,8,32 --contexts 512 --prefill 512 --output $OUT/engine_pdl${pdl}_$i.json > $OUT/engine_pdl${pdl}_$i.log 2>&1; echo "pdl=$pdl run $i rc=$?"
done; done
python3 - <<'PY'
import json,os,glob
o=os.environ['OUT']
rows={}
for f in sorted(glob.glob(o+'/engine_pdl*.json')):
    r=json.load(open(f)); tag=os.path.basename(f)[7:-5]
    for d in r.get('rows',[]):
        if d.get('engine')!='tandem': continue
        k=(d.get('phase'),d.get('shape'),d.get('batch'),d.get('context'))
        rows.setdefault(k,{})[tag]=(round(d.get('tokens_per_s',0)),round(100*(d.get('mbu') or d.get('mfu') or 0),1), round(d.get('step_ms') or d.get('ms') or 0,3))
for k,v in sorted(rows.items(), key=str): print(k, v)
PY
