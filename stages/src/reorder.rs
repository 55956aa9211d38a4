//! The reorder buffer of the LLM stages: rows that finished ahead of an earlier one wait here
//! to be handed on in request order. Up to [`IN_MEMORY`] of them wait in memory; the rest are
//! written to unlinked temporary files beside the row cache, in segments of about
//! [`SEGMENT_BYTES`], each dropped (or emptied, for the one being written) once every row in it
//! was read back. A slow or hung request then costs disk, not memory, however many rows finish
//! while it is out.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use kiln_pipeline::{Error, Result};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Rows held in memory before further ones go to disk.
pub const IN_MEMORY: usize = 1024;

/// Size past which a new temporary file is started.
pub const SEGMENT_BYTES: u64 = 8 << 20;

/// Values waiting to be taken in index order (see the module).
pub struct Reorder<S, V> {
    dir: PathBuf,
    in_memory_cap: usize,
    segment_bytes: u64,
    /// Index of the next value to hand on: the first slot's.
    next: usize,
    slots: VecDeque<Option<(S, Place<V>)>>,
    in_memory: usize,
    /// Temporary files, oldest first; the last one is written to.
    segments: VecDeque<Segment>,
    /// Number of `segments[0]` (segments are numbered in creation order).
    first_segment: u64,
}

/// Where a waiting value is.
enum Place<V> {
    Memory(Box<V>),
    Disk { segment: u64, offset: u64, len: usize },
}

/// One temporary file: unlinked at creation, gone when dropped.
struct Segment {
    file: Option<File>,
    written: u64,
    /// Values in it not yet read back.
    unread: usize,
}

impl<S, V: Serialize + DeserializeOwned> Reorder<S, V> {
    /// An empty buffer whose temporary files go in `dir`.
    pub fn new(dir: &Path) -> Self {
        Self::with_limits(dir, IN_MEMORY, SEGMENT_BYTES)
    }

    fn with_limits(dir: &Path, in_memory_cap: usize, segment_bytes: u64) -> Self {
        Reorder {
            dir: dir.to_path_buf(),
            in_memory_cap,
            segment_bytes,
            next: 0,
            slots: VecDeque::new(),
            in_memory: 0,
            segments: VecDeque::new(),
            first_segment: 0,
        }
    }

    /// Index of the next value to hand on (how many were handed on so far).
    pub fn next(&self) -> usize {
        self.next
    }

    /// Files `value` (with what it came from) as the one with index `at`, which must not have
    /// been handed on or filed already.
    pub fn put(&mut self, at: usize, source: S, value: V) -> Result<()> {
        let slot = at.checked_sub(self.next).ok_or_else(|| Error::Internal(format!("row {at} filed twice")))?;
        if self.slots.len() <= slot {
            self.slots.resize_with(slot + 1, || None);
        }
        // The next row is taken at once: no need to write it out.
        let place = if self.in_memory < self.in_memory_cap || slot == 0 {
            self.in_memory += 1;
            Place::Memory(Box::new(value))
        } else {
            self.write(&value)?
        };
        self.slots[slot] = Some((source, place));
        Ok(())
    }

    /// The next value in index order, when it has been filed.
    pub fn pop(&mut self) -> Result<Option<(S, V)>> {
        if !matches!(self.slots.front(), Some(Some(_))) {
            return Ok(None);
        }
        let Some(Some((source, place))) = self.slots.pop_front() else { unreachable!("checked above") };
        self.next += 1;
        let value = match place {
            Place::Memory(value) => {
                self.in_memory -= 1;
                *value
            }
            Place::Disk { segment, offset, len } => self.read(segment, offset, len)?,
        };
        Ok(Some((source, value)))
    }

    /// Appends `value` to the segment being written (a new one when it is full).
    fn write(&mut self, value: &V) -> Result<Place<V>> {
        let bytes = serde_json::to_vec(value).map_err(|e| Error::Internal(format!("reorder buffer: {e}")))?;
        if self.segments.back().is_none_or(|s| s.written >= self.segment_bytes) {
            let file = tempfile::tempfile_in(&self.dir).map_err(|e| Error::io(&self.dir, e))?;
            self.segments.push_back(Segment { file: Some(file), written: 0, unread: 0 });
        }
        let number = self.first_segment + self.segments.len() as u64 - 1;
        let last = self.segments.back_mut().expect("a segment is open");
        let offset = last.written;
        let file = last.file.as_mut().expect("the last segment is open");
        let done = file.seek(SeekFrom::Start(offset)).and_then(|_| file.write_all(&bytes));
        done.map_err(|e| Error::io(&self.dir, e))?;
        last.written += bytes.len() as u64;
        last.unread += 1;
        Ok(Place::Disk { segment: number, offset, len: bytes.len() })
    }

    /// Reads a value back, and lets go of the segments nothing is left to read from.
    fn read(&mut self, number: u64, offset: u64, len: usize) -> Result<V> {
        let k = (number - self.first_segment) as usize;
        let writing = k + 1 == self.segments.len();
        let segment = &mut self.segments[k];
        let file = segment.file.as_mut().ok_or_else(|| Error::Internal("reorder segment read after its end".into()))?;
        let mut bytes = vec![0; len];
        let read = file.seek(SeekFrom::Start(offset)).and_then(|_| file.read_exact(&mut bytes));
        read.map_err(|e| Error::io(&self.dir, e))?;
        segment.unread -= 1;
        if segment.unread == 0 {
            if writing {
                // The one being written: start it over.
                segment.written = 0;
                file.set_len(0).map_err(|e| Error::io(&self.dir, e))?;
            } else {
                segment.file = None;
            }
        }
        while self.segments.front().is_some_and(|s| s.file.is_none()) {
            self.segments.pop_front();
            self.first_segment += 1;
        }
        serde_json::from_slice(&bytes).map_err(|e| Error::Internal(format!("reorder buffer: {e}")))
    }

    /// Temporary files open now.
    #[cfg(test)]
    fn files_open(&self) -> usize {
        self.segments.iter().filter(|s| s.file.is_some()).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_come_out_in_index_order_from_memory_and_disk() {
        let dir = tempfile::tempdir().unwrap();
        // 8 in memory, files of ~200 bytes: most values go to disk, over many files.
        let mut buffer: Reorder<usize, (String, u64)> = Reorder::with_limits(dir.path(), 8, 200);
        let n = 500;
        // A scrambled order: 7919 is prime to 500.
        let order: Vec<usize> = (0..n).map(|i| i * 7919 % n).collect();
        let mut out = Vec::new();
        let mut most_files = 0;
        for at in order {
            buffer.put(at, at, (format!("row {at}"), at as u64 * 3)).unwrap();
            most_files = most_files.max(buffer.files_open());
            while let Some((source, (text, value))) = buffer.pop().unwrap() {
                assert_eq!((text, value), (format!("row {source}"), source as u64 * 3));
                out.push(source);
            }
        }
        assert_eq!(out, (0..n).collect::<Vec<_>>());
        assert!(most_files > 3, "values went to several files ({most_files})");
        assert_eq!(buffer.files_open(), 1, "files read through are dropped; the last one is emptied");
        assert_eq!(buffer.segments.back().unwrap().written, 0);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "the files are unlinked");
    }

    #[test]
    fn a_row_filed_twice_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut buffer: Reorder<(), u32> = Reorder::new(dir.path());
        buffer.put(0, (), 1).unwrap();
        assert_eq!(buffer.pop().unwrap(), Some(((), 1)));
        assert!(buffer.put(0, (), 1).is_err());
        assert_eq!(buffer.pop().unwrap(), None);
    }
}
