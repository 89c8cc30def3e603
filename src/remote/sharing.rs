//! Sharing a vault with other users, as the client does it.
//!
//! Data flow. Each user publishes the public half of the key pair in their
//! wallet ([`Unlocked::ensure_user_key`]). To share, an admin of the vault looks
//! up the colleague's public key, checks it against this machine's pins
//! (super::pins; the caller decides how a new or changed key is confirmed),
//! seals the vault's keyring for it (crate::crypto::share) and stores the
//! result as the colleague's `wrapped_key` with their rights. The colleague's
//! client finds the share in its vault listing, looks up the sender's public
//! key (pinned the first time it is seen, refused if it changed), opens the
//! share, checks that it only adds keys to those held and that keys it adds
//! come from an admin, and stores the new keys in the wallet
//! ([`Unlocked::accept_shares`]): the wallet is the memory of which keys a
//! vault had, across sessions and machines. Any admin rotates a vault's key
//! by adding one after those held and sharing the longer keyring with every
//! other member ([`Unlocked::unshare`]). Sharing and rotating first list the
//! vault: a client that sees it use a key it lacks seals nothing in it
//! (super::keys_in_use). The server sees public keys, names and sealed
//! shares, never a vault key.

use std::sync::Arc;

use super::account::{AccountError, Unlocked};
use super::pins::PinCheck;
use super::{Remote, RemoteError};
use crate::crypto::share::{
    open_share, seal_share, share_sender, EpochKey, Keyring, ShareContext, KEYRING_MANIFESTS_REQUIRED,
};
use crate::crypto::state::RememberedRing;
use crate::crypto::{Fingerprint, OsRandom, UserPublic};
use crate::ids::VaultId;
use crate::protocol::{Member, Rights, Sealed, VaultInfo};

/// A share opened this session.
pub struct Accepted {
    /// The share's bytes, to see whether the server now holds another one.
    blob: Vec<u8>,
    /// Who sealed it.
    pub sender: String,
    /// The vault's keys.
    pub ring: Arc<Keyring>,
}

/// A share that did not open, kept so it is not tried (and logged) again.
pub struct Refused {
    blob: Vec<u8>,
    /// The sender whose key the user has yet to confirm, and that key's fingerprint.
    waiting_for: Option<(String, Fingerprint)>,
}

/// What [`Unlocked::unshare`] did.
#[derive(Debug)]
pub struct Unshared {
    /// The epoch of the vault's new key.
    pub epoch: u32,
    /// How many remaining members got a share with it.
    pub reshared: usize,
    /// Members whose new share could not be stored, and why (share with them
    /// again with `vaultfs vault share`).
    pub not_reshared: Vec<String>,
}

/// A member of a vault as `vaultfs vault members` shows them.
#[derive(Debug, Clone)]
pub struct MemberView {
    /// User name.
    pub user: String,
    /// Their rights.
    pub rights: Rights,
    /// Their public key's fingerprint, if they published one.
    pub fingerprint: Option<Fingerprint>,
    /// How that key compares with this machine's pin.
    pub pin: Option<PinCheck>,
    /// Whether a share is stored for them.
    pub has_share: bool,
}

impl<R: Remote> Unlocked<R> {
    /// Makes the user's key pair if the wallet has none yet (the wallet is
    /// stored first, so the key is never lost) and publishes its public half
    /// unless the server already holds it. Returns the public key.
    pub async fn ensure_user_key(&mut self) -> Result<UserPublic, AccountError> {
        if self.wallet_mut().ensure_user_key(&mut OsRandom)? {
            self.save_wallet().await?;
        }
        let public =
            self.user_public().ok_or_else(|| AccountError::Refused("the wallet holds no user key".into()))?;
        match self.remote.user_key(self.user()).await {
            Ok(k) if k.public_key.0 == public.as_bytes() => return Ok(public),
            Ok(k) => tracing::warn!(
                user = self.user(),
                held = %UserPublic::from_bytes(&k.public_key.0).map_or_else(|_| "a malformed key".into(), |p| p.fingerprint().to_string()),
                "the server held another public key for this user; publishing the wallet's again"
            ),
            Err(RemoteError::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
        self.remote.put_user_key(Sealed(public.as_bytes().to_vec())).await?;
        Ok(public)
    }

    /// This user's public key, if the wallet has a key pair.
    pub fn user_public(&self) -> Option<UserPublic> {
        self.wallet().user_key().map(|k| k.public())
    }

    /// The public key the server offers for `user`, and how it compares with
    /// this machine's pin. Nothing is pinned here: see [`Unlocked::pin`].
    pub async fn colleague_key(&self, user: &str) -> Result<(UserPublic, PinCheck), AccountError> {
        let key = match self.remote.user_key(user).await {
            Ok(k) => k,
            Err(RemoteError::NotFound(_)) => {
                return Err(AccountError::Refused(format!(
                    "the server has no key for {user:?}: no such user, or they have not logged in with this \
                     version of vaultfs yet (their next login publishes it)"
                )))
            }
            Err(e) => return Err(e.into()),
        };
        let public = UserPublic::from_bytes(&key.public_key.0)?;
        let check = self.pins.lock().check(user, public.fingerprint());
        Ok((public, check))
    }

    /// Pins `fingerprint` as `user`'s key on this machine.
    pub fn pin(&self, user: &str, fingerprint: Fingerprint) -> Result<(), AccountError> {
        self.pins.lock().set(user, fingerprint)
    }

    /// Forgets `user`'s pinned key on this machine: shares they seal wait,
    /// unopened, and sharing with them asks again, until it is confirmed anew.
    pub fn unpin(&self, user: &str) -> Result<bool, AccountError> {
        self.pins.lock().remove(user)
    }

    /// Every key of `vault` this user holds, oldest first: the wallet's, or
    /// the share's opened this session when it extends them (its keys are
    /// stored in the wallet too, unless storing failed so far), with the
    /// vault's flags.
    pub(super) fn keyring_of(&self, vault: VaultId) -> Result<Keyring, AccountError> {
        let wallet = self.wallet();
        let shared = self.shared.read();
        let ring = shared.get(&vault).map(|a| &a.ring).filter(|r| extends(&wallet, vault, r));
        let keys: Vec<EpochKey> = match ring {
            Some(r) => r.keys.iter().map(|k| EpochKey { epoch: k.epoch, key: k.key.duplicate() }).collect(),
            None => wallet
                .keys_of(vault)
                .enumerate()
                .map(|(epoch, k)| EpochKey { epoch: epoch as u32, key: k.duplicate() })
                .collect(),
        };
        if keys.is_empty() {
            return Err(AccountError::NoKey(vault));
        }
        let mut flags = ring.map_or(0, |r| r.flags);
        if wallet.manifests_required(vault) {
            flags |= KEYRING_MANIFESTS_REQUIRED;
        }
        Ok(Keyring { keys, flags })
    }

    /// Shares `vault` with `user` (whose public key `to` the caller has
    /// checked against the pins) with `rights`: seals the vault's keyring for
    /// them and stores it with their membership. Also changes the rights of a
    /// member (sealing their share afresh).
    pub async fn share_vault(
        &self,
        vault: &VaultInfo,
        user: &str,
        rights: Rights,
        to: &UserPublic,
    ) -> Result<(), AccountError> {
        if vault.rights != Rights::Admin {
            return Err(AccountError::Refused(format!(
                "you have {} rights in this vault; sharing needs admin",
                vault.rights.as_str()
            )));
        }
        if user == self.user() {
            return Err(AccountError::Refused("that is you".into()));
        }
        // A keyring that lacks a key the vault uses would split the vault.
        self.list_keys_in_use(vault.id).await?;
        self.store_share(vault.id, user, rights, to).await
    }

    /// Seals `vault`'s keyring for `user` and stores it with their membership.
    async fn store_share(
        &self,
        vault: VaultId,
        user: &str,
        rights: Rights,
        to: &UserPublic,
    ) -> Result<(), AccountError> {
        self.check_not_behind(vault)?;
        let ring = self.keyring_of(vault)?;
        let me = self
            .wallet()
            .user_key()
            .map(|k| k.duplicate())
            .ok_or_else(|| AccountError::Refused("the wallet holds no user key".into()))?;
        let ctx = ShareContext { vault, sender: self.user(), recipient: user };
        let share = seal_share(&ring, &ctx, &me, to, &mut OsRandom)?;
        let member = Member { user: user.to_string(), rights, wrapped_key: Some(Sealed(share)) };
        self.remote.set_member(vault, member).await?;
        Ok(())
    }

    /// Opens the shares of `vaults` sealed for this user that this session has
    /// not opened yet (or that changed), and keeps their keyrings. A share
    /// opens only if its sender's key is one this user confirmed (pinned with
    /// `vaultfs trust` or when sharing with them): one from anyone else waits,
    /// unopened and unlisted, until the user confirms that sender's key
    /// ([`Unlocked::pending_shares`]), so a server cannot make up a colleague
    /// who shares a vault of its own making. Shares of vaults whose keys are in
    /// the wallet (made by this user) are not opened. Returns what did not
    /// open, by vault; those vaults stay as they were (unreadable if nothing
    /// else holds their keys).
    pub async fn accept_shares(&self, vaults: &[VaultInfo]) -> Vec<(VaultId, AccountError)> {
        let mut failed = Vec::new();
        for info in vaults {
            let Some(Sealed(blob)) = &info.wrapped_key else { continue };
            let opened = self.shared.read().get(&info.id).is_some_and(|a| &a.blob == blob);
            if opened {
                // Opened before: stored in the wallet unless that failed.
                if let Err(e) = self.keep_in_wallet(info.id).await {
                    failed.push((info.id, e));
                }
                continue;
            }
            if !self.worth_trying(info.id, blob) {
                continue;
            }
            match self.open_one(info.id, blob).await.and_then(|a| self.hold(info.id, a)) {
                Ok(()) => {
                    self.refused_shares.lock().remove(&info.id);
                    if let Err(e) = self.keep_in_wallet(info.id).await {
                        failed.push((info.id, e));
                    }
                }
                // An outage is not a refusal: asked again at the next listing.
                Err(AccountError::Remote(e)) => failed.push((info.id, AccountError::Remote(e))),
                Err(e) => {
                    let waiting_for = match &e {
                        AccountError::Untrusted { user, offered } => Some((user.clone(), *offered)),
                        _ => None,
                    };
                    self.refused_shares.lock().insert(info.id, Refused { blob: blob.clone(), waiting_for });
                    failed.push((info.id, e));
                }
            }
        }
        // Refusals of vaults no longer listed are forgotten. The keys of a
        // vault no longer listed stay (a listing can leave a vault out to
        // have its keys forgotten and replaced).
        self.refused_shares.lock().retain(|id, _| vaults.iter().any(|v| v.id == *id));
        failed
    }

    /// Whether to open `blob` for `vault`: not if the same share was refused
    /// already (a later listing would log it every time), unless it waited for
    /// a sender's key that the user has confirmed since.
    fn worth_trying(&self, vault: VaultId, blob: &[u8]) -> bool {
        let refused = self.refused_shares.lock();
        match refused.get(&vault) {
            Some(r) if r.blob == blob => match &r.waiting_for {
                Some((user, offered)) => self.pins.lock().check(user, *offered) == PinCheck::Pinned,
                None => false,
            },
            _ => true,
        }
    }

    /// Shares waiting for the user to confirm their sender's key: vault,
    /// sender, and the fingerprint of the key the server offers for them.
    pub fn pending_shares(&self) -> Vec<(VaultId, String, Fingerprint)> {
        let refused = self.refused_shares.lock();
        refused.iter().filter_map(|(v, r)| r.waiting_for.as_ref().map(|(u, f)| (*v, u.clone(), *f))).collect()
    }

    async fn open_one(&self, vault: VaultId, blob: &[u8]) -> Result<Accepted, AccountError> {
        let sender = share_sender(blob)?.to_string();
        let me = self
            .wallet()
            .user_key()
            .map(|k| k.duplicate())
            .ok_or_else(|| AccountError::Refused("the wallet holds no user key".into()))?;
        let (from, check) = if sender == self.user() {
            (me.public(), PinCheck::Pinned)
        } else {
            self.colleague_key(&sender).await?
        };
        match check {
            PinCheck::Pinned => {}
            PinCheck::New => {
                return Err(AccountError::Untrusted { user: sender, offered: from.fingerprint() })
            }
            PinCheck::Changed { pinned } => {
                return Err(AccountError::KeyChanged { user: sender, pinned, offered: from.fingerprint() })
            }
        }
        let ctx = ShareContext { vault, sender: &sender, recipient: self.user() };
        let ring = open_share(blob, &ctx, &me, &from)?;
        self.check_extends(vault, &ring)?;
        self.check_brings_lacking(vault, &ring)?;
        // Keys beyond those held come from an admin of the vault only (as
        // the server lists its members: what the cryptography cannot say).
        if ring.keys.len() > self.wallet().keys_of(vault).count() {
            let members = self.remote.members(vault).await?;
            if !members.iter().any(|m| m.user == sender && m.rights == Rights::Admin) {
                return Err(AccountError::Refused(format!(
                    "a share of vault {vault} from {sender}, who is not an admin of it, would add keys: refused"
                )));
            }
        }
        Ok(Accepted { blob: blob.to_vec(), sender, ring: Arc::new(ring) })
    }

    /// Stores in the wallet the keys and flags of `vault`'s share that it
    /// does not hold yet, so that later sessions (on any machine) know them
    /// and refuse a share that lacks them. The wallet held is replaced only
    /// once the server stored the new one; if that fails, the keys serve this
    /// session and storing is tried again at the next listing.
    async fn keep_in_wallet(&self, vault: VaultId) -> Result<(), AccountError> {
        let Some(ring) = self.shared.read().get(&vault).map(|a| Arc::clone(&a.ring)) else { return Ok(()) };
        // Asked at every listing: the wallet is copied only when it lacks something.
        let adds = |w: &crate::crypto::Wallet| {
            let flag = ring.manifests_required() && !w.manifests_required(vault);
            extends(w, vault, &ring) && (ring.keys.len() > w.keys_of(vault).count() || flag)
        };
        if !adds(&self.wallet()) {
            return Ok(());
        }
        let (mut copy, version) = self.wallet_copy();
        if !adds(&copy) {
            return Ok(());
        }
        let held = copy.keys_of(vault).count();
        for k in &ring.keys[held..] {
            copy.add_key(vault, k.key.duplicate())?;
        }
        if ring.manifests_required() {
            copy.require_manifests(vault);
        }
        self.store_wallet(copy, version).await.map_err(|e| {
            AccountError::Refused(format!(
                "the share of vault {vault} opened, but its keys could not be stored in the wallet ({e}): they \
                 serve this session, and storing them is tried again at the next listing"
            ))
        })
    }

    /// A keyring only grows: a share must begin with every key this client
    /// already has for the vault, in the same order (in the wallet, or from
    /// the share opened before), and keep its flags. Otherwise a server could
    /// have a user of its own making (or any member it colludes with) hand a
    /// member a vault key of its choice, which would then seal their new
    /// files and names; the wallet keeps what was accepted, so this holds
    /// across sessions and machines once the wallet is stored.
    fn check_extends(&self, vault: VaultId, ring: &Keyring) -> Result<(), AccountError> {
        let seen = self.key_memory.as_ref().and_then(|m| m.keys_seen(vault));
        let wallet = self.wallet();
        let shared = self.shared.read();
        check_grows(&wallet, shared.get(&vault).map(|a| &*a.ring), seen, vault, ring)
    }

    /// Holds an opened share for the session: checked again, under the
    /// locks, against what is held now (another listing may have taken a
    /// newer share, or stored keys, while this one was being opened).
    fn hold(&self, vault: VaultId, accepted: Accepted) -> Result<(), AccountError> {
        // Not under the locks below: it reads the keys held.
        self.check_brings_lacking(vault, &accepted.ring)?;
        let seen = self.key_memory.as_ref().and_then(|m| m.keys_seen(vault));
        let wallet = self.wallet();
        let mut shared = self.shared.write();
        check_grows(&wallet, shared.get(&vault).map(|a| &*a.ring), seen, vault, &accepted.ring)?;
        if let (Some(memory), Some(newest)) = (&self.key_memory, accepted.ring.current()) {
            memory.note_keys(vault, accepted.ring.keys.len() as u32, &newest.key);
        }
        shared.insert(vault, accepted);
        Ok(())
    }

    /// Removes `user` from `vault` and rotates the vault's key, so that what
    /// is sealed from now on (files, names) is sealed under a key they never
    /// had: the member goes on the server (404 for them from then on), a new
    /// key becomes the vault's current one in the wallet, and every remaining
    /// member (the creator too, when another admin rotates) gets a new share
    /// with it. Any admin of the vault can; every remaining member's key must
    /// be confirmed on this machine first, or nothing changes. Files sealed
    /// before stay under the older keys (readable to members, and to the
    /// removed user if they kept them) until re-encrypted.
    pub async fn unshare(&mut self, vault: &VaultInfo, user: &str) -> Result<Unshared, AccountError> {
        if vault.rights != Rights::Admin {
            return Err(AccountError::Refused(format!(
                "you have {} rights in this vault; removing a member needs admin",
                vault.rights.as_str()
            )));
        }
        // The new key goes after every key held, so every member's wallet
        // must hold those first: a share's keys are stored now if they are not
        // yet. A rotation by someone lacking a key the vault uses would fork it.
        self.list_keys_in_use(vault.id).await?;
        self.check_not_behind(vault.id)?;
        let held = self.keyring_of(vault.id)?;
        self.keep_in_wallet(vault.id).await?;
        if self.wallet().keys_of(vault.id).count() != held.keys.len() {
            return Err(AccountError::NoKey(vault.id));
        }
        if user == self.user() {
            return Err(AccountError::Refused("that is you".into()));
        }
        let members = self.remote.members(vault.id).await?;
        if !members.iter().any(|m| m.user == user) {
            return Err(AccountError::Refused(format!("{user} is not a member of this vault")));
        }
        let remaining: Vec<Member> =
            members.into_iter().filter(|m| m.user != user && m.user != self.user()).collect();
        // Every remaining member's key, confirmed, before anything changes.
        let mut keys = Vec::new();
        let mut unconfirmed = Vec::new();
        for m in &remaining {
            match self.colleague_key(&m.user).await {
                Ok((key, PinCheck::Pinned)) => keys.push((m, key)),
                Ok(_) | Err(AccountError::Refused(_)) => unconfirmed.push(m.user.clone()),
                Err(e) => return Err(e),
            }
        }
        if !unconfirmed.is_empty() {
            return Err(AccountError::Refused(format!(
                "the keys of {} are not confirmed on this machine (`vaultfs trust USER`): their new share \
                 could not be sealed, so nothing was changed",
                unconfirmed.join(", ")
            )));
        }
        // The new key goes into the wallet (stored) before anything else
        // changes: a member removed without it would keep every key.
        let new_key = crate::crypto::VaultKey::generate(&mut OsRandom)?;
        let remembered = new_key.duplicate();
        self.wallet_mut().add_key(vault.id, new_key)?;
        self.save_wallet().await?;
        if let Some(memory) = &self.key_memory {
            memory.note_keys(vault.id, self.wallet().keys_of(vault.id).count() as u32, &remembered);
        }
        self.remote.remove_member(vault.id, user).await.map_err(|e| {
            AccountError::Refused(format!(
                "a new key is stored, but {user} could not be removed ({e}), and nothing is sealed with it yet: \
                 run `vaultfs vault unshare` again"
            ))
        })?;
        let epoch = self.wallet().entries().iter().filter(|e| e.vault == vault.id).count() as u32 - 1;
        let mut not_reshared = Vec::new();
        for (m, key) in keys {
            if let Err(e) = self.store_share(vault.id, &m.user, m.rights, &key).await {
                not_reshared.push(format!("{}: {e}", m.user));
            }
        }
        Ok(Unshared { epoch, reshared: remaining.len() - not_reshared.len(), not_reshared })
    }

    /// How many of `vault`'s files are sealed under a key older than its
    /// current one (by their manifests or names), of how many. A rekey
    /// stopped between a file's upload and its name leaves the name under
    /// the older key, so names count too. A key this client lacks is not
    /// counted, but noted ([`Unlocked::keys_missing`] then says so).
    pub async fn files_under_older_keys(&self, vault: VaultId) -> Result<(usize, usize), AccountError> {
        let Some(current) = self.active_key(vault).map(|k| k.id()) else { return Ok((0, 0)) };
        let files = self.remote.files(vault).await?;
        self.note_keys_in_use(vault, super::keys_in_use::opened_in(self, vault, &[], &files));
        let older_key = |id: Option<crate::crypto::KeyId>| {
            id.is_some_and(|id| id != current && self.vault_key(vault, id).is_some())
        };
        let older = files
            .iter()
            .filter(|f| {
                older_key(crate::crypto::manifest::manifest_key_id(&f.meta.0).ok())
                    || (!f.name.0.is_empty() && older_key(crate::crypto::names::name_key_id(&f.name.0).ok()))
            })
            .count();
        Ok((older, files.len()))
    }

    /// The members of `vault` with their keys' fingerprints and pins.
    pub async fn members(&self, vault: VaultId) -> Result<Vec<MemberView>, AccountError> {
        let mut out = Vec::new();
        for m in self.remote.members(vault).await? {
            let key = match self.remote.user_key(&m.user).await {
                Ok(k) => UserPublic::from_bytes(&k.public_key.0).ok(),
                Err(RemoteError::NotFound(_)) => None,
                Err(e) => return Err(e.into()),
            };
            let fingerprint = key.map(|k| k.fingerprint());
            let pin = if m.user == self.user() {
                None
            } else {
                fingerprint.map(|f| self.pins.lock().check(&m.user, f))
            };
            out.push(MemberView {
                user: m.user,
                rights: m.rights,
                fingerprint,
                pin,
                has_share: m.wrapped_key.is_some(),
            });
        }
        Ok(out)
    }
}

/// [`grows`], and the newest key of those `ring` adds to the keys held is
/// the key its id names ([`crate::crypto::KeyId::of_secret`]): a member
/// behind on a rotation could otherwise be handed a key of someone else's
/// making, to seal with, under the id the vault's new files name. Keys before
/// the newest may have random ids (made before ids were derived): what they
/// open is checked against the listing (super::keys_in_use). A client that
/// holds no key of the vault yet has nothing to extend and takes what it is
/// given.
fn check_grows(
    wallet: &crate::crypto::Wallet,
    held: Option<&Keyring>,
    seen: Option<RememberedRing>,
    vault: VaultId,
    ring: &Keyring,
) -> Result<(), AccountError> {
    if !grows(wallet, held, seen, vault, ring) {
        return Err(AccountError::Refused(format!(
            "a share of vault {vault} lacks keys or flags this client already has for it: refused (a share can \
             only add them)"
        )));
    }
    // Only keys really held count (the machine's memory names an id, not a key).
    let holds = wallet
        .keys_of(vault)
        .count()
        .max(held.filter(|h| extends(wallet, vault, h)).map_or(0, |h| h.keys.len()));
    let adds = ring.keys.len() > holds;
    if holds > 0 && adds && ring.current().is_some_and(|k| !k.key.id_is_derived()) {
        return Err(AccountError::Refused(format!(
            "a share of vault {vault} adds a newest key whose id is not derived from it (not the key the vault's \
             new files name under that id, or a key made before ids were derived: an admin's next rotation \
             brings one that is): refused"
        )));
    }
    Ok(())
}

/// Whether `ring` keeps everything held for `vault`: it begins with the
/// wallet's keys and with those of the share held this session, in order,
/// keeps their flags, and has this machine's remembered newest key in its
/// place.
fn grows(
    wallet: &crate::crypto::Wallet,
    held: Option<&Keyring>,
    seen: Option<RememberedRing>,
    vault: VaultId,
    ring: &Keyring,
) -> bool {
    let flags_kept = !wallet.manifests_required(vault) || ring.manifests_required();
    let remembered = seen.is_none_or(|seen| {
        ring.keys.get((seen.count as usize).wrapping_sub(1)).is_some_and(|k| is_remembered(&seen, &k.key))
    });
    let share_kept = held.is_none_or(|h| {
        h.keys.len() <= ring.keys.len()
            && h.keys.iter().zip(&ring.keys).all(|(x, y)| same_key(&x.key, &y.key))
            && (ring.flags & h.flags) == h.flags
    });
    extends(wallet, vault, ring) && flags_kept && share_kept && remembered
}

/// Whether `key` is the newest key `seen` remembers: its id, and (where the
/// machine noted it) the key itself, whatever its id.
pub(super) fn is_remembered(seen: &RememberedRing, key: &crate::crypto::VaultKey) -> bool {
    key.id() == seen.newest && seen.check.is_none_or(|c| crate::crypto::KeyId::of_secret(key.secret()) == c)
}

fn same_key(a: &crate::crypto::VaultKey, b: &crate::crypto::VaultKey) -> bool {
    a.id() == b.id() && a.secret() == b.secret()
}

/// Whether `ring` begins with every key `wallet` holds for `vault`, in order.
pub(super) fn extends(wallet: &crate::crypto::Wallet, vault: VaultId, ring: &Keyring) -> bool {
    let mut keys = ring.keys.iter();
    wallet.keys_of(vault).all(|held| keys.next().is_some_and(|k| same_key(held, &k.key)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{KdfParams, UserSecret, VaultKey};
    use crate::protocol::Limits;
    use crate::remote::memory::{MemoryRemote, MemoryServer};

    const FAST: KdfParams = KdfParams { m_cost_kib: 64, t_cost: 1, p_cost: 1 };

    async fn user(server: &MemoryServer, name: &str) -> Unlocked<MemoryRemote> {
        let remote = server.add_user(name, Limits::DEFAULT).await.unwrap();
        let mut u = Unlocked::create_wallet(remote, b"pw", FAST).await.unwrap();
        u.ensure_user_key().await.unwrap();
        u
    }

    /// `who` confirms `whom`'s key (as `vaultfs trust` does).
    fn trust(who: &Unlocked<MemoryRemote>, whom: &Unlocked<MemoryRemote>) {
        who.pin(whom.user(), whom.user_public().unwrap().fingerprint()).unwrap();
    }

    /// `from` confirms `to`'s key and shares; `to` confirms `from`'s key.
    async fn share_with(
        from: &Unlocked<MemoryRemote>,
        vault: &VaultInfo,
        to: &Unlocked<MemoryRemote>,
        rights: Rights,
    ) {
        let (key, check) = from.colleague_key(to.user()).await.unwrap();
        assert_eq!(check, PinCheck::New);
        from.pin(to.user(), key.fingerprint()).unwrap();
        from.share_vault(vault, to.user(), rights, &key).await.unwrap();
        trust(to, from);
    }

    /// Alice's vault, shared with bob (write) and carol (read), who both listed it.
    async fn team(
        server: &MemoryServer,
    ) -> (Unlocked<MemoryRemote>, Unlocked<MemoryRemote>, Unlocked<MemoryRemote>, VaultInfo) {
        let mut alice = user(server, "alice").await;
        let bob = user(server, "bob").await;
        let carol = user(server, "carol").await;
        let vault = alice.create_vault("V", false).await.unwrap().info;
        share_with(&alice, &vault, &bob, Rights::Write).await;
        share_with(&alice, &vault, &carol, Rights::Read).await;
        bob.vaults().await.unwrap();
        carol.vaults().await.unwrap();
        (alice, bob, carol, vault)
    }

    fn fake_ring() -> Keyring {
        Keyring {
            keys: vec![EpochKey { epoch: 0, key: VaultKey::generate(&mut OsRandom).unwrap() }],
            flags: 0,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_shared_vault_opens_once_the_member_confirmed_the_senders_key() {
        let server = MemoryServer::new().unwrap();
        let mut alice = user(&server, "alice").await;
        let bob = user(&server, "bob").await;
        let vault = alice.create_vault("Payroll", false).await.unwrap().info;
        let (key, _) = alice.colleague_key("bob").await.unwrap();
        alice.pin("bob", key.fingerprint()).unwrap();
        alice.share_vault(&vault, "bob", Rights::Read, &key).await.unwrap();
        // Until bob confirms alice's key, the share waits, unopened.
        let listed = bob.vaults().await.unwrap();
        assert!(listed[0].name.is_none() && bob.active_key(vault.id).is_none());
        let alice_fp = alice.user_public().unwrap().fingerprint();
        assert_eq!(bob.pending_shares(), vec![(vault.id, "alice".to_string(), alice_fp)]);
        trust(&bob, &alice);
        let listed = bob.vaults().await.unwrap();
        assert!(bob.pending_shares().is_empty());
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].name.as_deref(), Some("Payroll"));
        assert_eq!(listed[0].shared_by.as_deref(), Some("alice"));
        assert_eq!(listed[0].info.rights, Rights::Read);
        let a = alice.active_key(vault.id).unwrap();
        let b = bob.active_key(vault.id).unwrap();
        assert_eq!((a.id(), a.secret()), (b.id(), b.secret()));
        assert!(bob.manifests_required(vault.id), "the flag travels with the keys");
        let members = alice.members(vault.id).await.unwrap();
        let b = members.iter().find(|m| m.user == "bob").unwrap();
        assert_eq!(b.rights, Rights::Read);
        assert_eq!(b.fingerprint, Some(bob.user_public().unwrap().fingerprint()));
        assert_eq!(b.pin, Some(PinCheck::Pinned));
        assert!(b.has_share);
        // Bob stops trusting alice's key: in his next session her share waits again.
        assert!(bob.unpin("alice").unwrap() && !bob.unpin("alice").unwrap());
        bob.shared.write().clear();
        bob.vaults().await.unwrap();
        assert_eq!(bob.pending_shares(), vec![(vault.id, "alice".to_string(), alice_fp)]);
    }

    /// The server swaps in a key pair of its own for bob: the pinned
    /// fingerprint no longer matches. And a share from a sender whose key
    /// the server swapped is refused by the receiver.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_substituted_key_is_seen_against_the_pin() {
        let server = MemoryServer::new().unwrap();
        let mut alice = user(&server, "alice").await;
        let bob = user(&server, "bob").await;
        let vault = alice.create_vault("V", false).await.unwrap().info;
        let (real, _) = alice.colleague_key("bob").await.unwrap();
        alice.pin("bob", real.fingerprint()).unwrap();
        let evil = UserSecret::generate(&mut OsRandom).unwrap().public();
        bob.remote.put_user_key(Sealed(evil.as_bytes().to_vec())).await.unwrap();
        let (offered, check) = alice.colleague_key("bob").await.unwrap();
        assert_eq!(offered, evil);
        assert_eq!(check, PinCheck::Changed { pinned: real.fingerprint() });

        alice.share_vault(&vault, "bob", Rights::Write, &real).await.unwrap();
        trust(&bob, &alice);
        let evil_alice = UserSecret::generate(&mut OsRandom).unwrap().public();
        alice.remote.put_user_key(Sealed(evil_alice.as_bytes().to_vec())).await.unwrap();
        let infos = bob.remote.vaults().await.unwrap();
        let failed = bob.accept_shares(&infos).await;
        assert!(matches!(failed.as_slice(), [(_, AccountError::KeyChanged { .. })]), "{}", failed.len());
        assert!(bob.active_key(vault.id).is_none());
    }

    /// A share the server moved to another member, or one sealed by someone
    /// else under the admin's name, does not open.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_share_moved_or_forged_by_the_server_does_not_open() {
        let server = MemoryServer::new().unwrap();
        let mut alice = user(&server, "alice").await;
        let bob = user(&server, "bob").await;
        let carol = user(&server, "carol").await;
        let vault = alice.create_vault("V", false).await.unwrap().info;
        share_with(&alice, &vault, &bob, Rights::Read).await;
        trust(&carol, &alice);
        let members = alice.remote.members(vault.id).await.unwrap();
        let bobs = members.into_iter().find(|m| m.user == "bob").unwrap();
        // The server gives bob's share to carol.
        let moved =
            Member { user: "carol".into(), rights: Rights::Read, wrapped_key: bobs.wrapped_key.clone() };
        alice.remote.set_member(vault.id, moved).await.unwrap();
        let infos = carol.remote.vaults().await.unwrap();
        assert!(matches!(carol.accept_shares(&infos).await.as_slice(), [(_, AccountError::Crypto(_))]));
        assert!(carol.active_key(vault.id).is_none());
        // A share carol seals under alice's name fails at bob's.
        let ctx = ShareContext { vault: vault.id, sender: "alice", recipient: "bob" };
        let carols = &carol.wallet().user_key().unwrap().duplicate();
        let forged =
            seal_share(&fake_ring(), &ctx, carols, &bob.user_public().unwrap(), &mut OsRandom).unwrap();
        let m = Member { user: "bob".into(), rights: Rights::Read, wrapped_key: Some(Sealed(forged)) };
        alice.remote.set_member(vault.id, m).await.unwrap();
        let infos = bob.remote.vaults().await.unwrap();
        assert!(matches!(bob.accept_shares(&infos).await.as_slice(), [(_, AccountError::Crypto(_))]));
        assert!(bob.active_key(vault.id).is_none());
    }

    /// Someone both confirmed (an insider working with the server, here
    /// mallory) seals a key of their choice for the vault's creator and for a
    /// member who holds the real keys: both refuse it (it does not begin with
    /// the keys they hold) and keep sealing with the real key, also after a
    /// listing that left the vault out (to have its keys forgotten).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_share_cannot_replace_the_keys_a_client_already_has() {
        let server = MemoryServer::new().unwrap();
        let mut alice = user(&server, "alice").await;
        let bob = user(&server, "bob").await;
        let mallory = user(&server, "mallory").await;
        let vault = alice.create_vault("V", false).await.unwrap().info;
        share_with(&alice, &vault, &bob, Rights::Write).await;
        bob.vaults().await.unwrap();
        let real = alice.active_key(vault.id).unwrap().id();
        assert_eq!(bob.active_key(vault.id).unwrap().id(), real);
        trust(&alice, &mallory);
        trust(&bob, &mallory);
        // A listing without the vault first.
        bob.accept_shares(&[]).await;
        for (victim, name) in [(&alice, "alice"), (&bob, "bob")] {
            let ctx = ShareContext { vault: vault.id, sender: "mallory", recipient: name };
            let mine = &mallory.wallet().user_key().unwrap().duplicate();
            let forged =
                seal_share(&fake_ring(), &ctx, mine, &victim.user_public().unwrap(), &mut OsRandom).unwrap();
            let m = Member { user: name.into(), rights: Rights::Admin, wrapped_key: Some(Sealed(forged)) };
            // What the server stores is its choice; here it goes through alice's admin rights.
            alice.remote.set_member(vault.id, m).await.unwrap();
            let infos = victim.remote.vaults().await.unwrap();
            let failed = victim.accept_shares(&infos).await;
            assert!(matches!(failed.as_slice(), [(_, AccountError::Refused(_))]), "{name}");
            assert_eq!(victim.active_key(vault.id).unwrap().id(), real, "{name} keeps the real key");
        }
    }

    /// Another admin removes a member: the vault's key rotates for everyone,
    /// the creator included, and each keeps the keys in the wallet, so a new
    /// session refuses the server's replay of a share from before.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn any_admin_rotates_and_every_member_remembers_the_keys() {
        let server = MemoryServer::new().unwrap();
        let mut alice = user(&server, "alice").await;
        let bob = user(&server, "bob").await;
        let carol = user(&server, "carol").await;
        let vault = alice.create_vault("V", false).await.unwrap().info;
        share_with(&alice, &vault, &bob, Rights::Admin).await;
        share_with(&alice, &vault, &carol, Rights::Read).await;
        let bobs_view = bob.vaults().await.unwrap().remove(0).info;
        carol.vaults().await.unwrap();
        let old = alice.active_key(vault.id).unwrap();
        assert_eq!(bob.wallet().keys_of(vault.id).count(), 1, "bob's wallet keeps the shared key");
        let members = alice.remote.members(vault.id).await.unwrap();
        let bobs_old_share = members.into_iter().find(|m| m.user == "bob").unwrap().wrapped_key;

        // Bob must have confirmed every remaining member (alice did it for him here).
        trust(&bob, &carol);
        let e = {
            let mut bob = Unlocked::open(bob.remote.clone(), b"pw").await.unwrap();
            bob.unshare(&bobs_view, "carol").await.unwrap_err().to_string()
        };
        assert!(e.contains("not confirmed") && e.contains("alice"), "{e}");
        let mut bob = bob;
        trust(&bob, &alice);
        let done = bob.unshare(&bobs_view, "carol").await.unwrap();
        assert_eq!((done.epoch, done.reshared), (1, 1));
        let new = bob.active_key(vault.id).unwrap();
        assert_ne!(new.id(), old.id());
        // The creator takes the new key at her next listing, and keeps it.
        alice.vaults().await.unwrap();
        assert_eq!(alice.active_key(vault.id).unwrap().id(), new.id(), "the creator follows");
        let alice2 = Unlocked::open(alice.remote.clone(), b"pw").await.unwrap();
        assert_eq!(alice2.wallet().active_key(vault.id).unwrap().id(), new.id(), "stored in her wallet");
        // A new session of bob gets his share from before the rotation (the
        // server replays it): refused, as his wallet remembers the new key.
        let replay = Member { user: "bob".into(), rights: Rights::Admin, wrapped_key: bobs_old_share };
        alice.remote.set_member(vault.id, replay).await.unwrap();
        let bob2 = Unlocked::open(bob.remote.clone(), b"pw").await.unwrap();
        trust(&bob2, &alice);
        let failed = bob2.accept_shares(&bob2.remote.vaults().await.unwrap()).await;
        assert!(
            matches!(failed.as_slice(), [(_, AccountError::Refused(e))] if e.contains("lacks keys")),
            "the replayed share is refused: {}",
            failed.len()
        );
        assert_eq!(bob2.active_key(vault.id).unwrap().id(), new.id(), "bob keeps sealing with the new key");
    }

    /// A member who took a rotated key keeps refusing the share from before
    /// it in a later session on the same machine, also when the server rolls
    /// the wallet back to before the key was stored (this machine's memory of
    /// keyrings); a machine without that memory cannot tell.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_machine_remembers_the_keyring_when_the_wallet_is_rolled_back() {
        let server = MemoryServer::new().unwrap();
        let (mut alice, bob, carol, vault) = team(&server).await;
        let memory: Arc<dyn crate::remote::account::KeyMemory> =
            Arc::new(crate::fs::freshness::Freshness::memory());
        let mut bob = bob;
        bob.set_key_memory(Arc::clone(&memory));
        let before_wallet = bob.remote.wallet().await.unwrap().unwrap().0;
        let members = alice.remote.members(vault.id).await.unwrap();
        let bobs_old_share = members.into_iter().find(|m| m.user == "bob").unwrap().wrapped_key;
        // Bob has his share opened again this session, so the memory knows it.
        bob.shared.write().clear();
        bob.vaults().await.unwrap();
        trust(&alice, &carol);
        alice.unshare(&vault, "carol").await.unwrap();
        bob.vaults().await.unwrap();
        let new = alice.active_key(vault.id).unwrap().id();
        assert_eq!(bob.active_key(vault.id).unwrap().id(), new);
        assert_eq!(memory.keys_seen(vault.id).map(|s| s.count), Some(2));

        // The server rolls bob's wallet back and replays his old share.
        let (_, v) = bob.remote.wallet().await.unwrap().unwrap();
        bob.remote.put_wallet(before_wallet, Some(v)).await.unwrap();
        let replay = Member { user: "bob".into(), rights: Rights::Write, wrapped_key: bobs_old_share };
        alice.remote.set_member(vault.id, replay).await.unwrap();
        let mut later = Unlocked::open(bob.remote.clone(), b"pw").await.unwrap();
        later.set_key_memory(Arc::clone(&memory));
        trust(&later, &alice);
        assert_eq!(later.wallet().keys_of(vault.id).count(), 1, "the rolled-back wallet lacks the new key");
        let e = later.sealing_key(vault.id).map(|k| k.id()).unwrap_err();
        assert!(
            matches!(e, AccountError::KeyBehind { missing: 1, .. }),
            "nothing sealed under the old key: {e}"
        );
        let failed = later.accept_shares(&later.remote.vaults().await.unwrap()).await;
        assert!(matches!(failed.as_slice(), [(_, AccountError::Refused(e))] if e.contains("lacks keys")));
        assert!(later.active_key(vault.id).is_none_or(|k| k.id() != new) && later.shared.read().is_empty());
        // Without the memory (another machine), the replay is taken: the limit the docs state.
        let mut elsewhere = Unlocked::open(bob.remote.clone(), b"pw").await.unwrap();
        trust(&elsewhere, &alice);
        elsewhere.set_pins(crate::remote::pins::Pins::in_memory(""));
        trust(&elsewhere, &alice);
        assert!(elsewhere.accept_shares(&elsewhere.remote.vaults().await.unwrap()).await.is_empty());
    }

    /// Mallory, an admin, is removed; the server then calls her an admin
    /// again and stores shares she seals with keys of her own after the key
    /// she had. Bob, who took the rotation, refuses hers (it lacks the new
    /// key). Carol, whose new share the server withholds, has seen the vault
    /// use the new key: she refuses mallory's key under that key's id (the id
    /// is not derived from it), and takes one under another id, but seals
    /// nothing in the vault (sealing_key, a share, a rekey in a new session).
    /// Dave, whose first share mallory seals, has nothing to compare it with
    /// and takes her key under the new key's id, but it does not open what is
    /// sealed under that id, so he seals nothing either.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_removed_admin_the_server_still_calls_one_gets_nothing_sealed_under_her_key() {
        let server = MemoryServer::new().unwrap();
        let mut alice = user(&server, "alice").await;
        let (bob, mut carol, mallory) =
            (user(&server, "bob").await, user(&server, "carol").await, user(&server, "mallory").await);
        let memory: Arc<dyn crate::remote::account::KeyMemory> =
            Arc::new(crate::fs::freshness::Freshness::memory());
        carol.set_key_memory(Arc::clone(&memory));
        let vault = alice.create_vault("V", false).await.unwrap().info;
        share_with(&alice, &vault, &bob, Rights::Write).await;
        share_with(&alice, &vault, &carol, Rights::Admin).await;
        share_with(&alice, &vault, &mallory, Rights::Admin).await;
        for member in [&bob, &carol, &mallory] {
            member.vaults().await.unwrap();
        }
        let dave = user(&server, "dave").await;
        for victim in [&bob, &carol, &dave] {
            trust(victim, &mallory);
        }
        let share_of = |members: Vec<Member>, who: &str| members.into_iter().find(|m| m.user == who).unwrap();
        let carols_old = share_of(alice.remote.members(vault.id).await.unwrap(), "carol");
        alice.unshare(&vault, "mallory").await.unwrap();
        let new = alice.active_key(vault.id).unwrap().id();
        let carols_new = share_of(alice.remote.members(vault.id).await.unwrap(), "carol");
        bob.vaults().await.unwrap();
        assert_eq!(bob.active_key(vault.id).unwrap().id(), new);
        // The server withholds carol's new share, and lists mallory as an admin again.
        alice.remote.set_member(vault.id, carols_old).await.unwrap();
        let back = Member { user: "mallory".into(), rights: Rights::Admin, wrapped_key: None };
        alice.remote.set_member(vault.id, back).await.unwrap();
        // Alice seals a title under the new key.
        let record = crate::ids::RecordId([7; 16]);
        let ctx = crate::crypto::NameContext::RecordTitle { vault: vault.id, record };
        let title =
            crate::crypto::seal_name(&alice.active_key(vault.id).unwrap(), &ctx, b"new", &mut OsRandom);
        let title = Sealed(title.unwrap());
        let new_record =
            crate::protocol::NewRecord { id: record, parent: None, title, fields: Sealed(Vec::new()) };
        alice.remote.create_record(vault.id, new_record).await.unwrap();
        carol.list_keys_in_use(vault.id).await.unwrap();
        assert!(matches!(carol.sealing_key(vault.id), Err(AccountError::KeyBehind { missing: 1, .. })));

        // Mallory's keyrings: the key she had, then one of hers under the
        // new key's id, or under an id of its own.
        let mallorys = mallory.wallet().user_key().unwrap().duplicate();
        let forge = |victim: &Unlocked<MemoryRemote>, name: &str, key: &VaultKey| {
            let mut ring = mallory.keyring_of(vault.id).unwrap();
            assert_eq!(ring.keys.len(), 1, "mallory has the key from before only");
            ring.keys.push(EpochKey { epoch: 1, key: key.duplicate() });
            let ctx = ShareContext { vault: vault.id, sender: "mallory", recipient: name };
            let share =
                seal_share(&ring, &ctx, &mallorys, &victim.user_public().unwrap(), &mut OsRandom).unwrap();
            Member { user: name.into(), rights: Rights::Admin, wrapped_key: Some(Sealed(share)) }
        };
        let under_new_id = VaultKey::from_bytes(new, [0x66; 32]);
        let fresh = VaultKey::generate(&mut OsRandom).unwrap();
        alice.remote.set_member(vault.id, forge(&bob, "bob", &fresh)).await.unwrap();
        let failed = bob.accept_shares(&bob.remote.vaults().await.unwrap()).await;
        assert!(matches!(failed.as_slice(), [(_, AccountError::Refused(e))] if e.contains("lacks keys")));
        assert_eq!(bob.active_key(vault.id).unwrap().id(), new, "bob keeps the new key");

        alice.remote.set_member(vault.id, forge(&carol, "carol", &under_new_id)).await.unwrap();
        let failed = carol.accept_shares(&carol.remote.vaults().await.unwrap()).await;
        assert!(matches!(failed.as_slice(), [(_, AccountError::Refused(e))] if e.contains("not derived")));
        assert!(carol.vault_key(vault.id, new).is_none());
        // Nor under an id of its own: carol has seen the vault use a key the
        // share does not bring (taking it would split the vault for her).
        alice.remote.set_member(vault.id, forge(&carol, "carol", &fresh)).await.unwrap();
        let failed = carol.accept_shares(&carol.remote.vaults().await.unwrap()).await;
        assert!(
            matches!(failed.as_slice(), [(_, AccountError::Refused(e))] if e.contains("saw the vault use"))
        );
        let carols_view = carol.vaults().await.unwrap().remove(0).info;
        assert!(
            carol.vault_key(vault.id, fresh.id()).is_none() && carol.wallet().keys_of(vault.id).count() == 1
        );
        let e = carol.sealing_key(vault.id).map(|k| k.id()).unwrap_err();
        assert!(matches!(e, AccountError::KeyBehind { missing: 1, .. }), "{e}");
        let e = carol.share_vault(&carols_view, "bob", Rights::Read, &bob.user_public().unwrap()).await;
        assert!(matches!(e, Err(AccountError::KeyBehind { .. })), "{e:?}");
        // A new session elsewhere lists before a rekey.
        let carol2 = Unlocked::open(carol.remote.clone(), b"pw").await.unwrap();
        let e = carol2.rekey_vault(vault.id, |_, _| {}).await.unwrap_err();
        assert!(matches!(e, AccountError::KeyBehind { .. }), "{e}");
        // A new session on carol's machine remembers what she saw, before
        // any listing (the server may hide the new key's titles from now on).
        let mut carol3 = Unlocked::open(carol.remote.clone(), b"pw").await.unwrap();
        assert!(carol3.sealing_key(vault.id).is_ok(), "another machine: nothing seen yet");
        carol3.set_key_memory(Arc::clone(&memory));
        let e = carol3.sealing_key(vault.id).map(|k| k.id()).unwrap_err();
        assert!(matches!(e, AccountError::KeyBehind { missing: 1, .. }), "{e}");
        // The server hands carol her share: she takes it and seals again, in
        // this session and the next.
        alice.remote.set_member(vault.id, carols_new).await.unwrap();
        assert!(carol.accept_shares(&carol.remote.vaults().await.unwrap()).await.is_empty());
        assert_eq!(carol.sealing_key(vault.id).unwrap().id(), new);
        let mut carol4 = Unlocked::open(carol.remote.clone(), b"pw").await.unwrap();
        carol4.set_key_memory(Arc::clone(&memory));
        assert_eq!(carol4.sealing_key(vault.id).unwrap().id(), new);

        // First shares, from mallory, under the new key's id: nothing to
        // compare them with. Erin's listing shows alice's title, which her
        // key does not open; dave saw the id in use before his share came,
        // and refuses a share that does not bring a key derived under it.
        let (erin, not_yet) =
            (user(&server, "erin").await, Member { wrapped_key: None, ..forge(&dave, "dave", &fresh) });
        trust(&erin, &mallory);
        alice.remote.set_member(vault.id, not_yet).await.unwrap();
        dave.list_keys_in_use(vault.id).await.unwrap();
        assert!(matches!(dave.sealing_key(vault.id), Err(AccountError::KeyBehind { missing: 1, .. })));
        alice.remote.set_member(vault.id, forge(&erin, "erin", &under_new_id)).await.unwrap();
        erin.vaults().await.unwrap();
        assert_eq!(erin.active_key(vault.id).unwrap().id(), new, "taken: erin holds nothing to compare");
        assert!(erin.sealing_key(vault.id).is_ok(), "before a listing, nothing tells erin");
        erin.list_keys_in_use(vault.id).await.unwrap();
        assert!(matches!(erin.sealing_key(vault.id), Err(AccountError::KeyBehind { missing: 1, .. })));
        alice.remote.set_member(vault.id, forge(&dave, "dave", &under_new_id)).await.unwrap();
        let failed = dave.accept_shares(&dave.remote.vaults().await.unwrap()).await;
        assert!(
            matches!(failed.as_slice(), [(_, AccountError::Refused(e))] if e.contains("saw the vault use"))
        );
        assert!(dave.active_key(vault.id).is_none());
        // Another machine of dave's (which never saw the id) took it as its
        // first share and stored it in the wallet: a key under an id not
        // derived from it does not clear what this machine saw.
        let mut dave = dave;
        dave.wallet_mut().add_key(vault.id, under_new_id.duplicate()).unwrap();
        assert_eq!(dave.active_key(vault.id).unwrap().id(), new);
        assert!(matches!(dave.sealing_key(vault.id), Err(AccountError::KeyBehind { missing: 1, .. })));
    }

    /// The machine remembers which key was a vault's newest, not only its
    /// id: once the wallet that stored a first share is rolled back (it holds
    /// no key of the vault then, so nothing else compares), a share with
    /// another key under that id is refused.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_machine_remembers_the_newest_key_itself() {
        let server = MemoryServer::new().unwrap();
        let mut alice = user(&server, "alice").await;
        let mut bob = user(&server, "bob").await;
        let memory: Arc<dyn crate::remote::account::KeyMemory> =
            Arc::new(crate::fs::freshness::Freshness::memory());
        bob.set_key_memory(Arc::clone(&memory));
        let before = bob.remote.wallet().await.unwrap().unwrap().0;
        let vault = alice.create_vault("V", false).await.unwrap().info;
        share_with(&alice, &vault, &bob, Rights::Write).await;
        bob.vaults().await.unwrap();
        let real = alice.active_key(vault.id).unwrap();
        assert_eq!(bob.wallet().keys_of(vault.id).count(), 1);
        let (_, v) = bob.remote.wallet().await.unwrap().unwrap();
        bob.remote.put_wallet(before, Some(v)).await.unwrap();
        let mut later = Unlocked::open(bob.remote.clone(), b"pw").await.unwrap();
        later.set_key_memory(Arc::clone(&memory));
        trust(&later, &alice);
        assert_eq!(later.wallet().keys_of(vault.id).count(), 0);
        let other = VaultKey::from_bytes(real.id(), [0x77; 32]);
        let ring = Keyring { keys: vec![EpochKey { epoch: 0, key: other }], flags: 0 };
        let ctx = ShareContext { vault: vault.id, sender: "alice", recipient: "bob" };
        let me = alice.wallet().user_key().unwrap().duplicate();
        let share = seal_share(&ring, &ctx, &me, &later.user_public().unwrap(), &mut OsRandom).unwrap();
        let m = Member { user: "bob".into(), rights: Rights::Write, wrapped_key: Some(Sealed(share)) };
        alice.remote.set_member(vault.id, m).await.unwrap();
        let failed = later.accept_shares(&later.remote.vaults().await.unwrap()).await;
        assert!(matches!(failed.as_slice(), [(_, AccountError::Refused(e))] if e.contains("lacks keys")));
        assert!(later.active_key(vault.id).is_none());
        // Another machine of bob's stored that key in the wallet: this one
        // still seals nothing with it.
        later.wallet_mut().add_key(vault.id, VaultKey::from_bytes(real.id(), [0x77; 32])).unwrap();
        assert_eq!(later.active_key(vault.id).unwrap().id(), real.id());
        let e = later.sealing_key(vault.id).map(|k| k.id()).unwrap_err();
        assert!(matches!(e, AccountError::KeyBehind { .. }), "{e}");
    }

    /// A share held for the session counts only while it extends the
    /// wallet's keys, secrets and all: once the wallet holds another key
    /// under an id the share has (stored by another client of the user), the
    /// key that opens what is listed under that id and the key sealed with
    /// are both the wallet's.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_session_share_counts_only_while_it_extends_the_wallet() {
        let server = MemoryServer::new().unwrap();
        let (mut alice, bob, carol, vault) = team(&server).await;
        trust(&alice, &carol);
        alice.unshare(&vault, "carol").await.unwrap();
        bob.vaults().await.unwrap();
        let real = alice.active_key(vault.id).unwrap();
        assert_eq!(bob.wallet().keys_of(vault.id).count(), 2);
        // This session holds another key under the new key's id.
        let mut ring = bob.keyring_of(vault.id).unwrap();
        ring.keys[1].key = VaultKey::from_bytes(real.id(), [0x66; 32]);
        let accepted = Accepted { blob: Vec::new(), sender: "mallory".into(), ring: Arc::new(ring) };
        bob.shared.write().insert(vault.id, accepted);
        for key in [bob.active_key(vault.id).unwrap(), bob.vault_key(vault.id, real.id()).unwrap()] {
            assert!(same_key(&key, &real), "the wallet's key, not the session's");
        }
        assert!(same_key(&bob.sealing_key(vault.id).unwrap(), &real));
        assert!(bob.keyring_of(vault.id).unwrap().keys.iter().all(|k| k.key.secret() != &[0x66; 32]));
    }

    /// Vaults rotated before key ids were derived: a share whose newest key
    /// has a random id is not taken by a member who holds keys of the vault
    /// (it could be anyone's key under any id), one whose newest key's id is
    /// derived is, older keys with random ids included.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_newest_key_a_share_adds_must_have_a_derived_id() {
        let server = MemoryServer::new().unwrap();
        let (alice, bob, _carol, vault) = team(&server).await;
        let legacy = VaultKey::from_bytes(crate::crypto::KeyId([0x42; 16]), [0x43; 32]);
        let derived = VaultKey::generate(&mut OsRandom).unwrap();
        let me = alice.wallet().user_key().unwrap().duplicate();
        let share_for_bob = |extra: &[&VaultKey]| {
            let mut ring = alice.keyring_of(vault.id).unwrap();
            for (i, k) in extra.iter().enumerate() {
                ring.keys.push(EpochKey { epoch: 1 + i as u32, key: k.duplicate() });
            }
            let ctx = ShareContext { vault: vault.id, sender: "alice", recipient: "bob" };
            let share = seal_share(&ring, &ctx, &me, &bob.user_public().unwrap(), &mut OsRandom).unwrap();
            Member { user: "bob".into(), rights: Rights::Write, wrapped_key: Some(Sealed(share)) }
        };
        alice.remote.set_member(vault.id, share_for_bob(&[&legacy])).await.unwrap();
        let failed = bob.accept_shares(&bob.remote.vaults().await.unwrap()).await;
        assert!(matches!(failed.as_slice(), [(_, AccountError::Refused(e))] if e.contains("not derived")));
        assert!(bob.vault_key(vault.id, legacy.id()).is_none());
        alice.remote.set_member(vault.id, share_for_bob(&[&legacy, &derived])).await.unwrap();
        assert!(bob.accept_shares(&bob.remote.vaults().await.unwrap()).await.is_empty());
        assert!(same_key(&bob.active_key(vault.id).unwrap(), &derived));
        assert!(bob.vault_key(vault.id, legacy.id()).is_some());
    }

    /// A share that would add a key, sealed by a member who is not an admin
    /// (stored by a server that lets it), is refused: the key is not taken.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn keys_added_by_a_non_admin_are_refused() {
        let server = MemoryServer::new().unwrap();
        let (alice, bob, carol, vault) = team(&server).await;
        trust(&bob, &carol);
        let mut ring = carol.keyring_of(vault.id).unwrap();
        ring.keys.push(EpochKey { epoch: 1, key: VaultKey::generate(&mut OsRandom).unwrap() });
        let ctx = ShareContext { vault: vault.id, sender: "carol", recipient: "bob" };
        let carols = &carol.wallet().user_key().unwrap().duplicate();
        let share = seal_share(&ring, &ctx, carols, &bob.user_public().unwrap(), &mut OsRandom).unwrap();
        let m = Member { user: "bob".into(), rights: Rights::Write, wrapped_key: Some(Sealed(share)) };
        alice.remote.set_member(vault.id, m).await.unwrap();
        let failed = bob.accept_shares(&bob.remote.vaults().await.unwrap()).await;
        assert!(
            matches!(failed.as_slice(), [(_, AccountError::Refused(e))] if e.contains("not an admin")),
            "{}",
            failed.len()
        );
        assert_eq!(bob.active_key(vault.id).unwrap().id(), alice.active_key(vault.id).unwrap().id());
        assert_eq!(bob.wallet().keys_of(vault.id).count(), 1);
    }

    /// Removing a member rotates the key: they get 404 from then on, what is
    /// sealed afterwards does not open with the key they had (handed to the
    /// decryptor directly), and the remaining member takes the new key.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn removing_a_member_rotates_the_key_they_had() {
        let server = MemoryServer::new().unwrap();
        let (mut alice, bob, carol, vault) = team(&server).await;
        let old = carol.active_key(vault.id).unwrap();
        assert_eq!(old.id(), alice.active_key(vault.id).unwrap().id());

        let done = alice.unshare(&vault, "carol").await.unwrap();
        assert_eq!((done.epoch, done.reshared, done.not_reshared.len()), (1, 1, 0));
        assert!(carol.remote.vaults().await.unwrap().is_empty());
        assert!(matches!(carol.remote.members(vault.id).await, Err(RemoteError::NotFound(_))));
        let new = alice.active_key(vault.id).unwrap();
        assert_ne!(new.id(), old.id());
        bob.vaults().await.unwrap();
        assert_eq!(bob.active_key(vault.id).unwrap().id(), new.id(), "bob took the new key");
        assert!(bob.vault_key(vault.id, old.id()).is_some(), "and keeps the old one for older files");
        // Sealed after the removal: the old key opens neither a name nor a file.
        let ctx = crate::crypto::NameContext::VaultName { vault: vault.id };
        let name = crate::crypto::seal_name(&new, &ctx, b"after", &mut OsRandom).unwrap();
        assert!(crate::crypto::open_name(&old, &ctx, &name).is_err());
        let fctx = crate::crypto::FileContext {
            vault: vault.id,
            record: crate::ids::RecordId([1; 16]),
            file: crate::ids::FileId([2; 16]),
        };
        let file = crate::crypto::encrypt_file(&new, &fctx, 1, b"after the removal", &mut OsRandom).unwrap();
        assert!(crate::crypto::decrypt_file(&file, &old, &fctx, 0).is_err());
        assert_eq!(
            &crate::crypto::decrypt_file(&file, &bob.active_key(vault.id).unwrap(), &fctx, 0).unwrap().1[..],
            b"after the removal"
        );
        let (older, all) = alice.files_under_older_keys(vault.id).await.unwrap();
        assert_eq!((older, all), (0, 0));

        // Refusals that change nothing: not a member, yourself, a remaining
        // member whose key is not confirmed here.
        let e = alice.unshare(&vault, "carol").await.unwrap_err().to_string();
        assert!(e.contains("not a member"), "{e}");
        let e = alice.unshare(&vault, "alice").await.unwrap_err().to_string();
        assert!(e.contains("that is you"), "{e}");
        let dave = user(&server, "dave").await;
        share_with(&alice, &vault, &dave, Rights::Admin).await;
        alice.pins.lock().set("dave", Fingerprint([0; 15])).unwrap();
        let e = alice.unshare(&vault, "bob").await.unwrap_err().to_string();
        assert!(e.contains("not confirmed") && e.contains("dave"), "{e}");
        assert_eq!(alice.remote.members(vault.id).await.unwrap().len(), 3, "bob is still a member");
        assert_eq!(alice.active_key(vault.id).unwrap().id(), new.id(), "no new key");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bad_shares_are_refused_with_clear_errors_and_change_nothing() {
        let server = MemoryServer::new().unwrap();
        let mut alice = user(&server, "alice").await;
        let bob = user(&server, "bob").await;
        let vault = alice.create_vault("V", false).await.unwrap().info;
        let e = alice.colleague_key("nobody").await.unwrap_err().to_string();
        assert!(e.contains("no key for \"nobody\""), "{e}");
        // A user without a published key (an older client): the same clear answer.
        server.add_user("dave", Limits::DEFAULT).await.unwrap();
        let e = alice.colleague_key("dave").await.unwrap_err().to_string();
        assert!(e.contains("not logged in"), "{e}");
        let (key, _) = alice.colleague_key("bob").await.unwrap();
        let e = alice.share_vault(&vault, "alice", Rights::Read, &key).await.unwrap_err().to_string();
        assert!(e.contains("that is you"), "{e}");
        // Bob, a reader, cannot share on.
        share_with(&alice, &vault, &bob, Rights::Read).await;
        let bobs_view = bob.vaults().await.unwrap().remove(0).info;
        let alice_key = alice.user_public().unwrap();
        let e =
            bob.share_vault(&bobs_view, "alice", Rights::Admin, &alice_key).await.unwrap_err().to_string();
        assert!(e.contains("sharing needs admin"), "{e}");
        // The server refuses it too if a client asks anyway.
        let forged = Member { user: "carol".into(), rights: Rights::Admin, wrapped_key: None };
        assert!(matches!(bob.remote.set_member(vault.id, forged).await, Err(RemoteError::Forbidden(_))));
        assert_eq!(alice.remote.members(vault.id).await.unwrap().len(), 2);
        // The last admin can be neither removed nor made a reader (the client
        // refuses "that is you"; the server refuses whoever asks).
        let e = alice.unshare(&vault, "alice").await.unwrap_err().to_string();
        assert!(e.contains("that is you"), "{e}");
        let e = alice.remote.remove_member(vault.id, "alice").await.unwrap_err().to_string();
        assert!(e.contains("at least one admin"), "{e}");
        let demoted = Member { user: "alice".into(), rights: Rights::Read, wrapped_key: None };
        let e = alice.remote.set_member(vault.id, demoted).await.unwrap_err().to_string();
        assert!(e.contains("at least one admin"), "{e}");
        let members = alice.remote.members(vault.id).await.unwrap();
        assert!(members.iter().any(|m| m.user == "alice" && m.rights == Rights::Admin), "nothing changed");
    }
}
