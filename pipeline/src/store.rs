//! The dataset store: one folder per stage under the output folder, holding Parquet part files,
//! the stage's rejections and a manifest.
//!
//! Writes are atomic: everything goes to a temporary folder, the manifest is written last, and
//! the folder is renamed into place. Only a folder named after the stage *with* a manifest is a
//! finished dataset, so a run killed mid-write is never mistaken for a finished one.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::fingerprint::FingerprintParts;
use crate::stage::Rejection;

/// Manifest file name inside a dataset folder.
pub const MANIFEST: &str = "manifest.json";
/// Rejections file name inside a stage's dataset folder.
pub const REJECTIONS: &str = "rejections.parquet";
/// Folder (and SQL table) name of the rejection ledger.
pub const LEDGER: &str = "_rejections";
/// Rows per Parquet part file.
pub const ROWS_PER_PART: usize = 65_536;

/// What a finished dataset is: written last, read first.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// Stage name.
    pub stage: String,
    /// The stage fingerprint this dataset was produced under.
    pub fingerprint: String,
    /// What the fingerprint was made of (kind, version, parameters, files, input hashes).
    pub parts: FingerprintParts,
    /// Fingerprint of each input's dataset when this one was produced.
    #[serde(default)]
    pub input_fingerprints: BTreeMap<String, String>,
    /// BLAKE3 of the part files: equal hashes mean byte-identical rows.
    pub content_hash: String,
    /// Columns: name, Arrow type, nullability.
    pub schema: Vec<ColumnInfo>,
    /// Number of rows.
    pub row_count: u64,
    /// Number of rejections recorded.
    pub rejected: u64,
    /// Part files, in order.
    pub files: Vec<String>,
    /// When the run started (RFC 3339).
    pub started_at: String,
    /// When the dataset was complete (RFC 3339).
    pub finished_at: String,
    /// Stage-specific counts (cache hits, computed items...).
    pub counters: BTreeMap<String, u64>,
    /// Every file of the dataset (parts, rejections) and every file the stage wrote outside it
    /// (exports, reports), as written: checked before the dataset is trusted.
    #[serde(default)]
    pub checks: Vec<FileCheck>,
}

/// A file as it was written: its size, hash and modification time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileCheck {
    /// Path relative to the output folder (absolute when outside it).
    pub path: String,
    /// Size in bytes.
    pub bytes: u64,
    /// BLAKE3 of the contents, hex.
    pub blake3: String,
    /// Modification time, nanoseconds since the Unix epoch (0 when unknown).
    pub mtime_ns: u64,
}

/// The modification time of `meta` in nanoseconds since the epoch (0 when unknown).
fn mtime_ns(meta: &std::fs::Metadata) -> u64 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// One column in a manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ColumnInfo {
    /// Column name.
    pub name: String,
    /// Arrow type, as displayed.
    pub data_type: String,
    /// Whether nulls are allowed.
    pub nullable: bool,
}

/// The output folder of a pipeline.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// A store rooted at `dir` (created on first write).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Store { dir: dir.into() }
    }

    /// The output folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The dataset folder of `stage`.
    pub fn stage_dir(&self, stage: &str) -> PathBuf {
        self.dir.join(stage)
    }

    /// The manifest of `stage`'s finished dataset, if there is one.
    pub fn manifest(&self, stage: &str) -> Result<Option<Manifest>> {
        read_manifest(&self.stage_dir(stage))
    }

    /// Removes what killed runs left behind: temporary dataset folders (`.tmp-<stage>-<pid>`,
    /// `.old-<stage>-<pid>`) in the output folder and temporary files (`<name>.tmp-<pid>`) in it
    /// and its sub-folders, each only when the process that made it is no longer running.
    pub fn clean_leftovers(&self) -> Result<()> {
        let mut folders = vec![self.dir.clone()];
        while let Some(dir) = folders.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else { continue };
            for entry in entries.flatten() {
                let (path, name) = (entry.path(), entry.file_name().to_string_lossy().to_string());
                let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
                let pid = if is_dir && dir == self.dir {
                    (name.starts_with(".tmp-") || name.starts_with(".old-")).then(|| name.rsplit('-').next()).flatten()
                } else if !is_dir {
                    name.rsplit_once(".tmp-").map(|(_, pid)| pid)
                } else {
                    None
                };
                match pid.and_then(|p| p.parse::<u32>().ok()) {
                    Some(pid) if !running(pid) => {
                        let removed = if is_dir { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
                        removed.map_err(|e| Error::io(&path, e))?;
                        tracing::info!(path = %path.display(), "Removed a temporary file of an interrupted run.");
                    }
                    Some(_) => {}
                    None if is_dir && !name.starts_with('.') => folders.push(path),
                    None => {}
                }
            }
        }
        Ok(())
    }

    /// The check of `path` (a file just written), its bytes given when already in hand.
    pub fn check(&self, path: &Path, bytes: Option<&[u8]>) -> Result<FileCheck> {
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        let blake3 = match bytes {
            Some(b) => blake3::hash(b),
            None => hash_file(path)?,
        };
        let shown = path.strip_prefix(&self.dir).unwrap_or(path).to_string_lossy().into_owned();
        Ok(FileCheck { path: shown, bytes: meta.len(), blake3: blake3.to_hex().to_string(), mtime_ns: mtime_ns(&meta) })
    }

    /// What is wrong with the files of `manifest`, if anything: a file missing, of another
    /// size, or (when `full`, or when its modification time changed) with other contents.
    pub fn damage(&self, manifest: &Manifest, full: bool) -> Option<String> {
        for check in &manifest.checks {
            let path = self.dir.join(&check.path);
            let Ok(meta) = std::fs::metadata(&path) else { return Some(format!("`{}` is missing", check.path)) };
            if meta.len() != check.bytes {
                return Some(format!("`{}` has {} bytes, {} were written", check.path, meta.len(), check.bytes));
            }
            if full || mtime_ns(&meta) != check.mtime_ns {
                let same = hash_file(&path).is_ok_and(|h| h.to_hex().as_str() == check.blake3);
                if !same {
                    return Some(format!("`{}` was changed after it was written", check.path));
                }
            }
        }
        None
    }

    /// A writer of `stage`'s dataset, in its temporary folder: rows pushed while the stage
    /// runs are written as Parquet parts as soon as a part is full, so a stage's output need
    /// not be held in memory. [`Store::finish`] completes it.
    pub fn parts(&self, stage: &str, schema: &SchemaRef) -> Result<PartWriter> {
        let tmp = self.dir.join(format!(".tmp-{stage}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        Ok(PartWriter {
            store_dir: self.dir.clone(),
            tmp,
            stage: stage.to_string(),
            schema: schema.clone(),
            open: None,
            hasher: blake3::Hasher::new(),
            files: Vec::new(),
            checks: Vec::new(),
            rows: 0,
        })
    }

    /// Writes `stage`'s dataset atomically and returns its manifest, completed with the content
    /// hash, row count, schema and file list (what the executor does through [`Store::parts`]
    /// and [`Store::finish`]).
    #[cfg(test)]
    fn write(
        &self,
        schema: &SchemaRef,
        batches: &[RecordBatch],
        rejections: &[Rejection],
        written: &[PathBuf],
        manifest: Manifest,
    ) -> Result<Manifest> {
        let mut parts = self.parts(&manifest.stage, schema)?;
        for batch in batches {
            parts.push(batch.clone())?;
        }
        self.finish(parts, rejections, written, manifest)
    }

    /// Completes a dataset: its last part, its rejections, the checks of the files the stage
    /// wrote elsewhere and the manifest (written last), then the folder renamed into place.
    pub fn finish(
        &self,
        mut parts: PartWriter,
        rejections: &[Rejection],
        written: &[PathBuf],
        mut manifest: Manifest,
    ) -> Result<Manifest> {
        let stage = manifest.stage.clone();
        // A dataset without rows still has one (empty) part, which carries its schema.
        if parts.open.is_some() || parts.files.is_empty() {
            parts.close_part()?;
        }
        let tmp = parts.tmp.clone();
        let path = tmp.join(REJECTIONS);
        let bytes = write_parquet(&path, &rejection_schema(), &[rejection_batch(&stage, rejections)?])?;
        parts.checks.push(placed(&stage, self.check(&path, Some(&bytes))?, REJECTIONS));
        for path in written {
            parts.checks.push(self.check(path, None)?);
        }

        manifest.content_hash = parts.hasher.finalize().to_hex()[..32].to_string();
        manifest.schema = schema_info(&parts.schema);
        manifest.row_count = parts.rows as u64;
        manifest.rejected = rejections.len() as u64;
        manifest.files = parts.files;
        manifest.checks = parts.checks;
        manifest.finished_at = now();
        let json = serde_json::to_vec_pretty(&manifest).map_err(|e| Error::Internal(e.to_string()))?;
        let mpath = tmp.join(MANIFEST);
        std::fs::write(&mpath, json).map_err(|e| Error::io(&mpath, e))?;
        File::open(&mpath).and_then(|f| f.sync_all()).map_err(|e| Error::io(&mpath, e))?;

        let dest = self.stage_dir(&stage);
        if dest.exists() {
            let old = self.dir.join(format!(".old-{stage}-{}", std::process::id()));
            std::fs::rename(&dest, &old).map_err(|e| Error::io(&dest, e))?;
            std::fs::rename(&tmp, &dest).map_err(|e| Error::io(&tmp, e))?;
            std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
        } else {
            std::fs::rename(&tmp, &dest).map_err(|e| Error::io(&tmp, e))?;
        }
        Ok(manifest)
    }

    /// Rebuilds the rejection ledger `_rejections/` from the rejections of `stages`.
    pub fn write_ledger(&self, stages: &[String]) -> Result<()> {
        let mut batches = Vec::new();
        for stage in stages {
            let path = self.stage_dir(stage).join(REJECTIONS);
            if self.manifest(stage)?.is_some() && path.exists() {
                batches.extend(read_parquet(&path)?);
            }
        }
        let schema = rejection_schema();
        let dir = self.dir.join(LEDGER);
        let tmp = self.dir.join(format!(".tmp-{LEDGER}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        write_parquet(&tmp.join("part-00000.parquet"), &schema, &batches)?;
        let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
        let info = serde_json::json!({ "stage": LEDGER, "row_count": rows, "files": ["part-00000.parquet"], "schema": schema_info(&schema) });
        std::fs::write(tmp.join(MANIFEST), info.to_string()).map_err(|e| Error::io(&tmp, e))?;
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::rename(&tmp, &dir).map_err(|e| Error::io(&dir, e))
    }
}

/// True when process `pid` is running (here, on Linux: its `/proc` entry exists).
fn running(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

/// Reads a manifest from a dataset folder; `None` if the folder holds no finished dataset. A
/// manifest that does not parse (written by another kiln version, or damaged) counts as no
/// dataset, so the stage is rebuilt.
pub fn read_manifest(dir: &Path) -> Result<Option<Manifest>> {
    let path = dir.join(MANIFEST);
    match std::fs::read(&path) {
        Ok(bytes) => match serde_json::from_slice(&bytes) {
            Ok(m) => Ok(Some(m)),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "Unreadable manifest; the stage will be rebuilt.");
                Ok(None)
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(&path, e)),
    }
}

/// The Parquet files of a dataset folder, in order (the ledger's included).
pub fn dataset_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let path = dir.join(MANIFEST);
    let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
    #[derive(Deserialize)]
    struct Files {
        files: Vec<String>,
    }
    let files: Files = serde_json::from_slice(&bytes).map_err(|e| Error::dataset(&path, e))?;
    Ok(files.files.iter().map(|f| dir.join(f)).collect())
}

/// Reads every row of a dataset folder.
pub fn read_dataset(dir: &Path) -> Result<Vec<RecordBatch>> {
    let mut out = Vec::new();
    for file in dataset_files(dir)? {
        out.extend(read_parquet(&file)?);
    }
    Ok(out)
}

/// Reads one Parquet file.
pub fn read_parquet(path: &Path) -> Result<Vec<RecordBatch>> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let reader =
        ParquetRecordBatchReaderBuilder::try_new(file).and_then(|b| b.build()).map_err(|e| Error::dataset(path, e))?;
    reader.collect::<std::result::Result<Vec<_>, _>>().map_err(|e| Error::dataset(path, e))
}

/// The schema stored in a Parquet file.
pub fn parquet_schema(path: &Path) -> Result<SchemaRef> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    ParquetRecordBatchReaderBuilder::try_new(file).map(|b| b.schema().clone()).map_err(|e| Error::dataset(path, e))
}

/// Writes `batches` as one Parquet file at `path` and returns its bytes (for hashing without
/// reading the file back). A part holds at most `ROWS_PER_PART` rows, so it fits in memory.
fn write_parquet(path: &Path, schema: &SchemaRef, batches: &[RecordBatch]) -> Result<Vec<u8>> {
    let mut writer = ArrowWriter::try_new(Vec::new(), schema.clone(), None).map_err(|e| Error::dataset(path, e))?;
    for b in batches {
        writer.write(b).map_err(|e| Error::dataset(path, e))?;
    }
    let bytes = writer.into_inner().map_err(|e| Error::dataset(path, e))?;
    std::fs::write(path, &bytes).map_err(|e| Error::io(path, e))?;
    Ok(bytes)
}

/// The BLAKE3 of a file, read in pieces (exports can be large).
fn hash_file(path: &Path) -> Result<blake3::Hash> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = blake3::Hasher::new();
    hasher.update_reader(file).map_err(|e| Error::io(path, e))?;
    Ok(hasher.finalize())
}

/// A check of a file in a stage's temporary folder, named where it will be once the folder is
/// renamed into place.
fn placed(stage: &str, check: FileCheck, name: &str) -> FileCheck {
    FileCheck { path: format!("{stage}/{name}"), ..check }
}

/// Rows per Parquet row group: what a part writer holds in memory before it goes to disk.
const ROWS_PER_GROUP: usize = 8192;

/// A dataset being written: rows go to disk as they arrive, a row group at a time, in parts of
/// `ROWS_PER_PART` rows (see [`Store::parts`]).
pub struct PartWriter {
    store_dir: PathBuf,
    tmp: PathBuf,
    stage: String,
    schema: SchemaRef,
    /// The part being written: its name, its writer and its rows so far.
    open: Option<(String, ArrowWriter<std::io::BufWriter<File>>, usize)>,
    hasher: blake3::Hasher,
    files: Vec<String>,
    checks: Vec<FileCheck>,
    rows: usize,
}

impl std::fmt::Debug for PartWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartWriter").field("stage", &self.stage).field("rows", &self.rows).finish_non_exhaustive()
    }
}

impl PartWriter {
    /// Adds rows (in the dataset's order); every `ROWS_PER_PART` rows make a part file.
    pub fn push(&mut self, batch: RecordBatch) -> Result<()> {
        if batch.schema().fields() != self.schema.fields() {
            return Err(Error::Internal(format!(
                "stage `{}` produced rows that do not match its declared schema",
                self.stage
            )));
        }
        let mut offset = 0;
        while offset < batch.num_rows() {
            let (_, writer, rows) = match &mut self.open {
                Some(open) => open,
                None => self.open.insert(self.start_part()?),
            };
            let take = (ROWS_PER_PART - *rows).min(batch.num_rows() - offset);
            writer.write(&batch.slice(offset, take)).map_err(|e| Error::dataset(&self.tmp, e))?;
            *rows += take;
            offset += take;
            if *rows == ROWS_PER_PART {
                self.close_part()?;
            }
        }
        Ok(())
    }

    fn start_part(&self) -> Result<(String, ArrowWriter<std::io::BufWriter<File>>, usize)> {
        let name = format!("part-{:05}.parquet", self.files.len());
        let path = self.tmp.join(&name);
        let file = std::io::BufWriter::new(File::create(&path).map_err(|e| Error::io(&path, e))?);
        let props = parquet::file::properties::WriterProperties::builder()
            .set_max_row_group_row_count(Some(ROWS_PER_GROUP))
            .build();
        let writer =
            ArrowWriter::try_new(file, self.schema.clone(), Some(props)).map_err(|e| Error::dataset(&path, e))?;
        Ok((name, writer, 0))
    }

    /// Closes the part being written (starting an empty one first if there is none, so that a
    /// dataset without rows still has a part carrying its schema).
    fn close_part(&mut self) -> Result<()> {
        let (name, writer, rows) = match self.open.take() {
            Some(open) => open,
            None => self.start_part()?,
        };
        let path = self.tmp.join(&name);
        let mut file = writer.into_inner().map_err(|e| Error::dataset(&path, e))?;
        std::io::Write::flush(&mut file).map_err(|e| Error::io(&path, e))?;
        drop(file);
        // One pass over the file: its own hash, and the dataset's content hash.
        let mut own = blake3::Hasher::new();
        let mut reader = File::open(&path).map_err(|e| Error::io(&path, e))?;
        let mut buf = vec![0; 1 << 16];
        loop {
            let n = std::io::Read::read(&mut reader, &mut buf).map_err(|e| Error::io(&path, e))?;
            if n == 0 {
                break;
            }
            own.update(&buf[..n]);
            self.hasher.update(&buf[..n]);
        }
        let meta = std::fs::metadata(&path).map_err(|e| Error::io(&path, e))?;
        let check = FileCheck {
            path: path.strip_prefix(&self.store_dir).unwrap_or(&path).to_string_lossy().into_owned(),
            bytes: meta.len(),
            blake3: own.finalize().to_hex().to_string(),
            mtime_ns: mtime_ns(&meta),
        };
        self.checks.push(placed(&self.stage, check, &name));
        self.files.push(name);
        self.rows += rows;
        Ok(())
    }
}

/// The rows of a dataset folder, one part file at a time (at most `ROWS_PER_PART` rows held).
pub fn dataset_batches(dir: &Path) -> Result<impl Iterator<Item = Result<RecordBatch>> + Send + use<>> {
    let files = dataset_files(dir)?;
    Ok(files.into_iter().flat_map(|file| {
        let reader = File::open(&file).map_err(|e| Error::io(&file, e)).and_then(|f| {
            ParquetRecordBatchReaderBuilder::try_new(f).and_then(|b| b.build()).map_err(|e| Error::dataset(&file, e))
        });
        let batches: Box<dyn Iterator<Item = Result<RecordBatch>> + Send> = match reader {
            Ok(reader) => Box::new(reader.map(move |b| b.map_err(|e| Error::dataset(&file, e)))),
            Err(e) => Box::new(std::iter::once(Err(e))),
        };
        batches
    }))
}

fn schema_info(schema: &Schema) -> Vec<ColumnInfo> {
    schema
        .fields()
        .iter()
        .map(|f| ColumnInfo { name: f.name().clone(), data_type: f.data_type().to_string(), nullable: f.is_nullable() })
        .collect()
}

/// Schema of the rejection ledger.
pub fn rejection_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("row_id", DataType::Utf8, false),
        Field::new("stage", DataType::Utf8, false),
        Field::new("reason", DataType::Utf8, false),
        Field::new("detail", DataType::Utf8, false),
    ]))
}

fn rejection_batch(stage: &str, rejections: &[Rejection]) -> Result<RecordBatch> {
    #[derive(Serialize)]
    struct Row<'a> {
        row_id: &'a str,
        stage: &'a str,
        reason: &'a str,
        detail: &'a str,
    }
    let rows: Vec<Row> =
        rejections.iter().map(|r| Row { row_id: &r.row_id, stage, reason: &r.reason, detail: &r.detail }).collect();
    crate::rows::to_batch(&rejection_schema(), &rows)
}

/// The current time, RFC 3339.
pub fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, StringArray};

    fn schema() -> SchemaRef {
        crate::rows::schema_with_lineage(vec![Field::new("text", DataType::Utf8, false)])
    }

    fn batch(texts: &[&str]) -> RecordBatch {
        let rows: Vec<serde_json::Value> = texts
            .iter()
            .enumerate()
            .map(|(i, t)| serde_json::json!({"row_id": format!("r{i}"), "parent_ids": [], "text": t}))
            .collect();
        crate::rows::to_batch(&schema(), &rows).unwrap()
    }

    fn manifest() -> Manifest {
        let parts = crate::fingerprint::parts_with(serde_json::json!({}));
        Manifest {
            stage: "s".into(),
            fingerprint: parts.fingerprint(),
            parts,
            input_fingerprints: BTreeMap::new(),
            content_hash: String::new(),
            schema: vec![],
            row_count: 0,
            rejected: 0,
            files: vec![],
            started_at: now(),
            finished_at: String::new(),
            counters: BTreeMap::new(),
            checks: Vec::new(),
        }
    }

    fn texts(dir: &Path) -> Vec<String> {
        let batches = read_dataset(dir).unwrap();
        batches
            .iter()
            .flat_map(|b| {
                let col = b.column_by_name("text").unwrap().as_any().downcast_ref::<StringArray>().unwrap().clone();
                (0..col.len()).map(move |i| col.value(i).to_string())
            })
            .collect()
    }

    #[test]
    fn a_written_dataset_reads_back_with_its_manifest() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let rejection = Rejection { row_id: "x".into(), reason: "too_short".into(), detail: "0 words".into() };
        let m = store.write(&schema(), &[batch(&["a", "b"]), batch(&["c"])], &[rejection], &[], manifest()).unwrap();
        assert_eq!((m.row_count, m.rejected, m.files.len()), (3, 1, 1));
        assert_eq!(store.manifest("s").unwrap().unwrap().content_hash, m.content_hash);
        assert_eq!(texts(&store.stage_dir("s")), ["a", "b", "c"]);
        let again = store.write(&schema(), &[batch(&["a", "b"]), batch(&["c"])], &[], &[], manifest()).unwrap();
        assert_eq!(again.content_hash, m.content_hash, "the same rows hash the same");
        let other = store.write(&schema(), &[batch(&["z"])], &[], &[], manifest()).unwrap();
        assert_ne!(other.content_hash, m.content_hash);
        assert_eq!(texts(&store.stage_dir("s")), ["z"], "a rewrite replaces the dataset");
    }

    #[test]
    fn unfinished_and_damaged_datasets_are_not_datasets() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        // Above the kernel's largest pid: the run that made it is gone. Pid 1 always runs.
        std::fs::create_dir_all(dir.path().join(".tmp-s-4194305")).unwrap();
        std::fs::create_dir_all(dir.path().join(".tmp-s-1")).unwrap();
        std::fs::create_dir_all(dir.path().join("s")).unwrap();
        assert!(store.manifest("s").unwrap().is_none(), "a folder without a manifest is unfinished");
        std::fs::write(dir.path().join("s").join(MANIFEST), "{ not json").unwrap();
        assert!(store.manifest("s").unwrap().is_none(), "a damaged manifest means rebuild");
        store.clean_leftovers().unwrap();
        assert!(!dir.path().join(".tmp-s-4194305").exists());
        assert!(dir.path().join(".tmp-s-1").exists(), "a running run's folder is left alone");
    }
}
