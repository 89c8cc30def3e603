//! The wire format between `vaultfs serve` and its clients (docs/API.md).
//!
//! Metadata travels as JSON; file content as raw bytes. Everything that would
//! reveal a name (vault names, record titles and fields, file names) is a sealed
//! blob from `crypto::names`, carried as base64 in a [`Sealed`] field: the server
//! stores and returns these bytes without being able to read them.

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::ids::{FileId, HolderId, RecordId, VaultId};

/// Unix time in milliseconds, as the server stores times.
pub fn now_ms() -> i64 {
    ms_of(std::time::SystemTime::now())
}

/// Milliseconds since the epoch, as the server stores times (0 before it).
pub fn ms_of(t: std::time::SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// The time a server time in milliseconds stands for (the epoch before it).
pub fn time_from_ms(ms: i64) -> std::time::SystemTime {
    std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64)
}

/// API prefix; bumped only for incompatible changes.
pub const API_PREFIX: &str = "/v1";
/// Header naming the end-to-end flag of an upload (`1` or `0`).
pub const HEADER_E2E: &str = "x-vaultfs-e2e";
/// Header carrying a file's modification time (Unix milliseconds) on upload.
pub const HEADER_MTIME: &str = "x-vaultfs-mtime";
/// Header carrying the sealed manifest of an upload's content (base64;
/// docs/FORMAT.md "File manifests").
pub const HEADER_META: &str = "x-vaultfs-meta";
/// Header asking the server to store an upload's content without committing
/// it (`1`): the answer names it, and `POST /v1/files/{id}/commit` commits it
/// with its manifest, for content whose manifest is known only at its end.
pub const HEADER_STAGE: &str = "x-vaultfs-stage";
/// Header carrying the base64 sealed name of a file created with its
/// content (`PUT /v1/records/{record}/files/{file}`).
pub const HEADER_NAME: &str = "x-vaultfs-name";
/// Header asking the server to create the record a file is created in, in
/// the same request (`PUT /v1/records/{record}/files/{file}`): the id of the
/// vault it goes in. [`HEADER_RECORD_TITLE`] is then required, and
/// [`HEADER_RECORD_PARENT`] names its parent record (absent: the top of the
/// vault).
pub const HEADER_RECORD_VAULT: &str = "x-vaultfs-record-vault";
/// Header carrying the base64 sealed title of the record created with a file.
pub const HEADER_RECORD_TITLE: &str = "x-vaultfs-record-title";
/// Header naming the parent record of the record created with a file.
pub const HEADER_RECORD_PARENT: &str = "x-vaultfs-record-parent";
/// Header asking the server to keep both versions if the file changed since
/// the expected version: `ID:NAME`, the id and base64 sealed name of a new
/// file, in the same record, that then receives the uploaded content.
pub const HEADER_CONFLICT_COPY: &str = "x-vaultfs-conflict-copy";

/// A stream of content bytes (uploads and downloads are never buffered whole).
pub type ByteStream =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = std::io::Result<bytes::Bytes>> + Send>>;

/// Opaque bytes sealed by the client, base64 on the wire.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Sealed(pub Vec<u8>);

impl std::fmt::Debug for Sealed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sealed({} bytes)", self.0.len())
    }
}

impl Serialize for Sealed {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for Sealed {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(s.as_bytes())
            .map(Sealed)
            .map_err(|e| serde::de::Error::custom(format!("invalid base64: {e}")))
    }
}

/// What a member may do in a vault. Ordered: each right includes the ones below.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Rights {
    /// List and read records and files.
    Read,
    /// Also create, change and delete records and files.
    Write,
    /// Also rename the vault, change its flags and manage members.
    Admin,
}

impl Rights {
    /// The name used on the wire and in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Rights::Read => "read",
            Rights::Write => "write",
            Rights::Admin => "admin",
        }
    }

    /// Parses the wire name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "read" => Some(Rights::Read),
            "write" => Some(Rights::Write),
            "admin" => Some(Rights::Admin),
            _ => None,
        }
    }
}

/// Per-user limits set by the server's admin; the client reads them at mount time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Largest upload accepted, in bytes (the server refuses more with 413).
    pub upload_limit: u64,
    /// Largest file the client encrypts end to end; larger ones pass through.
    pub e2e_limit: u64,
    /// Images with a longer edge than this (pixels) are reduced before upload.
    pub image_max_edge: u32,
}

impl Limits {
    /// 300 MB uploads, 30 MB end-to-end, 2560 px images: the original system's defaults.
    pub const DEFAULT: Limits =
        Limits { upload_limit: 300_000_000, e2e_limit: 30_000_000, image_max_edge: 2560 };
}

/// Argon2id parameters on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KdfWire {
    /// Memory in KiB.
    pub m_cost_kib: u32,
    /// Passes.
    pub t_cost: u32,
    /// Lanes.
    pub p_cost: u32,
}

/// `GET /v1/prelogin?user=NAME`: how to derive the login key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PreLogin {
    /// Argon2id salt for the login key.
    pub salt: Sealed,
    /// Argon2id parameters for the login key.
    pub kdf: KdfWire,
    /// The login-key version the user's stored key was made with
    /// (docs/FORMAT.md "Login key"): 1 for a login from an older vaultfs,
    /// which the client replaces with a version-2 key; absent means 1.
    #[serde(default = "login_v1")]
    pub login_version: u8,
}

fn login_v1() -> u8 {
    1
}

/// `POST /v1/login`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoginRequest {
    /// User name.
    pub user: String,
    /// The login key derived from the passphrase (never the passphrase).
    pub login_key: Sealed,
}

/// `POST /v1/enroll`: first login with the one-time code from the admin.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EnrollRequest {
    /// User name.
    pub user: String,
    /// The enrollment code printed by `vaultfs admin user add`.
    pub code: String,
    /// The login key derived from the passphrase the user chose.
    pub login_key: Sealed,
    /// Its version (absent means 1: an older client).
    #[serde(default = "login_v1")]
    pub login_version: u8,
}

/// `PUT /v1/login-key`: replaces the caller's login key (a version-1 key by a
/// version-2 one, or a new passphrase's), proving the current one.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoginKeyChange {
    /// The login key the server has now.
    pub old_login_key: Sealed,
    /// The new login key.
    pub new_login_key: Sealed,
    /// The new key's version.
    pub login_version: u8,
    /// For a new passphrase: the wallet sealed under it, stored in the same
    /// transaction as the new key (so the login and the wallet never disagree
    /// about the passphrase), replacing wallet version `wallet_version`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wallet: Option<Sealed>,
    /// The version of the wallet `wallet` replaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wallet_version: Option<u64>,
}

/// Answer to a login-key change that stored a wallet too.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PassphraseChanged {
    /// The wallet's new version.
    pub wallet_version: u64,
}

/// Answer to login and enroll.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Session {
    /// Bearer token for the `Authorization` header.
    pub token: String,
    /// Seconds until the token expires.
    pub expires_in_secs: u64,
}

/// `GET /v1/me`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Me {
    /// User name.
    pub user: String,
    /// The user's limits.
    pub limits: Limits,
}

/// A vault as its member sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VaultInfo {
    /// Vault id.
    pub id: VaultId,
    /// Sealed vault name.
    pub name: Sealed,
    /// The caller's rights.
    pub rights: Rights,
    /// Whether the server refuses uploads that are not end-to-end encrypted.
    pub e2e_required: bool,
    /// Version (ETag) of the vault's own metadata.
    pub version: u64,
    /// The caller's wrapped copy of the vault key, if a client stored one.
    pub wrapped_key: Option<Sealed>,
    /// The number of the vault's latest change (to its records, files,
    /// members, name or flags; 0 from a server without a change feed): a
    /// client whose copy is at this number has nothing to fetch.
    #[serde(default)]
    pub changes: u64,
}

/// `POST /v1/changes/wait`: the vaults' change numbers the caller knows; the
/// answer comes once the caller's vaults are not those (one changed, was
/// added or left), or its wallet's version is not `wallet` (if given), or
/// after `timeout_ms` (at most [`MAX_WAIT_MS`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaitForChanges {
    /// Each vault the caller knows, with its change number.
    pub known: std::collections::BTreeMap<VaultId, u64>,
    /// The version of the caller's wallet it holds (`None`: not watched).
    #[serde(default)]
    pub wallet: Option<u64>,
    /// How long to wait at most, in milliseconds.
    pub timeout_ms: u64,
}

/// The longest a wait for changes is held (below the clients' read timeout).
pub const MAX_WAIT_MS: u64 = 20_000;

/// One byte range of a lock, both ends included (`end` at most `i64::MAX`:
/// the kernel's "to the end of the file").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockRange {
    /// First byte.
    pub start: u64,
    /// Last byte.
    pub end: u64,
    /// A write lock (no other owner may hold any lock over these bytes);
    /// else a read lock (others may hold read locks too).
    pub exclusive: bool,
}

impl LockRange {
    /// Whether two locks of different owners cannot both be held: they
    /// overlap and one of them is a write lock.
    pub fn conflicts_with(&self, other: &LockRange) -> bool {
        self.start <= other.end && other.start <= self.end && (self.exclusive || other.exclusive)
    }
}

/// How long a lock lasts unless renewed, unless the server is set otherwise.
pub const DEFAULT_LOCK_TTL_MS: u64 = 30_000;
/// The largest byte a lock may name.
pub const LOCK_END_MAX: u64 = i64::MAX as u64;
/// Most ranges one owner may hold on one file.
pub const MAX_LOCK_RANGES: usize = 256;
/// Longest label of a lock holder, in bytes.
pub const MAX_LOCK_LABEL: usize = 200;

/// `PUT /v1/files/{id}/locks`: from now on, `owner` of mount `holder` holds
/// exactly `ranges` of the file (none: it holds nothing). Granted when no
/// other owner holds a conflicting lock, waiting up to `wait_ms` (at most
/// [`MAX_WAIT_MS`]) for one to go. A request whose `seq` is below one already
/// taken for this owner is refused, and a waiting one gives up when a newer
/// one arrives: a client that gave up on a wait can take back what it asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetLocks {
    /// The mount.
    pub holder: HolderId,
    /// The lock owner within the mount (a process, or an open file).
    pub owner: u64,
    /// Increases with each request of the mount.
    pub seq: u64,
    /// What the owner holds from now on.
    pub ranges: Vec<LockRange>,
    /// Who holds it, for other members to see (a host and process).
    #[serde(default)]
    pub label: String,
    /// How long to wait for conflicting locks to go, in milliseconds.
    #[serde(default)]
    pub wait_ms: u64,
}

/// The answer to [`SetLocks`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockAnswer {
    /// Whether the owner now holds what it asked for (else it holds what it
    /// held before).
    pub granted: bool,
    /// A lock that stood in the way, when not granted.
    #[serde(default)]
    pub blocker: Option<HeldLock>,
    /// The file's version when answered.
    pub version: u64,
    /// The file's vault's change number when answered.
    pub changes: u64,
    /// How long a lock lasts unless renewed, in milliseconds.
    pub ttl_ms: u64,
}

/// A lock someone holds on a file (`GET /v1/files/{id}/locks`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldLock {
    /// The user holding it.
    pub user: String,
    /// The holding mount's label.
    pub label: String,
    /// The holding mount.
    pub holder: HolderId,
    /// The owner within that mount.
    pub owner: u64,
    /// The bytes and kind.
    pub range: LockRange,
    /// When it ends unless renewed, in milliseconds from the answer.
    pub expires_in_ms: u64,
}

/// `POST /v1/locks/renew` and `DELETE /v1/locks/{holder}`: what a mount's
/// locks came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocksRenewed {
    /// How many ranges the mount holds (renewed), or held (dropped).
    pub ranges: u64,
    /// How long they last now unless renewed again, in milliseconds.
    pub ttl_ms: u64,
}

/// `POST /v1/locks/renew`: keep the locks of `holder` that `held` names, and
/// drop its others.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenewLocks {
    /// The mount.
    pub holder: HolderId,
    /// Each file and owner the mount holds locks of.
    #[serde(default)]
    pub held: Vec<LockOwnerOf>,
}

/// One owner's locks on one file, as a mount names them when renewing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LockOwnerOf {
    /// The file.
    pub file: FileId,
    /// The owner.
    pub owner: u64,
}

/// Most (file, owner) pairs one renewal may name.
pub const MAX_LOCK_OWNERS: usize = 65_536;

/// One object of a [`DeleteMany`], deleted only if it is still at `version`
/// (and, a record, empty by then).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DeleteItem {
    /// A file.
    File {
        /// The file.
        id: FileId,
        /// The version the caller knows.
        version: u64,
    },
    /// A record.
    Record {
        /// The record.
        id: RecordId,
        /// The version the caller knows.
        version: u64,
    },
}

/// `POST /v1/deletes`: deletes files and records in the order given, each on
/// its own terms (one that cannot go does not stop the others), committed
/// together. A record after the files in it goes once they went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteMany {
    /// At most [`MAX_DELETES`].
    pub items: Vec<DeleteItem>,
}

/// Most objects one [`DeleteMany`] may name.
pub const MAX_DELETES: usize = 1000;

/// What became of one object of a [`DeleteMany`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum DeleteOutcome {
    /// Deleted now.
    Deleted,
    /// No such object (or not in a vault of the caller's).
    NotFound,
    /// Not at the version named: this is its version.
    Conflict {
        /// The current version.
        current: u64,
    },
    /// The caller may not delete it.
    Forbidden {
        /// Why.
        message: String,
    },
    /// Not now: a record that is not empty.
    Refused {
        /// Why.
        message: String,
    },
}

/// The answer to a [`DeleteMany`]: one outcome per object, in its order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeletedMany {
    /// The outcomes.
    pub outcomes: Vec<DeleteOutcome>,
}

/// The answer to [`WaitForChanges`]: each of the caller's vaults with its
/// change number now.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VaultChanges {
    /// Each vault the caller is a member of, with its change number.
    pub vaults: std::collections::BTreeMap<VaultId, u64>,
    /// The version of the caller's wallet now (`None`: it has none).
    #[serde(default)]
    pub wallet: Option<u64>,
}

/// `GET /v1/vaults/{id}/changes?since=N`: what changed in a vault after its
/// change `N`, each object once, as it is now. A client too far behind (or
/// ahead: the server's history is not the one it saw) gets 410 and lists the
/// vault again.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Changes {
    /// The change number these changes bring the caller to: ask again from here.
    pub until: u64,
    /// Whether more changes follow (ask again with `since = until`).
    pub more: bool,
    /// Records created or changed, as they are now.
    pub records: Vec<RecordInfo>,
    /// Files created or changed, as they are now.
    pub files: Vec<FileInfo>,
    /// Records deleted.
    pub deleted_records: Vec<RecordId>,
    /// Files deleted.
    pub deleted_files: Vec<FileId>,
    /// Whether the vault's name, flags or members changed (list the vaults again).
    pub vault_changed: bool,
}

/// `POST /v1/vaults`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NewVault {
    /// Client-chosen random id (the sealed name is bound to it).
    pub id: VaultId,
    /// Sealed vault name.
    pub name: Sealed,
    /// Refuse plaintext uploads.
    #[serde(default)]
    pub e2e_required: bool,
    /// The creator's wrapped copy of the vault key, if any.
    #[serde(default)]
    pub wrapped_key: Option<Sealed>,
}

/// `PATCH /v1/vaults/{id}` (If-Match required).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct VaultUpdate {
    /// New sealed name.
    #[serde(default)]
    pub name: Option<Sealed>,
    /// New end-to-end-required flag.
    #[serde(default)]
    pub e2e_required: Option<bool>,
}

/// A user's public key for shares (`GET /v1/users/{user}/key`,
/// `PUT /v1/me/key`): 32 bytes of X25519 (docs/FORMAT.md "User keys and
/// shares"). The server stores it and hands it out; clients check it by its
/// fingerprint, never on the server's word.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserKey {
    /// User name.
    pub user: String,
    /// The public key.
    pub public_key: Sealed,
}

/// A vault member, as listed to admins of the vault.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// User name.
    pub user: String,
    /// The member's rights.
    pub rights: Rights,
    /// The member's wrapped copy of the vault key, if any.
    #[serde(default)]
    pub wrapped_key: Option<Sealed>,
}

/// A record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordInfo {
    /// Record id.
    pub id: RecordId,
    /// Vault id.
    pub vault: VaultId,
    /// Parent record; `None` at the top of the vault.
    pub parent: Option<RecordId>,
    /// Sealed title.
    pub title: Sealed,
    /// Sealed fields (may be empty).
    pub fields: Sealed,
    /// Version (ETag).
    pub version: u64,
}

/// `POST /v1/vaults/{id}/records`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NewRecord {
    /// Client-chosen random id.
    pub id: RecordId,
    /// Parent record, in the same vault.
    #[serde(default)]
    pub parent: Option<RecordId>,
    /// Sealed title.
    pub title: Sealed,
    /// Sealed fields.
    #[serde(default)]
    pub fields: Sealed,
}

impl NewRecord {
    /// What the record is once made in `vault`: its first version.
    pub fn created_in(&self, vault: VaultId) -> RecordInfo {
        RecordInfo {
            id: self.id,
            vault,
            parent: self.parent,
            title: self.title.clone(),
            fields: self.fields.clone(),
            version: 1,
        }
    }
}

/// `PATCH /v1/records/{id}` (If-Match required). `parent` is `{"to": null}` to
/// move a record to the top of its vault.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RecordUpdate {
    /// New sealed title.
    #[serde(default)]
    pub title: Option<Sealed>,
    /// New sealed fields.
    #[serde(default)]
    pub fields: Option<Sealed>,
    /// New parent.
    #[serde(default)]
    pub parent: Option<ParentChange>,
}

/// A new parent for a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentChange {
    /// The new parent, or `None` for the top of the vault.
    pub to: Option<RecordId>,
}

/// A file linked to a record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileInfo {
    /// File id.
    pub id: FileId,
    /// Vault id.
    pub vault: VaultId,
    /// The record the file is linked to.
    pub record: RecordId,
    /// Sealed file name.
    pub name: Sealed,
    /// Stored content length in bytes (ciphertext length for end-to-end files).
    pub size: u64,
    /// Version (ETag); 1 for a new, empty file.
    pub version: u64,
    /// Whether the uploader said the content is end-to-end encrypted (the
    /// server's record; the client reads the authenticated `meta` instead).
    pub e2e: bool,
    /// Modification time, Unix milliseconds.
    pub mtime_ms: i64,
    /// The content's sealed manifest, as the writer stored it (empty for a
    /// file written by a client older than manifests).
    #[serde(default)]
    pub meta: Sealed,
}

/// `POST /v1/records/{id}/files`: a new, empty file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NewFile {
    /// Client-chosen random id.
    pub id: FileId,
    /// Sealed file name.
    pub name: Sealed,
    /// Whether content will be end-to-end encrypted.
    #[serde(default = "default_true")]
    pub e2e: bool,
    /// Modification time, Unix milliseconds (server time if absent).
    #[serde(default)]
    pub mtime_ms: Option<i64>,
    /// The sealed manifest of its (empty, or for a conflict copy, uploaded)
    /// content.
    #[serde(default)]
    pub meta: Sealed,
}

fn default_true() -> bool {
    true
}

/// `PATCH /v1/files/{id}` (If-Match required): rename, move within the vault, touch.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FileUpdate {
    /// New sealed name.
    #[serde(default)]
    pub name: Option<Sealed>,
    /// New record (same vault).
    #[serde(default)]
    pub record: Option<RecordId>,
    /// New modification time.
    #[serde(default)]
    pub mtime_ms: Option<i64>,
    /// A manifest for content that has none (written by an older client),
    /// set without changing the content.
    #[serde(default)]
    pub meta: Option<Sealed>,
}

/// Answer to an upload stored but not committed (`x-vaultfs-stage: 1`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Staged {
    /// Names the stored content in the commit (hex).
    pub staged: String,
    /// Bytes stored.
    pub size: u64,
}

/// `POST /v1/files/{id}/commit` (If-Match required): makes staged content the
/// file's, with its manifest.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CommitRequest {
    /// What the stage answer named.
    pub staged: String,
    /// The content's sealed manifest.
    pub meta: Sealed,
    /// Modification time (server time if absent).
    #[serde(default)]
    pub mtime_ms: Option<i64>,
    /// Where the content goes instead if the file is no longer at the
    /// expected version: a new file in the same record, with its own name and
    /// manifest.
    #[serde(default)]
    pub conflict_copy: Option<NewFile>,
}

/// Answer to a content upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadResult {
    /// The new version of the file that received the content.
    pub version: u64,
    /// Bytes stored.
    pub size: u64,
    /// Set if the file had changed and the content went to the conflict copy
    /// asked for (the original is untouched).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conflict_copy: Option<FileId>,
}

/// Every error response: `{"error": {"code": "...", "message": "..."}}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// Machine-readable code and human-readable message.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Stable code, e.g. `not_found`, `version_conflict` (docs/API.md lists them).
    pub code: String,
    /// What went wrong, for people.
    pub message: String,
}

/// Formats a version as an ETag value.
pub fn etag(version: u64) -> String {
    format!("\"{version}\"")
}

/// Parses an ETag / If-Match value (`"3"`, or `W/"3"` leniently).
pub fn parse_etag(value: &str) -> Option<u64> {
    let v = value.trim();
    let v = v.strip_prefix("W/").unwrap_or(v);
    v.strip_prefix('"')?.strip_suffix('"')?.parse().ok()
}

/// The whole length from a `Content-Range: bytes A-B/LEN` value.
pub fn parse_content_range_len(value: &str) -> Option<u64> {
    let (unit, rest) = value.trim().split_once(' ')?;
    if unit != "bytes" {
        return None;
    }
    rest.rsplit_once('/')?.1.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_is_base64_and_rejects_garbage() {
        let json = serde_json::to_string(&Sealed(vec![0, 1, 2, 255])).unwrap();
        assert_eq!(json, "\"AAEC/w==\"");
        assert_eq!(serde_json::from_str::<Sealed>(&json).unwrap(), Sealed(vec![0, 1, 2, 255]));
        assert!(serde_json::from_str::<Sealed>("\"not base64!\"").is_err());
    }

    #[test]
    fn etags_round_trip() {
        assert_eq!(parse_etag(&etag(42)), Some(42));
        assert_eq!(parse_etag("W/\"7\""), Some(7));
        assert_eq!(parse_etag("7"), None);
        assert_eq!(parse_etag("\"x\""), None);
    }

    #[test]
    fn rights_are_ordered() {
        assert!(Rights::Admin > Rights::Write && Rights::Write > Rights::Read);
        for r in [Rights::Read, Rights::Write, Rights::Admin] {
            assert_eq!(Rights::parse(r.as_str()), Some(r));
        }
        assert_eq!(serde_json::to_string(&Rights::Write).unwrap(), "\"write\"");
    }

    #[test]
    fn ids_serialize_as_hex() {
        let id = VaultId([0xab; 16]);
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, format!("\"{}\"", "ab".repeat(16)));
        assert!(serde_json::from_str::<VaultId>("\"abc\"").is_err());
    }
}
