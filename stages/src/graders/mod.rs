//! The graders: whether an agent's answer to a data question is right, one library for the
//! judge's gold check, evaluation on benchmarks and the RL reward.
//!
//! An item's [`Gold`] says what it expects and so which rule grades it:
//!
//! - [`Gold::Value`]: one value. A numeric gold is met by the answer's final number within a
//!   relative tolerance; a list gold (`a, b and c`) by the same items in any order; a text gold
//!   by the answer's text, equal after normalisation (case, punctuation, spacing). Nothing
//!   weaker: "Yes and no" is not "Yes", and a number elsewhere in the answer does not count.
//! - [`Gold::Named`]: InfiAgent-DABench's closed form. Every `@name[value]` of the label must be in
//!   the answer; numbers are equal after rounding to the label's decimals, text is compared
//!   case- and space-insensitively.
//! - [`Gold::Choice`]: QRData's multiple choice, by option letter or by the option's text.
//! - [`Gold::Parts`]: TableBench's comma-separated parts, each by its published rule (exact
//!   match after rounding to the gold's decimals, or within 10% for analysis questions).
//! - [`Gold::Fields`]: DA-Code's named values, a JSON object of lists.
//! - [`Gold::Open`]: an open answer (a DiscoveryBench hypothesis), which only an LLM judge can
//!   grade: [`grade`] fails it, saying so, and the evaluation asks its judge instead.
//! - [`Gold::Table`]: a result table (SQL tasks, BIRD). RECIPE section 8: the agent's result CSV
//!   holds every gold column (by name, in any order), and its rows, projected on them, are the
//!   gold rows in any order, numbers within 1e-2. [`execution_match`] is BIRD's stricter
//!   verdict: the same multiset of rows, whatever the column names.
//!
//! Every grade says why, so a report can count failure modes.

mod fields;
mod named;
mod parts;
pub mod reward;
mod table;
mod value;

pub use named::parse_named;
pub use reward::Outcome;
pub use table::execution_match;
pub use value::{final_number, normalize};

use serde::{Deserialize, Serialize};

/// What an item expects.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Gold {
    /// One value; numbers within `tolerance` (relative).
    Value {
        /// The value, as the benchmark writes it.
        value: String,
        /// Relative tolerance for numbers (0 for exact).
        tolerance: f64,
    },
    /// DABench: `@name[value]` pairs, all required.
    Named(Vec<(String, String)>),
    /// Multiple choice: the right option's letter, and every option's letter and text.
    Choice {
        /// The right option.
        letter: char,
        /// The options, as the question lists them.
        options: Vec<(char, String)>,
    },
    /// TableBench: comma-separated parts, numbers within `tolerance` (relative) when given,
    /// else equal after rounding to the gold's decimals.
    Parts {
        /// The gold answer, as the benchmark writes it.
        answer: String,
        /// Relative tolerance (TableBench's 10% for analysis subtypes), or none for exact match.
        tolerance: Option<f64>,
    },
    /// DA-Code: named lists of values, all required.
    Fields {
        /// Each field's name and values.
        fields: Vec<(String, Vec<serde_json::Value>)>,
        /// Lists match in any order.
        ignore_order: bool,
    },
    /// An open answer, for an LLM judge.
    Open {
        /// The reference answer.
        reference: String,
    },
    /// A result table, as CSV with a header.
    Table {
        /// The gold rows.
        csv: String,
    },
}

/// A grader's verdict on one answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Grade {
    /// The answer is right.
    pub correct: bool,
    /// Why, in a phrase naming the values compared.
    pub reason: String,
}

impl Grade {
    fn pass(reason: impl Into<String>) -> Self {
        Grade { correct: true, reason: reason.into() }
    }

    fn fail(reason: impl Into<String>) -> Self {
        Grade { correct: false, reason: reason.into() }
    }
}

/// Grades `answer` (the text of the agent's final answer) against `gold`; `result_csv` is the
/// table the answer named, for [`Gold::Table`].
pub fn grade(answer: &str, result_csv: Option<&str>, gold: &Gold) -> Grade {
    match gold {
        Gold::Value { value, tolerance } => value::grade(answer, value, *tolerance),
        Gold::Named(pairs) => named::grade(answer, pairs),
        Gold::Choice { letter, options } => value::choice(answer, *letter, options),
        Gold::Parts { answer: gold, tolerance } => parts::grade(answer, gold, *tolerance),
        Gold::Fields { fields, ignore_order } => fields::grade(answer, fields, *ignore_order),
        Gold::Open { .. } => Grade::fail("an open answer: only an LLM judge grades it (set `judge`)"),
        Gold::Table { csv } => match result_csv {
            Some(got) => table::grade(got, csv, 1e-2),
            None => Grade::fail("the answer names no result table"),
        },
    }
}

/// The options of a multiple-choice question written one per line as `A. text` (or `A) text`,
/// `(A) text`).
pub fn options(question: &str) -> Vec<(char, String)> {
    question
        .lines()
        .filter_map(|line| {
            let line = line.trim().trim_start_matches('(');
            let mut chars = line.chars();
            let letter = chars.next().filter(|c| c.is_ascii_uppercase())?;
            let rest = chars.as_str();
            let text = rest.strip_prefix(". ").or_else(|| rest.strip_prefix(") "))?;
            Some((letter, text.trim().to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_gold_picks_its_rule() {
        let value = Gold::Value { value: "42.67".into(), tolerance: 0.03 };
        assert!(grade("The mean weight is 42.5 g", None, &value).correct);
        let named = Gold::Named(vec![("mean_weight".into(), "42.67".into())]);
        assert!(grade("@mean_weight[42.67]", None, &named).correct);
        assert!(!grade("42.67", None, &named).correct, "DABench needs the @name[value] form");
        let table = Gold::Table { csv: "n\n3\n".into() };
        assert!(grade("result.csv", Some("n\n3\n"), &table).correct);
        assert_eq!(grade("3", None, &table).reason, "the answer names no result table");
    }

    #[test]
    fn options_are_read_from_the_question() {
        let q = "Which is larger?\nA. 1985\nB) 1995\n(C) neither";
        assert_eq!(options(q), vec![('A', "1985".into()), ('B', "1995".into()), ('C', "neither".into())]);
        assert!(options("How many? About 3. Maybe.").is_empty());
    }
}
