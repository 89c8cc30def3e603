//! Creating and opening files.
//!
//! Data flow. An open of a file whose manifest says pass-through (above the
//! end-to-end limit) for reading gets a [`HandleMode::PassRead`] handle that
//! reads ranges from the server (super::passread); every other open pins the
//! file's cache entry and makes sure it holds the server's current version:
//! kept if the server confirms the version held (or did within
//! `confirmed_for`, or the live change feed vouches for the tree's version:
//! super::follow), else downloaded again (super::fill), the open returning
//! once the header is authenticated. O_TRUNC empties the entry instead.
//! Whether the kernel may keep its cached pages follows from the same answer.

use std::ffi::OsStr;
use std::sync::Arc;
use std::time::Instant;

use super::backing::{Change, KernelOpen, OpenHow};
use super::handles::{HandleMode, KernelIo, KernelWish};
use super::passread::PassRead;
use super::tree::{check_name, FileMeta};
use super::{Attr, FsError, Ino, Result, VaultFs};
use crate::cache::{PlainData, SecretBuf};
use crate::crypto;
use crate::remote::Remote;

impl<R: Remote> VaultFs<R> {
    /// Creates and opens a new, empty file with permission bits `perm` (the
    /// creating process's mode less its umask).
    pub async fn create(&self, parent: Ino, name: &OsStr, perm: u16) -> Result<(Attr, u64)> {
        let how = OpenHow { read: true, write: true, ..OpenHow::default() };
        self.create_for_kernel(parent, name, perm, how).await.map(|(attr, fh, _)| (attr, fh))
    }

    /// [`VaultFs::create`] opened as `how` asks, also saying what the kernel
    /// may do with the handle: direct I/O if it only writes, else the page
    /// cache (a new file has no backing file to read from).
    pub async fn create_for_kernel(
        &self,
        parent: Ino,
        name: &OsStr,
        perm: u16,
        how: OpenHow,
    ) -> Result<(Attr, u64, KernelOpen)> {
        check_name(name)?;
        self.load_dir(parent).await?;
        self.writable(parent)?;
        if self.tree.lock().child(parent, name).is_some() {
            return Err(FsError::Exists);
        }
        // On the server at its first save, with its content (see `unsent`).
        let (ino, info) = self.new_unsent_file(parent, name, perm)?;
        let handle = self.cache.pin(info.id);
        {
            let mut d = handle.lock().await;
            *d = PlainData {
                bytes: SecretBuf::new(),
                dirty: true,
                version: info.version,
                confirmed: None,
                loaded: true,
                filling: false,
                edits: 0,
                closed: 0,
                retrying: false,
            };
        }
        self.modes.start_sequential(info.id);
        let wish = if how.read { KernelWish::PageCache } else { KernelWish::Direct };
        let (fh, io, _) = self.handles.open_kernel(info.id, HandleMode::Cached, wish);
        let kernel = match io {
            KernelIo::Direct => KernelOpen::Direct { keep: false },
            _ => KernelOpen::PageCache { keep: false },
        };
        Ok((self.getattr(ino)?, fh, kernel))
    }

    /// Opens a file; `truncate` empties it (O_TRUNC); `write` if opened for writing.
    pub async fn open(self: &Arc<Self>, ino: Ino, truncate: bool, write: bool) -> Result<u64> {
        self.open_keeping_cache(ino, truncate, write).await.map(|(fh, _)| fh)
    }

    /// Like [`VaultFs::open`], also saying whether the kernel may keep the pages
    /// it cached for this file: yes while the content is the version we had, no
    /// once it changed on the server (then the pages are stale).
    pub async fn open_keeping_cache(
        self: &Arc<Self>,
        ino: Ino,
        truncate: bool,
        write: bool,
    ) -> Result<(u64, bool)> {
        let how = OpenHow { read: true, write, truncate, direct: false };
        let (fh, kernel) = self.open_for_kernel(ino, how).await?;
        Ok((fh, matches!(kernel, KernelOpen::PageCache { keep: true } | KernelOpen::Direct { keep: true })))
    }

    /// Opens a file as `how` asks, also saying what the kernel may do with
    /// the handle: keep the pages it cached (while the content is the
    /// version they came from), read with direct I/O, or read from a backing
    /// file in memory (super::backing).
    pub async fn open_for_kernel(self: &Arc<Self>, ino: Ino, how: OpenHow) -> Result<(u64, KernelOpen)> {
        let (truncate, write) = (how.truncate, how.write);
        self.not_a_link(ino)?;
        if write || truncate {
            self.writable(ino)?;
        }
        self.settle_stream(ino).await;
        let mut info = self.file_info(ino)?;
        let cached = self.cache.peek(info.id).is_some_and(|h| h.try_lock().map_or(true, |d| d.loaded));
        if !write && !truncate && self.passes_through(ino)? && !cached {
            // Above the end-to-end limit: read in ranges from the server, never
            // whole. Asked first which version the server has (unless it said so
            // just now): the listing may be two seconds old, and the kernel may
            // keep the pages it cached only while the version is the one they
            // came from.
            let known = self.modes.pass_confirmed(info.id);
            let recent = known.is_some_and(|(v, at)| v == info.version && at.elapsed() < self.confirmed_for);
            if self.feed_vouches(info.vault) {
                // The live feed says the tree's version is the server's.
                self.modes.set_pass_confirmed(info.id, Some((info.version, Instant::now())));
            } else if !recent {
                let asked = Instant::now();
                info = self.fetch_file(&info).await?;
                self.take_server_info(ino, info.clone());
                self.modes.set_pass_confirmed(info.id, Some((info.version, asked)));
            }
            if self.passes_through(ino)? {
                let reader = match self.file_state_by_id(info.id)?.1 {
                    FileMeta::Sealed(m) => {
                        self.refuse_stale(info.id, m.generation)?;
                        self.note_generation(info.id, m.generation);
                        let crypto::ContentMode::Plain(tags) = &m.mode else {
                            return Err(FsError::Io("not a pass-through file".into()));
                        };
                        PassRead::new(info.id, m.length, m.content_generation, Some(tags.verifier()))
                    }
                    _ => PassRead::new(info.id, info.size, 0, None),
                };
                let keep = known.is_some_and(|(v, _)| v == info.version);
                let plain = self.cache.pin(info.id);
                let mode = HandleMode::PassRead(Arc::new(tokio::sync::Mutex::new(reader)));
                // Another handle may still read the end-to-end version from a
                // backing file, which this one must then name.
                return self.name_backing(info.id, mode, KernelWish::PageCache, keep, &plain).await;
            }
        }
        // Opened any other way, the kernel's pages are checked by what follows.
        self.modes.set_pass_confirmed(info.id, None);
        if truncate {
            self.modes.start_sequential(info.id);
        }
        let handle = self.cache.pin(info.id);
        let result = async {
            let mut d = handle.lock().await;
            if truncate {
                if !d.loaded || !d.bytes.is_empty() || info.size > 0 {
                    d.edited();
                }
                self.cancel_fill(info.id, &mut d);
                d.bytes = SecretBuf::new();
                self.follow_in_backing(info.id, Change::Length(0));
                d.loaded = true;
                d.version = d.version.max(info.version);
                if d.dirty {
                    self.modes.note_change(info.id, 0);
                }
                return Ok(false);
            }
            if d.dirty {
                return Ok(true);
            }
            // Is what we hold (or are downloading) still the server's current
            // version? Not asked again soon after its last answer (CONFIRMED_FOR).
            if d.loaded || d.filling {
                let recent = d.version == info.version
                    && (d.confirmed.is_some_and(|t| t.elapsed() < self.confirmed_for)
                        || self.feed_vouches(info.vault));
                if !recent {
                    let asked = Instant::now();
                    info = self.fetch_file(&info).await?;
                    self.take_server_info(ino, info.clone());
                    if d.version == info.version {
                        d.confirmed = Some(asked);
                    }
                }
                if d.version == info.version {
                    let loaded = d.loaded;
                    drop(d);
                    if !loaded {
                        drop(self.ready(info.id, &handle, Some(0)).await?);
                    }
                    return Ok(true);
                }
                // Stale: download it again.
                self.cancel_fill(info.id, &mut d);
                d.loaded = false;
            }
            drop(d);
            // Returns once the header is authenticated; reads wait for their chunks.
            self.ready(info.id, &handle, Some(0)).await.map(|_| false)
        }
        .await;
        let opened = match result {
            Ok(keep) => self.open_handle(info.id, how, keep, &handle).await,
            Err(e) => Err(e),
        };
        match opened {
            Ok(opened) => {
                if let Ok(d) = handle.try_lock() {
                    if d.loaded {
                        self.cache.account(info.id, d.bytes.len());
                    }
                }
                Ok(opened)
            }
            Err(e) => {
                self.cache.unpin(Some(info.id), &handle);
                Err(e)
            }
        }
    }

    /// Whether a file's content is passed through (not end-to-end) and not
    /// empty, by its manifest (by the server's word for a legacy file):
    /// then it is read in ranges, never held whole.
    pub(super) fn passes_through(&self, ino: Ino) -> Result<bool> {
        Ok(match self.tree.lock().file(ino)? {
            (_, FileMeta::Sealed(m)) => !m.is_e2e() && m.length > 0,
            (info, _) => !info.e2e && info.size > 0,
        })
    }
}
