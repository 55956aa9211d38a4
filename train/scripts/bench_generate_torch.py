#!/usr/bin/env python3
"""The PyTorch side of kiln's generation benchmark: transformers' Qwen2 with random weights,
the same shapes as `cargo bench -p kiln-train --bench generate_tokens` (a prompt batch, then
greedy decoding of exactly `--new` tokens with the KV cache), printed as one JSON line.

    python bench_generate_torch.py --shape qwen2.5-0.5b --batch 32 --prompt 128 --new 128 --dtype bf16
"""
import argparse
import json
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from bench_sft_torch import SHAPES


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="qwen2.5-0.5b")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
    a = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = Qwen2Config(**SHAPES[a.shape], rope_theta=1e6, max_position_embeddings=32768,
                         attn_implementation="sdpa")
    torch.manual_seed(0)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    model = Qwen2ForCausalLM(config).to(device=device, dtype=dtype).eval()
    ids = torch.randint(0, config.vocab_size, (a.batch, a.prompt), device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False)  # warm-up
        sync()
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        sync()
        first = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=a.new, min_new_tokens=a.new, do_sample=False)
        sync()
        total = time.perf_counter() - start
    print(json.dumps({
        "impl": "pytorch", "device": device, "dtype": a.dtype, "batch": a.batch, "prompt": a.prompt,
        "new_tokens": a.new, "first_token_s": first,
        "decode_tokens_per_s": a.batch * (a.new - 1) / max(total - first, 1e-9),
        "tokens_per_s": a.batch * a.new / total,
    }))


if __name__ == "__main__":
    main()
