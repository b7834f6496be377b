#!/usr/bin/env python3
"""What exporting traces costs serving: the CPU serving benchmark (bench_cpu_serving.py's
workload: streamed chat completions at concurrency 1 and 8 through `tandem up`) with every
service exporting its spans over OTLP/gRPC to a local receiver, against the same build with
tracing off, in one run on one machine. The two settings alternate round by round so that drift
in the machine hits both alike.

Usage: python3 scripts/bench_tracing_overhead.py [--rounds 3] [--out docs/benchmarks/tracing_overhead.json]
(builds the release binary and the receiver, `examples/otlp_sink` of tandem-test-support).
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_cpu_serving import MAX_TOKENS, MODEL, PROMPTS, run_level, stream_one  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LEVELS = [(1, 8), (8, 32)]


def start_sink(binary):
    sink = subprocess.Popen([binary, "--stdin"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = sink.stdout.readline().split()
    fields = dict(kv.split("=", 1) for kv in line[1:])
    return sink, fields["grpc"]


def cpu_seconds(pid):
    """User and system CPU time of `pid`'s children (the services `tandem up` started)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    try:
        children = open(f"/proc/{pid}/task/{pid}/children").read().split()
    except OSError:
        return 0.0
    for child in children:
        try:
            fields = open(f"/proc/{child}/stat").read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks
        except (OSError, IndexError, ValueError):
            pass
    return total


def one_round(binary, port, env):
    up = subprocess.Popen([binary, "up", "--port", str(port)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        up.stdout.readline()
        base = f"http://127.0.0.1:{port}"
        stream_one(base, "warm up")
        out = {}
        for concurrency, n in LEVELS:
            cpu = cpu_seconds(up.pid)
            out[str(concurrency)] = run_level(base, concurrency, n)
            # The services' CPU time per output token: what the spans cost, free of queueing noise.
            out[str(concurrency)]["cpu_ms_per_token"] = (cpu_seconds(up.pid) - cpu) * 1e3 / out[str(concurrency)]["output_tokens"]
        metrics = urllib.request.urlopen(f"{base}/metrics").read().decode()
        out["gateway_spans"] = {
            line.split()[0]: float(line.split()[1]) for line in metrics.splitlines() if line.startswith("tandem_trace_spans_")
        }
        return out
    finally:
        up.terminate()
        up.wait(timeout=30)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(ROOT, "docs/benchmarks/tracing_overhead.json"))
    ap.add_argument("--port", type=int, default=8078)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/release/tandem"))
    ap.add_argument("--sink", default=os.path.join(ROOT, "target/release/examples/otlp_sink"))
    ap.add_argument("--no-build", action="store_true")
    args = ap.parse_args()
    if not args.no_build:
        subprocess.run(["cargo", "build", "--release", "-p", "tandem"], cwd=ROOT, check=True)
        subprocess.run(["cargo", "build", "--release", "-p", "tandem-test-support", "--example", "otlp_sink"], cwd=ROOT, check=True)
    sink, grpc = start_sink(args.sink)
    off_env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    on_env = dict(off_env, OTEL_EXPORTER_OTLP_ENDPOINT=f"http://{grpc}")
    runs = {"off": [], "on": []}
    try:
        for r in range(args.rounds):
            for label, env in [("off", off_env), ("on", on_env)] if r % 2 == 0 else [("on", on_env), ("off", off_env)]:
                runs[label].append(one_round(args.binary, args.port, env))
                print(label, json.dumps({c: runs[label][-1][c]["output_tokens_per_s"] for c in ("1", "8")}), flush=True)
    finally:
        sink.stdin.close()
        received = json.loads(sink.stdout.readline() or "{}")
        sink.wait(timeout=30)

    summary = {}
    for c, _ in LEVELS:
        c = str(c)
        row = {}
        for label in ("off", "on"):
            row[label] = {
                "output_tokens_per_s": statistics.mean(x[c]["output_tokens_per_s"] for x in runs[label]),
                "mean_ttft_ms": statistics.mean(x[c]["mean_ttft_ms"] for x in runs[label]),
                "median_ttft_ms": statistics.mean(x[c]["median_ttft_ms"] for x in runs[label]),
                "cpu_ms_per_token": statistics.mean(x[c]["cpu_ms_per_token"] for x in runs[label]),
                "mean_ttft_ms_by_round": [x[c]["mean_ttft_ms"] for x in runs[label]],
                "output_tokens_per_s_by_round": [x[c]["output_tokens_per_s"] for x in runs[label]],
            }
        row["throughput_on_over_off"] = row["on"]["output_tokens_per_s"] / row["off"]["output_tokens_per_s"]
        row["mean_ttft_on_over_off"] = row["on"]["mean_ttft_ms"] / row["off"]["mean_ttft_ms"]
        row["cpu_per_token_on_over_off"] = row["on"]["cpu_ms_per_token"] / row["off"]["cpu_ms_per_token"]
        summary[f"concurrency_{c}"] = row
    result = {
        "benchmark": "tracing_overhead",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores ({platform.processor() or 'cpu'}), no GPU",
        "model": MODEL + " (GGUF Q4_1)",
        "setup": "tandem up (gateway, 1 prefill, 1 decode, block store; separate processes on loopback); "
                 "on: every service exports spans over OTLP/gRPC to a local receiver (examples/otlp_sink), "
                 "parentbased_always_on; off: no exporter",
        "workload": f"{len(PROMPTS)} chat prompts, {MAX_TOKENS} output tokens each (ignore_eos), greedy, streamed; "
                    f"concurrency 1 (8 requests) and 8 (32 requests) per round",
        "rounds": args.rounds,
        "summary": summary,
        "spans_received": received,
        "runs": runs,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
