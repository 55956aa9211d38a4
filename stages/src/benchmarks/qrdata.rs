//! QRData.

use std::path::Path;

use serde::Deserialize;

use super::{Item, data_file, id_text, json_file};
use crate::StageError;
use crate::graders::{Gold, options};

#[derive(Deserialize)]
struct QrdataItem {
    #[serde(default)]
    data_description: String,
    question: String,
    answer: serde_json::Value,
    data_files: Vec<String>,
    meta_data: QrdataMeta,
    #[serde(default)]
    qrdata_index: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct QrdataMeta {
    question_type: String,
}

pub(super) fn load(dir: &Path) -> Result<Vec<Item>, StageError> {
    let path = dir.join("QRData.json");
    let items: Vec<QrdataItem> = json_file(&path)?;
    items
        .into_iter()
        .enumerate()
        .map(|(i, q)| {
            let id = q.qrdata_index.as_ref().map(id_text).unwrap_or_else(|| i.to_string());
            let answer = id_text(&q.answer);
            let gold = match q.meta_data.question_type.as_str() {
                "numerical" => Gold::Value { value: answer, tolerance: 0.03 },
                "multiple_choice" => {
                    let letter = answer.trim().chars().next().filter(|c| c.is_ascii_uppercase()).ok_or_else(|| {
                        StageError::invalid(
                            &path,
                            format!("item {id}: a multiple-choice answer is a letter, got {answer:?}"),
                        )
                    })?;
                    Gold::Choice { letter, options: options(&q.question) }
                }
                other => {
                    return Err(StageError::invalid(
                        &path,
                        format!("item {id}: question_type {other:?} is neither numerical nor multiple_choice"),
                    ));
                }
            };
            let files =
                q.data_files.iter().map(|f| data_file(&dir.join("data"), f, &id, &path)).collect::<Result<_, _>>()?;
            let mut item = Item::new(id, q.question, files, gold, q.meta_data.question_type);
            item.context = Some(q.data_description).filter(|d| !d.is_empty());
            Ok(item)
        })
        .collect()
}
