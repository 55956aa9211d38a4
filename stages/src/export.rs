//! `export`: writes its input's rows to files that training tools read unchanged.
//!
//! - `jsonl`: one JSON object per row, columns in order, lineage included.
//! - `sharegpt` (RECIPE section 7): a JSON array of LLaMA-Factory "sharegpt" records
//!   `{"messages": [{"role", "content"}…], "row_id", "parent_ids"}` (system, user, then
//!   assistant and `<interpreter>` user turns, ending with the assistant's answer), and the
//!   entry LLaMA-Factory needs to load it by name, merged into `dataset_info.json` beside it.
//! - `rl`: Parquet, one row per question: the prompt messages (system and user), the gold
//!   answer, for SQL tasks the path of the gold result CSV (written beside the file), the data
//!   files and table, category and difficulty, and the expert trajectory for the SFT term;
//!   beside them verl's columns: `data_source` (`kiln/<file stem>` unless set), `prompt`,
//!   `ability` (`data_analysis`), `reward_model {style, ground_truth}` (style `answer` with the
//!   gold answer, or `result_csv` with the gold CSV's text) and `extra_info {index,
//!   question_id, table, category, difficulty}`.
//!
//! The exported system prompt is the one the model gets at inference: the teacher's, with the
//! procedural knowledge of the question's categories, only with `keep_procedure = true`
//! (a model trained on hints it never gets at inference learns to lean on them).
//!
//! Every exported record keeps a `row_id` and `parent_ids`, so it traces back through the
//! rejection ledger and the datasets to its question and source file. Files are written under
//! a temporary name and renamed into place, so a reader never sees half a file. The stage's own
//! dataset has one row describing the export (path, rows, bytes, BLAKE3 of the file).
//!
//! ```toml
//! [stages.sft]
//! kind = "export"
//! inputs = ["judged"]
//! format = "sharegpt"
//! path = "sft/quickstart.json"        # relative to the output folder
//! dataset_name = "kiln_quickstart"    # the dataset_info.json key; default: the file stem
//! ```

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use datafusion::parquet::arrow::ArrowWriter;
use kiln_pipeline::rows::{lineage_fields, row_id, schema_with_lineage, to_batch};
use kiln_pipeline::stage::{CheckCx, Input, InputSchema, Output, Plain, Problem, Stage, StageCx};
use kiln_pipeline::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::families::{Row, TRAJECTORY, Turns, with_teacher_system};
use crate::paths::output_file_problem;

/// The file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// One JSON object per row.
    Jsonl,
    /// LLaMA-Factory sharegpt JSON and its `dataset_info.json` entry.
    Sharegpt,
    /// Parquet, one row per question, for RL.
    Rl,
}

/// Parameters of an `export` stage.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Export {
    /// The file to write, relative to the pipeline's output folder. Required.
    pub path: String,
    /// `jsonl`, `sharegpt` or `rl`. Default: `jsonl`.
    #[serde(default = "default_format")]
    pub format: Format,
    /// The name LLaMA-Factory loads a sharegpt export by. Default: the file stem.
    #[serde(default)]
    pub dataset_name: Option<String>,
    /// Export the system prompt the teacher read, with its category procedures, instead of the
    /// one the model gets at inference. Default: false (train as the model will be asked).
    #[serde(default)]
    pub keep_procedure: bool,
    /// `data_source` of the RL export's verl columns. Default: `kiln/<file stem>`.
    #[serde(default)]
    pub data_source: Option<String>,
}

fn default_format() -> Format {
    Format::Jsonl
}

/// Columns each format reads.
fn required(format: Format) -> &'static [&'static str] {
    match format {
        Format::Jsonl => &[],
        Format::Sharegpt => &["messages"],
        Format::Rl => &["messages", "question", "gold_answer", "path", "format", "sample"],
    }
}

#[derive(Debug, Serialize)]
struct Exported {
    row_id: String,
    parent_ids: Vec<String>,
    path: String,
    format: String,
    rows: u64,
    bytes: u64,
    blake3: String,
}

fn schema() -> SchemaRef {
    let text = |n: &str| Field::new(n, DataType::Utf8, false);
    schema_with_lineage(vec![
        text("path"),
        text("format"),
        Field::new("rows", DataType::UInt64, false),
        Field::new("bytes", DataType::UInt64, false),
        text("blake3"),
    ])
}

/// The RL export's schema.
pub(crate) fn rl_schema() -> SchemaRef {
    let text = |n: &str| Field::new(n, DataType::Utf8, false);
    let maybe = |n: &str| Field::new(n, DataType::Utf8, true);
    let messages = |n: &str| {
        let item = Fields::from(vec![text("role"), text("content")]);
        Field::new(n, DataType::List(Arc::new(Field::new("item", DataType::Struct(item), false))), false)
    };
    let mut fields: Vec<Field> = lineage_fields().into();
    let reward_model = Fields::from(vec![text("style"), text("ground_truth")]);
    let extra_info = Fields::from(vec![
        Field::new("index", DataType::UInt64, false),
        text("question_id"),
        maybe("table"),
        maybe("category"),
        Field::new("difficulty", DataType::UInt32, true),
    ]);
    fields.extend([
        text("data_source"),
        messages("prompt"),
        text("ability"),
        Field::new("reward_model", DataType::Struct(reward_model), false),
        Field::new("extra_info", DataType::Struct(extra_info), false),
        text("question"),
        maybe("gold_answer"),
        maybe("gold_result_csv"),
        Field::new("data_files", DataType::List(Arc::new(Field::new("item", DataType::Utf8, false))), false),
        maybe("table"),
        maybe("category"),
        Field::new("difficulty", DataType::UInt32, true),
        messages("expert_trajectory"),
    ]);
    Arc::new(Schema::new(fields))
}

/// Writes `target` through a temporary file renamed into place (creating its folder), so a
/// reader never sees half a file.
pub(crate) fn write_atomic(
    target: &Path,
    write: impl FnOnce(&mut (dyn Write + Send)) -> std::io::Result<()>,
) -> Result<()> {
    let io = |e: std::io::Error| Error::io(target, e);
    if let Some(dir) = target.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let tmp = target.with_extension(format!("tmp-{}", std::process::id()));
    {
        let mut file = std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(io)?);
        write(&mut file).map_err(io)?;
        file.flush().map_err(io)?;
    }
    std::fs::rename(&tmp, target).map_err(io)
}

/// The columns of a (judged) trajectory the `rl` export reads: the first sample of each
/// question is its expert trajectory.
#[derive(Debug, Deserialize)]
struct Expert {
    question: String,
    gold_answer: Option<String>,
    path: String,
    table: Option<String>,
    sample: u32,
    messages: Vec<kiln_llm::Message>,
    result_csv: Option<String>,
    category: Option<String>,
    difficulty: Option<u32>,
    #[serde(default)]
    teacher_system: Option<String>,
}

fn other(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

impl Export {
    fn dataset_name(&self) -> String {
        self.dataset_name.clone().unwrap_or_else(|| {
            Path::new(&self.path).file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "kiln".into())
        })
    }

    /// The sharegpt file and its `dataset_info.json` entry.
    fn sharegpt(&self, target: &Path, rows: &[Row<Turns>]) -> Result<()> {
        let records: Vec<Value> = rows
            .iter()
            .map(|r| {
                json!({"messages": r.data.exported(self.keep_procedure), "row_id": r.row_id, "parent_ids": r.parent_ids})
            })
            .collect();
        write_atomic(target, |w| serde_json::to_writer_pretty(&mut *w, &records).map_err(other))?;
        let info_path = target.with_file_name("dataset_info.json");
        let mut info: Map<String, Value> =
            std::fs::read(&info_path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
        let file_name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        info.insert(
            self.dataset_name(),
            json!({
                "file_name": file_name,
                "formatting": "sharegpt",
                "columns": {"messages": "messages"},
                "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant", "system_tag": "system"}
            }),
        );
        write_atomic(&info_path, |w| serde_json::to_writer_pretty(&mut *w, &info).map_err(other))
    }

    /// The RL Parquet file (and the gold result CSVs of SQL tasks, beside it).
    fn rl(&self, target: &Path, rows: &[Row<Expert>]) -> Result<u64> {
        let mut questions: BTreeMap<String, Vec<&Row<Expert>>> = BTreeMap::new();
        for r in rows {
            let question = r.parent_ids.first().cloned().unwrap_or_default();
            questions.entry(question).or_default().push(r);
        }
        let results_dir = target.with_extension("results");
        let data_source = self.data_source.clone().unwrap_or_else(|| format!("kiln/{}", self.dataset_name()));
        let mut out = Vec::new();
        for (question_id, mut group) in questions {
            group.sort_by_key(|r| r.data.sample);
            let expert = &group[0].data;
            let system = expert.teacher_system.as_deref().filter(|_| self.keep_procedure);
            let messages = &with_teacher_system(&expert.messages, system);
            let gold_csv = match &expert.result_csv {
                Some(csv) => {
                    let file = results_dir.join(format!("{question_id}.csv"));
                    write_atomic(&file, |w| w.write_all(csv.as_bytes()))?;
                    let relative = file.strip_prefix(target.parent().unwrap_or(Path::new(""))).unwrap_or(&file);
                    Some(relative.to_string_lossy().into_owned())
                }
                None => None,
            };
            let prompt: Vec<_> = messages.iter().take(2).collect();
            let ground_truth = expert.result_csv.as_ref().or(expert.gold_answer.as_ref()).cloned().unwrap_or_default();
            out.push(json!({
                "data_source": data_source,
                "ability": "data_analysis",
                "reward_model": {"style": if gold_csv.is_some() { "result_csv" } else { "answer" }, "ground_truth": ground_truth},
                "extra_info": {"index": out.len() as u64, "question_id": question_id, "table": expert.table, "category": expert.category, "difficulty": expert.difficulty},
                "row_id": row_id(&[&question_id], b"rl"),
                "parent_ids": group.iter().map(|r| r.row_id.clone()).collect::<Vec<_>>(),
                "prompt": prompt,
                "question": expert.question,
                "gold_answer": expert.gold_answer,
                "gold_result_csv": gold_csv,
                "data_files": [expert.path],
                "table": expert.table,
                "category": expert.category,
                "difficulty": expert.difficulty,
                "expert_trajectory": messages,
            }));
        }
        let batch: RecordBatch = to_batch(&rl_schema(), &out)?;
        write_atomic(target, |w| {
            let mut writer = ArrowWriter::try_new(w, batch.schema(), None).map_err(other)?;
            writer.write(&batch).map_err(other)?;
            writer.close().map(|_| ()).map_err(other)
        })?;
        Ok(out.len() as u64)
    }
}

impl Plain for Export {
    fn problems(&self, cx: &CheckCx) -> Vec<Problem> {
        let mut problems: Vec<Problem> = output_file_problem(cx, "path", &self.path).into_iter().collect();
        if self.dataset_name.is_some() && self.format != Format::Sharegpt {
            problems.push(
                Problem::new("dataset_name", "`dataset_name` names a sharegpt export")
                    .help("remove it, or set `format = \"sharegpt\"`"),
            );
        }
        if self.keep_procedure && self.format == Format::Jsonl {
            problems.push(
                Problem::new("keep_procedure", "`keep_procedure` applies to sharegpt and rl exports")
                    .help("remove it: a jsonl export writes every column as it is, `teacher_system` included"),
            );
        }
        if self.data_source.is_some() && self.format != Format::Rl {
            problems.push(
                Problem::new("data_source", "`data_source` names the RL export's data source (verl's column)")
                    .help("remove it, or set `format = \"rl\"`"),
            );
        }
        problems
    }
}

#[async_trait]
impl Stage for Export {
    async fn output_schema(&self, _cx: &CheckCx, inputs: &[InputSchema]) -> Result<SchemaRef, Vec<Problem>> {
        let [input] = inputs else {
            return Err(vec![Problem::new(
                "inputs",
                format!("an `export` stage writes exactly one stage, got {} inputs", inputs.len()),
            )]);
        };
        let missing: Vec<&str> =
            required(self.format).iter().filter(|c| input.schema.field_with_name(c).is_err()).copied().collect();
        if !missing.is_empty() {
            return Err(vec![
                Problem::new(
                    "format",
                    format!(
                        "a {:?} export needs the columns {}, which `{}` lacks",
                        self.format,
                        missing.join(", "),
                        input.name
                    ),
                )
                .help(
                    "export trajectories (after the filters and the judge) in this format, or use `format = \"jsonl\"`",
                ),
            ]);
        }
        Ok(schema())
    }

    async fn run(&self, cx: &StageCx, inputs: &[Input]) -> Result<Output> {
        let target: PathBuf = cx.pipeline.output_dir.join(&self.path);
        let rows_written = match self.format {
            // JSON lines stream: one input batch at a time.
            Format::Jsonl => {
                let mut rows = 0;
                write_atomic(&target, |w| {
                    let mut writer = arrow::json::LineDelimitedWriter::new(w);
                    for b in inputs[0].batches().map_err(other)? {
                        let b = b.map_err(other)?;
                        rows += b.num_rows() as u64;
                        writer.write(&b).map_err(other)?;
                    }
                    writer.finish().map_err(other)
                })?;
                rows
            }
            Format::Sharegpt => {
                let batches = inputs[0].read()?;
                self.sharegpt(&target, &TRAJECTORY.rows(&inputs[0].name, &batches)?)?;
                batches.iter().map(|b| b.num_rows() as u64).sum()
            }
            Format::Rl => self.rl(&target, &TRAJECTORY.rows(&inputs[0].name, &inputs[0].read()?)?)?,
        };
        cx.wrote(&target);
        let file = std::fs::File::open(&target).map_err(|e| Error::io(&target, e))?;
        let mut hasher = blake3::Hasher::new();
        hasher.update_reader(file).map_err(|e| Error::io(&target, e))?;
        let (hash, bytes) = (hasher.finalize().to_hex().to_string(), hasher.count());
        let format =
            serde_json::to_value(self.format).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
        let row = Exported {
            row_id: row_id(&[], format!("export\0{}\0{hash}", self.path).as_bytes()),
            parent_ids: Vec::new(),
            path: self.path.clone(),
            format,
            rows: rows_written,
            bytes,
            blake3: hash,
        };
        Ok(Output { batches: vec![to_batch(&schema(), &[row])?], ..Default::default() })
    }
}
