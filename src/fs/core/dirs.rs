//! Records as directories: mkdir and rmdir.
//!
//! Data flow. A new record's title is sealed with the vault's key and created
//! on the server; only once the server has it does it appear in the tree.
//! Removing one takes it out of the tree at once and deletes it on the
//! server in the background (super::deletes), after the files unlinked from
//! it, with the version this mount knows: a record changed or filled
//! elsewhere meanwhile is not removed blindly (the server refuses, and it
//! shows again). One that still holds a file unlinked while open asks the
//! server first.

use std::ffi::OsStr;
use std::sync::Arc;

use super::tree::{check_name, Key, Node};
use super::{Attr, FsError, Ino, Result, VaultFs};
use crate::crypto::NameContext;
use crate::ids::RecordId;
use crate::protocol::{NewRecord, Sealed};
use crate::remote::Remote;

impl<R: Remote> VaultFs<R> {
    /// Creates a record (a directory) in a vault or record.
    pub async fn mkdir(&self, parent: Ino, name: &OsStr) -> Result<Attr> {
        check_name(name)?;
        self.load_dir(parent).await?;
        self.writable(parent)?;
        let (vault, parent_record) = {
            let tree = self.tree.lock();
            if tree.child(parent, name).is_some() {
                return Err(FsError::Exists);
            }
            match tree.node(parent)? {
                Node::Root => {
                    return Err(FsError::NotPermitted("create vaults with `vaultfs vault create`".into()))
                }
                Node::Vault { vault } => (*vault, None),
                Node::Record { info, .. } => (info.vault, Some(info.id)),
                Node::File { .. } => return Err(FsError::NotDir),
            }
        };
        let id = RecordId::random().map_err(|e| FsError::Io(e.to_string()))?;
        let title = self.seal(vault, NameContext::RecordTitle { vault, record: id }, name)?;
        let info = self
            .remote()
            .create_record(vault, NewRecord { id, parent: parent_record, title, fields: Sealed::default() })
            .await?;
        let mut tree = self.tree.lock();
        let node = Node::Record { info, parent };
        let ino = tree.add(parent, name, Key::Record(id), node.clone());
        self.touch_dir(parent);
        self.touch_dir(ino);
        Ok(self.attr_of(&tree, ino, &node))
    }

    /// Removes an empty record.
    pub async fn rmdir(self: &Arc<Self>, parent: Ino, name: &OsStr) -> Result<()> {
        self.load_dir(parent).await?;
        if self.tree.lock().node(parent)?.vault().is_some() {
            self.deletable(parent)?;
        }
        let (ino, info) = {
            let tree = self.tree.lock();
            let ino = tree.child(parent, name).ok_or(FsError::NotFound)?;
            match tree.node(ino)? {
                Node::Record { info, .. } => {
                    if !tree.is_empty_dir(ino) {
                        return Err(FsError::NotEmpty);
                    }
                    (ino, info.clone())
                }
                Node::Vault { .. } => {
                    return Err(FsError::NotPermitted("vaults are not removed through the mount".into()))
                }
                _ => return Err(FsError::NotDir),
            }
        };
        {
            // Checked again and taken out in one step: nothing is made in it
            // in between.
            let mut tree = self.tree.lock();
            if !tree.is_empty_dir(ino) {
                return Err(FsError::NotEmpty);
            }
            if !tree.holds_orphans(ino) {
                // Gone from the mount now; deleted on the server in the
                // background once what was in it is (super::deletes).
                tree.rmdir_deleting(ino);
                drop(tree);
                self.touch_dir(parent);
                self.delete_record_in_background(info);
                return Ok(());
            }
        }
        // A file unlinked while open keeps it on the server until its last
        // close: the server's answer (not empty) is the one to give. Files
        // unlinked from it are gone from the server first; not waited for
        // past RMDIR_WAIT, so a server that cannot take them answers rmdir
        // with an error, not a hang.
        let _ = tokio::time::timeout(super::deletes::RMDIR_WAIT, self.deletes_settled(Some(info.id))).await;
        self.remote().delete_record(info.id, info.version).await?;
        self.tree.lock().remove(ino);
        self.touch_dir(parent);
        Ok(())
    }
}
