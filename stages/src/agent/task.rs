//! What the agent is asked: a question about one table of one data file, and, in a rescue round,
//! a critique that only the teacher sees.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::Trajectory;
use crate::families::{Question, Row};

/// What a trajectory says about its question (the columns it carries from its input).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct About {
    /// The question, as asked.
    pub question: String,
    /// Its task category (a taxonomy key), which selects the procedural knowledge.
    pub category: Option<String>,
    /// The data file, relative to the pipeline file.
    pub path: String,
    /// `csv`, `xlsx`, `sqlite`...
    pub format: String,
    /// The table (sheet, SQLite table) the question is about.
    pub table: String,
    /// The known answer, when the question came with one.
    pub gold_answer: Option<String>,
    /// How hard it is (composition depth; 1 for single questions).
    pub difficulty: Option<u32>,
}

/// One question for the agent.
#[derive(Debug, Clone)]
pub struct Task {
    /// The question row's id: every trajectory of the task descends from it.
    pub parent: String,
    /// The question and its data.
    pub about: About,
    /// The parameters the question was generated with (`programmatic`), for the scripted teacher.
    pub params: serde_json::Value,
    /// The query that computes the gold answer (`programmatic`), for the scripted teacher.
    pub query: Option<String>,
    /// A rescue round and the judge's critique of the earlier answers: sent to the teacher with
    /// the question, never kept in the trajectory (the model trained on it never gets one).
    pub critique: Option<(u32, String)>,
    /// Further data files beside `about.path` (a benchmark item over several files), relative
    /// to the pipeline file: shown read-only under `data/` too.
    pub more_files: Vec<String>,
    /// The answer is a table: the CSV file the final answer names is kept as the result (as
    /// for every SQL task), for a benchmark item graded on its result table.
    pub table_answer: bool,
    /// The categories whose procedures the teacher reads (a composed question's chain, else its
    /// category).
    pub categories: Vec<String>,
}

impl Task {
    /// The task of a question row (`programmatic`, `synthesize`, `compose` or `load` columns).
    pub fn from_question(row: Row<Question>) -> Self {
        let q = row.data;
        let categories = match q.chain_categories {
            Some(chain) if !chain.is_empty() => chain,
            _ => q.category.iter().cloned().collect(),
        };
        let format = q.format.unwrap_or_else(|| {
            crate::profile::readers::Format::of(Path::new(&q.path)).map(|f| f.name().to_string()).unwrap_or_default()
        });
        Task {
            parent: row.row_id,
            about: About {
                question: q.question,
                category: q.category,
                path: q.path,
                format,
                table: q.table,
                gold_answer: q.answer,
                difficulty: q.difficulty,
            },
            params: q.params.and_then(|p| serde_json::from_str(&p).ok()).unwrap_or_default(),
            query: q.query,
            critique: None,
            more_files: Vec::new(),
            table_answer: false,
            categories,
        }
    }

    /// The question trajectory `t` answered, to sample it again after `critique`.
    pub fn again(t: &Trajectory, round: u32, critique: &str) -> Self {
        Task {
            parent: t.parent_ids.first().cloned().unwrap_or_else(|| t.row_id.clone()),
            about: t.about.clone(),
            params: serde_json::Value::Null,
            query: None,
            critique: Some((round, critique.to_string())),
            more_files: Vec::new(),
            table_answer: false,
            categories: t.about.category.iter().cloned().collect(),
        }
    }

    /// True for SQLite tasks (SQL tools instead of the file; the answer names a result CSV).
    pub fn is_sql(&self) -> bool {
        self.about.format == "sqlite"
    }

    /// The data file's name inside the sandbox.
    pub fn file_name(&self) -> String {
        file_name(&self.about.path)
    }

    /// The user message a trajectory keeps: the question and where its data is.
    pub fn prompt(&self) -> String {
        let name = self.file_name();
        let mut data = match self.about.format.as_str() {
            "sqlite" if self.about.table.is_empty() => {
                format!("The SQLite database `{name}`: use get_db_info() and execute_sql().")
            }
            "sqlite" => {
                format!(
                    "The SQLite database `{name}`, table `{}`: use get_db_info() and execute_sql().",
                    self.about.table
                )
            }
            "xlsx" => format!("`data/{name}` (Excel workbook), sheet `{}`.", self.about.table),
            other => format!("`data/{name}` ({}).", other.to_uppercase()),
        };
        let more: Vec<String> = self.more_files.iter().map(|f| format!("`data/{}`", file_name(f))).collect();
        if !more.is_empty() {
            data.push_str(&format!(" Also: {}.", more.join(", ")));
        }
        format!("{}\n\nData: {data}", self.about.question)
    }

    /// The user message the teacher reads: [`Task::prompt`], with the critique of a rescue round.
    pub fn teacher_prompt(&self) -> String {
        let mut prompt = self.prompt();
        if let Some((_, critique)) = &self.critique {
            prompt.push_str(&format!(
                "\n\nEarlier attempts at this question gave answers that did not agree. A reviewer said: {critique}\nSolve it again carefully, checking each step against the data."
            ));
        }
        prompt
    }
}

/// The name a data file has inside the sandbox.
pub fn file_name(path: &str) -> String {
    Path::new(path).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "data".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_critique_reaches_the_teacher_only() {
        let row = serde_json::json!({
            "row_id": "q1", "question": "How many?", "path": "data/a.csv", "format": "csv", "table": "a",
        });
        let question = Task::from_question(serde_json::from_value(row).unwrap());
        let t = Trajectory::opening("t1".into(), "q1".into(), question.about, 0, "m".into(), Vec::new());
        let task = Task::again(&t, 1, "the counts differ");
        assert_eq!(task.parent, "q1", "a rescue answers the original question");
        assert_eq!(task.prompt(), "How many?\n\nData: `data/a.csv` (CSV).");
        assert!(task.teacher_prompt().starts_with(&task.prompt()));
        assert!(task.teacher_prompt().contains("A reviewer said: the counts differ"));
    }
}
