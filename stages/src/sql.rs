//! `sql`: a DataFusion SQL query over the input stages (filters, projections, joins, dedup by
//! GROUP BY). Each input is a table named after its stage.
//!
//! Lineage: when the result has `row_id` and `parent_ids` columns (as `SELECT *` over one input
//! does) they are kept, so filtered rows keep their identity. Otherwise each row gets a `row_id`
//! hashed from its values and empty `parent_ids`. Queries run on one partition, so rows come out
//! in the same order on every run. Only queries are allowed: DDL, DML and `SET` are refused.
//!
//! ```toml
//! [stages.small]
//! kind = "sql"
//! inputs = ["files"]
//! query = "SELECT * FROM files WHERE row_count < 500"
//! ```

use std::path::Path;
use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch};
use arrow::datatypes::{Field, Schema, SchemaRef};
use async_trait::async_trait;
use datafusion::datasource::MemTable;
use datafusion::execution::context::SQLOptions;
use datafusion::prelude::{ParquetReadOptions, SessionConfig, SessionContext};
use kiln_pipeline::rows::{PARENT_IDS, ROW_ID, lineage_fields, with_content_lineage};
use kiln_pipeline::stage::{CheckCx, Input, InputSchema, Output, Plain, Problem, Stage, StageCx};
use kiln_pipeline::store::dataset_files;
use kiln_pipeline::{Error, Result};
use serde::{Deserialize, Serialize};

/// Parameters of a `sql` stage.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sql {
    /// The query (DataFusion SQL). Each input is a table named after its stage. Required.
    pub query: String,
}

/// A session that runs queries on one partition, for a stable row order.
fn session() -> SessionContext {
    SessionContext::new_with_config(SessionConfig::new().with_target_partitions(1))
}

fn read_only() -> SQLOptions {
    SQLOptions::new().with_allow_ddl(false).with_allow_dml(false).with_allow_statements(false)
}

/// Registers the dataset in `dir` as table `name`.
pub async fn register_dataset(ctx: &SessionContext, name: &str, dir: &Path, schema: Option<&Schema>) -> Result<()> {
    let files: Vec<String> = dataset_files(dir)?.iter().map(|p| p.display().to_string()).collect();
    let mut options = ParquetReadOptions::default();
    if let Some(schema) = schema {
        options = options.schema(schema);
    }
    let df = ctx.read_parquet(files, options).await.map_err(|e| Error::dataset(dir, e.strip_backtrace()))?;
    ctx.register_table(name, df.into_view()).map_err(|e| Error::dataset(dir, e.strip_backtrace()))?;
    Ok(())
}

/// Runs a read-only `query` over datasets `(table name, folder)`.
pub async fn query(tables: &[(String, std::path::PathBuf)], query: &str) -> Result<Vec<RecordBatch>> {
    let ctx = SessionContext::new();
    for (name, dir) in tables {
        register_dataset(&ctx, name, dir, None).await?;
    }
    let df = ctx.sql_with_options(query, read_only()).await.map_err(|e| Error::Usage(e.strip_backtrace()))?;
    df.collect().await.map_err(|e| Error::Usage(e.strip_backtrace()))
}

/// How the result's columns map onto the output.
struct Shape {
    output: SchemaRef,
    /// Whether the result carries its own lineage columns.
    keeps_lineage: bool,
}

fn shape(result: &Schema) -> Result<Shape, Problem> {
    let [id, parents] = lineage_fields();
    let has = |f: &Field| result.field_with_name(f.name()).ok().map(|r| r.data_type().equals_datatype(f.data_type()));
    let keeps_lineage = match (has(&id), has(&parents)) {
        (Some(true), Some(true)) => true,
        (None, None) => false,
        _ => {
            return Err(Problem::new(
                "query",
                format!(
                    "the query returns `{ROW_ID}` or `{PARENT_IDS}` but not both with their types (Utf8, List<Utf8>)"
                ),
            )
            .help("select both lineage columns (`SELECT *` does), or neither to derive new row ids"));
        }
    };
    let rest =
        result.fields().iter().filter(|f| f.name() != ROW_ID && f.name() != PARENT_IDS).map(|f| f.as_ref().clone());
    let fields: Vec<Field> = [id, parents].into_iter().chain(rest).collect();
    Ok(Shape { output: Arc::new(Schema::new(fields)), keeps_lineage })
}

impl Plain for Sql {}

#[async_trait]
impl Stage for Sql {
    async fn output_schema(&self, _cx: &CheckCx, inputs: &[InputSchema]) -> Result<SchemaRef, Vec<Problem>> {
        let ctx = session();
        for input in inputs {
            let table = MemTable::try_new(input.schema.clone(), vec![vec![]])
                .map_err(|e| vec![Problem::new("", e.to_string())])?;
            ctx.register_table(input.name.as_str(), Arc::new(table))
                .map_err(|e| vec![Problem::new("", e.to_string())])?;
        }
        let df = ctx.sql_with_options(&self.query, read_only()).await.map_err(|e| {
            let tables: Vec<String> = inputs
                .iter()
                .map(|i| {
                    format!(
                        "`{}` ({})",
                        i.name,
                        i.schema.fields().iter().map(|f| f.name().as_str()).collect::<Vec<_>>().join(", ")
                    )
                })
                .collect();
            let help = if tables.is_empty() {
                "add `inputs = [\"...\"]`: the query can only read input stages".to_string()
            } else {
                format!("tables: {}", tables.join("; "))
            };
            let error = e.strip_backtrace();
            let first_line = error.lines().next().unwrap_or_default();
            vec![Problem::new("query", format!("the query does not fit its inputs: {first_line}")).help(help)]
        })?;
        shape(df.schema().as_arrow()).map(|s| s.output).map_err(|p| vec![p])
    }

    async fn run(&self, cx: &StageCx, inputs: &[Input]) -> Result<Output> {
        let ctx = session();
        for input in inputs {
            register_dataset(&ctx, &input.name, &input.dir, Some(&input.schema)).await?;
        }
        let fail = |e: datafusion::error::DataFusionError| Error::stage(&cx.name, e.strip_backtrace());
        let df = ctx.sql_with_options(&self.query, read_only()).await.map_err(fail)?;
        let result_schema = Arc::new(df.schema().as_arrow().clone());
        let batches = df.collect().await.map_err(fail)?;
        let shape = shape(&result_schema).map_err(|p| Error::stage(&cx.name, p))?;
        let mut out = Vec::new();
        for batch in batches {
            if !shape.keeps_lineage {
                out.push(with_content_lineage(&shape.output, &batch)?);
                continue;
            }
            // Lineage columns first, the others in query order.
            let lineage = [ROW_ID, PARENT_IDS].map(|n| batch.column_by_name(n).cloned());
            let [Some(ids), Some(parents)] = lineage else {
                return Err(Error::Internal("lineage columns vanished".into()));
            };
            let rest = result_schema
                .fields()
                .iter()
                .zip(batch.columns())
                .filter(|(f, _)| f.name() != ROW_ID && f.name() != PARENT_IDS)
                .map(|(_, c)| c.clone());
            let columns: Vec<ArrayRef> = [ids, parents].into_iter().chain(rest).collect();
            out.push(RecordBatch::try_new(shape.output.clone(), columns).map_err(|e| Error::stage(&cx.name, e))?);
        }
        Ok(Output { batches: out, ..Default::default() })
    }
}
