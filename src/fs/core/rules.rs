//! The mount policies as they apply to each vault: read-only, deletes,
//! sizes, what is encrypted end to end, image reduction.
//!
//! Data flow. The admin's and the user's policies ([`Policy`]) are resolved
//! per vault by the vault's name when the vault list is loaded
//! (super::namespace calls [`Rules::set_vault`]); every change then asks
//! [`VaultFs::writable`] or [`VaultFs::deletable`], and every size
//! [`check_size`]. A vault not listed under a readable name gets the
//! defaults, which still include the admin's rules. The lock is a leaf.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;

use super::{FsError, Ino, Result, VaultFs};
use crate::ids::{FileId, VaultId};
use crate::policy::{Policy, VaultPolicy};
use crate::protocol::{Limits, Rights};
use crate::remote::Remote;

/// The policies, the user's limits, and what they resolve to per vault.
pub(super) struct Rules {
    policy: Policy,
    limits: Limits,
    vaults: Mutex<HashMap<VaultId, Arc<VaultPolicy>>>,
}

impl Rules {
    pub(super) fn new(policy: Policy, limits: Limits) -> Self {
        Rules { policy, limits, vaults: Mutex::new(HashMap::new()) }
    }

    /// The user's limits, as the server set them.
    pub(super) fn limits(&self) -> Limits {
        self.limits
    }

    /// The rules of a vault not (yet) listed under a readable name.
    pub(super) fn defaults(&self) -> Arc<VaultPolicy> {
        Arc::new(self.policy.vault("", &self.limits))
    }

    /// Resolves the rules of `vault`, listed as `name` (`None`: its name failed
    /// its check). `e2e_required` and `rights` are the server's word, which
    /// can only make the client refuse more: a vault shared with read rights
    /// is read-only here (EROFS, and modes without write bits), as the server
    /// would refuse the changes anyway.
    pub(super) fn set_vault(&self, vault: VaultId, name: Option<&str>, e2e_required: bool, rights: Rights) {
        let mut rules = self.policy.vault(name.unwrap_or(""), &self.limits);
        rules.e2e_required = e2e_required;
        if rights < Rights::Write {
            rules.read_only = true;
        }
        self.vaults.lock().insert(vault, Arc::new(rules));
    }

    /// The rules of `vault`.
    pub(super) fn vault(&self, vault: VaultId) -> Arc<VaultPolicy> {
        match self.vaults.lock().get(&vault) {
            Some(rules) => Arc::clone(rules),
            None => self.defaults(),
        }
    }
}

impl<R: Remote> VaultFs<R> {
    /// The resolved policy of `vault`.
    pub fn vault_policy(&self, vault: VaultId) -> Arc<VaultPolicy> {
        self.rules.vault(vault)
    }

    /// The policy of the vault `ino` is in (the defaults at the root).
    pub(super) fn policy_at(&self, ino: Ino) -> Result<Arc<VaultPolicy>> {
        let vault = self.tree.lock().node(ino)?.vault();
        Ok(match vault {
            Some(v) => self.rules.vault(v),
            None => self.rules.defaults(),
        })
    }

    /// Refuses changes in a read-only vault (EROFS); else its policy.
    pub(super) fn writable(&self, ino: Ino) -> Result<Arc<VaultPolicy>> {
        let rules = self.policy_at(ino)?;
        if rules.read_only {
            return Err(FsError::ReadOnly);
        }
        Ok(rules)
    }

    /// Refuses deletes where the policy does (EROFS or EPERM).
    pub(super) fn deletable(&self, ino: Ino) -> Result<()> {
        if !self.writable(ino)?.allow_delete {
            return Err(FsError::NotPermitted(
                "the mount policy does not allow deletes in this vault".into(),
            ));
        }
        Ok(())
    }

    /// The policy of the vault a file is in (the defaults if it was unlinked).
    pub(super) fn file_policy(&self, id: FileId) -> Arc<VaultPolicy> {
        match self.file_info_by_id(id) {
            Ok(info) => self.rules.vault(info.vault),
            Err(_) => self.rules.defaults(),
        }
    }
}

/// Refuses a file of `size` bytes where the vault's policy does: a read-only
/// vault (EROFS), or a size the vault cannot store without breaking a rule
/// (EFBIG: above the upload limit, or above the end-to-end limit where such
/// files are refused or the server marks the vault end-to-end only, or within
/// the policy's end-to-end limit but above the server's: never plaintext).
pub(super) fn check_size(rules: &VaultPolicy, size: u64) -> Result<()> {
    if rules.read_only {
        return Err(FsError::ReadOnly);
    }
    rules.check_size(size).map_err(|why| FsError::TooBig(why.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::PolicyFile;

    /// What the server says of a vault (its rights, end-to-end only) can
    /// only make the client refuse more: rights above read never lift the
    /// admin's read-only, and "not end-to-end only" never turns a size the
    /// policy encrypts into plaintext.
    #[test]
    fn the_servers_word_only_restricts() {
        let admin = "[vaults.Ro]\nread_only = true\n[defaults]\ne2e_limit = 1000\n";
        let policy = Policy {
            admin: PolicyFile::parse(std::path::Path::new("admin.toml"), admin).unwrap(),
            user: PolicyFile::default(),
        };
        let rules = Rules::new(policy, Limits::DEFAULT);
        let (ro, open, shared) = (VaultId([1; 16]), VaultId([2; 16]), VaultId([3; 16]));
        rules.set_vault(ro, Some("Ro"), false, Rights::Admin);
        rules.set_vault(open, Some("Open"), false, Rights::Admin);
        rules.set_vault(shared, Some("Open"), true, Rights::Read);
        assert!(rules.vault(ro).read_only, "the server's 'admin' does not lift the policy");
        assert!(!rules.vault(open).read_only);
        assert!(rules.vault(shared).read_only, "read rights: read-only");
        // Within the policy's end-to-end limit: encrypted whatever the flag says.
        assert!(rules.vault(open).encrypts(1000) && rules.vault(shared).encrypts(1000));
        // Above it: the server's "end-to-end only" refuses instead of passing through.
        assert!(rules.vault(open).check_size(2000).is_ok());
        assert!(rules.vault(shared).check_size(2000).is_err());
    }
}
