//! Training examples from kiln's sharegpt export: each conversation rendered with the model's
//! chat template, tokenised, and masked so that only assistant tokens carry loss (system, user
//! and interpreter turns are context only).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::tokenizer::TextCodec;

pub use crate::learned::Sequence;

/// One conversation of a sharegpt export (and of a trajectory row: its `messages`).
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Record {
    messages: Vec<Turn>,
}

#[derive(Debug, Serialize, Deserialize, Clone)]
struct Turn {
    role: String,
    content: String,
}

/// Reads a sharegpt JSON export (`[{"messages": [{"role", "content"}...]}...]`) and encodes
/// every conversation, truncated to `max_len` tokens. Conversations with no assistant token left
/// after truncation are skipped (their count is returned).
pub fn load_sharegpt(path: &Path, codec: &TextCodec, max_len: usize) -> Result<(Vec<Sequence>, usize)> {
    let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
    let records: Vec<Record> = serde_json::from_str(&text)
        .map_err(|e| TrainError::invalid(path, format!("not a sharegpt export (line {}): {e}", e.line())))?;
    let mut examples = Vec::with_capacity(records.len());
    let mut skipped = 0;
    for (i, record) in records.iter().enumerate() {
        let turns: Vec<(&str, &str)> = record.messages.iter().map(|t| (t.role.as_str(), t.content.as_str())).collect();
        let mut example =
            encode(codec, &turns).map_err(|why| TrainError::invalid(path, format!("record {i}: {why}")))?;
        example.ids.truncate(max_len);
        example.learn.truncate(max_len);
        // The target of position t is token t+1: the first token is never learned.
        if example.learn.iter().skip(1).any(|&l| l) {
            examples.push(example);
        } else {
            skipped += 1;
        }
    }
    Ok((examples, skipped))
}

/// Renders `turns` and marks the characters each assistant turn adds (its content and the
/// template's end-of-turn marker) as learned; tokens inside those spans are learned.
pub fn encode(codec: &TextCodec, turns: &[(&str, &str)]) -> std::result::Result<Sequence, String> {
    let full = codec.chat.render_turns(turns, false).map_err(|e| format!("chat template: {e:#}"))?;
    let mut spans = Vec::new();
    for (i, (role, _)) in turns.iter().enumerate() {
        if *role != "assistant" {
            continue;
        }
        let before = codec.chat.render_turns(&turns[..i], true).map_err(|e| format!("chat template: {e:#}"))?;
        let through = codec.chat.render_turns(&turns[..=i], false).map_err(|e| format!("chat template: {e:#}"))?;
        if !through.starts_with(&before) || !full.starts_with(&through) {
            return Err("the chat template does not render conversations by appending turns".into());
        }
        spans.push(before.len()..through.len());
    }
    let encoding = codec.tokenizer.encode(full.as_str(), false).map_err(|e| format!("tokenizer: {e}"))?;
    let learn = encoding
        .get_offsets()
        .iter()
        .map(|&(start, end)| end > start && spans.iter().any(|s| start >= s.start && end <= s.end))
        .collect();
    Ok(Sequence { ids: encoding.get_ids().to_vec(), learn, weight: 1.0 })
}

/// Groups examples into batches of similar length (less padding): examples are shuffled with
/// `seed`, cut into windows of `batch * 16`, sorted by length inside each window, batched, and
/// the batches shuffled again. Returns indices into `examples`.
pub fn length_buckets(examples: &[Sequence], batch: usize, seed: u64) -> Vec<Vec<usize>> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut order: Vec<usize> = (0..examples.len()).collect();
    rng.shuffle(&mut order);
    let mut batches = Vec::new();
    for window in order.chunks(batch.max(1) * 16) {
        let mut window = window.to_vec();
        window.sort_by_key(|&i| examples[i].ids.len());
        batches.extend(window.chunks(batch.max(1)).map(<[usize]>::to_vec));
    }
    rng.shuffle(&mut batches);
    batches
}
