"""Writes a random bf16 model of the Llama-3.2-1B shape (or the Llama-3.1-8B shape, `--shape 8b`)
with the tiny-llama test tokenizer
(vocabulary 320), or with the tokenizer.json given (`--tokenizer-json`, the vocabulary sized to
it; the default model's is written by `cargo run -p tandem-tokenizer --example export_tokenizer`),
into a folder that `tandem up --model DIR` serves.

The weights' values do not change serving speed or the KV handoff; being random and non-zero,
they make every KV block's bytes different, so a block put in the wrong place cannot pass its
checksum by accident.

    python3 scripts/gpu/serve_model.py OUT_DIR [--seed 0] [--tokenizer-json PATH] [--shape 1b|8b]
"""

import argparse
import json
import pathlib
import shutil

import torch
from transformers import LlamaConfig, LlamaForCausalLM

FIXTURE = pathlib.Path(__file__).resolve().parents[2] / "shared/engine/tests/fixtures/tiny-llama"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer-json", default=str(FIXTURE / "tokenizer.json"))
    ap.add_argument("--shape", choices=["1b", "8b"], default="1b")
    args = ap.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = json.loads(pathlib.Path(args.tokenizer_json).read_text())
    ids = list(tok["model"]["vocab"].values()) + [t["id"] for t in tok.get("added_tokens", [])]
    vocab = max(ids) + 1
    shape = {
        # Llama-3.2-1B: tied embeddings, head_dim 64.
        "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, head_dim=64, tie_word_embeddings=True),
        # Llama-3.1-8B: its own LM head, head_dim 128.
        "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, head_dim=128, tie_word_embeddings=False),
    }[args.shape]
    config = LlamaConfig(
        vocab_size=vocab,
        num_attention_heads=32,
        num_key_value_heads=8,
        **shape,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    )
    torch.manual_seed(args.seed)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.02).add_(1.0)
            else:
                p.normal_(0.0, 0.02)
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    shutil.copy(args.tokenizer_json, out / "tokenizer.json")
    # The chat template and special tokens (<|endoftext|>, <|im_start|>, <|im_end|> as ids 0-2,
    # as in the default model's vocabulary too).
    shutil.copy(FIXTURE / "tokenizer_config.json", out / "tokenizer_config.json")
    print(out)


if __name__ == "__main__":
    main()
