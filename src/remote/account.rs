//! A user's account on a vault server, as the client keeps it.
//!
//! `login.toml` (in `~/.config/vaultfs/`, mode 0600) stores only what is safe to
//! store: the server URL, the user name and how to trust the server (pinned
//! fingerprint or CA file). No passphrase, key or session token is written to
//! disk; each command or mount asks for the passphrase, derives the login key and
//! the wallet key from it, and keeps them in memory only.
//!
//! [`Unlocked`] is an authenticated remote plus the opened wallet: it creates
//! vaults (key added to the wallet and the wallet stored *before* the vault is
//! created, so a key is never lost) and lists vaults with their names opened.
//! The keys of a vault come from the wallet (vaults this user made) or from
//! the share another member sealed for this user (super::sharing), opened each
//! session; [`Unlocked::vault_key`] and [`Unlocked::active_key`] look in both.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::pins::Pins;
use super::sharing::{Accepted, Refused};
use super::tls::Trust;
use super::{Remote, RemoteError};
use crate::crypto::{
    self, open_name, seal_name, Fingerprint, KdfParams, NameContext, OsRandom, VaultKey, Wallet,
};
use crate::ids::VaultId;
use crate::protocol::{NewVault, Rights, Sealed, VaultInfo};

/// File name of the saved login inside the config directory.
pub const LOGIN_FILE: &str = "login.toml";

/// Errors of account operations.
#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    /// The server said no, or could not be reached.
    #[error(transparent)]
    Remote(#[from] RemoteError),
    /// The wallet did not open or a name did not decrypt.
    #[error(transparent)]
    Crypto(#[from] crypto::CryptoError),
    /// The login file is missing or malformed.
    #[error("{path}: {message}")]
    LoginFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The server has no wallet for this user (enrollment was not finished).
    #[error(
        "the server holds no wallet for this user; log in with the enrollment code first (if you did, and the \
         server lost the wallet, `vaultfs login --start-over` makes a new, empty one)"
    )]
    NoWallet,
    /// The wallet does not open with the passphrase the login took (after
    /// an admin's reset, or the server altered it).
    #[error("{}", wallet_not_opened(*recoverable))]
    WalletNotOpened {
        /// Whether the wallet has a recovery slot (as its unauthenticated
        /// header says: only for what to suggest).
        recoverable: bool,
    },
    /// No key for a vault in the wallet.
    #[error("the wallet holds no key for vault {0}")]
    NoKey(VaultId),
    /// The vault is seen using keys this client was not given (its key
    /// rotated and the new one was not shared with this user, or not yet):
    /// nothing new is sealed under the keys held.
    #[error(
        "vault {vault} has files or names sealed under {missing} key(s) this client does not hold, or holds \
         under an id the key does not match: its key was rotated and the new key has not reached you (or the \
         server lists something under a key that does not exist). Nothing new is sealed in it until an admin \
         shares the vault with you again (`vaultfs vault share`); unsaved changes are kept and retried"
    )]
    KeyBehind {
        /// The vault.
        vault: VaultId,
        /// How many such keys.
        missing: usize,
    },
    /// The server offers another key for a user than the one pinned here.
    #[error(
        "the server offers another key for {user} ({offered}) than the one pinned on this machine ({pinned}); \
         if {user} really has a new key (after a reset), compare it with what `vaultfs whoami` shows them and \
         confirm it with `vaultfs trust {user} --fingerprint {offered}`"
    )]
    KeyChanged {
        /// Whose key.
        user: String,
        /// The fingerprint pinned here.
        pinned: Fingerprint,
        /// The fingerprint of the key the server offers.
        offered: Fingerprint,
    },
    /// A share from a user whose key this user has not confirmed yet.
    #[error(
        "a vault shared by {user} waits until you confirm their key: compare {offered} with what \
         `vaultfs whoami` shows {user}, then run `vaultfs trust {user} --fingerprint {offered}`"
    )]
    Untrusted {
        /// The sender.
        user: String,
        /// The fingerprint of the key the server offers for them.
        offered: Fingerprint,
    },
    /// The key the user confirmed is not the one the server offers.
    #[error(
        "the server offers {offered} as the key of {user}, not the {confirmed} you gave; nothing was shared"
    )]
    NotConfirmed {
        /// Whose key.
        user: String,
        /// What the server offers.
        offered: Fingerprint,
        /// What the user gave.
        confirmed: Fingerprint,
    },
    /// A step refused (sharing, a passphrase change), with why.
    #[error("{0}")]
    Refused(String),
}

fn wallet_not_opened(recoverable: bool) -> String {
    let recover = if recoverable {
        "with --recovery-key to restore it with your recovery key (it has one), or "
    } else {
        "with --recovery-key if you made a recovery key, or "
    };
    format!(
        "your wallet on the server does not open with this passphrase (or it was altered). If your admin \
         reset your account, run `vaultfs login` again (without --enroll: a code works once) {recover}with \
         --start-over to begin with an empty wallet: the vaults only you held keys for then stay unreadable \
         to you. Until then nothing is changed"
    )
}

/// The saved login (`login.toml`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Account {
    /// Server base URL.
    pub server: String,
    /// User name.
    pub user: String,
    /// Pinned certificate fingerprint (`sha256:...`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    /// CA file to verify the server with, instead of a pin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// The server identity the login key is bound to (docs/FORMAT.md "Login
    /// key"), remembered from the first login on this machine. Absent in a
    /// file written by an older vaultfs: the next login binds it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
}

/// `$XDG_CONFIG_HOME/vaultfs`, or `~/.config/vaultfs`.
pub fn config_dir() -> Option<PathBuf> {
    if let Some(x) = std::env::var_os("XDG_CONFIG_HOME").filter(|x| !x.is_empty()) {
        return Some(PathBuf::from(x).join("vaultfs"));
    }
    std::env::var_os("HOME").filter(|h| !h.is_empty()).map(|h| PathBuf::from(h).join(".config/vaultfs"))
}

impl Account {
    /// How to trust the server.
    pub fn trust(&self) -> Option<Trust> {
        match (&self.fingerprint, &self.ca_file) {
            (Some(fp), _) => Some(Trust::Pinned(fp.clone())),
            (None, Some(ca)) => Some(Trust::CaFile(ca.clone())),
            (None, None) => None,
        }
    }

    /// Where the server is, how to trust it, and what the login is bound to.
    pub fn access(&self) -> super::http::ServerAccess {
        super::http::ServerAccess {
            url: self.server.clone(),
            trust: self.trust(),
            identity: self.identity.clone(),
        }
    }

    /// After a successful login: remembers the identity the login key is now
    /// bound to, if this file did not say yet (one written by an older
    /// vaultfs), so that a server never gets an unbound key from here again.
    pub fn remember_identity(&mut self, path: &Path) -> Result<(), AccountError> {
        if self.identity.is_some() {
            return Ok(());
        }
        self.identity = Some(self.access().identity()?);
        self.save(path)
    }

    /// Reads `path`.
    pub fn load(path: &Path) -> Result<Self, AccountError> {
        let err = |message: String| AccountError::LoginFile { path: path.to_path_buf(), message };
        let text = std::fs::read_to_string(path).map_err(|e| {
            err(if e.kind() == std::io::ErrorKind::NotFound {
                "not found; run `vaultfs login` first".into()
            } else {
                e.to_string()
            })
        })?;
        toml::from_str(&text).map_err(|e| err(e.to_string().trim_end().to_string()))
    }

    /// Writes `path` (owner-only), replacing it atomically.
    pub fn save(&self, path: &Path) -> Result<(), AccountError> {
        let err =
            |e: std::io::Error| AccountError::LoginFile { path: path.to_path_buf(), message: e.to_string() };
        let text = toml::to_string(self)
            .map_err(|e| AccountError::LoginFile { path: path.to_path_buf(), message: e.to_string() })?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        write_private(path, text.as_bytes()).map_err(err)
    }
}

/// Replaces `path` with `bytes`, readable by the owner only, atomically and
/// durably: a new file (named for this process, so two processes writing at
/// once never share one) synced and renamed over it.
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// What a machine remembers of the keyrings it accepted from shares, per
/// vault: how many keys, and the newest one's id (the local freshness state
/// keeps it). A share that holds fewer, or another key in that place, is
/// refused, whatever wallet the server serves.
pub trait KeyMemory: Send + Sync {
    /// The keys of `vault` seen in an accepted share: how many, and which
    /// is the newest.
    fn keys_seen(&self, vault: VaultId) -> Option<crypto::state::RememberedRing>;
    /// Notes an accepted keyring of `count` keys, the newest `newest`.
    fn note_keys(&self, vault: VaultId, count: u32, newest: &VaultKey);
    /// Key ids seen in use in `vault` while no key under them was held
    /// (super::keys_in_use), in any session on this machine.
    fn keys_lacking(&self, vault: VaultId) -> Vec<crypto::KeyId>;
    /// Notes that `vault` was seen using `id` while no key under it was held.
    fn note_lacking(&self, vault: VaultId, id: crypto::KeyId);
    /// Forgets `id` of `vault`: a key derived under it is held now.
    fn forget_lacking(&self, vault: VaultId, id: crypto::KeyId);
}

/// A vault as the user sees it: server metadata plus the opened name.
#[derive(Debug, Clone)]
pub struct NamedVault {
    /// Server metadata.
    pub info: VaultInfo,
    /// The decrypted name, or `None` if it could not be opened (no key, tampered).
    pub name: Option<String>,
    /// Who sealed the share this user's keys of the vault came from (`None`:
    /// the keys are in the wallet, or there are none).
    pub shared_by: Option<String>,
}

/// An authenticated remote with the user's wallet open.
pub struct Unlocked<R> {
    /// The remote.
    pub remote: R,
    /// The user name on the server.
    user: String,
    /// The open wallet; replaced when another client changed it
    /// ([`Unlocked::refresh_wallet`]). A leaf lock, never held across an await.
    wallet: parking_lot::RwLock<Wallet>,
    /// Shares opened this session, by vault (super::sharing).
    pub(super) shared: parking_lot::RwLock<HashMap<VaultId, Accepted>>,
    /// Shares that did not open, by vault: not tried (nor logged) again until
    /// the server holds another one, or the user confirms the sender's key.
    pub(super) refused_shares: parking_lot::Mutex<HashMap<VaultId, Refused>>,
    /// Keys of other users accepted on this machine.
    pub(super) pins: parking_lot::Mutex<Pins>,
    /// This machine's memory of accepted keyrings, if it keeps one.
    pub(super) key_memory: Option<std::sync::Arc<dyn KeyMemory>>,
    /// Keys seen in use in each vault that this client lacks (super::keys_in_use).
    pub(super) keys_in_use: super::keys_in_use::KeysInUse,
    /// The server's version of the wallet held.
    wallet_version: std::sync::atomic::AtomicU64,
    passphrase: zeroize::Zeroizing<Vec<u8>>,
    wallet_kdf: KdfParams,
}

impl<R: Remote> Unlocked<R> {
    /// Creates and stores an empty wallet for a freshly enrolled user.
    pub async fn create_wallet(remote: R, passphrase: &[u8], kdf: KdfParams) -> Result<Self, AccountError> {
        let wallet = Wallet::new();
        let sealed = seal_blocking(&wallet, passphrase, kdf).await?;
        let wallet_version = remote.put_wallet(sealed, None).await?;
        let passphrase = zeroize::Zeroizing::new(passphrase.to_vec());
        Self::assemble(remote, wallet, wallet_version, passphrase, kdf).await
    }

    async fn assemble(
        remote: R,
        wallet: Wallet,
        wallet_version: u64,
        passphrase: zeroize::Zeroizing<Vec<u8>>,
        wallet_kdf: KdfParams,
    ) -> Result<Self, AccountError> {
        let user = remote.me().await?.user;
        Ok(Unlocked {
            remote,
            user,
            wallet: parking_lot::RwLock::new(wallet),
            shared: Default::default(),
            refused_shares: Default::default(),
            keys_in_use: Default::default(),
            pins: parking_lot::Mutex::new(Pins::in_memory("")),
            key_memory: None,
            wallet_version: std::sync::atomic::AtomicU64::new(wallet_version),
            passphrase,
            wallet_kdf,
        })
    }

    /// Fetches and opens the wallet with `passphrase`.
    pub async fn open(remote: R, passphrase: &[u8]) -> Result<Self, AccountError> {
        let (blob, wallet_version) = remote.wallet().await?.ok_or(AccountError::NoWallet)?;
        Self::open_blob(remote, blob, wallet_version, passphrase).await
    }

    /// Opens the wallet with `passphrase`, or creates an empty one if the
    /// server holds none (a first enrollment).
    pub async fn open_or_create(remote: R, passphrase: &[u8], kdf: KdfParams) -> Result<Self, AccountError> {
        match remote.wallet().await? {
            None => Self::create_wallet(remote, passphrase, kdf).await,
            Some((blob, version)) => Self::open_blob(remote, blob, version, passphrase).await,
        }
    }

    async fn open_blob(
        remote: R,
        blob: Vec<u8>,
        version: u64,
        passphrase: &[u8],
    ) -> Result<Self, AccountError> {
        let recoverable = crypto::wallet::wallet_has_recovery_slot(&blob);
        let pass = zeroize::Zeroizing::new(passphrase.to_vec());
        let (wallet, wallet_kdf) =
            match open_blocking(blob, &pass).await? {
                Err(crypto::CryptoError::WalletLocked) => {
                    return Err(AccountError::WalletNotOpened { recoverable })
                }
                Err(crypto::CryptoError::Integrity(_)) => return Err(AccountError::Refused(
                    "the wallet on the server opens with this passphrase, but its contents were altered: \
                     refused, and kept as it is (ask your server's admin)"
                        .into(),
                )),
                other => other?,
            };
        Self::assemble(remote, wallet, version, pass, wallet_kdf).await
    }

    /// Restores a wallet with the user's recovery key (after an admin's reset:
    /// `remote` is logged in with the new passphrase): the wallet on the
    /// server is opened with `key`, passed to `accept` (this machine's
    /// freshness check: an older wallet than it saw is refused), sealed under
    /// `passphrase` (still for the same recovery key) and stored over the
    /// version read. Nothing is stored if the key does not open it or
    /// `accept` refuses it.
    pub async fn recover(
        remote: R,
        key: &crypto::RecoveryKey,
        passphrase: &[u8],
        kdf: KdfParams,
        accept: impl FnOnce(&Wallet) -> Result<(), String>,
    ) -> Result<Self, AccountError> {
        let (blob, version) = remote.wallet().await?.ok_or(AccountError::NoWallet)?;
        let (wallet, sealed_with) = Wallet::open_with_recovery(&blob, key)?;
        accept(&wallet).map_err(AccountError::Refused)?;
        let kdf = if sealed_with.is_weaker_than(&kdf) { kdf } else { sealed_with };
        let passphrase = zeroize::Zeroizing::new(passphrase.to_vec());
        let mut unlocked = Self::assemble(remote, wallet, version, passphrase, kdf).await?;
        unlocked.save_wallet().await?;
        Ok(unlocked)
    }

    /// Replaces a wallet that `passphrase` does not open (after an admin's
    /// reset, without a recovery key) with an empty one. Refused if the
    /// passphrase opens the wallet (nothing to start over from), if the wallet
    /// fails for another reason than the passphrase (altered or damaged: not
    /// the user's doing), and, unless `discard_recoverable`, if the wallet has
    /// a recovery slot (the recovery key restores it instead).
    pub async fn start_over(
        remote: R,
        passphrase: &[u8],
        kdf: KdfParams,
        discard_recoverable: bool,
    ) -> Result<Self, AccountError> {
        let Some((blob, version)) = remote.wallet().await? else {
            return Self::create_wallet(remote, passphrase, kdf).await;
        };
        let recoverable = crypto::wallet::wallet_has_recovery_slot(&blob);
        let pass = zeroize::Zeroizing::new(passphrase.to_vec());
        match open_blocking(blob, &pass).await? {
            Ok(_) => {
                return Err(AccountError::Refused(
                    "your wallet opens with this passphrase: there is nothing to start over from, and it was kept"
                        .into(),
                ))
            }
            Err(crypto::CryptoError::WalletLocked) => {}
            Err(e) => {
                return Err(AccountError::Refused(format!(
                    "the wallet on the server fails for another reason than the passphrase ({e}): it was kept; \
                     ask your server's admin"
                )))
            }
        }
        if recoverable && !discard_recoverable {
            return Err(AccountError::Refused(
                "your wallet has a recovery key: --recovery-key restores it with all your vaults; only if that \
                 key is lost too, add --discard-recoverable-wallet to start over anyway. It was kept"
                    .into(),
            ));
        }
        let mut unlocked = Self::assemble(remote, Wallet::new(), version, pass, kdf).await?;
        unlocked.save_wallet().await?;
        Ok(unlocked)
    }

    /// Makes `key` the wallet's recovery key and stores the wallet sealed
    /// for it (an earlier recovery key opens none of the versions stored from
    /// then on). The key itself is kept nowhere: the caller shows it to be
    /// written down first.
    pub async fn set_recovery_key(&mut self, key: &crypto::RecoveryKey) -> Result<(), AccountError> {
        self.wallet.get_mut().set_recovery(key);
        self.save_wallet().await
    }

    /// The user name on the server.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// Remembers accepted keyrings in `memory` (and checks shares against
    /// it) from now on.
    pub fn set_key_memory(&mut self, memory: std::sync::Arc<dyn KeyMemory>) {
        self.key_memory = Some(memory);
    }

    /// Uses `pins` (this machine's pinned keys of other users) from now on;
    /// without, pins are kept in memory for this session only.
    pub fn set_pins(&mut self, pins: Pins) {
        *self.pins.get_mut() = pins;
    }

    /// The key of `vault` with id `id`: from the wallet, or from the share
    /// opened for the vault while that share extends the wallet's keys (the
    /// same keys, secrets and all, in order: one view of the vault's keys, so
    /// the key that opens what is listed under an id is the key sealed with
    /// under it). A key of another vault is never returned. A copy, wiped
    /// when dropped (the wallet can be replaced meanwhile).
    pub fn vault_key(&self, vault: VaultId, id: crypto::KeyId) -> Option<VaultKey> {
        let wallet = self.wallet.read();
        if let Some(k) = wallet.key(vault, id) {
            return Some(k.duplicate());
        }
        let shared = self.shared.read();
        let ring = &shared.get(&vault).filter(|a| super::sharing::extends(&wallet, vault, &a.ring))?.ring;
        ring.keys.iter().find(|k| k.key.id() == id).map(|k| k.key.duplicate())
    }

    /// The newest key of `vault` held: the last of the share opened this
    /// session while it extends the wallet's keys, else the wallet's (which
    /// is newer when it has a key the share lacks, or holds another key than
    /// the share under some id). Not for sealing: see [`Unlocked::sealing_key`].
    pub fn active_key(&self, vault: VaultId) -> Option<VaultKey> {
        let wallet = self.wallet.read();
        if let Some(a) = self.shared.read().get(&vault) {
            if super::sharing::extends(&wallet, vault, &a.ring) {
                return a.ring.current().map(|k| k.key.duplicate());
            }
        }
        wallet.active_key(vault).map(VaultKey::duplicate)
    }

    /// Whether every file of `vault` carries a manifest (the wallet's flag, or
    /// the flag its share hands on).
    pub fn manifests_required(&self, vault: VaultId) -> bool {
        self.wallet.read().manifests_required(vault)
            || self.shared.read().get(&vault).is_some_and(|a| a.ring.manifests_required())
    }

    /// The open wallet (a read lock: do not hold it across an await).
    pub fn wallet(&self) -> parking_lot::RwLockReadGuard<'_, Wallet> {
        self.wallet.read()
    }

    /// The server's version of the wallet held.
    pub fn held_wallet_version(&self) -> u64 {
        self.wallet_version.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Reads the wallet again if the server holds another version of it (a
    /// vault created or a key added by another client of this user): the new
    /// one must open with this session's passphrase, be no older (by
    /// revision) than the one held, and pass `accept` (the local freshness
    /// state's check), else the one held stays. Returns whether it changed.
    pub async fn refresh_wallet(
        &self,
        accept: impl Fn(u64) -> Result<(), String>,
    ) -> Result<bool, AccountError> {
        use std::sync::atomic::Ordering;
        let held = self.wallet_version.load(Ordering::Acquire);
        if self.remote.wallet_version().await? == Some(held) {
            return Ok(false);
        }
        let (blob, version) = self.remote.wallet().await?.ok_or(AccountError::NoWallet)?;
        let (wallet, _) = open_blocking(blob, &self.passphrase).await??;
        let revision = wallet.revision();
        let current = self.wallet.read().revision();
        if revision < current {
            return Err(AccountError::Refused(format!(
                "the server's wallet (revision {revision}) is older than the one held ({current}): kept the one held"
            )));
        }
        accept(revision).map_err(AccountError::Refused)?;
        let mut held = self.wallet.write();
        *held = wallet;
        self.wallet_version.store(version, Ordering::Release);
        Ok(true)
    }

    /// Creates a vault named `name`: a new vault key goes into the wallet, the
    /// wallet is stored, then the vault is created with its sealed name.
    pub async fn create_vault(&mut self, name: &str, e2e_required: bool) -> Result<NamedVault, AccountError> {
        let id = VaultId::random().map_err(|e| RemoteError::Protocol(e.to_string()))?;
        self.wallet.get_mut().add_key(id, VaultKey::generate(&mut OsRandom)?)?;
        // Every file of a new vault carries a manifest: one without is refused.
        self.wallet.get_mut().require_manifests(id);
        self.save_wallet().await?;
        let key = self.wallet.get_mut().active_key(id).ok_or(AccountError::NoKey(id))?.duplicate();
        let sealed_name =
            seal_name(&key, &NameContext::VaultName { vault: id }, name.as_bytes(), &mut OsRandom)?;
        let info = self
            .remote
            .create_vault(NewVault { id, name: Sealed(sealed_name), e2e_required, wrapped_key: None })
            .await?;
        Ok(NamedVault { info, name: Some(name.to_string()), shared_by: None })
    }

    /// Makes the key of the local freshness state if the wallet has none yet
    /// (a wallet made by an older vaultfs), and stores the wallet.
    pub async fn ensure_state_key(&mut self) -> Result<(), AccountError> {
        if self.wallet.get_mut().ensure_state_key(&mut OsRandom)? {
            self.save_wallet().await?;
        }
        Ok(())
    }

    /// The open wallet, to change (then [`Unlocked::save_wallet`]).
    pub(crate) fn wallet_mut(&mut self) -> &mut Wallet {
        self.wallet.get_mut()
    }

    /// Seals the wallet again and stores it over the version this session read.
    pub(crate) async fn save_wallet(&mut self) -> Result<(), AccountError> {
        let sealed = seal_blocking(self.wallet.get_mut(), &self.passphrase, self.wallet_kdf).await?;
        let version = self.remote.put_wallet(sealed, Some(*self.wallet_version.get_mut())).await?;
        *self.wallet_version.get_mut() = version;
        Ok(())
    }

    /// Stores `copy` (a changed duplicate of the wallet held) over the
    /// version held, and only then holds it: if the server refuses (another
    /// client changed the wallet), the wallet held stays as it was.
    pub(super) async fn store_wallet(&self, copy: Wallet, based_on: u64) -> Result<(), AccountError> {
        use std::sync::atomic::Ordering;
        let sealed = seal_blocking(&copy, &self.passphrase, self.wallet_kdf).await?;
        let version = self.remote.put_wallet(sealed, Some(based_on)).await?;
        let mut held = self.wallet.write();
        // Only over the wallet the copy was made from: one read meanwhile
        // (which a truthful server's answer to the If-Match rules out) stays.
        if self.wallet_version.load(Ordering::Acquire) != based_on {
            return Err(AccountError::Refused("the wallet changed while it was being stored".into()));
        }
        *held = copy;
        self.wallet_version.store(version, Ordering::Release);
        Ok(())
    }

    /// A copy of the wallet held, with the server's version of it (read
    /// together: the version changes only under the wallet's write lock).
    pub(super) fn wallet_copy(&self) -> (Wallet, u64) {
        let held = self.wallet.read();
        (held.duplicate(), self.wallet_version.load(std::sync::atomic::Ordering::Acquire))
    }

    /// The user's vaults with their names opened (shares sealed for this user
    /// are opened first; one that does not open is logged, and its vault's
    /// name stays unopened).
    pub async fn vaults(&self) -> Result<Vec<NamedVault>, AccountError> {
        let infos = self.remote.vaults().await?;
        for (vault, e) in self.accept_shares(&infos).await {
            tracing::warn!(%vault, error = %e, "the vault's share did not open");
        }
        Ok(infos
            .into_iter()
            .map(|info| {
                let shared_by = self.shared.read().get(&info.id).map(|a| a.sender.clone());
                NamedVault { name: self.open_vault_name(&info), shared_by, info }
            })
            .collect())
    }

    fn open_vault_name(&self, info: &VaultInfo) -> Option<String> {
        let key_id = crypto::names::name_key_id(&info.name.0).ok()?;
        let key = self.vault_key(info.id, key_id)?;
        let plain = open_name(&key, &NameContext::VaultName { vault: info.id }, &info.name.0).ok()?;
        String::from_utf8(plain.to_vec()).ok()
    }
}

impl Unlocked<super::http::HttpRemote> {
    /// Changes the passphrase: the wallet is sealed under `new` (with at
    /// least the default Argon2id cost) and stored together with the new
    /// login key, in one transaction on the server. The old passphrase then
    /// opens nothing: not the login, not the wallet; other sessions end.
    pub async fn change_passphrase(
        &mut self,
        access: &super::http::ServerAccess,
        new: &[u8],
        floor: KdfParams,
    ) -> Result<(), AccountError> {
        if new == &self.passphrase[..] {
            return Err(AccountError::Refused("the new passphrase is the old one".into()));
        }
        let kdf = if self.wallet_kdf.is_weaker_than(&KdfParams::DEFAULT) {
            KdfParams::DEFAULT
        } else {
            self.wallet_kdf
        };
        let sealed = seal_blocking(self.wallet.get_mut(), new, kdf).await?;
        let held = *self.wallet_version.get_mut();
        *self.wallet_version.get_mut() =
            self.remote.change_passphrase(access, new, floor, sealed, held).await?;
        self.passphrase = zeroize::Zeroizing::new(new.to_vec());
        self.wallet_kdf = kdf;
        Ok(())
    }
}

/// Opens a sealed wallet on the blocking pool (Argon2id takes a while).
async fn open_blocking(
    blob: Vec<u8>,
    passphrase: &zeroize::Zeroizing<Vec<u8>>,
) -> Result<Result<(Wallet, KdfParams), crypto::CryptoError>, AccountError> {
    let pass = passphrase.clone();
    Ok(tokio::task::spawn_blocking(move || Wallet::open(&blob, &pass))
        .await
        .map_err(|e| RemoteError::Protocol(e.to_string()))?)
}

async fn seal_blocking(wallet: &Wallet, passphrase: &[u8], kdf: KdfParams) -> Result<Vec<u8>, AccountError> {
    // Argon2id blocks for a noticeable time. The wallet holds keys and is not
    // Clone, so rather than moving a copy to the blocking pool it is sealed in
    // place, telling a multi-threaded runtime to move other tasks off this worker.
    let seal = || wallet.seal(passphrase, kdf, &mut OsRandom);
    let sealed = match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(seal)
        }
        _ => seal(),
    }?;
    Ok(sealed)
}

/// A short text for a vault's rights.
pub fn rights_label(r: Rights) -> &'static str {
    r.as_str()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Limits;
    use crate::remote::memory::MemoryServer;

    const FAST: KdfParams = KdfParams { m_cost_kib: 64, t_cost: 1, p_cost: 1 };

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn vaults_are_created_listed_and_survive_a_new_session() {
        let server = MemoryServer::new().unwrap();
        let alice = server.add_user("alice", Limits::DEFAULT).await.unwrap();
        let mut unlocked = Unlocked::create_wallet(alice.clone(), b"pw", FAST).await.unwrap();
        unlocked.create_vault("Family", false).await.unwrap();
        unlocked.create_vault("Tax", true).await.unwrap();

        let again = Unlocked::open(alice, b"pw").await.unwrap();
        let mut names: Vec<_> = again.vaults().await.unwrap().into_iter().map(|v| v.name.unwrap()).collect();
        names.sort();
        assert_eq!(names, ["Family", "Tax"]);
        assert_eq!(again.wallet().entries().len(), 2);
    }

    /// Another client's change is read again; an older wallet put back by the
    /// server (a rollback, here with a newer version number) is not.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_wallet_is_read_again_when_changed_but_never_rolled_back() {
        let server = MemoryServer::new().unwrap();
        let alice = server.add_user("alice", Limits::DEFAULT).await.unwrap();
        let mut first = Unlocked::create_wallet(alice.clone(), b"pw", FAST).await.unwrap();
        first.create_vault("Family", false).await.unwrap();
        let mount = Unlocked::open(alice.clone(), b"pw").await.unwrap();
        assert!(!mount.refresh_wallet(|_| Ok(())).await.unwrap(), "unchanged");
        let (old_blob, _) = alice.wallet().await.unwrap().unwrap();
        first.create_vault("Tax", false).await.unwrap();
        assert!(mount.refresh_wallet(|_| Ok(())).await.unwrap());
        assert_eq!(mount.wallet().entries().len(), 2);
        // The freshness check may refuse too.
        let (_, v) = alice.wallet().await.unwrap().unwrap();
        alice.put_wallet(old_blob, Some(v)).await.unwrap();
        let e = mount.refresh_wallet(|_| Ok(())).await.unwrap_err().to_string();
        assert!(e.contains("older than the one held"), "{e}");
        assert_eq!(mount.wallet().entries().len(), 2, "the newer wallet stays");
        let mut third = Unlocked::open(alice.clone(), b"pw").await.unwrap();
        third.create_vault("Later", false).await.unwrap();
        let e = mount.refresh_wallet(|r| Err(format!("revision {r} refused"))).await.unwrap_err().to_string();
        assert!(e.contains("refused"), "{e}");
        assert_eq!(mount.wallet().entries().len(), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn wrong_passphrase_does_not_open_the_wallet() {
        let server = MemoryServer::new().unwrap();
        let alice = server.add_user("alice", Limits::DEFAULT).await.unwrap();
        Unlocked::create_wallet(alice.clone(), b"pw", FAST).await.unwrap();
        let e = Unlocked::open(alice, b"nope").await.err().unwrap();
        assert!(matches!(e, AccountError::WalletNotOpened { recoverable: false }), "{e}");
        assert!(e.to_string().contains("--start-over"), "{e}");
    }

    /// A recovery key restores every vault under a new passphrase; a wrong
    /// one changes nothing; starting over is refused while the passphrase
    /// opens the wallet, and otherwise leaves an empty one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_recovery_key_restores_the_wallet_and_a_start_over_needs_a_lost_one() {
        let server = MemoryServer::new().unwrap();
        let alice = server.add_user("alice", Limits::DEFAULT).await.unwrap();
        let mut first = Unlocked::create_wallet(alice.clone(), b"pw", FAST).await.unwrap();
        first.create_vault("Family", false).await.unwrap();
        let paper = crypto::RecoveryKey::generate(&mut OsRandom).unwrap();
        first.set_recovery_key(&paper).await.unwrap();
        first.create_vault("Tax", false).await.unwrap();
        let stored = alice.wallet().await.unwrap().unwrap();

        // The passphrase is lost: a wrong recovery key stores nothing.
        let wrong = crypto::RecoveryKey::generate(&mut OsRandom).unwrap();
        let e = Unlocked::recover(alice.clone(), &wrong, b"new", FAST, |_| Ok(())).await.err().unwrap();
        assert!(e.to_string().contains("does not open the wallet"), "{e}");
        assert_eq!(alice.wallet().await.unwrap().unwrap(), stored, "nothing stored");
        let e = Unlocked::open(alice.clone(), b"new").await.err().unwrap();
        assert!(matches!(e, AccountError::WalletNotOpened { recoverable: true }), "{e}");

        // Refused by this machine's freshness check: nothing stored.
        let e = Unlocked::recover(alice.clone(), &paper, b"new", FAST, |w| {
            Err(format!("revision {}", w.revision()))
        })
        .await
        .err()
        .unwrap();
        assert!(e.to_string().contains("revision"), "{e}");
        assert_eq!(alice.wallet().await.unwrap().unwrap(), stored, "nothing stored");
        let restored = Unlocked::recover(alice.clone(), &paper, b"new", FAST, |_| Ok(())).await.unwrap();
        let mut names: Vec<_> = restored.vaults().await.unwrap().into_iter().filter_map(|v| v.name).collect();
        names.sort();
        assert_eq!(names, ["Family", "Tax"], "every vault, also one made after the key");
        assert!(matches!(
            Unlocked::open(alice.clone(), b"pw").await,
            Err(AccountError::WalletNotOpened { .. })
        ));
        let again = Unlocked::open(alice.clone(), b"new").await.unwrap();
        assert!(again.wallet().has_recovery(), "still recoverable with the same key");
        assert_eq!(
            again.wallet().user_key().map(|k| k.public()),
            first.wallet().user_key().map(|k| k.public())
        );

        let e = Unlocked::start_over(alice.clone(), b"new", FAST, true).await.err().unwrap();
        assert!(e.to_string().contains("nothing to start over"), "{e}");
        assert_eq!(Unlocked::open(alice.clone(), b"new").await.unwrap().wallet().entries().len(), 2);
        // A recoverable wallet is discarded only when asked to.
        let e = Unlocked::start_over(alice.clone(), b"other", FAST, false).await.err().unwrap();
        assert!(e.to_string().contains("--discard-recoverable-wallet"), "{e}");
        // An altered wallet (the passphrase opens its slot, not its body) is
        // never replaced: the server cannot talk the user into starting over.
        let (good, v) = alice.wallet().await.unwrap().unwrap();
        let mut altered = good.clone();
        *altered.last_mut().unwrap() ^= 1;
        alice.put_wallet(altered, Some(v)).await.unwrap();
        let e = Unlocked::open(alice.clone(), b"new").await.err().unwrap();
        assert!(e.to_string().contains("altered") && !e.to_string().contains("--start-over"), "{e}");
        let e = Unlocked::start_over(alice.clone(), b"new", FAST, true).await.err().unwrap();
        assert!(e.to_string().contains("another reason than the passphrase"), "{e}");
        let (_, v) = alice.wallet().await.unwrap().unwrap();
        alice.put_wallet(good, Some(v)).await.unwrap();
        let fresh = Unlocked::start_over(alice.clone(), b"other", FAST, true).await.unwrap();
        assert!(fresh.wallet().entries().is_empty());
        assert!(fresh.vaults().await.unwrap().iter().all(|v| v.name.is_none()), "the old vaults stay sealed");
    }

    #[test]
    fn login_file_round_trips_privately_and_refuses_unknown_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/login.toml");
        let a = Account {
            server: "https://127.0.0.1:8443".into(),
            user: "alice".into(),
            fingerprint: Some(format!("sha256:{}", "ab".repeat(32))),
            ca_file: None,
            identity: Some(format!("tls-cert:sha256:{}", "ab".repeat(32))),
        };
        a.save(&path).unwrap();
        assert_eq!(Account::load(&path).unwrap(), a);
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(&path, "server = \"x\"\nuser = \"a\"\npasword = \"oops\"\n").unwrap();
        let e = Account::load(&path).unwrap_err().to_string();
        assert!(e.contains("login.toml") && e.contains("pasword"), "{e}");
        let missing = Account::load(&dir.path().join("none.toml")).unwrap_err().to_string();
        assert!(missing.contains("vaultfs login"), "{missing}");
    }
}
