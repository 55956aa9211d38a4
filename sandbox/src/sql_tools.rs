//! The SQL tools of SQLite tasks: `get_db_info()` and `execute_sql(sql, output_path)`, run by
//! kiln (not by the worker) through rusqlite on the task's database.
//!
//! Every statement runs on a connection opened read-only, with `PRAGMA query_only`, an
//! authorizer that allows reading and nothing else (no ATTACH, no PRAGMA, no writes), a
//! progress-handler deadline (runaway recursive CTEs stop) and a row cap. Refusals come back
//! as clear messages that become the cell's error, never as a crash.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::hooks::{AuthAction, AuthContext, Authorization};
use rusqlite::types::ValueRef;
use rusqlite::{Connection, OpenFlags};

/// The first action the authorizer refused, described.
type Refused = Arc<Mutex<Option<String>>>;

/// What `execute_sql` wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryResult {
    /// Where the CSV was written, relative to the scratch folder.
    pub path: String,
    /// Column names.
    pub columns: Vec<String>,
    /// Rows written.
    pub rows: usize,
    /// True when the row cap cut the result.
    pub truncated: bool,
}

/// The read-only SQL tools over one SQLite database.
#[derive(Debug, Clone)]
pub struct SqlTools {
    db: PathBuf,
}

impl SqlTools {
    /// Tools over the database file `db`.
    pub fn new(db: impl Into<PathBuf>) -> Self {
        SqlTools { db: db.into() }
    }

    /// A guarded connection, and where its authorizer notes the first action it refused.
    fn open(&self) -> Result<(Connection, Refused), String> {
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn =
            Connection::open_with_flags(&self.db, flags).map_err(|e| format!("cannot open the database: {e}"))?;
        conn.pragma_update(None, "query_only", 1).map_err(|e| e.to_string())?;
        let refused = Arc::new(Mutex::new(None));
        let seen = refused.clone();
        conn.authorizer(Some(move |ctx: AuthContext<'_>| match ctx.action {
            AuthAction::Select | AuthAction::Read { .. } | AuthAction::Function { .. } | AuthAction::Recursive => {
                Authorization::Allow
            }
            other => {
                let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
                seen.get_or_insert_with(|| describe(&other));
                Authorization::Deny
            }
        }));
        Ok((conn, refused))
    }

    /// The schema: every CREATE statement of the database, separated by blank lines.
    pub fn ddl(&self) -> Result<String, String> {
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn =
            Connection::open_with_flags(&self.db, flags).map_err(|e| format!("cannot open the database: {e}"))?;
        let mut stmt = conn
            .prepare("SELECT sql FROM sqlite_schema WHERE sql IS NOT NULL AND name NOT LIKE 'sqlite_%' ORDER BY rowid")
            .map_err(|e| e.to_string())?;
        let ddl: Vec<String> = stmt
            .query_map([], |r| r.get(0))
            .map_err(|e| e.to_string())?
            .collect::<Result<_, _>>()
            .map_err(|e| e.to_string())?;
        Ok(ddl.join(";\n\n") + ";")
    }

    /// Runs one read-only statement and writes its result as CSV to `output_path` inside
    /// `scratch` (opened without following links: [`crate::scratch::create_file`]).
    pub fn execute(
        &self,
        sql: &str,
        scratch: &Path,
        output_path: &str,
        max_rows: usize,
        timeout: Duration,
    ) -> Result<QueryResult, String> {
        let (conn, refused) = self.open()?;
        let deadline = Instant::now() + timeout;
        conn.progress_handler(1_000, Some(move || Instant::now() > deadline));
        let refusal = |e: rusqlite::Error| {
            let refused = refused.lock().unwrap_or_else(|e| e.into_inner()).take();
            match (e, refused) {
                (rusqlite::Error::MultipleStatement, _) => "execute_sql runs exactly one statement".to_string(),
                (_, Some(what)) => format!("only read-only SELECT statements are allowed ({what} is not)"),
                (rusqlite::Error::SqliteFailure(f, _), None) if f.code == rusqlite::ErrorCode::OperationInterrupted => {
                    format!("the query ran longer than {:.0} s and was stopped", timeout.as_secs_f64())
                }
                (other, None) => other.to_string(),
            }
        };
        let mut stmt = conn.prepare(sql).map_err(refusal)?;
        if !stmt.readonly() {
            return Err("only read-only SELECT statements are allowed".into());
        }
        let columns: Vec<String> = stmt.column_names().iter().map(|c| c.to_string()).collect();
        let file = crate::scratch::create_file(scratch, output_path).map_err(|e| format!("output_path {e}"))?;
        let mut csv = csv::Writer::from_writer(std::io::BufWriter::new(file));
        csv.write_record(&columns).map_err(|e| e.to_string())?;
        let mut rows = stmt.query([]).map_err(refusal)?;
        let (mut n, mut truncated) = (0, false);
        let mut record: Vec<String> = Vec::with_capacity(columns.len());
        while let Some(row) = rows.next().map_err(refusal)? {
            if n == max_rows {
                truncated = true;
                break;
            }
            record.clear();
            for i in 0..columns.len() {
                record.push(match row.get_ref(i).map_err(|e| e.to_string())? {
                    ValueRef::Null => String::new(),
                    ValueRef::Integer(v) => v.to_string(),
                    ValueRef::Real(v) => format!("{v:?}"),
                    ValueRef::Text(t) => String::from_utf8_lossy(t).into_owned(),
                    ValueRef::Blob(b) => b.iter().map(|x| format!("{x:02x}")).collect(),
                });
            }
            csv.write_record(&record).map_err(|e| e.to_string())?;
            n += 1;
        }
        csv.flush().map_err(|e| e.to_string())?;
        Ok(QueryResult { path: output_path.to_string(), columns, rows: n, truncated })
    }
}

fn describe(action: &AuthAction<'_>) -> String {
    match action {
        AuthAction::Attach { .. } => "ATTACH".into(),
        AuthAction::Detach { .. } => "DETACH".into(),
        AuthAction::Pragma { pragma_name, .. } => format!("PRAGMA {pragma_name}"),
        AuthAction::Insert { .. } => "INSERT".into(),
        AuthAction::Update { .. } => "UPDATE".into(),
        AuthAction::Delete { .. } => "DELETE".into(),
        AuthAction::Transaction { .. } => "a transaction".into(),
        other => {
            let name = format!("{other:?}");
            name.split([' ', '{', '(']).next().unwrap_or("this statement").to_uppercase()
        }
    }
}
