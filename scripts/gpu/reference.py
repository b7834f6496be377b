#!/usr/bin/env python3
"""Reference logits for checking a GPU engine against Hugging Face transformers.

Writes three small random models (Llama with Llama-3 RoPE scaling, Qwen2 with
q/k/v biases and tied embeddings, Qwen3 with q/k norms) as bf16 safetensors:

    <out>/<name>/config.json
    <out>/<name>/model.safetensors
    <out>/<name>/reference.json

The weights are rounded to bf16 before anything else, so the saved bf16 file
and the high-precision reference use exactly the same values. The reference
runs on the CPU with eager attention, in float64 when the model runs in it
(else float32).

reference.json:
    name             model name
    dtype_reference  "float64" or "float32"
    prompts          [[ids...], ...] random prompts of lengths 1, 7, 16, 33, 100
    logits           [prompt][position][vocab] logits of one forward per prompt
                     (6 significant digits)
    greedy           [prompt][12] argmax continuation, a full forward per step

Usage:
  python scripts/gpu/reference.py --out /tmp/reference [--seed 0]
"""

import argparse
import json
import os
import time

import torch
import transformers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

PROMPT_LENGTHS = [1, 7, 16, 33, 100]
GREEDY_STEPS = 12
VOCAB = 512


def model_specs():
    """(name, model class, config) for each reference model."""
    llama = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        attn_implementation="eager",
    )
    qwen2 = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        attn_implementation="eager",
    )
    qwen3 = Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        attn_implementation="eager",
    )
    return [
        ("llama", LlamaForCausalLM, llama),
        ("qwen2", Qwen2ForCausalLM, qwen2),
        ("qwen3", Qwen3ForCausalLM, qwen3),
    ]


def randomize(model):
    """Random non-zero weights, every value exactly representable in bf16."""
    with torch.no_grad():
        for name, p in model.named_parameters():  # a tied tensor appears once
            if name.endswith("bias"):
                p.normal_(0.0, 0.05)
            elif "norm" in name:  # RMSNorm scales, including Qwen3's q_norm / k_norm
                p.normal_(0.0, 0.1).add_(1.0)
            else:
                p.normal_(0.0, 0.05)
            p.copy_(p.to(torch.bfloat16).to(p.dtype))


def round6(x):
    return float(f"{x:.6g}")


def pick_dtype(model):
    """float64 when the model runs in it on this CPU, else float32."""
    try:
        model.to(torch.float64)
        with torch.no_grad():
            out = model(input_ids=torch.tensor([[0, 1, 2]]), use_cache=False).logits
        if out.dtype == torch.float64 and torch.isfinite(out).all():
            return torch.float64
    except Exception:  # noqa: BLE001
        pass
    model.to(torch.float32)
    return torch.float32


def all_logits(model, ids):
    """Logits for every position of `ids` (one forward, no cache)."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), use_cache=False)
    return out.logits[0]


def greedy(model, ids, steps):
    """Argmax continuation, recomputing the whole sequence each step."""
    seq = list(ids)
    for _ in range(steps):
        seq.append(int(all_logits(model, seq)[-1].argmax()))
    return seq[len(ids):]


def build_one(name, cls, config, out_dir, seed):
    torch.manual_seed(seed)
    model = cls(config).to(torch.float32).eval()
    randomize(model)

    dtype = pick_dtype(model)
    label = "float64" if dtype == torch.float64 else "float32"

    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, config.vocab_size, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]
    logits, continuations = [], []
    for ids in prompts:
        rows = all_logits(model, ids).tolist()
        logits.append([[round6(v) for v in row] for row in rows])
        continuations.append(greedy(model, ids, GREEDY_STEPS))

    # The values are bf16-exact, so this conversion is lossless.
    model_dir = os.path.join(out_dir, name)
    os.makedirs(model_dir, exist_ok=True)
    model.to(torch.bfloat16)
    model.save_pretrained(model_dir, safe_serialization=True)

    reference = dict(
        name=name,
        dtype_reference=label,
        transformers_version=transformers.__version__,
        torch_version=torch.__version__,
        prompts=prompts,
        logits=logits,
        greedy=continuations,
    )
    with open(os.path.join(model_dir, "reference.json"), "w") as f:
        json.dump(reference, f, separators=(",", ":"))
        f.write("\n")
    return label, continuations


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    os.makedirs(args.out, exist_ok=True)
    for name, cls, config in model_specs():
        t0 = time.time()
        label, continuations = build_one(name, cls, config, args.out, args.seed)
        print(f"{name}: {os.path.join(args.out, name)} reference={label} "
              f"prompts={PROMPT_LENGTHS} greedy[0]={continuations[0]} ({time.time() - t0:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
