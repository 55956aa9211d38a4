//! The row-level cache: expensive per-row work (LLM calls, sandbox runs, profiling of large files)
//! keyed by a hash of the full request, in an embedded SQLite database.
//!
//! Each result is committed on its own as soon as it completes (WAL mode), so a run killed at any
//! moment keeps every finished unit of work, and the rerun finds it instead of paying again.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};

/// File name of the cache inside the output folder.
pub const FILE_NAME: &str = "_cache.sqlite";

/// A key: BLAKE3 of the namespace and the canonical request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheKey([u8; 32]);

impl CacheKey {
    /// The key of `request` (serialized as JSON) in `namespace` (e.g. `profile/1`).
    pub fn new(namespace: &str, request: &impl Serialize) -> Result<Self> {
        let body = serde_json::to_vec(request).map_err(|e| Error::Internal(format!("cache key: {e}")))?;
        let mut h = blake3::Hasher::new();
        h.update(namespace.as_bytes());
        h.update(b"\0");
        h.update(&body);
        Ok(CacheKey(*h.finalize().as_bytes()))
    }
}

/// The row cache of one output folder. Cheap to share behind an `Arc`. The database is opened
/// on first use, so a run in which every stage is fresh never needs it (not even when it is
/// damaged).
#[derive(Debug)]
pub struct RowCache {
    path: PathBuf,
    conn: Mutex<Option<Connection>>,
}

/// The cache's error for `source`: a damaged database is named as such, with what to do.
fn cache_error(path: &Path, source: rusqlite::Error) -> Error {
    let damaged = matches!(
        source.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase)
    );
    if damaged {
        Error::CacheDamaged { path: path.to_path_buf(), source }
    } else {
        Error::Cache { path: path.to_path_buf(), source }
    }
}

impl RowCache {
    /// The cache in `dir` (created on first use).
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        Ok(RowCache { path: dir.join(FILE_NAME), conn: Mutex::new(None) })
    }

    /// The folder the cache is in (the run's output folder).
    pub fn dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("."))
    }

    /// Opens (or creates) the database.
    fn connect(path: &Path) -> Result<Connection> {
        let err = |source| cache_error(path, source);
        let conn = Connection::open(path).map_err(err)?;
        conn.busy_timeout(std::time::Duration::from_secs(30)).map_err(err)?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(err)?;
        conn.pragma_update(None, "synchronous", "NORMAL").map_err(err)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS rows (
                key BLOB PRIMARY KEY,
                namespace TEXT NOT NULL,
                value BLOB NOT NULL,
                created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now'))
            ) WITHOUT ROWID;",
        )
        .map_err(err)?;
        Ok(conn)
    }

    fn with_conn<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T> {
        let mut conn = self.conn.lock().map_err(|_| Error::Internal("row cache lock poisoned".into()))?;
        if conn.is_none() {
            *conn = Some(Self::connect(&self.path)?);
        }
        let conn = conn.as_ref().ok_or_else(|| Error::Internal("row cache not open".into()))?;
        f(conn).map_err(|source| cache_error(&self.path, source))
    }

    /// The stored result for `key`, if any.
    pub fn get<T: DeserializeOwned>(&self, key: &CacheKey) -> Result<Option<T>> {
        let bytes: Option<Vec<u8>> = self.with_conn(|c| {
            c.query_row("SELECT value FROM rows WHERE key = ?1", [&key.0[..]], |r| r.get(0)).optional()
        })?;
        match bytes {
            None => Ok(None),
            // An entry that no longer decodes (its type changed) counts as missing.
            Some(b) => Ok(serde_json::from_slice(&b).ok()),
        }
    }

    /// Stores `value` for `key`, committed before this returns.
    pub fn put<T: Serialize>(&self, key: &CacheKey, namespace: &str, value: &T) -> Result<()> {
        let bytes = serde_json::to_vec(value).map_err(|e| Error::Internal(format!("cache value: {e}")))?;
        self.with_conn(|c| {
            c.execute(
                "INSERT OR REPLACE INTO rows (key, namespace, value) VALUES (?1, ?2, ?3)",
                params![&key.0[..], namespace, bytes],
            )
        })?;
        Ok(())
    }

    /// Returns the cached result for `key`, or computes it with `f`, stores it and returns it.
    /// The flag is true on a cache hit.
    pub async fn get_or_compute<T, F, Fut>(&self, key: &CacheKey, namespace: &str, f: F) -> Result<(T, bool)>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        if let Some(hit) = self.get(key)? {
            return Ok((hit, true));
        }
        let value = f().await?;
        self.put(key, namespace, &value)?;
        Ok((value, false))
    }

    /// Number of entries in `namespace`.
    pub fn count(&self, namespace: &str) -> Result<u64> {
        self.with_conn(|c| c.query_row("SELECT count(*) FROM rows WHERE namespace = ?1", [namespace], |r| r.get(0)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn results_survive_reopening_and_are_not_recomputed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let key = CacheKey::new("t", &("req", 1)).unwrap();
        {
            let cache = RowCache::open(&dir).unwrap();
            let (v, hit) = cache.get_or_compute(&key, "t", || async { Ok(41u32 + 1) }).await.unwrap();
            assert_eq!((v, hit), (42, false));
        }
        let cache = RowCache::open(&dir).unwrap();
        let (v, hit): (u32, bool) =
            cache.get_or_compute(&key, "t", || async { Err(Error::Internal("must not run".into())) }).await.unwrap();
        assert_eq!((v, hit), (42, true));
        assert_eq!(cache.count("t").unwrap(), 1);
        assert_ne!(key, CacheKey::new("t", &("req", 2)).unwrap());
    }

    #[test]
    fn a_damaged_cache_is_named_with_what_to_do_and_only_when_used() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join(FILE_NAME), vec![7u8; 8192]).unwrap();
        let cache = RowCache::open(tmp.path()).unwrap();
        let err = cache.get::<u32>(&CacheKey::new("t", &1).unwrap()).unwrap_err().to_string();
        assert!(err.contains("_cache.sqlite is damaged") && err.contains("move it aside"), "{err}");
    }
}
