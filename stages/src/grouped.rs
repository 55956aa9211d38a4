//! Rows grouped by a key, read one record batch at a time: for stages that decide on whole
//! groups (the judge on a question's trajectories, compose on a table's questions) without
//! holding their whole input.
//!
//! A first pass counts the rows of each key (reading only what the key needs); the second reads
//! the rows and hands on each group as soon as its last row has been read. The groups held open
//! are those whose rows are still to come: few when a group's rows are together, as the stages
//! that write them leave them.

use std::collections::HashMap;

use arrow::record_batch::RecordBatch;
use kiln_pipeline::Result;
use kiln_pipeline::stage::Input;

/// The keys of a batch's rows, in order.
pub type Keys = fn(&str, &RecordBatch) -> Result<Vec<String>>;
/// A batch's rows, each with its key.
pub type Rows<T> = fn(&str, RecordBatch) -> Result<Vec<(String, T)>>;
/// Complete groups, each with its key.
pub type Groups<T> = Vec<(String, Vec<T>)>;

/// The groups of an input, as they complete.
pub struct Grouped<T> {
    name: String,
    batches: Box<dyn Iterator<Item = Result<RecordBatch>> + Send>,
    rows: Rows<T>,
    /// Rows per key, from the first pass.
    counts: HashMap<String, usize>,
    open: HashMap<String, Vec<T>>,
}

impl<T> Grouped<T> {
    /// Groups the rows of `input` by key: `keys` reads the keys (first pass), `rows` the rows
    /// with their keys (second pass).
    pub fn read(input: &Input, keys: Keys, rows: Rows<T>) -> Result<Self> {
        let mut counts = HashMap::new();
        for batch in input.batches()? {
            for key in keys(&input.name, &batch?)? {
                *counts.entry(key).or_default() += 1;
            }
        }
        Ok(Grouped {
            name: input.name.clone(),
            batches: Box::new(input.batches()?),
            rows,
            counts,
            open: HashMap::new(),
        })
    }

    /// Complete groups holding `max_rows` rows or a little more (whole groups), in the order
    /// they completed; `None` once every group was handed on.
    pub fn next_chunk(&mut self, max_rows: usize) -> Result<Option<Groups<T>>> {
        let (mut chunk, mut rows) = (Vec::new(), 0);
        while rows < max_rows {
            let Some(batch) = self.batches.next() else { break };
            for (key, row) in (self.rows)(&self.name, batch?)? {
                let group = self.open.entry(key.clone()).or_default();
                group.push(row);
                if group.len() >= self.counts.get(&key).copied().unwrap_or(0) {
                    let group = self.open.remove(&key).unwrap_or_default();
                    rows += group.len();
                    chunk.push((key, group));
                }
            }
        }
        Ok((!chunk.is_empty()).then_some(chunk))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::StringArray;
    use arrow::datatypes::{DataType, Field, Schema};

    use super::*;

    fn keys(_: &str, b: &RecordBatch) -> Result<Vec<String>> {
        let col = b.column(0).as_any().downcast_ref::<StringArray>().unwrap();
        Ok(col.iter().map(|k| k.unwrap_or_default().to_string()).collect())
    }

    fn rows(stage: &str, b: RecordBatch) -> Result<Vec<(String, String)>> {
        Ok(keys(stage, &b)?.into_iter().enumerate().map(|(i, k)| (k.clone(), format!("{k}{i}"))).collect())
    }

    #[test]
    fn groups_come_whole_as_soon_as_their_last_row_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let schema = Arc::new(Schema::new(vec![Field::new("k", DataType::Utf8, false)]));
        let batch =
            |ks: &[&str]| RecordBatch::try_new(schema.clone(), vec![Arc::new(StringArray::from(ks.to_vec()))]).unwrap();
        let store = kiln_pipeline::store::Store::new(dir.path().to_path_buf());
        let mut parts = store.parts("s", &schema).unwrap();
        for b in [batch(&["a", "a", "b"]), batch(&["c", "b"]), batch(&["a"])] {
            parts.push(b).unwrap();
        }
        let manifest: kiln_pipeline::store::Manifest =
            serde_json::from_value(serde_json::json!({"stage": "s", "fingerprint": "f", "parts": {"kind": "k", "version": 1, "params": null, "files": {}, "inputs": {}}, "content_hash": "", "schema": [], "row_count": 0, "rejected": 0, "files": [], "started_at": "", "finished_at": "", "counters": {}}))
                .unwrap();
        store.finish(parts, &[], &[], manifest).unwrap();
        let input = Input { name: "s".into(), dir: dir.path().join("s"), schema };
        let mut grouped = Grouped::read(&input, keys, rows).unwrap();
        let all = grouped.next_chunk(100).unwrap().unwrap();
        let order: Vec<(&str, usize)> = all.iter().map(|(k, g)| (k.as_str(), g.len())).collect();
        assert_eq!(order, [("c", 1), ("b", 2), ("a", 3)], "each group once, whole, when complete");
        assert!(grouped.next_chunk(100).unwrap().is_none());
    }
}
