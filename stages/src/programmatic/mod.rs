//! `programmatic`: offline analysis questions with gold answers, no LLM needed.
//!
//! For each table profiled upstream and each chosen category, it fills a category's question
//! pattern with the table's real columns (numeric columns for aggregation, statistics and
//! correlation; text columns with few values for counting, ranking and comparison; dates or
//! years for time-based questions...), computes the gold answer by running the generated
//! DataFusion SQL on the actual data, and writes question, answer and the solving query.
//! Questions whose answer would be ambiguous (a tie for the top value) are not emitted. Choices
//! of columns and values are deterministic, seeded by the pipeline seed and the table.
//!
//! ```toml
//! [stages.questions]
//! kind = "programmatic"
//! inputs = ["files"]
//! categories = ["aggregation", "ranking", "counting"]  # default: every supported category
//! ```

mod questions;

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Field, SchemaRef};
use async_trait::async_trait;
use datafusion::datasource::MemTable;
use datafusion::prelude::SessionContext;
use kiln_pipeline::rows::{row_id, schema_with_lineage, to_batch};
use kiln_pipeline::stage::{CheckCx, Config, FileDep, Input, InputSchema, Output, Problem, Rejection, Stage, StageCx};
use kiln_pipeline::{Error, Result};
use serde::{Deserialize, Serialize};

use crate::profile::ProfiledTable;
use crate::profile::readers::read_table;
use crate::taxonomy::Taxonomy;
use questions::{Columns, Draft, Picker, SUPPORTED, draft};

/// Parameters of a `programmatic` stage.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Programmatic {
    /// Taxonomy category ids to generate. Default: every category the generator supports
    /// (15 of the 18).
    #[serde(default)]
    pub categories: Option<Vec<String>>,
    /// Decimal places of numeric gold answers. Default: 4.
    #[serde(default = "default_decimals")]
    pub decimals: usize,
}

fn default_decimals() -> usize {
    4
}

/// One output row.
#[derive(Debug, Serialize)]
struct Question {
    row_id: String,
    parent_ids: Vec<String>,
    path: String,
    format: String,
    table: String,
    category: String,
    category_name: String,
    question: String,
    answer: String,
    query: String,
    params: String,
    difficulty: u32,
}

fn schema() -> SchemaRef {
    let text = |name: &str| Field::new(name, DataType::Utf8, false);
    schema_with_lineage(vec![
        text("path"),
        text("format"),
        text("table"),
        text("category"),
        text("category_name"),
        text("question"),
        text("answer"),
        text("query"),
        text("params"),
        Field::new("difficulty", DataType::UInt32, false),
    ])
}

impl Programmatic {
    fn categories(&self) -> Vec<String> {
        self.categories.clone().unwrap_or_else(|| SUPPORTED.iter().map(|s| s.to_string()).collect())
    }

    /// Questions for one table; rejections for the drafts that could not be answered.
    async fn table_questions(
        &self,
        cx: &StageCx,
        taxonomy: &Taxonomy,
        t: &ProfiledTable,
        out: &mut Output,
    ) -> Result<Vec<Question>> {
        let path = cx.pipeline.resolve(&t.path);
        let data = match read_table(&path, &t.table).await {
            Ok(data) => data,
            Err(e) => {
                out.rejections.push(Rejection {
                    row_id: t.row_id.clone(),
                    reason: "unreadable".into(),
                    detail: format!("{} [{}]: {e}", t.path, t.table),
                });
                return Ok(Vec::new());
            }
        };
        let ctx = SessionContext::new();
        let mem = MemTable::try_new(data.schema.clone(), vec![data.rows]).map_err(|e| Error::stage(&cx.name, e))?;
        ctx.register_table(questions::ident(&t.table).as_str(), Arc::new(mem))
            .map_err(|e| Error::stage(&cx.name, e))?;

        let cols = Columns::new(&t.table, &t.columns);
        let seed = cx.seed.to_string();
        let mut rows = Vec::new();
        for category in self.categories() {
            let mut picker = Picker::new(&[&seed, &t.row_id, &category]);
            let Some(Draft { question, sql, check, params }) = draft(&category, &cols, &mut picker) else {
                *out.counters.entry(format!("no_columns_for_{category}")).or_default() += 1;
                continue;
            };
            let id = row_id(&[&t.row_id], question.as_bytes());
            let answer = match gold(&ctx, &sql, check.as_deref(), self.decimals).await {
                Ok(answer) => answer,
                Err(why) => {
                    out.rejections.push(Rejection {
                        row_id: id,
                        reason: "no_gold_answer".into(),
                        detail: format!("{} [{}] {category}: {why}", t.path, t.table),
                    });
                    continue;
                }
            };
            let name = taxonomy.get(&category).map(|c| c.name.clone()).unwrap_or_else(|| category.clone());
            rows.push(Question {
                row_id: id,
                parent_ids: vec![t.row_id.clone()],
                path: t.path.clone(),
                format: t.format.clone(),
                table: t.table.clone(),
                category,
                category_name: name,
                question,
                answer,
                query: sql,
                params: params.to_string(),
                difficulty: 1,
            });
        }
        Ok(rows)
    }
}

/// Runs the check (if any) and the answering query; the first value of the first row, formatted.
async fn gold(ctx: &SessionContext, sql: &str, check: Option<&str>, decimals: usize) -> Result<String, String> {
    let run = |q: String| async move {
        let batches =
            ctx.sql(&q).await.map_err(|e| e.strip_backtrace())?.collect().await.map_err(|e| e.strip_backtrace())?;
        Ok::<Vec<RecordBatch>, String>(batches)
    };
    if let Some(check) = check {
        let ok = first_value(&run(check.to_string()).await?)
            .map(|a| a.as_boolean_opt().map(|b| b.value(0)).unwrap_or(false));
        if ok != Some(true) {
            return Err("the answer would be ambiguous (a tie, or missing values)".into());
        }
    }
    let value = first_value(&run(sql.to_string()).await?).ok_or("the query returned no value")?;
    format_value(value.as_ref(), decimals)
}

fn first_value(batches: &[RecordBatch]) -> Option<Arc<dyn Array>> {
    let b = batches.iter().find(|b| b.num_rows() > 0)?;
    let col = b.column(0).slice(0, 1);
    (!col.is_null(0)).then_some(col)
}

/// Floats rounded to `decimals` places (trailing zeros dropped), everything else as displayed.
fn format_value(value: &dyn Array, decimals: usize) -> Result<String, String> {
    if let DataType::Float64 | DataType::Float32 = value.data_type() {
        let v = arrow::compute::cast(value, &DataType::Float64).map_err(|e| e.to_string())?;
        let x = v.as_primitive::<arrow::datatypes::Float64Type>().value(0);
        if !x.is_finite() {
            return Err(format!("the answer is not a finite number ({x})"));
        }
        let s = format!("{x:.decimals$}");
        let s = if s.contains('.') { s.trim_end_matches('0').trim_end_matches('.').to_string() } else { s };
        return Ok(if s == "-0" { "0".into() } else { s });
    }
    let options = arrow::util::display::FormatOptions::default();
    let f = arrow::util::display::ArrayFormatter::try_new(value, &options).map_err(|e| e.to_string())?;
    Ok(f.value(0).to_string())
}

impl Config for Programmatic {
    fn build(&self, cx: &CheckCx, problems: &mut Vec<Problem>) -> Option<Box<dyn Stage>> {
        let taxonomy = match Taxonomy::load(cx.taxonomy.as_deref()) {
            Ok(t) => t,
            Err(e) => {
                problems.push(Problem::new("", format!("the taxonomy does not load: {e}")));
                return None;
            }
        };
        for (i, id) in self.categories.iter().flatten().enumerate() {
            if taxonomy.get(id).is_none() {
                let ids = taxonomy.categories.iter().map(|c| c.id.as_str());
                let help = kiln_pipeline::error::did_you_mean(id, ids)
                    .unwrap_or_else(|| "see the files in `taxonomy/`".into());
                problems.push(Problem::new(&format!("categories.{i}"), format!("unknown category `{id}`")).help(help));
            } else if !SUPPORTED.contains(&id.as_str()) {
                problems.push(
                    Problem::new(
                        &format!("categories.{i}"),
                        format!("category `{id}` needs an LLM: the programmatic generator cannot instantiate it"),
                    )
                    .help(format!("supported: {}", SUPPORTED.join(", "))),
                );
            }
        }
        if self.categories.as_ref().is_some_and(|c| c.is_empty()) {
            problems.push(
                Problem::new("categories", "`categories` is empty").help("remove it to use every supported category"),
            );
        }
        Some(Box::new(Instantiating { params: self.clone(), taxonomy }))
    }
}

/// A built `programmatic` stage.
#[derive(Debug)]
struct Instantiating {
    params: Programmatic,
    taxonomy: Taxonomy,
}

#[async_trait]
impl Stage for Instantiating {
    fn seeded(&self) -> bool {
        true
    }

    fn files(&self, _cx: &CheckCx) -> Vec<FileDep> {
        self.taxonomy.files()
    }

    async fn output_schema(&self, _cx: &CheckCx, inputs: &[InputSchema]) -> Result<SchemaRef, Vec<Problem>> {
        crate::profile::check_profile_input("programmatic", inputs)?;
        Ok(schema())
    }

    async fn run(&self, cx: &StageCx, inputs: &[Input]) -> Result<Output> {
        let mut output = Output::default();
        let mut rows = Vec::new();
        for input in inputs {
            for table in crate::profile::read_profiles(input)? {
                rows.extend(self.params.table_questions(cx, &self.taxonomy, &table, &mut output).await?);
            }
        }
        let mut per_category: BTreeMap<String, u64> = BTreeMap::new();
        rows.iter().for_each(|r| *per_category.entry(format!("questions_{}", r.category)).or_default() += 1);
        output.counters.extend(per_category);
        output.counters.insert("questions".into(), rows.len() as u64);
        output.batches = vec![to_batch(&schema(), &rows)?];
        Ok(output)
    }
}
