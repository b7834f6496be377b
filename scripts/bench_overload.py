#!/usr/bin/env python3
"""Overload: twice the cluster's capacity, with and without the gateway's admission bound.

Starts `tandem up` on the default model, measures its capacity (completed requests per second
under a closed loop that keeps it busy), then offers twice that rate (Poisson arrivals, the load
generator's `--request-rate`) for a fixed time, once with the admission bound effectively off
(`TANDEM_MAX_WAITING_REQUESTS=100000`), once with a small bound on waiting requests, and once
with a bound on the predicted queue wait (`TANDEM_MAX_QUEUE_WAIT_MS`). Per run: requests admitted
and refused, and the admitted ones' time to first token (median, p99) and goodput against a TTFT
objective. Everything in one run on one machine.

  python3 scripts/bench_overload.py --out docs/benchmarks/reliability/overload_dev_2core.json
"""

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def up(binary, port, env_extra):
    env = dict(os.environ, **env_extra)
    proc = subprocess.Popen([binary, "up", "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
    line = proc.stdout.readline()
    if "serving" not in line:
        proc.kill()
        raise RuntimeError(f"tandem up did not start: {line!r}")
    return proc


def stop(proc):
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def loadtest(args, port, extra, name):
    out = os.path.join(tempfile.gettempdir(), f"overload_{name}.json")
    cmd = [args.loadtest, "--base-url", f"http://127.0.0.1:{port}", "--dataset-name", "random",
           "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
           "--ignore-eos", "--temperature", "0", "--save-detailed", "--seed", "3", "--disable-tqdm", "--goodput", f"ttft:{args.slo_ms}",
           "--save-result", "--result-dir", os.path.dirname(out), "--result-filename", os.path.basename(out), *extra]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    with open(out) as f:
        return json.load(f)


def summary(r):
    keys = ["completed", "failed", "request_throughput", "request_goodput", "median_ttft_ms", "p99_ttft_ms", "mean_ttft_ms"]
    return {k: r.get(k) for k in keys}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/debug/tandem"))
    ap.add_argument("--loadtest", default=os.path.join(ROOT, "target/debug/tandem-loadtest"))
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=16)
    ap.add_argument("--duration", type=int, default=60)
    ap.add_argument("--bound", type=int, default=2, help="--max-waiting-requests for the bounded run")
    ap.add_argument("--slo-ms", type=int, default=5000, help="time-to-first-token objective for goodput")
    ap.add_argument("--max-wait-ms", type=int, default=2500, help="--max-queue-wait-ms for the wait-bounded run")
    ap.add_argument("--port", type=int, default=8310)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    result = {"benchmark": "twice the capacity, with and without the admission bound", "machine": f"{os.cpu_count()} cores, {platform.machine()}",
              "workload": {"input_len": args.input_len, "output_len": args.output_len, "duration_s": args.duration, "ttft_slo_ms": args.slo_ms},
              "runs": {}}
    proc = up(args.binary, args.port, {"TANDEM_MAX_WAITING_REQUESTS": "100000"})
    try:
        cap = loadtest(args, args.port, ["--max-concurrency", "8", "--duration", str(args.duration // 2), "--request-rate", "inf"], "capacity")
    finally:
        stop(proc)
    capacity = cap["request_throughput"]
    result["capacity_req_per_s"] = capacity
    rate = 2 * capacity
    result["offered_req_per_s"] = rate
    runs = [("unbounded", 100000, 0), ("bounded", args.bound, 0), ("wait_bounded", 100000, args.max_wait_ms)]
    for name, bound, wait_ms in runs:
        time.sleep(2)
        proc = up(args.binary, args.port, {"TANDEM_MAX_WAITING_REQUESTS": str(bound), "TANDEM_MAX_QUEUE_WAIT_MS": str(wait_ms)})
        try:
            r = loadtest(args, args.port, ["--request-rate", f"{rate:.3f}", "--duration", str(args.duration)], name)
        finally:
            stop(proc)
        entry = summary(r)
        entry["max_waiting_requests"] = bound
        entry["max_queue_wait_ms"] = wait_ms
        result["runs"][name] = entry
        print(name, json.dumps(entry), flush=True)
    print(f"\ncapacity {capacity:.2f} req/s, offered {rate:.2f} req/s")
    print(" run            bound  wait bound  completed  refused  median TTFT  p99 TTFT   goodput (req/s)")
    for name, e in result["runs"].items():
        print(f" {name:14} {e['max_waiting_requests']:>6} {e['max_queue_wait_ms']:>8} ms {e['completed']:>9} {e['failed']:>8}"
              f"  {e['median_ttft_ms']:>9.0f} ms {e['p99_ttft_ms']:>7.0f} ms  {e['request_goodput'] or 0:.2f}")
    if args.out:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
