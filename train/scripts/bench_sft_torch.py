#!/usr/bin/env python3
"""The PyTorch side of kiln's SFT step benchmark: transformers' Qwen2 with random weights, the
same shapes and step as `cargo bench -p kiln-train --bench sft_step` (forward, LM loss,
backward, global-norm clipping, AdamW), printed as one JSON line.

    python bench_sft_torch.py --shape qwen2.5-0.5b --batch 8 --seq 1024 --steps 10 --dtype bf16 --peak-tflops 989
"""
import argparse
import json
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

SHAPES = {
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    "small": dict(vocab_size=8192, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="qwen2.5-0.5b")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
    p.add_argument("--peak-tflops", type=float, default=0.0)
    a = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = Qwen2Config(**SHAPES[a.shape], rope_theta=1e6, max_position_embeddings=32768,
                         attn_implementation="sdpa")
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(device)
    # bf16: autocast matmuls, f32 master weights and optimizer (the usual mixed-precision recipe).
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    ids = torch.randint(0, config.vocab_size, (a.batch, a.seq + 1), device=device)
    times = []
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(a.steps):
        start = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=a.dtype == "bf16"):
            logits = model(ids[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, config.vocab_size), ids[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        assert torch.isfinite(loss).item()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    steady = times[1:] or times
    step_s = sum(steady) / len(steady)
    tokens_per_s = a.batch * a.seq / step_s
    params = sum(p.numel() for p in model.parameters())
    flops_per_token = 6 * params + 12 * config.num_hidden_layers * config.hidden_size * a.seq
    mfu = tokens_per_s * flops_per_token / (a.peak_tflops * 1e12) if a.peak_tflops else None
    print(json.dumps({"impl": "pytorch", "device": device, "dtype": a.dtype, "batch": a.batch, "seq": a.seq,
                      "params": params, "steps": a.steps, "first_step_s": times[0], "step_s": step_s,
                      "tokens_per_s": tokens_per_s, "mfu": mfu,
                      "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None}))


if __name__ == "__main__":
    main()
