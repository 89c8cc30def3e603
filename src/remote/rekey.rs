//! Re-encrypting a vault under its newest key (`vaultfs vault rekey`).
//!
//! Data flow. After a member is removed the vault's key rotates
//! (super::sharing), but what was sealed before stays under the older keys,
//! which the removed member may have kept. Rekeying walks the vault's records
//! and files: record titles and fields and file names are sealed afresh under
//! the current key; an end-to-end file is downloaded whole, decrypted and
//! encrypted again (one file in memory at a time) and uploaded as the next
//! generation with a new manifest, if the file is still at the version read;
//! a pass-through file (never encrypted) only gets its manifest sealed afresh.
//! What is already under the current key is skipped, so an interrupted run
//! resumes where it stopped; a file changed meanwhile is left for the next run.
//!
//! A rekey seals what the server serves at a new generation, so it must not
//! take a replay for the current state: given what this machine remembers
//! ([`Generations`]), a file whose manifest is older than a generation seen
//! is left alone, and every generation written is remembered.

use futures_util::stream;

use super::account::{AccountError, Unlocked};
use super::{collect, Remote, RemoteError, UploadBody};
use crate::crypto::manifest::manifest_key_id;
use crate::crypto::names::name_key_id;
use crate::crypto::{self, ContentMode, FileContext, FileManifest, KeyId, NameContext, OsRandom, VaultKey};
use crate::ids::{FileId, VaultId};
use crate::protocol::{FileInfo, FileUpdate, RecordUpdate, Sealed};

/// What a rekey did.
#[derive(Debug, Default)]
pub struct Rekeyed {
    /// Records whose title or fields were sealed afresh.
    pub records: usize,
    /// End-to-end files encrypted again.
    pub reencrypted: usize,
    /// Files whose manifest or name only was sealed afresh.
    pub resealed: usize,
    /// Files already under the current key.
    pub current: usize,
    /// Files left alone, with why (run again for those that changed meanwhile).
    pub skipped: Vec<String>,
}

/// What this machine remembers of files' generations (the mount's freshness
/// state), for a rekey: the newest seen of a file, and a note of one written.
pub struct Generations<'a> {
    /// The newest generation seen of a file (0: none).
    pub seen: &'a (dyn Fn(FileId) -> u64 + Send + Sync),
    /// A generation this rekey wrote.
    pub wrote: &'a (dyn Fn(FileId, u64) + Send + Sync),
}

impl Generations<'static> {
    /// Nothing remembered (tests, and a machine without a state file).
    pub fn none() -> Self {
        Generations { seen: &|_| 0, wrote: &|_, _| {} }
    }
}

impl<R: Remote> Unlocked<R> {
    /// Seals everything of `vault` that is under an older key afresh under the
    /// current one; `progress(done, total)` is called after each file.
    pub async fn rekey_vault(
        &self,
        vault: VaultId,
        progress: impl FnMut(usize, usize),
    ) -> Result<Rekeyed, AccountError> {
        self.rekey_vault_checked(vault, &Generations::none(), progress).await
    }

    /// [`Unlocked::rekey_vault`], refusing manifests older than `generations`
    /// remembers and noting the generations written there.
    pub async fn rekey_vault_checked(
        &self,
        vault: VaultId,
        generations: &Generations<'_>,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Rekeyed, AccountError> {
        let (records, files) = tokio::try_join!(self.remote.records(vault), self.remote.files(vault))?;
        // Never under a key older than one the vault is seen using.
        self.note_keys_in_use(vault, super::keys_in_use::opened_in(self, vault, &records, &files));
        let current = self.sealing_key(vault)?;
        let mut report = Rekeyed::default();
        for r in records {
            let title_ctx = NameContext::RecordTitle { vault, record: r.id };
            let fields_ctx = NameContext::RecordFields { vault, record: r.id };
            let title = self.reseal(vault, &current, title_ctx, &r.title)?;
            let fields = self.reseal(vault, &current, fields_ctx, &r.fields)?;
            if title.is_some() || fields.is_some() {
                let update = RecordUpdate { title, fields, parent: None };
                match self.remote.update_record(r.id, r.version, update).await {
                    Ok(_) => report.records += 1,
                    Err(RemoteError::Conflict { .. }) => {
                        report.skipped.push(format!("record {}: changed meanwhile; run again", r.id))
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
        let total = files.len();
        for (done, f) in files.into_iter().enumerate() {
            match self.rekey_file(&current, &f, generations).await {
                Ok(Some(true)) => report.reencrypted += 1,
                Ok(Some(false)) => report.resealed += 1,
                Ok(None) => report.current += 1,
                Err(Skip(why)) => report.skipped.push(format!("file {}: {why}", f.id)),
            }
            progress(done + 1, total);
        }
        Ok(report)
    }

    /// `sealed` opened with its own key and sealed under `current`, if it is
    /// under another key (`None`: already current, or empty).
    fn reseal(
        &self,
        vault: VaultId,
        current: &VaultKey,
        ctx: NameContext,
        sealed: &Sealed,
    ) -> Result<Option<Sealed>, AccountError> {
        if sealed.0.is_empty() {
            return Ok(None);
        }
        let id = name_key_id(&sealed.0)?;
        if id == current.id() {
            return Ok(None);
        }
        let key = self.vault_key(vault, id).ok_or(AccountError::NoKey(vault))?;
        let plain = crypto::open_name(&key, &ctx, &sealed.0)?;
        Ok(Some(Sealed(crypto::seal_name(current, &ctx, &plain, &mut OsRandom)?)))
    }

    /// One file: `Some(true)` re-encrypted, `Some(false)` resealed only,
    /// `None` already current.
    async fn rekey_file(
        &self,
        current: &VaultKey,
        f: &FileInfo,
        generations: &Generations<'_>,
    ) -> Result<Option<bool>, Skip> {
        let skip = |e: &dyn std::fmt::Display| Skip(e.to_string());
        if f.meta.0.is_empty() {
            return Err(Skip("no manifest: run `vaultfs vault migrate` first".into()));
        }
        let ctx = FileContext { vault: f.vault, record: f.record, file: f.id };
        let name_ctx = NameContext::FileName { vault: f.vault, record: f.record, file: f.id };
        let name = self.reseal(f.vault, current, name_ctx, &f.name).map_err(|e| skip(&e))?;
        let meta_key: KeyId = manifest_key_id(&f.meta.0).map_err(|e| skip(&e))?;
        if meta_key == current.id() {
            if name.is_none() {
                return Ok(None);
            }
            let update = FileUpdate { name, ..Default::default() };
            self.remote.update_file(f.id, f.version, update).await.map_err(|e| changed(&e))?;
            return Ok(Some(false));
        }
        let old =
            self.vault_key(f.vault, meta_key).ok_or_else(|| Skip("its manifest's key is not held".into()))?;
        let manifest = crypto::open_manifest(&old, &ctx, &f.meta.0).map_err(|e| skip(&e))?;
        if manifest.generation < (generations.seen)(f.id) {
            return Err(Skip(
                "its manifest is older than a version this machine saw (a replay by the server?)".into(),
            ));
        }
        // Stored end-to-end content is encrypted again, even an empty file's
        // (its header names the old key too).
        let reencrypt = manifest.is_e2e() && f.size > 0;
        if !reencrypt {
            // Pass-through content is not encrypted, and a file never
            // uploaded has none: only the manifest is sealed afresh.
            let meta =
                crypto::seal_manifest(current, &ctx, &manifest, &mut OsRandom).map_err(|e| skip(&e))?;
            let update = FileUpdate { name, meta: Some(Sealed(meta)), ..Default::default() };
            self.remote.update_file(f.id, f.version, update).await.map_err(|e| changed(&e))?;
            return Ok(Some(false));
        }
        let content = self.remote.download(f.id, None).await.map_err(|e| skip(&e))?;
        let blob = collect(content.stream).await.map_err(|e| skip(&e))?;
        let header = crypto::peek_header(&blob).map_err(|e| skip(&e))?;
        if manifest.mode != (ContentMode::EndToEnd { upload: header.upload_id }) {
            return Err(Skip("its content is not the upload its manifest names".into()));
        }
        let key = self
            .vault_key(f.vault, header.key_id)
            .ok_or_else(|| Skip("its header's key is not held".into()))?;
        let (_, plain) =
            crypto::decrypt_file(&blob, &key, &ctx, manifest.content_generation).map_err(|e| skip(&e))?;
        drop(blob);
        let generation = manifest.generation.max((generations.seen)(f.id)) + 1;
        let sealed =
            crypto::encrypt_file(current, &ctx, generation, &plain, &mut OsRandom).map_err(|e| skip(&e))?;
        drop(plain);
        let upload = crypto::peek_header(&sealed).map_err(|e| skip(&e))?.upload_id;
        let next =
            FileManifest::new(generation, manifest.length, ContentMode::EndToEnd { upload }, manifest.perm);
        let meta = crypto::seal_manifest(current, &ctx, &next, &mut OsRandom).map_err(|e| skip(&e))?;
        let len = sealed.len() as u64;
        let body = UploadBody {
            len: Some(len),
            stream: Box::pin(stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from(sealed))])),
            conflict_copy: None,
            meta: Some(Sealed(meta)),
        };
        let done = self
            .remote
            .upload(f.id, f.version, true, Some(f.mtime_ms), body)
            .await
            .map_err(|e| changed(&e))?;
        (generations.wrote)(f.id, generation);
        if let Some(name) = name {
            let update = FileUpdate { name: Some(name), ..Default::default() };
            self.remote.update_file(f.id, done.version, update).await.map_err(|e| changed(&e))?;
        }
        Ok(Some(true))
    }
}

/// Why a file was left alone.
struct Skip(String);

fn changed(e: &RemoteError) -> Skip {
    match e {
        RemoteError::Conflict { .. } => Skip("changed meanwhile; run again".into()),
        e => Skip(e.to_string()),
    }
}
