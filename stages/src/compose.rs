//! `compose`: recursive easy-to-hard composition (RECIPE section 4).
//!
//! The recipe publishes no algorithm; this is ours. A chain starts from one input question
//! (the seed). Follow-up questions are drawn from the *same table*, each of a category not yet
//! in the chain, in a seeded order. One LLM call per step fuses the current (composite)
//! question with the next follow-up into a single question in which the first part's answer
//! feeds the second (a filter, threshold, group or entity chosen by the first part), using
//! `templates/compose.j2`: the prompt holds the table's metadata (from the `profile` stage, the
//! second input), the current question and the steps it was built from, and the follow-up. The
//! reply names what the follow-up takes from the first part (`<uses>`); a fusion that takes
//! nothing, or that copies the follow-up unchanged (two questions joined, not one that depends
//! on the other), is rejected as `not_dependent` with the reply's words.
//!
//! A chain of depth `d` fuses `d` questions with `d - 1` calls; the questions are taken a chunk
//! of whole tables at a time ([`crate::grouped`]), the chains of a chunk advance one step per
//! round, and every call goes through the row cache. The output row is a full `Question` row
//! ([`crate::families::QUESTION`]: the seed's path, format, table and category, the depth as its
//! difficulty) that keeps the chain (source questions and categories, in order: the agent gives
//! the teacher the procedures of every category in it), its depth and the source rows as
//! `parent_ids`. A seed whose table has too few questions of other categories, or was not
//! profiled, or whose fusion fails, is rejected with the reason.
//!
//! ```toml
//! [stages.hard]
//! kind = "compose"
//! inputs = ["queries", "files"]   # Question rows, and the profile of their tables
//! model = "teacher"
//! depth = 3                       # 2..=5
//! ```

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, SchemaRef};
use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use kiln_llm::Message;
use kiln_pipeline::rows::{row_id, schema_with_lineage, to_batch};
use kiln_pipeline::stage::{
    CheckCx, Config, Estimate, FileDep, Input, InputSchema, Output, Problem, Rejection, Stage, StageCx,
};
use kiln_pipeline::{Error, Result};
use serde::{Deserialize, Serialize};

use crate::families::{PROFILED_TABLE, QUESTION, Question, Row};
use crate::grouped::Grouped;
use crate::llm_rows::{Model, RowRequest, complete_rows, estimate_rows, parse_tags};
use crate::profile::readers::Format;
use crate::profile::{ProfiledTable, read_profiles};
use crate::templates::{Templates, check_template};

/// Parameters of a `compose` stage.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Compose {
    /// Name of a `[models.<name>]` table. Required.
    pub model: String,
    /// Questions fused per chain, 2 to 5: the difficulty. Default: 3.
    #[serde(default = "default_depth")]
    pub depth: u32,
    /// Prompt template. Default: `compose.j2`.
    #[serde(default = "default_template")]
    pub template: String,
    /// Extra requests when a reply does not parse. Default: 2.
    #[serde(default = "crate::llm_rows::default_parse_retries")]
    pub max_parse_retries: u32,
}

fn default_depth() -> u32 {
    3
}
fn default_template() -> String {
    "compose.j2".into()
}

/// Variables the template receives.
const VARIABLES: &[&str] = &["table", "current", "steps", "follow_up", "follow_up_category", "step", "depth"];
/// The `Question` columns a chain needs.
const NEEDS: &[&str] = &["question", "category", "path", "table"];

/// One input question.
#[derive(Debug, Clone)]
struct Source {
    row_id: String,
    question: String,
    category: String,
    path: String,
    format: Option<String>,
    table: String,
}

/// A composed question: a full `Question` row (its category is the seed's, its difficulty the
/// chain's depth), with the chain it fused.
#[derive(Debug, Serialize)]
struct Composed {
    row_id: String,
    parent_ids: Vec<String>,
    path: String,
    format: String,
    table: String,
    category: String,
    difficulty: u32,
    question: String,
    description: String,
    chain_questions: Vec<String>,
    chain_categories: Vec<String>,
    depth: u32,
    model: String,
}

fn schema() -> SchemaRef {
    let text = |n: &str| Field::new(n, DataType::Utf8, false);
    let list = |n: &str| Field::new(n, DataType::List(Arc::new(Field::new("item", DataType::Utf8, true))), false);
    schema_with_lineage(vec![
        text("path"),
        text("format"),
        text("table"),
        text("category"),
        Field::new("difficulty", DataType::UInt32, false),
        text("question"),
        text("description"),
        list("chain_questions"),
        list("chain_categories"),
        Field::new("depth", DataType::UInt32, false),
        text("model"),
    ])
}

/// A chain in progress: its sources so far and the current composite question.
#[derive(Debug, Clone)]
struct Chain {
    sources: Vec<Source>,
    question: String,
    description: String,
}

/// Follow-ups for `seed`: questions of the same table, one per category other than the seed's,
/// in an order seeded by `seed_text` and the seed row.
fn follow_ups<'a>(seed: &Source, pool: &'a [Source], seed_text: &str) -> Vec<&'a Source> {
    let mut by_category: BTreeMap<&str, Vec<&Source>> = BTreeMap::new();
    for s in pool.iter().filter(|s| s.path == seed.path && s.table == seed.table && s.category != seed.category) {
        by_category.entry(&s.category).or_default().push(s);
    }
    let key = |s: &str| blake3::hash(format!("{seed_text}\0{}\0{s}", seed.row_id).as_bytes()).to_hex().to_string();
    let mut picked: Vec<&Source> =
        by_category.into_values().filter_map(|v| v.into_iter().min_by_key(|s| key(&s.row_id))).collect();
    picked.sort_by_key(|s| key(&s.category));
    picked
}

/// The profiled tables, by (path, table).
type Tables = BTreeMap<(String, String), ProfiledTable>;

fn read_tables(input: &Input) -> Result<Tables> {
    Ok(read_profiles(input)?.into_iter().map(|t| ((t.path.clone(), t.table.clone()), t)).collect())
}

/// A fusion that does not depend on the earlier steps: why, or `None` when it does. `uses` is
/// the reply's account of what the follow-up takes from the first part.
fn not_dependent(fused: &str, uses: &str, follow_up: &str) -> Option<String> {
    let squash = |s: &str| s.to_lowercase().split_whitespace().collect::<Vec<_>>().join(" ");
    let said = squash(uses);
    let said = said.trim_matches(|c: char| !c.is_alphanumeric());
    if said.is_empty() || ["none", "nothing", "n/a", "na", "no", "independent"].contains(&said) {
        return Some(format!("the reply says the follow-up takes nothing from the first part ({uses:?})"));
    }
    let follow_up = squash(follow_up);
    let follow_up = follow_up.trim_end_matches(['?', '.', ' ']);
    if squash(fused).contains(follow_up) {
        return Some(format!("the follow-up is copied unchanged into {fused:?}: joined, not fed by the first part"));
    }
    None
}

/// The questions of `batch`, each with its table's key.
fn sources(stage: &str, batch: RecordBatch) -> Result<Vec<(String, Source)>> {
    Ok(QUESTION
        .rows::<Row<Question>>(stage, &[batch])?
        .into_iter()
        .map(|r| {
            let source = Source {
                row_id: r.row_id,
                question: r.data.question,
                category: r.data.category.unwrap_or_default(),
                path: r.data.path,
                format: r.data.format,
                table: r.data.table,
            };
            (format!("{}\0{}", source.path, source.table), source)
        })
        .collect())
}

/// The table key of each question of `batch`.
fn table_keys(stage: &str, batch: &RecordBatch) -> Result<Vec<String>> {
    Ok(sources(stage, batch.clone())?.into_iter().map(|(key, _)| key).collect())
}

/// The questions of `input`, whole tables at a time: a chain never leaves its table.
fn pools(input: &Input) -> Result<Grouped<Source>> {
    Grouped::read(input, table_keys, sources)
}

/// Questions composed at once (whole tables): what compose holds in memory.
const QUESTIONS_AT_ONCE: usize = 8192;

impl Compose {
    /// A chain per seed question with its planned follow-ups; seeds without enough follow-ups
    /// are rejected.
    fn start_chains<'a>(
        &self,
        pool: &'a [Source],
        tables: &Tables,
        seed_text: &str,
    ) -> (Vec<(Chain, Vec<&'a Source>)>, Vec<Rejection>) {
        let (mut live, mut rejections) = (Vec::new(), Vec::new());
        for seed in pool {
            if !tables.contains_key(&(seed.path.clone(), seed.table.clone())) {
                rejections.push(Rejection {
                    row_id: seed.row_id.clone(),
                    reason: "table_not_profiled".into(),
                    detail: format!(
                        "{} [{}]: the profile input has no such table, so the prompt would lack its columns",
                        seed.path, seed.table
                    ),
                });
                continue;
            }
            let ups = follow_ups(seed, pool, seed_text);
            if ups.len() + 1 < self.depth as usize {
                rejections.push(Rejection {
                    row_id: seed.row_id.clone(),
                    reason: "not_enough_questions".into(),
                    detail: format!(
                        "{} [{}]: depth {} needs {} other categories of questions on this table, found {}",
                        seed.path,
                        seed.table,
                        self.depth,
                        self.depth - 1,
                        ups.len()
                    ),
                });
                continue;
            }
            let chain =
                Chain { sources: vec![seed.clone()], question: seed.question.clone(), description: String::new() };
            live.push((chain, ups.into_iter().take(self.depth as usize - 1).collect()));
        }
        (live, rejections)
    }

    /// The fusion request of every live chain at `step` (1-based).
    fn step_requests(
        &self,
        templates: &Templates,
        tables: &Tables,
        live: &[(Chain, Vec<&Source>)],
        step: u32,
    ) -> Result<Vec<RowRequest>, crate::StageError> {
        live.iter()
            .map(|(chain, ups)| {
                let next = ups[step as usize - 1];
                let steps: Vec<_> = chain
                    .sources
                    .iter()
                    .map(|s| serde_json::json!({"category": s.category, "question": s.question}))
                    .collect();
                let vars = serde_json::json!({
                    "table": tables.get(&(next.path.clone(), next.table.clone())), "current": chain.question,
                    "steps": steps, "follow_up": next.question, "follow_up_category": next.category,
                    "step": step, "depth": self.depth,
                });
                let prompt = templates.render(&self.template, vars)?;
                let ids: Vec<&str> =
                    chain.sources.iter().map(|s| s.row_id.as_str()).chain([next.row_id.as_str()]).collect();
                let id = row_id(&ids, format!("compose\0{}", self.model).as_bytes());
                Ok(RowRequest { row_id: id, messages: vec![Message::new("user", prompt)], sample: 0 })
            })
            .collect()
    }
}

impl Config for Compose {
    fn build(&self, cx: &CheckCx, problems: &mut Vec<Problem>) -> Option<Box<dyn Stage>> {
        let model = Model::resolve(cx, &self.model).map_err(|p| problems.push(p)).ok();
        if !(2..=5).contains(&self.depth) {
            problems.push(Problem::new("depth", format!("`depth` must be between 2 and 5, got {}", self.depth)));
        }
        let templates = check_template(cx, &self.template, VARIABLES, "compose").map_err(|p| problems.push(p)).ok();
        match (model, templates) {
            (Some(model), Some(templates)) => Some(Box::new(Composing { params: self.clone(), model, templates })),
            _ => None,
        }
    }
}

/// A built `compose` stage.
#[derive(Debug)]
struct Composing {
    params: Compose,
    model: Model,
    templates: Templates,
}

#[async_trait]
impl Stage for Composing {
    fn models(&self) -> Vec<String> {
        vec![self.model.name.clone()]
    }

    fn seeded(&self) -> bool {
        true
    }

    fn files(&self, _cx: &CheckCx) -> Vec<FileDep> {
        self.templates.files()
    }

    async fn output_schema(&self, _cx: &CheckCx, inputs: &[InputSchema]) -> Result<SchemaRef, Vec<Problem>> {
        let [questions, profile] = inputs else {
            return Err(vec![
                Problem::new(
                    "inputs",
                    format!(
                        "a `compose` stage reads a stage of questions and the `profile` of their tables, got {} inputs",
                        inputs.len()
                    ),
                )
                .help("write `inputs = [\"queries\", \"files\"]`: the questions, then the profile stage"),
            ]);
        };
        QUESTION.check(questions, NEEDS).map_err(|p| vec![p])?;
        PROFILED_TABLE.check(profile, &["path", "table", "columns", "head"]).map_err(|p| vec![p])?;
        Ok(schema())
    }

    async fn estimate(&self, cx: &StageCx, inputs: &[Input]) -> Result<Option<Estimate>> {
        let tables = read_tables(&inputs[1])?;
        let mut requests = Vec::new();
        let mut pools = pools(&inputs[0])?;
        while let Some(chunk) = pools.next_chunk(QUESTIONS_AT_ONCE)? {
            let pool: Vec<Source> = chunk.into_iter().flat_map(|(_, questions)| questions).collect();
            let (live, _) = self.params.start_chains(&pool, &tables, &cx.seed.to_string());
            // Later steps depend on earlier replies: count the first step's prompts once per step.
            requests.extend(
                self.params.step_requests(&self.templates, &tables, &live, 1).map_err(|e| Error::stage(&cx.name, e))?,
            );
        }
        estimate_rows(cx, &self.model.config, &requests, u64::from(self.params.depth - 1)).map(Some)
    }

    async fn run(&self, cx: &StageCx, inputs: &[Input]) -> Result<Output> {
        let client = self.model.client(cx)?;
        let tables = read_tables(&inputs[1])?;
        let mut output = Output::default();
        let (mut seeds, mut composed) = (0, 0);
        let mut pools = pools(&inputs[0])?;
        while let Some(chunk) = pools.next_chunk(QUESTIONS_AT_ONCE)? {
            let pool: Vec<Source> = chunk.into_iter().flat_map(|(_, questions)| questions).collect();
            seeds += pool.len() as u64;
            let rows = self.compose(cx, &client, &pool, &tables, &mut output).await?;
            composed += rows.len() as u64;
            cx.emit(to_batch(&schema(), &rows)?)?;
        }
        output.counters.insert("seeds".into(), seeds);
        output.counters.insert("composed".into(), composed);
        Ok(output)
    }
}

impl Composing {
    /// The composed questions of `pool` (whole tables), with rejections and counters in `output`.
    async fn compose(
        &self,
        cx: &StageCx,
        client: &kiln_llm::Client,
        pool: &[Source],
        tables: &Tables,
        output: &mut Output,
    ) -> Result<Vec<Composed>> {
        let (mut live, rejections) = self.params.start_chains(pool, tables, &cx.seed.to_string());
        output.rejections.extend(rejections);
        for step in 1..self.params.depth {
            let requests = self
                .params
                .step_requests(&self.templates, tables, &live, step)
                .map_err(|e| Error::stage(&cx.name, e))?;
            let parse = |text: &str| parse_tags(text, &["question", "uses", "description"]);
            let (replies, rejections, step_counters) =
                complete_rows(cx, client, requests, self.params.max_parse_retries, parse).await?;
            output.rejections.extend(rejections);
            for (k, v) in step_counters {
                *output.counters.entry(k).or_default() += v;
            }
            let mut next = Vec::with_capacity(live.len());
            for ((mut chain, ups), reply) in live.into_iter().zip(replies) {
                let Some(reply) = reply else { continue };
                let Ok([question, uses, description]) = <[String; 3]>::try_from(reply.value) else { continue };
                let follow_up = ups[step as usize - 1];
                if let Some(why) = not_dependent(&question, &uses, &follow_up.question) {
                    *output.counters.entry("not_dependent".into()).or_default() += 1;
                    output.rejections.push(Rejection {
                        row_id: chain.sources[0].row_id.clone(),
                        reason: "not_dependent".into(),
                        detail: format!("fusion {step}: {why}"),
                    });
                    continue;
                }
                chain.sources.push(follow_up.clone());
                chain.question = question;
                chain.description = description;
                next.push((chain, ups));
            }
            live = next;
        }
        Ok(live
            .into_iter()
            .map(|(chain, _)| {
                let ids: Vec<String> = chain.sources.iter().map(|s| s.row_id.clone()).collect();
                let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
                Composed {
                    row_id: row_id(&refs, format!("compose\0{}\0{}", self.model.name, chain.question).as_bytes()),
                    parent_ids: ids,
                    path: chain.sources[0].path.clone(),
                    format: chain.sources[0].format.clone().unwrap_or_else(|| {
                        Format::of(Path::new(&chain.sources[0].path)).map(Format::name).unwrap_or_default().to_string()
                    }),
                    table: chain.sources[0].table.clone(),
                    category: chain.sources[0].category.clone(),
                    difficulty: self.params.depth,
                    question: chain.question,
                    description: chain.description,
                    chain_questions: chain.sources.iter().map(|s| s.question.clone()).collect(),
                    chain_categories: chain.sources.iter().map(|s| s.category.clone()).collect(),
                    depth: self.params.depth,
                    model: self.model.name.clone(),
                }
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::not_dependent;

    #[test]
    fn a_fusion_must_feed_the_follow_up() {
        let follow_up = "What is the mean price per region?";
        let fused = "For the region with the most orders, what is the mean price of its orders?";
        assert_eq!(not_dependent(fused, "the region with the most orders filters the rows", follow_up), None);
        for nothing in ["none", "None.", " N/A ", ""] {
            let why = not_dependent(fused, nothing, follow_up).expect(nothing);
            assert!(why.starts_with("the reply says the follow-up takes nothing"), "{why}");
        }
        let joined = "How many orders are there, and what is the mean price per region?";
        let why = not_dependent(joined, "the count", follow_up).expect("the follow-up is copied");
        assert!(why.contains("copied unchanged"), "{why}");
    }
}
