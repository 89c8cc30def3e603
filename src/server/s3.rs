//! Blobs on an S3-compatible object store (AWS S3, MinIO, Ceph RGW, Garage).
//!
//! Data flow: an upload is read from the request in parts of `part_size`
//! bytes. A blob that fits in one part goes up as a single PUT; a larger one as
//! a multipart upload, at most `concurrency` parts in flight, so the server holds
//! about (concurrency + 1) x part_size of it in memory whatever the file's size.
//! Either way the object appears under its key only once complete: S3 shows no
//! partial objects, and since every upload gets a fresh random blob id, the
//! previous version stays in place until the metadata moves to the new one.
//!
//! A failed or refused upload aborts its multipart upload at once. A crash
//! cannot, so before its first part every multipart upload is written to a
//! small journal in the server's data directory; the next start aborts every
//! upload still listed there ([`BlobStore::clean_incomplete`]).
//!
//! A read streams its first 8 MiB from one ranged GET; the rest of a long read
//! comes from several ranged GETs at once, fetched by a task while the first
//! part streams, and is given out in order. The S3 protocol (SigV4 signing,
//! retries) is the `object_store` crate's.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures_util::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path as ObjectPath;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutPayload};
use tokio::task::JoinHandle;

use super::blob::{BlobError, BlobId, BlobRead, BlobStore, ByteStream};
use super::config::S3Config;

/// Blobs as objects `PREFIX/HEX` in one bucket.
#[derive(Debug, Clone)]
pub struct S3BlobStore {
    store: Arc<AmazonS3>,
    prefix: String,
    part_size: usize,
    concurrency: usize,
    /// One file per multipart upload in progress (see the module docs).
    journal: PathBuf,
    /// Parts of long reads held by the whole server at once (see
    /// [`PARTS_ON_SERVER`]).
    read_parts: Arc<tokio::sync::Semaphore>,
}

fn store_err(e: object_store::Error) -> BlobError {
    match e {
        object_store::Error::NotFound { .. } => BlobError::NotFound,
        e => BlobError::Io(io::Error::other(format!("object store: {e}"))),
    }
}

impl S3BlobStore {
    /// Connects to the bucket `config` names. Credentials and region not given
    /// there come from the usual AWS environment variables. Nothing is sent
    /// until the first request.
    pub fn open(config: &S3Config, data_dir: &std::path::Path) -> Result<Self, BlobError> {
        let mut b =
            AmazonS3Builder::from_env().with_bucket_name(&config.bucket).with_allow_http(config.allow_http);
        if let Some(endpoint) = &config.endpoint {
            b = b.with_endpoint(endpoint);
        }
        if let Some(region) = &config.region {
            b = b.with_region(region);
        }
        if let (Some(id), Some(secret)) = (&config.access_key_id, &config.secret_access_key) {
            b = b.with_access_key_id(id).with_secret_access_key(secret);
        }
        b = b.with_virtual_hosted_style_request(config.virtual_hosted_style);
        let store =
            b.build().map_err(|e| BlobError::Io(io::Error::other(format!("S3 configuration: {e}"))))?;
        let journal = data_dir.join("s3-uploads");
        std::fs::create_dir_all(&journal)?;
        Ok(S3BlobStore {
            store: Arc::new(store),
            prefix: config.prefix.trim_matches('/').to_string(),
            part_size: (config.part_size_mib as usize) << 20,
            concurrency: config.concurrency.max(1),
            journal,
            read_parts: Arc::new(tokio::sync::Semaphore::new(PARTS_ON_SERVER)),
        })
    }

    fn key(&self, id: BlobId) -> ObjectPath {
        self.key_named(&id.to_hex())
    }

    fn key_named(&self, name: &str) -> ObjectPath {
        if self.prefix.is_empty() {
            ObjectPath::from(name)
        } else {
            ObjectPath::from(format!("{}/{name}", self.prefix))
        }
    }

    /// Reads `body` into `part_size` pieces and stores them; see [`BlobStore::put`].
    async fn upload(&self, id: BlobId, mut body: ByteStream, limit: u64) -> Result<u64, BlobError> {
        let key = self.key(id);
        let mut buf = BytesMut::new();
        let mut written: u64 = 0;
        let mut multipart: Option<Multipart> = None;
        let result = async {
            while let Some(piece) = body.next().await {
                let piece = piece.map_err(|e| BlobError::Body(e.to_string()))?;
                written += piece.len() as u64;
                if written > limit {
                    return Err(BlobError::TooLarge(limit));
                }
                buf.extend_from_slice(&piece);
                while buf.len() >= self.part_size {
                    let part = buf.split_to(self.part_size).freeze();
                    if multipart.is_none() {
                        multipart = Some(Multipart::start(self, &key, id).await?);
                    }
                    if let Some(m) = multipart.as_mut() {
                        m.send(self, part).await?;
                    }
                }
            }
            match multipart.as_mut() {
                None => {
                    // Small enough for one PUT: atomic by itself.
                    self.store.put(&key, PutPayload::from(buf.split().freeze())).await.map_err(store_err)?;
                }
                Some(m) => {
                    if !buf.is_empty() {
                        m.send(self, buf.split().freeze()).await?;
                    }
                    m.complete(self).await?;
                }
            }
            Ok(written)
        }
        .await;
        if result.is_err() {
            if let Some(m) = multipart {
                m.abort(self).await;
            }
        }
        result
    }
}

/// A multipart upload in progress.
struct Multipart {
    key: ObjectPath,
    upload: String,
    journal: PathBuf,
    parts: Vec<Option<PartId>>,
    in_flight: Vec<(usize, JoinHandle<object_store::Result<PartId>>)>,
}

impl Multipart {
    async fn start(s: &S3BlobStore, key: &ObjectPath, id: BlobId) -> Result<Self, BlobError> {
        let upload = s.store.create_multipart(key).await.map_err(store_err)?;
        // Journal it (durably) before any part is sent: a crash from here on
        // is cleaned up at the next start. The journal holds only the object
        // key (a random, server-chosen blob id) and the store's upload id: the
        // server never has plaintext, keys or names to write.
        let journal = s.journal.join(id.to_hex());
        let entry = format!("{key}\n{upload}\n");
        let path = journal.clone();
        let written = tokio::task::spawn_blocking(move || {
            use std::io::Write;
            let mut f = std::fs::File::create(&path)?;
            f.write_all(entry.as_bytes())?;
            f.sync_all()
        })
        .await
        .map_err(io::Error::other)?;
        let m = Multipart { key: key.clone(), upload, journal, parts: Vec::new(), in_flight: Vec::new() };
        if let Err(e) = written {
            m.abort(s).await;
            return Err(e.into());
        }
        Ok(m)
    }

    /// Sends one part, first waiting for the oldest if `concurrency` are in flight.
    async fn send(&mut self, s: &S3BlobStore, data: Bytes) -> Result<(), BlobError> {
        if self.in_flight.len() >= s.concurrency {
            self.wait_oldest().await?;
        }
        let idx = self.parts.len();
        self.parts.push(None);
        let (store, key, upload) = (Arc::clone(&s.store), self.key.clone(), self.upload.clone());
        let task =
            tokio::spawn(async move { store.put_part(&key, &upload, idx, PutPayload::from(data)).await });
        self.in_flight.push((idx, task));
        Ok(())
    }

    async fn wait_oldest(&mut self) -> Result<(), BlobError> {
        let (idx, task) = self.in_flight.remove(0);
        let part = task.await.map_err(io::Error::other)?.map_err(store_err)?;
        self.parts[idx] = Some(part);
        Ok(())
    }

    async fn complete(&mut self, s: &S3BlobStore) -> Result<(), BlobError> {
        while !self.in_flight.is_empty() {
            self.wait_oldest().await?;
        }
        let parts: Vec<PartId> = self.parts.iter_mut().filter_map(Option::take).collect();
        s.store.complete_multipart(&self.key, &self.upload, parts).await.map_err(store_err)?;
        let _ = tokio::fs::remove_file(&self.journal).await;
        Ok(())
    }

    /// Lets the parts still in flight settle, then aborts the upload (so the
    /// store frees its parts); the journal entry goes only if the abort
    /// succeeded. The parts are waited for, not cancelled: a cancelled request
    /// may already be in the store's hands, and a part it stores after the
    /// abort would stay behind (S3 says as much of parts in progress). At most
    /// `concurrency` parts wait, each bounded by the store's own timeouts.
    async fn abort(self, s: &S3BlobStore) {
        for (_, task) in self.in_flight {
            let _ = task.await;
        }
        match s.store.abort_multipart(&self.key, &self.upload).await {
            Ok(()) => {
                let _ = tokio::fs::remove_file(&self.journal).await;
            }
            Err(e) => {
                tracing::warn!(key = %self.key, error = %e, "could not abort a multipart upload; retried at the next start")
            }
        }
    }
}

/// A read longer than this is fetched as several ranged GETs at once
/// ([`PARTS_IN_FLIGHT`] of [`PART`] bytes): one GET streams at what one
/// connection and one server thread give (a 300 MB read took 3.6 times as
/// long as from local blobs), several use the bucket's parallelism.
const PARALLEL_FROM: u64 = 2 * PART;
/// The size of each ranged GET of a long read.
const PART: u64 = 8 << 20;
/// Ranged GETs of one read in flight at once, besides the part being given
/// out: the memory one read holds on the server is about this many parts
/// plus one.
const PARTS_IN_FLIGHT: usize = 4;
/// Parts of long reads the whole server holds at once (128 MiB): many
/// readers, or one opening many long reads, wait for each other rather than
/// fill the server's memory.
const PARTS_ON_SERVER: usize = 16;

impl S3BlobStore {
    /// Bytes `start..` of object `key` as one streamed GET of at most
    /// [`PART`] bytes, and the object's whole length. A GET, not a HEAD and
    /// a GET: a whole read of a small object costs one request.
    async fn get_first(&self, key: &ObjectPath, start: u64) -> Result<(ByteStream, u64, u64), BlobError> {
        let opts = GetOptions { range: Some(GetRange::Bounded(start..start + PART)), ..Default::default() };
        let got = self.store.get_opts(key, opts).await.map_err(store_err)?;
        let (size, got_range) = (got.meta.size, got.range.clone());
        if got_range != (start..(start + PART).min(size)) {
            return Err(BlobError::BadRange);
        }
        Ok((Box::pin(got.into_stream().map_err(io::Error::other)), got_range.end, size))
    }

    /// Bytes `first_end..end` of object `key`, fetched as ranged GETs of
    /// [`PART`] bytes in a task of their own, [`PARTS_IN_FLIGHT`] at once,
    /// and given out in order after `first` (the stream of the bytes before
    /// them). The task starts at once, so the later parts arrive while
    /// `first` streams; it ends when the reader goes away. A part that comes
    /// back short (the object changed, or the store lied) ends the stream
    /// with an error.
    fn rest_in_parts(&self, key: ObjectPath, first: ByteStream, first_end: u64, end: u64) -> ByteStream {
        let (store, permits) = (Arc::clone(&self.store), Arc::clone(&self.read_parts));
        let fetch = move |part: std::ops::Range<u64>| {
            let (store, key, permits) = (Arc::clone(&store), key.clone(), Arc::clone(&permits));
            async move {
                let held = permits.acquire_owned().await.map_err(io::Error::other)?;
                let bytes = store.get_range(&key, part.clone()).await.map_err(io::Error::other)?;
                if bytes.len() as u64 != part.end - part.start {
                    return Err(io::Error::other(format!(
                        "object store: bytes {}..{} came back as {} bytes",
                        part.start,
                        part.end,
                        bytes.len()
                    )));
                }
                Ok((held, bytes))
            }
        };
        let parts = (first_end..end).step_by(PART as usize).map(move |s| s..(s + PART).min(end));
        let mut fetched = futures_util::stream::iter(parts).map(fetch).buffered(PARTS_IN_FLIGHT);
        // One part waits in the channel; its permit goes when it is handed on.
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    next = fetched.next() => next,
                    () = tx.closed() => return,
                };
                let Some(part) = next else { return };
                let failed = part.is_err();
                if tx.send(part).await.is_err() || failed {
                    return;
                }
            }
        });
        let rest = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|p| (p, rx)) })
            .map_ok(|(_held, bytes)| bytes);
        Box::pin(first.chain(rest))
    }
}

impl BlobStore for S3BlobStore {
    async fn put(&self, id: BlobId, body: ByteStream, limit: u64) -> Result<u64, BlobError> {
        self.upload(id, body, limit).await
    }

    async fn get(&self, id: BlobId, range: Option<(u64, u64)>) -> Result<BlobRead, BlobError> {
        let key = self.key(id);
        let Some((start, end)) = range else {
            // A whole read starts as a ranged GET of its first part, which
            // also tells the object's length. An empty object has no first
            // part (S3 refuses the range): it, and any other refusal but
            // "not found", is read as one plain GET.
            match self.get_first(&key, 0).await {
                Ok((first, first_end, size)) if size > first_end => {
                    let stream = self.rest_in_parts(key, first, first_end, size);
                    return Ok(BlobRead { stream, total_len: size });
                }
                Ok((stream, _, size)) => return Ok(BlobRead { stream, total_len: size }),
                Err(BlobError::NotFound) => return Err(BlobError::NotFound),
                Err(_) => {}
            }
            let got = self.store.get_opts(&key, GetOptions::default()).await.map_err(store_err)?;
            let total_len = got.meta.size;
            return Ok(BlobRead { stream: Box::pin(got.into_stream().map_err(io::Error::other)), total_len });
        };
        // A range the object cannot serve (or an empty one, which S3 cannot
        // express) is settled from its size alone.
        let size = self.store.head(&key).await.map_err(store_err)?.size;
        if start > end || end > size {
            return Err(BlobError::BadRange);
        }
        if start == end {
            return Ok(BlobRead { stream: Box::pin(futures_util::stream::empty()), total_len: size });
        }
        if end - start > PARALLEL_FROM {
            let (first, first_end, _) = self.get_first(&key, start).await?;
            return Ok(BlobRead { stream: self.rest_in_parts(key, first, first_end, end), total_len: size });
        }
        let opts = GetOptions { range: Some(GetRange::Bounded(start..end)), ..Default::default() };
        let got = self.store.get_opts(&key, opts).await.map_err(store_err)?;
        if got.range != (start..end) {
            return Err(BlobError::BadRange);
        }
        let total_len = got.meta.size;
        Ok(BlobRead { stream: Box::pin(got.into_stream().map_err(io::Error::other)), total_len })
    }

    async fn delete(&self, id: BlobId) -> Result<(), BlobError> {
        match self.store.delete(&self.key(id)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(store_err(e)),
        }
    }

    async fn list(&self) -> Result<Vec<(BlobId, std::time::SystemTime)>, BlobError> {
        let prefix = (!self.prefix.is_empty()).then(|| ObjectPath::from(self.prefix.as_str()));
        let mut listing = self.store.list(prefix.as_ref());
        let mut ids = Vec::new();
        while let Some(meta) = listing.next().await {
            let meta = meta.map_err(store_err)?;
            if let Some(id) = meta.location.filename().and_then(BlobId::from_hex) {
                ids.push((id, meta.last_modified.into()));
            }
        }
        Ok(ids)
    }

    async fn probe(&self) -> Result<(), BlobError> {
        // A listing that starts after every blob's key (ids are hex, and
        // "g" sorts after them all): one request, an empty answer from a
        // bucket that is there, an error from one that is not. (A HEAD of
        // a missing key answers 404 whether or not the bucket is there.)
        let prefix = (!self.prefix.is_empty()).then(|| ObjectPath::from(self.prefix.as_str()));
        let after = self.key_named("g");
        match self.store.list_with_offset(prefix.as_ref(), &after).next().await {
            None | Some(Ok(_)) => Ok(()),
            Some(Err(e)) => Err(store_err(e)),
        }
    }

    async fn clean_incomplete(&self) -> Result<usize, BlobError> {
        let mut aborted = 0;
        let mut entries = tokio::fs::read_dir(&self.journal).await?;
        while let Some(e) = entries.next_entry().await? {
            let text = tokio::fs::read_to_string(e.path()).await.unwrap_or_default();
            let mut lines = text.lines();
            if let (Some(key), Some(upload)) = (lines.next(), lines.next()) {
                match self.store.abort_multipart(&ObjectPath::from(key), &upload.to_string()).await {
                    // Already gone (completed, or aborted before the crash): fine.
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => {
                        tracing::warn!(key, error = %e, "could not abort an interrupted multipart upload");
                        continue;
                    }
                }
            }
            tokio::fs::remove_file(e.path()).await?;
            aborted += 1;
        }
        Ok(aborted)
    }
}
