"""Perplexity of the default model, Tandem's CPU engine against llama.cpp, in the same run on the
same machine, over the very same token ids: a stricter end-to-end check of the engine's
arithmetic than greedy tokens, which flip at near-ties.

The text is public domain: Genesis 1-5 of the King James Version, as Debian's `bible-kjv`
package prints it (verse numbers stripped; `apt-get install bible-kjv`), or any UTF-8 file given
with --text. Tandem tokenizes it (`tandem bench perplexity`, which also writes the ids it
scored); llama.cpp (llama-cpp-python) scores the same ids in the same windows of --window
tokens, each from an empty cache, every token after a window's first. Tandem runs once per CPU
kernel set (candle's, `TANDEM_CPU_KERNELS=candle`, and the project's, the default).

Also: greedy next-token agreement at every scored position (both engines read the same text),
overall and where both engines lead their runner-up by at least --clear-margin in logits.

Usage: python3 scripts/bench_perplexity.py [--out docs/benchmarks/engine/perplexity_2core.json]
Needs: pip install llama-cpp-python (built from source; see docs/performance.md for the flags).
"""

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from bench_cpu_engine import cpu_name, model_path  # noqa: E402


def kjv_genesis():
    """The verses' text as one paragraph: chapter headings and verse numbers dropped, wrapped
    lines joined."""
    out = subprocess.run(["bible", "gen1:1-gen5:32"], check=True, capture_output=True, text=True).stdout
    words = []
    for line in out.splitlines():
        line = line.strip()
        if not line or re.fullmatch(r"[A-Za-z ]+ \d+", line):
            continue
        words.append(re.sub(r"^\d+\s+", "", line))
    return " ".join(words)


def tandem(text_path, window, kernels, kv_dtype="f16"):
    exe = os.path.join(ROOT, "target", "release", "tandem")
    env = dict(os.environ, TANDEM_KV_DTYPE=kv_dtype)
    if kernels:
        env["TANDEM_CPU_KERNELS"] = kernels
    else:
        env.pop("TANDEM_CPU_KERNELS", None)
    out = subprocess.run([exe, "bench", "perplexity", "--text", text_path, "--window", str(window)],
                         check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out)


def llama_cpp(tokens, window, threads):
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(model_path=model_path(), n_ctx=window, n_batch=window, n_threads=threads,
                          n_threads_batch=threads, logits_all=True, verbose=False)
    nll, argmax, margin = [], [], []
    for start in range(0, len(tokens) - window + 1, window):
        w = tokens[start:start + window]
        llm.reset()
        llm.eval(w)
        logits = np.asarray(llm.scores[:window], dtype=np.float64)
        m = logits.max(axis=1, keepdims=True)
        lse = (m + np.log(np.exp(logits - m).sum(axis=1, keepdims=True)))[:, 0]
        nll.append(float(sum(lse[i] - logits[i, w[i + 1]] for i in range(window - 1))))
        top = np.sort(logits[:window - 1], axis=1)
        argmax += [int(x) for x in logits[:window - 1].argmax(axis=1)]
        margin += [float(x) for x in top[:, -1] - top[:, -2]]
    scored = len(nll) * (window - 1)
    return {"engine": f"llama.cpp (llama-cpp-python {llama_cpp.__version__})", "window_nll": nll,
            "perplexity": math.exp(sum(nll) / scored), "scored": scored, "argmax": argmax, "margin": margin}


def agreement(ours, theirs, clear):
    """Greedy next-token agreement at every scored position (teacher-forced: both engines read
    the same text), overall and where both engines' top-two margin is at least `clear`."""
    pos = range(len(theirs["argmax"]))
    same = [ours["argmax"][i] == theirs["argmax"][i] for i in pos]
    sure = [i for i in pos if ours["margin"][i] >= clear and theirs["margin"][i] >= clear]
    return {"positions": len(same), "agree": sum(same), "clear_margin": clear, "clear_positions": len(sure),
            "clear_agree": sum(same[i] for i in sure)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--text", help="a UTF-8 text file (default: KJV Genesis 1-5 from `bible`)")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--clear-margin", type=float, default=0.5, help="logit lead that counts as a clear greedy choice")
    ap.add_argument("--out")
    args = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "tandem"], cwd=ROOT, check=True)
    if args.text:
        text_path, source = args.text, args.text
    else:
        fd, text_path = tempfile.mkstemp(suffix=".txt")
        with os.fdopen(fd, "w") as f:
            f.write(kjv_genesis())
        source = "Genesis 1-5, King James Version (public domain), Debian bible-kjv"
    threads = os.cpu_count() or 1
    configs = [("tandem_candle_kernels", "candle", "f16"), ("tandem_own_kernels", None, "f16"), ("tandem_own_kernels_f32_kv", None, "f32")]
    runs = {name: tandem(text_path, args.window, k, kv) for name, k, kv in configs}
    tokens = runs["tandem_candle_kernels"]["tokens"]
    base = llama_cpp(tokens, args.window, threads)
    rows = {}
    for name, r in runs.items():
        assert r["tokens"] == tokens
        rows[name] = {"perplexity": r["perplexity"], "vs_llama_cpp": r["perplexity"] / base["perplexity"] - 1,
                      "window_nll": r["window_nll"], "greedy_agreement": agreement(r, base, args.clear_margin)}
    result = {
        "machine": cpu_name(), "threads": threads, "model": os.path.basename(model_path()), "text": source,
        "window": args.window, "windows": runs["tandem_candle_kernels"]["windows"], "scored_tokens": base["scored"],
        "llama_cpp": {k: v for k, v in base.items() if k not in ("argmax", "margin")}, **rows, "tokens": tokens,
    }
    print(f"{'engine':<28} {'perplexity':>10} {'vs llama.cpp':>13} {'greedy agree':>14} {'where clear':>14}")
    print(f"{'llama.cpp':<28} {base['perplexity']:>10.4f}")
    for name, r in rows.items():
        g = r["greedy_agreement"]
        print(f"{name:<28} {r['perplexity']:>10.4f} {r['vs_llama_cpp'] * 100:>+12.2f}% {g['agree']:>6}/{g['positions']:<7} "
              f"{g['clear_agree']:>6}/{g['clear_positions']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
