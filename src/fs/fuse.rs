//! The FUSE adapter: forwards kernel requests to [`VaultFs`] and nothing more.
//!
//! Each request is copied into an owned task on the tokio runtime and answered
//! from there, so a slow upload or download never blocks the FUSE worker threads
//! (which are several: `n_threads` with one cloned /dev/fuse fd each). Reads and
//! writes of plaintext already whole in memory are the exception: the core's
//! `read_now`/`write_now` answer them on the FUSE thread without waiting, since
//! a hop through the runtime costs more than the copy. Errors go
//! through [`FsError::errno`], the one place errno values are chosen, and are
//! logged at a level that fits them.

use std::ffi::OsStr;
use std::future::Future;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::task::{Context, Waker};
use std::time::{Duration, SystemTime};

use fuser::{
    BackingId, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLock, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr,
    Request, TimeOrNow, WriteFlags,
};
use tracing::Instrument;

use super::core::{
    Attr, Invalidation, KernelOpen, Kind, Listing, LockKind, LockRequest, OpenHow, PassthroughMode, ReadFrom,
    VaultFs, XATTR_LOCKS,
};
use super::error::FsError;
use crate::remote::Remote;

/// How long the kernel may cache attributes and names. Short, because other
/// clients change the vault too; our own changes are always visible at once.
const TTL: Duration = Duration::from_secs(1);
/// Largest write the kernel sends in one request.
pub const MAX_WRITE: u32 = 1 << 20;

/// The adapter.
pub struct FuseAdapter<R> {
    fs: Arc<VaultFs<R>>,
    rt: tokio::runtime::Handle,
    owner: Owner,
}

impl<R: Remote> FuseAdapter<R> {
    /// An adapter running `fs` on `rt`, presenting files as owned by `uid`/`gid`.
    /// `uid`, `gid` and `umask` are what every entry is presented with.
    pub fn new(fs: Arc<VaultFs<R>>, rt: tokio::runtime::Handle, uid: u32, gid: u32, umask: u32) -> Self {
        FuseAdapter { fs, rt, owner: Owner { uid, gid, umask: (umask & 0o777) as u16 } }
    }

    /// Runs `op`, a request that usually needs nothing but memory (a create,
    /// a chmod; lookups and listings answered from memory never get here:
    /// their fallbacks load from the server and take [`Self::spawn`]), inside
    /// a span naming the operation: here, on the thread that read the request, as far as it
    /// goes without waiting, and on the runtime from its first wait on.
    /// Answered here, it saves a hand-off to a runtime thread and the
    /// wake-ups it costs, which on a busy machine were a large part of each
    /// such request (tar -x makes five of them per file). The runtime polls a
    /// request that waits again, with its own waker: a future wakes only the
    /// waker of its latest poll, so the first poll's (which wakes nothing) is
    /// never relied on. A panic in that first poll is caught (as the runtime
    /// catches those of its tasks): the request is answered EIO and the
    /// thread goes on reading requests.
    fn run<F>(&self, what: &'static str, ino: u64, op: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let mut op = Box::pin(op.instrument(tracing::debug_span!("fuse", op = what, ino)));
        let _runtime = self.rt.enter();
        let polled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            op.as_mut().poll(&mut Context::from_waker(Waker::noop())).is_pending()
        }));
        match polled {
            Ok(true) => drop(self.rt.spawn(op)),
            Ok(false) => {}
            Err(_) => tracing::error!(op = what, ino, "a request panicked; answered EIO"),
        }
    }

    /// Runs `op`, a request that goes to the server (a save, an unlink, an
    /// open that may download, a lookup or listing of a directory
    /// not yet loaded, the lock holders, a release that gives up locks; no
    /// caller waits for a release), or a read or write that has to
    /// wait (those that need not are answered on the reading thread by
    /// `read_now` and `write_now`), on the runtime inside a span naming the
    /// operation: there its request to the server is handed to the
    /// connection's task on the same thread, where started here it would wake
    /// another (in one bench run, with these started here, rm -r gained
    /// nothing, cold reads were slower and a 300 MB streamed write took
    /// twice as long).
    fn spawn<F>(&self, name: &'static str, ino: u64, op: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.rt.spawn(op.instrument(tracing::debug_span!("fuse", op = name, ino)));
    }
}

/// What tells the kernel to forget what changed: one thread that sends the
/// notifications, so the caller never blocks (the kernel may hold an inode
/// while a request on it is in flight, and the notification then waits for
/// that request). The thread ends when the filesystem lets go of the sender.
pub fn notifier_thread(notifier: fuser::Notifier) -> Box<dyn Fn(Vec<Invalidation>) + Send + Sync> {
    let (tx, rx) = std::sync::mpsc::channel::<Vec<Invalidation>>();
    let spawned = std::thread::Builder::new().name("vaultfs-notify".into()).spawn(move || {
        for batch in rx {
            for what in batch {
                notify(&notifier, &what);
            }
        }
    });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "no thread to tell the kernel of changes: it sees them after its timeouts");
    }
    Box::new(move |batch| {
        let _ = tx.send(batch);
    })
}

/// Sends one notification. The kernel refuses those about what it does not
/// hold (ENOENT): nothing to forget. A deletion it refuses (a directory it
/// still holds entries of) becomes a plain invalidation of the name.
fn notify(notifier: &fuser::Notifier, what: &Invalidation) {
    let result = match what {
        Invalidation::Inode(ino) => notifier.inval_inode(INodeNo(*ino), 0, -1),
        Invalidation::Told(told) => {
            told.done();
            Ok(())
        }
        Invalidation::Entry { parent, name } => notifier.inval_entry(INodeNo(*parent), name),
        Invalidation::Deleted { parent, child, name } => notifier
            .delete(INodeNo(*parent), INodeNo(*child), name)
            .or_else(|_| notifier.inval_entry(INodeNo(*parent), name)),
    };
    if let Err(e) = result {
        if e.raw_os_error() != Some(libc::ENOENT) {
            tracing::debug!(?what, error = %e, "the kernel refused a notification");
        }
    }
}

/// How often a blocked lock request looks whether its caller got a signal.
const SIGNAL_POLL: Duration = Duration::from_millis(100);

/// Completes once thread `tid` has a signal pending that it neither blocks
/// nor ignores, or is gone: then its lock request is answered EINTR. (The
/// kernel would say so with FUSE_INTERRUPT, but fuser 0.18 answers those
/// itself, with ENOSYS, after which the kernel stops sending them; so the
/// thread's state is read from /proc, every [`SIGNAL_POLL`], only while a
/// lock request waits.) A caller in another pid namespace (tid 0) is never
/// seen to get one.
async fn signalled(tid: u32) {
    if tid == 0 {
        return std::future::pending().await;
    }
    let path = format!("/proc/{tid}/status");
    loop {
        tokio::time::sleep(SIGNAL_POLL).await;
        match std::fs::read_to_string(&path) {
            Ok(status) if signal_pending(&status) => return,
            Ok(_) => {}
            // The thread is gone: nobody waits for the answer.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            // Unreadable (/proc mounted with hidepid): never taken for a signal.
            Err(_) => return std::future::pending().await,
        }
    }
}

/// Whether a /proc status names a pending signal that is neither blocked
/// nor ignored (a fatal one shows as SIGKILL pending).
fn signal_pending(status: &str) -> bool {
    let mask = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .unwrap_or(0)
    };
    (mask("SigPnd:") | mask("ShdPnd:")) & !mask("SigBlk:") & !mask("SigIgn:") != 0
}

#[cfg(test)]
mod tests {
    use super::signal_pending;

    #[test]
    fn a_pending_signal_counts_unless_blocked_or_ignored() {
        let status = |pnd: &str, shd: &str, blk: &str, ign: &str| {
            format!("Name:\tflock\nSigPnd:\t{pnd}\nShdPnd:\t{shd}\nSigBlk:\t{blk}\nSigIgn:\t{ign}\n")
        };
        let none = "0000000000000000";
        let sigint = "0000000000000002";
        let sigkill = "0000000000000100";
        assert!(!signal_pending(&status(none, none, none, none)));
        assert!(signal_pending(&status(sigint, none, none, none)));
        assert!(signal_pending(&status(none, sigint, none, none)), "process-wide");
        assert!(!signal_pending(&status(sigint, none, sigint, none)), "blocked");
        assert!(!signal_pending(&status(none, sigint, none, sigint)), "ignored");
        assert!(signal_pending(&status(sigkill, none, none, none)), "a fatal signal");
        assert!(!signal_pending("garbage"));
    }
}

/// The core's lock request for the kernel's.
fn lock_request(owner: LockOwner, start: u64, end: u64, typ: i32, pid: u32) -> Result<LockRequest, FsError> {
    let kind = match typ {
        libc::F_RDLCK => LockKind::Read,
        libc::F_WRLCK => LockKind::Write,
        libc::F_UNLCK => LockKind::Unlock,
        _ => return Err(FsError::Invalid(format!("lock type {typ}"))),
    };
    Ok(LockRequest { owner: owner.0, pid, start, end, kind })
}

fn reply_xattr(reply: ReplyXattr, size: u32, value: &[u8]) {
    if size == 0 {
        reply.size(value.len() as u32);
    } else if value.len() > size as usize {
        reply.error(Errno::from_i32(libc::ERANGE));
    } else {
        reply.data(value);
    }
}

fn errno(op: &str, e: &FsError) -> Errno {
    if e.is_expected() {
        tracing::debug!(op, error = %e);
    } else {
        tracing::warn!(op, error = %e, errno = e.errno());
    }
    Errno::from_i32(e.errno())
}

/// Answers an open as the core decided (see `core::backing`). A handle
/// opened write-only bypasses the page cache (direct I/O): the kernel then
/// hands the writer's own pages to the daemon instead of first copying every
/// byte into newly allocated cache pages, which was the writer's largest
/// cost for a big file (a 300 MB write spent more time in that copy than the
/// daemon spent on the whole upload). Such a handle can neither read nor be
/// mapped, so nothing is lost; the kernel drops cached pages a direct write
/// overlaps, so readers of the same file see the new bytes. A backing
/// file is registered with the kernel at its first handle and its
/// registration reused for the others, as the kernel wants one backing file
/// per inode; it goes with the backing file, after the file's last handle
/// that read from it. Where the kernel refuses it (not permitted, say), the
/// handle is direct I/O and the mount stops asking.
fn reply_open<R: Remote>(fs: &VaultFs<R>, fh: u64, kernel: KernelOpen, reply: ReplyOpen) {
    let keep = |keep: bool| if keep { FopenFlags::FOPEN_KEEP_CACHE } else { FopenFlags::empty() };
    let flags = match kernel {
        KernelOpen::PageCache { keep: k } => keep(k),
        KernelOpen::Direct { keep: k } => FopenFlags::FOPEN_DIRECT_IO | keep(k),
        KernelOpen::Passthrough { backing, direct } => {
            let mut registration = backing.registration();
            if registration.is_none() {
                match reply.open_backing(backing.fd()) {
                    Ok(id) => *registration = Some(Box::new(id)),
                    Err(e) => {
                        drop(registration);
                        fs.passthrough_refused(fh, &e.to_string());
                        return reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO);
                    }
                }
            }
            if let Some(id) = registration.as_ref().and_then(|r| r.downcast_ref::<BackingId>()) {
                let flags = if direct { FopenFlags::FOPEN_DIRECT_IO } else { FopenFlags::empty() };
                return reply.opened_passthrough(FileHandle(fh), flags, id);
            }
            drop(registration);
            fs.passthrough_refused(fh, "a backing file registered by something else");
            FopenFlags::FOPEN_DIRECT_IO
        }
    };
    reply.opened(FileHandle(fh), flags)
}

/// Whether the kernel may read from backing files for this mount, asked of
/// it at INIT: it needs passthrough (Linux 6.9 or later) and takes backing
/// files from root only.
fn passthrough_mode(wanted: bool, config: &mut KernelConfig) -> PassthroughMode {
    // SAFETY: geteuid only reads the process's effective user id.
    #[allow(unsafe_code)]
    let root = unsafe { libc::geteuid() } == 0;
    if !wanted {
        PassthroughMode::Off("turned off with --no-passthrough".into())
    } else if !root {
        PassthroughMode::Off("not root: the kernel takes backing files from root only".into())
    } else if config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_err() {
        PassthroughMode::Off("the kernel does not offer it (Linux 6.9 or later does)".into())
    } else if let Err(most) = config.set_max_stack_depth(1) {
        PassthroughMode::Off(format!("the kernel allows a stacking depth of {most} only"))
    } else {
        PassthroughMode::On
    }
}

fn time_or_now(t: TimeOrNow) -> SystemTime {
    match t {
        TimeOrNow::SpecificTime(t) => t,
        TimeOrNow::Now => SystemTime::now(),
    }
}

impl<R: Remote> Filesystem for FuseAdapter<R> {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Large writes: fewer round trips through the kernel for sequential writes.
        let _ = config.set_max_write(MAX_WRITE);
        let _ = config.set_max_readahead(MAX_WRITE);
        // Listings carry each entry's attributes (readdirplus), so `ls -l` and
        // `find` cost one request per directory instead of one per entry; the
        // kernel picks plain readdir where attributes would go unused.
        if let Err(missing) =
            config.add_capabilities(InitFlags::FUSE_DO_READDIRPLUS | InitFlags::FUSE_READDIRPLUS_AUTO)
        {
            tracing::debug!(?missing, "kernel without readdirplus: listings without attributes");
        }
        // Reads of files open for reading served by the kernel from memory.
        self.fs.set_passthrough(passthrough_mode(self.fs.passthrough_wanted(), config));
        // Locks go to the server, so other mounts of the vault honour them;
        // without these the kernel keeps them, on this machine only.
        if self.fs.locks_across_clients() {
            if let Err(missing) =
                config.add_capabilities(InitFlags::FUSE_POSIX_LOCKS | InitFlags::FUSE_FLOCK_LOCKS)
            {
                tracing::warn!(?missing, "the kernel does not pass locks on: they hold on this machine only");
            }
        }
        Ok(())
    }

    fn destroy(&mut self) {
        let fs = Arc::clone(&self.fs);
        let failed = self.rt.block_on(async move {
            let failed = fs.flush_all().await;
            fs.drop_all_locks().await;
            failed
        });
        if failed > 0 {
            tracing::error!(failed, "unmounted with files or new directories that could not be saved");
        }
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.fs.lookup_now(parent.0, name) {
            Some(Ok(a)) => return reply.entry(&TTL, &self.owner.attr(&a), Generation(0)),
            Some(Err(e)) => return reply.error(errno("lookup", &e)),
            None => {}
        }
        let (fs, name, me) = (Arc::clone(&self.fs), name.to_owned(), self.owner);
        self.spawn("lookup", parent.0, async move {
            match fs.lookup(parent.0, &name).await {
                Ok(a) => reply.entry(&TTL, &me.attr(&a), Generation(0)),
                Err(e) => reply.error(errno("lookup", &e)),
            }
        });
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        // Attributes never need the server: answered here.
        match self.fs.getattr(ino.0) {
            Ok(a) => reply.attr(&TTL, &self.owner.attr(&a)),
            Err(e) => reply.error(errno("getattr", &e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        // A file's mode is stored (in its manifest); ownership is presented,
        // not stored: accepted and ignored, so `cp -a` does not fail.
        let (fs, me) = (Arc::clone(&self.fs), self.owner);
        self.run("setattr", ino.0, async move {
            if let Some(mode) = mode {
                if let Err(e) = fs.chmod(ino.0, (mode & 0o7777) as u16).await {
                    return reply.error(errno("setattr", &e));
                }
            }
            if let Some(t) = atime {
                if let Err(e) = fs.set_atime(ino.0, time_or_now(t)) {
                    return reply.error(errno("setattr", &e));
                }
            }
            match fs.setattr(ino.0, size, mtime.map(time_or_now)).await {
                Ok(a) => reply.attr(&TTL, &me.attr(&a)),
                Err(e) => reply.error(errno("setattr", &e)),
            }
        });
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let (fs, name, me) = (Arc::clone(&self.fs), name.to_owned(), self.owner);
        // Answered from memory when the directory's listing is fresh (the
        // server hears of it with its first file).
        self.run("mkdir", parent.0, async move {
            match fs.mkdir(parent.0, &name).await {
                Ok(a) => reply.entry(&TTL, &me.attr(&a), Generation(0)),
                Err(e) => reply.error(errno("mkdir", &e)),
            }
        });
    }

    fn symlink(&self, _req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        let (fs, name, me) = (Arc::clone(&self.fs), link_name.to_owned(), self.owner);
        let target = target.as_os_str().as_bytes().to_vec();
        self.spawn("symlink", parent.0, async move {
            match fs.symlink(parent.0, &name, &target).await {
                Ok(a) => reply.entry(&TTL, &me.attr(&a), Generation(0)),
                Err(e) => reply.error(errno("symlink", &e)),
            }
        });
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        // The target is in the tree: answered here.
        match self.fs.readlink(ino.0) {
            Ok(target) => reply.data(&target),
            Err(e) => reply.error(errno("readlink", &e)),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let (fs, name) = (Arc::clone(&self.fs), name.to_owned());
        self.spawn("unlink", parent.0, async move {
            match fs.unlink(parent.0, &name).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno("unlink", &e)),
            }
        });
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let (fs, name) = (Arc::clone(&self.fs), name.to_owned());
        self.spawn("rmdir", parent.0, async move {
            match fs.rmdir(parent.0, &name).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno("rmdir", &e)),
            }
        });
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if flags.bits() != 0 {
            // RENAME_NOREPLACE / RENAME_EXCHANGE are not supported atomically.
            reply.error(Errno::from_i32(libc::EINVAL));
            return;
        }
        let (fs, name, newname) = (Arc::clone(&self.fs), name.to_owned(), newname.to_owned());
        self.spawn("rename", parent.0, async move {
            match fs.rename(parent.0, &name, newparent.0, &newname).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno("rename", &e)),
            }
        });
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let fs = Arc::clone(&self.fs);
        let how = OpenHow::from_flags(flags.0);
        self.spawn("open", ino.0, async move {
            match fs.open_for_kernel(ino.0, how).await {
                Ok((fh, kernel)) => reply_open(&fs, fh, kernel, reply),
                Err(e) => reply.error(errno("open", &e)),
            }
        });
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let (fs, name, me) = (Arc::clone(&self.fs), name.to_owned(), self.owner);
        let perm = (mode & !umask & 0o7777) as u16;
        let how = OpenHow::from_flags(flags);
        self.run("create", parent.0, async move {
            match fs.create_for_kernel(parent.0, &name, perm, how).await {
                Ok((a, fh, kernel)) => {
                    let flags = match kernel {
                        KernelOpen::Direct { .. } => FopenFlags::FOPEN_DIRECT_IO,
                        _ => FopenFlags::empty(),
                    };
                    reply.created(&TTL, &me.attr(&a), Generation(0), FileHandle(fh), flags)
                }
                Err(e) => reply.error(errno("create", &e)),
            }
        });
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.fs.read_now(fh.0, offset, size) {
            Some(Ok(data)) => return reply.data(&data),
            Some(Err(e)) => return reply.error(errno("read", &e)),
            None => {}
        }
        let fs = Arc::clone(&self.fs);
        self.spawn("read", ino.0, async move {
            match fs.read(fh.0, offset, size).await {
                Ok(data) => reply.data(&data),
                Err(e) => reply.error(errno("read", &e)),
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if let Some(n) = self.fs.write_now(fh.0, offset, data) {
            return reply.written(n);
        }
        let fs = Arc::clone(&self.fs);
        let data = crate::cache::SecretBuf::from_vec(data.to_vec());
        self.spawn("write", ino.0, async move {
            match fs.write_owned(fh.0, offset, data).await {
                Ok(n) => reply.written(n),
                Err(e) => reply.error(errno("write", &e)),
            }
        });
    }

    fn flush(&self, _req: &Request, ino: INodeNo, fh: FileHandle, lock_owner: LockOwner, reply: ReplyEmpty) {
        let fs = Arc::clone(&self.fs);
        self.spawn("flush", ino.0, async move {
            // Saved first: a lock given up lets others read what was written.
            let saved = fs.flush(ino.0, fh.0).await;
            let unlocked = fs.unlock_owner(ino.0, lock_owner.0).await;
            match saved.and(unlocked) {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno("flush", &e)),
            }
        });
    }

    fn fsyncdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        let fs = Arc::clone(&self.fs);
        self.spawn("fsyncdir", ino.0, async move {
            match fs.fsyncdir(ino.0).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno("fsyncdir", &e)),
            }
        });
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        let fs = Arc::clone(&self.fs);
        self.spawn("fsync", ino.0, async move {
            match fs.fsync(ino.0, fh.0).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno("fsync", &e)),
            }
        });
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let fs = Arc::clone(&self.fs);
        self.spawn("release", ino.0, async move {
            // Its flocks and open-file locks go with the open file, once what
            // it wrote is stored (a stream ends at release).
            let released = fs.release(ino.0, fh.0).await;
            fs.unlock_handle(fh.0).await;
            match released {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno("release", &e)),
            }
        });
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.opened(FileHandle(self.fs.opendir(ino.0)), FopenFlags::empty());
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.fs.releasedir(fh.0);
        reply.ok();
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, reply: ReplyDirectory) {
        if let Some(entries) = self.fs.listing_now(ino.0, fh.0, read_from(offset)) {
            return reply_dir(&self.fs, ino.0, offset, entries, reply);
        }
        let fs = Arc::clone(&self.fs);
        self.spawn("readdir", ino.0, async move {
            let entries = fs.listing(ino.0, fh.0, read_from(offset)).await;
            reply_dir(&fs, ino.0, offset, entries, reply);
        });
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: ReplyDirectoryPlus,
    ) {
        if let Some(entries) = self.fs.listing_now(ino.0, fh.0, read_from(offset)) {
            return reply_plus(&self.fs, self.owner, ino.0, offset, entries, reply);
        }
        let (fs, me) = (Arc::clone(&self.fs), self.owner);
        self.spawn("readdirplus", ino.0, async move {
            let entries = fs.listing(ino.0, fh.0, read_from(offset)).await;
            reply_plus(&fs, me, ino.0, offset, entries, reply);
        });
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        // The server does not report its free space; the user's upload limit bounds
        // any single file. Report a large, stable capacity so tools do not refuse.
        let blocks = 1u64 << 32;
        reply.statfs(blocks, blocks, blocks, 1 << 30, 1 << 30, 4096, super::core::NAME_MAX as u32, 4096);
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        // Documented choice: only vaultfs's own read-only attributes exist.
        reply.error(Errno::from_i32(FsError::NotSupported.errno()));
    }

    fn getlk(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        reply: ReplyLock,
    ) {
        let req = match lock_request(lock_owner, start, end, typ, pid) {
            Ok(req) => req,
            Err(e) => return reply.error(errno("getlk", &e)),
        };
        let fs = Arc::clone(&self.fs);
        self.spawn("getlk", ino.0, async move {
            match fs.getlk(ino.0, req).await {
                Ok(None) => reply.locked(start, end, libc::F_UNLCK, 0),
                Ok(Some(c)) => {
                    let typ = if c.exclusive { libc::F_WRLCK } else { libc::F_RDLCK };
                    reply.locked(c.start, c.end, typ, c.pid)
                }
                Err(e) => reply.error(errno("getlk", &e)),
            }
        });
    }

    fn setlk(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        sleep: bool,
        reply: ReplyEmpty,
    ) {
        let lock = match lock_request(lock_owner, start, end, typ, pid) {
            Ok(lock) => lock,
            Err(e) => return reply.error(errno("setlk", &e)),
        };
        let (fs, thread) = (Arc::clone(&self.fs), req.pid());
        self.spawn("setlk", ino.0, async move {
            match fs.setlk(ino.0, fh.0, lock, sleep, signalled(thread)).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno("setlk", &e)),
            }
        });
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        if name == XATTR_LOCKS {
            // Asks the server; not listed, so copies of the file never ask.
            let fs = Arc::clone(&self.fs);
            return self.spawn("getxattr", ino.0, async move {
                match fs.lock_holders(ino.0).await {
                    Ok(value) => reply_xattr(reply, size, &value),
                    Err(e) => reply.error(errno("getxattr", &e)),
                }
            });
        }
        match self.fs.getxattr(ino.0, name) {
            Ok(value) => reply_xattr(reply, size, &value),
            Err(e) => reply.error(errno("getxattr", &e)),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        match self.fs.listxattr(ino.0) {
            Ok(names) => {
                let mut buf = Vec::new();
                for n in names {
                    buf.extend_from_slice(n.as_bytes());
                    buf.push(0);
                }
                reply_xattr(reply, size, &buf);
            }
            Err(e) => reply.error(errno("listxattr", &e)),
        }
    }
}

/// A directory's offsets for the kernel count `.` and `..` first, then the
/// entries in the order of the open directory's listing: an entry's offset
/// is where the next read starts after it.
const DOTS: u64 = 2;

/// Where a read from kernel offset `offset` starts in the open directory's
/// listing: offset 0 starts a new pass (the first read, or one after a
/// rewinddir); after `.` and `..` come positions in the pass.
fn read_from(offset: u64) -> ReadFrom {
    match offset {
        0 => ReadFrom::Start,
        _ => ReadFrom::At(offset.saturating_sub(DOTS) as usize),
    }
}

/// The index, counting `.` and `..` first, of the entry at position `at` of
/// the listing (its offset for the kernel is one more: where the next read
/// starts).
fn kernel_offset(at: usize) -> u64 {
    at as u64 + DOTS
}

/// Answers a readdir from `entries` (the directory's children in the listing
/// its open directory reads), starting after the kernel's `offset`.
fn reply_dir<R: Remote>(
    fs: &VaultFs<R>,
    ino: u64,
    offset: u64,
    entries: Result<Listing, FsError>,
    mut reply: ReplyDirectory,
) {
    let entries = match entries {
        Ok(e) => e,
        Err(e) => return reply.error(errno("readdir", &e)),
    };
    let parent = fs.parent(ino);
    let dots = [(0, (ino, Kind::Dir, OsStr::new("."))), (1, (parent, Kind::Dir, OsStr::new("..")))];
    let listed = entries
        .iter()
        .map(|(at, (child, kind, name, _))| (kernel_offset(*at), (*child, *kind, name.as_os_str())));
    for (at, (child, kind, name)) in dots.into_iter().filter(|(at, _)| *at >= offset).chain(listed) {
        if reply.add(INodeNo(child), at + 1, file_type(kind), name) {
            break;
        }
    }
    reply.ok();
}

/// Answers a readdirplus from `entries` (the directory's children with their
/// attributes, in the listing its open directory reads), starting after the
/// kernel's `offset`.
fn reply_plus<R: Remote>(
    fs: &VaultFs<R>,
    me: Owner,
    ino: u64,
    offset: u64,
    entries: Result<Listing, FsError>,
    mut reply: ReplyDirectoryPlus,
) {
    let entries = match entries {
        Ok(e) => e,
        Err(e) => return reply.error(errno("readdirplus", &e)),
    };
    let mut dots = Vec::new();
    if offset < DOTS {
        let [Ok(this), Ok(parent)] = [ino, fs.parent(ino)].map(|i| fs.getattr(i)) else {
            return reply.error(Errno::from_i32(FsError::NotFound.errno()));
        };
        dots = vec![
            (0, (Some(this), ino, Kind::Dir, OsStr::new("."))),
            (1, (Some(parent), parent.ino, Kind::Dir, OsStr::new(".."))),
        ];
    }
    let listed = entries.iter().map(|(at, (child, kind, name, attr))| {
        (kernel_offset(*at), (*attr, *child, *kind, name.as_os_str()))
    });
    for (at, (attr, child, kind, name)) in dots.into_iter().filter(|(at, _)| *at >= offset).chain(listed) {
        // An entry that failed its check is listed but not cached (TTL 0), so
        // each use of it comes back to us and gets EIO.
        let (attr, ttl) = match attr {
            Some(a) => (a, TTL),
            None => {
                let epoch = SystemTime::UNIX_EPOCH;
                (
                    Attr { ino: child, kind, size: 0, mtime: epoch, atime: epoch, perm: 0, nlink: 1 },
                    Duration::ZERO,
                )
            }
        };
        if reply.add(INodeNo(child), at + 1, name, &ttl, &me.attr(&attr), Generation(0)) {
            break;
        }
    }
    reply.ok();
}

/// Who files are presented as owned by; copied into each task to build replies.
#[derive(Clone, Copy)]
struct Owner {
    uid: u32,
    gid: u32,
    umask: u16,
}

impl Owner {
    fn attr(&self, a: &Attr) -> FileAttr {
        let kind = file_type(a.kind);
        FileAttr {
            ino: INodeNo(a.ino),
            size: a.size,
            blocks: a.size.div_ceil(512),
            atime: a.atime,
            mtime: a.mtime,
            ctime: a.mtime,
            crtime: a.mtime,
            kind,
            // A link's mode means nothing on Linux; it shows 0777 as everywhere.
            perm: if a.kind == Kind::Symlink { a.perm } else { a.perm & !self.umask },
            nlink: a.nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }
}

fn file_type(kind: Kind) -> FileType {
    match kind {
        Kind::Dir => FileType::Directory,
        Kind::File => FileType::RegularFile,
        Kind::Symlink => FileType::Symlink,
    }
}
