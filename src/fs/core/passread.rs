//! Reading a file above the end-to-end limit: plain bytes from the server,
//! never held whole.
//!
//! Data flow. Each open handle has a [`PassRead`]: the bytes it fetched last,
//! as the pieces they arrived in, and, while the file is read front to back,
//! one streamed download of the rest of the file. A pump task pulls that
//! download into a queue at most [`READ_AHEAD`] bytes ahead of the reader
//! (a semaphore counts the bytes), so the network, the server and TLS work
//! while the application handles what it already has, and one request serves
//! the whole file instead of one per window. Reads take their bytes from the
//! pieces held, pulling more from the queue as needed; pieces more than
//! [`KEEP_BEHIND`] behind the latest read are let go (the kernel's read-ahead
//! sends a few reads at once, which may arrive slightly out of order).
//!
//! A read anywhere else is a seek: the download stops, and the read fetches
//! just what it needs ([`RANDOM_FETCH`]), so random access costs one small
//! request per read. A read that continues where the last one ended starts a
//! streamed download again.
//!
//! Verification. The file's manifest holds a tag for each 1 MiB piece
//! ([`PIECE_SIZE`]). What arrives waits in `pending` until a whole piece is
//! there, is checked against its tag, and only then joins the pieces reads
//! are served from: a read never returns a byte that did not verify. So
//! downloads start at a piece boundary, a seek fetches whole pieces, and the
//! length is the manifest's, not the server's. A file written by a vaultfs
//! older than manifests has no tags; its bytes are served as they come.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::{mpsc, Semaphore};

use super::{FsError, Result, VaultFs};
use crate::crypto::manifest::{PieceVerifier, PIECE_SIZE};
use crate::crypto::{CryptoError, IntegrityFailure};
use crate::ids::FileId;
use crate::remote::{Content, Remote, RemoteError};

/// What a server answers for content it does not have (a range past its end).
fn empty_content() -> Content {
    Content { stream: Box::pin(futures_util::stream::empty()), total_len: 0, version: 0, e2e: false }
}

/// How far a streamed download may run ahead of the reader: the memory bound
/// of one handle reading a large file front to back.
pub const READ_AHEAD: u64 = 8 << 20;
/// Bytes kept behind the latest read, for reads the kernel sent at the same
/// time but that arrive a little out of order.
const KEEP_BEHIND: u64 = 1 << 20;
/// Pieces the pump may queue: many, so that [`READ_AHEAD`] (in bytes) is the
/// bound that applies, whatever size of pieces the connection delivers.
const PIECES_AHEAD: usize = 4096;
/// What a random (not sequential) read of a legacy file fetches: enough for
/// the kernel's read, not a stream. Files with a manifest fetch the whole
/// pieces a read covers (1 MiB each), since a piece is checked whole.
const RANDOM_FETCH: u64 = 128 << 10;

/// What one handle on a pass-through file holds.
pub(super) struct PassRead {
    file: FileId,
    size: u64,
    /// The generation of the content this handle reads (0 for a legacy file).
    pub(super) generation: u64,
    /// Checks pieces against the manifest's tags (`None`: a legacy file).
    verifier: Option<Arc<PieceVerifier>>,
    /// Bytes `start .. start + held` of the file, in order, verified.
    pieces: VecDeque<Bytes>,
    start: u64,
    held: u64,
    /// Bytes received after those, not yet a whole piece, so not checked.
    pending: Vec<Bytes>,
    pending_len: u64,
    /// Where the last read ended: a read starting there is sequential.
    last_end: u64,
    /// The download continuing at `start + held`, if one is running.
    feed: Option<Feed>,
}

/// A streamed download of the rest of a file, pumped into a queue.
struct Feed {
    rx: mpsc::Receiver<Result<Bytes>>,
    /// Bytes the pump may still queue; the reader gives back what it takes.
    credit: Arc<Semaphore>,
    pump: tokio::task::JoinHandle<()>,
}

impl Drop for Feed {
    fn drop(&mut self) {
        // Ends the download (its connection is dropped, not reused).
        self.pump.abort();
    }
}

impl PassRead {
    /// A handle on `file`, `size` bytes (the manifest's length), checked by
    /// `verifier`; nothing fetched yet.
    pub(super) fn new(file: FileId, size: u64, generation: u64, verifier: Option<PieceVerifier>) -> Self {
        PassRead {
            file,
            size,
            generation,
            verifier: verifier.map(Arc::new),
            pieces: VecDeque::new(),
            start: 0,
            held: 0,
            pending: Vec::new(),
            pending_len: 0,
            last_end: 0,
            feed: None,
        }
    }

    /// Where a download that serves `offset` starts: the piece boundary at or
    /// before it (a piece is checked whole).
    fn aligned(&self, offset: u64) -> u64 {
        match self.verifier {
            Some(_) => offset - offset % PIECE_SIZE,
            None => offset,
        }
    }

    /// Forgets what is held and starts over at `at` (aligned).
    fn restart(&mut self, at: u64) {
        self.feed = None;
        self.pieces.clear();
        self.pending.clear();
        self.pending_len = 0;
        self.start = self.aligned(at);
        self.held = 0;
    }

    /// Where the next byte received goes.
    fn received_end(&self) -> u64 {
        self.start + self.held + self.pending_len
    }

    /// Takes bytes that continue what was received: held at once for a
    /// legacy file, else once they complete a piece that verifies.
    fn accept(&mut self, piece: Bytes) -> Result<()> {
        if self.received_end() + piece.len() as u64 > self.size {
            return Err(match self.verifier {
                Some(_) => self.integrity(IntegrityFailure::Length),
                None => FsError::Io("the server returned more than the file's length".into()),
            });
        }
        let Some(verifier) = self.verifier.clone() else {
            self.held += piece.len() as u64;
            self.pieces.push_back(piece);
            return Ok(());
        };
        self.pending_len += piece.len() as u64;
        self.pending.push(piece);
        loop {
            let at = self.start + self.held;
            let len = PIECE_SIZE.min(self.size - at);
            if len == 0 || self.pending_len < len {
                return Ok(());
            }
            // The piece's parts, splitting the last part at the piece's end
            // (no copy: the parts share the received buffers).
            let mut parts = Vec::new();
            let mut need = len;
            while need > 0 {
                let mut part = self.pending.remove(0);
                if part.len() as u64 > need {
                    let rest = part.split_off(need as usize);
                    self.pending.insert(0, rest);
                }
                need -= part.len() as u64;
                parts.push(part);
            }
            self.pending_len -= len;
            if let Err(e) = verifier.verify(at / PIECE_SIZE, parts.iter().map(|p| &p[..])) {
                tracing::error!(file = %self.file, piece = at / PIECE_SIZE, error = %e, "a piece of a pass-through file failed its check; reads of it give EIO");
                return Err(FsError::Integrity { what: format!("file {}", self.file), source: e });
            }
            self.held += len;
            self.pieces.extend(parts);
        }
    }

    /// Whether everything received has been checked and taken.
    fn settled(&self) -> bool {
        self.pending_len == 0
    }

    fn integrity(&self, failure: IntegrityFailure) -> FsError {
        FsError::Integrity { what: format!("file {}", self.file), source: CryptoError::Integrity(failure) }
    }

    /// Lets go of whole pieces that end before `keep_from`.
    fn trim(&mut self, keep_from: u64) {
        while let Some(front) = self.pieces.front() {
            let len = front.len() as u64;
            if self.start + len > keep_from {
                break;
            }
            self.start += len;
            self.held -= len;
            self.pieces.pop_front();
        }
    }

    /// `range` (held entirely): a slice of one piece when it lies within one
    /// (no copy, the usual case for the kernel's 128 KiB reads of the large
    /// pieces a connection delivers), else gathered from several.
    fn bytes(&self, range: Range<u64>) -> Bytes {
        let mut at = self.start;
        let mut gathered: Option<Vec<u8>> = None;
        for piece in &self.pieces {
            let end = at + piece.len() as u64;
            if end > range.start && at < range.end {
                let from = (range.start.max(at) - at) as usize;
                let to = (range.end.min(end) - at) as usize;
                if gathered.is_none() && range.start >= at && range.end <= end {
                    return piece.slice(from..to);
                }
                gathered
                    .get_or_insert_with(|| Vec::with_capacity((range.end - range.start) as usize))
                    .extend_from_slice(&piece[from..to]);
            }
            if end >= range.end {
                break;
            }
            at = end;
        }
        gathered.map(Bytes::from).unwrap_or_default()
    }
}

/// Pulls `file` from `from` to its end into `tx`, waiting for credit before
/// each piece; `size` is the length the file must have.
async fn pump<R: Remote>(
    fs: Arc<VaultFs<R>>,
    file: FileId,
    range: Range<u64>,
    size: u64,
    tx: mpsc::Sender<Result<Bytes>>,
    credit: Arc<Semaphore>,
) {
    let content = match fs.remote().download(file, Some(range)).await {
        // The server does not have the length the manifest states.
        Err(RemoteError::BadRange) => Ok(Content { total_len: 0, ..empty_content() }),
        other => other,
    };
    let content = match content {
        Ok(c) if c.total_len != size => {
            let e = FsError::Integrity {
                what: format!("file {file}"),
                source: CryptoError::Integrity(IntegrityFailure::Length),
            };
            let _ = tx.send(Err(e)).await;
            return;
        }
        Ok(c) => c,
        Err(e) => {
            let _ = tx.send(Err(e.into())).await;
            return;
        }
    };
    let mut stream = content.stream;
    while let Some(piece) = stream.next().await {
        let piece = match piece {
            Ok(p) => p,
            Err(e) => {
                let _ = tx.send(Err(FsError::Unavailable(e.to_string()))).await;
                return;
            }
        };
        let cost = (piece.len() as u64).min(READ_AHEAD) as u32;
        match credit.acquire_many(cost).await {
            Ok(permit) => permit.forget(),
            Err(_) => return,
        }
        if tx.send(Ok(piece)).await.is_err() {
            return;
        }
    }
}

impl<R: Remote> VaultFs<R> {
    /// Reads up to `size` bytes at `offset` of a pass-through file.
    pub(super) async fn read_pass_through(
        self: &Arc<Self>,
        pass: &tokio::sync::Mutex<PassRead>,
        offset: u64,
        size: u32,
    ) -> Result<Bytes> {
        let mut p = pass.lock().await;
        if offset >= p.size {
            return Ok(Bytes::new());
        }
        let end = (offset + u64::from(size)).min(p.size);
        let sequential = offset == p.last_end || offset == 0;
        p.last_end = end;
        loop {
            if offset >= p.start && end <= p.start + p.held {
                let out = p.bytes(offset..end);
                p.trim(end.saturating_sub(KEEP_BEHIND));
                return Ok(out);
            }
            // Within reach of the running download, or starting within what
            // it delivered (a read larger than the read-ahead, which the kernel
            // never sends but a caller of the core may): wait for its next piece.
            let reach = p.received_end() + READ_AHEAD;
            let continues = offset <= p.received_end();
            if p.feed.is_some() && offset >= p.start && (end <= reach || continues) {
                let got = match p.feed.as_mut() {
                    Some(feed) => feed.rx.recv().await,
                    None => None,
                };
                match got {
                    Some(Ok(piece)) => {
                        if let Some(feed) = &p.feed {
                            feed.credit.add_permits((piece.len() as u64).min(READ_AHEAD) as usize);
                        }
                        if let Err(e) = p.accept(piece) {
                            p.restart(0);
                            return Err(e);
                        }
                    }
                    Some(Err(e)) => {
                        p.restart(0);
                        return Err(e);
                    }
                    None => {
                        let short = match p.verifier {
                            Some(_) => p.integrity(IntegrityFailure::Length),
                            None => FsError::Io("the server returned less than asked".into()),
                        };
                        p.restart(0);
                        return Err(short);
                    }
                }
                continue;
            }
            // A seek, or the first read: from the piece boundary before it.
            p.restart(offset);
            let from = p.start;
            if sequential {
                let (tx, rx) = mpsc::channel(PIECES_AHEAD);
                let credit = Arc::new(Semaphore::new(READ_AHEAD as usize));
                let pump = pump(Arc::clone(self), p.file, from..p.size, p.size, tx, Arc::clone(&credit));
                p.feed = Some(Feed { rx, credit, pump: tokio::spawn(pump) });
                continue;
            }
            // Enough for the read (RANDOM_FETCH at least); whole pieces, the
            // ones the read covers, where each is checked.
            let fetch_end = match p.verifier {
                Some(_) => end.div_ceil(PIECE_SIZE).saturating_mul(PIECE_SIZE).min(p.size),
                None => (offset + RANDOM_FETCH.max(u64::from(size))).min(p.size),
            };
            let content = match self.remote().download(p.file, Some(from..fetch_end)).await {
                // For a file with a manifest: the server lacks its content.
                Err(RemoteError::BadRange) if p.verifier.is_some() => empty_content(),
                other => other?,
            };
            if p.verifier.is_some() && content.total_len != p.size {
                let e = p.integrity(IntegrityFailure::Length);
                p.restart(offset);
                return Err(e);
            }
            let mut stream = content.stream;
            while let Some(piece) = stream.next().await {
                let piece = piece.map_err(|e| FsError::Unavailable(e.to_string()))?;
                let overrun = p.received_end() + piece.len() as u64 > fetch_end;
                let accepted = if overrun {
                    Err(FsError::Io("the server returned more than asked".into()))
                } else {
                    p.accept(piece)
                };
                if let Err(e) = accepted {
                    p.restart(offset);
                    return Err(e);
                }
            }
            if p.start + p.held < end || !p.settled() {
                let short = match p.verifier {
                    Some(_) => p.integrity(IntegrityFailure::Length),
                    None => FsError::Io("the server returned less than asked".into()),
                };
                p.restart(offset);
                return Err(short);
            }
        }
    }
}
