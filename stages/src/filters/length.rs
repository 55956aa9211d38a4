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
use kiln_pipeline::stage::{CheckCx, Config, FileDep, Input, InputSchema, Output, Problem, Stage, StageCx};
use kiln_pipeline::{Error, Result};
use serde::{Deserialize, Serialize};

use super::tokens::TokenCounter;
use super::{filter_schema, messages, retain, text};

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

impl LengthFilter {
    /// Every problem of the parameters, at its key.
    fn problems(&self, cx: &CheckCx) -> Vec<Problem> {
        let Some(path) = &self.tokenizer else { return Vec::new() };
        match TokenCounter::load(Some(&cx.resolve(path))) {
            Ok(_) => Vec::new(),
            Err(e) => vec![Problem::new("tokenizer", e).help("name a Hugging Face tokenizer.json file")],
        }
    }
}

impl Config for LengthFilter {
    fn build(&self, cx: &CheckCx, problems: &mut Vec<Problem>) -> Option<Box<dyn Stage>> {
        problems.extend(self.problems(cx));
        Some(Box::new(self.clone()))
    }
}

#[async_trait]
impl Stage for LengthFilter {
    fn files(&self, cx: &CheckCx) -> Vec<FileDep> {
        self.tokenizer.iter().map(|p| FileDep::Contents(cx.resolve(p))).collect()
    }

    async fn output_schema(&self, _cx: &CheckCx, inputs: &[InputSchema]) -> Result<SchemaRef, Vec<Problem>> {
        filter_schema(KIND, inputs, &["messages", "final_answer"])
    }

    async fn run(&self, cx: &StageCx, inputs: &[Input]) -> Result<Output> {
        let path = self.tokenizer.as_ref().map(|p| cx.pipeline.resolve(p));
        let counter = TokenCounter::load(path.as_deref()).map_err(|e| Error::stage(&cx.name, e))?;
        retain(cx, KIND, &inputs[0], |row| {
            let answer = counter.count(text(row, "final_answer"));
            if answer > self.max_answer_tokens {
                let limit = self.max_answer_tokens;
                return Err(("answer_tokens".into(), format!("the final answer has {answer} tokens, over {limit}")));
            }
            let m = messages(row);
            let turns = m.iter().filter(|(role, _)| *role == "assistant").count();
            if let Some(limit) = self.max_turns.filter(|l| turns > *l) {
                return Err(("turns".into(), format!("{turns} assistant turns, over {limit}")));
            }
            if let Some(limit) = self.max_total_tokens {
                let total: usize = m.iter().map(|(_, c)| counter.count(c)).sum();
                if total > limit {
                    return Err(("total_tokens".into(), format!("{total} tokens in all messages, over {limit}")));
                }
            }
            Ok(())
        })
    }
}
