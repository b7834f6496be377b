#!/usr/bin/env bash
# Handoffs under load on one GPU: a random model of the Llama-3.2-1B shape (vocabulary 320, the
# tiny-llama test tokenizer) served by `tandem up --device cuda:0`, driven by tandem-loadtest at
# concurrency 128 with N requests (default 5,000) of 64 and of 512 prompt tokens, 128 output
# tokens each. For each run it counts failed requests, checksum refusals, failed handoffs and the
# block store's offload time-outs and sheds (from the services' logs and the gateway's metrics),
# then writes one summary JSON and prints a table.
#
#   BIN=target/release OUT=out scripts/gpu/serve_stress.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-target/release}
OUT=${OUT:-out}
N=${N:-5000}
LENS=${LENS:-"64 512"}
MODEL_DIR=${MODEL_DIR:-/tmp/tandem-llama-1b-v320}
PORT=${PORT:-8000}
mkdir -p "$OUT"

# GET a URL's body to stdout (curl where there is one).
get() {
    if command -v curl >/dev/null; then curl -sf "$1"; else
        python3 -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())' "$1"
    fi
}

[ -f "$MODEL_DIR/model.safetensors" ] || python3 scripts/gpu/serve_model.py "$MODEL_DIR" >/dev/null

for len in $LENS; do
    log="$OUT/up_${len}.log"
    "$BIN/tandem" up --model "$MODEL_DIR" --device cuda:0 --kv-cache-mb 16000 --port "$PORT" >"$log" 2>&1 &
    up=$!
    for _ in $(seq 600); do
        get "http://127.0.0.1:$PORT/ready" >/dev/null 2>&1 && break
        kill -0 "$up" 2>/dev/null || { cat "$log"; exit 1; }
        sleep 0.5
    done
    "$BIN/tandem-loadtest" --base-url "http://127.0.0.1:$PORT" --tokenizer "$MODEL_DIR" \
        --random-input-len "$len" --random-output-len 128 --ignore-eos --temperature 0 --num-prompts "$N" \
        --max-concurrency 128 --request-rate inf --seed 3 --label "tandem-h200-${len}in" \
        --save-result --save-detailed --result-dir "$OUT" --result-filename "load_${len}.json" >"$OUT/load_${len}.txt" 2>&1 || true
    get "http://127.0.0.1:$PORT/metrics" >"$OUT/metrics_${len}.txt" || true
    kill -INT "$up" 2>/dev/null || true
    wait "$up" || true
done

python3 - "$OUT" "$LENS" <<'EOF'
import json, pathlib, re, subprocess, sys
out = pathlib.Path(sys.argv[1])
rows = []
def metric(text, name):
    m = re.search(r"^" + re.escape(name) + r"(?:\{[^}]*\})? ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0
for length in sys.argv[2].split():
    r = json.loads((out / f"load_{length}.json").read_text())
    log = (out / f"up_{length}.log").read_text(errors="replace")
    metrics = (out / f"metrics_{length}.txt").read_text(errors="replace")
    rows.append({
        "input_tokens": int(length),
        "num_prompts": r["num_prompts"],
        "completed": r["completed"],
        "failed": r["failed"],
        "failures_by_kind": r.get("failures_by_kind", {}),
        "errors": r.get("errors", [])[:5],
        "request_throughput": r["request_throughput"],
        "output_throughput": r["output_throughput"],
        "median_ttft_ms": r.get("median_ttft_ms"),
        "p99_ttft_ms": r.get("p99_ttft_ms"),
        "median_tpot_ms": r.get("median_tpot_ms"),
        "checksum_refusals_logged": log.count("fails its checksum"),
        "handoff_failures_logged": log.count("kv handoff failed"),
        "offload_timeouts_logged": log.count("offload to the block store timed out"),
        "offload_failures_logged": log.count("offload to the block store failed"),
        "handoff_failures_metric": metric(metrics, "tandem_kv_handoff_failures_total"),
        "offload_shed_blocks_metric": metric(metrics, "tandem_kv_store_offload_shed_blocks_total"),
        "kv_transfer_bytes_ucx": metric(metrics, "tandem_kv_transfer_bytes_total"),
    })
gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "")
summary = {"gpu": gpu, "cpu": cpu, "model": "random bf16, Llama-3.2-1B shape, vocabulary 320",
           "command": "tandem up --device cuda:0 --kv-cache-mb 16000; tandem-loadtest --max-concurrency 128 --request-rate inf --seed 3 --random-output-len 128",
           "runs": rows}
(out / "serve_stress_h200.json").write_text(json.dumps(summary, indent=2) + "\n")
print(f"{'in':>4} {'done':>5} {'fail':>4} {'cksum':>5} {'hfail':>5} {'off_to':>6} {'shed':>6} {'req/s':>7} {'tok/s':>8} {'ttft50':>7} {'ttft99':>7}")
for x in rows:
    print(f"{x['input_tokens']:>4} {x['completed']:>5} {x['failed']:>4} {x['checksum_refusals_logged']:>5} {x['handoff_failures_logged']:>5} "
          f"{x['offload_timeouts_logged']:>6} {int(x['offload_shed_blocks_metric']):>6} {x['request_throughput']:>7.1f} {x['output_throughput']:>8.0f} "
          f"{x['median_ttft_ms'] or 0:>7.1f} {x['p99_ttft_ms'] or 0:>7.1f}")
EOF
