"""Served throughput and latency on one GPU, against the engine's own offline rate, in one run.

For each build given (`--bin LABEL=DIR`, DIR holding its `tandem`), it starts
`tandem up --device cuda:0` on a random-weight model of the Llama-3.2-1B shape (vocabulary 320,
the tiny-llama test tokenizer; made by `serve_model.py` when missing), drives it with
`tandem-loadtest` (random 512-token prompts, 128 output tokens, `--ignore-eos`, greedy) at Poisson loads and at
a fixed concurrency, and records for each load:

- what the client saw: served req/s, output tok/s, TTFT, TPOT and ITL percentiles;
- where a request's time went, from the gateway's histograms (their means over the load): prefill
  queue, prefill compute, KV export, KV transfer, and the gap from the prefill's answer to the
  decode worker's first token (import and the first decode step);
- the CPU each process used (seconds per second of wall time) and its busiest threads.

In the same run it measures the engine alone with `tandem bench engine` (decode at the served
batch and context, prefill of one prompt) from the last build given, and writes everything as one
JSON file, then prints a short table.

    python3 scripts/gpu/serve_bench.py --bin before=target/gpu/base --bin after=target/gpu/new \
        --loadtest target/gpu/new/tandem-loadtest --out /tmp/out --json docs/benchmarks/serving/serve_h200.json
"""

import argparse
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parents[2]
CLK = os.sysconf("SC_CLK_TCK")


def get(url, timeout=5):
    return urllib.request.urlopen(url, timeout=timeout).read().decode()


def children(pid):
    """Every descendant of pid, with its command line."""
    out = {}
    for p in pathlib.Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            cmd = (p / "cmdline").read_bytes().split(b"\0")
            role = cmd[1].decode() if len(cmd) > 1 else "?"
            out[int(p.name)] = role
            out.update(children(int(p.name)))
    return out


def thread_cpu(pid):
    """CPU seconds of each thread of pid, by thread name (threads of one name summed)."""
    per = {}
    try:
        tasks = list(pathlib.Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return per
    for t in tasks:
        try:
            stat = (t / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat.rsplit(")", 1)[1].split()
        secs = (int(fields[11]) + int(fields[12])) / CLK
        name = re.sub(r"[-_ ]?\d+$", "", name)
        per[name] = per.get(name, 0.0) + secs
    return per


def histograms(text):
    """name -> (sum, count) of every histogram in a Prometheus text page (labels summed)."""
    out = {}
    for m in re.finditer(r"^(\w+)_(sum|count)(?:\{[^}]*\})? ([0-9.e+-]+)$", text, re.M):
        name, kind, value = m.group(1), m.group(2), float(m.group(3))
        s, c = out.get(name, (0.0, 0.0))
        out[name] = (s + value, c) if kind == "sum" else (s, c + value)
    return out


def mean_ms(after, before, name):
    a, b = after.get(name), before.get(name, (0.0, 0.0))
    if not a or a[1] - b[1] <= 0:
        return None
    return 1e3 * (a[0] - b[0]) / (a[1] - b[1])


# Gateway histograms that make up a request's path, in order (those a build lacks are skipped).
STAGES = [
    ("prefill_queue", "tandem_prefill_queue_seconds"),
    ("prefill_compute", "tandem_prefill_compute_seconds"),
    ("kv_export", "tandem_kv_export_seconds"),
    ("prefill_total", "tandem_prefill_seconds"),
    ("kv_handoff", "tandem_kv_handoff_seconds"),
    ("decode_first_token", "tandem_decode_first_token_seconds"),
]


def start_cluster(bin_dir, model_dir, port, env_extra, log, up_args=(), kv_cache_mb=16000):
    env = dict(os.environ, **env_extra)
    cmd = [f"{bin_dir}/tandem", "up", "--model", model_dir, "--device", "cuda:0", "--kv-cache-mb", str(kv_cache_mb), "--port", str(port)]
    cmd += list(up_args)
    up = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    for _ in range(1200):
        try:
            get(f"http://127.0.0.1:{port}/ready", timeout=1)
            return up
        except Exception:
            if up.poll() is not None:
                raise SystemExit(f"tandem up exited: {up.returncode}")
            time.sleep(0.25)
    raise SystemExit("tandem up never became ready")


def slo_of(text):
    """`ttft:1000,tpot:25` -> {"ttft": 1000.0, "tpot": 25.0} (milliseconds)."""
    return {k: float(v) for k, v in (p.split(":") for p in text.split(","))}


def goodput(r, slos):
    """Per SLO, the share of requests that completed within every bound, and those requests per
    second of the run (DistServe's goodput). TPOT is a request's time after its first token over
    its tokens after the first."""
    ttfts, itls, outs, errs = r.get("ttfts", []), r.get("itls", []), r.get("output_lens", []), r.get("errors", [])
    per = []
    for i, t in enumerate(ttfts):
        ok = not (errs[i] if i < len(errs) else "")
        # The gaps are between streamed chunks, and a chunk may carry several tokens: the time
        # after the first token is their sum, divided by the tokens after the first.
        after = sum(itls[i]) if i < len(itls) else 0.0
        n = outs[i] if i < len(outs) else 0
        tpot = after / (n - 1) if n > 1 else 0.0
        per.append((ok, t * 1e3, tpot * 1e3))
    res = {}
    for text in slos:
        slo = slo_of(text)
        good = sum(ok and ttft <= slo.get("ttft", float("inf")) and tpot <= slo.get("tpot", float("inf")) for ok, ttft, tpot in per)
        res[text] = {"attained": good / len(per) if per else None, "goodput_rps": good / r["duration"] if r.get("duration") else None}
    return res, per


def load(loadtest, model_dir, port, out, name, rate, concurrency, n, in_len, out_len, slos=()):
    cmd = [
        loadtest, "--base-url", f"http://127.0.0.1:{port}", "--tokenizer", model_dir,
        "--random-input-len", str(in_len), "--random-output-len", str(out_len), "--ignore-eos", "--temperature", "0",
        "--num-prompts", str(n), "--request-rate", str(rate), "--seed", "7", "--label", name,
        "--save-result", "--save-detailed", "--result-dir", str(out), "--result-filename", f"{name}.json",
    ]
    if concurrency:
        cmd += ["--max-concurrency", str(concurrency)]
    with open(out / f"{name}.txt", "w") as f:
        subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    path = out / f"{name}.json"
    r = json.loads(path.read_text())
    path.unlink()  # per-request arrays: large, and summarised below
    keys = ["completed", "failed", "duration", "request_throughput", "output_throughput", "median_ttft_ms", "p99_ttft_ms",
            "median_tpot_ms", "p99_tpot_ms", "median_itl_ms", "p99_itl_ms", "max_in_flight"]
    out = {k: r.get(k) for k in keys}
    if slos:
        out["slo"], per = goodput(r, slos)
        out["requests_ms"] = [[round(ttft, 1), round(tpot, 2)] for ok, ttft, tpot in per if ok]
    # How clumped the stream is: the share of tokens that arrived within 0.1 ms of the one before
    # (in the same read as it, in effect), and the share of gaps over 10 ms.
    gaps = [g for per in r.get("itls", []) for g in per]
    if gaps:
        out["itl_share_under_0.1ms"] = sum(g < 1e-4 for g in gaps) / len(gaps)
        out["itl_share_over_10ms"] = sum(g > 1e-2 for g in gaps) / len(gaps)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", action="append", required=True, help="LABEL=DIR holding that build's tandem")
    ap.add_argument("--loadtest", required=True, help="the tandem-loadtest binary that drives every build")
    ap.add_argument("--env", action="append", default=[], help="LABEL:KEY=VALUE, environment for that build's cluster")
    ap.add_argument(
        "--up-args", action="append", default=[], help="LABEL:ARGS, more `tandem up` arguments for that label (`aggr:--aggregated 1`)"
    )
    ap.add_argument("--model-dir", default=None, help="default: /tmp/tandem-llama-SHAPE-v320")
    ap.add_argument("--shape", choices=["1b", "8b"], default="1b", help="the random model's shape (serve_model.py)")
    ap.add_argument("--kv-cache-mb", type=int, default=16000, help="KV cache of each worker")
    ap.add_argument("--slo", action="append", default=[], help="goodput bounds, e.g. ttft:1000,tpot:25 (ms); repeatable")
    ap.add_argument("--no-concurrency", action="store_true", help="only the Poisson loads")
    ap.add_argument("--out", default="/tmp/serve-bench")
    ap.add_argument("--json", required=True)
    ap.add_argument("--rates", default="8,32,128")
    ap.add_argument("--concurrency", type=int, default=128)
    ap.add_argument("--seconds", type=float, default=20.0, help="length of each Poisson load")
    ap.add_argument("--concurrency-prompts", type=int, default=2000)
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--skip-engine", action="store_true")
    ap.add_argument("--engine-prefill", default=None, help="prompt lengths for the engine's prefill rows (default: --input-len)")
    args = ap.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.model_dir = args.model_dir or f"/tmp/tandem-llama-{args.shape}-v320"
    if not (pathlib.Path(args.model_dir) / "config.json").exists():
        subprocess.run([sys.executable, str(ROOT / "scripts/gpu/serve_model.py"), args.model_dir, "--shape", args.shape],
                       check=True, stdout=subprocess.DEVNULL)
    envs = {}
    for e in args.env:
        label, kv = e.split(":", 1)
        k, v = kv.split("=", 1)
        envs.setdefault(label, {})[k] = v

    up_args = {}
    for e in args.up_args:
        label, extra = e.split(":", 1)
        up_args[label] = extra.split()

    builds = []
    for spec in args.bin:
        label, bin_dir = spec.split("=", 1)
        env_extra = envs.get(label, {})
        log = open(out / f"up_{label}.log", "w")
        up = start_cluster(bin_dir, args.model_dir, args.port, env_extra, log, up_args.get(label, ()), args.kv_cache_mb)
        procs = children(up.pid)
        runs = []
        loads = [(f"rate{r}", float(r), 0, max(64, int(float(r) * args.seconds))) for r in args.rates.split(",") if r]
        if not args.no_concurrency:
            loads.append((f"conc{args.concurrency}", "inf", args.concurrency, args.concurrency_prompts))
        # Warm-up: captures graphs, opens connections.
        load(args.loadtest, args.model_dir, args.port, out, f"{label}_warmup", "inf", 32, 128, args.input_len, args.output_len)
        for name, rate, conc, n in loads:
            before = histograms(get(f"http://127.0.0.1:{args.port}/metrics"))
            cpu0 = {pid: thread_cpu(pid) for pid in procs}
            smi = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "200"],
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            t0 = time.time()
            r = load(args.loadtest, args.model_dir, args.port, out, f"{label}_{name}", rate, conc, n, args.input_len, args.output_len, args.slo)
            wall = time.time() - t0
            smi.terminate()
            util = [float(x) for x in smi.communicate()[0].split() if x.strip().replace(".", "").isdigit()]
            # The busy share nvidia-smi reports (a kernel ran in the sample period), over the load.
            r["gpu_util_mean"] = round(sum(util) / len(util), 1) if util else None
            cpu1 = {pid: thread_cpu(pid) for pid in procs}
            after = histograms(get(f"http://127.0.0.1:{args.port}/metrics"))
            r["offered"] = name
            r["stages_ms"] = {k: mean_ms(after, before, m) for k, m in STAGES if mean_ms(after, before, m) is not None}
            cpu = {}
            for pid, role in procs.items():
                threads = {t: (cpu1[pid].get(t, 0) - cpu0[pid].get(t, 0)) / wall for t in cpu1[pid]}
                top = sorted(threads.items(), key=lambda x: -x[1])[:4]
                cpu[role] = {"cores": round(sum(threads.values()), 3), "threads": {t: round(c, 3) for t, c in top}}
            r["cpu_cores"] = cpu
            runs.append(r)
            print(label, name, json.dumps({k: v for k, v in r.items() if k != "requests_ms"}), flush=True)
        up.send_signal(signal.SIGINT)
        try:
            up.wait(timeout=60)
        except subprocess.TimeoutExpired:
            up.kill()
        builds.append({"label": label, "env": env_extra, "up_args": up_args.get(label, []), "runs": runs})

    engine = None
    if not args.skip_engine:
        bin_dir = args.bin[-1].split("=", 1)[1]
        path = out / "engine.json"
        subprocess.run([f"{bin_dir}/tandem", "bench", "engine", "--shape", f"llama-{args.shape}", "--batches", str(args.concurrency),
                        "--contexts", str(args.input_len), "--prefill", args.engine_prefill or str(args.input_len), "--output", str(path)],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        engine = json.loads(path.read_text())

    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
    cpu_name = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "")
    summary = {
        "gpu": gpu, "cpu": cpu_name, "cores": os.cpu_count(),
        "model": f"random bf16, Llama {args.shape.upper()} shape, vocabulary 320 (tiny-llama test tokenizer)",
        "cluster": f"tandem up --device cuda:0 --kv-cache-mb {args.kv_cache_mb}, plus each build's up_args",
        "slo": args.slo,
        "load": f"tandem-loadtest random {args.input_len} in / {args.output_len} out, ignore_eos; Poisson rates {args.rates} "
                f"for {args.seconds:.0f} s each, then concurrency {args.concurrency} ({args.concurrency_prompts} prompts)",
        "builds": builds, "engine": engine,
    }
    pathlib.Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
    if engine:
        for row in engine.get("rows", []):
            print("engine", json.dumps(row))
    print(f"{'build':<8} {'load':<8} {'req/s':>6} {'tok/s':>7} {'ttft50':>7} {'ttft99':>7} {'tpot50':>6} {'itl50':>6} {'itl99':>6}  stages(ms)")
    for b in builds:
        for r in b["runs"]:
            f = lambda k, w=7, p=1: f"{(r.get(k) or 0):>{w}.{p}f}"
            stages = " ".join(f"{k}={v:.1f}" for k, v in r["stages_ms"].items())
            slo = " ".join(f"[{k}] {v['attained']:.0%} {v['goodput_rps']:.2f}/s" for k, v in r.get("slo", {}).items() if v["attained"] is not None)
            print(f"{b['label']:<8} {r['offered']:<8} {f('request_throughput', 6)} {f('output_throughput', 7, 0)} {f('median_ttft_ms')} "
                  f"{f('p99_ttft_ms')} {f('median_tpot_ms', 6, 2)} {f('median_itl_ms', 6, 2)} {f('p99_itl_ms', 6, 1)}  {stages} {slo}")


if __name__ == "__main__":
    main()
