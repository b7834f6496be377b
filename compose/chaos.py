#!/usr/bin/env python3
"""The chaos suite, long form: one fault at a time on the compose stack under a steady load, and
what each cost the clients.

The stack runs two prefill and two decode workers behind one gateway. A closed-loop load of
greedy streamed completions (a fixed set of prompts, so every answer has one right text, taken
from a fault-free pass first) runs through the whole suite. Each fault gets a window: a quiet
lead-in, the fault, then time to recover. Per fault:

- requests failed over requests sent in its window;
- requests whose text differs from the fault-free answer;
- p99 time to first token of the requests that started during the fault (for an instant fault,
  a kill or a restart, in the 10 s after it);
- seconds from the fault's end until a 5 s window completes as many requests as the baseline's
  median 5 s window did (80% of it), the time until throughput is back.

  compose/images.sh && python3 compose/chaos.py --out docs/benchmarks/reliability/chaos_dev_2core.json

The short form (one kill of each worker kind) runs in CI inside compose/test_stack.py.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_stack import GATEWAY, MODEL, compose, get, wait  # noqa: E402

PROMPTS = [
    "The lighthouse keeper climbed the stairs and",
    "In the kitchen, the recipe called for",
    "The train left the station at dawn, carrying",
    "A list of reasons to learn a second language:",
    "The museum's newest exhibit shows",
    "On the first day of school, the teacher",
    "The old map led the explorers to",
    "When the power went out, the city",
]
MAX_TOKENS = 32


def one(prompt):
    """A greedy streamed completion: (text, seconds to first token, error or None)."""
    body = json.dumps({"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
                       "ignore_eos": True, "stream": True}).encode()
    req = urllib.request.Request(f"{GATEWAY}/v1/completions", data=body, headers={"content-type": "application/json"})
    sent = time.time()
    text, ttft = "", None
    try:
        with urllib.request.urlopen(req, timeout=180) as r:
            for line in r:
                line = line.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                v = json.loads(line[6:])
                if "error" in v:
                    return text, ttft, f"error event: {v['error'].get('message')}"
                if ttft is None:
                    ttft = time.time() - sent
                text += v["choices"][0].get("text") or ""
        return text, ttft, None
    except urllib.error.HTTPError as e:
        # The gateway's refusal says why (OpenAI's error shape).
        try:
            message = json.loads(e.read()).get("error", {}).get("message")
        except Exception:  # noqa: BLE001 - a body that is not the error shape
            message = None
        return text, ttft, f"HTTP {e.code}: {message}"
    except Exception as e:  # noqa: BLE001 - every failure counts
        return text, ttft, repr(e)


class Load:
    """`clients` threads, each sending the prompts in turn, one request at a time."""

    def __init__(self, clients, expected):
        self.expected, self.records, self.lock = expected, [], threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.run, args=(i,), daemon=True) for i in range(clients)]

    def run(self, i):
        n = i
        while not self.stop.is_set():
            prompt = PROMPTS[n % len(PROMPTS)]
            started = time.time()
            text, ttft, error = one(prompt)
            with self.lock:
                self.records.append({"start": started, "end": time.time(), "ttft": ttft, "error": error,
                                     "differs": error is None and text != self.expected[prompt]})
            n += 1

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join()


def containers(p, service):
    """The running containers of `service` (stopped ones are left out)."""
    out = subprocess.run(["docker", "ps", "-q", "--filter", f"label=com.docker.compose.project={p}",
                          "--filter", f"label=com.docker.compose.service={service}"], capture_output=True, text=True, check=True)
    return sorted(out.stdout.split())


def container(p, service, index=0):
    """A running container of `service`."""
    return containers(p, service)[index]


def docker(*args):
    subprocess.run(["docker", *args], check=True, capture_output=True, text=True)


def restore(p):
    """Back to two of each worker (a killed container is replaced), everything routable."""
    compose(p, "up", "-d", "--no-build", "--no-recreate", "--scale", "prefill=2", "--scale", "decode=2")

    def routable():
        status, body = get(f"{GATEWAY}/ready")
        return status == 200 and json.loads(body).get("prefill_workers") == 2 and json.loads(body).get("decode_workers") == 2
    wait("two routable workers of each kind", 180, routable)


def faults(p):
    """Each fault: (name, what it does, how long the fault lasts before it is lifted)."""
    def kill(service):
        return lambda: docker("kill", container(p, service))

    def pause(service, seconds):
        def run():
            c = container(p, service)
            docker("pause", c)
            time.sleep(seconds)
            docker("unpause", c)
        return run

    def disconnect(service, seconds):
        def run():
            c, net = container(p, service), f"{p}_default"
            docker("network", "disconnect", net, c)
            time.sleep(seconds)
            docker("network", "connect", net, c)
        return run

    def corrupting_prefill(seconds):
        # For the window, the only prefill worker is one that flips a byte in every second
        # handoff after its checksums were taken: it joins, then the two others drain and stop
        # (so no cached prefix routes around it); it leaves when the fault is lifted.
        def run():
            originals = containers(p, "prefill")
            out = compose(p, "run", "-d", "--no-deps", "-e", "TANDEM_FAULT_CORRUPT_KV_EVERY=2", "prefill")
            cid = out.stdout.strip().splitlines()[-1]

            def joined():
                status, body = get(f"{GATEWAY}/ready")
                return status == 200 and json.loads(body).get("prefill_workers") == len(originals) + 1
            wait("the corrupting prefill worker is routable", 180, joined)
            for c in originals:
                docker("stop", "-t", "60", c)
            time.sleep(seconds)
            # Lifting the fault: the healthy workers come back first, so the stack is never left
            # without a prefill worker; then the corrupting one drains and goes.
            for c in originals:
                docker("start", c)
            wait("the healthy prefill workers are routable again", 180, joined)
            docker("stop", "-t", "60", cid)
            docker("rm", "-f", cid)
        return run

    return [
        ("kill a decode container", kill("decode")),
        ("kill a prefill container", kill("prefill")),
        ("pause a decode container for 15 s", pause("decode", 15)),
        ("pause a prefill container for 10 s", pause("prefill", 10)),
        ("disconnect a prefill container from the network for 10 s", disconnect("prefill", 10)),
        ("restart Redis", lambda: docker("restart", "-t", "0", container(p, "redis"))),
        ("a prefill worker corrupting every second handoff, for 30 s", corrupting_prefill(30)),
    ]


COUNTERS = [
    "tandem_kv_handoff_failures_total",
    'tandem_resumes_total{outcome="resumed"}',
    'tandem_worker_retries_total{role="prefill"}',
    'tandem_worker_retries_total{role="decode"}',
]


def counters():
    """The gateway's recovery counters: what it did about each fault."""
    status, body = get(f"{GATEWAY}/metrics")
    out = {}
    for name in COUNTERS:
        out[name] = next((float(line.split()[-1]) for line in body.splitlines() if line.startswith(name + " ")), 0.0) if status == 200 else None
    return out


def completions_per_window(records, start, end, window=5.0):
    out, t = [], start
    while t + window <= end:
        out.append(sum(1 for r in records if r["error"] is None and t <= r["end"] < t + window))
        t += window
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--project", default="tandemchaos")
    ap.add_argument("--clients", type=int, default=2, help="closed-loop clients (about half the stack's capacity here)")
    ap.add_argument("--lead", type=float, default=10.0)
    ap.add_argument("--recover", type=float, default=30.0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--only", default=None, help="run only the faults whose name contains this; with --out, their entries replace those of the same name there")
    args = ap.parse_args()
    p = args.project
    compose(p, "down", "-v", "--remove-orphans", check=False)
    result = {"benchmark": "chaos suite on the compose stack", "machine": f"{os.cpu_count()} cores, {platform.machine()}",
              "stack": {"prefill": 2, "decode": 2, "gateway": 1}, "load": {"clients": args.clients, "max_tokens": MAX_TOKENS},
              "faults": []}
    try:
        compose(p, "up", "-d", "--no-build", "--scale", "prefill=2", "--scale", "decode=2")
        restore(p)
        expected = {q: one(q)[0] for q in PROMPTS}
        with Load(args.clients, expected) as load:
            base_start = time.time()
            time.sleep(30)
            base = completions_per_window(load.records, base_start, time.time())
            baseline = statistics.median(base) if base else 0
            result["baseline_completions_per_5s"] = baseline
            for name, fault in faults(p):
                if args.only and args.only not in name:
                    continue
                time.sleep(args.lead)
                before = counters()
                began = time.time()
                fault()
                lifted = time.time()
                time.sleep(args.recover)
                done = time.time()
                with load.lock:
                    window = [r for r in load.records if began - args.lead <= r["start"] < done]
                    # An instant fault (a kill, a restart) counts for the 10 s after it.
                    until = max(lifted, began + 10.0)
                    during = [r["ttft"] for r in load.records if began <= r["start"] <= until and r["ttft"] is not None]
                after = completions_per_window(load.records, lifted, done)
                # The gateway that served the window (a restart of it would reset them).
                now = counters()
                recovered = {k: (now[k] - before[k]) if now[k] is not None and before[k] is not None else None for k in COUNTERS}
                back = next((i * 5.0 for i, n in enumerate(after) if n >= 0.8 * baseline), None)
                entry = {
                    "fault": name,
                    "sent": len(window),
                    "failed": sum(1 for r in window if r["error"]),
                    "differing": sum(1 for r in window if r["differs"]),
                    "p99_ttft_during_s": round(sorted(during)[max(0, int(len(during) * 0.99) - 1)], 3) if during else None,
                    "fault_lasted_s": round(lifted - began, 1),
                    "throughput_back_after_s": back,
                    "errors": sorted({r["error"] for r in window if r["error"]})[:3],
                    "gateway_recoveries": recovered,
                }
                print(json.dumps(entry), flush=True)
                result["faults"].append(entry)
                restore(p)
    finally:
        compose(p, "down", "-v", "--remove-orphans", check=False)
    print("\n fault                                   sent  failed  differing  p99 TTFT  back after")
    for f in result["faults"]:
        print(f" {f['fault']:38} {f['sent']:5} {f['failed']:7} {f['differing']:10}  {f['p99_ttft_during_s']}  {f['throughput_back_after_s']}")
    if args.out and args.only and os.path.exists(args.out):
        with open(args.out) as f:
            earlier = json.load(f)
        fresh = {e["fault"]: e for e in result["faults"]}
        earlier["faults"] = [fresh.pop(e["fault"], e) for e in earlier["faults"]] + list(fresh.values())
        result = earlier
    if args.out:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
