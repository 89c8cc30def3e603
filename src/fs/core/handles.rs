//! Open file handles: which file each is on, how it reads, how the kernel
//! reads it, and how many are open per file.
//!
//! Data flow. `open` and `create` (super::open) add a handle; `read`,
//! `write`, `flush` and `fsync` look it up; `release` removes it and learns
//! whether it was the file's last, which is when a stream ends and an
//! unlinked file goes. A file moved to another record gets a new id, and its
//! handles follow ([`Handles::rekey`]). The lock is a leaf: never held across
//! an await or while another lock is taken.
//!
//! The kernel's side of each handle ([`KernelIo`]) is chosen here, with the
//! count of each kind per file, in one step ([`Handles::open_kernel`]): the
//! kernel takes a handle that reads from a backing file (super::backing) only
//! while no handle of the inode uses its page cache; while one does, every
//! other handle of the inode must name the same backing file (those that
//! would have used the page cache or direct I/O then name it with direct
//! I/O, which still sends their reads and writes here). The file's backing
//! file, while it has one, is held here too, dropped with the last handle
//! that names it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use super::backing::Backing;
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

/// How the kernel reads and writes through a handle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum KernelIo {
    /// Through its page cache: reads that miss it and every write come here.
    PageCache,
    /// Every read and write comes here, past the page cache.
    Direct,
    /// Reads and maps are answered by the kernel from the file's backing file
    /// (super::backing), without a request to the daemon; or, if `direct`,
    /// reads and writes come here with direct I/O and maps go to the backing
    /// file (the kernel wants every handle of an inode with a backing file
    /// to name it).
    Passthrough {
        /// Reads and writes come to the daemon.
        direct: bool,
    },
}

/// What the opener would like; [`Handles::open_kernel`] says what it gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum KernelWish {
    /// The page cache (direct I/O while the file has a backing file).
    PageCache,
    /// Direct I/O.
    Direct,
    /// The file's backing file (the page cache while another handle uses it).
    Passthrough,
}

struct Handle {
    file: FileId,
    mode: HandleMode,
    io: KernelIo,
}

/// The open handles of one file.
#[derive(Default)]
struct PerFile {
    handles: usize,
    page_cache: usize,
    passthrough: usize,
    /// Held while `passthrough` is not zero (and dropped with the last).
    backing: Option<Arc<Backing>>,
}

#[derive(Default)]
struct Table {
    handles: HashMap<u64, Handle>,
    open: HashMap<FileId, PerFile>,
}

impl Table {
    fn count(&mut self, file: FileId, io: KernelIo, up: bool) -> Option<Arc<Backing>> {
        let per = self.open.entry(file).or_default();
        let mut direct = 0;
        let n = match io {
            KernelIo::PageCache => &mut per.page_cache,
            KernelIo::Direct => &mut direct,
            KernelIo::Passthrough { .. } => &mut per.passthrough,
        };
        if up {
            *n += 1;
            per.handles += 1;
            return None;
        }
        *n = n.saturating_sub(1);
        per.handles = per.handles.saturating_sub(1);
        let dropped = if per.passthrough == 0 { per.backing.take() } else { None };
        if per.handles == 0 {
            self.open.remove(&file);
        }
        dropped
    }
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

    /// A new handle on `file`, read by the kernel through its page cache.
    pub(super) fn open(&self, file: FileId, mode: HandleMode) -> u64 {
        self.open_kernel(file, mode, KernelWish::PageCache).0
    }

    /// A new handle on `file`, with what the kernel may do with it given the
    /// file's other handles (see the module's comment), and the file's
    /// backing file if it has one and the handle reads from it.
    pub(super) fn open_kernel(
        &self,
        file: FileId,
        mode: HandleMode,
        wish: KernelWish,
    ) -> (u64, KernelIo, Option<Arc<Backing>>) {
        let fh = self.next.fetch_add(1, Ordering::Relaxed);
        let mut t = self.table.lock();
        let per = t.open.get(&file);
        let (page_cache, passthrough) = per.map_or((0, 0), |p| (p.page_cache, p.passthrough));
        let io = match wish {
            KernelWish::Direct | KernelWish::PageCache if passthrough > 0 => {
                KernelIo::Passthrough { direct: true }
            }
            KernelWish::Direct => KernelIo::Direct,
            KernelWish::PageCache => KernelIo::PageCache,
            KernelWish::Passthrough if page_cache > 0 => KernelIo::PageCache,
            KernelWish::Passthrough => KernelIo::Passthrough { direct: false },
        };
        let backing = match io {
            KernelIo::Passthrough { .. } => per.and_then(|p| p.backing.clone()),
            _ => None,
        };
        t.handles.insert(fh, Handle { file, mode, io });
        t.count(file, io, true);
        (fh, io, backing)
    }

    /// Gives the file of passthrough handle `fh` its backing file; the one it
    /// has already if another opener was first (that one is returned).
    pub(super) fn set_backing(&self, fh: u64, backing: Arc<Backing>) -> Result<Arc<Backing>> {
        let mut t = self.table.lock();
        let h = t.handles.get(&fh).ok_or_else(bad_handle)?;
        let file = h.file;
        if !matches!(h.io, KernelIo::Passthrough { .. }) {
            return Err(FsError::Invalid("not a passthrough handle".into()));
        }
        let per = t.open.entry(file).or_default();
        Ok(Arc::clone(per.backing.get_or_insert(backing)))
    }

    /// Handle `fh` reads with direct I/O instead of from a backing file (none
    /// could be made, or the kernel refused it). Direct I/O goes with any
    /// other handle the kernel holds. Returns the backing file if it was its
    /// file's last user, to be dropped by the caller.
    pub(super) fn demote(&self, fh: u64) -> Option<Arc<Backing>> {
        let mut t = self.table.lock();
        let h = t.handles.get_mut(&fh)?;
        let was = h.io;
        if !matches!(was, KernelIo::Passthrough { .. }) {
            return None;
        }
        h.io = KernelIo::Direct;
        let file = h.file;
        let dropped = t.count(file, was, false);
        t.count(file, KernelIo::Direct, true);
        dropped
    }

    /// The backing file of `file`, while a handle reads from it.
    pub(super) fn backing(&self, file: FileId) -> Option<Arc<Backing>> {
        self.table.lock().open.get(&file).and_then(|p| p.backing.clone())
    }

    /// The backing files held, with their files.
    pub(super) fn backings(&self) -> Vec<Arc<Backing>> {
        self.table.lock().open.values().filter_map(|p| p.backing.clone()).collect()
    }

    /// The file and mode of handle `fh`.
    pub(super) fn get(&self, fh: u64) -> Result<(FileId, HandleMode)> {
        let t = self.table.lock();
        let h = t.handles.get(&fh).ok_or_else(bad_handle)?;
        Ok((h.file, h.mode.clone()))
    }

    /// How the kernel reads and writes through handle `fh`.
    pub(super) fn kernel_io(&self, fh: u64) -> Option<KernelIo> {
        self.table.lock().handles.get(&fh).map(|h| h.io)
    }

    /// The file handle `fh` is on.
    pub(super) fn file(&self, fh: u64) -> Result<FileId> {
        self.table.lock().handles.get(&fh).map(|h| h.file).ok_or_else(bad_handle)
    }

    /// Removes handle `fh`; returns its file. The file's backing file goes
    /// with its last handle that read from it (dropped here, after the lock).
    pub(super) fn close(&self, fh: u64) -> Result<FileId> {
        let mut t = self.table.lock();
        let h = t.handles.remove(&fh).ok_or_else(bad_handle)?;
        let dropped = t.count(h.file, h.io, false);
        drop(t);
        drop(dropped);
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
        if let Some(moved) = t.open.remove(&old) {
            let per = t.open.entry(new).or_default();
            per.handles += moved.handles;
            per.page_cache += moved.page_cache;
            per.passthrough += moved.passthrough;
            if per.backing.is_none() {
                per.backing = moved.backing;
            }
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
