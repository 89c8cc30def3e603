//! Open file handles: which file each is on, how it reads, and how many are
//! open per file.
//!
//! Data flow. `open` and `create` (super::open) add a handle; `read`,
//! `write`, `flush` and `fsync` look it up; `release` removes it and learns
//! whether it was the file's last, which is when a stream ends and an
//! unlinked file goes. A file moved to another record gets a new id, and its
//! handles follow ([`Handles::rekey`]). The lock is a leaf: never held across
//! an await or while another lock is taken.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use super::passread::PassRead;
use super::{FsError, Result};
use crate::ids::FileId;

/// How a handle reads its file.
#[derive(Clone)]
pub(super) enum HandleMode {
    /// From the file's plaintext in the cache (and writes go there too, or to
    /// the file's stream).
    Cached,
    /// A pass-through file opened for reading: ranges from the server, each
    /// piece checked ([`PassRead`]).
    PassRead(Arc<tokio::sync::Mutex<PassRead>>),
}

struct Handle {
    file: FileId,
    mode: HandleMode,
}

#[derive(Default)]
struct Table {
    handles: HashMap<u64, Handle>,
    open: HashMap<FileId, usize>,
}

/// The handle table.
pub(super) struct Handles {
    next: AtomicU64,
    table: Mutex<Table>,
}

impl Handles {
    pub(super) fn new() -> Self {
        Handles { next: AtomicU64::new(1), table: Mutex::new(Table::default()) }
    }

    /// A new handle on `file`.
    pub(super) fn open(&self, file: FileId, mode: HandleMode) -> u64 {
        let fh = self.next.fetch_add(1, Ordering::Relaxed);
        let mut t = self.table.lock();
        t.handles.insert(fh, Handle { file, mode });
        *t.open.entry(file).or_default() += 1;
        fh
    }

    /// The file and mode of handle `fh`.
    pub(super) fn get(&self, fh: u64) -> Result<(FileId, HandleMode)> {
        let t = self.table.lock();
        let h = t.handles.get(&fh).ok_or_else(bad_handle)?;
        Ok((h.file, h.mode.clone()))
    }

    /// The file handle `fh` is on.
    pub(super) fn file(&self, fh: u64) -> Result<FileId> {
        self.table.lock().handles.get(&fh).map(|h| h.file).ok_or_else(bad_handle)
    }

    /// Removes handle `fh`; returns its file.
    pub(super) fn close(&self, fh: u64) -> Result<FileId> {
        let mut t = self.table.lock();
        let h = t.handles.remove(&fh).ok_or_else(bad_handle)?;
        if let Some(n) = t.open.get_mut(&h.file) {
            *n -= 1;
            if *n == 0 {
                t.open.remove(&h.file);
            }
        }
        Ok(h.file)
    }

    /// Whether any handle is open on `file`.
    pub(super) fn is_open(&self, file: FileId) -> bool {
        self.table.lock().open.contains_key(&file)
    }

    /// The file `old` is now `new` (moved to another record): its handles follow.
    pub(super) fn rekey(&self, old: FileId, new: FileId) {
        let mut t = self.table.lock();
        for h in t.handles.values_mut() {
            if h.file == old {
                h.file = new;
            }
        }
        if let Some(n) = t.open.remove(&old) {
            *t.open.entry(new).or_default() += n;
        }
    }
}

fn bad_handle() -> FsError {
    FsError::Invalid("bad file handle".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_counts_follow_handles() {
        let handles = Handles::new();
        let (a, b) = (FileId::random().unwrap(), FileId::random().unwrap());
        let h1 = handles.open(a, HandleMode::Cached);
        let h2 = handles.open(a, HandleMode::Cached);
        assert_ne!(h1, h2);
        assert!(handles.is_open(a) && !handles.is_open(b));
        assert_eq!(handles.close(h1).unwrap(), a);
        assert!(handles.is_open(a), "one left");
        handles.rekey(a, b);
        assert_eq!(handles.file(h2).unwrap(), b);
        assert!(handles.is_open(b) && !handles.is_open(a));
        assert_eq!(handles.close(h2).unwrap(), b);
        assert!(!handles.is_open(b));
        assert!(matches!(handles.close(h2), Err(FsError::Invalid(_))), "closed once");
    }
}
