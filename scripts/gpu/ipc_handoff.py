"""The KV handoff between a prefill and a decode process on one GPU host, device to device
(`cudaipc`) against the host path (`--kv-transport tcp,ucx`): `tandem up --device cuda:0` on a
random-weight model (serve_model.py), the same binary and GPU for both layouts.

- Text: the same greedy completions asked of both layouts must be equal, character for
  character (the same engine computes the same KV; only how it travels differs).
- Speed: for prompts of each length, one at a time (random token ids, so no prefix is cached),
  the gateway's own figures per handoff (`tandem_kv_handoff_seconds` and
  `tandem_kv_transfer_bytes_total` by transport, verdict included) and the client's time to a
  two-token answer (one token would end on the prefill worker, with no handoff).
- Integrity: a third run with every third handoff's first device checksum flipped
  (`TANDEM_FAULT_CORRUPT_KV_EVERY=3`) must have the decode side refuse exactly those.

    python3 scripts/gpu/ipc_handoff.py --bin target/gpu --json OUT.json [--shape 8b]
"""

import argparse
import json
import pathlib
import random
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts/gpu"))
from serve_bench import start_cluster  # noqa: E402


def post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    try:
        return json.loads(urllib.request.urlopen(req, timeout=300).read())
    except urllib.error.HTTPError as e:
        raise SystemExit(f"HTTP {e.code} from {url}: {e.read().decode()[:400]}")


def metrics(port):
    """{(family, transport): value} for the handoff series the gateway keeps."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        m = re.match(r'(tandem_kv_(?:handoff_seconds_sum|handoff_seconds_count|transfer_bytes_total))\{[^}]*transport="([a-z]+)"[^}]*\} (\S+)', line)
        if m:
            out[(m.group(1), m.group(2))] = out.get((m.group(1), m.group(2)), 0.0) + float(m.group(3))
    return out


def delta(after, before):
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0) != 0}


def run_layout(args, name, extra, env, prompts, lengths, rng):
    res = {"args": extra, "env": env}
    with open(f"/tmp/ipc_handoff_{name}.log", "w") as log:
        up = start_cluster(args.bin, args.model_dir, args.port, env, log, extra, kv_cache_mb=args.kv_cache_mb)
        try:
            base = f"http://127.0.0.1:{args.port}"
            served = json.loads(urllib.request.urlopen(f"{base}/v1/models").read())["data"][0]["id"]
            texts, errors = [], []
            for p in prompts:
                req = urllib.request.Request(f"{base}/v1/completions", headers={"content-type": "application/json"},
                                             data=json.dumps({"model": served, "prompt": p, "max_tokens": args.tokens, "temperature": 0}).encode())
                try:
                    texts.append(json.loads(urllib.request.urlopen(req, timeout=300).read())["choices"][0]["text"])
                except urllib.error.HTTPError as e:
                    texts.append(None)
                    errors.append(e.read().decode()[:300])
            res["texts"], res["errors"] = texts, errors
            rows = []
            for n in lengths if not env else []:
                ask = lambda: post(f"{base}/v1/completions",  # noqa: E731
                                   {"model": served, "prompt": [rng.randrange(3, args.vocab) for _ in range(n)], "max_tokens": 2, "temperature": 0})
                ask()  # warm: graphs, buffers, the pool mapping
                before, lat = metrics(args.port), []
                for _ in range(args.repeats):
                    t = time.perf_counter()
                    ask()
                    lat.append((time.perf_counter() - t) * 1e3)
                d = delta(metrics(args.port), before)
                per = {}
                for (fam, tr), v in d.items():
                    per.setdefault(tr, {})[fam] = v
                for tr, f in per.items():
                    cnt = f.get("tandem_kv_handoff_seconds_count", 0)
                    if cnt:
                        ms = f["tandem_kv_handoff_seconds_sum"] / cnt * 1e3
                        mb = f.get("tandem_kv_transfer_bytes_total", 0) / cnt / 1e6
                        rows.append({"prompt_tokens": n, "transport": tr, "handoffs": int(cnt), "mb_per_handoff": round(mb, 2),
                                     "handoff_ms": round(ms, 3), "gb_per_s": round(mb / ms, 2) if ms else None,
                                     "request_ms_median": round(sorted(lat)[len(lat) // 2], 2),
                                     "handoff_share_of_request": round(ms / sorted(lat)[len(lat) // 2], 3)})
            res["rows"] = rows
        finally:
            up.send_signal(signal.SIGINT)
            try:
                up.wait(timeout=60)
            except subprocess.TimeoutExpired:
                up.kill()
    res["log_refusals"] = sum("fails its checksum" in l for l in open(f"/tmp/ipc_handoff_{name}.log", errors="replace"))
    res["log_fallbacks"] = sum("sending through host memory" in l for l in open(f"/tmp/ipc_handoff_{name}.log", errors="replace"))
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--json", required=True)
    ap.add_argument("--shape", choices=["1b", "8b"], default="1b")
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--lengths", default="512,2048,8000")
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--kv-cache-mb", type=int, default=20000)
    ap.add_argument("--port", type=int, default=8400)
    ap.add_argument("--no-corrupt", action="store_true", help="skip the integrity run")
    args = ap.parse_args()
    args.model_dir = args.model_dir or f"/tmp/tandem-llama-{args.shape}-v320"
    args.vocab = 320
    if not (pathlib.Path(args.model_dir) / "config.json").exists():
        subprocess.run([sys.executable, str(ROOT / "scripts/gpu/serve_model.py"), args.model_dir, "--shape", args.shape],
                       check=True, stdout=subprocess.DEVNULL)
    rng = random.Random(11)
    prompts = [[rng.randrange(3, args.vocab) for _ in range(rng.randint(8, 1500))] for _ in range(args.prompts)]
    lengths = [int(x) for x in args.lengths.split(",")]
    out = {"shape": args.shape, "method": __doc__.strip().splitlines()[0]}
    out["cudaipc"] = run_layout(args, "cudaipc", [], {}, prompts, lengths, rng)
    out["host"] = run_layout(args, "host", ["--kv-transport", "tcp,ucx"], {}, prompts, lengths, rng)
    if not args.no_corrupt:
        out["corrupt"] = run_layout(args, "corrupt", [], {"TANDEM_FAULT_CORRUPT_KV_EVERY": "3"}, prompts[:9], lengths, rng)
    a, b = out["cudaipc"]["texts"], out["host"]["texts"]
    out["equal_texts"] = sum(x == y and x is not None for x, y in zip(a, b))
    out["of"] = len(a)
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
    out["gpu"] = gpu
    pathlib.Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    print(f"{gpu}, {args.shape} shape: {out['equal_texts']}/{out['of']} completions equal across the two paths")
    if "corrupt" in out:
        print(f"corrupt run: {len(out['corrupt']['errors'])} failed requests of {len(out['corrupt']['texts'])}, "
              f"{out['corrupt']['log_refusals']} checksum refusals logged")
    print(f"fallbacks to the host path logged in the cudaipc run: {out['cudaipc']['log_fallbacks']}")
    print(f"{'tokens':>7} {'path':<8} {'MB':>8} {'handoff ms':>11} {'GB/s':>7} {'request ms':>11} {'share':>6}")
    for lay in ("cudaipc", "host"):
        for r in out[lay]["rows"]:
            print(f"{r['prompt_tokens']:>7} {r['transport']:<8} {r['mb_per_handoff']:>8} {r['handoff_ms']:>11} {r['gb_per_s']!s:>7} "
                  f"{r['request_ms_median']:>11} {r['handoff_share_of_request']:>6}")


if __name__ == "__main__":
    main()
