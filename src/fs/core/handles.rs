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
    /// Made by the first handle that read from it; kept after the last, for
    /// the next (while it follows the plaintext and the budget has room:
    /// [`Handles::drop_unnamed`]).
    backing: Option<Arc<Backing>>,
    /// A handle that may write named the backing file (so the kernel may
    /// have mapped it shared and writable for it: super::backing).
    writer_named: bool,
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
        let mut dropped = None;
        if per.handles == 0 && per.writer_named {
            // Not kept: a writer's shared map may still write into it, and
            // nothing would take those writes any more.
            per.writer_named = false;
            dropped = per.backing.take();
        }
        if per.handles == 0 && per.backing.is_none() {
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
        let _ = t.count(file, io, true);
        if io == (KernelIo::Passthrough { direct: true }) {
            t.open.entry(file).or_default().writer_named = true;
        }
        (fh, io, backing)
    }

    /// Keeps `backing` for `file`'s next reader, made ahead of it; false if
    /// the file has one already or a writer may have mapped the old one.
    pub(super) fn keep_backing(&self, file: FileId, backing: Arc<Backing>) -> bool {
        let mut t = self.table.lock();
        let per = t.open.entry(file).or_default();
        if per.backing.is_some() || per.writer_named {
            return false;
        }
        per.backing = Some(backing);
        true
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

    /// Handle `fh` reads with direct I/O instead of from a backing file (the
    /// kernel refused it, or none was made). Direct I/O goes with any other
    /// handle the kernel holds.
    pub(super) fn demote(&self, fh: u64) {
        let mut t = self.table.lock();
        let Some(h) = t.handles.get_mut(&fh) else { return };
        let was = h.io;
        if !matches!(was, KernelIo::Passthrough { .. }) {
            return;
        }
        h.io = KernelIo::Direct;
        let file = h.file;
        t.count(file, KernelIo::Direct, true);
        let dropped = t.count(file, was, false);
        drop(t);
        drop(dropped);
    }

    /// Takes the backing files no handle names: of `file`, or of every file
    /// if `None` (to make room, or when the file goes). Returned, to be
    /// dropped by the caller after the lock.
    pub(super) fn drop_unnamed(&self, file: Option<FileId>) -> Vec<Arc<Backing>> {
        let mut t = self.table.lock();
        let mut dropped = Vec::new();
        t.open.retain(|f, per| {
            if file.is_none_or(|want| want == *f) && per.passthrough == 0 {
                dropped.extend(per.backing.take());
            }
            per.handles > 0 || per.backing.is_some()
        });
        dropped
    }

    /// Whether a handle reads from or names `file`'s backing file.
    pub(super) fn backing_named(&self, file: FileId) -> bool {
        self.table.lock().open.get(&file).is_some_and(|p| p.passthrough > 0)
    }

    /// Whether a handle that may write named `file`'s backing file since its
    /// handles were last all closed.
    pub(super) fn named_by_writer(&self, file: FileId) -> bool {
        self.table.lock().open.get(&file).is_some_and(|p| p.writer_named)
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

    /// The file handle `fh` is on.
    pub(super) fn file(&self, fh: u64) -> Result<FileId> {
        self.table.lock().handles.get(&fh).map(|h| h.file).ok_or_else(bad_handle)
    }

    /// Removes handle `fh`; returns its file.
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
        self.table.lock().open.get(&file).is_some_and(|p| p.handles > 0)
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
            per.writer_named |= moved.writer_named;
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

    fn open(handles: &Handles, file: FileId, wish: KernelWish) -> (u64, KernelIo) {
        let (fh, io, _) = handles.open_kernel(file, HandleMode::Cached, wish);
        (fh, io)
    }

    #[test]
    fn the_kernel_gets_what_the_other_handles_of_the_file_allow() {
        let handles = Handles::new();
        let f = FileId::random().unwrap();
        // Direct I/O goes with anything; a backing file comes first here.
        let (d, io) = open(&handles, f, KernelWish::Direct);
        assert_eq!(io, KernelIo::Direct);
        let (r, io) = open(&handles, f, KernelWish::Passthrough);
        assert_eq!(io, KernelIo::Passthrough { direct: false });
        let backing = Arc::new(Backing::new(b"plaintext").unwrap());
        let set = handles.set_backing(r, Arc::clone(&backing)).unwrap();
        assert!(Arc::ptr_eq(&set, &backing));
        assert!(!handles.named_by_writer(f));
        // While it has one, every other handle names it.
        let (w, io) = open(&handles, f, KernelWish::PageCache);
        assert_eq!(io, KernelIo::Passthrough { direct: true });
        assert!(handles.named_by_writer(f));
        let (w2, io) = open(&handles, f, KernelWish::Direct);
        assert_eq!(io, KernelIo::Passthrough { direct: true });
        let (_, io, named) = handles.open_kernel(f, HandleMode::Cached, KernelWish::Passthrough);
        assert_eq!(io, KernelIo::Passthrough { direct: false });
        assert!(named.is_some_and(|b| Arc::ptr_eq(&b, &backing)), "the same backing file");
        for fh in [r, w, w2, d] {
            handles.close(fh).unwrap();
        }
        assert!(handles.drop_unnamed(Some(f)).is_empty(), "one handle still names it");
        assert!(handles.backing(f).is_some());
        // A page-cache handle first: no backing file next to it.
        let g = FileId::random().unwrap();
        let (p, io) = open(&handles, g, KernelWish::PageCache);
        assert_eq!(io, KernelIo::PageCache);
        let (q, io) = open(&handles, g, KernelWish::Passthrough);
        assert_eq!(io, KernelIo::PageCache);
        handles.close(p).unwrap();
        handles.close(q).unwrap();
        // Kept after its last handle, for the next; dropped on demand.
        let (r, _) = open(&handles, g, KernelWish::Passthrough);
        handles.set_backing(r, Arc::new(Backing::new(b"x").unwrap())).unwrap();
        handles.demote(r);
        let (s, io) = open(&handles, g, KernelWish::PageCache);
        assert_eq!(io, KernelIo::PageCache, "direct I/O does not hold the page cache back");
        handles.close(r).unwrap();
        handles.close(s).unwrap();
        assert!(!handles.is_open(g) && handles.backing(g).is_some(), "kept");
        assert_eq!(handles.drop_unnamed(None).len(), 1);
        assert!(handles.backing(g).is_none());
    }

    #[test]
    fn open_counts_follow_handles() {
        let handles = Handles::new();
        let (a, b) = (FileId::random().unwrap(), FileId::random().unwrap());
        let h1 = open(&handles, a, KernelWish::PageCache).0;
        let h2 = open(&handles, a, KernelWish::PageCache).0;
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
