"""How much load tandem-loadtest itself can drive: against `fake_openai` (an endpoint with no
model that streams each token on a fixed schedule: first after 10 ms, then one a millisecond),
at rising Poisson rates with 512-token prompts and 128 output tokens. The fake's own timing is
known, so any TTFT or ITL beyond it, or a served rate below the offered one, is the load
generator's (or the machine's) limit. Writes one JSON and prints a table.

    cargo build --release -p tandem-loadtest --example fake_openai
    python3 scripts/bench_loadtest_headroom.py --bin target/release --rates 200,1000,2000 --json OUT
"""

import argparse
import json
import os
import pathlib
import subprocess
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=str(ROOT / "target/release"), help="folder with tandem-loadtest and examples/fake_openai")
    ap.add_argument("--fake", default=None, help="the fake_openai binary (default: BIN/examples/fake_openai)")
    ap.add_argument("--rates", default="200,1000,2000")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--port", type=int, default=8100)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    fake = args.fake or f"{args.bin}/examples/fake_openai"
    server = subprocess.Popen([fake, "--port", str(args.port), "--ttft-ms", "10", "--itl-ms", "1"], stdout=subprocess.PIPE, text=True)
    server.stdout.readline()
    rows = []
    try:
        with tempfile.TemporaryDirectory() as out:
            for rate in [float(r) for r in args.rates.split(",") if r]:
                n = int(rate * args.seconds)
                cmd = [f"{args.bin}/tandem-loadtest", "--base-url", f"http://127.0.0.1:{args.port}", "--model", "fake-model",
                       "--tokenizer", str(ROOT / "shared/engine/tests/fixtures/tiny-llama"), "--random-input-len", "512",
                       "--random-output-len", "128", "--num-prompts", str(n), "--request-rate", str(rate), "--seed", "1",
                       "--save-result", "--result-dir", out, "--result-filename", "r.json"]
                t0 = time.time()
                subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
                r = json.loads(pathlib.Path(out, "r.json").read_text())
                rows.append({
                    "offered_req_s": rate, "num_prompts": n, "completed": r["completed"], "failed": r["failed"],
                    "served_req_s": r["request_throughput"], "output_tok_s": r["output_throughput"],
                    "max_in_flight": r.get("max_in_flight"), "wall_s": time.time() - t0,
                    "median_ttft_ms": r["median_ttft_ms"], "p99_ttft_ms": r["p99_ttft_ms"],
                    "median_itl_ms": r["median_itl_ms"], "p99_itl_ms": r["p99_itl_ms"],
                })
    finally:
        server.terminate()
        server.wait()
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "")
    result = {"benchmark": "load generator headroom against a fake endpoint (TTFT 10 ms, then 1 ms a token)",
              "machine": f"{cpu}, {os.cpu_count()} cores", "workload": "random 512 in / 128 out, Poisson", "rows": rows}
    pathlib.Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'offered':>8} {'served':>8} {'tok/s':>9} {'fail':>5} {'ttft50':>7} {'ttft99':>7} {'itl50':>6} {'itl99':>6}")
    for x in rows:
        print(f"{x['offered_req_s']:>8.0f} {x['served_req_s']:>8.1f} {x['output_tok_s']:>9.0f} {x['failed']:>5} "
              f"{x['median_ttft_ms']:>7.1f} {x['p99_ttft_ms']:>7.1f} {x['median_itl_ms']:>6.2f} {x['p99_itl_ms']:>6.2f}")


if __name__ == "__main__":
    main()
