//! A remote that fails on demand, for testing how the filesystem copes with a
//! server that is down, slow or lying: wraps any [`Remote`] and, while switched
//! off, answers every call with [`RemoteError::Unavailable`] without reaching the
//! inner one. Downloads can also be held at a byte offset (a slow link: what is
//! before it arrives, the rest waits), broken off there if the server goes down
//! meanwhile, or have one byte flipped (a tampering server). Downloads arrive
//! in pieces of at most 64 KiB, as over a network. Uploads can be held before
//! their body is read (a stalled link), and file deletes before they are sent.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;

use super::{Content, Remote, RemoteError, Result, UploadBody};
use crate::ids::{FileId, RecordId, VaultId};
use crate::protocol::ByteStream;
use crate::protocol::{
    Changes, CommitRequest, FileInfo, FileUpdate, Me, Member, NewFile, NewRecord, NewVault, RecordInfo,
    RecordUpdate, Sealed, Staged, UploadResult, UserKey, VaultInfo,
};

/// The switches shared between a test and its [`FaultyRemote`].
#[derive(Debug, Clone, Default)]
pub struct Outage(Arc<Faults>);

#[derive(Default)]
struct Faults {
    down: AtomicBool,
    hold_at: Mutex<Option<u64>>,
    hold_uploads: AtomicBool,
    /// File deletes wait before they reach the server (a slow link).
    hold_file_deletes: AtomicBool,
    /// File deletes fail as if the connection dropped.
    fail_file_deletes: AtomicBool,
    /// Answers to a batch of deletes leave the last outcome out (a lying server).
    short_delete_answers: AtomicBool,
    /// Metadata updates of files and records (renames, moves, times) fail
    /// as if the connection dropped; every other request goes through.
    fail_updates: AtomicBool,
    flip_at: Mutex<Option<u64>>,
    /// The range of every download asked for (None: whole content).
    downloads: Mutex<Vec<Option<Range<u64>>>>,
    /// Uploads are stored, but their answer is lost (an error comes back).
    lose_upload_answers: AtomicBool,
    /// Requests an older server does not know are answered 404.
    older_server: AtomicBool,
    /// A record created with a file is left out of the request, as by a
    /// server that knows the one-request create but not that.
    no_records_with_files: AtomicBool,
    /// Every new record is said to exist already, and none is made (a lying
    /// server).
    records_exist: AtomicBool,
    /// Upload answers name a conflict copy nobody asked for (a lying server).
    invent_copies: AtomicBool,
    /// Uploads replace the file whatever version they expect (a server that
    /// ignores If-Match).
    any_version: AtomicBool,
    /// Rewrites file metadata on its way to the client (a lying server).
    lie: Mutex<Option<FileLie>>,
    /// Rewrites the metadata of a file asked for by id, and nothing else.
    asked_lie: Mutex<Option<FileLie>>,
    /// Rewrites record metadata on its way to the client.
    record_lie: Mutex<Option<RecordLie>>,
    /// How many listings of records or files were asked for.
    listings: std::sync::atomic::AtomicUsize,
    /// How many pages of a vault's changes were asked for.
    feeds: std::sync::atomic::AtomicUsize,
    /// How many requests were made (while up), long polls included.
    requests: std::sync::atomic::AtomicUsize,
    /// Bumped to drop every poll held (a connection cut).
    cuts: std::sync::OnceLock<tokio::sync::watch::Sender<u64>>,
    /// Pages of changes are refused with "list again" (too far behind).
    relist: AtomicBool,
    /// Waits for changes are answered at once, each with a vault never seen
    /// before added (a server that makes a mount spin).
    spin_waits: AtomicBool,
}

/// A change a lying server makes to the file metadata it answers with.
pub type FileLie = Arc<dyn Fn(&mut FileInfo) + Send + Sync>;
/// A change a lying server makes to the record metadata it answers with.
pub type RecordLie = Arc<dyn Fn(&mut RecordInfo) + Send + Sync>;

impl std::fmt::Debug for Faults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Faults").field("down", &self.down).finish_non_exhaustive()
    }
}

impl Outage {
    /// The answer to a stored upload, as the faults set make it.
    fn answer(&self, mut done: UploadResult) -> Result<UploadResult> {
        if self.0.lose_upload_answers.load(Ordering::SeqCst) {
            return Err(RemoteError::Unavailable("injected: the answer was lost".into()));
        }
        if self.0.invent_copies.load(Ordering::SeqCst) {
            done.conflict_copy = Some(FileId::random().map_err(|e| RemoteError::Protocol(e.to_string()))?);
        }
        Ok(done)
    }

    /// Takes the server "down" (true) or brings it back (false).
    pub fn set(&self, down: bool) {
        self.0.down.store(down, Ordering::SeqCst);
    }

    /// Downloads deliver the bytes before `offset` of the content, then wait
    /// until this is called again with `None` (or fail if the server goes down).
    pub fn hold_downloads_at(&self, offset: Option<u64>) {
        *self.0.hold_at.lock().unwrap() = offset;
    }

    /// While true, uploads read none of their body (a stalled link): a
    /// stream's writer fills its queue and then waits.
    pub fn hold_uploads(&self, hold: bool) {
        self.0.hold_uploads.store(hold, Ordering::SeqCst);
    }

    /// While true, file deletes (one or in a batch) wait before they reach the server.
    pub fn hold_file_deletes(&self, hold: bool) {
        self.0.hold_file_deletes.store(hold, Ordering::SeqCst);
    }

    /// While true, metadata updates of files and records (renames, moves,
    /// times) fail as if the connection dropped; nothing else does.
    pub fn fail_updates(&self, fail: bool) {
        self.0.fail_updates.store(fail, Ordering::SeqCst);
    }

    fn update_check(&self) -> Result<()> {
        if self.0.fail_updates.load(Ordering::SeqCst) {
            return Err(RemoteError::Unavailable("injected: the connection dropped".into()));
        }
        self.check()
    }

    /// While true, answers to a batch of deletes leave the last outcome out.
    pub fn short_delete_answers(&self, short: bool) {
        self.0.short_delete_answers.store(short, Ordering::SeqCst);
    }

    /// While true, file deletes, and batches of deletes whatever they hold,
    /// fail as if the connection dropped; nothing else does.
    pub fn fail_file_deletes(&self, fail: bool) {
        self.0.fail_file_deletes.store(fail, Ordering::SeqCst);
    }

    /// Waits while file deletes are held; fails them while they fail.
    async fn file_deletes_pass(&self) -> Result<()> {
        while self.0.hold_file_deletes.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if self.0.fail_file_deletes.load(Ordering::SeqCst) {
            return Err(RemoteError::Unavailable("injected: the connection dropped".into()));
        }
        Ok(())
    }

    /// Downloads have the byte at `offset` of the content flipped.
    pub fn flip_download_byte(&self, offset: Option<u64>) {
        *self.0.flip_at.lock().unwrap() = offset;
    }

    /// While true, uploads are stored but answered with an error, as when the
    /// connection breaks just before the answer.
    pub fn lose_upload_answers(&self, lose: bool) {
        self.0.lose_upload_answers.store(lose, Ordering::SeqCst);
    }

    /// Answers what an older server does not know (a file created with its
    /// content in one request, deletes in one request) with 404, as such a
    /// server does.
    pub fn be_older_server(&self, older: bool) {
        self.0.older_server.store(older, Ordering::SeqCst);
    }

    /// Leaves out the record created with a file (its headers), as a server
    /// that creates files with their content but not records with them does.
    pub fn ignore_records_with_files(&self, ignore: bool) {
        self.0.no_records_with_files.store(ignore, Ordering::SeqCst);
    }

    /// While true, a record created on its own is said to exist already,
    /// and is not made (a lying server).
    pub fn claim_records_exist(&self, claim: bool) {
        self.0.records_exist.store(claim, Ordering::SeqCst);
    }

    /// While true, upload answers name a conflict copy that was not asked
    /// for, as a lying server's would (the upload itself is stored).
    pub fn invent_conflict_copies(&self, invent: bool) {
        self.0.invent_copies.store(invent, Ordering::SeqCst);
    }

    /// While true, an upload replaces the file whatever version it expects.
    pub fn accept_any_version(&self, any: bool) {
        self.0.any_version.store(any, Ordering::SeqCst);
    }

    /// Every file's metadata the client gets (listings and single files) goes
    /// through `lie` first (`None`: the truth again).
    pub fn lie_about_files(&self, lie: Option<FileLie>) {
        *self.0.lie.lock().unwrap() = lie;
    }

    /// The metadata of a file asked for by its id (and only that: not the
    /// same file in listings or changes) goes through `lie` first.
    pub fn lie_about_files_asked_for(&self, lie: Option<FileLie>) {
        *self.0.asked_lie.lock().unwrap() = lie;
    }

    /// Every record's metadata the client gets in listings and changes goes
    /// through `lie` first (`None`: the truth again).
    pub fn lie_about_records(&self, lie: Option<RecordLie>) {
        *self.0.record_lie.lock().unwrap() = lie;
    }

    fn lie_record(&self, info: &mut RecordInfo) {
        if let Some(lie) = self.0.record_lie.lock().unwrap().as_ref() {
            lie(info);
        }
    }

    fn lie(&self, info: &mut FileInfo) {
        if let Some(lie) = self.0.lie.lock().unwrap().as_ref() {
            lie(info);
        }
    }

    /// How many listings of a vault's records or files were asked for so far.
    pub fn listings(&self) -> usize {
        self.0.listings.load(Ordering::SeqCst)
    }

    /// How many pages of a vault's changes were asked for so far.
    pub fn feeds(&self) -> usize {
        self.0.feeds.load(Ordering::SeqCst)
    }

    /// How many requests were made so far (long polls included).
    pub fn requests(&self) -> usize {
        self.0.requests.load(Ordering::SeqCst)
    }

    /// Drops every long poll held now, as a cut connection would (each
    /// returns an error).
    pub fn cut_waits(&self) {
        self.cuts().send_modify(|n| *n += 1);
    }

    /// While set, pages of changes are refused with "list again", as by a
    /// server whose history no longer reaches back to the caller.
    pub fn tell_to_relist(&self, relist: bool) {
        self.0.relist.store(relist, Ordering::SeqCst);
    }

    /// While set, every wait for changes is answered at once with what the
    /// client knows plus a vault id never seen before.
    pub fn spin_waits(&self, spin: bool) {
        self.0.spin_waits.store(spin, Ordering::SeqCst);
    }

    fn cuts(&self) -> &tokio::sync::watch::Sender<u64> {
        self.0.cuts.get_or_init(|| tokio::sync::watch::channel(0).0)
    }

    /// The ranges downloaded so far, and forgets them.
    pub fn take_downloads(&self) -> Vec<Option<Range<u64>>> {
        std::mem::take(&mut *self.0.downloads.lock().unwrap())
    }

    fn hold_at(&self) -> Option<u64> {
        *self.0.hold_at.lock().unwrap()
    }

    fn check(&self) -> Result<()> {
        if self.0.down.load(Ordering::SeqCst) {
            Err(RemoteError::Unavailable("injected outage".into()))
        } else {
            self.0.requests.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }
}

/// Wraps a remote with an [`Outage`] switch.
#[derive(Clone)]
pub struct FaultyRemote<R> {
    inner: R,
    outage: Outage,
}

impl<R> FaultyRemote<R> {
    /// Wraps `inner`; returns the switch.
    pub fn new(inner: R) -> (Self, Outage) {
        let outage = Outage::default();
        (FaultyRemote { inner, outage: outage.clone() }, outage)
    }
}

impl<R: Remote> Remote for FaultyRemote<R> {
    async fn me(&self) -> Result<Me> {
        self.outage.check()?;
        self.inner.me().await
    }
    async fn wallet(&self) -> Result<Option<(Vec<u8>, u64)>> {
        self.outage.check()?;
        self.inner.wallet().await
    }
    async fn wallet_version(&self) -> Result<Option<u64>> {
        self.outage.check()?;
        self.inner.wallet_version().await
    }
    async fn put_wallet(&self, blob: Vec<u8>, expected: Option<u64>) -> Result<u64> {
        self.outage.check()?;
        self.inner.put_wallet(blob, expected).await
    }
    async fn put_user_key(&self, key: Sealed) -> Result<()> {
        self.outage.check()?;
        self.inner.put_user_key(key).await
    }
    async fn user_key(&self, user: &str) -> Result<UserKey> {
        self.outage.check()?;
        self.inner.user_key(user).await
    }
    async fn members(&self, vault: VaultId) -> Result<Vec<Member>> {
        self.outage.check()?;
        self.inner.members(vault).await
    }
    async fn set_member(&self, vault: VaultId, member: Member) -> Result<()> {
        self.outage.check()?;
        self.inner.set_member(vault, member).await
    }
    async fn remove_member(&self, vault: VaultId, user: &str) -> Result<()> {
        self.outage.check()?;
        self.inner.remove_member(vault, user).await
    }
    async fn vaults(&self) -> Result<Vec<VaultInfo>> {
        self.outage.check()?;
        self.inner.vaults().await
    }
    async fn create_vault(&self, vault: NewVault) -> Result<VaultInfo> {
        self.outage.check()?;
        self.inner.create_vault(vault).await
    }
    async fn records(&self, vault: VaultId) -> Result<Vec<RecordInfo>> {
        self.outage.check()?;
        self.outage.0.listings.fetch_add(1, Ordering::SeqCst);
        let mut records = self.inner.records(vault).await?;
        records.iter_mut().for_each(|r| self.outage.lie_record(r));
        Ok(records)
    }
    async fn create_record(&self, vault: VaultId, record: NewRecord) -> Result<RecordInfo> {
        self.outage.check()?;
        if self.outage.0.records_exist.load(Ordering::SeqCst) {
            return Err(RemoteError::Exists("record".into()));
        }
        self.inner.create_record(vault, record).await
    }
    async fn update_record(&self, id: RecordId, expected: u64, update: RecordUpdate) -> Result<RecordInfo> {
        self.outage.update_check()?;
        self.inner.update_record(id, expected, update).await
    }
    async fn delete_record(&self, id: RecordId, expected: u64) -> Result<()> {
        self.outage.check()?;
        self.inner.delete_record(id, expected).await
    }
    async fn files(&self, vault: VaultId) -> Result<Vec<FileInfo>> {
        self.outage.check()?;
        self.outage.0.listings.fetch_add(1, Ordering::SeqCst);
        let mut files = self.inner.files(vault).await?;
        files.iter_mut().for_each(|f| self.outage.lie(f));
        Ok(files)
    }
    async fn wait_for_changes(
        &self,
        known: std::collections::BTreeMap<VaultId, u64>,
        wallet: Option<u64>,
        timeout: std::time::Duration,
    ) -> Result<crate::protocol::VaultChanges> {
        self.outage.check()?;
        if self.outage.0.spin_waits.load(Ordering::SeqCst) {
            let mut vaults = known;
            vaults.insert(VaultId::random().map_err(|e| RemoteError::Protocol(e.to_string()))?, 1);
            return Ok(crate::protocol::VaultChanges { vaults, wallet });
        }
        let mut cut = self.outage.cuts().subscribe();
        tokio::select! {
            answer = self.inner.wait_for_changes(known, wallet, timeout) => answer,
            _ = cut.changed() => Err(RemoteError::Unavailable("injected: the connection was cut".into())),
        }
    }

    async fn changes(&self, vault: VaultId, since: u64) -> Result<Changes> {
        self.outage.check()?;
        self.outage.0.feeds.fetch_add(1, Ordering::SeqCst);
        if self.outage.0.relist.load(Ordering::SeqCst) {
            return Err(RemoteError::Relist("injected: too far behind".into()));
        }
        let mut changes = self.inner.changes(vault, since).await?;
        changes.files.iter_mut().for_each(|f| self.outage.lie(f));
        changes.records.iter_mut().for_each(|r| self.outage.lie_record(r));
        Ok(changes)
    }
    async fn file(&self, id: FileId) -> Result<FileInfo> {
        self.outage.check()?;
        let mut info = self.inner.file(id).await?;
        self.outage.lie(&mut info);
        if let Some(lie) = self.outage.0.asked_lie.lock().unwrap().as_ref() {
            lie(&mut info);
        }
        Ok(info)
    }
    async fn create_file(&self, record: RecordId, file: NewFile) -> Result<FileInfo> {
        self.outage.check()?;
        self.inner.create_file(record, file).await
    }
    async fn update_file(&self, id: FileId, expected: u64, update: FileUpdate) -> Result<FileInfo> {
        self.outage.update_check()?;
        self.inner.update_file(id, expected, update).await
    }
    async fn delete_file(&self, id: FileId, expected: u64) -> Result<()> {
        self.outage.file_deletes_pass().await?;
        self.outage.check()?;
        self.inner.delete_file(id, expected).await
    }
    async fn delete_many(
        &self,
        items: Vec<crate::protocol::DeleteItem>,
    ) -> Result<Vec<crate::protocol::DeleteOutcome>> {
        self.outage.file_deletes_pass().await?;
        self.outage.check()?;
        if self.outage.0.older_server.load(Ordering::SeqCst) {
            return Err(RemoteError::NotFound("no such endpoint".into()));
        }
        let mut outcomes = self.inner.delete_many(items).await?;
        if self.outage.0.short_delete_answers.load(Ordering::SeqCst) {
            outcomes.pop();
        }
        Ok(outcomes)
    }
    async fn set_locks(
        &self,
        file: FileId,
        req: crate::protocol::SetLocks,
    ) -> Result<crate::protocol::LockAnswer> {
        self.outage.check()?;
        self.inner.set_locks(file, req).await
    }
    async fn file_locks(&self, file: FileId) -> Result<Vec<crate::protocol::HeldLock>> {
        self.outage.check()?;
        self.inner.file_locks(file).await
    }
    async fn renew_locks(
        &self,
        holder: crate::ids::HolderId,
        held: Vec<crate::protocol::LockOwnerOf>,
    ) -> Result<crate::protocol::LocksRenewed> {
        self.outage.check()?;
        self.inner.renew_locks(holder, held).await
    }
    async fn drop_locks(&self, holder: crate::ids::HolderId) -> Result<crate::protocol::LocksRenewed> {
        self.outage.check()?;
        self.inner.drop_locks(holder).await
    }
    async fn download(&self, id: FileId, range: Option<Range<u64>>) -> Result<Content> {
        self.outage.check()?;
        self.outage.0.downloads.lock().unwrap().push(range.clone());
        let start = range.as_ref().map_or(0, |r| r.start);
        let mut content = self.inner.download(id, range).await?;
        content.stream = faulty_stream(content.stream, start, self.outage.clone());
        Ok(content)
    }
    async fn upload(
        &self,
        id: FileId,
        expected: u64,
        e2e: bool,
        mtime_ms: Option<i64>,
        mut body: UploadBody,
    ) -> Result<UploadResult> {
        self.outage.check()?;
        body.stream = held(body.stream, self.outage.clone());
        let expected = match self.outage.0.any_version.load(Ordering::SeqCst) {
            true => self.inner.file(id).await?.version,
            false => expected,
        };
        let done = self.inner.upload(id, expected, e2e, mtime_ms, body).await?;
        self.outage.answer(done)
    }
    async fn create_with_content(
        &self,
        record: RecordId,
        mut new_record: Option<(VaultId, NewRecord)>,
        file: NewFile,
        mut body: UploadBody,
    ) -> Result<UploadResult> {
        self.outage.check()?;
        if self.outage.0.older_server.load(Ordering::SeqCst) {
            return Err(RemoteError::NotFound("no such endpoint".into()));
        }
        if self.outage.0.no_records_with_files.load(Ordering::SeqCst) {
            // As a server that does not know the record's headers: ignored.
            new_record = None;
        }
        body.stream = held(body.stream, self.outage.clone());
        let done = self.inner.create_with_content(record, new_record, file, body).await?;
        self.outage.answer(done)
    }
    async fn stage(&self, id: FileId, expected: u64, e2e: bool, mut body: UploadBody) -> Result<Staged> {
        self.outage.check()?;
        body.stream = held(body.stream, self.outage.clone());
        self.inner.stage(id, expected, e2e, body).await
    }
    async fn commit(&self, id: FileId, expected: u64, request: CommitRequest) -> Result<UploadResult> {
        self.outage.check()?;
        self.inner.commit(id, expected, request).await
    }
}

/// An upload body that reads nothing while uploads are held.
fn held(inner: ByteStream, outage: Outage) -> ByteStream {
    Box::pin(futures_util::stream::unfold((inner, outage), |(mut inner, outage)| async move {
        while outage.0.hold_uploads.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let piece = inner.next().await?;
        Some((piece, (inner, outage)))
    }))
}

/// The largest piece a download delivers at once, as a connection would
/// (the in-memory server hands over whole ranges).
const NET_PIECE: usize = 64 << 10;

/// `inner` (content from `start` on) with the download faults of `outage`
/// applied, in pieces of at most [`NET_PIECE`].
fn faulty_stream(inner: ByteStream, start: u64, outage: Outage) -> ByteStream {
    let state = (inner, start, outage, None::<bytes::Bytes>);
    Box::pin(futures_util::stream::unfold(state, |(mut inner, pos, outage, leftover)| async move {
        let mut piece = match leftover {
            Some(piece) => piece,
            None => match inner.next().await? {
                Ok(piece) => piece,
                Err(e) => return Some((Err(e), (inner, pos, outage, None))),
            },
        };
        let mut leftover = None;
        while outage.hold_at().is_some_and(|h| h <= pos) {
            if outage.check().is_err() {
                let e = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "injected outage");
                return Some((Err(e), (inner, pos, outage, None)));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if let Some(hold) = outage.hold_at().filter(|&h| h < pos + piece.len() as u64) {
            leftover = Some(piece.split_off((hold - pos) as usize));
        }
        if piece.len() > NET_PIECE {
            // As a network delivers it: the rest comes as later pieces.
            let mut rest = piece.split_off(NET_PIECE).to_vec();
            rest.extend_from_slice(&leftover.take().unwrap_or_default());
            leftover = Some(rest.into());
        }
        let flip = *outage.0.flip_at.lock().unwrap();
        if let Some(at) = flip.filter(|&at| at >= pos && at < pos + piece.len() as u64) {
            let mut changed = piece.to_vec();
            changed[(at - pos) as usize] ^= 1;
            piece = changed.into();
        }
        let next = pos + piece.len() as u64;
        Some((Ok(piece), (inner, next, outage, leftover)))
    }))
}
