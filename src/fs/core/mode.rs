//! What this mount is doing with each file besides holding its plaintext:
//! how its writes reach the server ([`Writing`]), what it changed and has not
//! saved yet ([`Unsaved`]), an upload in progress, and the version of a
//! pass-through file the server last confirmed.
//!
//! Data flow. A file starts in [`Writing::Cached`]. Created empty or
//! truncated to zero it becomes [`Writing::Sequential`]; each write that
//! continues where the last one ended keeps it so ([`FileModes::note_write`]),
//! any other write makes it `Cached` again. A sequential file that grows past
//! the end-to-end limit becomes [`Writing::Streaming`] (super::stream): its
//! writes go to the server as they come instead of to the cache. fsync,
//! release or a write behind the stream end it ([`Writing::Ending`]) and, once
//! the server has committed it, it is `Cached` again. Every transition is a
//! method here; the rest of the core asks, it does not edit.
//!
//! Waiting. Opens and writes that meet a stream being ended, and unmount,
//! wait for [`FileModes::changed`], a watch channel bumped on every stream
//! transition: no polling.
//!
//! The map has an entry only for files in a state other than the default
//! (cached, saved, idle), so it stays as small as the set of files being
//! written. Its lock is a leaf: never held across an await or while another
//! lock is taken.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use parking_lot::Mutex;
use tokio::sync::{mpsc, watch};

use super::status::{SyncState, UploadProgress};
use super::{Ino, Result};
use crate::ids::FileId;
use crate::protocol::{now_ms, time_from_ms, Sealed, UploadResult};

/// The pieces fed to a streaming upload.
pub(super) type StreamTx = mpsc::Sender<std::io::Result<bytes::Bytes>>;
/// The streaming upload task: the result, the sealed manifest and its generation.
pub(super) type StreamTask = tokio::task::JoinHandle<Result<(UploadResult, Sealed, u64)>>;

/// How a file's writes reach the server.
#[derive(Default)]
pub(super) enum Writing {
    /// Into the cached plaintext, uploaded whole on flush.
    #[default]
    Cached,
    /// Into the cache, written front to back from empty so far; the next write
    /// must start at `next` for that to stay true. Past the end-to-end limit
    /// such a file becomes a stream instead of growing in memory.
    Sequential { next: u64 },
    /// Streamed to the server as plain HTTPS while it is written.
    Streaming(Stream),
    /// The stream is being ended: `sent` bytes went, the commit is awaited.
    /// `emptied`: the file was truncated to zero meanwhile, so it is
    /// [`Writing::Sequential`] from empty once the stream is done.
    Ending { sent: u64, emptied: bool },
}

/// A pass-through upload in progress.
pub(super) struct Stream {
    /// Feeds the upload.
    pub(super) tx: StreamTx,
    /// The upload (staged, then committed with its manifest).
    pub(super) task: StreamTask,
    /// Bytes handed to the upload so far.
    pub(super) sent: u64,
    /// The file's inode (its metadata is updated when the stream commits).
    pub(super) ino: Ino,
}

/// Changes made here and not yet stored: what attributes show meanwhile. Kept
/// apart from the data's lock so attributes never wait for, or miss, a write
/// in progress.
#[derive(Clone, Copy)]
struct Unsaved {
    size: u64,
    /// When it last changed (or the time chosen with utimensat).
    changed: SystemTime,
    /// A time set with utimensat (as `cp -a` and `touch -d` do): the upload
    /// stores it instead of "now". A later write drops it.
    chosen: Option<SystemTime>,
}

#[derive(Default)]
struct FileState {
    writing: Writing,
    unsaved: Option<Unsaved>,
    upload: Option<Arc<UploadProgress>>,
    /// The version of a pass-through file last opened for reading, and when
    /// the server last said it was current: while it still has that version,
    /// the kernel may keep the pages it cached from it.
    pass_confirmed: Option<(u64, Instant)>,
    /// Permission bits set while the file streams or has unsaved changes:
    /// the stream's commit, or the upload, seals them (a chmod of its own
    /// would bump the version they expect, and cost a request).
    chosen_perm: Option<u16>,
}

impl FileState {
    fn idle(&self) -> bool {
        matches!(self.writing, Writing::Cached)
            && self.unsaved.is_none()
            && self.upload.is_none()
            && self.pass_confirmed.is_none()
            && self.chosen_perm.is_none()
    }
}

/// What a write finds of a stream.
pub(super) enum StreamFeed {
    /// No stream: the write goes to the cache.
    None,
    /// A stream is being ended: wait for [`FileModes::changed`] and ask again.
    Ending,
    /// A running stream: its sender and how much it was sent.
    Open(StreamTx, u64),
}

/// What ending a stream found.
pub(super) enum EndStream {
    /// No stream.
    None,
    /// Someone else is ending it.
    Already,
    /// Ended by this call, which must await `task` and then call
    /// [`FileModes::stream_done`].
    Now { task: StreamTask, ino: Ino, sent: u64 },
}

/// The per-file states. See the module documentation.
pub(super) struct FileModes {
    files: Mutex<HashMap<FileId, FileState>>,
    /// Bumped on every stream transition.
    changed: watch::Sender<u64>,
}

impl FileModes {
    pub(super) fn new() -> Self {
        FileModes { files: Mutex::new(HashMap::new()), changed: watch::channel(0).0 }
    }

    /// Runs `f` on the state of `id` (a default one if it has none) and drops
    /// the entry again if it is left idle.
    fn with<T>(&self, id: FileId, f: impl FnOnce(&mut FileState) -> T) -> T {
        let mut files = self.files.lock();
        let state = files.entry(id).or_default();
        let out = f(state);
        if state.idle() {
            files.remove(&id);
        }
        out
    }

    fn read<T>(&self, id: FileId, f: impl FnOnce(&FileState) -> T) -> Option<T> {
        self.files.lock().get(&id).map(f)
    }

    /// A receiver that sees every later stream transition.
    pub(super) fn changed(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n += 1);
    }

    // ---- writing ---------------------------------------------------------------

    /// The file is empty now (created, or truncated to zero): written front to
    /// back from here, it may stream once it passes the end-to-end limit.
    pub(super) fn start_sequential(&self, id: FileId) {
        self.with(id, |s| match &mut s.writing {
            Writing::Cached | Writing::Sequential { .. } => s.writing = Writing::Sequential { next: 0 },
            Writing::Ending { emptied, .. } => *emptied = true,
            Writing::Streaming(_) => {}
        })
    }

    /// Notes a write of `offset..end` to the cache; true if the file is still
    /// written front to back.
    pub(super) fn note_write(&self, id: FileId, offset: u64, end: u64) -> bool {
        self.with(id, |s| match s.writing {
            Writing::Sequential { next } if next == offset => {
                s.writing = Writing::Sequential { next: end };
                true
            }
            Writing::Sequential { next } => {
                tracing::debug!(file = %id, offset, expected = next, "write out of sequence: this file will not be streamed");
                s.writing = Writing::Cached;
                false
            }
            _ => false,
        })
    }

    /// The file starts streaming with `stream.sent` bytes sent: it has no
    /// unsaved changes in the cache any more, and an upload in progress.
    pub(super) fn begin_stream(&self, id: FileId, stream: Stream) {
        let sent = stream.sent;
        self.with(id, |s| {
            s.writing = Writing::Streaming(stream);
            s.unsaved = None;
            s.upload = Some(Arc::new(UploadProgress { sent: sent.into(), total: None }));
        });
        self.bump();
    }

    /// Whether writes of the file go to a stream (running or being ended).
    pub(super) fn is_streaming(&self, id: FileId) -> bool {
        self.read(id, |s| matches!(s.writing, Writing::Streaming(_) | Writing::Ending { .. }))
            .unwrap_or(false)
    }

    /// Whether a stream of the file is being ended.
    pub(super) fn is_ending(&self, id: FileId) -> bool {
        self.read(id, |s| matches!(s.writing, Writing::Ending { .. })).unwrap_or(false)
    }

    /// Files being streamed.
    pub(super) fn streaming(&self) -> Vec<FileId> {
        let files = self.files.lock();
        files
            .iter()
            .filter(|(_, s)| matches!(s.writing, Writing::Streaming(_) | Writing::Ending { .. }))
            .map(|(id, _)| *id)
            .collect()
    }

    /// Where a write of the file goes.
    pub(super) fn stream_feed(&self, id: FileId) -> StreamFeed {
        self.read(id, |s| match &s.writing {
            Writing::Streaming(st) => StreamFeed::Open(st.tx.clone(), st.sent),
            Writing::Ending { .. } => StreamFeed::Ending,
            _ => StreamFeed::None,
        })
        .unwrap_or(StreamFeed::None)
    }

    /// Hands `data` to a running stream on the calling thread if it continues
    /// the stream and the queue has room (else `None`, nothing sent). The copy
    /// happens under the lock, so no other write can slip between the check
    /// of the offset and the send (the kernel does not send two writes of one
    /// file at once, so this lock is not contended).
    pub(super) fn try_stream_write(&self, id: FileId, offset: u64, data: &[u8]) -> Option<u32> {
        let mut files = self.files.lock();
        let s = files.get_mut(&id)?;
        let Writing::Streaming(st) = &mut s.writing else { return None };
        if offset != st.sent || st.tx.capacity() == 0 {
            return None;
        }
        st.tx.try_send(Ok(bytes::Bytes::copy_from_slice(data))).ok()?;
        st.sent += data.len() as u64;
        if let Some(p) = &s.upload {
            p.sent.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        Some(data.len() as u32)
    }

    /// Counts `added` more bytes as handed to the stream of `id` (also by a
    /// writer that got its sender before the stream was ended).
    pub(super) fn streamed(&self, id: FileId, added: u64) {
        self.with(id, |s| {
            match &mut s.writing {
                Writing::Streaming(Stream { sent, .. }) | Writing::Ending { sent, .. } => *sent += added,
                Writing::Cached | Writing::Sequential { .. } => {}
            }
            if let Some(p) = &s.upload {
                p.sent.fetch_add(added, Ordering::Relaxed);
            }
        })
    }

    /// Ends the stream of `id`: its body closes once the queued pieces are sent.
    pub(super) fn end_stream(&self, id: FileId) -> EndStream {
        let ended = self.with(id, |s| match std::mem::take(&mut s.writing) {
            Writing::Streaming(st) => {
                s.writing = Writing::Ending { sent: st.sent, emptied: false };
                EndStream::Now { task: st.task, ino: st.ino, sent: st.sent }
            }
            ending @ Writing::Ending { .. } => {
                s.writing = ending;
                EndStream::Already
            }
            other => {
                s.writing = other;
                EndStream::None
            }
        });
        if matches!(ended, EndStream::Now { .. }) {
            self.bump();
        }
        ended
    }

    /// The stream of `id` was committed (or failed): the file is cached again.
    pub(super) fn stream_done(&self, id: FileId) {
        self.with(id, |s| {
            s.writing = match s.writing {
                Writing::Ending { emptied: true, .. } => Writing::Sequential { next: 0 },
                _ => Writing::Cached,
            };
            s.upload = None;
            s.chosen_perm = None;
        });
        self.bump();
    }

    /// Sets the permission bits of a streaming file (its commit seals them);
    /// false if it is not streaming.
    pub(super) fn choose_perm(&self, id: FileId, perm: u16) -> bool {
        self.with(id, |s| match s.writing {
            Writing::Streaming(_) => {
                s.chosen_perm = Some(perm);
                true
            }
            _ => false,
        })
    }

    /// Sets the permission bits of a file with unsaved changes (their upload
    /// seals them; the caller holds the file's plaintext lock); false if it
    /// has none.
    pub(super) fn choose_unsaved_perm(&self, id: FileId, perm: u16) -> bool {
        self.with(id, |s| match s.unsaved {
            Some(_) => {
                s.chosen_perm = Some(perm);
                true
            }
            None => false,
        })
    }

    /// The permission bits chosen while streaming or unsaved, if any.
    pub(super) fn chosen_perm(&self, id: FileId) -> Option<u16> {
        self.read(id, |s| s.chosen_perm).flatten()
    }

    // ---- unsaved changes ---------------------------------------------------------

    /// The application changed the file (now `len` bytes) and has not saved
    /// it yet; its modification time becomes now.
    pub(super) fn note_change(&self, id: FileId, len: u64) {
        self.with(id, |s| s.unsaved = Some(Unsaved { size: len, changed: changed_now(), chosen: None }));
    }

    /// The mount itself changed the content (a reduced image): a time the
    /// application chose stays.
    pub(super) fn note_resized(&self, id: FileId, len: u64) {
        self.with(id, |s| {
            let chosen = s.unsaved.and_then(|u| u.chosen);
            s.unsaved = Some(Unsaved { size: len, changed: changed_now(), chosen });
        })
    }

    /// Sets the modification time of a file with unsaved changes (it goes up
    /// with the content); false if it has none.
    pub(super) fn choose_mtime(&self, id: FileId, t: SystemTime) -> bool {
        self.with(id, |s| match &mut s.unsaved {
            Some(u) => {
                u.changed = t;
                u.chosen = Some(t);
                true
            }
            None => false,
        })
    }

    /// When the unsaved content last changed (or the time chosen for it):
    /// the modification time its save records, so the time shown does not
    /// move when the file is saved (a flush can come from any close, even a
    /// forked child's).
    pub(super) fn unsaved_since(&self, id: FileId) -> Option<SystemTime> {
        self.read(id, |s| s.unsaved.map(|u| u.changed)).flatten()
    }

    /// The time the application chose for the unsaved content, if any.
    #[cfg(test)]
    pub(super) fn chosen_mtime(&self, id: FileId) -> Option<SystemTime> {
        self.read(id, |s| s.unsaved.and_then(|u| u.chosen)).flatten()
    }

    /// The file has no unsaved changes any more (saved, streamed or gone).
    pub(super) fn forget_unsaved(&self, id: FileId) {
        self.with(id, |s| {
            s.unsaved = None;
            // Bits chosen for the unsaved content went with it (a stream's
            // go with its commit: `stream_done`).
            if matches!(s.writing, Writing::Cached | Writing::Sequential { .. }) {
                s.chosen_perm = None;
            }
        })
    }

    /// Size and time the file shows while it differs from the server's:
    /// streaming (what was sent, now) or with unsaved changes. A time that
    /// moved on every stat would make the kernel drop the file's pages each
    /// time, so unsaved changes show the time of the last change.
    pub(super) fn local_size(&self, id: FileId) -> Option<(u64, SystemTime)> {
        self.read(id, |s| match &s.writing {
            Writing::Streaming(Stream { sent, .. }) | Writing::Ending { sent, .. } => {
                Some((*sent, SystemTime::now()))
            }
            _ => s.unsaved.map(|u| (u.size, u.changed)),
        })
        .flatten()
    }

    // ---- uploads -------------------------------------------------------------------

    /// An upload of `total` bytes of the file starts.
    pub(super) fn begin_upload(&self, id: FileId, total: u64) -> Arc<UploadProgress> {
        let progress = Arc::new(UploadProgress { sent: 0.into(), total: Some(total) });
        self.with(id, |s| s.upload = Some(Arc::clone(&progress)));
        progress
    }

    /// The upload of the file ended.
    pub(super) fn end_upload(&self, id: FileId) {
        self.with(id, |s| s.upload = None)
    }

    /// Uploads in progress: file, bytes sent, total if known.
    pub(super) fn uploads(&self) -> Vec<(FileId, u64, Option<u64>)> {
        let files = self.files.lock();
        files
            .iter()
            .filter_map(|(id, s)| s.upload.as_ref().map(|p| (*id, p.sent.load(Ordering::Relaxed), p.total)))
            .collect()
    }

    /// Uploading or with unsaved changes; `None` if neither is known here
    /// (then the cache knows whether it is dirty).
    pub(super) fn sync_state(&self, id: FileId) -> Option<SyncState> {
        self.read(id, |s| {
            if s.upload.is_some() {
                Some(SyncState::Uploading)
            } else if s.unsaved.is_some() {
                Some(SyncState::Dirty)
            } else {
                None
            }
        })
        .flatten()
    }

    // ---- pass-through reads --------------------------------------------------------

    /// The version of a pass-through file the server last confirmed, and when.
    pub(super) fn pass_confirmed(&self, id: FileId) -> Option<(u64, Instant)> {
        self.read(id, |s| s.pass_confirmed).flatten()
    }

    /// Notes (`Some`) or forgets the version the server confirmed.
    pub(super) fn set_pass_confirmed(&self, id: FileId, confirmed: Option<(u64, Instant)>) {
        self.with(id, |s| s.pass_confirmed = confirmed)
    }
}

/// Now, to the millisecond the server keeps: a time shown for unsaved
/// changes is the one their save records.
fn changed_now() -> SystemTime {
    time_from_ms(now_ms())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequential_writes_stay_sequential_until_one_is_not() {
        let modes = FileModes::new();
        let id = FileId::random().unwrap();
        assert!(!modes.note_write(id, 0, 10), "not tracked until emptied");
        modes.start_sequential(id);
        assert!(modes.note_write(id, 0, 10));
        assert!(modes.note_write(id, 10, 20));
        assert!(!modes.note_write(id, 5, 8), "a write behind");
        assert!(!modes.note_write(id, 20, 30), "stays out of sequence");
        assert!(modes.files.lock().is_empty(), "idle files have no entry");
    }

    #[test]
    fn unsaved_sizes_and_chosen_times() {
        let modes = FileModes::new();
        let id = FileId::random().unwrap();
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1000);
        assert!(!modes.choose_mtime(id, t), "nothing unsaved");
        modes.note_change(id, 5);
        assert!(modes.choose_mtime(id, t));
        assert_eq!(modes.local_size(id), Some((5, t)));
        modes.note_resized(id, 3);
        assert_eq!(modes.chosen_mtime(id), Some(t), "the mount's own change keeps the chosen time");
        modes.note_change(id, 6);
        assert_eq!(modes.chosen_mtime(id), None, "a write drops it");
        assert!(matches!(modes.sync_state(id), Some(SyncState::Dirty)));
        modes.forget_unsaved(id);
        assert_eq!(modes.local_size(id), None);
        assert!(modes.files.lock().is_empty());
    }

    #[tokio::test]
    async fn a_stream_goes_running_ending_done_and_wakes_waiters() {
        let modes = Arc::new(FileModes::new());
        let id = FileId::random().unwrap();
        let (tx, _rx) = mpsc::channel(2);
        let task: StreamTask = tokio::spawn(async { Err(super::super::FsError::Stale) });
        modes.start_sequential(id);
        modes.begin_stream(id, Stream { tx, task, sent: 7, ino: 9 });
        assert!(matches!(modes.stream_feed(id), StreamFeed::Open(_, 7)));
        assert_eq!(modes.try_stream_write(id, 7, b"abc"), Some(3));
        assert_eq!(modes.try_stream_write(id, 0, b"abc"), None, "not where the stream is");
        assert_eq!(modes.local_size(id).map(|l| l.0), Some(10));
        assert_eq!(modes.uploads(), vec![(id, 10, None)]);
        let mut rx = modes.changed();
        let EndStream::Now { task, ino, sent } = modes.end_stream(id) else { panic!("not ended") };
        assert_eq!((ino, sent), (9, 10));
        assert!(matches!(modes.end_stream(id), EndStream::Already));
        assert!(matches!(modes.stream_feed(id), StreamFeed::Ending));
        modes.streamed(id, 5); // a writer that took its sender before the end
        assert_eq!(modes.local_size(id).map(|l| l.0), Some(15), "the size counts it");
        modes.start_sequential(id); // truncated to zero while ending
        assert!(rx.has_changed().unwrap());
        rx.mark_unchanged();
        let waiter = {
            let modes = Arc::clone(&modes);
            tokio::spawn(async move {
                let mut rx = modes.changed();
                while modes.is_streaming(id) {
                    rx.changed().await.unwrap();
                }
            })
        };
        assert!(task.await.unwrap().is_err());
        modes.stream_done(id);
        waiter.await.unwrap();
        assert!(!modes.is_streaming(id));
        assert!(modes.note_write(id, 0, 4), "emptied while ending: written front to back again");
    }
}
