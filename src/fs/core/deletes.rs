//! Deleting unlinked files and removed records on the server in the background.
//!
//! Data flow. `unlink` of a file that no handle holds open (or the last
//! close of one unlinked while open), and `rmdir` of a record, take it out
//! of the tree at once and answer; its id waits in the tree's `deleting` set
//! (which every listing and page of changes leaves out, whenever asked for)
//! while it waits in the queue here. A record joins the queue once
//! everything removed from it is gone on the server (the server removes
//! only empty records). Senders, at most [`DELETES_IN_FLIGHT`] at a time,
//! take what has queued meanwhile, up to [`BATCH_MOST`] objects, and send it
//! in one request (`POST /v1/deletes`, one commit on the server): `rm -r`
//! waits for no round trip per file, and the server syncs its database once
//! per batch, not once per file. A server that does not know the request,
//! or answers it with the wrong number of outcomes, gets one DELETE per
//! object instead.
//!
//! A sender lets deletes gather for [`LINGER`] before it sends them: sent
//! as they come, one per request, they cost the server (on the same two
//! cores as `rm` in the benchmark) twice the time. A batch that fails for
//! want of the server is sent again, with growing waits, and after
//! [`BATCH_TRIES`] one by one (one object the server always fails on holds
//! up nothing else), each until it goes through. A file changed elsewhere
//! meanwhile is deleted at its new version if the server says so within
//! [`PATIENCE`] of the unlink (as a delete sent at once would), else kept:
//! after a long wait that may be another client's work (a move's source is
//! kept at once: the move did not copy that change). That and any other
//! refusal is final: logged, noted for `vaultfs status`, and the object
//! shows again at the vault's next listing, which is then asked for.
//!
//! The file or directory a rename replaced is deleted at once, in a request
//! of its own (`delete_file_now`, `delete_record_now`), so that whoever
//! lists once the rename returned sees one name; it joins the queue only if
//! that request fails.
//!
//! Whatever needs the server to have them gone waits here, for a while:
//! `rmdir` of a record that still holds a file unlinked while open, and a
//! rename over a directory emptied just now ([`RMDIR_WAIT`]), and unmount
//! (at most 30 s). Nothing is lost by answering early: an unlink keeps no
//! data, and a delete that never reaches the server leaves the object where
//! it was.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use parking_lot::Mutex;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use super::tree::Key;
use super::{FsError, VaultFs};
use crate::ids::{FileId, RecordId};
use crate::protocol::{DeleteItem, DeleteOutcome, FileInfo, RecordInfo};
use crate::remote::{Remote, RemoteError};

/// Requests of deletes in flight at once.
pub const DELETES_IN_FLIGHT: usize = 2;

/// Most objects one request deletes.
pub const BATCH_MOST: usize = 256;

/// Requests a sender has out at once when it sends one object per request.
const ONE_BY_ONE: usize = 4;

/// Times a batch is sent while the server cannot be reached before its
/// objects are sent one by one.
const BATCH_TRIES: u32 = 3;

/// How long a sender lets deletes gather before it sends them.
const LINGER: Duration = Duration::from_millis(5);

/// How long rmdir waits for the deletes of files unlinked from its record
/// before it asks the server anyway (which then refuses a record not empty).
pub(super) const RMDIR_WAIT: Duration = Duration::from_secs(10);

/// The first wait before a failed delete is sent again (it doubles, up to a minute).
const FIRST_RETRY: Duration = Duration::from_millis(250);
const LAST_RETRY: Duration = Duration::from_secs(60);

/// Unlink deletes a file whatever another client did to it meanwhile
/// (renamed, touched, written) if it hears of that within this long, as a
/// delete sent at once would: the version it names is what this mount knew.
/// Past it (the server could not be reached, say), a file changed elsewhere
/// is kept: it shows again.
const PATIENCE: Duration = Duration::from_secs(10);

/// The growing waits between sends of a delete the server could not take.
struct Backoff {
    next: Duration,
    /// Waits so far.
    waited: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { next: FIRST_RETRY, waited: 0 }
    }
}

impl Backoff {
    async fn wait(&mut self) {
        tokio::time::sleep(self.next).await;
        self.next = (self.next * 2).min(LAST_RETRY);
        self.waited += 1;
    }
}

/// An object waiting for its delete.
enum Pending {
    /// With when it was unlinked; `None`: at this version only (a move's
    /// source, whose later changes the move did not copy).
    File(FileInfo, Option<Instant>),
    Record(RecordInfo),
}

impl Pending {
    fn item(&self) -> DeleteItem {
        match self {
            Pending::File(f, _) => DeleteItem::File { id: f.id, version: f.version },
            Pending::Record(r) => DeleteItem::Record { id: r.id, version: r.version },
        }
    }

    fn key(&self) -> Key {
        match self {
            Pending::File(f, _) => Key::File(f.id),
            Pending::Record(r) => Key::Record(r.id),
        }
    }

    fn what(&self) -> String {
        match self {
            Pending::File(f, _) => format!("file {}", f.id),
            Pending::Record(r) => format!("record {}", r.id),
        }
    }
}

/// The queue of deletes, the senders' slots, and word when one ends.
pub(super) struct Deletes {
    queue: Mutex<VecDeque<Pending>>,
    slots: Arc<Semaphore>,
    ended: Notify,
    /// The server does not know deletes in one request (an older one).
    one_by_one: AtomicBool,
}

impl Default for Deletes {
    fn default() -> Self {
        Deletes {
            queue: Mutex::new(VecDeque::new()),
            slots: Arc::new(Semaphore::new(DELETES_IN_FLIGHT)),
            ended: Notify::new(),
            one_by_one: AtomicBool::new(false),
        }
    }
}

impl<R: Remote> VaultFs<R> {
    /// Deletes file `info` on the server in the background; the caller took it
    /// out of the tree with [`super::tree::Tree::unlink_deleting`].
    pub(super) fn delete_in_background(self: &Arc<Self>, info: FileInfo) {
        self.deletes.queue.lock().push_back(Pending::File(info, Some(Instant::now())));
        self.send_deletes();
    }

    /// Deletes file `info` on the server in the background at its version
    /// only: changed elsewhere meanwhile, it is kept (a move's source; the
    /// caller marked it with [`super::tree::Tree::file_deleting`]).
    pub(super) fn delete_at_version_in_background(self: &Arc<Self>, info: FileInfo) {
        self.deletes.queue.lock().push_back(Pending::File(info, None));
        self.send_deletes();
    }

    /// Deletes record `info` on the server in the background, once what was
    /// removed from it is gone there; the caller took it out of the tree with
    /// [`super::tree::Tree::rmdir_deleting`]. A record changed or filled by
    /// another client meanwhile is refused, and shows again.
    pub(super) fn delete_record_in_background(self: &Arc<Self>, info: RecordInfo) {
        let fs = Arc::clone(self);
        tokio::spawn(async move {
            fs.deletes_settled(Some(info.id)).await;
            fs.deletes.queue.lock().push_back(Pending::Record(info));
            fs.send_deletes();
        });
    }

    /// Deletes file `info` on the server now, in a request of its own; the
    /// caller took it out of the tree with
    /// [`super::tree::Tree::unlink_deleting`]. For the file a rename
    /// replaced: whoever lists once the rename returned sees one name. If
    /// the server does not delete it at once, it goes in the background.
    pub(super) async fn delete_file_now(self: &Arc<Self>, info: FileInfo) {
        match self.delete_file(&info).await {
            Ok(()) | Err(FsError::NotFound) => {
                self.deletion_done(&Pending::File(info, None), true);
            }
            Err(_) => self.delete_in_background(info),
        }
    }

    /// Deletes record `info` on the server now, once what was removed from
    /// it is gone there (waited for at most [`RMDIR_WAIT`]); the caller took
    /// it out of the tree with [`super::tree::Tree::rmdir_deleting`]. For
    /// the directory a rename replaced, as [`VaultFs::delete_file_now`].
    pub(super) async fn delete_record_now(self: &Arc<Self>, info: RecordInfo) {
        let settled = tokio::time::timeout(RMDIR_WAIT, self.deletes_settled(Some(info.id))).await.is_ok();
        if settled {
            match self.remote().delete_record(info.id, info.version).await {
                Ok(()) | Err(RemoteError::NotFound(_)) => {
                    return self.deletion_done(&Pending::Record(info), true);
                }
                Err(_) => {}
            }
        }
        self.delete_record_in_background(info);
    }

    /// Starts a sender if a slot is free. One that finds none leaves the
    /// queue to the senders at work, each of which looks at it again after
    /// it gave its slot back.
    fn send_deletes(self: &Arc<Self>) {
        let Ok(slot) = Arc::clone(&self.deletes.slots).try_acquire_owned() else { return };
        let fs = Arc::clone(self);
        tokio::spawn(async move { fs.sender(slot).await });
    }

    async fn sender(self: Arc<Self>, slot: OwnedSemaphorePermit) {
        loop {
            if self.deletes.queue.lock().len() < BATCH_MOST {
                tokio::time::sleep(LINGER).await;
            }
            let batch: Vec<Pending> = {
                let mut queue = self.deletes.queue.lock();
                let n = queue.len().min(BATCH_MOST);
                queue.drain(..n).collect()
            };
            if batch.is_empty() {
                break;
            }
            self.send_batch(batch).await;
        }
        drop(slot);
        if !self.deletes.queue.lock().is_empty() {
            self.send_deletes();
        }
    }

    /// Sends `batch` in one request, or one by one.
    async fn send_batch(&self, batch: Vec<Pending>) {
        if !self.deletes.one_by_one.load(Ordering::Relaxed) {
            let items: Vec<DeleteItem> = batch.iter().map(Pending::item).collect();
            let mut backoff = Backoff::default();
            let outcomes = loop {
                match self.remote().delete_many(items.clone()).await {
                    Ok(outcomes) if outcomes.len() == batch.len() => break Some(outcomes),
                    Ok(outcomes) => {
                        tracing::warn!(sent = batch.len(), answered = outcomes.len(), "the server answered deletes with the wrong number of outcomes; sending them one by one");
                        break None;
                    }
                    Err(RemoteError::NotFound(_)) => {
                        tracing::info!("the server deletes one object per request (an older version)");
                        self.deletes.one_by_one.store(true, Ordering::Relaxed);
                        break None;
                    }
                    Err(e @ RemoteError::Unavailable(_)) if backoff.waited + 1 >= BATCH_TRIES => {
                        // One object the server always fails on must not hold
                        // up the others: each is sent (and retried) on its own.
                        tracing::warn!(objects = batch.len(), error = %e, "could not delete on the server; sending them one by one");
                        break None;
                    }
                    Err(e @ RemoteError::Unavailable(_)) => {
                        tracing::warn!(objects = batch.len(), error = %e, "could not delete on the server; trying again in {:?}", backoff.next);
                        backoff.wait().await;
                    }
                    Err(e) => {
                        tracing::warn!(objects = batch.len(), error = %e, "the server refused deletes in one request; sending them one by one");
                        break None;
                    }
                }
            };
            if let Some(outcomes) = outcomes {
                for (pending, outcome) in batch.into_iter().zip(outcomes) {
                    self.take_outcome(pending, outcome).await;
                }
                return;
            }
        }
        let one = |pending: Pending| async move {
            let deleted = self.send_one(&pending).await;
            self.deletion_done(&pending, deleted);
        };
        futures_util::stream::iter(batch).map(one).buffer_unordered(ONE_BY_ONE).collect::<()>().await;
    }

    /// What the server said of one object of a batch.
    async fn take_outcome(&self, pending: Pending, outcome: DeleteOutcome) {
        let deleted = match (outcome, &pending) {
            (DeleteOutcome::Deleted | DeleteOutcome::NotFound, _) => true,
            // Changed elsewhere: deleted on its own, after a look at its new
            // version, if that is soon enough (PATIENCE).
            (DeleteOutcome::Conflict { .. }, Pending::File(f, None)) => {
                self.moved_source_kept(f.id);
                false
            }
            (DeleteOutcome::Conflict { .. }, Pending::File(..)) => self.send_one(&pending).await,
            (DeleteOutcome::Conflict { current }, Pending::Record(_)) => {
                self.refused(&pending, &format!("changed elsewhere (now version {current})"))
            }
            (DeleteOutcome::Forbidden { message } | DeleteOutcome::Refused { message }, _) => {
                self.refused(&pending, &message)
            }
        };
        self.deletion_done(&pending, deleted);
    }

    /// Deletes one object in its own request until the server answers;
    /// whether it is gone.
    async fn send_one(&self, pending: &Pending) -> bool {
        let mut backoff = Backoff::default();
        loop {
            let sent = match pending {
                Pending::File(f, Some(unlinked)) if unlinked.elapsed() < PATIENCE => {
                    self.delete_file(f).await
                }
                Pending::File(f, unlinked) => match self.remote().delete_file(f.id, f.version).await {
                    Err(RemoteError::Conflict { .. }) if unlinked.is_none() => {
                        self.moved_source_kept(f.id);
                        return false;
                    }
                    Err(RemoteError::Conflict { .. }) => Err(FsError::Io(
                        "changed elsewhere while its delete waited for the server; kept".into(),
                    )),
                    sent => sent.map_err(FsError::from),
                },
                Pending::Record(r) => {
                    self.remote().delete_record(r.id, r.version).await.map_err(FsError::from)
                }
            };
            match sent {
                Ok(()) | Err(FsError::NotFound) => return true,
                Err(e @ FsError::Unavailable(_)) => {
                    tracing::warn!(object = pending.what(), error = %e, "could not delete on the server; trying again in {:?}", backoff.next);
                    backoff.wait().await;
                }
                Err(e) => return self.refused(pending, &e.to_string()),
            }
        }
    }

    /// A move's source was changed elsewhere before its delete: kept (the
    /// move did not copy that change), logged and noted for `vaultfs
    /// status`, since the `mv` that left it succeeded.
    pub(super) fn moved_source_kept(&self, id: FileId) {
        tracing::warn!(file = %id, "a file moved was changed elsewhere meanwhile: kept where it was, with that change");
        self.note_refusal(format!("file {id}: moved, but changed elsewhere meanwhile: kept where it was"));
    }

    /// The server refused to delete `pending` for good: logged and noted.
    fn refused(&self, pending: &Pending, why: &str) -> bool {
        let what = pending.what();
        tracing::error!(
            object = what,
            error = why,
            "the server refused a delete; it shows again at the next listing"
        );
        self.note_refusal(format!("{what}: delete refused: {why}"));
        false
    }

    fn deletion_done(&self, pending: &Pending, deleted: bool) {
        self.tree.lock().deletion_done(pending.key(), deleted);
        self.deletes.ended.notify_waiters();
    }

    /// Waits until the server has deleted every file unlinked and record
    /// removed here (those in `record` only, if given), or refused to.
    pub async fn deletes_settled(&self, record: Option<RecordId>) {
        loop {
            let ended = self.deletes.ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            if !self.tree.lock().deleting(record) {
                return;
            }
            ended.await;
        }
    }

    /// Files and records removed here that the server has not deleted yet.
    pub(super) fn deletes_pending(&self) -> usize {
        self.tree.lock().deleting_count()
    }
}
