#!/usr/bin/env bash
# The kernels as compiled for sm_80 (A100: no E4M3 conversion instruction, no programmatic
# dependent launch), run on this GPU through TANDEM_CUDA_ARCH: the attention checks on both
# caches (contexts up to MAXCTX), the projection and FP8 checks, and the whole models against
# float64 (scripts/gpu/reference.py); then a short benchmark on an FP8 cache, sm_80 and the
# device's own build. Expects target/gpu/tandem.xz; writes $OUT/raw/*.json and logs, and prints
# a summary last.
set -u
export LD_LIBRARY_PATH=/usr/local/cuda/lib64 NCCL_NVLS_ENABLE=0
B=target/gpu/tandem
xz -dc target/gpu/tandem.xz > $B && chmod +x $B
W=$OUT/raw; mkdir -p $W
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
python3 scripts/gpu/reference.py --out /tmp/ref > $OUT/ref.log 2>&1; echo "reference rc=$?"
TANDEM_CUDA_ARCH=sm_100 $B bench gpu-check --groups sampling > $OUT/refused.log 2>&1
echo "sm_100 named: rc=$? $(grep -o 'TANDEM_CUDA_ARCH=.*' $OUT/refused.log | head -1)"
TANDEM_CUDA_ARCH=sm_80 TANDEM_CUDA_FUSE=1 TANDEM_CUDA_SPLITK=1 timeout ${TC:-300} $B bench gpu-check --reference /tmp/ref \
  --groups attention,sampling,checksums,projections,fp8 --attention-max-context ${MAXCTX:-8192} --output $W/checks_sm_80.json > $OUT/checks_sm_80.log 2>&1
echo "sm_80 checks rc=$? passed $(grep -c '^ok' $OUT/checks_sm_80.log) failed $(grep -c '^FAIL' $OUT/checks_sm_80.log)"
grep '^FAIL' $OUT/checks_sm_80.log | head -5
for arch in sm_80 own; do
  A=$arch; [ $arch = own ] && A=
  TANDEM_CUDA_ARCH=$A TANDEM_CUDA_KV=fp8 timeout 120 $B bench engine --shape llama-1b --weights bf16,fp8 --batches 1,32 \
    --contexts 512 --prefill=512 --output $W/engine_$arch.json > $OUT/engine_$arch.log 2>&1; echo "$arch engine rc=$?"
done
python3 scripts/gpu/collect.py $W ampere-path.json
