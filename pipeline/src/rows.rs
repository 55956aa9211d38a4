//! Row identity and lineage, and typed rows to Arrow.
//!
//! Every dataset starts with two columns: `row_id`, a stable hash of the row's content and its
//! parents, and `parent_ids`, the ids of the upstream rows it came from. Following `parent_ids`
//! leads from any row back to the source file it was derived from.

use std::sync::Arc;

use arrow::array::{ArrayRef, ListArray, StringArray};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use serde::Serialize;

use crate::error::{Error, Result};

/// Name of the row id column.
pub const ROW_ID: &str = "row_id";
/// Name of the lineage column.
pub const PARENT_IDS: &str = "parent_ids";

/// A stable id from a row's parents and content: 32 hex digits of BLAKE3.
pub fn row_id(parents: &[&str], content: &[u8]) -> String {
    let mut h = blake3::Hasher::new();
    for p in parents {
        h.update(p.as_bytes());
        h.update(b"\0");
    }
    h.update(b"\x01");
    h.update(content);
    h.finalize().to_hex()[..32].to_string()
}

/// The two lineage columns every dataset starts with.
pub fn lineage_fields() -> [Field; 2] {
    [
        Field::new(ROW_ID, DataType::Utf8, false),
        Field::new(PARENT_IDS, DataType::List(Arc::new(Field::new("item", DataType::Utf8, true))), false),
    ]
}

/// A schema of the lineage columns followed by `fields`.
pub fn schema_with_lineage(fields: Vec<Field>) -> SchemaRef {
    Arc::new(Schema::new(lineage_fields().into_iter().chain(fields).collect::<Vec<_>>()))
}

/// Checks that `schema` starts with the lineage columns.
pub fn check_lineage(schema: &Schema) -> Result<(), String> {
    let expected = lineage_fields();
    for (i, want) in expected.iter().enumerate() {
        match schema.fields().get(i) {
            Some(f) if f.name() == want.name() && f.data_type().equals_datatype(want.data_type()) => {}
            _ => return Err(format!("output must start with `{}: {}`", want.name(), want.data_type())),
        }
    }
    Ok(())
}

/// Each row's id and first parent (its own id when it has none), read from the lineage
/// columns without converting the rest of the batch.
pub fn first_parents(batch: &RecordBatch) -> Result<Vec<(String, String)>> {
    use arrow::array::{Array, AsArray};
    let missing = |c: &str| crate::Error::Internal(format!("a batch without its `{c}` column"));
    let ids = batch.column_by_name(ROW_ID).ok_or_else(|| missing(ROW_ID))?;
    let parents = batch.column_by_name(PARENT_IDS).ok_or_else(|| missing(PARENT_IDS))?;
    let ids = ids.as_string_opt::<i32>().ok_or_else(|| missing(ROW_ID))?;
    let parents = parents.as_list_opt::<i32>().ok_or_else(|| missing(PARENT_IDS))?;
    Ok((0..batch.num_rows())
        .map(|i| {
            let id = ids.value(i).to_string();
            let list = parents.value(i);
            let first = list.as_string_opt::<i32>().filter(|l| !l.is_empty()).map(|l| l.value(0).to_string());
            (id.clone(), first.unwrap_or(id))
        })
        .collect())
}

/// A `parent_ids` column from one list of parents per row.
pub fn parents_array(parents: &[Vec<String>]) -> ArrayRef {
    let mut builder = arrow::array::ListBuilder::new(arrow::array::StringBuilder::new());
    for list in parents {
        for p in list {
            builder.values().append_value(p);
        }
        builder.append(true);
    }
    Arc::new(builder.finish())
}

/// `parent_ids` for `n` rows that have no parents.
pub fn no_parents(n: usize) -> ArrayRef {
    let item = Arc::new(Field::new("item", DataType::Utf8, true));
    Arc::new(ListArray::new(item, OffsetBuffer::new_zeroed(n), Arc::new(StringArray::new_null(0)), None))
}

/// Prepends lineage to rows that have none: each `row_id` is hashed from the row's values, and
/// `parent_ids` are empty. `schema` is the output schema (lineage fields, then `batch`'s).
pub fn with_content_lineage(schema: &SchemaRef, batch: &RecordBatch) -> Result<RecordBatch> {
    let ids: Vec<String> = to_json_rows(std::slice::from_ref(batch))?
        .iter()
        .map(|row| row_id(&[], serde_json::to_string(row).unwrap_or_default().as_bytes()))
        .collect();
    let columns: Vec<ArrayRef> = [Arc::new(StringArray::from(ids)) as ArrayRef, no_parents(batch.num_rows())]
        .into_iter()
        .chain(batch.columns().iter().cloned())
        .collect();
    RecordBatch::try_new(schema.clone(), columns).map_err(|e| Error::Internal(format!("lineage columns: {e}")))
}

/// The first `n` rows of `batches`, as slices (no copy).
pub fn head(batches: &[RecordBatch], n: usize) -> Vec<RecordBatch> {
    let mut left = n;
    let mut out = Vec::new();
    for b in batches {
        if left == 0 {
            break;
        }
        let take = left.min(b.num_rows());
        out.push(b.slice(0, take));
        left -= take;
    }
    out
}

/// Converts serializable rows (field names matching `schema`) into one record batch.
pub fn to_batch<T: Serialize>(schema: &SchemaRef, rows: &[T]) -> Result<RecordBatch> {
    let convert = || -> std::result::Result<RecordBatch, arrow::error::ArrowError> {
        let mut decoder = arrow::json::ReaderBuilder::new(schema.clone()).build_decoder()?;
        decoder.serialize(rows)?;
        Ok(decoder.flush()?.unwrap_or_else(|| RecordBatch::new_empty(schema.clone())))
    };
    convert().map_err(|e| Error::Internal(format!("rows do not match their schema: {e}")))
}

/// Renders rows as JSON objects, one per row.
pub fn to_json_rows(batches: &[RecordBatch]) -> Result<Vec<serde_json::Map<String, serde_json::Value>>> {
    let mut writer = arrow::json::ArrayWriter::new(Vec::new());
    let refs: Vec<&RecordBatch> = batches.iter().collect();
    writer.write_batches(&refs).map_err(|e| Error::Internal(format!("rows to JSON: {e}")))?;
    writer.finish().map_err(|e| Error::Internal(format!("rows to JSON: {e}")))?;
    let bytes = writer.into_inner();
    if bytes.is_empty() {
        return Ok(Vec::new());
    }
    serde_json::from_slice(&bytes).map_err(|e| Error::Internal(format!("rows to JSON: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize)]
    struct Row {
        row_id: String,
        parent_ids: Vec<String>,
        n: i64,
    }

    #[test]
    fn ids_depend_on_parents_and_content() {
        let a = row_id(&[], b"x");
        assert_eq!(a, row_id(&[], b"x"));
        assert_ne!(a, row_id(&["p"], b"x"));
        assert_ne!(a, row_id(&[], b"y"));
        assert_eq!(a.len(), 32);
    }

    #[test]
    fn rows_round_trip_through_arrow() {
        let schema = schema_with_lineage(vec![Field::new("n", DataType::Int64, false)]);
        let rows = vec![Row { row_id: "a".into(), parent_ids: vec!["p".into()], n: 3 }];
        let batch = to_batch(&schema, &rows).unwrap();
        assert!(check_lineage(&batch.schema()).is_ok());
        let json = to_json_rows(&[batch]).unwrap();
        assert_eq!(json[0]["n"], 3);
        assert_eq!(json[0]["parent_ids"][0], "p");
    }
}
