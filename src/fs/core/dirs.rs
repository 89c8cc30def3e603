//! Records as directories: mkdir and rmdir, and new records on their way
//! to the server.
//!
//! Data flow. A new record's title is sealed with the vault's key and the
//! record made in the tree only, empty and unsent (as a new file is, see
//! super::unsent): mkdir answers without a round trip. The first file saved
//! in it creates it on the server in the same request as the file
//! (`PUT /v1/records/{record}/files/{file}` with the record's headers),
//! where `tar -x` or `git checkout` paid a request per directory (a first
//! file over [`WITH_FILE_MAX`] sends it alone first). Anything else that
//! names it to the server sends it first, on its own
//! ([`VaultFs::record_on_server`]): a file created empty (a lock, a stream,
//! a symbolic link), a rename into it, an rmdir of one a request may have
//! created. Records above it that are not sent yet go first (taken again if
//! one was moved meanwhile). One nothing sends is sent [`SEND_NEW_DIR_AFTER`]
//! after its mkdir (again every few seconds while the server cannot be
//! reached), at fsyncdir of it or of its directory, and at unmount, so other
//! clients see empty directories too. Each is sent under its own sending
//! lock, so it is created once, with its title sealed then (the vault's key
//! may have changed since mkdir). An rmdir before then sends nothing, and a
//! rename of it changes the tree only, as does a rename of one over an
//! empty one (a directory on the server renamed over one sends that one
//! first, to be replaced there). A server that
//! says its id is taken is believed once its listing names it.
//!
//! What this costs: a refusal (a vault turned read-only elsewhere meanwhile)
//! comes at the first save in the directory, not at mkdir; a crash before
//! then loses the names of directories not yet sent, as it loses files not
//! yet saved; and until then the directory above it, if it is on the server,
//! looks empty there, so another client may remove it (saves in the new
//! directory then fail with ENOENT, and their content stays in memory until
//! unmount, as for a new file whose directory another client removed).
//!
//! Removing a record takes it out of the tree at once and deletes it on the
//! server in the background (super::deletes), after the files unlinked from
//! it, with the version this mount knows: a record changed or filled
//! elsewhere meanwhile is not removed blindly (the server refuses, and it
//! shows again). One that still holds a file unlinked while open asks the
//! server first.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::tree::{check_name, Key, Node};
use super::{Attr, FsError, Ino, Result, VaultFs};
use crate::crypto::NameContext;
use crate::ids::{RecordId, VaultId};
use crate::protocol::{NewRecord, RecordInfo, Sealed};
use crate::remote::{Remote, RemoteError};

/// How long after its mkdir a record no file was saved in is sent on its
/// own: long enough for the first file of `tar -x` or `cp -r` to take it
/// along, short enough that other clients soon see the directory.
pub const SEND_NEW_DIR_AFTER: Duration = Duration::from_millis(500);

/// How long after a send that found the server unreachable it is tried again.
const SEND_RETRY_AFTER: Duration = Duration::from_secs(5);

/// How often a record sent on its own may be found moved, under a record
/// not sent yet, before giving up (each time, that one is sent first).
const MOVED_MOST: usize = 16;

/// The largest first file a new record goes to the server with: the
/// record's sending lock is held while that file uploads.
pub const WITH_FILE_MAX: u64 = 1 << 20;

/// New records on their way to the server.
pub(super) struct NewDirs {
    /// Each record's sending lock, while a task holds or waits for it.
    sending: Locks,
    /// Whether the server creates a record with a file in one request (one
    /// that does not know the record's headers ignores them, and answers
    /// 404: then records go on their own from then on).
    with_files: AtomicBool,
    /// Records made here, each with when it is to be sent if nothing sent it.
    later: Mutex<VecDeque<(Instant, Ino)>>,
    /// Whether the task that sends them runs.
    sender: AtomicBool,
}

impl Default for NewDirs {
    fn default() -> Self {
        NewDirs {
            sending: Locks::default(),
            with_files: AtomicBool::new(true),
            later: Mutex::default(),
            sender: AtomicBool::new(false),
        }
    }
}

/// The records' sending locks, by inode, while a task holds or waits for one.
#[derive(Default)]
struct Locks(Arc<Mutex<HashMap<Ino, Arc<tokio::sync::Mutex<()>>>>>);

impl Locks {
    /// Takes record `ino`'s sending lock, once no other task holds it.
    async fn take(&self, ino: Ino) -> Sending {
        let lock = Arc::clone(self.0.lock().entry(ino).or_default());
        Sending { ino, locks: Arc::clone(&self.0), _held: lock.lock_owned().await }
    }
}

/// The sending lock of a record, held: the record is created once. The
/// last task to let go of a record's lock takes it out of the map, so the
/// map holds only locks in use, whatever became of the record.
pub(super) struct Sending {
    ino: Ino,
    locks: Arc<Mutex<HashMap<Ino, Arc<tokio::sync::Mutex<()>>>>>,
    _held: tokio::sync::OwnedMutexGuard<()>,
}

impl Drop for Sending {
    fn drop(&mut self) {
        let mut locks = self.locks.lock();
        // Two owners (the map and this guard): no task waits for it. A task
        // takes a lock only under the map's mutex, held here.
        if locks.get(&self.ino).is_some_and(|lock| Arc::strong_count(lock) == 2) {
            locks.remove(&self.ino);
        }
    }
}

impl<R: Remote> VaultFs<R> {
    /// Creates a record (a directory) in a vault or record: in this mount
    /// only, sent with the first file saved in it (see the module comment).
    pub async fn mkdir(self: &Arc<Self>, parent: Ino, name: &OsStr) -> Result<Attr> {
        check_name(name)?;
        self.load_dir(parent).await?;
        self.writable(parent)?;
        let (vault, parent_record) = {
            let tree = self.tree.lock();
            if tree.child(parent, name).is_some() {
                return Err(FsError::Exists);
            }
            match tree.node(parent)? {
                Node::Root => {
                    return Err(FsError::NotPermitted("create vaults with `vaultfs vault create`".into()))
                }
                Node::Vault { vault } => (*vault, None),
                Node::Record { info, .. } => (info.vault, Some(info.id)),
                Node::File { .. } => return Err(FsError::NotDir),
            }
        };
        let id = RecordId::random().map_err(|e| FsError::Io(e.to_string()))?;
        let title = self.seal(vault, NameContext::RecordTitle { vault, record: id }, name)?;
        // Version 0: none the server gave yet.
        let info =
            RecordInfo { id, vault, parent: parent_record, title, fields: Sealed::default(), version: 0 };
        let node = Node::Record { info, parent };
        let ino = {
            let mut tree = self.tree.lock();
            if tree.child(parent, name).is_some() {
                return Err(FsError::Exists);
            }
            tree.add_unsent(parent, name, Key::Record(id), node.clone())
        };
        self.touch_dir(parent);
        self.touch_dir(ino);
        let attr = self.attr_of(&self.tree.lock(), ino, &node);
        self.send_later(ino);
        Ok(attr)
    }

    /// Sends record `ino` [`SEND_NEW_DIR_AFTER`] from now unless something
    /// sent it first. One task sends them all, in the order they are due,
    /// and ends when none waits: a mkdir wakes no thread (it is answered on
    /// the kernel's reading thread), but for the first after a pause.
    fn send_later(self: &Arc<Self>, ino: Ino) {
        self.queue_send(ino, SEND_NEW_DIR_AFTER);
        if !self.new_dirs.sender.swap(true, Ordering::AcqRel) {
            let fs = Arc::clone(self);
            tokio::spawn(async move { fs.send_when_due().await });
        }
    }

    /// Queues record `ino` to be sent `after` from now, in the order due.
    fn queue_send(&self, ino: Ino, after: Duration) {
        let mut later = self.new_dirs.later.lock();
        let due = Instant::now() + after;
        let at = later.partition_point(|(d, _)| *d <= due);
        later.insert(at, (due, ino));
    }

    async fn send_when_due(self: Arc<Self>) {
        loop {
            let next = self.new_dirs.later.lock().front().copied();
            let Some((due, _)) = next else {
                self.new_dirs.sender.store(false, Ordering::Release);
                // One queued meanwhile found the sender still running.
                if self.new_dirs.later.lock().is_empty() || self.new_dirs.sender.swap(true, Ordering::AcqRel)
                {
                    return;
                }
                continue;
            };
            tokio::time::sleep_until(due.into()).await;
            // Every one due now (one queued meanwhile may be due before the
            // one waited for: a retry waits longer than a new one).
            let ready: Vec<Ino> = {
                let mut later = self.new_dirs.later.lock();
                let now = Instant::now();
                let due = later.partition_point(|(d, _)| *d <= now);
                later.drain(..due).map(|(_, ino)| ino).collect()
            };
            for ino in ready {
                match self.record_on_server(ino).await {
                    Ok(()) => {}
                    // The server cannot be reached: again later.
                    Err(e @ FsError::Unavailable(_)) => {
                        tracing::debug!(error = %e, "a new directory could not be sent; trying again");
                        self.queue_send(ino, SEND_RETRY_AFTER);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "a new directory could not be sent; it is tried again with its first file, at fsyncdir and at unmount");
                    }
                }
            }
        }
    }

    /// Creates record `ino` on the server if it exists only in this mount,
    /// the records above it first: before anything that names it to the
    /// server. Nothing to do for a vault, or a record on the server.
    pub(super) async fn record_on_server(&self, ino: Ino) -> Result<()> {
        for _ in 0..MOVED_MOST {
            let chain = self.tree.lock().unsent_chain(ino);
            let mut moved = false;
            for record in chain.into_iter().rev() {
                let sending = self.sending(record).await;
                // Moved meanwhile (here only) under a record not sent yet:
                // the chain is taken again.
                if self.above_unsent(record) {
                    moved = true;
                    break;
                }
                self.send_record(record, &sending).await?;
            }
            if !moved {
                return Ok(());
            }
        }
        Err(FsError::Io("a new directory kept moving while it was sent".into()))
    }

    /// Whether record `ino` is in a record not sent yet.
    fn above_unsent(&self, ino: Ino) -> bool {
        let tree = self.tree.lock();
        tree.parent_of(ino).is_some_and(|parent| tree.is_unsent(parent))
    }

    /// Takes record `ino`'s sending lock.
    pub(super) async fn sending(&self, ino: Ino) -> Sending {
        self.new_dirs.sending.take(ino).await
    }

    /// Creates unsent record `ino` on the server, alone (the records above
    /// it are there). The caller holds its sending lock.
    async fn send_record(&self, ino: Ino, _sending: &Sending) -> Result<()> {
        let Some((vault, new)) = self.new_record_request(ino)? else {
            return Ok(());
        };
        let id = new.id;
        match self.remote().create_record(vault, new).await {
            Ok(info) if info.id != id || info.vault != vault => {
                let e = RemoteError::Protocol("the server answered for another record".into());
                self.note_record_uncertain(ino, &e);
                Err(e.into())
            }
            Ok(info) => {
                self.record_now_sent(ino, Some(info.version));
                Ok(())
            }
            // Created by an earlier request whose answer was lost (an id is
            // random: nobody else chose it), or so the server says: believed
            // once its listing names it, with the version it gives there.
            Err(RemoteError::Exists(_)) => {
                self.load_vault(vault, true).await?;
                let listed =
                    self.tree.lock().node_unchecked(ino).and_then(Node::version).is_some_and(|v| v > 0);
                if !listed {
                    return Err(FsError::Io(format!(
                        "the server says record {id} exists but does not list it"
                    )));
                }
                self.record_now_sent(ino, None);
                Ok(())
            }
            Err(e) => {
                self.note_record_uncertain(ino, &e);
                Err(e.into())
            }
        }
    }

    /// What creates unsent record `ino` on the server (`None` if it is not
    /// one, or no longer), its title sealed now: with the key the vault
    /// uses now, or not at all if this mount must seal nothing there.
    pub(super) fn new_record_request(&self, ino: Ino) -> Result<Option<(VaultId, NewRecord)>> {
        let (unsent, name) = {
            let tree = self.tree.lock();
            (tree.unsent_record(ino), tree.name_of(ino))
        };
        let Some((vault, mut new)) = unsent else {
            return Ok(None);
        };
        new.title = self.seal(vault, NameContext::RecordTitle { vault, record: new.id }, &name)?;
        Ok(Some((vault, new)))
    }

    /// Record `ino` is on the server now, at `version` (`None`: as the
    /// tree holds it).
    pub(super) fn record_now_sent(&self, ino: Ino, version: Option<u64>) {
        self.tree.lock().record_sent(ino, version);
    }

    /// A request that would have created record `ino` got no answer: an
    /// rmdir must ask the server.
    pub(super) fn note_record_uncertain(&self, ino: Ino, e: &RemoteError) {
        if matches!(e, RemoteError::Unavailable(_) | RemoteError::Protocol(_)) {
            self.tree.lock().note_maybe_sent(ino);
        }
    }

    /// What a file's first save in record `record`, of `len` bytes, sends
    /// along: the record, if it is not on the server yet and the server
    /// takes records with files (the records above it are sent first), with
    /// its sending lock held until the save is answered. A body over
    /// [`WITH_FILE_MAX`] sends the record on its own first, so that no save
    /// in it waits for a long upload (nor for a server that reads it slowly).
    pub(super) async fn record_with_file(
        &self,
        record: Ino,
        len: Option<u64>,
    ) -> Result<Option<(VaultId, NewRecord, Sending)>> {
        if !self.tree.lock().is_unsent(record) {
            return Ok(None);
        }
        let small = len.is_some_and(|len| len <= WITH_FILE_MAX);
        if !small || !self.new_dirs.with_files.load(Ordering::Relaxed) {
            self.record_on_server(record).await?;
            return Ok(None);
        }
        for _ in 0..MOVED_MOST {
            let parent = self.tree.lock().parent_of(record);
            if let Some(parent) = parent {
                self.record_on_server(parent).await?;
            }
            let sending = self.sending(record).await;
            // Moved meanwhile (here only) under a record not sent yet: that
            // one first (it holds the record's place on the server).
            if !self.above_unsent(record) {
                return Ok(self.new_record_request(record)?.map(|(vault, new)| (vault, new, sending)));
            }
        }
        Err(FsError::Io("a new directory kept moving while it was sent".into()))
    }

    /// A server answered 404 to a file with its new record, and then created
    /// the record on its own: it does not know records with files (an
    /// older version), and records go on their own from then on.
    pub(super) fn no_records_with_files(&self) {
        if self.new_dirs.with_files.swap(false, Ordering::Relaxed) {
            tracing::info!("the server does not create a directory with its first file (an older version): each new directory costs a request of its own");
        }
    }

    /// Sends the records made here that are not on the server yet: those in
    /// directory `dir` and `dir` itself (fsyncdir), or all (unmount).
    /// Returns how many could not be sent.
    pub async fn send_new_dirs(&self, dir: Option<Ino>) -> usize {
        let mut records = self.tree.lock().unsent_records(dir);
        records.extend(dir);
        let mut failed = 0;
        for ino in records {
            if let Err(e) = self.record_on_server(ino).await {
                tracing::error!(error = %e, "a new directory could not be sent");
                failed += 1;
            }
        }
        failed
    }

    /// fsyncdir: the directory and the directories made in it are on the
    /// server when it returns (files are, once saved).
    pub async fn fsyncdir(&self, ino: Ino) -> Result<()> {
        match self.send_new_dirs(Some(ino)).await {
            0 => Ok(()),
            _ => Err(FsError::Unavailable("a new directory could not be sent".into())),
        }
    }

    /// Renames or moves record `ino` to `name` in `parent` if it was made
    /// here and not sent: in the tree only (its title is sealed when it is
    /// sent). False if it is on the server, or may be, or the name is taken
    /// (then the server is asked).
    pub(super) async fn rename_unsent_record(&self, ino: Ino, parent: Ino, name: &OsStr) -> Result<bool> {
        if !self.tree.lock().is_unsent(ino) {
            return Ok(false);
        }
        let _sending = self.sending(ino).await;
        let mut tree = self.tree.lock();
        let info = match tree.node_unchecked(ino) {
            Some(Node::Record { info, .. }) if tree.is_unsent(ino) && !tree.maybe_sent(ino) => info.clone(),
            _ => return Ok(false),
        };
        if tree.child(parent, name).is_some() {
            return Ok(false);
        }
        let parent_record = match tree.node(parent)? {
            Node::Vault { vault } if *vault == info.vault => None,
            Node::Record { info: p, .. } if p.vault == info.vault => Some(p.id),
            Node::File { .. } => return Err(FsError::NotDir),
            _ => return Err(FsError::CrossDevice),
        };
        // Never into itself (the kernel checks it too).
        let mut at = Some(parent);
        while let Some(dir) = at {
            if dir == ino {
                return Err(FsError::Invalid("a directory cannot move into itself".into()));
            }
            at = tree.parent_of(dir);
        }
        let node = Node::Record { info: RecordInfo { parent: parent_record, ..info }, parent };
        tree.place(parent, name, ino, node);
        Ok(true)
    }

    /// Removes unsent record `ino` (empty) from the tree, sending nothing:
    /// true if it did. False if it is on the server (or may be: a request
    /// that would have created it got no answer, and it is sent now): then
    /// the server is asked.
    pub(super) async fn forget_unsent_record(&self, ino: Ino) -> Result<bool> {
        if !self.tree.lock().is_unsent(ino) {
            return Ok(false);
        }
        let sending = self.sending(ino).await;
        let maybe_sent = {
            let mut tree = self.tree.lock();
            if tree.unsent_record(ino).is_none() {
                return Ok(false);
            }
            if !tree.is_empty_dir(ino) {
                return Err(FsError::NotEmpty);
            }
            // A file unlinked from it while open was not sent either (it
            // would have sent the record): nothing of it is on the server.
            let maybe_sent = tree.maybe_sent(ino);
            if !maybe_sent {
                tree.remove(ino);
            }
            maybe_sent
        };
        if maybe_sent {
            drop(sending);
            self.record_on_server(ino).await?;
            return Ok(false);
        }
        Ok(true)
    }

    /// Removes an empty record.
    pub async fn rmdir(self: &Arc<Self>, parent: Ino, name: &OsStr) -> Result<()> {
        self.load_dir(parent).await?;
        if self.tree.lock().node(parent)?.vault().is_some() {
            self.deletable(parent)?;
        }
        // Made here and never sent: gone from the mount, nothing to ask.
        let made_here = {
            let tree = self.tree.lock();
            tree.child(parent, name).filter(|&ino| {
                tree.is_unsent(ino) && matches!(tree.node_unchecked(ino), Some(Node::Record { .. }))
            })
        };
        if let Some(ino) = made_here {
            if self.forget_unsent_record(ino).await? {
                self.touch_dir(parent);
                return Ok(());
            }
        }
        let (ino, info) = {
            let tree = self.tree.lock();
            let ino = tree.child(parent, name).ok_or(FsError::NotFound)?;
            match tree.node(ino)? {
                Node::Record { info, .. } => {
                    if !tree.is_empty_dir(ino) {
                        return Err(FsError::NotEmpty);
                    }
                    (ino, info.clone())
                }
                Node::Vault { .. } => {
                    return Err(FsError::NotPermitted("vaults are not removed through the mount".into()))
                }
                _ => return Err(FsError::NotDir),
            }
        };
        {
            // Checked again and taken out in one step: nothing is made in it
            // in between.
            let mut tree = self.tree.lock();
            if !tree.is_empty_dir(ino) {
                return Err(FsError::NotEmpty);
            }
            if !tree.holds_orphans(ino) {
                // Gone from the mount now; deleted on the server in the
                // background once what was in it is (super::deletes).
                tree.rmdir_deleting(ino);
                drop(tree);
                self.touch_dir(parent);
                self.delete_record_in_background(info);
                return Ok(());
            }
        }
        // A file unlinked while open keeps it on the server until its last
        // close: the server's answer (not empty) is the one to give. Files
        // unlinked from it are gone from the server first; not waited for
        // past RMDIR_WAIT, so a server that cannot take them answers rmdir
        // with an error, not a hang.
        let _ = tokio::time::timeout(super::deletes::RMDIR_WAIT, self.deletes_settled(Some(info.id))).await;
        self.remote().delete_record(info.id, info.version).await?;
        self.tree.lock().remove(ino);
        self.touch_dir(parent);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_sending_lock_is_one_at_a_time_and_gone_once_nobody_wants_it() {
        let locks = Locks::default();
        let first = locks.take(7).await;
        let other = locks.take(8).await;
        let waiting = tokio::spawn({
            let locks = Locks(Arc::clone(&locks.0));
            async move { locks.take(7).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "a second task took a lock that was held");
        drop(first);
        let second = waiting.await.unwrap();
        assert_eq!(locks.0.lock().len(), 2, "a lock still held left the map");
        drop(second);
        drop(other);
        assert!(locks.0.lock().is_empty(), "a lock nobody holds stayed in the map");
    }
}
