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
use kiln_pipeline::stage::{Input, InputSchema, Output, Problem, Rejection, StageCx};
use kiln_pipeline::{Error, Result};

use crate::families::{Row, TRAJECTORY, Turns};

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

/// Keeps the rows of `input` that `decide` accepts, reading each as the conversation of a
/// trajectory ([`Turns`]); the others become rejections named `<kind>:<rule>`. Counters:
/// `kept`, and one `rejected_<rule>` per rule.
pub fn retain(
    cx: &StageCx,
    kind: &str,
    input: &Input,
    decide: impl Fn(&Turns) -> Result<(), Refusal>,
) -> Result<Output> {
    let batches = input.read()?;
    let rows: Vec<Row<Turns>> = TRAJECTORY.rows(&input.name, &batches)?;
    let decisions = rows.iter().map(|r| (r.row_id.clone(), decide(&r.data))).collect();
    keep_rows(cx, kind, batches, decisions)
}

/// Keeps the rows of `batches` whose decision (one per row, in order, with its row id) is
/// `Ok`, for stages that decide on other columns (`dedup`); the others become rejections named
/// `<kind>:<rule>`.
pub fn keep_rows(
    cx: &StageCx,
    kind: &str,
    batches: Vec<RecordBatch>,
    decisions: Vec<(String, Result<(), Refusal>)>,
) -> Result<Output> {
    let mut out = Output::default();
    let mut decisions = decisions.into_iter();
    for batch in batches {
        let mut keep = Vec::with_capacity(batch.num_rows());
        for (row_id, decision) in decisions.by_ref().take(batch.num_rows()) {
            match decision {
                Ok(()) => keep.push(true),
                Err((rule, detail)) => {
                    keep.push(false);
                    *out.counters.entry(format!("rejected_{rule}")).or_default() += 1;
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
