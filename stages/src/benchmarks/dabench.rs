//! InfiAgent-DABench.

use std::collections::HashMap;
use std::path::Path;

use serde::Deserialize;

use super::{Item, data_file, id_text, json_lines};
use crate::StageError;
use crate::graders::Gold;

#[derive(Deserialize)]
struct DabenchQuestion {
    id: serde_json::Value,
    question: String,
    #[serde(default)]
    constraints: String,
    format: String,
    file_name: String,
    #[serde(default)]
    level: String,
}

#[derive(Deserialize)]
struct DabenchLabel {
    id: serde_json::Value,
    common_answers: Vec<(String, String)>,
}

pub(super) fn load(dir: &Path) -> Result<Vec<Item>, StageError> {
    let (questions_path, labels_path) = (dir.join("da-dev-questions.jsonl"), dir.join("da-dev-labels.jsonl"));
    let labels: HashMap<String, Vec<(String, String)>> = json_lines::<DabenchLabel>(&labels_path)?
        .into_iter()
        .map(|(_, l)| (id_text(&l.id), l.common_answers))
        .collect();
    let tables = dir.join("da-dev-tables");
    json_lines::<DabenchQuestion>(&questions_path)?
        .into_iter()
        .map(|(line, q)| {
            let id = id_text(&q.id);
            let label = labels.get(&id).ok_or_else(|| {
                StageError::invalid(&labels_path, format!("no label for item {id} (line {line} of the questions)"))
            })?;
            let mut question = q.question.trim().to_string();
            if !q.constraints.trim().is_empty() {
                question.push_str(&format!("\nConstraints: {}", q.constraints.trim()));
            }
            question.push_str(&format!("\nAnswer format: {}", q.format.trim()));
            let files = vec![data_file(&tables, &q.file_name, &id, &questions_path)?];
            Ok(Item::new(id, question, files, Gold::Named(label.clone()), q.level))
        })
        .collect()
}
