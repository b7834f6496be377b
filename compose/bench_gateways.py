#!/usr/bin/env python3
"""Prefix-cache hit rate through 1, 2 and 4 gateways behind the compose stack's nginx, with the
prefix index shared in Redis (the default) and, as the baseline, kept by each gateway alone.

Each case starts the stack from nothing (two prefill workers, so routing decides where a prefix
is cached; one decode worker), runs the load generator's prefix-repetition workload through
127.0.0.1:8000, then reads the hit rate from Prometheus: prompt tokens served from a cache over
all prompt tokens, summed over every gateway, and the same from the prefill workers' side.

  compose/images.sh && python3 compose/bench_gateways.py --loadtest target/debug/tandem-loadtest \
      --out docs/benchmarks/deploy/gateways_prefix_hit_dev_2core.json
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_stack import GATEWAY, compose, get, prometheus, wait  # noqa: E402


def total(query):
    return sum(float(r["value"][1]) for r in prometheus(query))


def settled(query, expect_series):
    """`query` once Prometheus has scraped it from every replica, twice with the same value."""
    last = None
    deadline = time.time() + 60
    while time.time() < deadline:
        found = prometheus(query)
        if len(found) >= expect_series:
            v = sum(float(r["value"][1]) for r in found)
            if v == last:
                return v
            last = v
        time.sleep(2.5)
    raise AssertionError(f"{query}: not settled from {expect_series} series")


def case(args, gateways, index):
    project = f"tandembench{gateways}{index}"
    os.environ["TANDEM_PREFIX_INDEX"] = index  # read by compose.yaml for the gateways
    scale = ["--scale", f"gateway={gateways}", "--scale", "prefill=2", "--scale", "decode=1"]
    compose(project, "down", "-v", "--remove-orphans", check=False)
    try:
        compose(project, "up", "-d", "--no-build", *scale)

        def routable():
            status, body = get(f"{GATEWAY}/ready")
            return status == 200 and json.loads(body).get("prefill_workers") == 2
        wait("every gateway routes to two prefill workers", 300, routable)
        # Every replica sees both prefill workers before the clock starts (nginx spreads the
        # checks over them).
        for _ in range(4 * gateways):
            wait("every gateway routes to two prefill workers", 60, routable)
        out = f"/tmp/bench_gateways_{gateways}_{index}.json"
        cmd = [args.loadtest, "--base-url", GATEWAY, "--dataset-name", "prefix",
               "--prefix-len", str(args.prefix_len), "--suffix-len", str(args.suffix_len),
               "--num-prefixes", str(args.num_prefixes), "--prefix-repetition-output-len", "2", "--ignore-eos", "--temperature", "0",
               "--num-prompts", str(args.num_prompts), "--max-concurrency", str(args.concurrency),
               "--seed", "7", "--disable-tqdm", "--save-result", "--result-dir", "/tmp",
               "--result-filename", os.path.basename(out)]
        if args.tokenizer:
            cmd += ["--tokenizer", args.tokenizer]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        with open(out) as f:
            load = json.load(f)
        prompt = settled("tandem_prompt_tokens_total", gateways)
        hit = settled("tandem_prefix_cache_hit_tokens_total", gateways)
        worker_q = settled("vllm:prefix_cache_queries_total", 2)
        worker_h = settled("vllm:prefix_cache_hits_total", 2)
        served = [r for r in prometheus("sum by (instance) (tandem_requests_total)") if float(r["value"][1]) > 0]
        return {
            "gateways": gateways,
            "prefix_index": index,
            "gateways_that_served": len(served),
            "requests_completed": load.get("completed"),
            "requests_failed": load.get("failed", 0),
            "prompt_tokens": prompt,
            "cached_prompt_tokens": hit,
            "hit_rate": hit / prompt if prompt else None,
            "prefill_worker_hit_rate": worker_h / worker_q if worker_q else None,
            "index_routed_blocks": total("tandem_prefix_index_hit_blocks_total"),
            "store_pulled_blocks": total("tandem_kv_store_pulled_blocks_total"),
            "mean_ttft_ms": load.get("mean_ttft_ms"),
        }
    finally:
        compose(project, "down", "-v", "--remove-orphans", check=False)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--loadtest", default="target/debug/tandem-loadtest")
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--gateways", default="1,2,4")
    ap.add_argument("--indexes", default="shared,local")
    ap.add_argument("--prefix-len", type=int, default=256)
    ap.add_argument("--suffix-len", type=int, default=32)
    ap.add_argument("--num-prefixes", type=int, default=8)
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    cases = []
    for index in args.indexes.split(","):
        for n in [int(g) for g in args.gateways.split(",")]:
            r = case(args, n, index)
            print(json.dumps(r), flush=True)
            cases.append(r)
    # What a perfect index gives: every request after its prefix's first hits the prefix's
    # full blocks (16 tokens each).
    block = 16
    ideal = (args.num_prompts - args.num_prefixes) * (args.prefix_len // block * block)
    result = {
        "benchmark": "prefix-cache hit rate through N gateways behind nginx (compose stack)",
        "machine": f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}",
        "workload": {"dataset": "prefix", "prefix_len": args.prefix_len, "suffix_len": args.suffix_len,
                     "num_prefixes": args.num_prefixes, "num_prompts": args.num_prompts,
                     "max_concurrency": args.concurrency, "output_len": 2},
        "stack": {"prefill": 2, "decode": 1, "block_store": 1},
        "ideal_cached_prompt_tokens": ideal,
        "cases": cases,
    }
    print("\n index   gateways  hit rate  prefill-side  routed blocks  store pulls  failed")
    for c in cases:
        print(f" {c['prefix_index']:7} {c['gateways']:^8}  {c['hit_rate']:.3f}     {c['prefill_worker_hit_rate']:.3f}"
              f"         {c['index_routed_blocks']:>6.0f}        {c.get('store_pulled_blocks', 0):>5.0f}      {c['requests_failed']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
