//! `dedup`: exact and near-duplicate removal over a text column (the question, by default),
//! keeping one representative of each group deterministically.
//!
//! Items: each input row, or, for trajectories (rows with a `sample` column), each question
//! (their first parent), so that the N trajectories of a kept question stay together.
//!
//! 1. Exact: texts are normalised (lower case, punctuation dropped, whitespace collapsed) and
//!    hashed; items with the same normalised text form a group.
//! 2. Near: each distinct text gets a MinHash signature (`permutations` hash functions over its
//!    word `shingle`-grams, computed in parallel with rayon); locality-sensitive hashing with
//!    bands sized for `threshold` proposes candidate pairs, and a pair joins a group only if
//!    the exact Jaccard similarity of the two shingle sets is at least `threshold`, so the
//!    estimate never merges on its own.
//!
//! Each group keeps the item with the smallest id; the others are rejected as `dedup:exact` or
//! `dedup:near`, naming the item they duplicate and the similarity.
//!
//! ```toml
//! [stages.unique]
//! kind = "dedup"
//! inputs = ["judged"]
//! column = "question"   # default
//! threshold = 0.9       # Jaccard similarity of word 3-grams
//! ```

use std::collections::{BTreeMap, HashMap, HashSet};

use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use kiln_pipeline::Result;
use kiln_pipeline::rows::{ROW_ID, to_json_rows};
use kiln_pipeline::stage::{CheckCx, Input, InputSchema, Output, Plain, Problem, Stage, StageCx};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::filters::{Refusal, keep_rows};
use crate::graders::normalize;

/// Parameters of a `dedup` stage.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dedup {
    /// The text column compared. Default: `question`.
    #[serde(default = "default_column")]
    pub column: String,
    /// Jaccard similarity (of word shingles) from which two texts are near-duplicates.
    /// Default: 0.9 (questions are short: template questions that differ in one column name
    /// reach 0.85 and are different questions).
    #[serde(default = "default_threshold")]
    pub threshold: f64,
    /// Words per shingle. Default: 3.
    #[serde(default = "default_shingle")]
    pub shingle: usize,
    /// MinHash functions per signature. Default: 128.
    #[serde(default = "default_permutations")]
    pub permutations: usize,
}

fn default_column() -> String {
    "question".into()
}
fn default_threshold() -> f64 {
    0.9
}
fn default_shingle() -> usize {
    3
}
fn default_permutations() -> usize {
    128
}

/// The near-duplicate search on its own: for each text, the index of an earlier-grouped text it
/// duplicates (its group's representative) and their Jaccard similarity, or `None`. Texts are compared as given (normalise
/// first). Groups are transitive; each group's first text (lowest index) is its representative.
pub fn near_duplicates(
    texts: &[String],
    threshold: f64,
    shingle: usize,
    permutations: usize,
) -> Vec<Option<(usize, f64)>> {
    let shingles: Vec<HashSet<u64>> = texts.par_iter().map(|t| shingles_of(t, shingle)).collect();
    let seeds: Vec<(u64, u64)> =
        (0..permutations as u64).map(|i| (splitmix(i * 2 + 1) | 1, splitmix(i * 2 + 2))).collect();
    let signatures: Vec<Vec<u64>> = shingles
        .par_iter()
        .map(|set| {
            seeds
                .iter()
                .map(|&(a, b)| set.iter().map(|&h| a.wrapping_mul(h).wrapping_add(b)).min().unwrap_or(u64::MAX))
                .collect()
        })
        .collect();
    let (bands, rows) = bands_for(threshold, permutations);
    let mut parent: Vec<usize> = (0..texts.len()).collect();
    for band in 0..bands {
        let mut buckets: HashMap<&[u64], Vec<usize>> = HashMap::new();
        for (i, sig) in signatures.iter().enumerate() {
            if !shingles[i].is_empty() {
                buckets.entry(&sig[band * rows..(band + 1) * rows]).or_default().push(i);
            }
        }
        for members in buckets.values().filter(|m| m.len() > 1) {
            for (k, &i) in members.iter().enumerate() {
                for &j in &members[..k] {
                    let (ri, rj) = (find(&mut parent, i), find(&mut parent, j));
                    if ri == rj {
                        continue;
                    }
                    let jaccard = jaccard(&shingles[i], &shingles[j]);
                    if jaccard >= threshold {
                        parent[ri.max(rj)] = ri.min(rj);
                    }
                }
            }
        }
    }
    (0..texts.len())
        .map(|i| {
            let root = find(&mut parent, i);
            // Groups are transitive: the similarity reported is to the representative itself.
            (root != i).then(|| (root, jaccard(&shingles[i], &shingles[root])))
        })
        .collect()
}

fn find(parent: &mut [usize], mut i: usize) -> usize {
    while parent[i] != i {
        parent[i] = parent[parent[i]];
        i = parent[i];
    }
    i
}

/// (bands, rows per band) with `bands * rows = permutations` whose LSH threshold
/// `(1/bands)^(1/rows)` is closest below `threshold` (so candidates are not missed).
fn bands_for(threshold: f64, permutations: usize) -> (usize, usize) {
    (1..=permutations)
        .filter(|r| permutations.is_multiple_of(*r))
        .map(|r| (permutations / r, r))
        .filter(|&(b, r)| (1.0 / b as f64).powf(1.0 / r as f64) <= threshold)
        .max_by(|x, y| {
            let t = |(b, r): (usize, usize)| (1.0 / b as f64).powf(1.0 / r as f64);
            t(*x).total_cmp(&t(*y))
        })
        .unwrap_or((permutations, 1))
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// FNV-1a of the shingle's words, mixed: stable across runs and platforms.
fn shingles_of(text: &str, n: usize) -> HashSet<u64> {
    let words: Vec<&str> = text.split_whitespace().collect();
    let n = n.max(1).min(words.len().max(1));
    words
        .windows(n)
        .map(|w| {
            let mut h: u64 = 0xcbf2_9ce4_8422_2325;
            for b in w.join(" ").bytes() {
                h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
            }
            splitmix(h)
        })
        .collect()
}

fn jaccard(a: &HashSet<u64>, b: &HashSet<u64>) -> f64 {
    let inter = a.intersection(b).count();
    inter as f64 / (a.len() + b.len() - inter).max(1) as f64
}

/// The item a row belongs to: its question for trajectories, else itself.
fn item_of(row: &serde_json::Map<String, Value>, per_question: bool) -> String {
    let first_parent = row.get("parent_ids").and_then(|p| p.get(0)).and_then(Value::as_str);
    match (per_question, first_parent) {
        (true, Some(p)) => p.to_string(),
        _ => row.get("row_id").and_then(Value::as_str).unwrap_or_default().to_string(),
    }
}

impl Plain for Dedup {
    fn problems(&self, _cx: &CheckCx) -> Vec<Problem> {
        let mut problems = Vec::new();
        if !(self.threshold > 0.0 && self.threshold <= 1.0) {
            problems.push(Problem::new(
                "threshold",
                format!("`threshold` is a Jaccard similarity in (0, 1], got {}", self.threshold),
            ));
        }
        if self.shingle == 0 || self.permutations == 0 {
            problems.push(Problem::new("shingle", "`shingle` and `permutations` must be at least 1"));
        }
        problems
    }
}

#[async_trait]
impl Stage for Dedup {
    async fn output_schema(&self, _cx: &CheckCx, inputs: &[InputSchema]) -> Result<SchemaRef, Vec<Problem>> {
        let input = crate::filters::single_input("dedup", inputs)?;
        if input.schema.field_with_name(&self.column).is_err() {
            return Err(vec![
                Problem::new("inputs", format!("`{}` lacks the columns {}", input.name, self.column))
                    .help(format!("`column` names the text to compare (now `{}`)", self.column)),
            ]);
        }
        Ok(input.schema.clone())
    }

    async fn run(&self, cx: &StageCx, inputs: &[Input]) -> Result<Output> {
        let batches = inputs[0].read()?;
        let per_question = inputs[0].schema.field_with_name("sample").is_ok();
        let rows = to_json_rows(&batches)?;
        // Items, their normalised texts, and the distinct texts in order of each text's
        // smallest item id (so the representative of every group is its smallest item).
        let mut item_text: BTreeMap<String, String> = BTreeMap::new();
        for row in &rows {
            let text = normalize(row.get(&self.column).and_then(Value::as_str).unwrap_or(""));
            item_text.entry(item_of(row, per_question)).or_insert(text);
        }
        let mut texts: Vec<String> = Vec::new();
        let mut first_item: Vec<String> = Vec::new();
        let mut text_index: HashMap<String, usize> = HashMap::new();
        for (item, text) in &item_text {
            if !text_index.contains_key(text) {
                text_index.insert(text.clone(), texts.len());
                texts.push(text.clone());
                first_item.push(item.clone());
            }
        }
        let near = near_duplicates(&texts, self.threshold, self.shingle, self.permutations);

        let mut verdict: HashMap<&str, Refusal> = HashMap::new();
        for (item, text) in &item_text {
            let t = text_index[text];
            let why = if first_item[t] != *item {
                Some(("exact".to_string(), format!("same text as item {}", first_item[t])))
            } else {
                near[t].map(|(rep, j)| {
                    ("near".to_string(), format!("Jaccard {j:.2} with item {}: {:?}", first_item[rep], texts[rep]))
                })
            };
            if let Some(why) = why {
                verdict.insert(item.as_str(), why);
            }
        }
        let decisions = rows
            .iter()
            .map(|row| {
                let row_id = row.get(ROW_ID).and_then(Value::as_str).unwrap_or_default().to_string();
                match verdict.get(item_of(row, per_question).as_str()) {
                    None => (row_id, Ok(())),
                    Some(why) => (row_id, Err(why.clone())),
                }
            })
            .collect();
        let mut out = keep_rows(cx, "dedup", batches, decisions)?;
        out.counters.insert("distinct_texts".into(), texts.len() as u64);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bands_match_the_threshold() {
        assert_eq!(bands_for(0.8, 128), (16, 8));
        assert_eq!(bands_for(0.9, 128), (8, 16));
        assert_eq!(bands_for(0.5, 128), (32, 4));
    }

    #[test]
    fn near_duplicates_are_grouped_and_others_are_not() {
        let texts: Vec<String> = [
            "what is the average weight of the rodents caught in plot three during the summer of 1990",
            "how many distinct species were observed in the plots of the control type",
            "what is the average weight of the rodents caught in plot three during the summer of 1990 please",
            "what is the average hindfoot length of the rodents caught in plot seven during the winter of 1985",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let near = near_duplicates(&texts, 0.9, 3, 128);
        assert_eq!(near[0], None);
        assert_eq!(near[1], None);
        assert!(matches!(near[2], Some((0, j)) if j > 0.85), "{near:?}");
        assert_eq!(near[3], None);
    }
}
