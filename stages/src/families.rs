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
//!
//! [`Family::read`] reads an input's rows as a typed struct of the family.

use arrow::datatypes::{DataType, Field};
use kiln_pipeline::stage::{Input, InputSchema, Problem};
use kiln_pipeline::{Error, Result};
use serde::de::DeserializeOwned;

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
        kiln_pipeline::rows::to_json_rows(&input.read()?)?
            .into_iter()
            .map(|row| {
                serde_json::from_value(serde_json::Value::Object(row))
                    .map_err(|e| Error::stage(&input.name, format!("not a {} row: {e}", self.name)))
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
}
