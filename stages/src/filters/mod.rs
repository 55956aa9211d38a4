//! The rule-based filters of RECIPE section 6, and what they share: each keeps the rows of its
//! input that pass, unchanged (same schema, same row ids), and sends every other row to the
//! rejection ledger with the rule that refused it and why.

pub mod format;
pub mod language;
pub mod length;
pub mod tokens;

use arrow::array::BooleanArray;
use arrow::compute::filter_record_batch;
use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use kiln_pipeline::rows::to_json_rows;
use kiln_pipeline::stage::{Input, InputSchema, Output, Problem, Rejection, StageCx};
use kiln_pipeline::{Error, Result};
use serde_json::{Map, Value};

/// One input row, as JSON.
pub type Row = Map<String, Value>;

/// Why a row is refused: the rule (`format:no_answer`...) and a detail naming the values.
pub type Refusal = (String, String);

/// The single input of a `kind` stage that reads exactly one.
pub fn single_input<'a>(kind: &str, inputs: &'a [InputSchema]) -> Result<&'a InputSchema, Vec<Problem>> {
    match inputs {
        [input] => Ok(input),
        _ => {
            Err(vec![Problem::new("inputs", format!("a `{kind}` stage reads exactly one stage, got {}", inputs.len()))])
        }
    }
}

/// The output schema of a filter: its single input's, which must have the `Trajectory` columns
/// `required`.
pub fn filter_schema(kind: &str, inputs: &[InputSchema], required: &[&str]) -> Result<SchemaRef, Vec<Problem>> {
    let input = single_input(kind, inputs)?;
    crate::families::TRAJECTORY.check(input, required).map_err(|p| vec![p])?;
    Ok(input.schema.clone())
}

/// Keeps the rows of `input` that `decide` accepts; the others become rejections named
/// `<kind>:<rule>`. Counters: `kept`, and one `rejected_<rule>` per rule.
pub fn retain(cx: &StageCx, kind: &str, input: &Input, decide: impl Fn(&Row) -> Result<(), Refusal>) -> Result<Output> {
    let batches = input.read()?;
    let rows = to_json_rows(&batches)?;
    retain_batches(cx, kind, batches, &rows, decide)
}

/// [`retain`] over batches already read, with `rows` their rows as JSON (in order), for stages
/// that look at every row before deciding.
pub fn retain_batches(
    cx: &StageCx,
    kind: &str,
    batches: Vec<RecordBatch>,
    rows: &[Row],
    decide: impl Fn(&Row) -> Result<(), Refusal>,
) -> Result<Output> {
    let mut out = Output::default();
    let mut offset = 0;
    for batch in batches {
        let rows = &rows[offset..offset + batch.num_rows()];
        offset += batch.num_rows();
        let mut keep = Vec::with_capacity(rows.len());
        for row in rows {
            match decide(row) {
                Ok(()) => keep.push(true),
                Err((rule, detail)) => {
                    keep.push(false);
                    *out.counters.entry(format!("rejected_{rule}")).or_default() += 1;
                    let row_id = row.get("row_id").and_then(Value::as_str).unwrap_or_default().to_string();
                    out.rejections.push(Rejection { row_id, reason: format!("{kind}:{rule}"), detail });
                }
            }
        }
        *out.counters.entry("kept".into()).or_default() += keep.iter().filter(|k| **k).count() as u64;
        let kept = filter_record_batch(&batch, &BooleanArray::from(keep)).map_err(|e| Error::stage(&cx.name, e))?;
        out.batches.push(kept);
    }
    Ok(out)
}

/// The messages of a trajectory row as (role, content).
pub fn messages(row: &Row) -> Vec<(&str, &str)> {
    row.get("messages")
        .and_then(Value::as_array)
        .map(|m| {
            m.iter()
                .map(|m| {
                    (
                        m.get("role").and_then(Value::as_str).unwrap_or(""),
                        m.get("content").and_then(Value::as_str).unwrap_or(""),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A text column of the row (empty when missing or null).
pub fn text<'a>(row: &'a Row, column: &str) -> &'a str {
    row.get(column).and_then(Value::as_str).unwrap_or("")
}
