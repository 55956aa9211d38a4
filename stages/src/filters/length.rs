//! `length_filter`: the final answer is at most `max_answer_tokens` tokens (1,024 in the
//! recipe), and optionally the trajectory has at most `max_turns` assistant turns and
//! `max_total_tokens` tokens over all its messages. Tokens come from the pipeline's
//! `tokenizer.json` when `tokenizer` names one, else from the approximation in
//! [`super::tokens`].
//!
//! ```toml
//! [stages.short]
//! kind = "length_filter"
//! inputs = ["well_formed"]
//! tokenizer = "models/qwen/tokenizer.json"   # optional
//! max_total_tokens = 8192                      # optional: the SFT cutoff
//! ```

use std::path::PathBuf;

use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use kiln_pipeline::Result;
use kiln_pipeline::stage::{CheckCx, Config, FileDep, Input, InputSchema, Output, Problem, Stage, StageCx};
use serde::{Deserialize, Serialize};

use super::tokens::TokenCounter;
use super::{Refusal, filter_schema, retain};
use crate::families::Turns;

/// Parameters of a `length_filter` stage.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LengthFilter {
    /// Most tokens in the final answer. Default: 1024.
    #[serde(default = "default_answer")]
    pub max_answer_tokens: usize,
    /// Most assistant turns. Default: no limit.
    #[serde(default)]
    pub max_turns: Option<usize>,
    /// Most tokens over every message. Default: no limit.
    #[serde(default)]
    pub max_total_tokens: Option<usize>,
    /// A Hugging Face `tokenizer.json`, relative to the pipeline file. Default: the approximation.
    #[serde(default)]
    pub tokenizer: Option<PathBuf>,
}

fn default_answer() -> usize {
    1024
}

const KIND: &str = "length_filter";

impl Config for LengthFilter {
    fn build(&self, cx: &CheckCx, problems: &mut Vec<Problem>) -> Option<Box<dyn Stage>> {
        Some(Box::new(self.measuring(cx, "").map_err(|p| problems.push(p)).ok()?))
    }
}

/// A built `length_filter` stage, its tokenizer loaded.
#[derive(Debug)]
pub(crate) struct Measuring {
    params: LengthFilter,
    /// The tokenizer file, if any.
    path: Option<PathBuf>,
    counter: TokenCounter,
}

#[async_trait]
impl Stage for Measuring {
    fn files(&self, _cx: &CheckCx) -> Vec<FileDep> {
        self.files_used()
    }

    async fn output_schema(&self, _cx: &CheckCx, inputs: &[InputSchema]) -> Result<SchemaRef, Vec<Problem>> {
        filter_schema(KIND, inputs, &["messages", "final_answer"])
    }

    async fn run(&self, cx: &StageCx, inputs: &[Input]) -> Result<Output> {
        retain(cx, KIND, &inputs[0], |t| self.check(t))
    }
}

impl Measuring {
    /// The tokenizer file it reads, if any.
    pub(crate) fn files_used(&self) -> Vec<FileDep> {
        self.path.iter().map(|p| FileDep::Contents(p.clone())).collect()
    }

    /// Whether `t` is within the limits.
    pub(crate) fn check(&self, t: &Turns) -> Result<(), Refusal> {
        let (counter, limits) = (&self.counter, &self.params);
        let answer = counter.count(t.final_answer.as_deref().unwrap_or(""));
        if answer > limits.max_answer_tokens {
            let limit = limits.max_answer_tokens;
            return Err(("answer_tokens".into(), format!("the final answer has {answer} tokens, over {limit}")));
        }
        let turns = t.messages.iter().filter(|m| m.role == "assistant").count();
        if let Some(limit) = limits.max_turns.filter(|l| turns > *l) {
            return Err(("turns".into(), format!("{turns} assistant turns, over {limit}")));
        }
        if let Some(limit) = limits.max_total_tokens {
            let total: usize = t.messages.iter().map(|m| counter.count(&m.content)).sum();
            if total > limit {
                return Err(("total_tokens".into(), format!("{total} tokens in all messages, over {limit}")));
            }
        }
        Ok(())
    }
}

impl Default for LengthFilter {
    fn default() -> Self {
        LengthFilter { max_answer_tokens: default_answer(), max_turns: None, max_total_tokens: None, tokenizer: None }
    }
}

impl LengthFilter {
    /// The filter with its tokenizer loaded (a problem at `key.tokenizer` when it cannot be).
    pub(crate) fn measuring(&self, cx: &CheckCx, key: &str) -> Result<Measuring, Problem> {
        let path = self.tokenizer.as_ref().map(|p| cx.resolve(p));
        let counter = TokenCounter::load(path.as_deref())
            .map_err(|e| Problem::new(&format!("{key}tokenizer"), e).help("name a Hugging Face tokenizer.json file"))?;
        Ok(Measuring { params: self.clone(), path, counter })
    }
}
