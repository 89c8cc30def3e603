//! Giving files written before manifests a manifest (`vaultfs vault migrate`).
//!
//! A vault made by a vaultfs older than manifests holds files whose mode and
//! size only the server vouches for. Migrating one writes, for each such file,
//! the manifest its content deserves, without changing the content:
//!
//! - content that starts with a vault-file header which authenticates for
//!   this file (whatever the server's flag says) is end-to-end: its manifest
//!   states the header's generation, length and upload, after the server's
//!   length was checked against the header;
//! - anything else is pass-through content: it is downloaded once, tagged
//!   piece by piece, and its manifest states what was read.
//!
//! Each manifest goes up with the version the file was read at, so a file
//! changed meanwhile is left alone (and counted). When every file of the vault
//! has a manifest, the vault is flagged in the wallet: from then on a file
//! without one is refused, so a server can no longer strip manifests to fall
//! back to trusting itself. What the migration reads is trusted as the server
//! holds it at that moment (as on first use): tampering done before it is not
//! found by it, except where an end-to-end header fails.

use futures_util::StreamExt;

use super::account::{AccountError, Unlocked};
use super::{Remote, RemoteError};
use crate::crypto::manifest::LEGACY_PERM;
use crate::crypto::{
    self, ContentMode, FileContext, FileDecryptor, FileManifest, Layout, OsRandom, PieceTagger, HEADER_LEN,
};
use crate::ids::VaultId;
use crate::protocol::{FileInfo, FileUpdate, Sealed};

/// What migrating a vault did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Migration {
    /// Files that got a manifest, end-to-end.
    pub end_to_end: usize,
    /// Files that got a manifest, passed through.
    pub pass_through: usize,
    /// Files that had one already.
    pub had_one: usize,
    /// Files left alone: changed meanwhile, or an end-to-end header that does
    /// not authenticate (tampered, or another file's): by id, with why.
    pub skipped: Vec<String>,
    /// Whether the vault is now flagged as having manifests throughout.
    pub flagged: bool,
}

impl<R: Remote> Unlocked<R> {
    /// Gives every file of `vault` without a manifest one, then flags the
    /// vault (if none was skipped). Needs write rights in the vault.
    pub async fn migrate_vault(&mut self, vault: VaultId) -> Result<Migration, AccountError> {
        let mut report = Migration::default();
        self.list_keys_in_use(vault).await?;
        for info in self.remote.files(vault).await? {
            if !info.meta.0.is_empty() {
                report.had_one += 1;
                continue;
            }
            match self.manifest_for(&info).await {
                Ok(manifest) => {
                    let ctx = FileContext { vault: info.vault, record: info.record, file: info.id };
                    let key = self.sealing_key(vault)?;
                    let meta = crypto::seal_manifest(&key, &ctx, &manifest, &mut OsRandom)?;
                    let update = FileUpdate { meta: Some(Sealed(meta)), ..Default::default() };
                    match self.remote.update_file(info.id, info.version, update).await {
                        Ok(_) if manifest.is_e2e() => report.end_to_end += 1,
                        Ok(_) => report.pass_through += 1,
                        Err(RemoteError::Conflict { .. }) => {
                            report.skipped.push(format!("file {}: changed meanwhile; run again", info.id));
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                Err(Skip(why)) => report.skipped.push(format!("file {}: {why}", info.id)),
            }
        }
        if report.skipped.is_empty() && self.wallet_mut().require_manifests(vault) {
            self.save_wallet().await?;
        }
        report.flagged = self.wallet().manifests_required(vault);
        Ok(report)
    }

    /// The manifest a legacy file's content deserves.
    async fn manifest_for(&self, info: &FileInfo) -> Result<FileManifest, Skip> {
        let skip = |e: &dyn std::fmt::Display| Skip(e.to_string());
        let ctx = FileContext { vault: info.vault, record: info.record, file: info.id };
        // The server's version stands in for a generation where the content
        // has none, bounded as the mount bounds it.
        let generation = info.version.clamp(1, 1 << 48);
        if info.size == 0 {
            return Ok(FileManifest::new_empty(generation, LEGACY_PERM));
        }
        // End-to-end, if it opens as this file's vault file.
        if info.size >= HEADER_LEN {
            let head = self.remote.download(info.id, Some(0..HEADER_LEN)).await.map_err(|e| skip(&e))?;
            let head = super::collect(head.stream).await.map_err(|e| skip(&e))?;
            if let Ok(peeked) = crypto::peek_header(&head) {
                if let Some(key) = self.vault_key(info.vault, peeked.key_id) {
                    let dec = FileDecryptor::open(&head, &key, &ctx, 0).map_err(|e| skip(&e))?;
                    let h = dec.info();
                    if Layout::new(h.plaintext_len).map(|l| l.ciphertext_len()) != Some(info.size) {
                        return Err(Skip("its stored length does not match its header".into()));
                    }
                    let mode = ContentMode::EndToEnd { upload: h.upload_id };
                    return Ok(FileManifest::new(h.generation, h.plaintext_len, mode, LEGACY_PERM));
                }
            }
            if info.e2e {
                return Err(Skip("marked end-to-end, but it does not open as this file's".into()));
            }
        }
        // Pass-through: read once, tagged as it comes.
        let content = self.remote.download(info.id, None).await.map_err(|e| skip(&e))?;
        let mut tagger = PieceTagger::new(&mut OsRandom).map_err(|e| skip(&e))?;
        let mut stream = content.stream;
        while let Some(piece) = stream.next().await {
            tagger.update(&piece.map_err(|e| skip(&e))?).map_err(|e| skip(&e))?;
        }
        if tagger.length() != content.total_len {
            return Err(Skip("the download ended early".into()));
        }
        let length = tagger.length();
        let tags = tagger.finish().map_err(|e| skip(&e))?;
        Ok(FileManifest::new(generation, length, ContentMode::Plain(tags), LEGACY_PERM))
    }
}

/// Why a file was left without a manifest.
struct Skip(String);
