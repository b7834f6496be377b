#!/usr/bin/env python3
"""The compose stack, tested as a user runs it: up, the official `openai` client against
127.0.0.1:8000, decode scaled from 1 to 2 and back under a steady trickle of requests with no
failure, a decode and a prefill container killed under load with no failure and no changed
token, the request's trace at the Jaeger service, a Tandem metric in Prometheus, and down.

Reaches the containers only through the ports compose.yaml publishes on 127.0.0.1. Run by
compose/test.sh after images.sh; writes what it measured to --out (JSON).
"""

import argparse
import json
import os
import subprocess
import threading
import time
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
GATEWAY = "http://127.0.0.1:8000"
# Two gateway replicas behind the stack's nginx, given on every `up` (compose would otherwise
# converge the service back to one).
GATEWAYS = ("--scale", "gateway=2")
JAEGER = "http://127.0.0.1:16686"
PROMETHEUS = "http://127.0.0.1:9090"
MODEL = "SmolLM2-135M-Instruct"


def compose(project, *args, check=True):
    cmd = ["docker-compose", "-p", project, "-f", os.path.join(HERE, "compose.yaml"), *args]
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def get(url, timeout=5):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except (urllib.error.URLError, OSError):
        return None, ""


def wait(what, limit, check):
    deadline = time.time() + limit
    while time.time() < deadline:
        v = check()
        if v:
            return v
        time.sleep(0.5)
    raise AssertionError(f"timed out after {limit} s waiting until {what}")


def decode_workers():
    status, body = get(f"{GATEWAY}/ready")
    return json.loads(body).get("decode_workers", 0) if status in (200, 503) and body.startswith("{") else 0


def prometheus(query):
    status, body = get(f"{PROMETHEUS}/api/v1/query?query={urllib.request.quote(query)}")
    if status != 200:
        return []
    return json.loads(body)["data"]["result"]


class Trickle:
    """A request every `gap` seconds on a thread of its own, counting failures."""

    def __init__(self, gap=0.3):
        self.gap, self.ok, self.failed, self.errors = gap, 0, 0, []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        body = json.dumps({"model": MODEL, "prompt": "Count: one, two,", "max_tokens": 8, "temperature": 0}).encode()
        while not self.stop.is_set():
            req = urllib.request.Request(f"{GATEWAY}/v1/completions", data=body, headers={"content-type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    json.loads(r.read())
                    self.ok += 1
            except Exception as e:  # noqa: BLE001 - every failure counts
                self.failed += 1
                self.errors.append(repr(e))
            time.sleep(self.gap)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def stream_text(prompt, max_tokens=64, warm=None):
    """A greedy streamed completion's text; `warm` (an Event) is set after its fourth chunk."""
    body = json.dumps({"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "ignore_eos": True, "stream": True}).encode()
    req = urllib.request.Request(f"{GATEWAY}/v1/completions", data=body, headers={"content-type": "application/json"})
    text, chunks = "", 0
    with urllib.request.urlopen(req, timeout=180) as r:
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            v = json.loads(line[6:])
            if "error" in v:
                raise AssertionError(f"the stream carried an error: {v}")
            text += v["choices"][0].get("text") or ""
            chunks += 1
            if warm is not None and chunks == 4:
                warm.set()
    return text


def in_threads(calls):
    """Runs each (function, args) on a thread; returns their results (or exceptions) in order."""
    out = [None] * len(calls)

    def run(i, f, a):
        try:
            out[i] = f(*a)
        except Exception as e:  # noqa: BLE001 - returned for the caller to judge
            out[i] = e
    threads = [threading.Thread(target=run, args=(i, f, a)) for i, (f, a) in enumerate(calls)]
    for t in threads:
        t.start()
    return threads, out


def completion(prompt, max_tokens=4):
    body = json.dumps({"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}).encode()
    req = urllib.request.Request(f"{GATEWAY}/v1/completions", data=body, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=180) as r:
        return json.loads(r.read())["choices"][0]["text"]


def chaos(p, result):
    """One kill of each kind under a steady trickle: a decode container while two streams run on
    the decode pool, then a prefill container while two long prompts are being computed. Nothing
    may fail, and the streams' text must equal the undisturbed run's."""
    compose(p, "up", "-d", "--no-build", "--no-recreate", *GATEWAYS, "--scale", "decode=2", "--scale", "prefill=2")

    def routable():
        status, body = get(f"{GATEWAY}/ready")
        return status == 200 and json.loads(body).get("decode_workers") == 2 and json.loads(body).get("prefill_workers") == 2
    for _ in range(4):  # each gateway behind nginx, twice
        wait("both gateways route to two decode and two prefill workers", 120, routable)
    prompts = ["The lighthouse keeper climbed the stairs and", "In the kitchen, the recipe called for"]
    expected = [stream_text(q) for q in prompts]
    containers = lambda svc: compose(p, "ps", "-q", svc).stdout.split()  # noqa: E731
    out = {}
    with Trickle() as trickle:
        warm = [threading.Event() for _ in prompts]
        threads, texts = in_threads([(stream_text, (q, 64, w)) for q, w in zip(prompts, warm)])
        for w in warm:
            assert w.wait(120), "a stream did not start"
        victim = containers("decode")[0]
        subprocess.run(["docker", "kill", victim], check=True, capture_output=True)
        for t in threads:
            t.join()
        differing = [i for i, (got, want) in enumerate(zip(texts, expected)) if got != want]
        assert not differing, f"streams after a killed decode worker: {texts} against {expected}"
        out["decode_kill"] = {"streams": len(prompts), "differing": 0}

        long_prompt = "The history of the world is long and full of surprises. " * 60
        threads, answers = in_threads([(completion, (f"{i} {long_prompt}",)) for i in range(2)])
        time.sleep(1.0)  # both prompts reach a prefill worker
        subprocess.run(["docker", "kill", containers("prefill")[0]], check=True, capture_output=True)
        for t in threads:
            t.join()
        failures = [a for a in answers if not isinstance(a, str)]
        assert not failures, f"requests during a killed prefill worker: {failures}"
        out["prefill_kill"] = {"requests": len(answers), "failed": 0}
        time.sleep(2)
    out["trickle"] = {"ok": trickle.ok, "failed": trickle.failed}
    assert trickle.failed == 0, (trickle.ok, trickle.failed, trickle.errors[:5])
    resumed = prometheus('sum(tandem_resumes_total{outcome="resumed"})')
    out["resumed_streams"] = int(float(resumed[0]["value"][1])) if resumed else 0
    result["chaos"] = out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--project", default="tandemci")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from openai import OpenAI

    p = args.project
    result = {}
    compose(p, "down", "-v", "--remove-orphans", check=False)
    started = time.time()
    try:
        compose(p, "up", "-d", "--no-build", *GATEWAYS)
        wait("the gateway routes to a prefill and a decode worker", 240, lambda: get(f"{GATEWAY}/ready")[0] == 200)
        result["stack_ready_s"] = time.time() - started

        client = OpenAI(base_url=f"{GATEWAY}/v1", api_key="unused")
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "Say hello."}], max_tokens=12, temperature=0)
        chat = raw.parse()
        assert chat.choices[0].message.content, chat
        trace_id = raw.headers["traceparent"].split("-")[1]
        models = client.models.list()
        assert [m.id for m in models.data] == [MODEL], models
        stream = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Count to five."}], max_tokens=16, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text, "the stream carried text"

        # Decode 1 -> 2 -> 1 while requests keep coming; none may fail.
        with Trickle() as trickle:
            time.sleep(2)
            asked = time.time()
            compose(p, "up", "-d", "--no-build", "--no-recreate", *GATEWAYS, "--scale", "decode=2")
            wait("the gateway routes to two decode workers", 120, lambda: decode_workers() == 2)
            result["scale_up_to_routable_s"] = time.time() - asked
            # The new worker's first request: both decode workers have finished some (as
            # Prometheus sees them, so up to one scrape interval late).
            wait("both decode workers served requests", 120, lambda: len([
                r for r in prometheus('tandem_worker_finished_total{role="decode"}') if float(r["value"][1]) > 0
            ]) == 2)
            result["scale_up_to_first_request_s"] = time.time() - asked
            asked = time.time()
            compose(p, "up", "-d", "--no-build", "--no-recreate", *GATEWAYS, "--scale", "decode=1")
            result["scale_down_s"] = time.time() - asked
            wait("the gateway routes to one decode worker", 60, lambda: decode_workers() == 1)
            time.sleep(2)
        result["trickle"] = {"ok": trickle.ok, "failed": trickle.failed}
        assert trickle.failed == 0 and trickle.ok > 10, (trickle.ok, trickle.failed, trickle.errors[:5])

        # The first request's trace, from every process it went through.
        def trace_services():
            status, body = get(f"{JAEGER}/api/traces/{trace_id}")
            if status != 200:
                return None
            t = json.loads(body)["data"][0]
            names = {p["serviceName"] for p in t["processes"].values()}
            return names if {"tandem-gateway", "tandem-prefill", "tandem-decode"} <= names else None
        result["trace_services"] = sorted(wait("the trace reaches Jaeger", 60, trace_services))

        # Both gateways behind nginx took requests (every request counts on the one that served it).
        def gateways_used():
            used = [r for r in prometheus("sum by (instance) (tandem_requests_total)") if float(r["value"][1]) > 0]
            return len(used) if len(used) == 2 else None
        result["gateways_serving"] = wait("both gateways served requests", 60, gateways_used)

        chaos(p, result)

        # A Tandem metric in Prometheus, from a worker's own page.
        found = wait("Prometheus has scraped the workers", 60, lambda: prometheus("vllm:num_requests_running"))
        result["prometheus_series"] = len(found)
        result["passed"] = True
    finally:
        logs = compose(p, "logs", "--tail", "30", check=False).stdout
        if not result.get("passed"):
            print(logs[-6000:])
        compose(p, "down", "-v", "--remove-orphans", check=False)
        result["total_s"] = time.time() - started
        print(json.dumps(result, indent=2))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
