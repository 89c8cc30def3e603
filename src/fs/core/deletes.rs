//! Deleting unlinked files on the server in the background.
//!
//! Data flow. `unlink` of a file that no handle holds open takes it out of
//! the tree at once and answers; the file's id waits in the tree's
//! `deleting` set (which every listing and page of changes leaves out,
//! whenever asked for) while a task here sends the DELETE, several at a
//! time ([`DELETES_IN_FLIGHT`]), so `rm -r` does not wait for one round trip
//! per file. A delete that fails for want of the server is sent again, with
//! growing waits, until it goes through; one the server refuses for good is
//! logged and noted for `vaultfs status`, and the file shows again at the
//! next listing. Whatever needs the server to have them gone waits here,
//! for a while: `rmdir` of their record (the server removes only empty
//! records; [`RMDIR_WAIT`]), and unmount. Nothing is lost by answering early: an unlink keeps no data, and
//! a delete that never reaches the server leaves the file where it was.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, Semaphore};

use super::{FsError, VaultFs};
use crate::ids::RecordId;
use crate::protocol::FileInfo;
use crate::remote::Remote;

/// DELETE requests in flight at once.
pub const DELETES_IN_FLIGHT: usize = 8;

/// How long rmdir waits for the deletes of files unlinked from its record
/// before it asks the server anyway (which then refuses a record not empty).
pub(super) const RMDIR_WAIT: Duration = Duration::from_secs(10);

/// The first wait before a failed delete is sent again (it doubles, up to a minute).
const FIRST_RETRY: Duration = Duration::from_millis(250);

/// The background deletes' slots, and word when one ends.
pub(super) struct Deletes {
    slots: Arc<Semaphore>,
    ended: Notify,
}

impl Default for Deletes {
    fn default() -> Self {
        Deletes { slots: Arc::new(Semaphore::new(DELETES_IN_FLIGHT)), ended: Notify::new() }
    }
}

impl<R: Remote> VaultFs<R> {
    /// Deletes file `info` on the server in the background; the caller took it
    /// out of the tree with [`super::tree::Tree::unlink_deleting`].
    pub(super) fn delete_in_background(self: &Arc<Self>, info: FileInfo) {
        let fs = Arc::clone(self);
        tokio::spawn(async move {
            let slots = Arc::clone(&fs.deletes.slots);
            let _slot = slots.acquire_owned().await;
            let mut wait = FIRST_RETRY;
            let deleted = loop {
                match fs.delete_file(&info).await {
                    Ok(()) | Err(FsError::NotFound) => break true,
                    Err(e) if e.is_permanent() => {
                        tracing::error!(file = %info.id, error = %e, "the server refused to delete an unlinked file; it shows again at the next listing");
                        fs.note_refusal(format!("file {}: delete refused: {e}", info.id));
                        break false;
                    }
                    Err(e) => {
                        tracing::warn!(file = %info.id, error = %e, "could not delete an unlinked file on the server; trying again in {wait:?}");
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(Duration::from_secs(60));
                    }
                }
            };
            fs.tree.lock().deletion_done(&info, deleted);
            fs.deletes.ended.notify_waiters();
        });
    }

    /// Waits until the server has deleted every file unlinked here (in
    /// `record` only, if given), or refused to.
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

    /// Files unlinked here that the server has not deleted yet.
    pub(super) fn deletes_pending(&self) -> usize {
        self.tree.lock().deleting_count()
    }
}
