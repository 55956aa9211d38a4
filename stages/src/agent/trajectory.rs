//! The record of one agent run: what the agent was asked, every message, each turn's timing and
//! outcome, how it ended and what it cost. It is the row of the `trajectories` stage, and what
//! judge rescue, evaluation and RL rollouts get back from the agent loop.

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Fields, SchemaRef};
use kiln_llm::Message;
use kiln_pipeline::rows::schema_with_lineage;
use serde::{Deserialize, Serialize};

use super::task::About;

/// One turn's record.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Step {
    /// What the turn did: `code`, `answer` or `invalid`.
    pub action: String,
    /// For code turns, how the cell ended (`ok`, `error`, `timeout`, `killed`, `crashed`).
    pub status: Option<String>,
    /// Milliseconds waiting for the teacher.
    pub teacher_ms: f64,
    /// Milliseconds running the cell.
    pub exec_ms: f64,
    /// The observation was cut.
    pub truncated: bool,
}

/// One trajectory.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Trajectory {
    /// Stable id: derived from the question's id and the sample (and rescue round).
    pub row_id: String,
    /// The question's row id.
    pub parent_ids: Vec<String>,
    /// The question and its data.
    #[serde(flatten)]
    pub about: About,
    /// Which of the question's samples this is.
    pub sample: u32,
    /// The teacher: a `[models]` name, or `scripted`.
    pub teacher: String,
    /// System, user, then assistant turns each answered by an `<interpreter>` user turn.
    pub messages: Vec<Message>,
    /// The content of the `<answer>`, if the agent gave one.
    pub final_answer: Option<String>,
    /// `answer`, `max_turns` or `teacher_gave_up` (the scripted teacher after a failed cell).
    pub end_reason: String,
    /// Assistant turns taken.
    pub turns: u32,
    /// One record per assistant turn.
    pub steps: Vec<Step>,
    /// Workers that died or were killed during the trajectory (state was lost each time).
    pub worker_restarts: u32,
    /// Tokens the teacher read, over all turns.
    pub prompt_tokens: u64,
    /// Tokens the teacher wrote, over all turns.
    pub completion_tokens: u64,
    /// SQL tasks: the CSV the answer names, as written by `execute_sql`.
    pub result_csv: Option<String>,
    /// The system prompt the teacher read, when it held more than the kept one (the procedures
    /// of the question's categories); exports leave it out unless asked to keep it.
    #[serde(default)]
    pub teacher_system: Option<String>,
}

impl Trajectory {
    /// A trajectory about to run: its id, question, sample, teacher and opening messages; no
    /// turn taken yet, ending at the turn limit unless something else ends it.
    pub fn opening(
        row_id: String,
        parent: String,
        about: About,
        sample: u32,
        teacher: String,
        messages: Vec<Message>,
    ) -> Self {
        Trajectory {
            row_id,
            parent_ids: vec![parent],
            about,
            sample,
            teacher,
            messages,
            final_answer: None,
            end_reason: "max_turns".into(),
            turns: 0,
            steps: Vec::new(),
            worker_restarts: 0,
            prompt_tokens: 0,
            completion_tokens: 0,
            result_csv: None,
            teacher_system: None,
        }
    }
}

/// The Arrow schema of [`Trajectory`] rows.
pub fn schema() -> SchemaRef {
    let text = |name: &str| Field::new(name, DataType::Utf8, false);
    let maybe = |name: &str| Field::new(name, DataType::Utf8, true);
    let message = Fields::from(vec![text("role"), text("content")]);
    let step = Fields::from(vec![
        text("action"),
        maybe("status"),
        Field::new("teacher_ms", DataType::Float64, false),
        Field::new("exec_ms", DataType::Float64, false),
        Field::new("truncated", DataType::Boolean, false),
    ]);
    let list = |name: &str, item: Fields| {
        Field::new(name, DataType::List(Arc::new(Field::new("item", DataType::Struct(item), false))), false)
    };
    schema_with_lineage(vec![
        text("question"),
        maybe("category"),
        text("path"),
        text("format"),
        text("table"),
        maybe("gold_answer"),
        Field::new("difficulty", DataType::UInt32, true),
        Field::new("sample", DataType::UInt32, false),
        text("teacher"),
        list("messages", message),
        maybe("final_answer"),
        text("end_reason"),
        Field::new("turns", DataType::UInt32, false),
        list("steps", step),
        Field::new("worker_restarts", DataType::UInt32, false),
        Field::new("prompt_tokens", DataType::UInt64, false),
        Field::new("completion_tokens", DataType::UInt64, false),
        maybe("result_csv"),
        maybe("teacher_system"),
    ])
}
