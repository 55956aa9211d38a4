//! Per-column statistics accumulated over Arrow batches, whatever the file format.

use std::collections::HashSet;

use arrow::array::{Array, ArrayRef, AsArray};
use arrow::compute::{cast, max, max_string, min, min_string};
use arrow::datatypes::{DataType, Float64Type};
use serde::{Deserialize, Serialize};

/// How many distinct values a column tracks before it stops counting exactly.
pub const DISTINCT_LIMIT: usize = 10_000;
/// Longest unique value kept in a profile, in characters.
const VALUE_CHARS: usize = 100;

/// The profile of one column, as stored in the `columns` list of a table profile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ColumnProfile {
    /// Column name.
    pub name: String,
    /// Arrow type of the column (`Int64`, `Float64`, `Utf8`, `Boolean`, ...).
    pub data_type: String,
    /// Number of nulls (over the rows examined).
    pub null_count: u64,
    /// Exact number of distinct non-null values, or null when over 10,000.
    pub unique_count: Option<u64>,
    /// Smallest value, as text (numeric order for numbers).
    pub min: Option<String>,
    /// Largest value, as text.
    pub max: Option<String>,
    /// Up to `max_unique_values` distinct values, sorted.
    pub unique_values: Vec<String>,
}

/// Accumulates one column's statistics batch by batch.
#[derive(Debug)]
pub struct ColumnStats {
    name: String,
    data_type: DataType,
    nulls: u64,
    min_num: Option<f64>,
    max_num: Option<f64>,
    min_text: Option<String>,
    max_text: Option<String>,
    distinct: HashSet<String>,
    overflow: bool,
}

impl ColumnStats {
    /// Empty statistics of a column.
    pub fn new(name: &str, data_type: &DataType) -> Self {
        ColumnStats {
            name: name.to_string(),
            data_type: data_type.clone(),
            nulls: 0,
            min_num: None,
            max_num: None,
            min_text: None,
            max_text: None,
            distinct: HashSet::new(),
            overflow: false,
        }
    }

    /// Adds the values of `array`.
    pub fn update(&mut self, array: &ArrayRef) {
        self.nulls += array.null_count() as u64;
        if self.data_type.is_numeric()
            && let Ok(floats) = cast(array, &DataType::Float64)
        {
            let floats = floats.as_primitive::<Float64Type>();
            self.min_num = fold(self.min_num, min(floats), f64::min);
            self.max_num = fold(self.max_num, max(floats), f64::max);
        }
        let Ok(text) = cast(array, &DataType::Utf8) else { return };
        let text = text.as_string::<i32>();
        if !self.data_type.is_numeric() {
            self.min_text = fold(self.min_text.take(), min_string(text).map(str::to_string), |a, b| a.min(b));
            self.max_text = fold(self.max_text.take(), max_string(text).map(str::to_string), |a, b| a.max(b));
        }
        if self.overflow {
            return;
        }
        for value in text.iter().flatten() {
            if !self.distinct.contains(value) {
                if self.distinct.len() == DISTINCT_LIMIT {
                    self.overflow = true;
                    self.distinct.clear();
                    return;
                }
                self.distinct.insert(value.to_string());
            }
        }
    }

    /// The finished profile, listing at most `max_unique` values.
    pub fn finish(self, max_unique: usize) -> ColumnProfile {
        let integer = self.data_type.is_integer();
        let show = |v: f64| if integer { format!("{}", v as i64) } else { format!("{v}") };
        let (min, max) = if self.data_type.is_numeric() {
            (self.min_num.map(show), self.max_num.map(show))
        } else {
            (self.min_text, self.max_text)
        };
        let mut values: Vec<String> = self.distinct.iter().cloned().collect();
        if integer || self.data_type.is_floating() {
            values.sort_by(|a, b| a.parse::<f64>().unwrap_or(0.0).total_cmp(&b.parse::<f64>().unwrap_or(0.0)));
        } else {
            values.sort();
        }
        let unique_values =
            values.into_iter().take(max_unique).map(|v| v.chars().take(VALUE_CHARS).collect()).collect();
        ColumnProfile {
            name: self.name,
            data_type: self.data_type.to_string(),
            null_count: self.nulls,
            unique_count: (!self.overflow).then_some(self.distinct.len() as u64),
            min,
            max,
            unique_values,
        }
    }

    /// True when no non-null value has been seen.
    pub fn is_empty(&self, rows: u64) -> bool {
        self.nulls >= rows
    }
}

fn fold<T>(acc: Option<T>, next: Option<T>, pick: impl Fn(T, T) -> T) -> Option<T> {
    match (acc, next) {
        (Some(a), Some(b)) => Some(pick(a, b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{Int64Array, StringArray};

    use super::*;

    #[test]
    fn numbers_use_numeric_order_and_strings_lexical() {
        let mut n = ColumnStats::new("n", &DataType::Int64);
        n.update(&(Arc::new(Int64Array::from(vec![Some(9), None, Some(10)])) as ArrayRef));
        n.update(&(Arc::new(Int64Array::from(vec![-2])) as ArrayRef));
        let p = n.finish(2);
        assert_eq!((p.min.as_deref(), p.max.as_deref()), (Some("-2"), Some("10")));
        assert_eq!((p.null_count, p.unique_count), (1, Some(3)));
        assert_eq!(p.unique_values, vec!["-2", "9"]);

        let mut s = ColumnStats::new("s", &DataType::Utf8);
        s.update(&(Arc::new(StringArray::from(vec!["b", "a", "b"])) as ArrayRef));
        let p = s.finish(10);
        assert_eq!((p.min.as_deref(), p.max.as_deref(), p.unique_count), (Some("a"), Some("b"), Some(2)));
    }
}
