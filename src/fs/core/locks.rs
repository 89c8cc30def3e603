//! File locks across clients: flock and POSIX record locks held on the server.
//!
//! Data flow. The kernel sends every lock request of the mount here (the mount
//! asks for FUSE_POSIX_LOCKS and FUSE_FLOCK_LOCKS when the server keeps locks,
//! see [`VaultFs::start_locks`]); a flock is a lock over the whole file whose
//! owner is the open file, a POSIX lock one over a range whose owner is the
//! process. [`LockTable`] holds what each owner of this mount holds on each
//! file; a change works out the owner's new ranges here (split, merged: the
//! POSIX rules, [`with_lock`]) and asks the server to make them exactly that
//! (`Remote::set_locks`), so a request sent twice does no harm. A blocking
//! request waits on the server (a long poll answered when a lock goes or
//! expires), round after round, until granted or until the kernel's caller
//! has a signal pending (the `interrupted` future from the FUSE adapter); then
//! the owner's earlier ranges are sent again under a newer number, which also
//! voids a grant the server was still waiting to give.
//!
//! A lock is a point of coherence, as on NFS: unsaved changes are uploaded
//! before a lock is given up, and once one is granted the mount applies every
//! change the server had when it granted it (the vault's change number and
//! the file's version come with the answer), drops a cached copy of the file
//! that is older (unless it holds unsaved changes) and tells the kernel to
//! drop its pages, before the caller goes on. So SQLite in rollback-journal
//! mode works from several machines. One owner's requests go one at a time.
//!
//! Locks last `ttl` unless renewed; [`VaultFs::keep_locks`] renews all of the
//! mount's every third of it, so a crashed machine's locks go within `ttl`.
//! Flush (each close) gives up the closing process's POSIX locks on the file,
//! release (the last close of an open file) its flocks and open-file locks,
//! unmount all. A server that lies about locks can let two owners hold one
//! lock, or keep one waiting; it learns nothing it did not know, and saves
//! stay compare-and-swap, so no write is lost (docs/SECURITY.md).

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use super::{FsError, Ino, Invalidation, Result, VaultFs};
use crate::ids::{FileId, HolderId};
use crate::protocol::{
    HeldLock, LockAnswer, LockOwnerOf, LockRange, SetLocks, DEFAULT_LOCK_TTL_MS, LOCK_END_MAX,
    MAX_LOCK_RANGES, MAX_WAIT_MS,
};
use crate::remote::{Remote, RemoteError};

/// The shortest and longest lock lifetime this mount believes of the server
/// (it renews every third of it).
const TTL_BOUNDS: (Duration, Duration) = (Duration::from_secs(3), Duration::from_secs(3600));
/// How long the kernel is given to drop a file's pages before a lock is
/// answered anyway.
pub(super) const KERNEL_TOLD_WITHIN: Duration = Duration::from_secs(2);

/// How much of `user.vaultfs.locks` lists locks one by one.
const MAX_HOLDERS_TEXT: usize = 60 << 10;

/// The first and the longest pause between rounds of a blocking request
/// that the server answered early.
const MIN_PAUSE: Duration = Duration::from_millis(50);
const MAX_PAUSE: Duration = Duration::from_secs(5);

/// What a lock request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockKind {
    /// A read (shared) lock.
    Read,
    /// A write (exclusive) lock.
    Write,
    /// Give up the range.
    Unlock,
}

/// One lock request from the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockRequest {
    /// The owner: a process (POSIX locks) or an open file (flock, OFD locks).
    pub owner: u64,
    /// The process asking.
    pub pid: u32,
    /// First byte.
    pub start: u64,
    /// Last byte (`i64::MAX`: to the end of the file, however long).
    pub end: u64,
    /// What it asks for.
    pub kind: LockKind,
}

/// A lock that stands in the way (F_GETLK's answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockConflict {
    /// First byte.
    pub start: u64,
    /// Last byte.
    pub end: u64,
    /// A write lock.
    pub exclusive: bool,
    /// The holding process if it is on this machine, else 0.
    pub pid: u32,
}

/// `ranges` (sorted, not overlapping) after `kind` over `start..=end`: the
/// range is first taken out of every held range (splitting them), then added
/// with the new kind unless it is an unlock, and touching ranges of one kind
/// are merged, as POSIX says one owner's locks combine.
pub fn with_lock(ranges: &[LockRange], start: u64, end: u64, kind: LockKind) -> Vec<LockRange> {
    let mut out: Vec<LockRange> = Vec::with_capacity(ranges.len() + 2);
    for r in ranges {
        if r.end < start || r.start > end {
            out.push(*r);
            continue;
        }
        if r.start < start {
            out.push(LockRange { end: start - 1, ..*r });
        }
        if r.end > end {
            out.push(LockRange { start: end + 1, ..*r });
        }
    }
    if kind != LockKind::Unlock {
        out.push(LockRange { start, end, exclusive: kind == LockKind::Write });
    }
    out.sort_by_key(|r| r.start);
    let mut merged: Vec<LockRange> = Vec::with_capacity(out.len());
    for r in out {
        match merged.last_mut() {
            Some(last) if last.exclusive == r.exclusive && last.end.checked_add(1) == Some(r.start) => {
                last.end = r.end;
            }
            _ => merged.push(r),
        }
    }
    merged
}

/// One owner's gate: its requests go one at a time.
type Gate = Arc<tokio::sync::Mutex<()>>;

/// What one owner holds on one file.
#[derive(Debug, Clone, Default)]
struct Owned {
    ranges: Vec<LockRange>,
    /// The open file it was last asked through (its release ends flocks).
    fh: u64,
    /// The process that last asked (for F_GETLK of another owner here).
    pid: u32,
}

/// The locks of this mount. A leaf lock inside; one owner's requests are
/// ordered by its own async gate, taken before the file's plaintext.
#[derive(Debug)]
pub(super) struct LockTable {
    /// This mount's name as a lock holder.
    holder: HolderId,
    /// The host, shown to other members with each lock.
    host: String,
    /// Numbers this mount's requests, so the server can tell newer from older.
    seq: AtomicU64,
    /// The server's lock lifetime; `None` until the server was asked, or
    /// when it keeps no locks (then the kernel keeps them, on this machine only).
    ttl: Mutex<Option<Duration>>,
    /// What each owner holds, by file and owner.
    held: Mutex<HashMap<(FileId, u64), Owned>>,
    /// A request went unanswered (an outage, a lost answer): the server may
    /// hold what the table does not, until the next renewal, which names
    /// what the table holds and so drops the rest.
    uncertain: std::sync::atomic::AtomicBool,
    /// Each owner's gate, by file and owner.
    gates: Mutex<HashMap<(FileId, u64), Gate>>,
}

impl LockTable {
    pub(super) fn new() -> Self {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().chars().filter(|c| !c.is_control()).take(64).collect())
            .unwrap_or_default();
        LockTable {
            // Without randomness the mount could not log in either; a fixed id
            // would only let two such mounts share locks.
            holder: HolderId::random().unwrap_or(HolderId([0; 16])),
            host,
            seq: AtomicU64::new(1),
            ttl: Mutex::new(None),
            held: Mutex::new(HashMap::new()),
            uncertain: std::sync::atomic::AtomicBool::new(false),
            gates: Mutex::new(HashMap::new()),
        }
    }

    /// Each (file, owner) with ranges held, as a renewal names them.
    fn owners(&self) -> Vec<LockOwnerOf> {
        self.held.lock().keys().map(|(file, owner)| LockOwnerOf { file: *file, owner: *owner }).collect()
    }

    fn set_uncertain(&self) {
        self.uncertain.store(true, Ordering::Relaxed);
    }

    fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed)
    }

    fn label(&self, pid: u32) -> String {
        format!("{}, pid {pid}", self.host)
    }

    fn gate(&self, key: (FileId, u64)) -> Gate {
        Arc::clone(self.gates.lock().entry(key).or_default())
    }

    fn ranges(&self, key: (FileId, u64)) -> Vec<LockRange> {
        self.held.lock().get(&key).map(|o| o.ranges.clone()).unwrap_or_default()
    }

    fn set(&self, key: (FileId, u64), ranges: Vec<LockRange>, fh: u64, pid: u32) {
        let mut held = self.held.lock();
        if ranges.is_empty() {
            held.remove(&key);
            drop(held);
            // The gate goes with the last range, unless someone waits at it.
            let mut gates = self.gates.lock();
            if gates.get(&key).is_some_and(|g| Arc::strong_count(g) <= 2) {
                gates.remove(&key);
            }
        } else {
            held.insert(key, Owned { ranges, fh, pid });
        }
    }

    /// Ranges held by this mount, over all files and owners.
    pub(super) fn count(&self) -> u64 {
        self.held.lock().values().map(|o| o.ranges.len() as u64).sum()
    }
}

/// A lifetime the server named, bounded: renewals neither hammer a server
/// that says a millisecond nor stop for one that says a year.
fn bounded_ttl(ms: u64) -> Duration {
    Duration::from_millis(ms).clamp(TTL_BOUNDS.0, TTL_BOUNDS.1)
}

/// `text` with control characters shown as `?` (the server's words go into
/// an attribute a terminal may print).
fn printable(text: &str) -> String {
    text.chars().map(|c| if c.is_control() { '?' } else { c }).collect()
}

fn lock_error(e: RemoteError) -> FsError {
    match e {
        RemoteError::Forbidden(m) | RemoteError::Unauthorized(m) => FsError::Access(m),
        other => FsError::NoLock(other.to_string()),
    }
}

impl<R: Remote> VaultFs<R> {
    /// Asks the server whether it keeps locks (and for how long): called once
    /// before the kernel is told to send lock requests here. A server without
    /// them (an older version) leaves locking to the kernel, on this machine only.
    pub(super) async fn start_locks(&self) -> bool {
        let ttl = match self.remote().renew_locks(self.locks.holder, Vec::new()).await {
            Ok(r) => Some(bounded_ttl(r.ttl_ms)),
            Err(RemoteError::NotFound(_)) => {
                tracing::warn!(
                    "the server keeps no file locks (an older version): locks hold on this machine only"
                );
                None
            }
            Err(e) => {
                tracing::debug!(error = %e, "could not ask the server about locks; assuming it keeps them");
                Some(Duration::from_millis(DEFAULT_LOCK_TTL_MS))
            }
        };
        *self.locks.ttl.lock() = ttl;
        ttl.is_some()
    }

    /// Whether locks are held on the server, across clients.
    pub fn locks_across_clients(&self) -> bool {
        self.locks.ttl.lock().is_some()
    }

    /// Renews this mount's locks every third of their lifetime while it holds
    /// any, until the filesystem is dropped: run it on the runtime (once per
    /// mount, after [`VaultFs::start_locks`]).
    pub fn keep_locks(self: &Arc<Self>) -> impl Future<Output = ()> + Send + 'static {
        let fs = Arc::downgrade(self);
        async move {
            loop {
                let Some(me) = fs.upgrade() else { return };
                let Some(ttl) = *me.locks.ttl.lock() else { return };
                let held = me.locks.count();
                if held > 0 || me.locks.uncertain.swap(false, Ordering::Relaxed) {
                    // Bounded: a renewal stuck on a dead connection must not
                    // outlast the locks it renews.
                    let renew = me.remote().renew_locks(me.locks.holder, me.locks.owners());
                    match tokio::time::timeout(ttl / 3, renew).await {
                        Ok(Ok(r)) if r.ranges < held => tracing::warn!(
                            held,
                            renewed = r.ranges,
                            "the server lost some of this mount's locks (not renewed in time?)"
                        ),
                        Ok(Ok(r)) => *me.locks.ttl.lock() = Some(bounded_ttl(r.ttl_ms)),
                        Ok(Err(e)) => {
                            me.locks.set_uncertain();
                            tracing::warn!(error = %e, "could not renew this mount's locks; they lapse unless the next try works")
                        }
                        Err(_) => {
                            me.locks.set_uncertain();
                            tracing::warn!("renewing this mount's locks took too long; they lapse unless the next try works")
                        }
                    }
                }
                drop(me);
                tokio::time::sleep(ttl / 3).await;
            }
        }
    }

    /// Gives up every lock of this mount (at unmount).
    pub async fn drop_all_locks(&self) {
        if !self.locks_across_clients() {
            return;
        }
        self.locks.held.lock().clear();
        if let Err(e) = self.remote().drop_locks(self.locks.holder).await {
            tracing::warn!(error = %e, "could not give up this mount's locks; they lapse by themselves");
        }
    }

    /// F_GETLK: the first lock of another owner (here or elsewhere) that
    /// would stand in the way of `req`, if any.
    pub async fn getlk(&self, ino: Ino, req: LockRequest) -> Result<Option<LockConflict>> {
        let id = self.lock_target(ino, &req)?;
        // A file only this mount knows has no locks (a lock creates it there).
        if self.tree.lock().is_unsent(ino) {
            return Ok(None);
        }
        let wanted = LockRange { start: req.start, end: req.end, exclusive: req.kind == LockKind::Write };
        let held = self.remote().file_locks(id).await.map_err(lock_error)?;
        let blocker = held.into_iter().find(|l| {
            !(l.holder == self.locks.holder && l.owner == req.owner) && wanted.conflicts_with(&l.range)
        });
        Ok(blocker.map(|l| self.conflict_of(id, &l)))
    }

    fn conflict_of(&self, id: FileId, l: &HeldLock) -> LockConflict {
        let pid = if l.holder == self.locks.holder {
            self.locks.held.lock().get(&(id, l.owner)).map_or(0, |o| o.pid)
        } else {
            0
        };
        LockConflict {
            start: l.range.start,
            end: l.range.end.min(LOCK_END_MAX),
            exclusive: l.range.exclusive,
            pid,
        }
    }

    /// The file a lock request is about, after checking the request.
    fn lock_target(&self, ino: Ino, req: &LockRequest) -> Result<FileId> {
        if req.start > req.end || req.end > LOCK_END_MAX {
            return Err(FsError::Invalid("lock range".into()));
        }
        Ok(self.file_info(ino)?.id)
    }

    /// F_SETLK, F_SETLKW and flock: makes the owner hold `req` from now on
    /// (besides what else it holds), waiting for others to give way if `wait`,
    /// until `interrupted` completes (a signal for the caller).
    pub async fn setlk(
        &self,
        ino: Ino,
        fh: u64,
        req: LockRequest,
        wait: bool,
        interrupted: impl Future<Output = ()> + Send,
    ) -> Result<()> {
        let id = self.lock_target(ino, &req)?;
        // Locks are kept by the server, which must have the file (a file
        // only this mount knows holds none to give up).
        if req.kind == LockKind::Unlock && self.tree.lock().is_unsent(ino) {
            return Ok(());
        }
        self.ensure_on_server(ino).await?;
        let key = (id, req.owner);
        let gate = self.locks.gate(key);
        let _one = gate.lock().await;
        let before = self.locks.ranges(key);
        let after = with_lock(&before, req.start, req.end, req.kind);
        if after.len() > MAX_LOCK_RANGES {
            return Err(FsError::NoLock(format!("more than {MAX_LOCK_RANGES} locked ranges on one file")));
        }
        let gives_up_writes = before
            .iter()
            .any(|r| r.exclusive && r.start <= req.end && req.start <= r.end && req.kind != LockKind::Write);
        if req.kind == LockKind::Unlock || gives_up_writes {
            // What was written under the lock is stored before others may read it.
            let saved = self.save_before_unlock(ino, id).await;
            if req.kind == LockKind::Unlock {
                if after != before || self.locks.uncertain.load(Ordering::Relaxed) {
                    self.send_locks(id, req.owner, req.pid, after, fh).await?;
                }
                return saved;
            }
            saved?;
        }
        let mut interrupted = std::pin::pin!(interrupted);
        let mut pause = MIN_PAUSE;
        let answer = loop {
            let ask = self.lock_request(req.owner, req.pid, after.clone(), wait);
            let asked = std::time::Instant::now();
            let answer = tokio::select! {
                answer = self.remote().set_locks(id, ask) => answer.map_err(|e| {
                    // Whether the server took it is not known.
                    self.locks.set_uncertain();
                    lock_error(e)
                })?,
                () = &mut interrupted => {
                    // Whatever the server did with the request, the owner holds
                    // what it held before; the newer number voids the wait.
                    if let Err(e) = self.send_locks(id, req.owner, req.pid, before, fh).await {
                        tracing::warn!(file = %id, error = %e, "could not take back an interrupted lock request");
                    }
                    return Err(FsError::Interrupted);
                }
            };
            if answer.granted {
                break answer;
            }
            if !wait {
                return Err(FsError::WouldBlock);
            }
            // The server's wait ended with the lock still held: ask again,
            // after a pause if it answered well before its wait was over (a
            // server that refuses at once is not asked in a tight loop).
            if asked.elapsed() < Duration::from_millis(MAX_WAIT_MS / 2) {
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    () = &mut interrupted => return Err(FsError::Interrupted),
                }
                pause = (pause * 2).min(MAX_PAUSE);
            } else {
                pause = MIN_PAUSE;
            }
        };
        self.locks.set(key, after, fh, req.pid);
        *self.locks.ttl.lock() = Some(bounded_ttl(answer.ttl_ms));
        self.catch_up_for_lock(ino, id, &answer).await;
        Ok(())
    }

    fn lock_request(&self, owner: u64, pid: u32, ranges: Vec<LockRange>, wait: bool) -> SetLocks {
        SetLocks {
            holder: self.locks.holder,
            owner,
            seq: self.locks.next_seq(),
            ranges,
            label: self.locks.label(pid),
            wait_ms: if wait { MAX_WAIT_MS } else { 0 },
        }
    }

    /// Makes the owner hold exactly `ranges` on the server, without waiting
    /// (giving up locks, or taking back a request): never refused for a
    /// conflict, as it holds no more than it held.
    async fn send_locks(
        &self,
        id: FileId,
        owner: u64,
        pid: u32,
        ranges: Vec<LockRange>,
        fh: u64,
    ) -> Result<()> {
        let ask = self.lock_request(owner, pid, ranges.clone(), false);
        let result = self.remote().set_locks(id, ask).await;
        // Kept as asked even when the server could not be told: the next
        // renewal names only what the table holds, and the server drops the rest.
        self.locks.set((id, owner), ranges, fh, pid);
        match result {
            Ok(a) if a.granted => Ok(()),
            Ok(_) => {
                self.locks.set_uncertain();
                Err(FsError::NoLock("the server kept a lock this mount gave up".into()))
            }
            Err(RemoteError::NotFound(_)) => Ok(()), // the file is gone, and its locks with it
            Err(e) => {
                self.locks.set_uncertain();
                Err(lock_error(e))
            }
        }
    }

    /// Flush, a close by one process: gives up its POSIX locks on the file.
    pub async fn unlock_owner(&self, ino: Ino, owner: u64) -> Result<()> {
        // Every close comes here: nothing is looked up while the mount holds
        // no lock at all, which is nearly always.
        if self.locks.held.lock().is_empty() {
            return Ok(());
        }
        let Ok(info) = self.file_info(ino) else { return Ok(()) };
        let key = (info.id, owner);
        if !self.locks.held.lock().contains_key(&key) {
            return Ok(());
        }
        let gate = self.locks.gate(key);
        let _one = gate.lock().await;
        let pid = self.locks.held.lock().get(&key).map_or(0, |o| o.pid);
        self.send_locks(info.id, owner, pid, Vec::new(), 0).await
    }

    /// Release, the last close of an open file: gives up the locks taken
    /// through it (flock, open-file locks).
    pub async fn unlock_handle(&self, fh: u64) {
        let owners: Vec<(FileId, u64, u32)> = self
            .locks
            .held
            .lock()
            .iter()
            .filter(|(_, o)| o.fh == fh)
            .map(|((id, owner), o)| (*id, *owner, o.pid))
            .collect();
        for (id, owner, pid) in owners {
            let gate = self.locks.gate((id, owner));
            let _one = gate.lock().await;
            if let Err(e) = self.send_locks(id, owner, pid, Vec::new(), fh).await {
                tracing::warn!(file = %id, error = %e, "could not give up a lock at close; it lapses by itself");
            }
        }
    }

    /// Uploads the file's unsaved changes before a lock on it goes.
    async fn save_before_unlock(&self, ino: Ino, id: FileId) -> Result<()> {
        if self.modes.is_streaming(id) {
            return Ok(()); // a stream is stored whole at fsync or release
        }
        match self.cache.peek(id) {
            Some(handle) => self.upload(ino, &handle).await,
            None => Ok(()),
        }
    }

    /// After a lock was granted: the vault as the server had it then, and no
    /// cached copy of the file older than its version then.
    async fn catch_up_for_lock(&self, ino: Ino, id: FileId, answer: &LockAnswer) {
        let Ok(info) = self.file_info(ino) else { return };
        let behind = {
            let mut tree = self.tree.lock();
            let behind = tree.listed_at(info.vault).is_some_and(|n| n < answer.changes);
            if behind {
                let known = tree.vault_changes(info.vault).max(answer.changes);
                tree.note_vault_changes([(info.vault, known)]);
            }
            behind
        };
        if behind {
            if let Err(e) = self.catch_up(info.vault).await {
                tracing::debug!(vault = %info.vault, error = %e, "could not bring the vault up to date after a lock");
            }
        }
        let listed_older = self.file_info(ino).is_ok_and(|i| i.version != answer.version);
        if let Some(handle) = self.cache.peek(id) {
            let mut d = handle.lock().await;
            if d.dirty {
                return; // its save goes through the usual conflict path
            }
            if (d.loaded || d.filling) && d.version != answer.version {
                // Older than what the server had when it granted the lock: read anew.
                self.cancel_fill(id, &mut d);
                d.loaded = false;
            } else if !listed_older {
                return;
            }
        } else if !listed_older {
            return;
        }
        if listed_older {
            match self.fetch_file(&info).await {
                Ok(fresh) => self.set_file_info(ino, |i| *i = fresh),
                Err(e) => {
                    tracing::debug!(file = %id, error = %e, "could not ask for the file's version after a lock")
                }
            }
        }
        self.tell_kernel_now(vec![Invalidation::Inode(ino)]).await;
    }

    /// The locks on a file, one line each, for `user.vaultfs.locks`.
    pub async fn lock_holders(&self, ino: Ino) -> Result<Vec<u8>> {
        let id = self.file_info(ino)?.id;
        let held = self.remote().file_locks(id).await.map_err(lock_error)?;
        let mut out = String::new();
        let total = held.len();
        for (i, l) in held.into_iter().enumerate() {
            if out.len() > MAX_HOLDERS_TEXT {
                // An attribute's value is at most 64 KiB.
                out.push_str(&format!("and {} more\n", total - i));
                break;
            }
            let here = if l.holder == self.locks.holder { " (this mount)" } else { "" };
            let end = if l.range.end >= LOCK_END_MAX { "end".to_string() } else { l.range.end.to_string() };
            let (label, user) = (printable(&l.label), printable(&l.user));
            out.push_str(&format!(
                "{} lock on bytes {}-{end} by {user} at {label}{here}, for {} s unless renewed\n",
                if l.range.exclusive { "write" } else { "read" },
                l.range.start,
                l.expires_in_ms.div_ceil(1000),
            ));
        }
        Ok(out.into_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const W: u64 = 24;

    /// The reference: one kind (or none) per byte of a small file.
    fn bytes_of(ranges: &[LockRange]) -> Vec<Option<bool>> {
        let mut out = vec![None; W as usize + 1];
        for r in ranges {
            for b in r.start..=r.end.min(W) {
                assert!(out[b as usize].is_none(), "ranges overlap: {ranges:?}");
                out[b as usize] = Some(r.exclusive);
            }
        }
        out
    }

    fn kind() -> impl Strategy<Value = LockKind> {
        prop_oneof![Just(LockKind::Read), Just(LockKind::Write), Just(LockKind::Unlock)]
    }

    proptest! {
        #[test]
        fn locks_combine_as_posix_says(ops in proptest::collection::vec((0..W, 0..W, kind()), 1..12)) {
            let mut ranges = Vec::new();
            let mut model = vec![None; W as usize + 1];
            for (a, b, k) in ops {
                let (start, end) = (a.min(b), a.max(b));
                ranges = with_lock(&ranges, start, end, k);
                for byte in &mut model[start as usize..=end as usize] {
                    *byte = match k { LockKind::Unlock => None, k => Some(k == LockKind::Write) };
                }
                prop_assert_eq!(bytes_of(&ranges), model.clone());
                // Sorted, and no two touching ranges of one kind left apart.
                for pair in ranges.windows(2) {
                    prop_assert!(pair[0].end < pair[1].start);
                    prop_assert!(pair[0].end + 1 < pair[1].start || pair[0].exclusive != pair[1].exclusive);
                }
            }
        }
    }

    #[test]
    fn a_lock_to_the_end_of_the_file_splits_and_goes() {
        let all = with_lock(&[], 0, LOCK_END_MAX, LockKind::Read);
        let split = with_lock(&all, 10, 19, LockKind::Write);
        assert_eq!(
            split,
            vec![
                LockRange { start: 0, end: 9, exclusive: false },
                LockRange { start: 10, end: 19, exclusive: true },
                LockRange { start: 20, end: LOCK_END_MAX, exclusive: false },
            ]
        );
        assert!(with_lock(&split, 0, LOCK_END_MAX, LockKind::Unlock).is_empty());
    }
}
