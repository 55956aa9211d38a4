//! `synthesize`: taxonomy-guided query synthesis (RECIPE section 3).
//!
//! For each profiled table, `per_table` categories are sampled from the mix (weighted, without
//! replacement, seeded by the pipeline seed and the table, so every category with a positive
//! weight is reachable). Each (table, category) is one LLM call whose prompt holds the table's
//! metadata, every category definition, and the chosen category's templates and examples
//! (`templates/synthesize.j2`). The reply must be
//! `<question>…</question><description>…</description><type>…</type>`; replies that do not
//! parse are retried, then rejected with the reason.
//!
//! ```toml
//! [stages.queries]
//! kind = "synthesize"
//! inputs = ["files"]
//! model = "teacher"
//! per_table = 3
//! mix = { aggregation = 14, ranking = 11 }   # default: the taxonomy's weights
//! ```

use std::collections::BTreeMap;

use arrow::datatypes::{DataType, Field, SchemaRef};
use async_trait::async_trait;
use kiln_llm::Message;
use kiln_pipeline::rows::{row_id, schema_with_lineage, to_batch};
use kiln_pipeline::stage::{CheckCx, Config, Estimate, FileDep, Input, InputSchema, Output, Problem, Stage, StageCx};
use kiln_pipeline::{Error, Result};
use serde::{Deserialize, Serialize};

use crate::families::PROFILED_TABLE;
use crate::llm_rows::{Model, RowRequest, complete_each, estimate_rows, parse_tags};
use crate::profile::{ProfiledTable, check_profile_input};
use crate::taxonomy::{Category, Taxonomy};
use crate::templates::{Templates, check_template};

/// Parameters of a `synthesize` stage.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Synthesize {
    /// Name of a `[models.<name>]` table. Required.
    pub model: String,
    /// Categories sampled per table. Default: 3.
    #[serde(default = "default_per_table")]
    pub per_table: usize,
    /// Relative weight per category id; categories left out are not sampled. Default: the
    /// weights in the taxonomy.
    #[serde(default)]
    pub mix: Option<BTreeMap<String, f64>>,
    /// Prompt template. Default: `synthesize.j2`.
    #[serde(default = "default_template")]
    pub template: String,
    /// Extra requests when a reply does not parse. Default: 2.
    #[serde(default = "crate::llm_rows::default_parse_retries")]
    pub max_parse_retries: u32,
}

fn default_per_table() -> usize {
    3
}
fn default_template() -> String {
    "synthesize.j2".into()
}

/// Questions handed to the dataset at once.
const OUTPUT_BATCH: usize = 1024;

/// Variables the template receives.
const VARIABLES: &[&str] = &["table", "categories", "category"];

#[derive(Debug, Serialize)]
struct Query {
    row_id: String,
    parent_ids: Vec<String>,
    path: String,
    format: String,
    table: String,
    category: String,
    category_name: String,
    question: String,
    description: String,
    answer_type: String,
    /// Always 1: a single question (the `Question` family's difficulty).
    difficulty: u32,
    model: String,
    seed: u64,
    prompt_tokens: u64,
    completion_tokens: u64,
}

fn schema() -> SchemaRef {
    let text = |n: &str| Field::new(n, DataType::Utf8, false);
    let count = |n: &str| Field::new(n, DataType::UInt64, false);
    schema_with_lineage(vec![
        text("path"),
        text("format"),
        text("table"),
        text("category"),
        text("category_name"),
        text("question"),
        text("description"),
        text("answer_type"),
        Field::new("difficulty", DataType::UInt32, false),
        text("model"),
        count("seed"),
        count("prompt_tokens"),
        count("completion_tokens"),
    ])
}

impl Synthesize {
    /// `(category, weight)` pairs with a positive weight, sorted by id.
    fn weights<'t>(&self, taxonomy: &'t Taxonomy) -> Vec<(&'t Category, f64)> {
        taxonomy
            .categories
            .iter()
            .filter_map(|c| {
                let w = match &self.mix {
                    Some(mix) => *mix.get(&c.id)?,
                    None => c.weight,
                };
                (w > 0.0).then_some((c, w))
            })
            .collect()
    }
}

impl Synthesizing {
    /// The category definitions every prompt lists.
    fn definitions(&self) -> Vec<serde_json::Value> {
        self.taxonomy
            .categories
            .iter()
            .map(|c| serde_json::json!({"id": c.id, "name": c.name, "definition": c.definition}))
            .collect()
    }

    /// One request per sampled category of `table`, with what it is about.
    fn requests(
        &self,
        cx: &StageCx,
        definitions: &[serde_json::Value],
        table: ProfiledTable,
    ) -> Result<Vec<(RowRequest, (ProfiledTable, Category))>> {
        let weights = self.params.weights(&self.taxonomy);
        let seed = cx.seed.to_string();
        let mut out = Vec::new();
        for category in sample(&weights, self.params.per_table, &[&seed, &table.row_id]) {
            let vars = serde_json::json!({"table": &table, "categories": definitions, "category": category});
            let prompt = self.templates.render(&self.params.template, vars).map_err(|e| Error::stage(&cx.name, e))?;
            let id = row_id(&[&table.row_id], format!("synthesize\0{}\0{}", category.id, self.model.name).as_bytes());
            let request = RowRequest { row_id: id, messages: vec![Message::new("user", prompt)], sample: 0 };
            out.push((request, (table.clone(), category.clone())));
        }
        Ok(out)
    }

    /// The requests of every table of `inputs`, made one record batch of tables at a time.
    fn plan<'a>(
        &'a self,
        cx: &'a StageCx,
        inputs: &'a [Input],
        definitions: &'a [serde_json::Value],
    ) -> Result<impl Iterator<Item = Result<(RowRequest, (ProfiledTable, Category))>> + Send + 'a> {
        let mut batches = Vec::new();
        for input in inputs {
            let name = input.name.clone();
            batches.push(input.batches()?.map(move |b| (name.clone(), b)));
        }
        Ok(batches.into_iter().flatten().flat_map(move |(name, batch)| {
            let tables = batch.and_then(|b| PROFILED_TABLE.rows::<ProfiledTable>(&name, &[b]));
            let requests = tables.and_then(|tables| {
                tables.into_iter().map(|t| self.requests(cx, definitions, t)).collect::<Result<Vec<_>>>()
            });
            match requests {
                Ok(r) => r.into_iter().flatten().map(Ok).collect::<Vec<_>>(),
                Err(e) => vec![Err(e)],
            }
        }))
    }
}

/// Weighted sampling without replacement (Efraimidis-Spirakis keys), deterministic in `seed`.
fn sample<'t>(weights: &[(&'t Category, f64)], k: usize, seed: &[&str]) -> Vec<&'t Category> {
    let mut keyed: Vec<(f64, &Category)> = weights
        .iter()
        .map(|(c, w)| {
            let h = blake3::hash(format!("{}\0{}", seed.join("\0"), c.id).as_bytes());
            let u = (u64::from_le_bytes(h.as_bytes()[..8].try_into().unwrap_or_default()) >> 11) as f64
                / (1u64 << 53) as f64;
            (u.max(f64::MIN_POSITIVE).powf(1.0 / w), *c)
        })
        .collect();
    keyed.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| a.1.id.cmp(&b.1.id)));
    keyed.into_iter().take(k).map(|(_, c)| c).collect()
}

impl Config for Synthesize {
    fn build(&self, cx: &CheckCx, problems: &mut Vec<Problem>) -> Option<Box<dyn Stage>> {
        let model = Model::resolve(cx, &self.model).map_err(|p| problems.push(p)).ok();
        if !(1..=crate::llm_rows::MAX_SAMPLES as usize).contains(&self.per_table) {
            problems.push(Problem::new(
                "per_table",
                format!("`per_table` must be between 1 and {}, got {}", crate::llm_rows::MAX_SAMPLES, self.per_table),
            ));
        }
        let templates = check_template(cx, &self.template, VARIABLES, "synthesize").map_err(|p| problems.push(p)).ok();
        let taxonomy = Taxonomy::load(cx.taxonomy.as_deref())
            .map_err(|e| problems.push(Problem::new("", format!("the taxonomy does not load: {e}"))))
            .ok();
        if let Some(t) = &taxonomy {
            for (id, w) in self.mix.iter().flatten() {
                if t.get(id).is_none() {
                    let help = kiln_pipeline::error::did_you_mean(id, t.categories.iter().map(|c| c.id.as_str()));
                    let p = Problem::new(&format!("mix.{id}"), format!("unknown category `{id}`"));
                    problems.push(match help {
                        Some(h) => p.help(h),
                        None => p,
                    });
                } else if w.is_nan() || *w < 0.0 {
                    problems.push(Problem::new(&format!("mix.{id}"), format!("weights must be at least 0, got {w}")));
                }
            }
            if self.weights(t).is_empty() {
                problems.push(Problem::new("mix", "no category has a positive weight"));
            }
        }
        match (model, templates, taxonomy) {
            (Some(model), Some(templates), Some(taxonomy)) => {
                Some(Box::new(Synthesizing { params: self.clone(), model, templates, taxonomy }))
            }
            _ => None,
        }
    }
}

/// A built `synthesize` stage.
#[derive(Debug)]
struct Synthesizing {
    params: Synthesize,
    model: Model,
    templates: Templates,
    taxonomy: Taxonomy,
}

#[async_trait]
impl Stage for Synthesizing {
    fn models(&self) -> Vec<String> {
        vec![self.model.name.clone()]
    }

    fn seeded(&self) -> bool {
        true
    }

    fn files(&self, _cx: &CheckCx) -> Vec<FileDep> {
        let mut files = self.taxonomy.files();
        files.extend(self.templates.files());
        files
    }

    async fn output_schema(&self, _cx: &CheckCx, inputs: &[InputSchema]) -> Result<SchemaRef, Vec<Problem>> {
        check_profile_input("synthesize", inputs)?;
        Ok(schema())
    }

    async fn estimate(&self, cx: &StageCx, inputs: &[Input]) -> Result<Option<Estimate>> {
        let definitions = self.definitions();
        let requests: Vec<RowRequest> =
            self.plan(cx, inputs, &definitions)?.map(|r| r.map(|(r, _)| r)).collect::<Result<_>>()?;
        estimate_rows(cx, &self.model.config, &requests, 1).map(Some)
    }

    async fn run(&self, cx: &StageCx, inputs: &[Input]) -> Result<Output> {
        let client = self.model.client(cx)?;
        let definitions = self.definitions();
        let requests = self.plan(cx, inputs, &definitions)?;
        let total = inputs.iter().filter_map(Input::row_count).sum::<u64>() * self.params.per_table as u64;
        let parse = |text: &str| parse_tags(text, &["question", "description", "type"]);
        let (mut rows, mut kept, mut requested) = (Vec::new(), 0u64, 0u64);
        let retries = self.params.max_parse_retries;
        let (rejections, counters) =
            complete_each(cx, client.as_ref(), requests, total, retries, parse, |row_id, (table, category), reply| {
                requested += 1;
                let Some(reply) = reply else { return Ok(()) };
                let [question, description, answer_type]: [String; 3] =
                    reply.value.try_into().map_err(|_| Error::Internal("three tags".into()))?;
                kept += 1;
                rows.push(Query {
                    row_id,
                    parent_ids: vec![table.row_id.clone()],
                    path: table.path,
                    format: table.format,
                    table: table.table,
                    category: category.id,
                    category_name: category.name,
                    question,
                    description,
                    answer_type,
                    difficulty: 1,
                    model: self.model.name.clone(),
                    seed: cx.seed,
                    prompt_tokens: reply.prompt_tokens,
                    completion_tokens: reply.completion_tokens,
                });
                if rows.len() >= OUTPUT_BATCH {
                    cx.emit(to_batch(&schema(), &std::mem::take(&mut rows))?)?;
                }
                Ok(())
            })
            .await?;
        let mut output = Output { rejections, counters, ..Default::default() };
        output.counters.insert("requested".into(), requested);
        output.counters.insert("queries".into(), kept);
        output.batches = vec![to_batch(&schema(), &rows)?];
        Ok(output)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_is_weighted_deterministic_and_reaches_every_category() {
        let t = Taxonomy::load(None).unwrap();
        let weights: Vec<(&Category, f64)> = t.categories.iter().map(|c| (c, c.weight)).collect();
        let a = sample(&weights, 3, &["0", "table"]);
        assert_eq!(a.len(), 3);
        assert_eq!(a, sample(&weights, 3, &["0", "table"]));
        let mut seen = std::collections::BTreeSet::new();
        let mut counts = BTreeMap::new();
        for i in 0..4000 {
            for c in sample(&weights, 1, &["0", &i.to_string()]) {
                seen.insert(c.id.clone());
                *counts.entry(c.id.clone()).or_insert(0) += 1;
            }
        }
        assert_eq!(seen.len(), 18, "every category reachable");
        assert!(counts["aggregation"] > counts["comprehensive_data_preprocessing"] * 3, "{counts:?}");
    }
}
