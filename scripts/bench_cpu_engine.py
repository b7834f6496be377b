"""CPU engine benchmark: prefill and decode tokens/s of Tandem's CPU engine and of llama.cpp on
the same model, on the same machine, in the same run.

Both sides run the same test, the way llama.cpp's `llama-bench` runs its pp/tg tests: a prompt of
PROMPT_LEN random tokens computed in one pass (prefill), then GEN tokens generated one at a time
(decode), on a fresh sequence each repetition, after one warm-up repetition. Tandem's side is
`tandem bench cpu` (release build); llama.cpp's is llama-cpp-python with as many threads as the
machine has cores.

Usage: python3 scripts/bench_cpu_engine.py [--out docs/benchmarks/engine/cpu_2core.json]
Needs: pip install llama-cpp-python (builds llama.cpp from source).
"""

import argparse
import json
import os
import platform
import random
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def model_path():
    base = os.environ.get("TANDEM_MODEL_DIR", os.path.expanduser("~/.cache/tandem/models"))
    return os.path.join(base, "SmolLM2-135M-Instruct.Q4_1.gguf")


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def tandem(prompt_len, gen, reps):
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "tandem"], cwd=ROOT, check=True)
    exe = os.path.join(ROOT, "target", "release", "tandem")
    subprocess.run([exe, "fetch-model"], check=True, stdout=subprocess.DEVNULL)
    out = subprocess.run(
        [exe, "bench", "cpu", "--prompt-len", str(prompt_len), "--gen", str(gen), "--reps", str(reps)],
        check=True, capture_output=True, text=True,
    ).stdout
    return json.loads(out)


def llama_cpp(prompt_len, gen, reps, threads):
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(model_path=model_path(), n_ctx=prompt_len + gen + 16, n_batch=prompt_len,
                          n_threads=threads, n_threads_batch=threads, verbose=False)
    vocab = llm.n_vocab()
    rng = random.Random(7)

    def greedy():
        # The last evaluated position's logits, straight from the context.
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))
        return int(logits.argmax())

    prefill_ms, decode_ms = [], []
    for rep in range(reps + 1):
        prompt = [rng.randrange(vocab) for _ in range(prompt_len)]
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt)
        prefill = (time.perf_counter() - t) * 1e3
        token = greedy()
        t = time.perf_counter()
        for _ in range(gen):
            llm.eval([token])
            token = greedy()
        decode = (time.perf_counter() - t) * 1e3
        if rep > 0:
            prefill_ms.append(prefill)
            decode_ms.append(decode)
    mean = lambda v: sum(v) / len(v)
    return {
        "engine": f"llama.cpp (llama-cpp-python {llama_cpp.__version__})",
        "threads": threads,
        "prompt_len": prompt_len,
        "gen": gen,
        "reps": reps,
        "prefill_tokens_per_s": prompt_len / (mean(prefill_ms) / 1e3),
        "decode_tokens_per_s": gen / (mean(decode_ms) / 1e3),
        "prefill_ms": prefill_ms,
        "decode_ms": decode_ms,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "benchmarks", "engine", "cpu_2core.json"))
    args = ap.parse_args()
    threads = os.cpu_count() or 1
    ours = tandem(args.prompt_len, args.gen, args.reps)
    base = llama_cpp(args.prompt_len, args.gen, args.reps, threads)
    result = {
        "benchmark": "cpu_engine",
        "machine": f"{platform.machine()}, {threads} cores ({cpu_name()}), no GPU",
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1)",
        "test": f"pp{args.prompt_len} (one prefill pass of random tokens) and tg{args.gen} (greedy, one token a step)",
        "tandem": ours,
        "llama_cpp": base,
        "decode_ratio": ours["decode_tokens_per_s"] / base["decode_tokens_per_s"],
        "prefill_ratio": ours["prefill_tokens_per_s"] / base["prefill_tokens_per_s"],
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print(f"{'engine':<44} {'prefill tok/s':>14} {'decode tok/s':>13}")
    for r in (ours, base):
        print(f"{r['engine']:<44} {r['prefill_tokens_per_s']:>14.1f} {r['decode_tokens_per_s']:>13.1f}")
    print(f"ratio (Tandem / llama.cpp): prefill {result['prefill_ratio']:.2f}, decode {result['decode_ratio']:.2f}")


if __name__ == "__main__":
    main()
