//! `generate`: the generic LLM step, for what the recipe does not name (rewriting, summarising
//! reasoning, translating...). For each input row it renders a prompt in which every input
//! column is a variable, requests `n` samples, optionally parses tags out of each reply, and
//! writes the input columns plus the new ones. One output row per (input row, sample).
//!
//! It streams: the input is read one record batch at a time, requests are made as the model
//! frees up, and output rows are written to the dataset in batches as they complete, so memory
//! holds what is in flight, not the whole input or output.
//!
//! ```toml
//! [stages.rewrite]
//! kind = "generate"
//! inputs = ["questions"]
//! model = "teacher"
//! prompt = "Rewrite this question more formally: {{ question }}\nReply as <rewritten>...</rewritten>"
//! tags = ["rewritten"]
//! n = 2
//! ```

use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch, StringArray, UInt32Array, UInt64Array};
use arrow::compute::concat_batches;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use async_trait::async_trait;
use kiln_llm::Message;
use kiln_pipeline::rows::{PARENT_IDS, ROW_ID, parents_array, row_id, to_json_rows};
use kiln_pipeline::stage::{CheckCx, Config, Estimate, FileDep, Input, InputSchema, Output, Problem, Stage, StageCx};
use kiln_pipeline::{Error, Result};
use serde::{Deserialize, Serialize};

use crate::llm_rows::{Model, RowReply, RowRequest, complete_each, estimate_rows, parse_tags};
use crate::templates::Templates;

/// Parameters of a `generate` stage.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Generate {
    /// Name of a `[models.<name>]` table. Required.
    pub model: String,
    /// The prompt, as an inline minijinja template. Exactly one of `prompt` and `template`.
    #[serde(default)]
    pub prompt: Option<String>,
    /// The prompt, as a template file of the pipeline's templates folder.
    #[serde(default)]
    pub template: Option<String>,
    /// A system message sent before the prompt. Default: none.
    #[serde(default)]
    pub system: Option<String>,
    /// Samples per input row. Default: 1.
    #[serde(default = "default_n")]
    pub n: u32,
    /// Tags to parse out of each reply, each into a column of the same name. At most one of
    /// `tags`, `regex` and `json_fields`; with none, the whole reply goes to a `text` column.
    #[serde(default)]
    pub tags: Vec<String>,
    /// A regular expression whose named groups become columns; it must match the reply.
    #[serde(default)]
    pub regex: Option<String>,
    /// The reply must be a JSON object (optionally in a ```json fence) with these fields; each
    /// becomes a column holding the field's value (strings as is, other values as JSON).
    #[serde(default)]
    pub json_fields: Vec<String>,
    /// Extra requests when a reply does not parse. Default: 2.
    #[serde(default = "crate::llm_rows::default_parse_retries")]
    pub max_parse_retries: u32,
}

fn default_n() -> u32 {
    1
}

/// Rows of output handed on at once (each copied twice on its way to disk: keep it small).
const OUTPUT_BATCH: usize = 1024;

/// Where a request came from: its input batch (shared by the batch's rows), its row there, the
/// sample number. Rows wait in the reorder buffer by the thousand: keep this small.
type Source = (Arc<RecordBatch>, usize, u32);

/// Turns a reply into the values of the new columns, or says why it cannot.
type Parser = Box<dyn Fn(&str) -> Result<Vec<String>, String> + Send + Sync>;

/// Name under which the prompt template is registered.
const PROMPT: &str = "prompt";

impl Generate {
    fn templates(&self, cx: &CheckCx) -> Result<(Templates, String), Problem> {
        match (&self.prompt, &self.template) {
            (Some(p), None) => {
                Templates::inline(PROMPT, p).map(|t| (t, PROMPT.to_string())).map_err(|e| Problem::new("prompt", e))
            }
            (None, Some(name)) => Templates::load(cx.templates.as_deref(), &[name])
                .map(|t| (t, name.clone()))
                .map_err(|e| Problem::new("template", e)),
            _ => Err(Problem::new("", "give exactly one of `prompt` (inline) and `template` (a file)")),
        }
    }

    /// Names of the columns this stage adds.
    fn new_columns(&self) -> Vec<String> {
        if let Some(re) = self.regex.as_deref().and_then(|r| regex::Regex::new(r).ok()) {
            return re.capture_names().flatten().map(str::to_string).collect();
        }
        match (self.tags.is_empty(), self.json_fields.is_empty()) {
            (false, _) => self.tags.clone(),
            (true, false) => self.json_fields.clone(),
            (true, true) => vec!["text".into()],
        }
    }

    /// The reply parser: tags, regex groups, JSON fields, or the whole text.
    fn parser(&self) -> Result<Parser, Problem> {
        if let Some(pattern) = &self.regex {
            let re = regex::Regex::new(pattern)
                .map_err(|e| Problem::new("regex", format!("invalid regular expression: {e}")))?;
            let names: Vec<String> = re.capture_names().flatten().map(str::to_string).collect();
            if names.is_empty() {
                return Err(Problem::new("regex", "the regular expression has no named group")
                    .help("name the parts to keep: `(?P<answer>.+)`"));
            }
            return Ok(Box::new(move |text: &str| {
                let caps = re.captures(text).ok_or("the reply does not match the expected pattern")?;
                names
                    .iter()
                    .map(|n| {
                        caps.name(n).map(|m| m.as_str().trim().to_string()).ok_or(format!("no `{n}` in the reply"))
                    })
                    .collect()
            }));
        }
        if !self.json_fields.is_empty() {
            let fields = self.json_fields.clone();
            return Ok(Box::new(move |text: &str| {
                let body =
                    text.trim().trim_start_matches("```json").trim_start_matches("```").trim_end_matches("```").trim();
                let value: serde_json::Value =
                    serde_json::from_str(body).map_err(|e| format!("the reply is not JSON: {e}"))?;
                fields
                    .iter()
                    .map(|f| match value.get(f) {
                        Some(serde_json::Value::String(s)) => Ok(s.clone()),
                        Some(other) => Ok(other.to_string()),
                        None => Err(format!("the JSON reply has no field `{f}`")),
                    })
                    .collect()
            }));
        }
        let tags = self.tags.clone();
        Ok(Box::new(move |text: &str| {
            if tags.is_empty() {
                return Ok(vec![text.to_string()]);
            }
            let names: Vec<&str> = tags.iter().map(String::as_str).collect();
            parse_tags(text, &names)
        }))
    }
}

impl Config for Generate {
    fn build(&self, cx: &CheckCx, problems: &mut Vec<Problem>) -> Option<Box<dyn Stage>> {
        let model = Model::resolve(cx, &self.model).map_err(|p| problems.push(p)).ok();
        let templates = self.templates(cx).map_err(|p| problems.push(p)).ok();
        problems.extend(crate::llm_rows::sample_problems("n", self.n, model.as_ref()));
        let modes = [!self.tags.is_empty(), self.regex.is_some(), !self.json_fields.is_empty()];
        if modes.iter().filter(|&&m| m).count() > 1 {
            problems.push(Problem::new("", "give at most one of `tags`, `regex` and `json_fields`"));
        }
        problems.extend(self.parser().err());
        match (model, templates) {
            (Some(model), Some((templates, prompt))) => {
                Some(Box::new(Generating { params: self.clone(), model, templates, prompt }))
            }
            _ => None,
        }
    }
}

/// A built `generate` stage.
#[derive(Debug)]
struct Generating {
    params: Generate,
    model: Model,
    templates: Templates,
    /// The name of the prompt among `templates`.
    prompt: String,
}

impl Generating {
    /// One request per (row, sample) of `batch`, each with where it came from.
    fn requests(&self, cx: &StageCx, batch: &RecordBatch) -> Result<Vec<(RowRequest, Source)>> {
        let mut out = Vec::new();
        let shared = Arc::new(batch.clone());
        for (i, row) in to_json_rows(std::slice::from_ref(batch))?.into_iter().enumerate() {
            let parent = row.get(ROW_ID).and_then(|v| v.as_str()).unwrap_or_default().to_string();
            let prompt = self.templates.render(&self.prompt, &row).map_err(|e| Error::stage(&cx.name, e))?;
            let mut messages: Vec<Message> =
                self.params.system.iter().map(|s| Message::new("system", s.clone())).collect();
            messages.push(Message::new("user", prompt));
            for sample in 0..self.params.n {
                let body = serde_json::to_string(&messages).unwrap_or_default();
                let id = row_id(&[&parent], format!("generate\0{}\0{sample}\0{body}", self.model.name).as_bytes());
                out.push((RowRequest { row_id: id, messages: messages.clone(), sample }, (shared.clone(), i, sample)));
            }
        }
        Ok(out)
    }

    /// Output rows: the input rows of `sources` (with new ids and parents) and their replies.
    fn output_batch(
        &self,
        schema: &SchemaRef,
        rows: Vec<(String, Source, RowReply<Vec<String>>)>,
    ) -> Result<RecordBatch> {
        let fail = |e: arrow::error::ArrowError| Error::Internal(format!("generate output: {e}"));
        let input_schema = rows[0].1.0.schema();
        let slices: Vec<RecordBatch> = rows.iter().map(|(_, (batch, i, _), _)| batch.slice(*i, 1)).collect();
        let kept = concat_batches(&input_schema, &slices).map_err(fail)?;
        let n = rows.len();
        let ids: Vec<&str> = rows.iter().map(|(id, _, _)| id.as_str()).collect();
        let input_ids = kept.column_by_name(ROW_ID).and_then(|c| c.as_any().downcast_ref::<StringArray>());
        let parents: Vec<Vec<String>> =
            (0..n).map(|k| vec![input_ids.map_or(String::new(), |ids| ids.value(k).to_string())]).collect();
        let mut columns: Vec<ArrayRef> = Vec::new();
        for (field, column) in input_schema.fields().iter().zip(kept.columns()) {
            columns.push(match field.name().as_str() {
                ROW_ID => Arc::new(StringArray::from(ids.clone())),
                PARENT_IDS => parents_array(&parents),
                _ => column.clone(),
            });
        }
        columns.push(Arc::new(UInt32Array::from_iter_values(rows.iter().map(|(_, source, _)| source.2))));
        for k in 0..self.params.new_columns().len() {
            columns.push(Arc::new(StringArray::from_iter_values(rows.iter().map(|(_, _, r)| r.value[k].as_str()))));
        }
        columns.push(Arc::new(StringArray::from(vec![self.model.name.clone(); n])));
        columns.push(Arc::new(UInt64Array::from_iter_values(rows.iter().map(|(_, _, r)| r.prompt_tokens))));
        columns.push(Arc::new(UInt64Array::from_iter_values(rows.iter().map(|(_, _, r)| r.completion_tokens))));
        RecordBatch::try_new(schema.clone(), columns).map_err(fail)
    }

    async fn schema(&self, cx: &StageCx, input: &Input) -> Result<SchemaRef> {
        let inputs = [InputSchema { name: input.name.clone(), kind: String::new(), schema: input.schema.clone() }];
        self.output_schema(&cx.pipeline, &inputs).await.map_err(|p| Error::stage(&cx.name, p[0].message.clone()))
    }
}

#[async_trait]
impl Stage for Generating {
    fn models(&self) -> Vec<String> {
        vec![self.model.name.clone()]
    }

    fn files(&self, _cx: &CheckCx) -> Vec<FileDep> {
        self.templates.files()
    }

    async fn output_schema(&self, _cx: &CheckCx, inputs: &[InputSchema]) -> Result<SchemaRef, Vec<Problem>> {
        let [input] = inputs else {
            return Err(vec![Problem::new(
                "inputs",
                format!("a `generate` stage reads exactly one stage, got {}", inputs.len()),
            )]);
        };
        let columns: Vec<&str> = input.schema.fields().iter().map(|f| f.name().as_str()).collect();
        {
            let missing = self.templates.missing_variables(&self.prompt, &columns);
            if !missing.is_empty() {
                let key = if self.params.prompt.is_some() { "prompt" } else { "template" };
                return Err(vec![
                    Problem::new(
                        key,
                        format!("the prompt uses {}, which `{}` does not have", missing.join(", "), input.name),
                    )
                    .help(format!("columns of `{}`: {}", input.name, columns.join(", "))),
                ]);
            }
        }
        let added = self.params.new_columns();
        let fixed = ["sample", "model", "prompt_tokens", "completion_tokens"];
        if let Some(clash) = added.iter().map(String::as_str).chain(fixed).find(|c| columns.contains(c)) {
            return Err(vec![
                Problem::new("tags", format!("column `{clash}` already exists in `{}`", input.name))
                    .help("rename the tag, or drop the column upstream with a `sql` stage"),
            ]);
        }
        let mut fields: Vec<Field> = input.schema.fields().iter().map(|f| f.as_ref().clone()).collect();
        fields.push(Field::new("sample", DataType::UInt32, false));
        fields.extend(added.iter().map(|c| Field::new(c, DataType::Utf8, false)));
        fields.push(Field::new("model", DataType::Utf8, false));
        fields.push(Field::new("prompt_tokens", DataType::UInt64, false));
        fields.push(Field::new("completion_tokens", DataType::UInt64, false));
        Ok(Arc::new(Schema::new(fields)))
    }

    async fn estimate(&self, cx: &StageCx, inputs: &[Input]) -> Result<Option<Estimate>> {
        let mut requests = Vec::new();
        for batch in inputs[0].batches()? {
            requests.extend(self.requests(cx, &batch?)?.into_iter().map(|(r, _)| r));
        }
        estimate_rows(cx, &self.model.config, &requests, 1).map(Some)
    }

    async fn run(&self, cx: &StageCx, inputs: &[Input]) -> Result<Output> {
        let input = &inputs[0];
        let client = self.model.client(cx)?;
        let parse = self.params.parser().map_err(|p| Error::stage(&cx.name, p.to_string()))?;
        let schema = self.schema(cx, input).await?;
        // Requests are made from the input one batch at a time, as the client takes them.
        let requests = input.batches()?.flat_map(|batch| match batch.and_then(|b| self.requests(cx, &b)) {
            Ok(requests) => requests.into_iter().map(Ok).collect::<Vec<_>>(),
            Err(e) => vec![Err(e)],
        });
        let total = input.row_count().unwrap_or(0) * u64::from(self.params.n);
        let mut ready = Vec::new();
        let (rejections, counters) = complete_each(
            cx,
            client.as_ref(),
            requests,
            total,
            self.params.max_parse_retries,
            parse,
            |row_id, source, reply| {
                if let Some(reply) = reply {
                    ready.push((row_id, source, reply));
                }
                if ready.len() >= OUTPUT_BATCH {
                    cx.emit(self.output_batch(&schema, std::mem::take(&mut ready))?)?;
                }
                Ok(())
            },
        )
        .await?;
        let batches = if ready.is_empty() { Vec::new() } else { vec![self.output_batch(&schema, ready)?] };
        Ok(Output { batches, rejections, counters })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stage(extra: &str) -> Generate {
        toml::from_str(&format!("model = \"m\"\nprompt = \"p\"\n{extra}")).unwrap()
    }

    #[test]
    fn replies_parse_by_regex_json_or_tags() {
        let g = stage("regex = 'Answer: (?P<answer>\\d+) because (?P<why>.+)'");
        assert_eq!(g.new_columns(), ["answer", "why"]);
        assert_eq!(g.parser().unwrap()("Answer: 42 because math").unwrap(), ["42", "math"]);
        assert!(g.parser().unwrap()("no idea").is_err());

        let j = stage("json_fields = ['answer', 'steps']");
        let parsed = j.parser().unwrap()("```json\n{\"answer\": \"7\", \"steps\": [1, 2]}\n```").unwrap();
        assert_eq!(parsed, ["7", "[1,2]"]);
        assert_eq!(j.parser().unwrap()("{\"answer\": 1}").unwrap_err(), "the JSON reply has no field `steps`");

        assert_eq!(stage("").parser().unwrap()("free text").unwrap(), ["free text"]);
        assert!(stage("regex = '(unnamed)'").parser().is_err());
    }
}
