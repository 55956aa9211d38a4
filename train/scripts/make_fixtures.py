#!/usr/bin/env python3
"""Writes the reference fixtures kiln's model tests compare against.

Run once by hand (not in CI) with torch, transformers 4.46 and gguf installed:

    python train/scripts/make_fixtures.py SmolLM2-135M-Instruct.Q4_1.gguf

or, for quants.json alone (needs only gguf 0.19 and numpy):

    python train/scripts/make_fixtures.py --quants

It writes, under train/fixtures/ (all small):
  tiny-qwen2/, tiny-llama/   random-weight models built by transformers (safetensors, config.json,
                             tokenizer-free) and their reference logits and greedy tokens;
  tiny-qwen2.gguf, tiny-qwen2-gguf.json
                             a random Qwen2 written as llama.cpp lays it out, its matrices in F16,
                             BF16, Q8_0, Q5_0, Q5_1, Q4_0, Q4_1, Q4_K and Q6_K, and transformers'
                             logits and greedy tokens on the dequantised weights (`--qwen2-gguf`
                             writes these alone);
  quants.json                random GGUF blocks of every supported type and gguf-py's dequantisation;
  smollm2.json               SmolLM2-135M-Instruct loaded from its GGUF by transformers: token ids of
                             several strings, chat-template renderings and greedy generations;
  chat_templates.json        Qwen2.5's chat template rendered by transformers on several conversations.
"""
import json
import sys
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as Q, quants

OUT = Path(__file__).resolve().parent.parent / "fixtures"
rng = np.random.default_rng(0)

SEQUENCES = [[1, 5, 9, 33, 2, 60, 17, 4], [3, 3, 3, 40, 41, 42, 0, 63]]


def write_reference(model, path):
    """`model`'s logits on SEQUENCES and its greedy tokens after the first one's first four."""
    import torch
    ids = torch.tensor(SEQUENCES)
    with torch.no_grad():
        logits = model(ids).logits
        greedy = model.generate(ids[:1, :4], max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    ref = {"sequences": SEQUENCES, "logits": logits.tolist(), "greedy_prompt": SEQUENCES[0][:4],
           "greedy": greedy[0, 4:].tolist()}
    path.write_text(json.dumps(ref))


def tiny(name, config):
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():  # larger than the default init so logits differ visibly
            p.normal_(0.0, 0.2)
    d = OUT / name
    model.save_pretrained(d, safe_serialization=True)
    (d / "generation_config.json").unlink(missing_ok=True)
    write_reference(model, d / "reference.json")


def tiny_models():
    import torch
    from transformers import LlamaConfig, Qwen2Config
    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6)
    tiny("tiny-qwen2", Qwen2Config(**common, rope_theta=1_000_000.0, tie_word_embeddings=False))
    tiny("tiny-llama", LlamaConfig(**common, rope_theta=10_000.0, tie_word_embeddings=True))


# Per type, where its f16 scale fields are in a block (random bytes there could decode to inf/NaN).
SCALE_OFFSETS = {Q.Q8_0: [0], Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q5_0: [0], Q.Q5_1: [0, 2], Q.Q4_K: [0, 2],
                 Q.Q5_K: [0, 2], Q.Q6_K: [-2], Q.Q3_K: [-2], Q.Q2_K: [-4, -2]}


def quant_fixture():
    """Two blocks of every type kiln reads and gguf-py's dequantisation of them: blocks gguf-py
    quantises from normal values where it can (F16, BF16, Q8_0, Q5_0, Q5_1), random bytes with
    sane scales for the rest (any bytes are a valid block)."""
    out = {}
    # Types added later go at the end: the blocks of the earlier ones stay as they were.
    for qtype in [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q6_K,
                  Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q5_K]:
        block, size = quants.GGML_QUANT_SIZES[qtype]
        nblocks = 2
        raw = rng.integers(0, 256, size=(nblocks * size,), dtype=np.uint8)
        if qtype in (Q.F16, Q.BF16, Q.Q5_0, Q.Q5_1):
            vals = rng.normal(size=nblocks * block).astype(np.float32)
            raw = quants.quantize(vals, qtype).view(np.uint8).reshape(-1)
        else:
            r = raw.reshape(nblocks, size)
            for o in SCALE_OFFSETS[qtype]:
                o = o % size
                scale = rng.uniform(0.01, 0.1, size=nblocks).astype(np.float16)
                r[:, o:o + 2] = scale.view(np.uint8).reshape(nblocks, 2)
            raw = r.reshape(-1)
        values = quants.dequantize(raw, qtype).astype(np.float32).reshape(-1)
        out[qtype.name] = {"bytes": raw.tobytes().hex(), "values": values.tolist()}
    (OUT / "quants.json").write_text(json.dumps(out))


CONVERSATIONS = [
    [{"role": "user", "content": "What is the mean of column `price`?"}],
    [{"role": "system", "content": "You are a data analyst."},
     {"role": "user", "content": "Count rows where a < 3 & b > 4."},
     {"role": "assistant", "content": "<code>df[(df.a < 3) & (df.b > 4)].shape[0]</code>"},
     {"role": "user", "content": "Observation: 17\n  trailing spaces  "}],
    [{"role": "user", "content": "Ünïcödé, emoji 🚀 and \"quotes\"\n\n\tindented"},
     {"role": "assistant", "content": "<answer>42</answer>"}],
]

TOOLS = [{"type": "function", "function": {"name": "run_sql", "description": "Runs <SQL> & returns rows",
          "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}}]

TOOL_CALL = [{"role": "user", "content": "How many rows?"},
             {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
                 "name": "run_sql", "arguments": {"query": "SELECT count(*) FROM t WHERE x < 5 & y > 'a'"}}}]},
             {"role": "tool", "content": "12"}]

STRINGS = ["Hello world", "  leading spaces and 12345 digits", "df.groupby('city')['price'].mean()",
           "Ünïcödé ünd émojis 🚀🔥", "<|im_start|>user\nhi<|im_end|>\n", "line1\n\n\nline2\t\ttabs",
           "SELECT COUNT(*) FROM orders WHERE total > 100.5;"]


def chat_templates():
    template = (Path(__file__).resolve().parent / "qwen2_5_chat_template.jinja").read_text()
    from transformers.utils.chat_template_utils import _compile_jinja_template
    compiled = _compile_jinja_template(template)
    cases = []
    for conv in CONVERSATIONS + [TOOL_CALL]:
        for gen in (False, True):
            text = compiled.render(messages=conv, add_generation_prompt=gen, tools=None)
            cases.append({"messages": conv, "add_generation_prompt": gen, "tools": None, "text": text})
    text = compiled.render(messages=CONVERSATIONS[0], add_generation_prompt=True, tools=TOOLS)
    cases.append({"messages": CONVERSATIONS[0], "add_generation_prompt": True, "tools": TOOLS, "text": text})
    (OUT / "chat_templates.json").write_text(json.dumps({"template": template, "cases": cases}, ensure_ascii=False))


def smollm2(gguf_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    gguf_path = Path(gguf_path)
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # SmolLM2's GGUF has no output.weight: the head is tied to the embeddings, which transformers
    # 4.46 does not infer from GGUF metadata (it would initialise a random head).
    from gguf import GGUFReader
    tied = not any(t.name == "output.weight" for t in GGUFReader(gguf_path).tensors)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                 torch_dtype=torch.float32, tie_word_embeddings=tied).eval()
    strings = [{"text": s, "ids": tok.encode(s, add_special_tokens=False)} for s in STRINGS]
    chats = []
    for conv in CONVERSATIONS:
        text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        chats.append({"messages": conv, "text": text})
    prompts = [[{"role": "user", "content": "What is 2+2?"}],
               [{"role": "user", "content": "Write one line of pandas that loads data.csv."}],
               [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a color."}]]
    generations = []
    for conv in prompts:
        ids = tok.apply_chat_template(conv, add_generation_prompt=True, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=24, do_sample=False)
            logits = model(ids).logits[0, -1]
        generations.append({"messages": conv, "prompt_ids": ids[0].tolist(), "greedy": out[0, ids.shape[1]:].tolist(),
                            "last_logits_top": torch.topk(logits, 5).indices.tolist(),
                            "last_logits_values": torch.topk(logits, 5).values.tolist()})
    ref = {"strings": strings, "chats": chats, "generations": generations}
    (OUT / "smollm2.json").write_text(json.dumps(ref, ensure_ascii=False, indent=1))


def random_k_blocks(qtype, rows, cols, scale):
    """Random `qtype` blocks for a [rows, cols] matrix, their f16 super-block scales drawn from
    `scale` (gguf-py cannot quantise to K types; any bytes are a valid block)."""
    block, size = quants.GGML_QUANT_SIZES[qtype]
    n = rows * cols // block
    raw = rng.integers(0, 256, size=(n, size), dtype=np.uint8)
    for o in SCALE_OFFSETS[qtype]:
        o = o % size
        raw[:, o:o + 2] = rng.uniform(*scale, size=n).astype(np.float16).view(np.uint8).reshape(n, 2)
    return raw.reshape(rows, -1)


def tiny_qwen2_gguf():
    """A random Qwen2 (GQA, q/k/v biases, untied head) written as a GGUF with a different block
    type for each matrix, and transformers' logits and greedy tokens on the values the file holds."""
    import torch
    from gguf import GGUFWriter
    from transformers import AutoModelForCausalLM, Qwen2Config
    torch.manual_seed(1)
    config = Qwen2Config(vocab_size=64, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         rms_norm_eps=1e-6, rope_theta=1_000_000.0, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32).eval()
    names = {"model.embed_tokens.weight": ("token_embd.weight", Q.F16), "lm_head.weight": ("output.weight", Q.Q8_0),
             "model.norm.weight": ("output_norm.weight", Q.F32)}
    per_layer = [
        {"q_proj.weight": Q.Q8_0, "k_proj.weight": Q.Q5_0, "v_proj.weight": Q.Q5_1, "o_proj.weight": Q.Q4_0,
         "gate_proj.weight": Q.Q4_1, "up_proj.weight": Q.BF16, "down_proj.weight": Q.Q6_K},
        {"q_proj.weight": Q.BF16, "k_proj.weight": Q.Q8_0, "v_proj.weight": Q.F16, "o_proj.weight": Q.Q5_1,
         "gate_proj.weight": Q.Q5_0, "up_proj.weight": Q.Q4_0, "down_proj.weight": Q.Q4_K},
    ]
    gguf_names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                  "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                  "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for i, types in enumerate(per_layer):
        for hf, gg in gguf_names.items():
            for part in ("weight", "bias"):
                kind = types.get(f"{hf.split('.')[-1]}.{part}", Q.F32)
                names[f"model.layers.{i}.{hf}.{part}"] = (f"blk.{i}.{gg}.{part}", kind)
    path = OUT / "tiny-qwen2.gguf"
    writer = GGUFWriter(path, "qwen2")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    with torch.no_grad():
        for name, p in model.named_parameters():
            gguf_name, kind = names[name]
            values = rng.normal(0.0, 0.2, size=p.shape).astype(np.float32)
            if name.endswith("norm.weight"):
                values = 1.0 + 0.1 * values
            if kind in (Q.Q4_K, Q.Q6_K):
                scale = (2e-4, 5e-4) if kind == Q.Q4_K else (1e-4, 3e-4)
                raw = random_k_blocks(kind, values.shape[0], values.shape[1], scale)
            elif kind == Q.F32:
                raw = values
            else:
                raw = quants.quantize(values, kind)
            if kind == Q.F32:
                writer.add_tensor(gguf_name, raw)
            else:
                writer.add_tensor(gguf_name, raw, raw_dtype=kind)
            stored = quants.dequantize(raw, kind).astype(np.float32).reshape(p.shape)
            p.copy_(torch.from_numpy(stored))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    write_reference(model, OUT / "tiny-qwen2-gguf.json")


if __name__ == "__main__":
    OUT.mkdir(exist_ok=True)
    if sys.argv[1:] == ["--quants"]:
        quant_fixture()
        sys.exit()
    if sys.argv[1:] == ["--qwen2-gguf"]:
        tiny_qwen2_gguf()
        sys.exit()
    tiny_models()
    tiny_qwen2_gguf()
    quant_fixture()
    chat_templates()
    if len(sys.argv) > 1:
        smollm2(sys.argv[1])
