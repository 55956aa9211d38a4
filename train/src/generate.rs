//! Batched generation with a key/value cache: greedy or temperature/top-k/top-p sampling, seeds,
//! stop tokens and stop strings, token limits.

use std::time::Instant;

use burn::prelude::*;

use crate::decode::{Engine, Scratch, Sequence, StepRow};
use crate::error::Result;
use crate::loader::LoadedModel;
use crate::model::{Batch, KvCache};
use crate::tokenizer::TextCodec;

/// How to pick tokens and when to stop.
#[derive(Clone, Debug)]
pub struct Sampling {
    /// At most this many tokens (at least one is generated).
    pub max_tokens: usize,
    /// 0 picks the most likely token (greedy).
    pub temperature: f32,
    pub top_p: f32,
    /// 0 keeps every token.
    pub top_k: usize,
    /// Row `i` of a batch samples with `seed + i`.
    pub seed: u64,
    /// Text that ends a completion (not included in it).
    pub stop: Vec<String>,
    /// Goes on past the model's end-of-turn tokens (they become part of the completion) until
    /// `max_tokens` or a stop string: for benchmarks that need completions of a known length.
    pub ignore_eos: bool,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            max_tokens: 256,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
            stop: Vec::new(),
            ignore_eos: false,
        }
    }
}

/// Why a completion ended, in OpenAI's words.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// A stop token or stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
}

impl Finish {
    /// `stop` or `length`.
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

/// One finished completion.
#[derive(Clone, Debug)]
pub struct Completion {
    /// Generated token ids (stop token excluded).
    pub tokens: Vec<u32>,
    /// Decoded text, cut before any stop string.
    pub text: String,
    pub finish: Finish,
}

/// A batch's completions and its throughput.
#[derive(Clone, Debug)]
pub struct Generated {
    pub completions: Vec<Completion>,
    pub prompt_tokens: usize,
    /// Prompt tokens run through the model: each distinct prompt once.
    pub prefilled_tokens: usize,
    pub completion_tokens: usize,
    pub seconds: f64,
}

impl Generated {
    /// Generated tokens per second over the whole call (prefill included).
    pub fn tokens_per_second(&self) -> f64 {
        self.completion_tokens as f64 / self.seconds.max(1e-9)
    }
}

/// Text of one row as it is generated: what was added since the row's last delta, and, on its
/// last delta, why it ended. A row's deltas put together are its completion's text.
#[derive(Clone, Debug, PartialEq)]
pub struct Delta {
    /// The request's index.
    pub row: usize,
    pub text: String,
    pub finish: Option<Finish>,
}

/// How much of `text` can be sent while generation goes on: neither a trailing replacement
/// character (a multi-byte character whose other bytes are still to come) nor a tail that may be
/// the start of a stop string (it would be cut from the completion).
fn streamable(text: &str, stops: &[String]) -> usize {
    let end = text.trim_end_matches('\u{FFFD}').len();
    let kept = &text[..end];
    let held = stops
        .iter()
        .flat_map(|s| s.char_indices().skip(1).map(|(k, _)| &s[..k]))
        .filter(|prefix| kept.ends_with(prefix))
        .map(str::len)
        .max()
        .unwrap_or(0);
    end - held
}

/// One prompt to continue, with its own sampling settings.
#[derive(Clone, Debug)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub sampling: Sampling,
}

/// Continues every prompt with the same settings; row `i` samples with seed `seed + i`.
pub fn generate(model: &LoadedModel, prompts: &[Vec<u32>], sampling: &Sampling) -> Result<Generated> {
    let requests: Vec<Request> = prompts
        .iter()
        .enumerate()
        .map(|(i, prompt)| {
            let sampling = Sampling { seed: sampling.seed.wrapping_add(i as u64), ..sampling.clone() };
            Request { prompt: prompt.clone(), sampling }
        })
        .collect();
    generate_batch(model, &requests)
}

/// Continues every request in one left-padded batch; rows leave the batch as they finish.
pub fn generate_batch(model: &LoadedModel, requests: &[Request]) -> Result<Generated> {
    generate_streaming(model, requests, &mut |_| {})
}

/// [`generate_batch`], handing each row's new text to `on_delta` as it is generated.
pub fn generate_streaming(
    model: &LoadedModel,
    requests: &[Request],
    on_delta: &mut dyn FnMut(Delta),
) -> Result<Generated> {
    let start = Instant::now();
    let mut running = Running::new(model);
    running.join(requests.iter().cloned().enumerate().collect());
    let mut outputs: Vec<Option<Completion>> = vec![None; requests.len()];
    while !running.is_empty() {
        for (row, completion) in running.step(on_delta)? {
            outputs[row] = Some(completion);
        }
    }
    let completions: Vec<Completion> = outputs
        .into_iter()
        .map(|c| c.unwrap_or(Completion { tokens: Vec::new(), text: String::new(), finish: Finish::Length }))
        .collect();
    Ok(Generated {
        prompt_tokens: running.prompt_tokens,
        prefilled_tokens: running.prefilled_tokens,
        completion_tokens: completions.iter().map(|c| c.tokens.len()).sum(),
        completions,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Most prompt tokens one step of the packed path prefills.
const PREFILL_ROWS: usize = 512;

/// A batch in progress, for continuous batching: rows join between decode steps (their prompts
/// prefilled, and the shorter of the two caches left-padded with masked positions so that both
/// line up) and leave as they finish; padding that no row needs any more is dropped.
pub struct Running<'m> {
    codec: &'m TextCodec,
    kv: Kv<'m>,
    /// Live rows, in cache order.
    rows: Vec<Row>,
    /// Each live row's next-token logits.
    logits: Vec<Vec<f32>>,
    /// Prompt tokens of every row that joined.
    pub prompt_tokens: usize,
    /// Prompt tokens run through the model: each distinct prompt of a join once.
    pub prefilled_tokens: usize,
}

/// What runs a batch's tokens through the model, and holds the keys and values seen.
enum Kv<'m> {
    /// The burn decoder ([`LoadedModel::decoder`]: the weights being trained, for RL), one
    /// left-padded cache for the batch.
    Burn { model: &'m LoadedModel, cache: KvCache },
    /// The packed decode path: a sequence per row.
    Packed { engine: &'m Engine, seqs: Vec<Sequence>, scratch: Box<Scratch> },
}

/// One sequence being generated.
struct Row {
    /// The caller's name for it (what its deltas and completion are reported under).
    key: usize,
    sampling: Sampling,
    rng: fastrand::Rng,
    tokens: Vec<u32>,
    /// Bytes of its text handed out as deltas.
    sent: usize,
    /// Leading cache positions that are padding.
    pad: usize,
}

impl<'m> Running<'m> {
    /// An empty batch over `model`'s burn decoder.
    pub fn new(model: &'m LoadedModel) -> Self {
        let kv = Kv::Burn { model, cache: KvCache::new(model.config.num_hidden_layers) };
        Running { codec: &model.codec, kv, rows: Vec::new(), logits: Vec::new(), prompt_tokens: 0, prefilled_tokens: 0 }
    }

    /// An empty batch over `engine` (a packed decode path), its text read and written by `codec`.
    pub fn packed(codec: &'m TextCodec, engine: &'m Engine) -> Self {
        let kv = Kv::Packed { engine, seqs: Vec::new(), scratch: Box::new(engine.scratch(1)) };
        Running { codec, kv, rows: Vec::new(), logits: Vec::new(), prompt_tokens: 0, prefilled_tokens: 0 }
    }

    /// Rows generating.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether no row is generating.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Prefills `requests` (each distinct prompt once: the n samples of a request share one
    /// prefill) and adds them to the batch under their keys; they get their first token at the
    /// next [`Running::step`].
    pub fn join(&mut self, requests: Vec<(usize, Request)>) {
        if requests.is_empty() {
            return;
        }
        let mut distinct: Vec<&Vec<u32>> = Vec::new();
        let copy_of: Vec<usize> = requests
            .iter()
            .map(|(_, r)| {
                distinct.iter().position(|d| *d == &r.prompt).unwrap_or_else(|| {
                    distinct.push(&r.prompt);
                    distinct.len() - 1
                })
            })
            .collect();
        self.prompt_tokens += requests.iter().map(|(_, r)| r.prompt.len()).sum::<usize>();
        self.prefilled_tokens += distinct.iter().map(|p| p.len()).sum::<usize>();
        let (prefilled, pads) = match &mut self.kv {
            Kv::Burn { model, cache } => join_burn(model, cache, &mut self.rows, &distinct, &copy_of),
            Kv::Packed { engine, seqs, scratch } => {
                // Each distinct prompt once, into a sequence with room for the longest
                // completion asked of it (rows with the same prompt get copies), in steps of up
                // to PREFILL_ROWS tokens: the products meet many rows at once, and a step's
                // activations stay bounded however long the prompts.
                let mut fresh: Vec<Sequence> = distinct
                    .iter()
                    .enumerate()
                    .map(|(d, prompt)| {
                        let copies = requests.iter().zip(&copy_of).filter(|(_, c)| **c == d);
                        let room = copies.map(|((_, r), _)| r.sampling.max_tokens.max(1)).max().unwrap_or(1);
                        engine.sequence(prompt.len(), prompt.len() + room)
                    })
                    .collect();
                let (vocab, mut prefilled) = (engine.vocab(), Vec::with_capacity(distinct.len()));
                for rows in StepRow::prefill(&distinct).chunks(PREFILL_ROWS) {
                    engine.step(rows, &mut fresh, scratch).expect("room for every prompt");
                    prefilled.extend(scratch.logits.chunks_exact(vocab).map(<[f32]>::to_vec));
                }
                seqs.extend(copy_of.iter().map(|&d| fresh[d].clone()));
                (prefilled, vec![0; requests.len()])
            }
        };
        self.logits.extend(copy_of.iter().map(|&d| prefilled[d].clone()));
        for ((key, request), pad) in requests.into_iter().zip(pads) {
            let rng = fastrand::Rng::with_seed(request.sampling.seed);
            self.rows.push(Row { key, sampling: request.sampling, rng, tokens: Vec::new(), sent: 0, pad });
        }
    }

    /// Picks one token for every row, hands out the new text, and runs the rows that go on
    /// through the model; returns the rows that finished, with their completions.
    pub fn step(&mut self, on_delta: &mut dyn FnMut(Delta)) -> Result<Vec<(usize, Completion)>> {
        let codec = self.codec;
        let (mut next, mut keep, mut done) = (Vec::new(), Vec::new(), Vec::new());
        for (slot, row) in self.rows.iter_mut().enumerate() {
            let id = pick(&self.logits[slot], &row.sampling, &mut row.rng);
            let stop_token = !row.sampling.ignore_eos && codec.stop_ids.contains(&id);
            if !stop_token {
                row.tokens.push(id);
            }
            let text = codec.decode(&row.tokens, true)?;
            let cut = row.sampling.stop.iter().filter_map(|s| text.find(s.as_str())).min();
            let finish = if stop_token || cut.is_some() {
                Some(Finish::Stop)
            } else if row.tokens.len() >= row.sampling.max_tokens.max(1) {
                Some(Finish::Length)
            } else {
                None
            };
            match finish {
                Some(finish) => {
                    let text = cut.map_or(text.clone(), |c| text[..c].to_string());
                    let rest = text.get(row.sent..).unwrap_or_default().to_string();
                    on_delta(Delta { row: row.key, text: rest, finish: Some(finish) });
                    done.push((row.key, Completion { tokens: std::mem::take(&mut row.tokens), text, finish }));
                }
                None => {
                    let ready = streamable(&text, &row.sampling.stop);
                    if ready > row.sent {
                        on_delta(Delta { row: row.key, text: text[row.sent..ready].to_string(), finish: None });
                        row.sent = ready;
                    }
                    keep.push(slot);
                    next.push(id);
                }
            }
        }
        if keep.is_empty() {
            self.rows.clear();
            self.logits.clear();
            match &mut self.kv {
                Kv::Burn { model, cache } => *cache = KvCache::new(model.config.num_hidden_layers),
                Kv::Packed { seqs, .. } => seqs.clear(),
            }
            return Ok(done);
        }
        if keep.len() != self.rows.len() {
            let mut rows: Vec<Option<Row>> = std::mem::take(&mut self.rows).into_iter().map(Some).collect();
            self.rows = keep.iter().map(|&s| rows[s].take().expect("each row kept once")).collect();
            match &mut self.kv {
                Kv::Burn { cache, .. } => {
                    cache.retain_rows(&keep);
                    // Padding that every remaining row has is no longer needed.
                    let common = self.rows.iter().map(|r| r.pad).min().unwrap_or(0);
                    if common > 0 {
                        cache.trim_left(common);
                        self.rows.iter_mut().for_each(|r| r.pad -= common);
                    }
                }
                Kv::Packed { seqs, .. } => {
                    let mut old: Vec<Option<Sequence>> = std::mem::take(seqs).into_iter().map(Some).collect();
                    *seqs = keep.iter().map(|&s| old[s].take().expect("each sequence kept once")).collect();
                }
            }
        }
        match &mut self.kv {
            Kv::Burn { model, cache } => {
                let past = cache.len();
                let step = Batch {
                    tokens: next.iter().map(|&id| vec![id]).collect(),
                    positions: self.rows.iter().map(|r| vec![past - r.pad]).collect(),
                    pad: self.rows.iter().map(|r| r.pad).collect(),
                };
                self.logits = last_logits(model.decoder.forward_last(&model.config, &step, Some(cache)));
            }
            Kv::Packed { engine, seqs, scratch } => {
                let steps: Vec<StepRow> =
                    next.iter().enumerate().map(|(seq, &token)| StepRow { seq, token, logits: true }).collect();
                engine.step(&steps, seqs, scratch)?;
                let vocab = engine.vocab();
                self.logits = scratch.logits.chunks_exact(vocab).map(<[f32]>::to_vec).collect();
            }
        }
        Ok(done)
    }
}

/// Prefills the `distinct` prompts through the burn decoder and adds them to `cache` (row `i`
/// a copy of prompt `copy_of[i]`), left-padding whichever of the two caches is shorter so that
/// they line up (the running `rows` learn their new padding). Returns each distinct prompt's
/// next-token logits and each new row's padding.
fn join_burn(
    model: &LoadedModel,
    cache: &mut KvCache,
    rows: &mut [Row],
    distinct: &[&Vec<u32>],
    copy_of: &[usize],
) -> (Vec<Vec<f32>>, Vec<usize>) {
    let width = distinct.iter().map(|p| p.len()).max().unwrap_or(0);
    let distinct_pad: Vec<usize> = distinct.iter().map(|p| width - p.len()).collect();
    let batch = Batch {
        tokens: distinct.iter().map(|p| [vec![0; width - p.len()], p.to_vec()].concat()).collect(),
        positions: distinct_pad.iter().map(|&n| (0..width).map(|i: usize| i.saturating_sub(n)).collect()).collect(),
        pad: distinct_pad.clone(),
    };
    let mut fresh = KvCache::new(model.config.num_hidden_layers);
    let prefilled = last_logits(model.decoder.forward_last(&model.config, &batch, Some(&mut fresh)));
    if distinct.len() < copy_of.len() {
        fresh.retain_rows(copy_of);
    }
    let mut pads: Vec<usize> = copy_of.iter().map(|&d| distinct_pad[d]).collect();
    if rows.is_empty() {
        *cache = fresh;
    } else {
        let past = cache.len();
        if width > past {
            cache.pad_left(width - past);
            rows.iter_mut().for_each(|r| r.pad += width - past);
        } else if past > width {
            fresh.pad_left(past - width);
            pads.iter_mut().for_each(|p| *p += past - width);
        }
        cache.append(fresh);
    }
    (prefilled, pads)
}

/// The logits of each row (`[rows, 1, vocab]`), on the host.
fn last_logits(logits: Tensor<3>) -> Vec<Vec<f32>> {
    let [b, _, v] = logits.dims();
    let data = logits.into_data().convert::<f32>();
    let flat: Vec<f32> = data.try_into_vec::<f32>().expect("f32 logits");
    (0..b).map(|i| flat[i * v..(i + 1) * v].to_vec()).collect()
}

/// Picks the next token from one row's logits.
pub fn pick(logits: &[f32], sampling: &Sampling, rng: &mut fastrand::Rng) -> u32 {
    if sampling.temperature <= 0.0 {
        return argmax(logits);
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_unstable_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if sampling.top_k > 0 {
        order.truncate(sampling.top_k);
    }
    let top = logits[order[0]];
    let weights: Vec<f64> = order.iter().map(|&i| (((logits[i] - top) / sampling.temperature) as f64).exp()).collect();
    let total: f64 = weights.iter().sum();
    // Nucleus: the smallest prefix whose probability reaches top_p.
    let mut kept = 0;
    let mut mass = 0.0;
    for w in &weights {
        kept += 1;
        mass += w / total;
        if mass >= sampling.top_p as f64 {
            break;
        }
    }
    let kept_total: f64 = weights[..kept].iter().sum();
    let mut draw = rng.f64() * kept_total;
    for (w, &i) in weights[..kept].iter().zip(&order) {
        draw -= w;
        if draw <= 0.0 {
            return i as u32;
        }
    }
    order[kept - 1] as u32
}

fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streamed_text_holds_back_a_possible_stop_string_and_a_partial_character() {
        let stops = vec!["</answer>".to_string(), "\n\n".to_string()];
        assert_eq!(streamable("The mean is 4", &stops), 13);
        assert_eq!(streamable("<answer>4</ans", &stops), 9, "`</ans` may become the stop string");
        assert_eq!(streamable("line\n", &stops), 4, "a newline may be the start of `\\n\\n`");
        assert_eq!(streamable("caf\u{FFFD}", &[]), 3, "the rest of `é` is still to come");
        assert_eq!(streamable("", &stops), 0);
    }
}
