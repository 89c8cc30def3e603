//! Kernel passthrough: plaintext the kernel reads without asking the daemon.
//!
//! Data flow. At mount the FUSE adapter says whether the kernel takes backing
//! files ([`PassthroughMode`]: it needs kernel 6.9 or later and root). An open
//! for reading only of an end-to-end file of at least [`PASSTHROUGH_MIN`]
//! bytes whose plaintext is whole in the cache gets the file's [`Backing`]: a
//! memfd (anonymous shared memory, never a file on any disk) holding a copy
//! of the plaintext. Not a cold open: its reads start before the download
//! ends. Nor an open whose kernel pages of the file are still good (`keep`):
//! the kernel reads those as fast, and the backing file is made in the
//! background at its last close, for the opens after it: no open waits for
//! a copy of the whole file, and no copy competes with its reads. The adapter registers it with the kernel once per backing,
//! and the kernel then answers that handle's reads and maps from it without
//! a request to the daemon: no copy through /dev/fuse, no hand-off between
//! threads.
//!
//! The kernel takes one backing file per inode at a time, none while a
//! handle of the inode uses its page cache, and, while the inode has one,
//! only handles that name it: so which handle gets what is decided, and
//! counted per file, in one step in super::handles, and a file opened for
//! writing while another handle reads from its backing file names it with
//! direct I/O. Its reads and writes still come here; a write changes the
//! cached plaintext, is uploaded at close as ever, and is copied into the
//! backing file under the file's plaintext lock before it is answered (so
//! is a truncation, and a new version downloaded into the cache): a reader
//! through the kernel sees what a read through the daemon would.
//!
//! The memfd is sealed against every write but through the mapping this
//! process made before the seal (`F_SEAL_FUTURE_WRITE`), and only this
//! process and the kernel hold it (close-on-exec). One way around the seal
//! is the kernel's own: a handle opened for writing that names the backing
//! file and maps it shared and writable writes into it directly (the kernel
//! maps the backing file for it and does not check the seal through the
//! FUSE file). Such writes are taken into the cache at that handle's flush,
//! fsync and release ([`VaultFs::take_mapped_writes`]) and saved like any
//! other; ones made through the map after the file's last close are not
//! (the backing file is then dropped, and the map keeps a copy nobody reads).
//!
//! Its pages are mapped into this process to be written, so the process's
//! memory lock (`mlockall`, super::super::super::cache::harden) keeps them
//! out of swap where the limit allows, and they are left out of core dumps.
//! They are counted against the cache budget: no backing file is made that
//! would take the cache over it (the open then uses the page cache), and
//! the cache counts the backing files' bytes when it decides what to evict.
//! A backing file is kept after the last handle that names it, for the next
//! open, and follows the plaintext meanwhile; kept ones go when a new one
//! needs their room, when a handle that may write opens, with their file,
//! and at the last close if a writer named one (its map could go on writing
//! into it).
#![allow(unsafe_code)]

use std::any::Any;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, MutexGuard};

use super::handles::{HandleMode, KernelIo, KernelWish};
use super::{FsError, Result, VaultFs};
use crate::cache::{PlainHandle, SecretBuf};
use crate::ids::FileId;
use crate::remote::Remote;

/// Smaller files get no backing file: the kernel's page cache already holds
/// them after one read, and making, filling, registering and dropping a
/// memfd costs about as many system calls as reading a small file through
/// the daemon does.
pub const PASSTHROUGH_MIN: u64 = 256 << 10;

/// How an open asks for a file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpenHow {
    /// Opened for reading.
    pub read: bool,
    /// Opened for writing.
    pub write: bool,
    /// O_TRUNC.
    pub truncate: bool,
    /// O_DIRECT: the caller asked to bypass caches.
    pub direct: bool,
}

impl OpenHow {
    /// From open(2) flags.
    pub fn from_flags(flags: i32) -> Self {
        let access = flags & libc::O_ACCMODE;
        OpenHow {
            read: access != libc::O_WRONLY,
            write: access != libc::O_RDONLY,
            truncate: flags & libc::O_TRUNC != 0,
            direct: flags & libc::O_DIRECT != 0,
        }
    }
}

/// What the kernel is told of a new handle.
pub enum KernelOpen {
    /// Read through its page cache; `keep` if the pages it holds of the
    /// file are still good.
    PageCache {
        /// The cached pages are of the current version.
        keep: bool,
    },
    /// Direct I/O: every read and write comes to the daemon; `keep` as for
    /// the page cache (the kernel drops the file's cached pages otherwise).
    Direct {
        /// The cached pages are of the current version.
        keep: bool,
    },
    /// Names this backing file, registered with the kernel by the caller:
    /// the kernel reads from it, or, if `direct`, sends reads and writes to
    /// the daemon (direct I/O) and maps the backing file.
    Passthrough {
        /// The file's backing file.
        backing: Arc<Backing>,
        /// Reads and writes still come to the daemon.
        direct: bool,
    },
}

/// Whether handles may read from backing files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PassthroughMode {
    /// The kernel answers reads of files opened for reading from memory.
    On,
    /// Every read comes to the daemon; why.
    Off(String),
}

impl std::fmt::Display for PassthroughMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PassthroughMode::On => {
                f.write_str("on (reads of files open for reading served by the kernel from memory)")
            }
            PassthroughMode::Off(why) => write!(f, "off ({why})"),
        }
    }
}

/// The mount's passthrough mode and how often it was used.
pub(super) struct Passthrough {
    /// Whether the user lets the kernel read from backing files.
    wanted: bool,
    mode: Mutex<PassthroughMode>,
    opens: AtomicU64,
    /// Files opened while the kernel's pages were good and no backing file
    /// was there: one is made at their last close, for the next open.
    ahead: Mutex<std::collections::HashSet<FileId>>,
}

impl Passthrough {
    pub(super) fn new(wanted: bool) -> Self {
        let mode = PassthroughMode::Off("not mounted".into());
        Passthrough { wanted, mode: Mutex::new(mode), opens: AtomicU64::new(0), ahead: Mutex::default() }
    }
}

/// A file's plaintext in a memfd, for the kernel to read from.
pub struct Backing {
    /// What the kernel knows it by (the adapter's, opaque here); dropped
    /// first, which tells the kernel to let go of it.
    registration: Mutex<Option<Box<dyn Any + Send + Sync>>>,
    map: Mutex<Map>,
    fd: OwnedFd,
    /// A change could not be copied in: it no longer follows the plaintext.
    broken: std::sync::atomic::AtomicBool,
}

/// The memfd's pages as mapped here: `len` bytes (the memfd's size) in a
/// mapping of `mapped` bytes, whole pages.
struct Map {
    ptr: Option<NonNull<u8>>,
    len: usize,
    mapped: usize,
}

// SAFETY: the mapping is reached only through the `Mutex<Map>` it lives in.
unsafe impl Send for Map {}

impl Backing {
    /// A memfd holding `bytes`, sealed against every write but through the
    /// mapping made here before the seal.
    pub(super) fn new(bytes: &[u8]) -> io::Result<Backing> {
        // SAFETY: the name is a NUL-terminated literal; the flags are plain values.
        let raw = unsafe {
            libc::memfd_create(c"vaultfs-plaintext".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: memfd_create returned a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut map = Map { ptr: None, len: 0, mapped: 0 };
        map.map_first(fd.as_fd(), bytes.len())?;
        // Written with pwrite before the seal: the kernel fills its pages
        // directly, without a page fault per page of our mapping.
        let mut done = 0;
        while done < bytes.len() {
            let rest = &bytes[done..];
            // SAFETY: pwrite from a slice we borrow, of its length, at an offset within it.
            let n = unsafe {
                libc::pwrite(fd.as_raw_fd(), rest.as_ptr().cast(), rest.len(), done as libc::off_t)
            };
            if n <= 0 {
                let e = io::Error::last_os_error();
                map.unmap();
                return Err(e);
            }
            done += n as usize;
        }
        // From here on no write reaches the pages but through our mapping:
        // not write(2), not a new shared writable map of the memfd (but see
        // the module's comment on maps the kernel makes for a FUSE file).
        // SAFETY: fcntl on a descriptor we own, with plain values.
        if unsafe {
            libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_FUTURE_WRITE | libc::F_SEAL_SEAL)
        } != 0
        {
            let e = io::Error::last_os_error();
            map.unmap();
            return Err(e);
        }
        Ok(Backing { registration: Mutex::new(None), map: Mutex::new(map), fd, broken: Default::default() })
    }

    /// The memfd, to be registered with the kernel.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// What the kernel knows this backing file by, once the adapter set it.
    pub fn registration(&self) -> MutexGuard<'_, Option<Box<dyn Any + Send + Sync>>> {
        self.registration.lock()
    }

    /// Its size in bytes.
    pub fn len(&self) -> u64 {
        self.map.lock().len as u64
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Writes `data` at `offset`, growing it as needed.
    pub(super) fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut map = self.map.lock();
        let offset = usize::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
        let end = offset.checked_add(data.len()).ok_or_else(|| io::Error::from_raw_os_error(libc::EFBIG))?;
        if end > map.len {
            map.resize(self.fd.as_fd(), end)?;
        }
        map.copy_in(offset, data);
        Ok(())
    }

    /// Cuts or extends it (with zeros) to `len` bytes.
    pub(super) fn set_len(&self, len: u64) -> io::Result<()> {
        let len = usize::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
        self.map.lock().resize(self.fd.as_fd(), len)
    }

    /// Makes `plain` hold what this holds; false if it did already (or this
    /// no longer follows the plaintext: then what it holds is not newer).
    fn copy_out_if_changed(&self, plain: &mut SecretBuf) -> bool {
        if self.broken.load(Ordering::Relaxed) {
            return false;
        }
        let map = self.map.lock();
        let Some(ptr) = map.ptr else { return false };
        // Copied out first: another process may write the pages through its
        // own map while we read them, so they are never borrowed as a slice.
        let mut held = SecretBuf::with_capacity(map.len);
        held.resize(map.len);
        // SAFETY: the first `len` bytes of the mapping, which the memfd
        // covers, into a buffer of that length.
        unsafe { std::ptr::copy_nonoverlapping(ptr.as_ptr(), held.as_mut_ptr(), map.len) };
        drop(map);
        if held[..] == plain[..] {
            return false;
        }
        *plain = held;
        true
    }

    /// Makes it hold `bytes` and nothing else.
    pub(super) fn replace(&self, bytes: &[u8]) -> io::Result<()> {
        let mut map = self.map.lock();
        map.resize(self.fd.as_fd(), bytes.len())?;
        map.copy_in(0, bytes);
        Ok(())
    }
}

impl Drop for Backing {
    fn drop(&mut self) {
        // The kernel first, then our mapping. The pages themselves are not
        // wiped: a process that mapped the file may still read them after
        // closing it (its mapping holds the memfd, not our handle), and the
        // kernel zeroes every page before giving it to anyone else.
        drop(self.registration.get_mut().take());
        self.map.get_mut().unmap();
    }
}

fn set_size(fd: BorrowedFd<'_>, len: usize) -> io::Result<()> {
    let size = libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    // SAFETY: ftruncate on a descriptor we own, with a plain size.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), size) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn page_size() -> usize {
    // SAFETY: sysconf takes a plain value.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(n).unwrap_or(4096).max(4096)
}

impl Map {
    /// Sizes the new memfd to `len` and maps it (at least a page: once it is
    /// sealed, a new writable mapping cannot be made, only this one grown).
    fn map_first(&mut self, fd: BorrowedFd<'_>, len: usize) -> io::Result<()> {
        set_size(fd, len)?;
        let page = page_size();
        let want = len.div_ceil(page).max(1) * page;
        // SAFETY: a new shared mapping of the memfd at an address of the
        // kernel's choosing.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                want,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        self.ptr = NonNull::new(ptr.cast());
        self.mapped = want;
        self.len = len;
        self.dont_dump();
        Ok(())
    }

    /// Sets the memfd's size to `len`, growing the mapping to cover it (it
    /// never shrinks: bytes past `len` are never touched).
    fn resize(&mut self, fd: BorrowedFd<'_>, len: usize) -> io::Result<()> {
        let Some(ptr) = self.ptr else { return Err(io::Error::from_raw_os_error(libc::EBADF)) };
        set_size(fd, len)?;
        let page = page_size();
        let want = len.div_ceil(page) * page;
        if want > self.mapped {
            // SAFETY: grows (and may move) the mapping made in `map_first`,
            // of `mapped` bytes; the memfd covers the new range.
            let moved = unsafe { libc::mremap(ptr.as_ptr().cast(), self.mapped, want, libc::MREMAP_MAYMOVE) };
            if moved == libc::MAP_FAILED {
                let e = io::Error::last_os_error();
                // Back to the size the mapping covers (`len` stays what it was).
                let _ = set_size(fd, self.len);
                return Err(e);
            }
            self.ptr = NonNull::new(moved.cast());
            self.mapped = want;
            self.dont_dump();
        }
        self.len = len;
        Ok(())
    }

    fn dont_dump(&self) {
        if let Some(ptr) = self.ptr {
            // SAFETY: advice on our own mapping; failure only means the pages
            // could appear in a core dump, which is disabled too.
            unsafe { libc::madvise(ptr.as_ptr().cast(), self.mapped, libc::MADV_DONTDUMP) };
        }
    }

    /// Copies `data` in at `offset`; the caller made the size cover it.
    fn copy_in(&mut self, offset: usize, data: &[u8]) {
        let Some(ptr) = self.ptr else { return };
        assert!(offset + data.len() <= self.len, "a copy past the backing file's end");
        // SAFETY: the range lies within the first `len` bytes of the mapping
        // (checked above), which is ours alone to write while the lock is held.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), ptr.as_ptr().add(offset), data.len()) };
    }

    fn unmap(&mut self) {
        if let Some(ptr) = self.ptr.take() {
            // SAFETY: the mapping made in `resize`, of `mapped` bytes, not used after this.
            unsafe { libc::munmap(ptr.as_ptr().cast(), self.mapped) };
        }
        self.mapped = 0;
    }
}

/// A change of a file's cached plaintext, for its backing file to follow.
pub(super) enum Change<'a> {
    /// Bytes written at an offset.
    Wrote { offset: u64, data: &'a [u8] },
    /// Cut or extended to a length.
    Length(u64),
    /// Replaced whole (a new version downloaded, an image reduced).
    Whole(&'a [u8]),
}

impl<R: Remote> VaultFs<R> {
    /// Whether the user lets the kernel read from backing files
    /// ([`super::FsOptions::passthrough`]).
    pub fn passthrough_wanted(&self) -> bool {
        self.passthrough.wanted
    }

    /// Says whether the kernel takes backing files (the FUSE adapter, at mount).
    pub fn set_passthrough(&self, mode: PassthroughMode) {
        match &mode {
            PassthroughMode::On => tracing::info!(
                "passthrough on: reads of files open for reading are served by the kernel from memory"
            ),
            PassthroughMode::Off(why) => tracing::info!("passthrough off: {why}"),
        }
        *self.passthrough.mode.lock() = mode;
    }

    /// The mount's passthrough mode.
    pub fn passthrough_mode(&self) -> PassthroughMode {
        self.passthrough.mode.lock().clone()
    }

    /// Handles that were given a backing file so far, and the bytes the
    /// backing files hold now.
    pub fn passthrough_use(&self) -> (u64, u64) {
        let bytes = self.handles.backings().iter().map(|b| b.len()).sum();
        (self.passthrough.opens.load(Ordering::Relaxed), bytes)
    }

    /// The kernel refused handle `fh`'s backing file (`why`): no more are
    /// made in this mount, and the handle is direct I/O (which goes with any
    /// handle the kernel holds; it asked for nothing else yet).
    pub fn passthrough_refused(&self, fh: u64, why: &str) {
        tracing::warn!(error = why, "the kernel refused a backing file; passthrough off for this mount");
        *self.passthrough.mode.lock() = PassthroughMode::Off(format!("the kernel refused it: {why}"));
        self.handles.demote(fh);
        drop(self.handles.drop_unnamed(None));
        self.count_backings();
    }

    /// A new handle on the cached file `id` opened as `how`, with what the
    /// kernel may do with it; `keep` if the kernel's cached pages are good.
    /// A handle that may read from a backing file holds the plaintext's
    /// lock while the backing file is made and counted, so no change falls
    /// between the copy and its following; where none can be made (over the
    /// budget), it is an ordinary handle.
    pub(super) async fn open_handle(
        self: &Arc<Self>,
        id: FileId,
        how: OpenHow,
        keep: bool,
        plain: &PlainHandle,
    ) -> Result<(u64, KernelOpen)> {
        let on = *self.passthrough.mode.lock() == PassthroughMode::On;
        let reads_only = on && !how.write && !how.truncate && !how.direct && !self.modes.is_streaming(id);
        if reads_only {
            // Only from plaintext already whole here: a cold open is not made
            // to wait for the whole download (its reads start as the first
            // chunks arrive, through the page cache); the next open gets one.
            let d = Arc::clone(plain).lock_owned().await;
            let len = d.bytes.len() as u64;
            if d.loaded && len >= PASSTHROUGH_MIN {
                if self.handles.backing(id).is_some_and(|b| b.broken.load(Ordering::Relaxed)) {
                    // One that stopped following: gone, unless a handle still names it.
                    self.forget_backing(id);
                }
                if keep && self.handles.backing(id).is_none() {
                    // The kernel's pages of this version are good: it reads
                    // them as fast as a backing file, which is made at the
                    // last close for the opens after this one (a copy of the
                    // whole file would make this one wait, and one made
                    // meanwhile competes with its reads).
                    drop(d);
                    self.passthrough.ahead.lock().insert(id);
                    return self
                        .name_backing(id, HandleMode::Cached, KernelWish::PageCache, keep, plain)
                        .await;
                }
                let made = match self.handles.backing(id) {
                    Some(_) => None,
                    None if !self.backing_fits(len) => {
                        tracing::debug!(file = %id, "no backing file: it would take the cache over its budget");
                        drop(d);
                        return self
                            .name_backing(id, HandleMode::Cached, KernelWish::PageCache, keep, plain)
                            .await;
                    }
                    None => match Backing::new(&d.bytes) {
                        Ok(b) => Some(Arc::new(b)),
                        Err(e) => {
                            tracing::debug!(file = %id, error = %e, "no backing file: no memfd");
                            drop(d);
                            return self
                                .name_backing(id, HandleMode::Cached, KernelWish::PageCache, keep, plain)
                                .await;
                        }
                    },
                };
                let (fh, io, backing) =
                    self.handles.open_kernel(id, HandleMode::Cached, KernelWish::Passthrough);
                tracing::debug!(file = %id, ?io, "opened for reading");
                let opened = match io {
                    KernelIo::Passthrough { direct: false } => {
                        // The kept one may have been dropped for room since it
                        // was looked at: then one is made now (the lock is held).
                        let backing = match backing.or(made) {
                            Some(b) => Ok(b),
                            None => Backing::new(&d.bytes).map(Arc::new),
                        };
                        let backing = backing
                            .map_err(|e| FsError::Io(format!("no memfd: {e}")))
                            .and_then(|b| self.handles.set_backing(fh, b));
                        match backing {
                            Ok(b) => {
                                self.passthrough.opens.fetch_add(1, Ordering::Relaxed);
                                self.count_backings();
                                (fh, KernelOpen::Passthrough { backing: b, direct: false })
                            }
                            Err(e) => {
                                tracing::debug!(file = %id, error = %e, "no backing file; direct I/O");
                                self.handles.demote(fh);
                                (fh, KernelOpen::Direct { keep })
                            }
                        }
                    }
                    KernelIo::Passthrough { direct: true } | KernelIo::Direct => {
                        (fh, KernelOpen::Direct { keep })
                    }
                    KernelIo::PageCache => (fh, KernelOpen::PageCache { keep }),
                };
                // Held until the backing file is the file's: a handle that
                // names it waits for this lock (`name_backing`).
                drop(d);
                return Ok(opened);
            }
        }
        if how.write {
            // A backing file kept for nobody would only follow this writer.
            self.forget_backing(id);
        }
        let wish = if how.write && !how.read { KernelWish::Direct } else { KernelWish::PageCache };
        self.name_backing(id, HandleMode::Cached, wish, keep, plain).await
    }

    /// Makes file `id`'s backing file in the background and keeps it for its
    /// next reader, if the plaintext `plain` is still whole, the file's, and
    /// large enough, and the budget has room.
    fn make_backing_ahead(self: &Arc<Self>, id: FileId, plain: &PlainHandle) {
        let fs = Arc::clone(self);
        let plain = Arc::clone(plain);
        tokio::spawn(async move {
            let d = plain.lock().await;
            let len = d.bytes.len() as u64;
            let on = *fs.passthrough.mode.lock() == PassthroughMode::On;
            if !on
                || !d.loaded
                || len < PASSTHROUGH_MIN
                || fs.handles.backing(id).is_some()
                || !fs.backing_fits(len)
            {
                return;
            }
            let backing = match Backing::new(&d.bytes) {
                Ok(b) => Arc::new(b),
                Err(e) => {
                    tracing::debug!(file = %id, error = %e, "no backing file made ahead: no memfd");
                    return;
                }
            };
            // Under the plaintext's lock: every later change follows into it.
            if fs.handles.keep_backing(id, backing) {
                fs.count_backings();
            }
            drop(d);
            // The file went meanwhile (its plaintext left the cache before
            // its kept backing file was dropped): this one goes too.
            if !fs.cache.peek(id).is_some_and(|h| Arc::ptr_eq(&h, &plain)) {
                fs.forget_backing(id);
            }
        });
    }

    /// A new handle on file `id` that does not read from a backing file: the
    /// page cache or direct I/O as `wish` says, or, while the file has a
    /// backing file (another handle reads from it), naming it with direct
    /// I/O, as the kernel wants of every handle of such an inode. One made
    /// just now by another opener is waited for on the plaintext's lock,
    /// which that opener holds until it is counted.
    pub(super) async fn name_backing(
        &self,
        id: FileId,
        mode: HandleMode,
        wish: KernelWish,
        keep: bool,
        plain: &PlainHandle,
    ) -> Result<(u64, KernelOpen)> {
        let (fh, io, backing) = self.handles.open_kernel(id, mode, wish);
        match io {
            KernelIo::PageCache => return Ok((fh, KernelOpen::PageCache { keep })),
            KernelIo::Direct => return Ok((fh, KernelOpen::Direct { keep })),
            KernelIo::Passthrough { .. } => {}
        }
        let backing = match backing {
            Some(b) => Some(b),
            None => {
                drop(plain.lock().await);
                self.handles.backing(id)
            }
        };
        match backing {
            Some(backing) => Ok((fh, KernelOpen::Passthrough { backing, direct: true })),
            None => {
                // Nobody made one after all: nothing for the kernel to name.
                self.handles.demote(fh);
                Ok((fh, KernelOpen::Direct { keep }))
            }
        }
    }

    /// Takes into the cached plaintext what was written through a shared
    /// writable map of a handle that named its file's backing file with
    /// direct I/O (opened for writing while another handle read from it).
    /// The kernel maps the backing file itself for such a handle, so those
    /// writes reach only the backing file (its seal against writes is not
    /// checked for a map made through a FUSE file): taken here, at the flush,
    /// fsync and release of every handle of the file once such a handle was
    /// opened (the last release before the backing file goes included), they
    /// are saved like any write, and the kernel drops the pages it cached of
    /// the file before them.
    pub(super) async fn take_mapped_writes(&self, fh: u64) {
        let Ok(id) = self.handles.file(fh) else { return };
        if !self.handles.named_by_writer(id) {
            return;
        }
        let (Some(backing), Some(plain)) = (self.handles.backing(id), self.cache.peek(id)) else { return };
        let mut d = plain.lock().await;
        if !d.loaded || !backing.copy_out_if_changed(&mut d.bytes) {
            return;
        }
        tracing::debug!(file = %id, "took writes made through a shared map of the backing file");
        d.edited();
        let len = d.bytes.len();
        self.modes.note_change(id, len as u64);
        drop(d);
        self.cache.account(id, len);
        let ino = self.tree.lock().file_ino(id);
        if let Some(ino) = ino {
            self.tell_kernel(vec![super::Invalidation::Inode(ino)]);
        }
    }

    /// Whether `len` more bytes of backing files keep plaintext in memory
    /// within the cache budget.
    fn backing_fits(&self, len: u64) -> bool {
        let fits = || {
            let stats = self.cache.stats();
            let (_, held) = self.passthrough_use();
            (stats.used as u64).saturating_add(held).saturating_add(len) <= stats.budget as u64
        };
        if fits() {
            return true;
        }
        // Room made by the backing files kept for files nobody has open.
        drop(self.handles.drop_unnamed(None));
        self.count_backings();
        fits()
    }

    /// Tells the cache how much plaintext the backing files hold, which it
    /// counts against its budget too (it cannot drop them, so it drops more
    /// of its own).
    pub(super) fn count_backings(&self) {
        let (_, held) = self.passthrough_use();
        self.cache.set_outside(usize::try_from(held).unwrap_or(usize::MAX));
    }

    /// A handle of file `id` closed: with passthrough off (the kernel refused
    /// a backing file), nothing keeps one for the next open; at the last
    /// close of a file opened while its kernel pages were good, one is made
    /// for the next open.
    pub(super) fn closed_for_backing(self: &Arc<Self>, id: FileId) {
        if *self.passthrough.mode.lock() != PassthroughMode::On {
            self.passthrough.ahead.lock().remove(&id);
            self.forget_backing(id);
            return;
        }
        if self.handles.is_open(id) || !self.passthrough.ahead.lock().remove(&id) {
            return;
        }
        if let Some(plain) = self.cache.peek(id) {
            self.make_backing_ahead(id, &plain);
        }
    }

    /// File `id` is gone: so is the backing file kept for it.
    pub(super) fn forget_backing(&self, id: FileId) {
        if !self.handles.drop_unnamed(Some(id)).is_empty() {
            self.count_backings();
        }
    }

    /// Applies a change of file `id`'s cached plaintext to its backing file,
    /// if it has one; called under the plaintext's lock, after the change.
    pub(super) fn follow_in_backing(&self, id: FileId, change: Change<'_>) {
        let Some(backing) = self.handles.backing(id) else { return };
        let before = backing.len();
        let followed = match change {
            Change::Wrote { offset, data } => backing.write_at(offset, data),
            Change::Length(len) => backing.set_len(len),
            Change::Whole(bytes) => backing.replace(bytes),
        };
        match followed {
            Ok(()) if backing.len() == before => {}
            // Its length changed: the cache counts it against its budget.
            Ok(()) => self.count_backings(),
            Err(e) => {
                backing.broken.store(true, Ordering::Relaxed);
                tracing::error!(file = %id, error = %e, "a change did not reach the kernel's copy of the file: its readers see the content before it until they all closed it");
                self.forget_backing(id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(b: &Backing) -> Vec<u8> {
        let mut out = vec![0u8; b.len() as usize + 10];
        // SAFETY: pread into a buffer we own, of its length.
        let n = unsafe { libc::pread(b.fd().as_raw_fd(), out.as_mut_ptr().cast(), out.len(), 0) };
        out.truncate(usize::try_from(n).expect("pread"));
        out
    }

    #[test]
    fn a_backing_file_holds_what_it_was_given_and_follows_changes() {
        let b = Backing::new(b"hello world").unwrap();
        assert_eq!(read_all(&b), b"hello world");
        b.write_at(6, b"vault").unwrap();
        assert_eq!(read_all(&b), b"hello vault");
        b.write_at(9000, b"!").unwrap();
        let all = read_all(&b);
        assert_eq!(all.len(), 9001, "grown to the write's end");
        assert!(all[11..9000].iter().all(|&x| x == 0), "the gap reads zeros");
        b.set_len(5).unwrap();
        assert_eq!(read_all(&b), b"hello");
        b.set_len(8).unwrap();
        assert_eq!(read_all(&b), b"hello\0\0\0", "extended with zeros");
        b.replace(b"").unwrap();
        assert!(b.is_empty() && read_all(&b).is_empty());
        b.replace(&[7u8; 70_000]).unwrap();
        assert_eq!(read_all(&b), vec![7u8; 70_000]);
        b.write_at(3 << 20, b"far").unwrap();
        assert_eq!(&read_all(&b)[3 << 20..], b"far", "the mapping grew");
    }

    #[test]
    fn nothing_but_our_mapping_writes_a_backing_file() {
        let b = Backing::new(b"plaintext").unwrap();
        let fd = b.fd().as_raw_fd();
        // SAFETY: pwrite from a buffer we own, of its length.
        let wrote = unsafe { libc::pwrite(fd, b"X".as_ptr().cast(), 1, 0) };
        assert_eq!(wrote, -1, "write(2) is sealed off");
        // SAFETY: a new mapping of the memfd, unmapped below if it was made.
        let shared = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if shared != libc::MAP_FAILED {
            // SAFETY: the mapping just made.
            unsafe { libc::munmap(shared, 4096) };
        }
        assert_eq!(shared, libc::MAP_FAILED, "a new shared writable map is refused");
        b.write_at(0, b"P").unwrap();
        assert_eq!(read_all(&b), b"Plaintext", "ours still writes");
    }

    #[test]
    fn open_flags_say_how() {
        let ro = OpenHow::from_flags(libc::O_RDONLY);
        assert!(ro.read && !ro.write && !ro.truncate && !ro.direct);
        let wo = OpenHow::from_flags(libc::O_WRONLY | libc::O_TRUNC);
        assert!(!wo.read && wo.write && wo.truncate);
        let rw = OpenHow::from_flags(libc::O_RDWR | libc::O_DIRECT);
        assert!(rw.read && rw.write && rw.direct);
    }
}
