//! `language_filter`: rejects garbled text and mixed natural languages (RECIPE section 6) in
//! what the teacher wrote in words (its `<think>` and `<answer>` text; code and observations
//! are data, not language) and in the question.
//!
//! - Garbled: any U+FFFD replacement character; UTF-8 read as Latin-1 or cp1252 (mojibake such
//!   as `Ã©` or `â€™`), more than `max_mojibake` times; a run of `symbol_run` or more symbols
//!   in a row made of at least 5 different symbols (table rules like `|---|---|` are fine).
//! - Mixed languages: each sentence with at least `min_sentence_letters` letters gets the
//!   script most of its letters are in (Han, Hiragana, Katakana and Hangul count as one CJK
//!   script); a trajectory is rejected when more than `max_foreign_sentences` sentences are not
//!   in its majority script. Text in backticks or quotes (data values) is ignored.
//!
//! ```toml
//! [stages.clean]
//! kind = "language_filter"
//! inputs = ["short"]
//! ```

use std::collections::BTreeMap;

use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use kiln_pipeline::Result;
use kiln_pipeline::stage::{CheckCx, Input, InputSchema, Output, Plain, Problem, Stage, StageCx};
use serde::{Deserialize, Serialize};
use unicode_script::{Script, UnicodeScript};

use super::{Refusal, filter_schema, retain};
use crate::families::Turns;

/// Parameters of a `language_filter` stage.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LanguageFilter {
    /// Mojibake sequences tolerated. Default: 0.
    #[serde(default)]
    pub max_mojibake: usize,
    /// Length of a run of symbols that counts as garbage. Default: 20.
    #[serde(default = "default_symbol_run")]
    pub symbol_run: usize,
    /// Letters a sentence needs before its script counts. Default: 8.
    #[serde(default = "default_min_letters")]
    pub min_sentence_letters: usize,
    /// Sentences tolerated outside the majority script. Default: 0.
    #[serde(default)]
    pub max_foreign_sentences: usize,
}

fn default_symbol_run() -> usize {
    20
}
fn default_min_letters() -> usize {
    8
}

const KIND: &str = "language_filter";
const CP1252: &str = "€‚ƒ„…†‡ˆ‰Š‹ŒŽ‘’“”•–—˜™š›œžŸ";

/// The natural-language text of a trajectory: the question, and each assistant turn's think
/// and answer.
fn prose(t: &Turns) -> Vec<String> {
    let m = &t.messages;
    let mut out: Vec<String> = m.iter().filter(|m| m.role == "user").take(1).map(|m| m.content.clone()).collect();
    if out.is_empty() {
        out.push(t.question.clone().unwrap_or_default());
    }
    for turn in m.iter().filter(|m| m.role == "assistant").map(|m| &m.content) {
        for tag in ["think", "answer"] {
            let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
            if let Some(start) = turn.find(&open) {
                let rest = &turn[start + open.len()..];
                out.push(rest[..rest.find(&close).unwrap_or(rest.len())].to_string());
            }
        }
    }
    out
}

/// Mojibake sequences in `s`.
fn mojibake(s: &str) -> usize {
    let chars: Vec<char> = s.chars().collect();
    chars
        .windows(2)
        .filter(|w| {
            matches!(w[0], 'Ã' | 'Â' | 'â' | 'Ð' | 'Ñ')
                && (('\u{80}'..='\u{BF}').contains(&w[1]) || CP1252.contains(w[1]))
        })
        .count()
}

/// The longest run of symbols with at least 5 distinct characters.
fn garbage_run(s: &str) -> usize {
    let mut best = 0;
    let mut run: Vec<char> = Vec::new();
    for c in s.chars().chain(std::iter::once(' ')) {
        if !c.is_alphanumeric() && !c.is_whitespace() {
            run.push(c);
            continue;
        }
        let mut distinct = run.clone();
        distinct.sort_unstable();
        distinct.dedup();
        if distinct.len() >= 5 {
            best = best.max(run.len());
        }
        run.clear();
    }
    best
}

/// The script group of a letter (`None` for digits, punctuation, marks).
fn script_of(c: char) -> Option<&'static str> {
    if !c.is_alphabetic() {
        return None;
    }
    Some(match c.script() {
        Script::Common | Script::Inherited | Script::Unknown => return None,
        Script::Han | Script::Hiragana | Script::Katakana | Script::Hangul | Script::Bopomofo => "CJK",
        other => other.full_name(),
    })
}

/// `s` without the parts in backticks or quotes.
fn unquoted(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut inside: Option<char> = None;
    for c in s.chars() {
        match (inside, c) {
            (None, '`' | '"' | '“' | '「') => {
                inside = Some(if c == '“' {
                    '”'
                } else if c == '「' {
                    '」'
                } else {
                    c
                })
            }
            (Some(end), _) if c == end => inside = None,
            (None, _) => out.push(c),
            _ => {}
        }
    }
    out
}

/// The script of each sentence with enough letters.
fn sentence_scripts(s: &str, min_letters: usize) -> Vec<&'static str> {
    unquoted(s)
        .split(['.', '!', '?', '\n', '。', '！', '？', ';', '；'])
        .filter_map(|sentence| {
            let mut counts: BTreeMap<&'static str, usize> = BTreeMap::new();
            for c in sentence.chars().filter_map(script_of) {
                *counts.entry(c).or_default() += 1;
            }
            let letters: usize = counts.values().sum();
            // CJK sentences carry more per character: count each as two letters.
            let weight = counts.get("CJK").copied().unwrap_or(0);
            (letters + weight >= min_letters).then(|| counts.into_iter().max_by_key(|(_, n)| *n).map(|(s, _)| s))?
        })
        .collect()
}

impl LanguageFilter {
    /// Whether `t`'s prose is clean and in one language.
    pub(crate) fn check(&self, t: &Turns) -> Result<(), Refusal> {
        let texts = prose(t);
        let all = texts.join("\n");
        if all.contains('\u{FFFD}') {
            return Err(("replacement_chars".into(), "the text holds U+FFFD replacement characters".into()));
        }
        let bad = mojibake(&all);
        if bad > self.max_mojibake {
            return Err(("mojibake".into(), format!("{bad} mojibake sequences (UTF-8 decoded as Latin-1), e.g. Ã©")));
        }
        let run = garbage_run(&all);
        if run >= self.symbol_run {
            return Err(("symbols".into(), format!("a run of {run} mixed symbols")));
        }
        let scripts: Vec<&str> = texts.iter().flat_map(|t| sentence_scripts(t, self.min_sentence_letters)).collect();
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for s in &scripts {
            *counts.entry(s).or_default() += 1;
        }
        if let Some((majority, n)) = counts.iter().max_by_key(|(_, n)| **n) {
            let foreign = scripts.len() - n;
            if foreign > self.max_foreign_sentences {
                let others: Vec<String> =
                    counts.iter().filter(|(s, _)| *s != majority).map(|(s, n)| format!("{s} ({n})")).collect();
                return Err((
                    "mixed_languages".into(),
                    format!("{n} sentences in {majority}, {foreign} in {}", others.join(", ")),
                ));
            }
        }
        Ok(())
    }
}

impl Plain for LanguageFilter {}

impl Default for LanguageFilter {
    fn default() -> Self {
        LanguageFilter {
            max_mojibake: 0,
            symbol_run: default_symbol_run(),
            min_sentence_letters: default_min_letters(),
            max_foreign_sentences: 0,
        }
    }
}

#[async_trait]
impl Stage for LanguageFilter {
    async fn output_schema(&self, _cx: &CheckCx, inputs: &[InputSchema]) -> Result<SchemaRef, Vec<Problem>> {
        filter_schema(KIND, inputs, &["messages"])
    }

    async fn run(&self, cx: &StageCx, inputs: &[Input]) -> Result<Output> {
        retain(cx, KIND, &inputs[0], |row| self.check(row))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter() -> LanguageFilter {
        serde_json::from_str("{}").unwrap()
    }

    fn row(question: &str, think: &str, answer: &str) -> Turns {
        let turn = format!("<think>{think}</think>\n<answer>{answer}</answer>");
        serde_json::from_value(serde_json::json!({"messages": [
            {"role": "system", "content": "You are an analyst. 你好"},
            {"role": "user", "content": question},
            {"role": "assistant", "content": turn},
        ]}))
        .unwrap()
    }

    #[test]
    fn clean_text_passes_even_with_foreign_data_values() {
        let f = filter();
        let ok = row(
            "Which city in `城市` has the most sales?",
            "The column \"城市\" holds the cities. Shanghai leads.",
            "上海 (Shanghai)",
        );
        assert_eq!(f.check(&ok), Ok(()));
        let chinese = row("哪个城市的销售额最高？", "我先读取数据，然后按城市汇总销售额。", "上海的销售额最高。");
        assert_eq!(f.check(&chinese), Ok(()));
        let table = row("Summarise by city.", "A table fits.", "| city | n |\n|------|---|\n| Lyon | 3 |");
        assert_eq!(f.check(&table), Ok(()));
    }

    #[test]
    fn garbage_and_mixed_languages_are_refused() {
        let f = filter();
        let rule = |r: Turns| f.check(&r).unwrap_err().0;
        assert_eq!(rule(row("How many?", "Counting the rows \u{FFFD}\u{FFFD}.", "3")), "replacement_chars");
        assert_eq!(rule(row("How many?", "The cafÃ© column is clean.", "3")), "mojibake");
        assert_eq!(rule(row("How many?", "Result: #$%^&*@!~#$%^&*@!~#$%", "3")), "symbols");
        let mixed = row(
            "Which city sells the most?",
            "I will group the sales by city. 然后我计算每个城市的总销售额。",
            "Shanghai",
        );
        assert_eq!(rule(mixed), "mixed_languages");
    }
}
