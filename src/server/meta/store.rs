//! What the service asks of its metadata store, whichever database is
//! underneath: SQLite in one file ([`super::Meta`], the embedded default) or
//! PostgreSQL shared by several server instances ([`super::postgres`]).
//!
//! Each call is one step of the service's work; the service runs a few of
//! them together as one unit (a closure given a `&mut dyn MetaStore`), and
//! the store makes that unit atomic: SQLite by running it under one lock,
//! PostgreSQL in one transaction (each mutating call inside it in a
//! savepoint of its own, so a call that fails leaves nothing behind, as a
//! failed SQLite transaction does). Every versioned update is a
//! compare-and-swap on `version` on both, so of two writers holding one
//! version, exactly one wins, whichever instance each one asked.

use std::collections::HashSet;

use crate::ids::{FileId, HolderId, RecordId, VaultId};
use crate::protocol::{
    Changes, DeleteItem, DeleteOutcome, FileInfo, FileUpdate, HeldLock, KdfWire, Limits, Member, NewFile,
    NewRecord, NewVault, RecordInfo, RecordUpdate, Rights, Sealed, SetLocks, VaultInfo, VaultUpdate,
};
use crate::server::blob::BlobId;

use super::{Committed, FileRow, LockOutcome, Result, User};

/// The metadata operations (see the module comment).
pub trait MetaStore: Send {
    /// A random secret created on first use (for fake pre-login answers).
    fn server_secret(&mut self) -> Result<[u8; 32]>;

    /// Stores a small setting (JSON) under `key`.
    fn put_setting(&mut self, key: &str, value: &[u8]) -> Result<()>;

    /// Reads a setting stored with [`MetaStore::put_setting`].
    fn setting(&self, key: &str) -> Result<Option<Vec<u8>>>;

    // ---- users -------------------------------------------------------------

    /// Creates a user awaiting enrollment.
    fn create_user(
        &mut self,
        name: &str,
        limits: Limits,
        login_salt: &[u8],
        kdf: KdfWire,
        enroll_hash: &[u8],
    ) -> Result<()>;

    /// Looks a user up by name.
    fn user_by_name(&self, name: &str) -> Result<Option<User>>;

    /// All users, by name.
    fn users(&self) -> Result<Vec<User>>;

    /// Replaces a user's limits.
    fn set_limits(&mut self, name: &str, limits: Limits) -> Result<()>;

    /// Removes a user, their sessions, wallet and memberships. Vaults they were the
    /// only admin of stay, without an admin (the server admin can see them).
    fn remove_user(&mut self, name: &str) -> Result<()>;

    /// Sets a new enrollment code (and clears the login key), e.g. for a reset.
    fn reset_enrollment(&mut self, name: &str, enroll_hash: &[u8], login_salt: &[u8]) -> Result<()>;

    /// Completes enrollment: stores the login-key hash and its version,
    /// consumes the code.
    fn complete_enrollment(&mut self, user_id: i64, login_hash: &[u8], version: u8) -> Result<()>;

    /// Replaces a user's login-key hash if it is still `old_hash`.
    fn change_login_key(
        &mut self,
        user_id: i64,
        old_hash: &[u8],
        new_hash: &[u8],
        version: u8,
    ) -> Result<bool>;

    /// A new passphrase, in one transaction: the login-key hash (if it is still
    /// `old_hash`), the wallet sealed under the new passphrase (if it is still
    /// at `wallet_version`), and every session of the user but `keep_session`
    /// ended. `None` if the old hash did not match (nothing changed).
    #[allow(clippy::too_many_arguments)]
    fn change_passphrase(
        &mut self,
        user_id: i64,
        old_hash: &[u8],
        new_hash: &[u8],
        version: u8,
        wallet: &[u8],
        wallet_version: u64,
        keep_session: &[u8],
    ) -> Result<Option<u64>>;

    /// Stores the public key the user publishes for shares (replacing any).
    fn set_public_key(&mut self, user_id: i64, key: &[u8]) -> Result<()>;

    /// The public key `name` published, if the user exists and published one.
    fn public_key(&self, name: &str) -> Result<Option<Vec<u8>>>;

    // ---- sessions ----------------------------------------------------------

    /// Stores a new session.
    fn create_session(&mut self, user_id: i64, token_hash: &[u8], expires: i64) -> Result<()>;

    /// The user a live session belongs to.
    fn session_user(&self, token_hash: &[u8], now: i64) -> Result<Option<User>>;

    /// Ends a session.
    fn delete_session(&mut self, token_hash: &[u8]) -> Result<()>;

    // ---- wallets -----------------------------------------------------------

    /// The user's sealed wallet and its version.
    fn wallet(&self, user_id: i64) -> Result<Option<(Vec<u8>, u64)>>;

    /// The version of the user's wallet, if it has one.
    fn wallet_version(&self, user_id: i64) -> Result<Option<u64>>;

    /// Stores the wallet if `expected` matches: `None` means "must not exist yet".
    fn put_wallet(&mut self, user_id: i64, blob: &[u8], expected: Option<u64>) -> Result<u64>;

    // ---- vaults and members ------------------------------------------------

    /// The rights `user_id` has in `vault`, or `None` if not a member (or no vault).
    fn rights(&self, user_id: i64, vault: VaultId) -> Result<Option<Rights>>;

    /// Creates a vault with the creator as admin.
    fn create_vault(&mut self, user_id: i64, v: &NewVault) -> Result<u64>;

    /// Vaults `user_id` is a member of.
    fn vaults_of(&self, user_id: i64) -> Result<Vec<VaultInfo>>;

    /// One vault as `user_id` sees it.
    fn vault_of(&self, user_id: i64, vault: VaultId) -> Result<VaultInfo>;

    /// Whether the vault refuses plaintext uploads.
    fn e2e_required(&self, vault: VaultId) -> Result<bool>;

    /// Changes a vault's name or flags.
    fn update_vault(&mut self, vault: VaultId, expected: u64, u: &VaultUpdate) -> Result<u64>;

    /// Deletes an empty vault.
    fn delete_vault(&mut self, vault: VaultId, expected: u64) -> Result<()>;

    /// Members of a vault.
    fn members(&self, vault: VaultId) -> Result<Vec<Member>>;

    /// Adds a member or changes their rights. Refuses to remove the last admin.
    fn set_member(&mut self, vault: VaultId, m: &Member) -> Result<()>;

    /// Removes a member. Refuses to remove the last admin.
    fn remove_member(&mut self, vault: VaultId, user: &str) -> Result<()>;

    /// Every vault with its members (for the server admin).
    fn all_vaults(&self) -> Result<Vec<(VaultId, Vec<Member>)>>;

    /// What changed in `vault` after its change `since`, at most `limit`
    /// objects (oldest change first); `None` when `since` is further back than
    /// the deletions kept, or ahead of the vault (another history).
    fn changes(&self, vault: VaultId, since: u64, limit: usize) -> Result<Option<Changes>>;

    /// Creates a record in `vault` (its parent must be in the same vault).
    fn create_record(&mut self, vault: VaultId, r: &NewRecord) -> Result<RecordInfo>;

    /// One record.
    fn record(&self, id: RecordId) -> Result<RecordInfo>;

    /// All records of a vault.
    fn records(&self, vault: VaultId) -> Result<Vec<RecordInfo>>;

    /// Changes a record's title, fields or parent (same vault, no cycles).
    fn update_record(&mut self, id: RecordId, expected: u64, u: &RecordUpdate) -> Result<RecordInfo>;

    /// Deletes a record that has no child records and no files.
    fn delete_record(&mut self, id: RecordId, expected: u64) -> Result<()>;

    /// Deletes `items` in order, each as [`MetaStore::delete_file`] or
    /// [`MetaStore::delete_record`] would if user `user_id` may write in its vault,
    /// in one transaction (one commit, one sync to disk, for all: `rm -r`
    /// removes many). The outcome of each, and the blobs of the files deleted.
    fn delete_many(
        &mut self,
        user_id: i64,
        items: &[DeleteItem],
    ) -> Result<(Vec<DeleteOutcome>, Vec<BlobId>)>;

    // ---- files -------------------------------------------------------------

    /// Creates an empty file linked to `record`.
    fn create_file(&mut self, record: RecordId, f: &NewFile, now_ms: i64) -> Result<FileInfo>;

    /// One file with its blob.
    fn file(&self, id: FileId) -> Result<FileRow>;

    /// Files of a vault, or of one record of it.
    fn files(&self, vault: VaultId, record: Option<RecordId>) -> Result<Vec<FileInfo>>;

    /// Points a file at a newly stored blob, if the file is still at `expected`.
    /// Returns the new version and the blob it replaced (to delete after commit).
    fn commit_upload(&mut self, id: FileId, expected: u64, c: &Committed) -> Result<(u64, Option<BlobId>)>;

    /// Creates file `f` in `record` with content `c`, in one transaction:
    /// the file appears with its content or not at all. Returns its version.
    /// With `new_record` (its vault, and `record` as its id), the record is
    /// created first in the same transaction, checked as
    /// [`MetaStore::create_record`] checks it.
    fn create_with_content(
        &mut self,
        new_record: Option<(VaultId, &NewRecord)>,
        record: RecordId,
        f: &NewFile,
        c: &Committed,
    ) -> Result<u64>;

    /// Creates file `copy` in `id`'s record and commits `c` to it: where a
    /// stream whose file moved on goes.
    fn commit_to_copy(&mut self, id: FileId, copy: &NewFile, c: &Committed) -> Result<(u64, Option<BlobId>)>;

    /// Stores staged content: kept, not yet a file's, until committed or
    /// collected (see [`MetaStore::collect_staged`]).
    fn stage(&mut self, token: &[u8], file: FileId, user_id: i64, s: &Committed, now_ms: i64) -> Result<()>;

    /// Commits the staged content `token` of `user_id` to file `id` at
    /// `expected`, with `meta`; or, if the file moved on (or is gone) and
    /// `conflict_copy` is given, to that new file instead. One transaction:
    /// the staged entry is used up exactly when a file points at its blob.
    /// Returns the new version, the replaced blob, the size, and whether the
    /// copy took it.
    #[allow(clippy::too_many_arguments)]
    fn commit_staged(
        &mut self,
        token: &[u8],
        id: FileId,
        user_id: i64,
        expected: u64,
        meta: &Sealed,
        mtime_ms: i64,
        conflict_copy: Option<&NewFile>,
    ) -> Result<(u64, Option<BlobId>, u64, bool)>;

    /// Forgets staged content older than `before_ms` (a client that never
    /// committed it: it crashed, or lost the connection); returns the blobs
    /// to delete.
    fn collect_staged(&mut self, before_ms: i64) -> Result<Vec<BlobId>>;

    /// Renames, moves (within the vault) or touches a file.
    fn update_file(&mut self, id: FileId, expected: u64, u: &FileUpdate) -> Result<FileInfo>;

    /// Deletes a file; returns its blob (to delete after commit).
    fn delete_file(&mut self, id: FileId, expected: u64) -> Result<Option<BlobId>>;

    /// Bytes of file content the server stores (each file's current
    /// version; metrics).
    fn stored_bytes(&self) -> Result<u64>;

    /// Every blob some file points at (garbage collection keeps exactly these).
    fn blobs_in_use(&self) -> Result<HashSet<String>>;

    /// Makes what `req.owner` of `req.holder` (user `user_id`) holds on `file`
    /// exactly `req.ranges`, if no other owner's live lock conflicts; rows
    /// last until `now_ms + ttl_ms`. Expired rows of the file go first.
    fn set_locks(
        &mut self,
        file: FileId,
        user_id: i64,
        req: &SetLocks,
        now_ms: i64,
        ttl_ms: i64,
    ) -> Result<LockOutcome>;

    /// The live locks on `file`, with their expiry in Unix ms.
    fn locks(&self, file: FileId, now_ms: i64) -> Result<Vec<(HeldLock, i64)>>;

    /// Extends the locks of `holder` (user `user_id`) on the (file, owner)
    /// pairs it says it holds to `now_ms + ttl_ms`, and drops its others (a
    /// request whose answer it never got) and those on files of vaults the
    /// user is no longer a member of; returns how many ranges it holds.
    /// Expired rows anywhere go.
    fn renew_locks(
        &mut self,
        user_id: i64,
        holder: HolderId,
        held: &[(FileId, u64)],
        now_ms: i64,
        ttl_ms: i64,
    ) -> Result<u64>;

    /// Drops every lock of `holder` (user `user_id`); returns how many ranges
    /// it held.
    fn drop_locks(&mut self, user_id: i64, holder: HolderId) -> Result<u64>;

    /// Holds every blob until `expires_ms` (Unix ms), under `id`: set again
    /// with a later time to renew it.
    fn hold_blobs(&mut self, id: &[u8; 16], expires_ms: i64) -> Result<()>;

    /// Ends hold `id`.
    fn end_hold(&mut self, id: &[u8; 16]) -> Result<()>;

    /// Blobs no file needs any more: those that may be deleted now (with
    /// the ones deferred earlier), or none while a hold stands (they are
    /// written down for later). Without holds or deferred blobs, as nearly
    /// always, this only reads.
    fn release_blobs(&mut self, blobs: &[BlobId], now_ms: i64) -> Result<Vec<BlobId>>;
}
