"""CPU serving benchmark for the disaggregated path.

Starts `tandem up` (release build) on the default model, streams chat completions at
concurrency 1 and 8, and records time to first token, inter-token latency, output tokens/s and
the KV handoff's share of TTFT (from the gateway's own histograms), then the TTFT of prompts of
about 128 tokens sent one at a time. If llama-cpp-python is
installed, the same prompts run through llama.cpp in the same process run as the baseline.

Usage: python3 scripts/bench_cpu_serving.py [--out docs/benchmarks/cpu_serving.json]
       [--binary LABEL=PATH ...] [--up-args LABEL=ARGS ...] [--env LABEL=NAME=VALUE ...]

With `--binary disagg=target/release/tandem --binary aggregated=target/release/tandem
--up-args "aggregated=--aggregated 1"` the same build is measured disaggregated and aggregated.
"""

import argparse
import concurrent.futures
import json
import os
import platform
import re
import statistics
import subprocess
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "SmolLM2-135M-Instruct"
PROMPTS = [
    "Explain why the sky is blue.",
    "Write a short poem about autumn leaves.",
    "What are three benefits of regular exercise?",
    "Describe how a bicycle works.",
    "Give me a recipe idea for dinner tonight.",
    "What is the difference between weather and climate?",
    "Summarize the plot of a fairy tale you know.",
    "How do plants make their food?",
]
MAX_TOKENS = 64
# The time-to-first-token case: a prompt of about 128 tokens (the chat template's included),
# each request's opening words its own so no request reuses another's cached blocks beyond the
# shared template prefix.
LONG_TEXT = (
    "The river rises in the hills above the town, runs through three villages and a forest, "
    "turns a mill that has ground grain for two hundred years, and reaches the sea at a harbour "
    "where fishing boats leave before dawn. In spring the water is high and brown with mud; in "
    "late summer it is low and clear enough to see the stones. Write a short guide for a walker "
    "who wants to follow the river from its source to the sea in three days, with one place to "
    "stay each night and one thing worth stopping for each day."
)
LONG_REQUESTS = 8
LONG_MAX_TOKENS = 8


def long_prompt(i):
    return f"Walker number {i + 1} asks. {LONG_TEXT}"


def percentile(values, p):
    s = sorted(values)
    k = (len(s) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def stream_one(base, prompt, max_tokens=MAX_TOKENS):
    body = json.dumps({
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }).encode()
    req = urllib.request.Request(f"{base}/v1/chat/completions", data=body, headers={"content-type": "application/json"})
    start = time.perf_counter()
    arrivals, usage = [], None
    with urllib.request.urlopen(req, timeout=600) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for c in chunk.get("choices", []):
                if c["delta"].get("content"):
                    arrivals.append(time.perf_counter())
    end = time.perf_counter()
    return {"start": start, "end": end, "arrivals": arrivals, "completion_tokens": usage["completion_tokens"],
            "prompt_tokens": usage["prompt_tokens"]}


def summarize(results, wall):
    ttft = [(r["arrivals"][0] - r["start"]) * 1e3 for r in results]
    itl = [(b - a) * 1e3 for r in results for a, b in zip(r["arrivals"], r["arrivals"][1:])]
    tokens = sum(r["completion_tokens"] for r in results)
    return {
        "requests": len(results),
        "output_tokens": tokens,
        "output_tokens_per_s": tokens / wall,
        "mean_ttft_ms": statistics.mean(ttft),
        "median_ttft_ms": statistics.median(ttft),
        "p99_ttft_ms": percentile(ttft, 99),
        "mean_itl_ms": statistics.mean(itl),
        "median_itl_ms": statistics.median(itl),
        "p99_itl_ms": percentile(itl, 99),
    }


def metric_sum(text, name):
    """(sum, count) of a histogram, over all its label sets."""
    total, count = 0.0, 0.0
    for m in re.finditer(rf"^{name}_(sum|count)(?:{{[^}}]*}})? (\S+)$", text, re.M):
        if m.group(1) == "sum":
            total += float(m.group(2))
        else:
            count += float(m.group(2))
    return total, count


def run_level(base, concurrency, n):
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda p: stream_one(base, p), prompts))
    return summarize(results, time.perf_counter() - start)


def llama_cpp_baseline(model_path):
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    import llama_cpp

    llm = Llama(model_path=model_path, n_ctx=2048, n_threads=2, verbose=False)
    rates, ttfts = [], []
    for p in PROMPTS:
        start = time.perf_counter()
        times = []
        for _ in llm.create_chat_completion(
            messages=[{"role": "user", "content": p}], max_tokens=MAX_TOKENS, temperature=0, stream=True
        ):
            times.append(time.perf_counter())
        ttfts.append((times[1] - start) * 1e3)
        rates.append((len(times) - 2) / (times[-1] - times[1]))
    long_ttfts = []
    for i in range(LONG_REQUESTS):
        start = time.perf_counter()
        times = []
        for _ in llm.create_chat_completion(
            messages=[{"role": "user", "content": long_prompt(i)}], max_tokens=LONG_MAX_TOKENS, temperature=0, stream=True
        ):
            times.append(time.perf_counter())
        long_ttfts.append((times[1] - start) * 1e3)
    return {"engine": f"llama.cpp (llama-cpp-python {llama_cpp.__version__}), 2 threads, one process",
            "mean_ttft_ms": statistics.mean(ttfts), "decode_tokens_per_s": statistics.mean(rates),
            "long_prompt_mean_ttft_ms": statistics.mean(long_ttfts), "long_prompt_median_ttft_ms": statistics.median(long_ttfts)}


def long_prompt_ttft(base):
    """TTFT of the ~128-token prompts, one request at a time."""
    results = [stream_one(base, long_prompt(i), LONG_MAX_TOKENS) for i in range(LONG_REQUESTS)]
    ttft = [(r["arrivals"][0] - r["start"]) * 1e3 for r in results]
    return {"requests": len(results), "prompt_tokens": [r["prompt_tokens"] for r in results],
            "mean_ttft_ms": statistics.mean(ttft), "median_ttft_ms": statistics.median(ttft), "ttft_ms": ttft}


def measure(binary, port, up_args=(), env=None):
    """Starts `tandem up` from `binary` (with `up_args`, and `env` added to the environment) and
    runs both concurrency levels and the long prompts against it."""
    up = subprocess.Popen([binary, "up", "--port", str(port), *up_args], stdout=subprocess.PIPE, text=True,
                          env={**os.environ, **(env or {})})
    levels = {}
    try:
        up.stdout.readline()
        base = f"http://127.0.0.1:{port}"
        stream_one(base, "warm up")
        for concurrency, n in [(1, 8), (8, 16)]:
            before = urllib.request.urlopen(f"{base}/metrics").read().decode()
            levels[str(concurrency)] = run_level(base, concurrency, n)
            after = urllib.request.urlopen(f"{base}/metrics").read().decode()
            for key, name in [("mean_prefill_ms", "tandem_prefill_seconds"), ("mean_handoff_ms", "tandem_kv_handoff_seconds")]:
                (s0, c0), (s1, c1) = metric_sum(before, name), metric_sum(after, name)
                # An aggregated worker runs no prefill step and hands nothing over.
                levels[str(concurrency)][key] = (s1 - s0) / (c1 - c0) * 1e3 if c1 > c0 else None
            lv = levels[str(concurrency)]
            lv["handoff_share_of_ttft"] = lv["mean_handoff_ms"] / lv["mean_ttft_ms"] if lv["mean_handoff_ms"] is not None else None
        levels["long_prompt"] = long_prompt_ttft(base)
    finally:
        up.terminate()
        up.wait(timeout=30)
    return levels


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(ROOT, "docs/benchmarks/cpu_serving.json"))
    ap.add_argument("--port", type=int, default=8077)
    ap.add_argument("--binary", action="append", default=[],
                    help="LABEL=PATH: measure these builds of tandem one after the other in this run (no cargo build)")
    ap.add_argument("--up-args", action="append", default=[],
                    help="LABEL=ARGS: more `tandem up` arguments for that label (`aggregated=--aggregated 1`)")
    ap.add_argument("--env", action="append", default=[],
                    help="LABEL=NAME=VALUE: an environment variable for that label's services "
                         "(`candle=TANDEM_CPU_KERNELS=candle`)")
    args = ap.parse_args()
    envs = {}
    for e in args.env:
        label, kv = e.split("=", 1)
        name, value = kv.split("=", 1)
        envs.setdefault(label, {})[name] = value
    up_args = {label: extra.split() for label, extra in (u.split("=", 1) for u in args.up_args)}
    builds = [b.split("=", 1) for b in args.binary]
    if not builds:
        subprocess.run(["cargo", "build", "--release", "-p", "tandem"], cwd=ROOT, check=True)
        builds = [("tandem", os.path.join(ROOT, "target/release/tandem"))]
    model_path = subprocess.run([builds[-1][1], "fetch-model"], capture_output=True, text=True, check=True).stdout.strip()
    measured = {label: measure(binary, args.port, up_args.get(label, ()), envs.get(label)) for label, binary in builds}
    result = {
        "benchmark": "cpu_serving",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores ({platform.processor() or 'cpu'}), no GPU",
        "model": MODEL + " (GGUF Q4_1)",
        "setup": "tandem up: 1 prefill + 1 decode worker + gateway, separate processes on loopback, TCP KV transport",
        "workload": f"{len(PROMPTS)} chat prompts, {MAX_TOKENS} output tokens each (ignore_eos), greedy, streamed; "
                    f"then {LONG_REQUESTS} prompts of about 128 tokens one at a time for TTFT ({LONG_MAX_TOKENS} output tokens)",
        "concurrency": measured[builds[-1][0]],
        "baseline": llama_cpp_baseline(model_path),
    }
    if len(builds) > 1:
        result["builds"] = measured
    if up_args:
        result["up_args"] = {label: up_args.get(label, []) for label, _ in builds}
    if envs:
        result["env"] = envs
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
