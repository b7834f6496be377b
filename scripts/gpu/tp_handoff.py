"""Different tensor-parallel degrees on the two sides of the handoff, through the whole cluster,
on one machine of two or more GPUs: `tandem up` on a random-weight model (serve_model.py), once
with every worker at TP=1 and once per layout given, the same greedy completions asked of each,
and each layout's text compared with TP=1's.

The groups sum their ranks' partial products in another order than one GPU does, so on random
weights a near-tie can flip a greedy token; the comparison reports how many completions are
equal and how long the common prefix of the others is, rather than asserting equality.

    python3 scripts/gpu/tp_handoff.py --bin target/gpu --json OUT.json \
        --layout "p2d2:--prefill-tp 2 --decode-tp 2" --layout "p2d1:--prefill-tp 2 --decode-tp 1"
"""

import argparse
import json
import pathlib
import random
import signal
import subprocess
import sys
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts/gpu"))
from serve_bench import start_cluster  # noqa: E402


def post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    return json.loads(urllib.request.urlopen(req, timeout=120).read())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--json", required=True)
    ap.add_argument("--layout", action="append", default=[], help="NAME:tandem up arguments")
    ap.add_argument("--model-dir", default="/tmp/tandem-llama-1b-v320")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--port", type=int, default=8300)
    args = ap.parse_args()
    if not (pathlib.Path(args.model_dir) / "config.json").exists():
        subprocess.run([sys.executable, str(ROOT / "scripts/gpu/serve_model.py"), args.model_dir], check=True, stdout=subprocess.DEVNULL)
    rng = random.Random(7)
    words = ["the", "a", "river", "stone", "light", "seven", "north", "quiet", "market", "code", "blue", "winter"]
    prompts = [" ".join(rng.choice(words) for _ in range(rng.randint(8, 400))) for _ in range(args.prompts)]
    layouts = [("tp1", [])] + [(l.split(":", 1)[0], l.split(":", 1)[1].split()) for l in args.layout]
    texts = {}
    for name, extra in layouts:
        with open(f"/tmp/tp_handoff_{name}.log", "w") as log:
            up = start_cluster(args.bin, args.model_dir, args.port, {}, log, extra, kv_cache_mb=8000)
            try:
                ready = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{args.port}/ready").read())
                served = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{args.port}/v1/models").read())["data"][0]["id"]
                out = []
                for p in prompts:
                    r = post(f"http://127.0.0.1:{args.port}/v1/completions",
                             {"model": served, "prompt": p, "max_tokens": args.tokens, "temperature": 0})
                    out.append(r["choices"][0]["text"])
                texts[name] = {"tp_sizes": ready.get("tp_sizes"), "texts": out}
            finally:
                up.send_signal(signal.SIGINT)
                try:
                    up.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    up.kill()
    base = texts["tp1"]["texts"]
    rows = []
    for name, extra in layouts[1:]:
        got = texts[name]["texts"]
        same = sum(a == b for a, b in zip(got, base))
        prefix = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b))) for a, b in zip(got, base)]
        rows.append({"layout": name, "args": extra, "tp_sizes": texts[name]["tp_sizes"], "equal": same, "of": len(base),
                     "common_prefix_chars": prefix, "baseline_chars": [len(b) for b in base]})
        print(f"{name:<8} {' '.join(extra):<40} {same}/{len(base)} completions equal to TP=1's; tp_sizes {texts[name]['tp_sizes']}")
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True).stdout.strip().splitlines()
    pathlib.Path(args.json).write_text(json.dumps({
        "gpus": gpu, "model": "random bf16, Llama-3.2-1B shape, vocabulary 320 (tiny-llama test tokenizer)",
        "method": f"{args.prompts} prompts of 8-400 words, {args.tokens} greedy tokens each, /v1/completions, tandem up --device cuda:0",
        "rows": rows, "texts": texts}, indent=1) + "\n")


if __name__ == "__main__":
    main()
