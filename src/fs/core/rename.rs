//! Removing and moving files and records: unlink, and rename within a vault.
//!
//! Data flow. The server is asked first, with the version this mount knows;
//! the tree follows only once it agreed (a move, once its copy is stored),
//! but for an unlinked file no handle
//! holds open: it goes from the tree at once and from the server in the
//! background (super::deletes). A file unlinked while open stays
//! readable and writable through its handles (POSIX) as an orphan in the
//! tree, and nothing of it is uploaded. Renaming within a record reseals the
//! name; moving a file to another record writes it anew there (its content is
//! bound to its record) and deletes the old one, so a reader sees the old
//! file or the complete new one, never a half; the new file takes over the
//! old inode, and open handles and cached data follow. The file a move
//! copied is deleted at the version it copied: changed elsewhere meanwhile,
//! it stays. A move that fails deletes the copy it made.
//!
//! What a rename replaces goes only once the server made the rename (the
//! server cannot tell two sealed names apart, so the client deletes the
//! one replaced), as unlink and rmdir take it, but deleted on the server
//! before rename returns (in the background if it cannot be then): a rename
//! that fails there replaces nothing, and whoever lists once it returned
//! sees one name. Not so for a replaced file still open that the server
//! must keep until its last close (read in ranges, or streamed), nor for a
//! directory holding one: that directory is deleted first, as rmdir asks
//! the server. Across vaults rename fails with EXDEV, so `mv` copies and
//! deletes instead.

use std::ffi::OsStr;
use std::sync::Arc;

use super::save::bump_cached_version;
use super::tree::{check_name, Key, Node};
use super::{check_file_answer, FsError, Ino, Result, VaultFs};
use crate::crypto::NameContext;
use crate::protocol::{ms_of, FileInfo, FileUpdate, ParentChange, RecordInfo, RecordUpdate};
use crate::remote::{Remote, RemoteError};

/// What became of the file a move copied from.
pub(super) enum SourceFate {
    /// Deleted on the server.
    Gone,
    /// Changed elsewhere meanwhile: kept, with that change (the move did not
    /// copy it).
    Kept,
    /// The server could not be asked: to be deleted in the background.
    Later,
}

/// Where a rename goes: the directory, the name, the directory's node, and
/// the entry it replaces there, if any.
struct Destination<'a> {
    parent: Ino,
    name: &'a OsStr,
    node: Node,
    replaces: Option<(Ino, Option<Node>)>,
}

impl<R: Remote> VaultFs<R> {
    /// Removes a file. One no handle holds open is gone from the mount when
    /// this returns, and deleted on the server in the background (super::deletes).
    pub async fn unlink(self: &Arc<Self>, parent: Ino, name: &OsStr) -> Result<()> {
        self.load_dir(parent).await?;
        self.deletable(parent)?;
        let (ino, info) = {
            let tree = self.tree.lock();
            let ino = tree.child(parent, name).ok_or(FsError::NotFound)?;
            match tree.node(ino)? {
                Node::File { info, .. } => (ino, info.clone()),
                _ => return Err(FsError::IsDir),
            }
        };
        self.remove_file(ino, info, false).await?;
        self.touch_dir(parent);
        Ok(())
    }

    /// Takes file `ino` out of the tree, and off the server: one no handle
    /// holds open in the background (super::deletes), or first tried `now`.
    /// Open handles keep
    /// reading and writing until they close (POSIX). A file read from the
    /// server in ranges, or being streamed to it, needs the server's copy
    /// until then: it is deleted at the last close instead (super::save
    /// `release`).
    async fn remove_file(self: &Arc<Self>, ino: Ino, info: FileInfo, now: bool) -> Result<()> {
        let open = self.handles.is_open(info.id);
        if self.forget_unsent(ino, info.id, open).await? {
            // Never saved: nothing to delete on the server.
        } else if !open {
            let info = self.file_info(ino).unwrap_or(info.clone());
            self.tree.lock().unlink_deleting(ino, &info);
            if now {
                self.delete_file_now(info).await;
            } else {
                self.delete_in_background(info);
            }
        } else {
            let keep = self.modes.is_streaming(info.id) || self.passes_through(ino)?;
            if !keep {
                self.delete_file(&self.file_info(ino).unwrap_or(info.clone())).await?;
            }
            self.tree.lock().unlink(ino, open, keep);
        }
        if open {
            return Ok(());
        }
        self.forget_content(info.id);
        Ok(())
    }

    pub(super) async fn delete_file(&self, info: &FileInfo) -> Result<()> {
        match self.remote().delete_file(info.id, info.version).await {
            Err(RemoteError::Conflict { .. }) => {
                // Changed meanwhile (renamed, touched): unlink removes it regardless.
                let fresh = self.fetch_file(info).await?;
                Ok(self.remote().delete_file(info.id, fresh.version).await?)
            }
            other => Ok(other?),
        }
    }

    /// Renames or moves within a vault; across vaults it fails with EXDEV so that
    /// `mv` copies and deletes instead.
    pub async fn rename(
        self: &Arc<Self>,
        parent: Ino,
        name: &OsStr,
        new_parent: Ino,
        new_name: &OsStr,
    ) -> Result<()> {
        self.rename_entry(parent, name, new_parent, new_name).await?;
        self.touch_dir(parent);
        self.touch_dir(new_parent);
        Ok(())
    }

    async fn rename_entry(
        self: &Arc<Self>,
        parent: Ino,
        name: &OsStr,
        new_parent: Ino,
        new_name: &OsStr,
    ) -> Result<()> {
        check_name(new_name)?;
        self.load_dir(parent).await?;
        self.load_dir(new_parent).await?;
        self.writable(parent)?;
        self.writable(new_parent)?;
        let look = || {
            let tree = self.tree.lock();
            let ino = tree.child(parent, name).ok_or(FsError::NotFound)?;
            let node = tree.node(ino)?.clone();
            let target = tree.child(new_parent, new_name).map(|t| (t, tree.node_unchecked(t).cloned()));
            Ok::<_, FsError>((ino, node, target, tree.node(new_parent)?.clone()))
        };
        let (ino, node, target, _) = look()?;
        if node.vault().is_some() && node.vault() == self.tree.lock().node(new_parent)?.vault() {
            // What the server would refuse is refused before anything is sent.
            match (&node, &target) {
                (Node::Record { .. }, Some((t, Some(Node::Record { .. }))))
                    if *t != ino && !self.tree.lock().is_empty_dir(*t) =>
                {
                    return Err(FsError::NotEmpty)
                }
                (Node::Record { .. }, Some((_, Some(Node::Record { .. })))) => {}
                (Node::Record { .. }, Some((t, Some(_)))) if *t != ino => return Err(FsError::NotDir),
                (Node::File { .. }, Some((_, Some(Node::Record { .. })))) => return Err(FsError::IsDir),
                _ => {}
            }
            // An empty directory it replaces that was never sent goes here
            // only, if what replaces it moves here only too (else it is
            // sent, and replaced on the server: a failure there keeps it).
            let local = self.tree.lock().is_unsent(ino);
            if let (Node::Record { .. }, Some((t, Some(Node::Record { .. }))), true) = (&node, &target, local)
            {
                if *t != ino && self.forget_unsent_record(*t).await? {
                    self.touch_dir(new_parent);
                }
            }
            // A directory made here and not sent yet moves here only, with
            // what is in it (none of which is sent either).
            if matches!(node, Node::Record { .. })
                && self.rename_unsent_record(ino, new_parent, new_name).await?
            {
                return Ok(());
            }
            // The server is asked: the records it is asked about must be
            // there (super::dirs), and are then looked at again with their
            // versions.
            let mut send = vec![new_parent];
            if matches!(node, Node::Record { .. }) {
                send.push(ino);
            }
            if let Some((t, Some(Node::Record { .. }))) = target {
                send.push(t);
            }
            for record in send {
                self.record_on_server(record).await?;
            }
        }
        let (ino, node, target, dest) = look()?;
        if node.vault() != dest.vault() {
            return Err(match dest {
                Node::Root => FsError::NotPermitted("vaults are top-level only".into()),
                _ => FsError::CrossDevice,
            });
        }
        if target.as_ref().is_some_and(|(t, _)| *t == ino) {
            return Ok(());
        }
        let to = Destination { parent: new_parent, name: new_name, node: dest, replaces: target };
        match node {
            Node::Root | Node::Vault { .. } => {
                Err(FsError::NotPermitted("vaults are renamed with the CLI".into()))
            }
            Node::Record { info, .. } => self.rename_record(ino, &info, parent, to).await,
            Node::File { .. } => self.rename_file(ino, to).await,
        }
    }

    /// Renames record `ino` and/or moves it under another record of its
    /// vault. An empty record it replaces goes (as rmdir takes it) once the
    /// server made the move: a move that fails there leaves it.
    async fn rename_record(
        self: &Arc<Self>,
        ino: Ino,
        info: &RecordInfo,
        parent: Ino,
        to: Destination<'_>,
    ) -> Result<()> {
        let new_record_parent = match &to.node {
            Node::Vault { .. } => None,
            Node::Record { info: p, .. } => Some(p.id),
            _ => return Err(FsError::NotDir),
        };
        let replaced = match to.replaces {
            Some((t, Some(Node::Record { info: tinfo, .. }))) => {
                // rename(2) replaces an empty directory.
                if !self.tree.lock().is_empty_dir(t) {
                    return Err(FsError::NotEmpty);
                }
                if self.tree.lock().holds_orphans_on_server(t) {
                    // A file unlinked from it while open keeps it on the
                    // server until its last close: the server's answer (not
                    // empty) is the one to give, before anything moves (as
                    // rmdir asks it), once what was removed from it is gone.
                    let settled = self.deletes_settled(Some(tinfo.id));
                    let _ = tokio::time::timeout(super::deletes::RMDIR_WAIT, settled).await;
                    self.remote().delete_record(tinfo.id, tinfo.version).await?;
                    self.tree.lock().remove(t);
                    None
                } else {
                    Some((t, tinfo))
                }
            }
            Some(_) => return Err(FsError::NotDir),
            None => None,
        };
        let ctx = NameContext::RecordTitle { vault: info.vault, record: info.id };
        let update = RecordUpdate {
            title: Some(self.seal(info.vault, ctx, to.name)?),
            fields: None,
            parent: (to.parent != parent).then_some(ParentChange { to: new_record_parent }),
        };
        let updated = self.remote().update_record(info.id, info.version, update).await?;
        if updated.id != info.id || updated.vault != info.vault {
            return Err(FsError::Io("the server answered for another record".into()));
        }
        let replaced = {
            let mut tree = self.tree.lock();
            tree.place(to.parent, to.name, ino, Node::Record { info: updated, parent: to.parent });
            replaced.inspect(|(t, _)| tree.rmdir_deleting(*t))
        };
        if let Some((_, tinfo)) = replaced {
            // Deleted on the server before this returns, or in the
            // background if it cannot be now; if another client filled it
            // meanwhile, the server refuses, and it shows again
            // (super::deletes).
            self.delete_record_now(tinfo).await;
        }
        Ok(())
    }

    /// Renames file `ino` in its record, or moves it to another.
    async fn rename_file(self: &Arc<Self>, ino: Ino, to: Destination<'_>) -> Result<()> {
        let (_, new_record) = self.file_parent(to.parent)?;
        // The server is asked to rename it: it must have it.
        self.ensure_on_server(ino).await?;
        let info = &self.file_info(ino)?;
        // rename(2) replaces the target. It goes (as unlink takes it) once
        // this file has its name on the server: a rename that fails there
        // leaves it, on the server and here.
        let replaced = match to.replaces {
            Some((t, Some(node @ Node::File { .. }))) => Some((t, node)),
            Some(_) => return Err(FsError::IsDir),
            None => None,
        };
        if new_record != info.record {
            let moved = if self.tree.lock().file(ino)?.1.manifest().is_some_and(|m| m.is_link()) {
                self.move_link(ino, info, to.parent, to.name).await
            } else {
                self.move_file(ino, info, to.parent, to.name).await
            };
            if let Err(e) = moved {
                // The file made for the move took the name here and is gone:
                // the name goes back to the file it was to replace, if that
                // is still where it was and nothing else took the name.
                if let Some((t, _)) = replaced {
                    let mut tree = self.tree.lock();
                    let free = tree.child(to.parent, to.name).is_none_or(|c| c == t);
                    if free && tree.parent_of(t) == Some(to.parent) {
                        if let Some(node) = tree.node_unchecked(t).cloned() {
                            tree.place(to.parent, to.name, t, node);
                        }
                    }
                }
                return Err(e);
            }
        } else {
            let ctx = NameContext::FileName { vault: info.vault, record: info.record, file: info.id };
            let update =
                FileUpdate { name: Some(self.seal(info.vault, ctx, to.name)?), ..Default::default() };
            let updated = self.remote().update_file(info.id, info.version, update).await?;
            let updated = check_file_answer(info.id, info.vault, updated)?;
            bump_cached_version(&self.cache, info.id, info.version, updated.version).await;
            let node = self.file_node(updated, to.parent);
            self.tree.lock().place(to.parent, to.name, ino, node);
        }
        if let Some((t, Node::File { info: tinfo, .. })) = replaced {
            self.replaced_file_goes(t, tinfo).await;
        }
        Ok(())
    }

    /// File `t`, which a rename just replaced on the server, goes as
    /// [`Self::remove_file`] takes it, deleted on the server now. It goes
    /// whatever the server answers (the rename is made): from the tree at
    /// once, and from the server in the background or at its last close.
    async fn replaced_file_goes(self: &Arc<Self>, t: Ino, tinfo: FileInfo) {
        let Err(e) = self.remove_file(t, tinfo.clone(), true).await else { return };
        tracing::warn!(error = %e, file = %tinfo.id, "the file a rename replaced could not be deleted on the server now; it is later");
        let info = self.file_info(t).unwrap_or(tinfo);
        let open = self.handles.is_open(info.id);
        {
            let mut tree = self.tree.lock();
            if tree.node_unchecked(t).is_none() || tree.is_orphan(t) {
                return;
            }
            if open {
                // Deleted on the server at its last close (if it is there).
                tree.unlink(t, true, true);
                return;
            }
            tree.unlink_deleting(t, &info);
        }
        self.delete_in_background(info.clone());
        self.forget_content(info.id);
    }

    /// Deletes the file a move copied from, at the version it copied (see
    /// [`SourceFate`]); listings leave it out from now on unless it is kept.
    pub(super) async fn delete_moved_source(&self, info: &FileInfo) -> SourceFate {
        match self.remote().delete_file(info.id, info.version).await {
            Ok(()) | Err(RemoteError::NotFound(_)) => SourceFate::Gone,
            Err(RemoteError::Conflict { .. }) => {
                self.moved_source_kept(info.id);
                SourceFate::Kept
            }
            Err(e) => {
                tracing::warn!(file = %info.id, error = %e, "the file a move copied from could not be deleted now; it is later");
                self.tree.lock().file_deleting(info);
                SourceFate::Later
            }
        }
    }

    /// What follows for a move's source, once nothing of this mount names
    /// it by the copy's inode (the tree, the handles and the cache follow
    /// the copy): one kept shows again where it was; one not deleted yet
    /// is, in the background, at the version copied.
    pub(super) async fn after_move(self: &Arc<Self>, source: FileInfo, fate: SourceFate) {
        match fate {
            SourceFate::Gone => {}
            SourceFate::Kept => {
                self.tree.lock().kept_on_server(source.vault, Key::File(source.id));
                let _ = self.load_vault(source.vault, true).await;
            }
            SourceFate::Later => self.delete_at_version_in_background(source),
        }
    }

    /// A move failed once file `created` (inode `new_ino`) was made for it:
    /// it goes, from the tree and from the server (now, or in the background).
    async fn made_for_failed_move(self: &Arc<Self>, new_ino: Ino, created: FileInfo) {
        self.tree.lock().unlink_deleting(new_ino, &created);
        self.delete_file_now(created).await;
    }

    /// Moves a file to another record. Content is bound to its record, so the file
    /// is written anew under the target record (new id) and the old one deleted:
    /// a reader sees the old file or the complete new one, never a half.
    async fn move_file(
        self: &Arc<Self>,
        ino: Ino,
        info: &FileInfo,
        new_parent: Ino,
        new_name: &OsStr,
    ) -> Result<()> {
        let handle = self.cache.pin(info.id);
        let result = async {
            let (mut d, _) = self.ready(info.id, &handle, None).await?;
            if !d.dirty && d.version != info.version {
                d.loaded = false; // stale: download the current version
                drop(d);
                d = self.ready(info.id, &handle, None).await?.0;
            }
            // What is copied: the bytes held, of version `d.version` (the
            // tree's may have moved on meanwhile), with any change not saved.
            let source = FileInfo { version: d.version, ..info.clone() };
            let perm = self.stated_perm(info.id)?;
            // The time shown: of the change not saved, if any, as its save would record.
            let mtime_ms = self.modes.unsaved_since(info.id).map_or(info.mtime_ms, ms_of);
            let (new_ino, created) = self.new_file(new_parent, new_name, perm).await?;
            let (done, meta) = match self.upload_whole(&created, 2, mtime_ms, &d.bytes).await {
                Ok(done) => done,
                Err(e) => {
                    // The move failed: the file made for it goes too (the
                    // file it was to replace, if any, stays; see rename_file).
                    self.made_for_failed_move(new_ino, created).await;
                    return Err(e);
                }
            };
            let mut moved = created.clone();
            moved.version = done.version;
            moved.size = done.size;
            moved.e2e = self.rules.vault(info.vault).encrypts(d.bytes.len() as u64);
            moved.mtime_ms = mtime_ms;
            moved.meta = meta;
            // The move is made once the copy is stored, whatever becomes of
            // the file it copied.
            let fate = self.delete_moved_source(&source).await;
            // The kernel keeps the old inode number for the renamed entry, so the
            // new file takes it over; open handles and cached data follow.
            let node = self.file_node(moved.clone(), new_parent);
            {
                let mut tree = self.tree.lock();
                tree.rekey_file(ino, info.id, created.id, new_ino);
                tree.place(new_parent, new_name, ino, node);
            }
            self.handles.rekey(info.id, created.id);
            // Under the plaintext lock, with the tree and the handles: a
            // release or open meanwhile finds the entry under the new id.
            self.cache.rename(info.id, created.id);
            d.version = moved.version;
            d.dirty = false;
            self.modes.forget_unsaved(info.id);
            Ok::<_, FsError>((created.id, source, fate))
        }
        .await;
        match result {
            Ok((new_id, source, fate)) => {
                self.cache.unpin(Some(new_id), &handle);
                self.after_move(source, fate).await;
                Ok(())
            }
            Err(e) => {
                self.cache.unpin(Some(info.id), &handle);
                Err(e)
            }
        }
    }
}
