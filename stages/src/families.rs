//! Typed row families: the columns that one kind writes and others read, defined once.
//!
//! A [`Family`] names its columns and their Arrow types. Producers build their schemas from
//! [`Family::fields`]; consumers check their input with [`Family::check`], so a missing or
//! retyped column is a `kiln check` error at the consumer's `inputs`, naming the family, the
//! column and the stage (and kind) that produced the input, before anything runs.
//!
//! - [`QUESTION`]: a question about one table of one data file (`programmatic`, `synthesize`,
//!   `compose`, or questions brought with `load`).
//! - [`TRAJECTORY`]: one agent run ([`crate::agent::Trajectory`]), from `trajectories`, and
//!   unchanged through the filters and the judge.
//! - [`PROFILED_TABLE`]: one table of a data file with its metadata, from `profile`.
//! - [`VERDICT`]: a judged trajectory: the [`TRAJECTORY`] columns, the gold answer the judge
//!   settled on, and its verdict and reasoning, from `judge`.
//!
//! [`Family::read`] reads an input's rows as a typed struct of the family: [`Row`] of a view
//! that names the columns a consumer reads ([`Question`], [`Turns`]), or a whole record
//! ([`crate::agent::Trajectory`], [`Judged`]). No kind reads another kind's rows by string keys.

use arrow::datatypes::{DataType, Field, SchemaRef};
use arrow::record_batch::RecordBatch;
use kiln_llm::Message;
use kiln_pipeline::stage::{Input, InputSchema, Problem};
use kiln_pipeline::{Error, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::agent::Trajectory;

/// A family of rows: its name, its columns, and which kinds write it.
#[derive(Debug, Clone, Copy)]
pub struct Family {
    /// What the rows are, in messages.
    pub name: &'static str,
    /// The columns (lineage columns aside), in order.
    columns: fn() -> Vec<Field>,
    /// The kinds that write it, in hints.
    producers: &'static str,
}

/// Questions: what the agent loop is asked.
pub const QUESTION: Family = Family {
    name: "Question",
    columns: question_fields,
    producers: "`programmatic`, `synthesize` or `compose` (or a `load` of questions with these columns)",
};

/// Trajectories: one agent run each.
pub const TRAJECTORY: Family = Family {
    name: "Trajectory",
    columns: trajectory_fields,
    producers: "a `trajectories` stage (or a filter or `judge` after it)",
};

/// Profiled tables: the metadata prompts and question generators use.
pub const PROFILED_TABLE: Family = Family {
    name: "ProfiledTable",
    columns: profiled_table_fields,
    producers: "a `profile` stage (or a `sql` stage that keeps its columns, `SELECT *`)",
};

/// Judged trajectories: what the judge keeps, with its verdict.
pub const VERDICT: Family =
    Family { name: "Verdict", columns: verdict_fields, producers: "a `judge` stage (or a filter after it)" };

/// A row as a consumer reads it: its lineage, and the columns `T` names.
#[derive(Debug, Clone, Deserialize)]
pub struct Row<T> {
    /// The row's id.
    pub row_id: String,
    /// The ids of the rows it came from.
    #[serde(default)]
    pub parent_ids: Vec<String>,
    /// The columns read.
    #[serde(flatten)]
    pub data: T,
}

/// A [`QUESTION`] row, with the optional columns some producers add.
#[derive(Debug, Clone, Deserialize)]
pub struct Question {
    /// The question, as asked.
    pub question: String,
    /// Its task category (a taxonomy key).
    #[serde(default)]
    pub category: Option<String>,
    /// The data file, relative to the pipeline file.
    pub path: String,
    /// `csv`, `xlsx`, `sqlite`...
    #[serde(default)]
    pub format: Option<String>,
    /// The table (sheet, SQLite table) it is about.
    pub table: String,
    /// How hard it is (composition depth; 1 for single questions).
    #[serde(default)]
    pub difficulty: Option<u32>,
    /// The known answer (`programmatic`, or labelled questions brought with `load`, where a
    /// number or a boolean is read as its text).
    #[serde(default, deserialize_with = "scalar_text")]
    pub answer: Option<String>,
    /// The generator's parameters as JSON (`programmatic`), for the scripted teacher.
    #[serde(default)]
    pub params: Option<String>,
    /// The SQL that computes the answer (`programmatic`), for the scripted teacher.
    #[serde(default)]
    pub query: Option<String>,
    /// The categories a composed question chains, in order (`compose`).
    #[serde(default)]
    pub chain_categories: Option<Vec<String>>,
}

/// Text, or a number or boolean as its text.
fn scalar_text<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Option<String>, D::Error> {
    Ok(match Option::<serde_json::Value>::deserialize(d)? {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(s)) => Some(s),
        Some(other) => Some(other.to_string()),
    })
}

/// The conversation of a [`TRAJECTORY`] row, as the filters, the card and the exports read it.
#[derive(Debug, Clone, Deserialize)]
pub struct Turns {
    /// The question (the first user message holds it too).
    #[serde(default)]
    pub question: Option<String>,
    /// System, user, then assistant turns each answered by an `<interpreter>` user turn.
    pub messages: Vec<Message>,
    /// The content of the `<answer>`, if the agent gave one.
    #[serde(default)]
    pub final_answer: Option<String>,
    /// How the run ended.
    #[serde(default)]
    pub end_reason: Option<String>,
    /// The system prompt the teacher read, when it held the procedures the kept one lacks.
    #[serde(default)]
    pub teacher_system: Option<String>,
}

impl Turns {
    /// The conversation to export: as kept (the system prompt the model gets at inference), or
    /// with the teacher's system prompt and its procedures when `keep_procedure`.
    pub fn exported(&self, keep_procedure: bool) -> Vec<Message> {
        with_teacher_system(&self.messages, self.teacher_system.as_deref().filter(|_| keep_procedure))
    }
}

/// `messages` with its system prompt replaced by `system`, if any.
pub fn with_teacher_system(messages: &[Message], system: Option<&str>) -> Vec<Message> {
    let mut messages = messages.to_vec();
    if let (Some(system), Some(first)) = (system, messages.first_mut().filter(|m| m.role == "system")) {
        first.content = system.to_string();
    }
    messages
}

/// A [`VERDICT`] row: a trajectory the judge kept, with the gold answer it settled on (in the
/// trajectory's `gold_answer`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Judged {
    /// The trajectory.
    #[serde(flatten)]
    pub trajectory: Trajectory,
    /// `gold_match`, `consistent` or `rescued`.
    pub judge_verdict: String,
    /// The judge model's reasoning, when a model judged.
    pub judge_reasoning: Option<String>,
}

/// The Arrow schema of [`Judged`] rows.
pub fn verdict_schema() -> SchemaRef {
    kiln_pipeline::rows::schema_with_lineage(verdict_fields())
}

fn verdict_fields() -> Vec<Field> {
    let mut fields = trajectory_fields();
    fields.push(Field::new("judge_verdict", DataType::Utf8, false));
    fields.push(Field::new("judge_reasoning", DataType::Utf8, true));
    fields
}

fn profiled_table_fields() -> Vec<Field> {
    let schema = crate::profile::schema();
    let lineage = kiln_pipeline::rows::lineage_fields().len();
    schema.fields().iter().skip(lineage).map(|f| f.as_ref().clone()).collect()
}

fn question_fields() -> Vec<Field> {
    let text = |name: &str| Field::new(name, DataType::Utf8, false);
    vec![
        text("question"),
        Field::new("category", DataType::Utf8, true),
        text("path"),
        text("format"),
        text("table"),
        Field::new("difficulty", DataType::UInt32, false),
    ]
}

fn trajectory_fields() -> Vec<Field> {
    let schema = crate::agent::schema();
    let lineage = kiln_pipeline::rows::lineage_fields().len();
    schema.fields().iter().skip(lineage).map(|f| f.as_ref().clone()).collect()
}

impl Family {
    /// The family's columns, for a producer's schema.
    pub fn fields(&self) -> Vec<Field> {
        (self.columns)()
    }

    /// Every row of `input` as a `T`, a struct of some of the family's columns (and lineage).
    pub fn read<T: DeserializeOwned>(&self, input: &Input) -> Result<Vec<T>> {
        self.rows(&input.name, &input.read()?)
    }

    /// The rows of `batches` (from stage `stage`) as `T`s.
    pub fn rows<T: DeserializeOwned>(&self, stage: &str, batches: &[RecordBatch]) -> Result<Vec<T>> {
        kiln_pipeline::rows::to_json_rows(batches)?
            .into_iter()
            .enumerate()
            .map(|(i, row)| {
                serde_json::from_value(serde_json::Value::Object(row)).map_err(|source| {
                    Error::stage(stage, crate::StageError::Row { row: i + 1, family: self.name, source })
                })
            })
            .collect()
    }

    /// Checks that `input` has the family's columns `needed` (every column when empty), of the
    /// family's types.
    pub fn check(&self, input: &InputSchema, needed: &[&str]) -> Result<(), Problem> {
        let fields = self.fields();
        debug_assert!(
            needed.iter().all(|n| fields.iter().any(|f| f.name() == n)),
            "{needed:?} are not all {} columns",
            self.name
        );
        let wanted: Vec<&Field> =
            fields.iter().filter(|f| needed.is_empty() || needed.contains(&f.name().as_str())).collect();
        let from = match input.kind.as_str() {
            "" => format!("`{}`", input.name),
            kind => format!("`{}` ({kind})", input.name),
        };
        let missing: Vec<&str> = wanted
            .iter()
            .filter(|f| input.schema.field_with_name(f.name()).is_err())
            .map(|f| f.name().as_str())
            .collect();
        if !missing.is_empty() {
            return Err(Problem::new(
                "inputs",
                format!("{from} lacks the {} columns {}", self.name, missing.join(", ")),
            )
            .help(format!("{} rows come from {}", self.name, self.producers)));
        }
        for field in wanted {
            let got = input.schema.field_with_name(field.name()).ok().map(|f| f.data_type().clone());
            if let Some(got) = got.filter(|t| class(t) != class(field.data_type())) {
                return Err(Problem::new(
                    "inputs",
                    format!(
                        "{from} has `{}` as {got}, but the {} column is {}",
                        field.name(),
                        self.name,
                        field.data_type()
                    ),
                )
                .help(format!("{} rows come from {}", self.name, self.producers)));
            }
        }
        Ok(())
    }
}

/// What a column holds, as readers see it: text of any encoding, integers of any width, and
/// lists of any offset size are alike (SQL stages and `load` choose among them).
fn class(t: &DataType) -> String {
    match t {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => "text".into(),
        t if t.is_integer() => "integer".into(),
        t if t.is_floating() => "float".into(),
        DataType::List(f) | DataType::LargeList(f) | DataType::ListView(f) | DataType::LargeListView(f) => {
            format!("list of {}", class(f.data_type()))
        }
        DataType::Struct(fields) => {
            let inner: Vec<String> = fields.iter().map(|f| format!("{}: {}", f.name(), class(f.data_type()))).collect();
            format!("struct {{{}}}", inner.join(", "))
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn input(fields: Vec<Field>) -> InputSchema {
        InputSchema { name: "up".into(), kind: "sql".into(), schema: Arc::new(arrow::datatypes::Schema::new(fields)) }
    }

    #[test]
    fn a_missing_column_names_the_family_the_column_and_the_producer() {
        let mut fields = QUESTION.fields();
        fields.retain(|f| f.name() != "format");
        let problem = QUESTION.check(&input(fields), &[]).unwrap_err();
        assert_eq!(problem.message, "`up` (sql) lacks the Question columns format");
        assert!(QUESTION.check(&input(QUESTION.fields()), &[]).is_ok());
        assert!(QUESTION.check(&input(vec![Field::new("question", DataType::Utf8, true)]), &["question"]).is_ok());
    }

    #[test]
    fn a_retyped_column_is_refused() {
        let mut fields = QUESTION.fields();
        fields[5] = Field::new("difficulty", DataType::Utf8, false);
        let problem = QUESTION.check(&input(fields), &[]).unwrap_err();
        assert_eq!(problem.message, "`up` (sql) has `difficulty` as Utf8, but the Question column is UInt32");
    }

    #[test]
    fn encodings_and_widths_of_one_kind_are_alike() {
        let mut fields = QUESTION.fields();
        fields[0] = Field::new("question", DataType::Utf8View, true);
        fields[5] = Field::new("difficulty", DataType::Int64, true);
        assert!(QUESTION.check(&input(fields), &[]).is_ok());
    }

    #[test]
    fn the_trajectory_family_is_the_agent_record() {
        let names: Vec<String> = TRAJECTORY.fields().iter().map(|f| f.name().clone()).collect();
        assert_eq!(names[0], "question");
        assert!(names.contains(&"messages".to_string()) && names.contains(&"result_csv".to_string()));
    }

    #[test]
    fn typed_rows_round_trip_through_arrow() {
        let about = crate::agent::About {
            question: "How many rows?".into(),
            category: None,
            path: "data/a.csv".into(),
            format: "csv".into(),
            table: "a".into(),
            gold_answer: Some("3".into()),
            difficulty: Some(1),
        };
        let judged = Judged {
            trajectory: Trajectory {
                final_answer: Some("3".into()),
                end_reason: "answer".into(),
                turns: 1,
                ..Trajectory::opening(
                    "t1".into(),
                    "q1".into(),
                    about,
                    0,
                    "scripted".into(),
                    vec![Message::new("system", "s"), Message::new("user", "How many rows?")],
                )
            },
            judge_verdict: "gold_match".into(),
            judge_reasoning: None,
        };
        let batches = [kiln_pipeline::rows::to_batch(&verdict_schema(), std::slice::from_ref(&judged)).unwrap()];
        assert_eq!(VERDICT.rows::<Judged>("judged", &batches).unwrap(), vec![judged]);
        let turns: Vec<Row<Turns>> = TRAJECTORY.rows("judged", &batches).unwrap();
        assert_eq!((turns[0].row_id.as_str(), turns[0].data.messages.len()), ("t1", 2));
        assert_eq!(turns[0].data.end_reason.as_deref(), Some("answer"));
        assert!(
            VERDICT
                .check(&InputSchema { name: "j".into(), kind: "judge".into(), schema: verdict_schema() }, &[])
                .is_ok()
        );
    }

    #[test]
    fn a_labelled_question_may_hold_a_numeric_answer() {
        let row =
            serde_json::json!({"row_id": "q", "question": "How many?", "path": "a.csv", "table": "a", "answer": 42});
        let q: Row<Question> = serde_json::from_value(row).unwrap();
        assert_eq!(q.data.answer.as_deref(), Some("42"));
        let none: Row<Question> =
            serde_json::from_value(serde_json::json!({"row_id": "q", "question": "?", "path": "a", "table": "a"}))
                .unwrap();
        assert_eq!(none.data.answer, None);
    }
}
