#!/usr/bin/env python3
"""Hugging Face transformers baseline for the engine benchmarks.

Builds Llama-shaped models with random bf16 weights directly on the GPU and
times, with CUDA events:

  decode   one token per sequence for a batch of B sequences that each already
           hold C tokens of (random) KV cache; MBU against the device copy rate
  prefill  one prompt of L tokens into an empty cache; MFU against the bf16
           GEMM rate

Optionally (--compile) also times torch.compile with a static cache for
llama-1b, batch 1, context 512.

Usage:
  python scripts/gpu/baseline.py --out baseline.json
  python scripts/gpu/baseline.py --shape llama-1b --batches 1,8 --contexts 512 \
      --prefill-lens 512 --compile --out baseline.json
"""

import argparse
import gc
import inspect
import json
import statistics
import sys
import time

import torch
import transformers
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

# Model shapes (Llama 3.2 1B and Llama 3.1 8B dimensions).
SHAPES = {
    "llama-1b": dict(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        tie_word_embeddings=True,
        rope_factor=32.0,
    ),
    "llama-8b": dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=False,
        rope_factor=8.0,
    ),
}

ROPE_THETA = 500000.0
GIB = 1024**3


# ---------------------------------------------------------------------------
# Command line


def int_list(text):
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", action="append", default=None,
                   help="llama-1b or llama-8b; repeatable or comma separated (default: both)")
    p.add_argument("--batches", type=int_list, default=[1, 8, 32, 128, 256])
    p.add_argument("--contexts", type=int_list, default=[512, 4096])
    p.add_argument("--prefill-lens", type=int_list, default=[512, 2048, 8192])
    p.add_argument("--compile", action="store_true",
                   help="also time torch.compile with a static cache (llama-1b, batch 1, context 512)")
    p.add_argument("--copy-gbps", type=float, default=None,
                   help="device copy bandwidth in GB/s (read+write); measured when absent")
    p.add_argument("--matrix-tflops", type=float, default=None,
                   help="bf16 GEMM rate in TFLOP/s; measured when absent")
    p.add_argument("--out", default=None, help="JSON output path")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--gpu-name", default=None, help="override the reported GPU name")
    args = p.parse_args(argv)

    shapes = []
    for item in args.shape or ["llama-1b,llama-8b"]:
        for name in item.split(","):
            name = name.strip()
            if not name:
                continue
            if name not in SHAPES:
                p.error(f"unknown shape {name!r} (choose from {', '.join(SHAPES)})")
            if name not in shapes:
                shapes.append(name)
    args.shape = shapes
    return args


# ---------------------------------------------------------------------------
# Helpers


def time_cuda(fn, warmup, iters, after=None):
    """Median wall time of fn() in seconds, measured with CUDA events.

    `after` (optional) runs after every call, outside the timed region.
    """
    times = []
    for i in range(warmup + iters):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end) / 1e3)
        if after is not None:
            after()
    return statistics.median(times)


def free_memory():
    gc.collect()
    torch.cuda.empty_cache()


OOM_ERROR = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def is_oom(exc):
    return isinstance(exc, OOM_ERROR) or "out of memory" in str(exc).lower()


def measure_copy_gbps(warmup=3, iters=20):
    """Device-to-device copy of a 4 GiB bf16 tensor; read + write bytes counted."""
    n = 4 * GIB // 2
    src = torch.randn(n, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    secs = time_cuda(lambda: dst.copy_(src), warmup, iters)
    del src, dst
    free_memory()
    return 2 * 4 * GIB / secs / 1e9


def measure_matrix_tflops(warmup=3, iters=10):
    """8192^3 bf16 matmul on random data."""
    n = 8192
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    secs = time_cuda(lambda: torch.matmul(a, b), warmup, iters)
    del a, b
    free_memory()
    return 2 * n**3 / secs / 1e12


# ---------------------------------------------------------------------------
# Model


def make_config(shape):
    s = SHAPES[shape]
    return LlamaConfig(
        vocab_size=s["vocab_size"],
        hidden_size=s["hidden_size"],
        intermediate_size=s["intermediate_size"],
        num_hidden_layers=s["num_hidden_layers"],
        num_attention_heads=s["num_attention_heads"],
        num_key_value_heads=s["num_key_value_heads"],
        head_dim=s["head_dim"],
        tie_word_embeddings=s["tie_word_embeddings"],
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": ROPE_THETA,
            "factor": s["rope_factor"],
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        attn_implementation="sdpa",
    )


def build_model(shape):
    """Random bf16 model built on the GPU (nothing is materialised on the CPU)."""
    config = make_config(shape)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model = model.to(dtype=torch.bfloat16).eval()

    # Fill every parameter (a tied embedding is visited once) with non-zero values.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.02).add_(1.0)
            else:
                p.normal_(0.0, 0.02)
    return model


def count_params(model):
    """Parameter count with shared (tied) tensors counted once."""
    seen = {}
    for p in model.parameters():
        seen[p.data_ptr()] = p.numel()
    return sum(seen.values())


def accepts(fn, name):
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


class Dims:
    def __init__(self, shape, model):
        s = SHAPES[shape]
        self.vocab = s["vocab_size"]
        self.hidden = s["hidden_size"]
        self.inter = s["intermediate_size"]
        self.layers = s["num_hidden_layers"]
        self.heads = s["num_attention_heads"]
        self.kv_heads = s["num_key_value_heads"]
        self.head_dim = s["head_dim"]
        self.params = count_params(model)
        self.weight_bytes = 2 * self.params
        # K and V, every layer, bf16.
        self.kv_bytes_per_token = 2 * self.layers * self.kv_heads * self.head_dim * 2
        h, hd = self.hidden, self.head_dim
        per_layer = (h * self.heads * hd + 2 * h * self.kv_heads * hd
                     + self.heads * hd * h + 3 * h * self.inter)
        self.linear_params = self.layers * per_layer

    def prefill_flops(self, length):
        linear = 2 * length * self.linear_params
        lm_head = 2 * self.hidden * self.vocab  # last token only
        attention = 2 * self.layers * self.heads * self.head_dim * length * length  # causal
        return linear + lm_head + attention


def new_dynamic_cache(model):
    try:
        return DynamicCache(config=model.config)
    except TypeError:
        return DynamicCache()


# ---------------------------------------------------------------------------
# Benchmarks


def run_guarded(fn):
    """Run fn(); return (result, None), or (None, "out of memory") when the GPU runs out.

    Memory is released after the exception (and its traceback) has been dropped.
    """
    result, error = None, None
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001
        if not is_oom(exc):
            raise
        error = "out of memory"
    free_memory()
    return result, error


def decode_seconds(model, dims, batch, context, args):
    with torch.inference_mode():
        cache = new_dynamic_cache(model)
        shape = (batch, dims.kv_heads, context, dims.head_dim)
        for layer in range(dims.layers):
            k = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
            v = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
            cache.update(k, v, layer)
            del k, v

        kwargs = dict(
            input_ids=torch.randint(0, dims.vocab, (batch, 1), device="cuda"),
            past_key_values=cache,
            position_ids=torch.full((batch, 1), context, dtype=torch.long, device="cuda"),
            use_cache=True,
        )
        if accepts(model.forward, "cache_position"):
            kwargs["cache_position"] = torch.tensor([context], dtype=torch.long, device="cuda")

        def step():
            model(**kwargs)

        def trim():
            # Drop the token the step appended so every step sees `context` tokens.
            # (A negative argument means "remove this many" in every 5.x release.)
            extra = cache.get_seq_length() - context
            if extra > 0:
                cache.crop(-extra)

        return time_cuda(step, args.warmup, args.iters, after=trim)


def bench_decode(model, dims, batch, context, args, ctx):
    """Time one decode step for `batch` sequences that each hold `context` cached tokens."""
    row = dict(gpu=ctx["gpu"], shape=ctx["shape"], phase="decode", batch=batch, context=context,
               engine="transformers-eager", tokens_per_s=None, step_ms=None, mbu=None)
    kv_bytes = batch * context * dims.kv_bytes_per_token
    need = kv_bytes + dims.weight_bytes
    if need > 0.9 * ctx["total_mem"]:
        row["error"] = (f"skipped: needs ~{need / GIB:.1f} GiB, over 90% of "
                        f"{ctx['total_mem'] / GIB:.1f} GiB")
        return row

    secs, error = run_guarded(lambda: decode_seconds(model, dims, batch, context, args))
    if error:
        row["error"] = error
    else:
        row.update(
            tokens_per_s=batch / secs,
            step_ms=secs * 1e3,
            mbu=(dims.weight_bytes + kv_bytes) / secs / (ctx["copy_gbps"] * 1e9),
        )
    return row


def prefill_seconds(model, dims, length, args):
    with torch.inference_mode():
        input_ids = torch.randint(0, dims.vocab, (1, length), device="cuda")
        extra = {}
        if accepts(model.forward, "logits_to_keep"):
            extra["logits_to_keep"] = 1  # lm_head on the last position only

        def step():
            model(input_ids=input_ids, past_key_values=new_dynamic_cache(model), use_cache=True, **extra)

        return time_cuda(step, args.warmup, args.iters)


def bench_prefill(model, dims, length, args, ctx):
    """Time one prompt of `length` tokens into an empty cache."""
    row = dict(gpu=ctx["gpu"], shape=ctx["shape"], phase="prefill", batch=1, prompt_len=length,
               engine="transformers-eager", tokens_per_s=None, time_ms=None, mfu=None)
    secs, error = run_guarded(lambda: prefill_seconds(model, dims, length, args))
    if error:
        row["error"] = error
    else:
        row.update(
            tokens_per_s=length / secs,
            time_ms=secs * 1e3,
            mfu=dims.prefill_flops(length) / secs / (ctx["matrix_tflops"] * 1e12),
        )
    return row


def bench_compiled_decode(model, dims, args, ctx, context=512):
    """torch.compile(model.forward) with a StaticCache: batch 1, one token at position `context`."""
    from transformers import StaticCache

    row = dict(gpu=ctx["gpu"], shape=ctx["shape"], phase="decode", batch=1, context=context,
               engine="transformers-compile", tokens_per_s=None, step_ms=None, mbu=None)
    cache = compiled = None
    try:
        with torch.no_grad():
            cache = StaticCache(config=model.config, max_cache_len=context + 64)
            takes_cache_position = accepts(model.forward, "cache_position")

            # Eager prefill of `context` random tokens.
            prompt = torch.randint(0, dims.vocab, (1, context), device="cuda")
            kwargs = dict(input_ids=prompt, past_key_values=cache, use_cache=True,
                          position_ids=torch.arange(context, device="cuda").unsqueeze(0))
            if takes_cache_position:
                kwargs["cache_position"] = torch.arange(context, device="cuda")
            model(**kwargs)

            token = torch.randint(0, dims.vocab, (1, 1), device="cuda")
            kwargs = dict(input_ids=token, past_key_values=cache, use_cache=True,
                          position_ids=torch.full((1, 1), context, dtype=torch.long, device="cuda"))
            if takes_cache_position:
                kwargs["cache_position"] = torch.tensor([context], dtype=torch.long, device="cuda")

            def rewind():
                # Newer static layers keep a fill counter; set it back so the
                # next step overwrites the same slot at position `context`.
                for layer in getattr(cache, "layers", []):
                    counter = getattr(layer, "cumulative_length", None)
                    if isinstance(counter, torch.Tensor):
                        counter.fill_(context)

            compiled = torch.compile(model.forward)
            secs = time_cuda(lambda: compiled(**kwargs), args.warmup, args.iters, after=rewind)
        kv_bytes = context * dims.kv_bytes_per_token
        row.update(
            tokens_per_s=1 / secs,
            step_ms=secs * 1e3,
            mbu=(dims.weight_bytes + kv_bytes) / secs / (ctx["copy_gbps"] * 1e9),
        )
    except Exception as exc:  # noqa: BLE001  (never fatal)
        row["error"] = "out of memory" if is_oom(exc) else f"{type(exc).__name__}: {exc}"[:500]
    finally:
        del cache, compiled
        try:
            torch._dynamo.reset()
        except Exception:  # noqa: BLE001
            pass
        free_memory()
    return row


# ---------------------------------------------------------------------------
# Output


def fmt(value, spec):
    """Format a number, or a right-aligned "-" of the same width when missing."""
    if value is None:
        width = int(spec.split(".")[0] or 0)
        return "-".rjust(width)
    return format(value, spec)


def progress(label, row):
    error = row.get("error")
    if error:
        text = error.splitlines()[0][:200]
    else:
        ms = row.get("step_ms", row.get("time_ms"))
        text = f"{row['tokens_per_s']:.1f} tok/s, {ms:.3f} ms"
    print(f"  {label} {text}", flush=True)


def print_table(rows):
    header = f"{'shape':9} {'engine':21} {'phase':7} {'batch':>5} {'ctx/len':>7} {'tok/s':>11} {'ms':>9} {'util':>6}  note"
    print(header)
    print("-" * len(header))
    for r in rows:
        length = r.get("context", r.get("prompt_len"))
        ms = r.get("step_ms", r.get("time_ms"))
        util = r.get("mbu", r.get("mfu"))
        note = (r.get("error") or "").splitlines()[0][:80] if r.get("error") else ""
        print(f"{r['shape']:9} {r['engine']:21} {r['phase']:7} {r['batch']:>5} {length:>7} "
              f"{fmt(r['tokens_per_s'], '11.1f')} {fmt(ms, '9.3f')} {fmt(util, '6.3f')}  {note}")


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("baseline.py needs a CUDA device")

    gpu = args.gpu_name or torch.cuda.get_device_name(0)
    total_mem = torch.cuda.get_device_properties(0).total_memory
    print(f"gpu: {gpu} ({total_mem / GIB:.1f} GiB), torch {torch.__version__}, "
          f"transformers {transformers.__version__}", flush=True)

    copy_gbps = args.copy_gbps if args.copy_gbps is not None else measure_copy_gbps()
    matrix_tflops = args.matrix_tflops if args.matrix_tflops is not None else measure_matrix_tflops()
    print(f"copy bandwidth: {copy_gbps:.1f} GB/s, bf16 GEMM: {matrix_tflops:.1f} TFLOP/s", flush=True)

    rows = []
    for shape in args.shape:
        t0 = time.time()
        model = build_model(shape)
        dims = Dims(shape, model)
        print(f"{shape}: {dims.params / 1e9:.2f} B parameters, built in {time.time() - t0:.1f} s", flush=True)
        ctx = dict(gpu=gpu, shape=shape, total_mem=total_mem, copy_gbps=copy_gbps, matrix_tflops=matrix_tflops)

        for context in args.contexts:
            for batch in args.batches:
                row = bench_decode(model, dims, batch, context, args, ctx)
                rows.append(row)
                progress(f"decode  B={batch:<4} C={context:<6}", row)

        for length in args.prefill_lens:
            row = bench_prefill(model, dims, length, args, ctx)
            rows.append(row)
            progress(f"prefill L={length:<6}", row)

        if args.compile and shape == "llama-1b":
            row = bench_compiled_decode(model, dims, args, ctx)
            rows.append(row)
            progress("compile B=1    C=512   ", row)

        del model, dims
        free_memory()

    result = dict(
        gpu=gpu,
        copy_gbps=copy_gbps,
        matrix_tflops=matrix_tflops,
        torch_version=torch.__version__,
        transformers_version=transformers.__version__,
        rows=rows,
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
    print()
    print_table(rows)
    if args.out:
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
