//! Batched generation with a key/value cache: greedy or temperature/top-k/top-p sampling, seeds,
//! stop tokens and stop strings, token limits.

use std::time::Instant;

use burn::prelude::*;

use crate::error::Result;
use crate::loader::LoadedModel;
use crate::model::{Batch, KvCache};

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
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling { max_tokens: 256, temperature: 0.0, top_p: 1.0, top_k: 0, seed: 0, stop: Vec::new() }
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
    let prompts: Vec<&Vec<u32>> = requests.iter().map(|r| &r.prompt).collect();
    // Each distinct prompt is read once (the n samples of a request share one prefill); its keys
    // and values are then copied to every row that continues it.
    let mut distinct: Vec<&Vec<u32>> = Vec::new();
    let copy_of: Vec<usize> = prompts
        .iter()
        .map(|p| {
            distinct.iter().position(|d| d == p).unwrap_or_else(|| {
                distinct.push(p);
                distinct.len() - 1
            })
        })
        .collect();
    let width = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
    let distinct_pad: Vec<usize> = distinct.iter().map(|p| width - p.len()).collect();
    let batch = Batch {
        tokens: distinct.iter().map(|p| [vec![0; width - p.len()], p.to_vec()].concat()).collect(),
        positions: distinct_pad.iter().map(|&n| (0..width).map(|i: usize| i.saturating_sub(n)).collect()).collect(),
        pad: distinct_pad.clone(),
    };
    let pad: Vec<usize> = copy_of.iter().map(|&d| distinct_pad[d]).collect();
    let mut cache = KvCache::new(model.config.num_hidden_layers);
    let mut rngs: Vec<fastrand::Rng> = requests.iter().map(|r| fastrand::Rng::with_seed(r.sampling.seed)).collect();
    let mut outputs: Vec<Option<Completion>> = vec![None; prompts.len()];
    let mut tokens: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
    // Bytes of each row's text handed to `on_delta` so far.
    let mut sent = vec![0usize; prompts.len()];
    // Rows still generating: index into the original prompts, in cache order.
    let mut live: Vec<usize> = (0..prompts.len()).collect();
    let prefilled = last_logits(model.decoder.forward(&model.config, &batch, Some(&mut cache)));
    if distinct.len() < prompts.len() {
        cache.retain_rows(&copy_of);
    }
    let mut logits: Vec<Vec<f32>> = copy_of.iter().map(|&d| prefilled[d].clone()).collect();
    let mut live_pad = pad;
    while !live.is_empty() {
        let mut next = Vec::with_capacity(live.len());
        let mut still = Vec::new();
        for (slot, &row) in live.iter().enumerate() {
            let sampling = &requests[row].sampling;
            let id = pick(&logits[slot], sampling, &mut rngs[row]);
            let stop_token = model.codec.stop_ids.contains(&id);
            if !stop_token {
                tokens[row].push(id);
            }
            let text = model.codec.decode(&tokens[row], true)?;
            let cut = sampling.stop.iter().filter_map(|s| text.find(s.as_str())).min();
            let finish = if stop_token || cut.is_some() {
                Some(Finish::Stop)
            } else if tokens[row].len() >= sampling.max_tokens.max(1) {
                Some(Finish::Length)
            } else {
                None
            };
            match finish {
                Some(finish) => {
                    let text = cut.map_or(text.clone(), |c| text[..c].to_string());
                    let rest = text.get(sent[row]..).unwrap_or_default().to_string();
                    on_delta(Delta { row, text: rest, finish: Some(finish) });
                    outputs[row] = Some(Completion { tokens: tokens[row].clone(), text, finish });
                }
                None => {
                    let ready = streamable(&text, &sampling.stop);
                    if ready > sent[row] {
                        on_delta(Delta { row, text: text[sent[row]..ready].to_string(), finish: None });
                        sent[row] = ready;
                    }
                    still.push(slot);
                    next.push(id);
                }
            }
        }
        if still.len() != live.len() {
            cache.retain_rows(&still);
            live = still.iter().map(|&s| live[s]).collect();
            live_pad = still.iter().map(|&s| live_pad[s]).collect();
        }
        if live.is_empty() {
            break;
        }
        let past = cache.len();
        let step = Batch {
            tokens: next.iter().map(|&id| vec![id]).collect(),
            positions: live_pad.iter().map(|&p| vec![past - p]).collect(),
            pad: live_pad.clone(),
        };
        logits = last_logits(model.decoder.forward(&model.config, &step, Some(&mut cache)));
    }
    let completions: Vec<Completion> = outputs
        .into_iter()
        .map(|c| c.unwrap_or(Completion { tokens: Vec::new(), text: String::new(), finish: Finish::Length }))
        .collect();
    Ok(Generated {
        prompt_tokens: prompts.iter().map(|p| p.len()).sum(),
        prefilled_tokens: distinct.iter().map(|p| p.len()).sum(),
        completion_tokens: completions.iter().map(|c| c.tokens.len()).sum(),
        completions,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// The last position's logits of each row, on the host.
fn last_logits(logits: Tensor<3>) -> Vec<Vec<f32>> {
    let [b, t, v] = logits.dims();
    let data = logits.narrow(1, t - 1, 1).into_data().convert::<f32>();
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
