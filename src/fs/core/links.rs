//! Symbolic links: a link is a file of its record with no content, whose
//! manifest holds the target (docs/FORMAT.md "File manifests", mode 03), so
//! the server stores an empty file and learns nothing of where it points: it
//! can tell a link by its manifest's length, which gives the target's length
//! in 64-byte steps.
//!
//! Data flow. `symlink` seals a link manifest and creates the file with it
//! (super::namespace `new_entry`); listings open it like any manifest, and the
//! tree shows the file as [`super::Kind::Symlink`]; `readlink` returns the
//! target from the tree without asking the server. Renames within a record
//! reseal the name (super::rename, as for any file); a move to another record
//! creates the link there and deletes the old one. The kernel resolves links
//! itself (a target outside the mount is followed like on any filesystem), so
//! no open, read or write reaches a link.

use std::ffi::OsStr;
use std::sync::Arc;

use super::tree::{check_name, FileMeta, Node};
use super::{Attr, FsError, Ino, Result, VaultFs};
use crate::crypto::manifest::LinkTarget;
use crate::crypto::FileManifest;
use crate::protocol::FileInfo;
use crate::remote::Remote;

impl<R: Remote> VaultFs<R> {
    /// Creates symbolic link `name` in record `parent`, pointing at `target`
    /// (stored as written: relative or absolute, inside the mount or not).
    pub async fn symlink(&self, parent: Ino, name: &OsStr, target: &[u8]) -> Result<Attr> {
        check_name(name)?;
        let target = LinkTarget::new(target).map_err(|_| {
            if target.is_empty() {
                FsError::NotFound
            } else {
                FsError::NameTooLong
            }
        })?;
        self.load_dir(parent).await?;
        self.writable(parent)?;
        if self.tree.lock().child(parent, name).is_some() {
            return Err(FsError::Exists);
        }
        let (vault, _) = self.file_parent(parent)?;
        if !self.account.manifests_required(vault) {
            // There the server could strip a link's manifest and serve it
            // as a file of its choosing.
            return Err(FsError::NotPermitted(
                "symbolic links need a vault whose files all have manifests: run `vaultfs vault migrate`"
                    .into(),
            ));
        }
        let (ino, _) = self.new_entry(parent, name, &FileManifest::new_link(1, target)).await?;
        self.getattr(ino)
    }

    /// The target of symbolic link `ino` (EINVAL if it is not a link; EIO
    /// if its manifest is older than one this machine saw: a rollback).
    pub fn readlink(&self, ino: Ino) -> Result<Vec<u8>> {
        match self.tree.lock().node(ino)? {
            Node::File { info, meta: FileMeta::Sealed(m), .. } => match &m.mode {
                crate::crypto::ContentMode::Link(target) => {
                    self.refuse_stale(info.id, m.generation)?;
                    // Read: remembered, as a file's content is when read.
                    self.note_generation(info.id, m.generation);
                    Ok(target.as_bytes().to_vec())
                }
                _ => Err(FsError::Invalid("not a symbolic link".into())),
            },
            Node::File { meta: FileMeta::Invalid, .. } => {
                Err(FsError::Io("the file's manifest failed its check".into()))
            }
            _ => Err(FsError::Invalid("not a symbolic link".into())),
        }
    }

    /// Refuses to use link `ino` as a file (open, truncate): the kernel
    /// resolves links before such calls, so only a caller of the core gets here.
    pub(super) fn not_a_link(&self, ino: Ino) -> Result<()> {
        match self.tree.lock().file(ino) {
            Ok((_, meta)) if meta.manifest().is_some_and(|m| m.is_link()) => {
                Err(FsError::Invalid("a symbolic link is not opened or truncated".into()))
            }
            _ => Ok(()),
        }
    }

    /// Moves link `ino` to another record: made anew there (its manifest is
    /// bound to its record), then the old one deleted.
    pub(super) async fn move_link(
        self: &Arc<Self>,
        ino: Ino,
        info: &FileInfo,
        new_parent: Ino,
        new_name: &OsStr,
    ) -> Result<()> {
        let mode = self.tree.lock().file(ino)?.1.manifest().map(|m| m.mode.clone());
        let Some(crate::crypto::ContentMode::Link(target)) = mode else {
            return Err(FsError::Invalid("not a symbolic link".into()));
        };
        let (new_ino, created) =
            self.new_entry(new_parent, new_name, &FileManifest::new_link(1, target)).await?;
        let fate = self.delete_moved_source(info).await;
        let node = self.file_node(created.clone(), new_parent);
        {
            let mut tree = self.tree.lock();
            tree.rekey_file(ino, info.id, created.id, new_ino);
            tree.place(new_parent, new_name, ino, node);
        }
        self.after_move(info.clone(), fate).await;
        Ok(())
    }
}
