//! Server metadata in SQLite: users, sessions, wallets, vaults, members, records
//! and files.
//!
//! Everything here is synchronous; the API runs it on the blocking pool behind one
//! mutex (SQLite serializes writers anyway). Each mutation is one transaction, and
//! every versioned update is a compare-and-swap on `version`, so of two writers
//! holding the same version exactly one wins and the other sees
//! [`MetaError::VersionMismatch`]. The server never learns a name: names, titles
//! and fields are sealed bytes stored as BLOBs.

use std::collections::HashSet;
use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension, Transaction};

use crate::ids::{hex_encode, FileId, HolderId, RecordId, VaultId};
use crate::protocol::{
    Changes, DeleteItem, DeleteOutcome, FileInfo, FileUpdate, HeldLock, KdfWire, Limits, Member, NewFile,
    NewRecord, NewVault, RecordInfo, RecordUpdate, Rights, Sealed, SetLocks, VaultInfo, VaultUpdate,
};

use super::blob::BlobId;

mod backup;
mod db;
mod locks;
pub mod postgres;
mod store;
pub use backup::{check_snapshot, snapshot_blobs, HoldKeeper};
pub use db::MetaDb;
pub use locks::LockOutcome;
pub use store::MetaStore;

/// Every statement is prepared once per connection and then reused from
/// rusqlite's statement cache: for the small queries a request makes, parsing
/// the SQL cost more than running it (13% of the server's CPU time on small
/// files, measured with perf).
trait CachedSql {
    fn q_row<T, P, F>(&self, sql: &str, params: P, f: F) -> rusqlite::Result<T>
    where
        P: rusqlite::Params,
        F: FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>;
    fn exec<P: rusqlite::Params>(&self, sql: &str, params: P) -> rusqlite::Result<usize>;
}

impl CachedSql for Connection {
    fn q_row<T, P, F>(&self, sql: &str, params: P, f: F) -> rusqlite::Result<T>
    where
        P: rusqlite::Params,
        F: FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    {
        self.prepare_cached(sql)?.query_row(params, f)
    }

    fn exec<P: rusqlite::Params>(&self, sql: &str, params: P) -> rusqlite::Result<usize> {
        self.prepare_cached(sql)?.execute(params)
    }
}

/// Distinct statements the store uses, with room to spare.
const STATEMENT_CACHE: usize = 128;

/// Errors from the metadata store.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// The object does not exist.
    #[error("{0} not found")]
    NotFound(&'static str),
    /// An object with that id or name already exists.
    #[error("{0} already exists")]
    Exists(&'static str),
    /// The caller's version is not the current one.
    #[error("version mismatch: current version is {current}")]
    VersionMismatch {
        /// The current version.
        current: u64,
    },
    /// The change is not allowed in the current state (e.g. record not empty).
    #[error("{0}")]
    Refused(String),
    /// The database was written by a newer vaultfs: nothing is changed.
    #[error(
        "the metadata was written by a newer vaultfs (schema version {found}; this vaultfs knows up to \
         {known}): run that version or newer, or restore a backup this version made"
    )]
    TooNew {
        /// The database's schema version.
        found: i64,
        /// The newest this build knows.
        known: i64,
    },
    /// The database failed.
    #[error("metadata store: {0}")]
    Db(#[from] rusqlite::Error),
    /// The database cannot be reached or used (a poisoned lock, no
    /// connection to be had).
    #[error("metadata store unavailable: {0}")]
    Unavailable(String),
    /// PostgreSQL failed.
    #[error("metadata store: {0}")]
    Postgres(#[from] tokio_postgres::Error),
}

type Result<T> = std::result::Result<T, MetaError>;

/// A user row.
#[derive(Debug, Clone)]
pub struct User {
    /// Internal id.
    pub id: i64,
    /// Login name.
    pub name: String,
    /// Limits set by the admin.
    pub limits: Limits,
    /// Argon2id salt and parameters of the login key.
    pub login_salt: Vec<u8>,
    /// Argon2id parameters of the login key.
    pub kdf: KdfWire,
    /// SHA-256 of the login key, once enrolled.
    pub login_hash: Option<Vec<u8>>,
    /// SHA-256 of the pending enrollment code.
    pub enroll_hash: Option<Vec<u8>>,
    /// Version of the login key (docs/FORMAT.md "Login key").
    pub login_version: u8,
}

/// Stored state of a file, with the blob its content lives in.
#[derive(Debug, Clone)]
pub struct FileRow {
    /// What clients see.
    pub info: FileInfo,
    /// The content blob; `None` for an empty file that was never uploaded.
    pub blob: Option<BlobId>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS users (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    upload_limit INTEGER NOT NULL,
    e2e_limit INTEGER NOT NULL,
    image_max_edge INTEGER NOT NULL,
    login_salt BLOB NOT NULL,
    kdf_m INTEGER NOT NULL, kdf_t INTEGER NOT NULL, kdf_p INTEGER NOT NULL,
    login_hash BLOB,
    enroll_hash BLOB
);
CREATE TABLE IF NOT EXISTS sessions (
    token_hash BLOB PRIMARY KEY,
    user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    expires INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS wallets (
    user_id INTEGER PRIMARY KEY REFERENCES users(id) ON DELETE CASCADE,
    blob BLOB NOT NULL,
    version INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS vaults (
    id BLOB PRIMARY KEY,
    name BLOB NOT NULL,
    e2e_required INTEGER NOT NULL,
    version INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS members (
    vault_id BLOB NOT NULL REFERENCES vaults(id) ON DELETE CASCADE,
    user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    rights TEXT NOT NULL,
    wrapped_key BLOB,
    PRIMARY KEY (vault_id, user_id)
);
CREATE TABLE IF NOT EXISTS records (
    id BLOB PRIMARY KEY,
    vault_id BLOB NOT NULL REFERENCES vaults(id),
    parent_id BLOB REFERENCES records(id),
    title BLOB NOT NULL,
    fields BLOB NOT NULL,
    version INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS records_by_vault ON records(vault_id);
CREATE TABLE IF NOT EXISTS files (
    id BLOB PRIMARY KEY,
    vault_id BLOB NOT NULL REFERENCES vaults(id),
    record_id BLOB NOT NULL REFERENCES records(id),
    name BLOB NOT NULL,
    size INTEGER NOT NULL,
    version INTEGER NOT NULL,
    e2e INTEGER NOT NULL,
    mtime_ms INTEGER NOT NULL,
    blob_id TEXT
);
CREATE INDEX IF NOT EXISTS files_by_vault ON files(vault_id);
CREATE TABLE IF NOT EXISTS staged (
    token BLOB PRIMARY KEY,
    file_id BLOB NOT NULL,
    user_id INTEGER NOT NULL,
    blob_id TEXT NOT NULL,
    size INTEGER NOT NULL,
    e2e INTEGER NOT NULL,
    created_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS files_by_record ON files(record_id);
";

/// Columns added since the first schema, for databases made before them:
/// (table, column, declaration), added by the migrations to versions 2 and
/// 3 where missing. A column added from now on comes with a migration step
/// of its own (and a new [`SCHEMA_VERSION`]).
const ADDED_COLUMNS: &[(&str, &str, &str)] = &[
    ("users", "login_version", "INTEGER NOT NULL DEFAULT 1"),
    ("files", "meta", "BLOB"),
    ("users", "public_key", "BLOB"),
    ("vaults", "seq", "INTEGER NOT NULL DEFAULT 0"),
];

/// How many changes of a vault the change feed keeps deletions for: a client
/// further behind lists the vault again.
pub const CHANGE_HISTORY: u64 = 10_000;

/// The change feed (docs/API.md "Changes"): every insert, update and delete of
/// a record, file or member, and every change of a vault's name or flags,
/// takes the vault's next change number (`vaults.seq`) and leaves one row per
/// object in `changes` with the number of its latest change (a deleted record
/// or file as a tombstone, kept for [`CHANGE_HISTORY`] changes), and counts
/// the changes of all vaults in `feed` (what waits for changes wake on).
/// Triggers, so that no write path can forget one; made by
/// the first of [`MIGRATIONS`], after [`ADDED_COLUMNS`], as they use
/// `vaults.seq`.
fn change_triggers() -> String {
    let mut sql = String::from(
        "CREATE TABLE IF NOT EXISTS changes (
            vault_id BLOB NOT NULL REFERENCES vaults(id) ON DELETE CASCADE,
            object BLOB NOT NULL,
            kind INTEGER NOT NULL,
            gone INTEGER NOT NULL,
            seq INTEGER NOT NULL,
            PRIMARY KEY (vault_id, object)
        ) WITHOUT ROWID;
        CREATE INDEX IF NOT EXISTS changes_by_seq ON changes(vault_id, seq);
        CREATE INDEX IF NOT EXISTS tombstones ON changes(vault_id, seq) WHERE gone = 1;
        CREATE TABLE IF NOT EXISTS feed (n INTEGER NOT NULL);
        INSERT INTO feed (n) SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM feed);\n",
    );
    // The statements that give `vault`'s next change number to `object`.
    let note = |vault: &str, object: &str, kind: u8, gone: u8| {
        format!(
            "UPDATE feed SET n = n + 1;
             UPDATE vaults SET seq = seq + 1 WHERE id = {vault};
             INSERT INTO changes (vault_id, object, kind, gone, seq)
                 SELECT id, {object}, {kind}, {gone}, seq FROM vaults WHERE id = {vault}
                 ON CONFLICT(vault_id, object) DO UPDATE SET kind = excluded.kind, gone = excluded.gone, seq = excluded.seq;"
        )
    };
    for (table, kind) in [("records", KIND_RECORD), ("files", KIND_FILE)] {
        sql += &format!(
            "DROP TRIGGER IF EXISTS {table}_inserted; CREATE TRIGGER {table}_inserted AFTER INSERT ON {table} BEGIN {} END;
             DROP TRIGGER IF EXISTS {table}_updated; CREATE TRIGGER {table}_updated AFTER UPDATE ON {table} BEGIN {} END;
             DROP TRIGGER IF EXISTS {table}_deleted; CREATE TRIGGER {table}_deleted AFTER DELETE ON {table} BEGIN {}
                 DELETE FROM changes WHERE vault_id = OLD.vault_id AND gone = 1
                     AND seq <= (SELECT seq FROM vaults WHERE id = OLD.vault_id) - {CHANGE_HISTORY};
             END;\n",
            note("NEW.vault_id", "NEW.id", kind, 0),
            note("NEW.vault_id", "NEW.id", kind, 0),
            note("OLD.vault_id", "OLD.id", kind, 1),
        );
    }
    // A member's change counts in their vault (while it exists: a deleted
    // vault takes its members with it).
    for (event, row) in [("INSERT", "NEW"), ("UPDATE", "NEW"), ("DELETE", "OLD")] {
        sql += &format!(
            "DROP TRIGGER IF EXISTS members_{event}; CREATE TRIGGER members_{event} AFTER {event} ON members
                 WHEN EXISTS (SELECT 1 FROM vaults WHERE id = {row}.vault_id) BEGIN {} END;\n",
            note(&format!("{row}.vault_id"), "X'00'", KIND_VAULT, 0),
        );
    }
    sql += &format!(
        "DROP TRIGGER IF EXISTS vaults_updated; CREATE TRIGGER vaults_updated AFTER UPDATE OF name, e2e_required ON vaults BEGIN {} END;\n",
        note("NEW.id", "X'01'", KIND_VAULT, 0),
    );
    // A deleted vault has no changes left, but its members' waits wake.
    sql += "DROP TRIGGER IF EXISTS vaults_deleted; CREATE TRIGGER vaults_deleted AFTER DELETE ON vaults BEGIN UPDATE feed SET n = n + 1; END;\n";
    sql
}

/// The schema version this vaultfs writes (`PRAGMA user_version`); each
/// of [`MIGRATIONS`] brings a database up to one.
pub const SCHEMA_VERSION: i64 = 3;

/// One step of [`MIGRATIONS`], run in the upgrade's transaction.
type Migration = fn(&rusqlite::Transaction<'_>) -> rusqlite::Result<()>;

/// The steps from one schema version to the next, oldest first: a database
/// at a lower version gets every later step, all in one transaction, and
/// then this version. Before versions were counted with care (0 and 1),
/// tables and columns came as they were needed; the first step makes all
/// of them that are missing.
const MIGRATIONS: &[(i64, Migration)] = &[
    // Tables, added columns, and the change feed's tables and triggers
    // (which use `vaults.seq`).
    (2, |tx| {
        tx.execute_batch(SCHEMA)?;
        upgrade_schema(tx)?;
        tx.execute_batch(&change_triggers())
    }),
    // What versions up to 2 made at every open rather than with a version
    // (tables, added columns, cross-client locks: a database at 2 may lack
    // any made since), and holds on blob deletion for backups.
    (3, |tx| {
        tx.execute_batch(SCHEMA)?;
        upgrade_schema(tx)?;
        tx.execute_batch(locks::LOCK_SCHEMA)?;
        tx.execute_batch(backup::HOLD_SCHEMA)
    }),
];

fn schema_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.pragma_query_value(None, "user_version", |r| r.get(0))
}

/// Brings the database to [`SCHEMA_VERSION`], or refuses one a newer
/// vaultfs wrote (changing nothing). The steps run under the write lock,
/// with the version asked again there: two processes opening an old
/// database at once (a server and `vaultfs admin`) upgrade it once.
fn migrate(conn: &mut Connection) -> Result<()> {
    let found = schema_version(conn)?;
    if found > SCHEMA_VERSION {
        return Err(MetaError::TooNew { found, known: SCHEMA_VERSION });
    }
    if found == SCHEMA_VERSION {
        return Ok(());
    }
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let found = schema_version(&tx)?;
    if found > SCHEMA_VERSION {
        return Err(MetaError::TooNew { found, known: SCHEMA_VERSION });
    }
    for (version, step) in MIGRATIONS {
        if found < *version {
            step(&tx)?;
        }
    }
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    tx.commit()?;
    Ok(())
}

const KIND_RECORD: u8 = 1;
const KIND_FILE: u8 = 2;
const KIND_VAULT: u8 = 3;

/// Adds the columns of [`ADDED_COLUMNS`] a database does not have yet.
fn upgrade_schema(conn: &Connection) -> rusqlite::Result<()> {
    for (table, column, decl) in ADDED_COLUMNS {
        let mut stmt =
            conn.prepare(&format!("SELECT 1 FROM pragma_table_info('{table}') WHERE name = ?1"))?;
        if !stmt.exists([column])? {
            conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {decl}"))?;
        }
    }
    Ok(())
}

/// The metadata database.
pub struct Meta {
    conn: Connection,
    /// The change count of all vaults when last looked at ([`Meta::vaults_changed`]).
    feed_seen: u64,
}

fn limits_of(row: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<Limits> {
    Ok(Limits {
        upload_limit: row.get::<_, i64>(at)? as u64,
        e2e_limit: row.get::<_, i64>(at + 1)? as u64,
        image_max_edge: row.get::<_, i64>(at + 2)? as u32,
    })
}

const USER_COLUMNS: &str =
    "id, name, upload_limit, e2e_limit, image_max_edge, login_salt, kdf_m, kdf_t, kdf_p, \
                            login_hash, enroll_hash, login_version";

fn user_of(row: &rusqlite::Row<'_>) -> rusqlite::Result<User> {
    Ok(User {
        id: row.get(0)?,
        name: row.get(1)?,
        limits: limits_of(row, 2)?,
        login_salt: row.get(5)?,
        kdf: KdfWire { m_cost_kib: row.get(6)?, t_cost: row.get(7)?, p_cost: row.get(8)? },
        login_hash: row.get(9)?,
        enroll_hash: row.get(10)?,
        login_version: row.get(11)?,
    })
}

fn id16<T>(bytes: Vec<u8>, make: fn([u8; 16]) -> T) -> rusqlite::Result<T> {
    let arr: [u8; 16] = bytes
        .try_into()
        .map_err(|_| rusqlite::Error::InvalidColumnType(0, "id".into(), rusqlite::types::Type::Blob))?;
    Ok(make(arr))
}

const RECORD_COLUMNS: &str = "id, vault_id, parent_id, title, fields, version";

fn record_of(row: &rusqlite::Row<'_>) -> rusqlite::Result<RecordInfo> {
    Ok(RecordInfo {
        id: id16(row.get(0)?, RecordId)?,
        vault: id16(row.get(1)?, VaultId)?,
        parent: row.get::<_, Option<Vec<u8>>>(2)?.map(|p| id16(p, RecordId)).transpose()?,
        title: Sealed(row.get(3)?),
        fields: Sealed(row.get(4)?),
        version: row.get::<_, i64>(5)? as u64,
    })
}

const FILE_COLUMNS: &str = "id, vault_id, record_id, name, size, version, e2e, mtime_ms, blob_id, meta";

fn file_of(row: &rusqlite::Row<'_>) -> rusqlite::Result<FileRow> {
    Ok(FileRow {
        info: FileInfo {
            id: id16(row.get(0)?, FileId)?,
            vault: id16(row.get(1)?, VaultId)?,
            record: id16(row.get(2)?, RecordId)?,
            name: Sealed(row.get(3)?),
            size: row.get::<_, i64>(4)? as u64,
            version: row.get::<_, i64>(5)? as u64,
            e2e: row.get(6)?,
            mtime_ms: row.get(7)?,
            meta: Sealed(row.get::<_, Option<Vec<u8>>>(9)?.unwrap_or_default()),
        },
        blob: row.get::<_, Option<String>>(8)?.and_then(|h| BlobId::from_hex(&h)),
    })
}

/// Content that becomes a file's: where it is stored, and what the writer
/// says of it.
#[derive(Debug, Clone)]
pub struct Committed {
    /// The blob holding it.
    pub blob: BlobId,
    /// Its length.
    pub size: u64,
    /// The uploader's end-to-end flag.
    pub e2e: bool,
    /// Modification time.
    pub mtime_ms: i64,
    /// The sealed manifest (`None`: an older client sent none).
    pub meta: Option<Sealed>,
}

/// A sealed manifest as stored: NULL for none.
fn meta_column(meta: &Sealed) -> Option<&[u8]> {
    (!meta.0.is_empty()).then_some(&meta.0[..])
}

/// Points file `id` at new content if it is still at `expected`.
fn commit_in(tx: &Connection, id: FileId, expected: u64, c: &Committed) -> Result<(u64, Option<BlobId>)> {
    let row = load_file(tx, id)?;
    check_version(row.info.version, expected)?;
    tx.exec(
        "UPDATE files SET blob_id = ?2, size = ?3, e2e = ?4, mtime_ms = ?5, meta = ?6, version = version + 1 \
         WHERE id = ?1",
        params![&id.0[..], c.blob.to_hex(), c.size as i64, c.e2e, c.mtime_ms, c.meta.as_ref().and_then(meta_column)],
    )?;
    Ok((expected + 1, row.blob))
}

/// Creates `copy` in the record of file `id` (which may be gone: then the
/// record comes from nowhere, and this fails) and commits `c` to it, with the
/// copy's own manifest.
fn copy_in(tx: &Connection, id: FileId, copy: &NewFile, c: &Committed) -> Result<(u64, Option<BlobId>)> {
    let record: Vec<u8> = tx
        .q_row("SELECT record_id FROM files WHERE id = ?1", [&id.0[..]], |r| r.get(0))
        .optional()?
        .ok_or(MetaError::NotFound("file"))?;
    let created = create_in(tx, id16(record, RecordId)?, copy, c.mtime_ms)?;
    let for_copy = Committed { meta: Some(copy.meta.clone()), ..c.clone() };
    commit_in(tx, created.id, created.version, &for_copy)
}

/// Creates record `r` in `vault`: its parent, if any, must be a record of
/// the same vault.
fn record_in(tx: &Connection, vault: VaultId, r: &NewRecord) -> Result<RecordInfo> {
    if let Some(parent) = r.parent {
        if Meta::record_vault(tx, parent)? != vault {
            // The answer for a record that does not exist: one in a vault
            // the caller may not see is not told apart.
            return Err(MetaError::NotFound("record"));
        }
    }
    let n = tx.exec(
        "INSERT INTO records (id, vault_id, parent_id, title, fields, version) VALUES (?1, ?2, ?3, ?4, ?5, 1) \
         ON CONFLICT(id) DO NOTHING",
        params![&r.id.0[..], &vault.0[..], r.parent.map(|p| p.0.to_vec()), &r.title.0, &r.fields.0],
    )?;
    if n == 0 {
        return Err(MetaError::Exists("record"));
    }
    Ok(r.created_in(vault))
}

/// Whether a caller holding `held` rights in a vault may delete there: not
/// a member, the answer for an object that does not exist (NotFound);
/// below write, a refusal of this object only (`Some`).
fn may_delete(held: Option<Rights>) -> Result<Option<DeleteOutcome>> {
    match held {
        None => Err(MetaError::NotFound("vault")),
        Some(r) if r < Rights::Write => {
            let message = format!("you have {} rights in this vault; this needs write", r.as_str());
            Ok(Some(DeleteOutcome::Forbidden { message }))
        }
        Some(_) => Ok(None),
    }
}

/// What one object of a batch of deletes became (`done`: `None` if it was
/// deleted, else the refusal), or the store's failure, which ends the batch.
fn delete_outcome(done: Result<Option<DeleteOutcome>>) -> Result<DeleteOutcome> {
    Ok(match done {
        Ok(None) => DeleteOutcome::Deleted,
        Ok(Some(outcome)) => outcome,
        Err(MetaError::NotFound(_)) => DeleteOutcome::NotFound,
        Err(MetaError::VersionMismatch { current }) => DeleteOutcome::Conflict { current },
        Err(MetaError::Refused(message)) => DeleteOutcome::Refused { message },
        Err(
            e @ (MetaError::Exists(_)
            | MetaError::TooNew { .. }
            | MetaError::Db(_)
            | MetaError::Postgres(_)
            | MetaError::Unavailable(_)),
        ) => return Err(e),
    })
}

/// Creates an empty file in `record`.
fn create_in(tx: &Connection, record: RecordId, f: &NewFile, now_ms: i64) -> Result<FileInfo> {
    let vault = Meta::record_vault(tx, record)?;
    let mtime = f.mtime_ms.unwrap_or(now_ms);
    let n = tx.exec(
        "INSERT INTO files (id, vault_id, record_id, name, size, version, e2e, mtime_ms, blob_id, meta) \
         VALUES (?1, ?2, ?3, ?4, 0, 1, ?5, ?6, NULL, ?7) ON CONFLICT(id) DO NOTHING",
        params![&f.id.0[..], &vault.0[..], &record.0[..], &f.name.0, f.e2e, mtime, meta_column(&f.meta)],
    )?;
    if n == 0 {
        return Err(MetaError::Exists("file"));
    }
    Ok(FileInfo {
        id: f.id,
        vault,
        record,
        name: f.name.clone(),
        size: 0,
        version: 1,
        e2e: f.e2e,
        mtime_ms: mtime,
        meta: f.meta.clone(),
    })
}

/// The file `id`, read through `conn` (the connection or an open transaction).
fn load_file(conn: &Connection, id: FileId) -> Result<FileRow> {
    conn.q_row(&format!("SELECT {FILE_COLUMNS} FROM files WHERE id = ?1"), [&id.0[..]], file_of)
        .optional()?
        .ok_or(MetaError::NotFound("file"))
}

/// The record `id`, read through `conn` (the connection or an open transaction).
fn load_record(conn: &Connection, id: RecordId) -> Result<RecordInfo> {
    conn.q_row(&format!("SELECT {RECORD_COLUMNS} FROM records WHERE id = ?1"), [&id.0[..]], record_of)
        .optional()?
        .ok_or(MetaError::NotFound("record"))
}

/// The rights `user_id` has in `vault`, read through `conn`.
fn member_rights(conn: &Connection, user_id: i64, vault: VaultId) -> Result<Option<Rights>> {
    let r: Option<String> = conn
        .q_row(
            "SELECT rights FROM members WHERE vault_id = ?1 AND user_id = ?2",
            params![&vault.0[..], user_id],
            |r| r.get(0),
        )
        .optional()?;
    Ok(r.and_then(|s| Rights::parse(&s)))
}

/// Deletes file `id` if it is at `expected`, through `tx`; its blob.
fn delete_file_in(tx: &Connection, id: FileId, expected: u64) -> Result<Option<BlobId>> {
    let row = load_file(tx, id)?;
    check_version(row.info.version, expected)?;
    tx.exec("DELETE FROM files WHERE id = ?1", [&id.0[..]])?;
    Ok(row.blob)
}

/// Deletes record `id` if it is at `expected` and empty, through `tx`.
fn delete_record_in(tx: &Connection, id: RecordId, expected: u64) -> Result<()> {
    let current: i64 = tx
        .q_row("SELECT version FROM records WHERE id = ?1", [&id.0[..]], |r| r.get(0))
        .optional()?
        .ok_or(MetaError::NotFound("record"))?;
    check_version(current as u64, expected)?;
    let children: i64 = tx.q_row(
        "SELECT (SELECT COUNT(*) FROM records WHERE parent_id = ?1) + (SELECT COUNT(*) FROM files WHERE record_id = ?1)",
        [&id.0[..]],
        |r| r.get(0),
    )?;
    if children > 0 {
        return Err(refuse("record is not empty"));
    }
    tx.exec("DELETE FROM records WHERE id = ?1", [&id.0[..]])?;
    Ok(())
}

fn check_version(current: u64, expected: u64) -> Result<()> {
    if current == expected {
        Ok(())
    } else {
        Err(MetaError::VersionMismatch { current })
    }
}

fn refuse(msg: impl Into<String>) -> MetaError {
    MetaError::Refused(msg.into())
}

impl Meta {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let mut conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        // Every transaction takes the write lock at its start. Another
        // process writes this database too (`vaultfs admin`: a backup's
        // hold, users); a transaction that read first and then found it had
        // written meanwhile could not go on (SQLite answers "database is
        // locked" at once, past the busy timeout), and the request failed.
        conn.set_transaction_behavior(rusqlite::TransactionBehavior::Immediate);
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        // Before anything is changed (WAL is a change to the file):
        let found = schema_version(&conn)?;
        if found > SCHEMA_VERSION {
            return Err(MetaError::TooNew { found, known: SCHEMA_VERSION });
        }
        // WAL: readers do not block the writer; synchronous=FULL: a commit that
        // returned survives power loss, which the upload protocol relies on.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        migrate(&mut conn)?;
        let mut meta = Meta { conn, feed_seen: 0 };
        meta.vaults_changed()?;
        Ok(meta)
    }

    /// How many rows this connection has written so far (no query: what
    /// tells a call that only read from one that may have changed a vault).
    pub fn rows_written(&self) -> u64 {
        self.conn.total_changes()
    }

    /// Whether any vault changed since this was last asked (what waits for
    /// changes wake on).
    pub fn vaults_changed(&mut self) -> Result<bool> {
        let n = self.conn.q_row("SELECT n FROM feed", [], |r| r.get::<_, i64>(0))? as u64;
        Ok(std::mem::replace(&mut self.feed_seen, n) != n)
    }

    fn vault_query(&self, filter: &str, args: &[&dyn rusqlite::ToSql]) -> Result<Vec<VaultInfo>> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT v.id, v.name, m.rights, v.e2e_required, v.version, m.wrapped_key, v.seq \
             FROM vaults v JOIN members m ON m.vault_id = v.id WHERE {filter} ORDER BY v.id"
        ))?;
        let rows = stmt
            .query_map(args, |r| {
                Ok(VaultInfo {
                    id: id16(r.get(0)?, VaultId)?,
                    name: Sealed(r.get(1)?),
                    rights: Rights::parse(&r.get::<_, String>(2)?).unwrap_or(Rights::Read),
                    e2e_required: r.get(3)?,
                    version: r.get::<_, i64>(4)? as u64,
                    wrapped_key: r.get::<_, Option<Vec<u8>>>(5)?.map(Sealed),
                    changes: r.get::<_, i64>(6)? as u64,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    fn ensure_an_admin(tx: &Transaction<'_>, vault: VaultId) -> Result<()> {
        let admins: i64 = tx.q_row(
            "SELECT COUNT(*) FROM members WHERE vault_id = ?1 AND rights = 'admin'",
            [&vault.0[..]],
            |r| r.get(0),
        )?;
        if admins == 0 {
            return Err(refuse("a vault must keep at least one admin"));
        }
        Ok(())
    }

    // ---- records -----------------------------------------------------------

    fn record_vault(tx: &Connection, record: RecordId) -> Result<VaultId> {
        tx.q_row("SELECT vault_id FROM records WHERE id = ?1", [&record.0[..]], |r| id16(r.get(0)?, VaultId))
            .optional()?
            .ok_or(MetaError::NotFound("record"))
    }
}

impl MetaStore for Meta {
    // Locks and holds on blob deletion: in `locks.rs` and `backup.rs`.

    fn set_locks(
        &mut self,
        file: FileId,
        user_id: i64,
        req: &SetLocks,
        now_ms: i64,
        ttl_ms: i64,
    ) -> Result<LockOutcome> {
        Meta::set_locks(self, file, user_id, req, now_ms, ttl_ms)
    }

    fn locks(&self, file: FileId, now_ms: i64) -> Result<Vec<(HeldLock, i64)>> {
        Meta::locks(self, file, now_ms)
    }

    fn renew_locks(
        &mut self,
        user_id: i64,
        holder: HolderId,
        held: &[(FileId, u64)],
        now_ms: i64,
        ttl_ms: i64,
    ) -> Result<u64> {
        Meta::renew_locks(self, user_id, holder, held, now_ms, ttl_ms)
    }

    fn drop_locks(&mut self, user_id: i64, holder: HolderId) -> Result<u64> {
        Meta::drop_locks(self, user_id, holder)
    }

    fn hold_blobs(&mut self, id: &[u8; 16], expires_ms: i64) -> Result<()> {
        Meta::hold_blobs(self, id, expires_ms)
    }

    fn end_hold(&mut self, id: &[u8; 16]) -> Result<()> {
        Meta::end_hold(self, id)
    }

    fn release_blobs(&mut self, blobs: &[BlobId], now_ms: i64) -> Result<Vec<BlobId>> {
        Meta::release_blobs(self, blobs, now_ms)
    }

    fn server_secret(&mut self) -> Result<[u8; 32]> {
        let existing: Option<Vec<u8>> = self
            .conn
            .q_row("SELECT value FROM settings WHERE key = 'secret'", [], |r| r.get(0))
            .optional()?;
        if let Some(v) = existing.and_then(|v| <[u8; 32]>::try_from(v).ok()) {
            return Ok(v);
        }
        let mut secret = [0u8; 32];
        getrandom::getrandom(&mut secret).map_err(|e| refuse(format!("getrandom: {e}")))?;
        self.conn
            .exec("INSERT OR REPLACE INTO settings (key, value) VALUES ('secret', ?1)", [&secret[..]])?;
        Ok(secret)
    }

    fn put_setting(&mut self, key: &str, value: &[u8]) -> Result<()> {
        self.conn
            .exec("INSERT OR REPLACE INTO settings (key, value) VALUES (?1, ?2)", params![key, value])?;
        Ok(())
    }

    fn setting(&self, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.conn.q_row("SELECT value FROM settings WHERE key = ?1", [key], |r| r.get(0)).optional()?)
    }

    fn create_user(
        &mut self,
        name: &str,
        limits: Limits,
        login_salt: &[u8],
        kdf: KdfWire,
        enroll_hash: &[u8],
    ) -> Result<()> {
        let done = self.conn.exec(
            "INSERT INTO users (name, upload_limit, e2e_limit, image_max_edge, login_salt, kdf_m, kdf_t, kdf_p, \
             enroll_hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) ON CONFLICT(name) DO NOTHING",
            params![
                name,
                limits.upload_limit as i64,
                limits.e2e_limit as i64,
                limits.image_max_edge as i64,
                login_salt,
                kdf.m_cost_kib,
                kdf.t_cost,
                kdf.p_cost,
                enroll_hash
            ],
        )?;
        if done == 0 {
            return Err(MetaError::Exists("user"));
        }
        Ok(())
    }

    fn user_by_name(&self, name: &str) -> Result<Option<User>> {
        Ok(self
            .conn
            .q_row(&format!("SELECT {USER_COLUMNS} FROM users WHERE name = ?1"), [name], user_of)
            .optional()?)
    }

    fn users(&self) -> Result<Vec<User>> {
        let mut stmt =
            self.conn.prepare_cached(&format!("SELECT {USER_COLUMNS} FROM users ORDER BY name"))?;
        let rows = stmt.query_map([], user_of)?.collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    fn set_limits(&mut self, name: &str, limits: Limits) -> Result<()> {
        let n = self.conn.exec(
            "UPDATE users SET upload_limit = ?2, e2e_limit = ?3, image_max_edge = ?4 WHERE name = ?1",
            params![name, limits.upload_limit as i64, limits.e2e_limit as i64, limits.image_max_edge as i64],
        )?;
        if n == 0 {
            return Err(MetaError::NotFound("user"));
        }
        Ok(())
    }

    fn remove_user(&mut self, name: &str) -> Result<()> {
        if self.conn.exec("DELETE FROM users WHERE name = ?1", [name])? == 0 {
            return Err(MetaError::NotFound("user"));
        }
        Ok(())
    }

    fn reset_enrollment(&mut self, name: &str, enroll_hash: &[u8], login_salt: &[u8]) -> Result<()> {
        let tx = self.conn.transaction()?;
        let id: Option<i64> =
            tx.q_row("SELECT id FROM users WHERE name = ?1", [name], |r| r.get(0)).optional()?;
        let id = id.ok_or(MetaError::NotFound("user"))?;
        tx.exec(
            "UPDATE users SET enroll_hash = ?2, login_hash = NULL, login_salt = ?3 WHERE id = ?1",
            params![id, enroll_hash, login_salt],
        )?;
        tx.exec("DELETE FROM sessions WHERE user_id = ?1", [id])?;
        tx.commit()?;
        Ok(())
    }

    fn complete_enrollment(&mut self, user_id: i64, login_hash: &[u8], version: u8) -> Result<()> {
        self.conn.exec(
            "UPDATE users SET login_hash = ?2, login_version = ?3, enroll_hash = NULL WHERE id = ?1",
            params![user_id, login_hash, version],
        )?;
        Ok(())
    }

    fn change_login_key(
        &mut self,
        user_id: i64,
        old_hash: &[u8],
        new_hash: &[u8],
        version: u8,
    ) -> Result<bool> {
        let n = self.conn.exec(
            "UPDATE users SET login_hash = ?3, login_version = ?4 WHERE id = ?1 AND login_hash = ?2",
            params![user_id, old_hash, new_hash, version],
        )?;
        Ok(n == 1)
    }

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
    ) -> Result<Option<u64>> {
        let tx = self.conn.transaction()?;
        let n = tx.exec(
            "UPDATE users SET login_hash = ?3, login_version = ?4 WHERE id = ?1 AND login_hash = ?2",
            params![user_id, old_hash, new_hash, version],
        )?;
        if n != 1 {
            return Ok(None);
        }
        let current: Option<i64> =
            tx.q_row("SELECT version FROM wallets WHERE user_id = ?1", [user_id], |r| r.get(0)).optional()?;
        match current {
            Some(cur) if cur as u64 == wallet_version => {}
            Some(cur) => return Err(MetaError::VersionMismatch { current: cur as u64 }),
            None => return Err(MetaError::NotFound("wallet")),
        }
        tx.exec(
            "UPDATE wallets SET blob = ?2, version = version + 1 WHERE user_id = ?1",
            params![user_id, wallet],
        )?;
        tx.exec(
            "DELETE FROM sessions WHERE user_id = ?1 AND token_hash != ?2",
            params![user_id, keep_session],
        )?;
        tx.commit()?;
        Ok(Some(wallet_version + 1))
    }

    fn set_public_key(&mut self, user_id: i64, key: &[u8]) -> Result<()> {
        self.conn.exec("UPDATE users SET public_key = ?1 WHERE id = ?2", params![key, user_id])?;
        Ok(())
    }

    fn public_key(&self, name: &str) -> Result<Option<Vec<u8>>> {
        Ok(self
            .conn
            .query_row("SELECT public_key FROM users WHERE name = ?1", params![name], |r| {
                r.get::<_, Option<Vec<u8>>>(0)
            })
            .optional()?
            .flatten())
    }

    fn create_session(&mut self, user_id: i64, token_hash: &[u8], expires: i64) -> Result<()> {
        self.conn.exec("DELETE FROM sessions WHERE expires < ?1", [expires - 366 * 86_400])?;
        self.conn.exec(
            "INSERT INTO sessions (token_hash, user_id, expires) VALUES (?1, ?2, ?3)",
            params![token_hash, user_id, expires],
        )?;
        Ok(())
    }

    fn session_user(&self, token_hash: &[u8], now: i64) -> Result<Option<User>> {
        let cols = USER_COLUMNS.split(", ").map(|c| format!("u.{c}")).collect::<Vec<_>>().join(", ");
        Ok(self
            .conn
            .q_row(
                &format!(
                    "SELECT {cols} FROM sessions s JOIN users u ON u.id = s.user_id \
                     WHERE s.token_hash = ?1 AND s.expires > ?2"
                ),
                params![token_hash, now],
                user_of,
            )
            .optional()?)
    }

    fn delete_session(&mut self, token_hash: &[u8]) -> Result<()> {
        self.conn.exec("DELETE FROM sessions WHERE token_hash = ?1", [token_hash])?;
        Ok(())
    }

    fn wallet(&self, user_id: i64) -> Result<Option<(Vec<u8>, u64)>> {
        Ok(self
            .conn
            .q_row("SELECT blob, version FROM wallets WHERE user_id = ?1", [user_id], |r| {
                Ok((r.get(0)?, r.get::<_, i64>(1)? as u64))
            })
            .optional()?)
    }

    fn wallet_version(&self, user_id: i64) -> Result<Option<u64>> {
        Ok(self
            .conn
            .q_row("SELECT version FROM wallets WHERE user_id = ?1", [user_id], |r| r.get::<_, i64>(0))
            .optional()?
            .map(|v| v as u64))
    }

    fn put_wallet(&mut self, user_id: i64, blob: &[u8], expected: Option<u64>) -> Result<u64> {
        let tx = self.conn.transaction()?;
        let current: Option<i64> =
            tx.q_row("SELECT version FROM wallets WHERE user_id = ?1", [user_id], |r| r.get(0)).optional()?;
        let version = match (current, expected) {
            (None, None) => {
                tx.exec(
                    "INSERT INTO wallets (user_id, blob, version) VALUES (?1, ?2, 1)",
                    params![user_id, blob],
                )?;
                1
            }
            (Some(cur), Some(exp)) if cur as u64 == exp => {
                tx.exec(
                    "UPDATE wallets SET blob = ?2, version = version + 1 WHERE user_id = ?1",
                    params![user_id, blob],
                )?;
                exp + 1
            }
            (Some(cur), _) => return Err(MetaError::VersionMismatch { current: cur as u64 }),
            (None, Some(_)) => return Err(MetaError::NotFound("wallet")),
        };
        tx.commit()?;
        Ok(version)
    }

    fn rights(&self, user_id: i64, vault: VaultId) -> Result<Option<Rights>> {
        member_rights(&self.conn, user_id, vault)
    }

    fn create_vault(&mut self, user_id: i64, v: &NewVault) -> Result<u64> {
        let tx = self.conn.transaction()?;
        let n = tx.exec(
            "INSERT INTO vaults (id, name, e2e_required, version) VALUES (?1, ?2, ?3, 1) ON CONFLICT(id) DO NOTHING",
            params![&v.id.0[..], &v.name.0, v.e2e_required],
        )?;
        if n == 0 {
            return Err(MetaError::Exists("vault"));
        }
        tx.exec(
            "INSERT INTO members (vault_id, user_id, rights, wrapped_key) VALUES (?1, ?2, 'admin', ?3)",
            params![&v.id.0[..], user_id, v.wrapped_key.as_ref().map(|k| k.0.clone())],
        )?;
        tx.commit()?;
        Ok(1)
    }

    fn vaults_of(&self, user_id: i64) -> Result<Vec<VaultInfo>> {
        self.vault_query("m.user_id = ?1", &[&user_id])
    }

    fn vault_of(&self, user_id: i64, vault: VaultId) -> Result<VaultInfo> {
        self.vault_query("m.user_id = ?1 AND v.id = ?2", &[&user_id, &&vault.0[..]])?
            .pop()
            .ok_or(MetaError::NotFound("vault"))
    }

    fn e2e_required(&self, vault: VaultId) -> Result<bool> {
        self.conn
            .q_row("SELECT e2e_required FROM vaults WHERE id = ?1", [&vault.0[..]], |r| r.get(0))
            .optional()?
            .ok_or(MetaError::NotFound("vault"))
    }

    fn update_vault(&mut self, vault: VaultId, expected: u64, u: &VaultUpdate) -> Result<u64> {
        let tx = self.conn.transaction()?;
        let current: i64 = tx
            .q_row("SELECT version FROM vaults WHERE id = ?1", [&vault.0[..]], |r| r.get(0))
            .optional()?
            .ok_or(MetaError::NotFound("vault"))?;
        check_version(current as u64, expected)?;
        if let Some(name) = &u.name {
            tx.exec("UPDATE vaults SET name = ?2 WHERE id = ?1", params![&vault.0[..], &name.0])?;
        }
        if let Some(flag) = u.e2e_required {
            tx.exec("UPDATE vaults SET e2e_required = ?2 WHERE id = ?1", params![&vault.0[..], flag])?;
        }
        tx.exec("UPDATE vaults SET version = version + 1 WHERE id = ?1", [&vault.0[..]])?;
        tx.commit()?;
        Ok(expected + 1)
    }

    fn delete_vault(&mut self, vault: VaultId, expected: u64) -> Result<()> {
        let tx = self.conn.transaction()?;
        let current: i64 = tx
            .q_row("SELECT version FROM vaults WHERE id = ?1", [&vault.0[..]], |r| r.get(0))
            .optional()?
            .ok_or(MetaError::NotFound("vault"))?;
        check_version(current as u64, expected)?;
        let records: i64 =
            tx.q_row("SELECT COUNT(*) FROM records WHERE vault_id = ?1", [&vault.0[..]], |r| r.get(0))?;
        if records > 0 {
            return Err(refuse("vault is not empty"));
        }
        tx.exec("DELETE FROM vaults WHERE id = ?1", [&vault.0[..]])?;
        tx.commit()?;
        Ok(())
    }

    fn members(&self, vault: VaultId) -> Result<Vec<Member>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT u.name, m.rights, m.wrapped_key FROM members m JOIN users u ON u.id = m.user_id \
             WHERE m.vault_id = ?1 ORDER BY u.name",
        )?;
        let rows = stmt
            .query_map([&vault.0[..]], |r| {
                Ok(Member {
                    user: r.get(0)?,
                    rights: Rights::parse(&r.get::<_, String>(1)?).unwrap_or(Rights::Read),
                    wrapped_key: r.get::<_, Option<Vec<u8>>>(2)?.map(Sealed),
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    fn set_member(&mut self, vault: VaultId, m: &Member) -> Result<()> {
        let tx = self.conn.transaction()?;
        let user_id: i64 = tx
            .q_row("SELECT id FROM users WHERE name = ?1", [&m.user], |r| r.get(0))
            .optional()?
            .ok_or(MetaError::NotFound("user"))?;
        tx.exec(
            "INSERT INTO members (vault_id, user_id, rights, wrapped_key) VALUES (?1, ?2, ?3, ?4) \
             ON CONFLICT(vault_id, user_id) DO UPDATE SET rights = excluded.rights, wrapped_key = excluded.wrapped_key",
            params![&vault.0[..], user_id, m.rights.as_str(), m.wrapped_key.as_ref().map(|k| k.0.clone())],
        )?;
        Self::ensure_an_admin(&tx, vault)?;
        tx.commit()?;
        Ok(())
    }

    fn remove_member(&mut self, vault: VaultId, user: &str) -> Result<()> {
        let tx = self.conn.transaction()?;
        let n = tx.exec(
            "DELETE FROM members WHERE vault_id = ?1 AND user_id = (SELECT id FROM users WHERE name = ?2)",
            params![&vault.0[..], user],
        )?;
        if n == 0 {
            return Err(MetaError::NotFound("member"));
        }
        Self::ensure_an_admin(&tx, vault)?;
        tx.commit()?;
        Ok(())
    }

    fn all_vaults(&self) -> Result<Vec<(VaultId, Vec<Member>)>> {
        let mut stmt = self.conn.prepare_cached("SELECT id FROM vaults ORDER BY id")?;
        let ids = stmt.query_map([], |r| id16(r.get(0)?, VaultId))?.collect::<rusqlite::Result<Vec<_>>>()?;
        ids.into_iter().map(|id| Ok((id, self.members(id)?))).collect()
    }

    fn changes(&self, vault: VaultId, since: u64, limit: usize) -> Result<Option<Changes>> {
        let head = self
            .conn
            .q_row("SELECT seq FROM vaults WHERE id = ?1", [&vault.0[..]], |r| r.get::<_, i64>(0))
            .optional()?
            .ok_or(MetaError::NotFound("vault"))? as u64;
        if since > head || head - since > CHANGE_HISTORY {
            return Ok(None);
        }
        let mut stmt = self.conn.prepare_cached(
            "SELECT object, kind, gone, seq FROM changes WHERE vault_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
        )?;
        let rows = stmt
            .query_map(params![&vault.0[..], since as i64, limit as i64 + 1], |r| {
                Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, u8>(1)?, r.get::<_, bool>(2)?, r.get::<_, i64>(3)?))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        // One more than asked for says whether more follow.
        let more = rows.len() > limit;
        let rows = &rows[..rows.len().min(limit)];
        let mut out = Changes { until: head, more, ..Changes::default() };
        if let (true, Some(last)) = (more, rows.last()) {
            out.until = last.3 as u64;
        }
        for (object, kind, gone, _) in rows.iter().cloned() {
            match (kind, gone) {
                (KIND_RECORD, false) => out.records.push(load_record(&self.conn, id16(object, RecordId)?)?),
                (KIND_RECORD, true) => out.deleted_records.push(id16(object, RecordId)?),
                (KIND_FILE, false) => out.files.push(load_file(&self.conn, id16(object, FileId)?)?.info),
                (KIND_FILE, true) => out.deleted_files.push(id16(object, FileId)?),
                _ => out.vault_changed = true,
            }
        }
        Ok(Some(out))
    }

    fn create_record(&mut self, vault: VaultId, r: &NewRecord) -> Result<RecordInfo> {
        let tx = self.conn.transaction()?;
        let info = record_in(&tx, vault, r)?;
        tx.commit()?;
        Ok(info)
    }

    fn record(&self, id: RecordId) -> Result<RecordInfo> {
        load_record(&self.conn, id)
    }

    fn records(&self, vault: VaultId) -> Result<Vec<RecordInfo>> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {RECORD_COLUMNS} FROM records WHERE vault_id = ?1 ORDER BY id"
        ))?;
        let rows = stmt.query_map([&vault.0[..]], record_of)?.collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    fn update_record(&mut self, id: RecordId, expected: u64, u: &RecordUpdate) -> Result<RecordInfo> {
        let tx = self.conn.transaction()?;
        let current = load_record(&tx, id)?;
        check_version(current.version, expected)?;
        if let Some(change) = u.parent {
            if let Some(parent) = change.to {
                if Self::record_vault(&tx, parent)? != current.vault {
                    return Err(refuse("a record can only move within its vault"));
                }
                // Walk up from the new parent: reaching `id` would make a cycle.
                let mut cursor = Some(parent);
                while let Some(c) = cursor {
                    if c == id {
                        return Err(refuse("a record cannot move into itself or its descendants"));
                    }
                    cursor = tx
                        .q_row("SELECT parent_id FROM records WHERE id = ?1", [&c.0[..]], |r| {
                            r.get::<_, Option<Vec<u8>>>(0)
                        })?
                        .map(|p| id16(p, RecordId))
                        .transpose()?;
                }
            }
            tx.exec(
                "UPDATE records SET parent_id = ?2 WHERE id = ?1",
                params![&id.0[..], change.to.map(|p| p.0.to_vec())],
            )?;
        }
        if let Some(title) = &u.title {
            tx.exec("UPDATE records SET title = ?2 WHERE id = ?1", params![&id.0[..], &title.0])?;
        }
        if let Some(fields) = &u.fields {
            tx.exec("UPDATE records SET fields = ?2 WHERE id = ?1", params![&id.0[..], &fields.0])?;
        }
        tx.exec("UPDATE records SET version = version + 1 WHERE id = ?1", [&id.0[..]])?;
        let updated =
            tx.q_row(&format!("SELECT {RECORD_COLUMNS} FROM records WHERE id = ?1"), [&id.0[..]], record_of)?;
        tx.commit()?;
        Ok(updated)
    }

    fn delete_record(&mut self, id: RecordId, expected: u64) -> Result<()> {
        let tx = self.conn.transaction()?;
        delete_record_in(&tx, id, expected)?;
        tx.commit()?;
        Ok(())
    }

    fn delete_many(
        &mut self,
        user_id: i64,
        items: &[DeleteItem],
    ) -> Result<(Vec<DeleteOutcome>, Vec<BlobId>)> {
        let tx = self.conn.transaction()?;
        let mut rights = std::collections::HashMap::new();
        let (mut outcomes, mut blobs) = (Vec::with_capacity(items.len()), Vec::new());
        for item in items {
            let vault = match *item {
                DeleteItem::File { id, .. } => load_file(&tx, id).map(|f| f.info.vault),
                DeleteItem::Record { id, .. } => load_record(&tx, id).map(|r| r.vault),
            };
            let done = vault.and_then(|vault| {
                let held = match rights.get(&vault) {
                    Some(held) => *held,
                    None => *rights.entry(vault).or_insert(member_rights(&tx, user_id, vault)?),
                };
                if let Some(refused) = may_delete(held)? {
                    return Ok(Some(refused));
                }
                match *item {
                    DeleteItem::File { id, version } => blobs.extend(delete_file_in(&tx, id, version)?),
                    DeleteItem::Record { id, version } => delete_record_in(&tx, id, version)?,
                }
                Ok(None)
            });
            outcomes.push(delete_outcome(done)?);
        }
        tx.commit()?;
        Ok((outcomes, blobs))
    }

    fn create_file(&mut self, record: RecordId, f: &NewFile, now_ms: i64) -> Result<FileInfo> {
        let tx = self.conn.transaction()?;
        let created = create_in(&tx, record, f, now_ms)?;
        tx.commit()?;
        Ok(created)
    }

    fn file(&self, id: FileId) -> Result<FileRow> {
        load_file(&self.conn, id)
    }

    fn files(&self, vault: VaultId, record: Option<RecordId>) -> Result<Vec<FileInfo>> {
        let (sql, key) = match record {
            Some(r) => (format!("SELECT {FILE_COLUMNS} FROM files WHERE record_id = ?1 ORDER BY id"), r.0),
            None => (format!("SELECT {FILE_COLUMNS} FROM files WHERE vault_id = ?1 ORDER BY id"), vault.0),
        };
        let mut stmt = self.conn.prepare_cached(&sql)?;
        let rows = stmt
            .query_map([&key[..]], file_of)?
            .map(|r| r.map(|f| f.info))
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }

    fn commit_upload(&mut self, id: FileId, expected: u64, c: &Committed) -> Result<(u64, Option<BlobId>)> {
        let tx = self.conn.transaction()?;
        let done = commit_in(&tx, id, expected, c)?;
        tx.commit()?;
        Ok(done)
    }

    fn create_with_content(
        &mut self,
        new_record: Option<(VaultId, &NewRecord)>,
        record: RecordId,
        f: &NewFile,
        c: &Committed,
    ) -> Result<u64> {
        let tx = self.conn.transaction()?;
        if let Some((vault, r)) = new_record {
            debug_assert_eq!(r.id, record);
            record_in(&tx, vault, r)?;
        }
        let created = create_in(&tx, record, f, c.mtime_ms)?;
        let (version, _) = commit_in(&tx, created.id, created.version, c)?;
        tx.commit()?;
        Ok(version)
    }

    fn commit_to_copy(&mut self, id: FileId, copy: &NewFile, c: &Committed) -> Result<(u64, Option<BlobId>)> {
        let tx = self.conn.transaction()?;
        let done = copy_in(&tx, id, copy, c)?;
        tx.commit()?;
        Ok(done)
    }

    fn stage(&mut self, token: &[u8], file: FileId, user_id: i64, s: &Committed, now_ms: i64) -> Result<()> {
        self.conn.exec(
            "INSERT INTO staged (token, file_id, user_id, blob_id, size, e2e, created_ms) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![token, &file.0[..], user_id, s.blob.to_hex(), s.size as i64, s.e2e, now_ms],
        )?;
        Ok(())
    }

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
    ) -> Result<(u64, Option<BlobId>, u64, bool)> {
        let tx = self.conn.transaction()?;
        let (blob, size, e2e): (String, i64, bool) = tx
            .q_row(
                "SELECT blob_id, size, e2e FROM staged WHERE token = ?1 AND file_id = ?2 AND user_id = ?3",
                params![token, &id.0[..], user_id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?
            .ok_or(MetaError::NotFound("staged upload"))?;
        let blob = BlobId::from_hex(&blob).ok_or(MetaError::NotFound("staged upload"))?;
        let c = Committed { blob, size: size as u64, e2e, mtime_ms, meta: Some(meta.clone()) };
        let (version, old, copied) = match (commit_in(&tx, id, expected, &c), conflict_copy) {
            (Ok((v, old)), _) => (v, old, false),
            (Err(MetaError::VersionMismatch { .. } | MetaError::NotFound("file")), Some(copy)) => {
                let (v, old) = copy_in(&tx, id, copy, &c)?;
                (v, old, true)
            }
            (Err(e), _) => return Err(e),
        };
        tx.exec("DELETE FROM staged WHERE token = ?1", [token])?;
        tx.commit()?;
        Ok((version, old, size as u64, copied))
    }

    fn collect_staged(&mut self, before_ms: i64) -> Result<Vec<BlobId>> {
        let tx = self.conn.transaction()?;
        let blobs: Vec<String> = {
            let mut stmt = tx.prepare_cached("SELECT blob_id FROM staged WHERE created_ms < ?1")?;
            let rows = stmt.query_map([before_ms], |r| r.get(0))?.collect::<rusqlite::Result<_>>()?;
            rows
        };
        tx.exec("DELETE FROM staged WHERE created_ms < ?1", [before_ms])?;
        tx.commit()?;
        Ok(blobs.iter().filter_map(|b| BlobId::from_hex(b)).collect())
    }

    fn update_file(&mut self, id: FileId, expected: u64, u: &FileUpdate) -> Result<FileInfo> {
        let tx = self.conn.transaction()?;
        let row = load_file(&tx, id)?;
        check_version(row.info.version, expected)?;
        if let Some(record) = u.record {
            if Self::record_vault(&tx, record)? != row.info.vault {
                return Err(refuse("a file can only move within its vault"));
            }
            tx.exec("UPDATE files SET record_id = ?2 WHERE id = ?1", params![&id.0[..], &record.0[..]])?;
        }
        if let Some(name) = &u.name {
            tx.exec("UPDATE files SET name = ?2 WHERE id = ?1", params![&id.0[..], &name.0])?;
        }
        if let Some(mtime) = u.mtime_ms {
            tx.exec("UPDATE files SET mtime_ms = ?2 WHERE id = ?1", params![&id.0[..], mtime])?;
        }
        if let Some(meta) = &u.meta {
            tx.exec("UPDATE files SET meta = ?2 WHERE id = ?1", params![&id.0[..], meta_column(meta)])?;
        }
        tx.exec("UPDATE files SET version = version + 1 WHERE id = ?1", [&id.0[..]])?;
        let updated = load_file(&tx, id)?;
        tx.commit()?;
        Ok(updated.info)
    }

    fn delete_file(&mut self, id: FileId, expected: u64) -> Result<Option<BlobId>> {
        let tx = self.conn.transaction()?;
        let blob = delete_file_in(&tx, id, expected)?;
        tx.commit()?;
        Ok(blob)
    }

    fn stored_bytes(&self) -> Result<u64> {
        let mut stmt =
            self.conn.prepare_cached("SELECT COALESCE(SUM(size), 0) FROM files WHERE blob_id IS NOT NULL")?;
        Ok(stmt.query_row([], |r| r.get::<_, i64>(0))?.max(0) as u64)
    }

    fn blobs_in_use(&self) -> Result<HashSet<String>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT blob_id FROM files WHERE blob_id IS NOT NULL UNION SELECT blob_id FROM staged",
        )?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0))?.collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }
}

/// Hex of an id, for messages.
pub fn short(id: &[u8; 16]) -> String {
    hex_encode(&id[..4])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{KdfWire, ParentChange};

    struct Db {
        meta: Meta,
        _dir: tempfile::TempDir,
        user: i64,
        vault: VaultId,
    }

    fn db() -> Db {
        let dir = tempfile::tempdir().unwrap();
        let mut meta = Meta::open(&dir.path().join("meta.db")).unwrap();
        let kdf = KdfWire { m_cost_kib: 64, t_cost: 1, p_cost: 1 };
        meta.create_user("alice", Limits::DEFAULT, &[1; 16], kdf, &[2; 32]).unwrap();
        let user = meta.user_by_name("alice").unwrap().unwrap().id;
        let vault = VaultId([9; 16]);
        let v = NewVault { id: vault, name: Sealed(b"v".to_vec()), e2e_required: false, wrapped_key: None };
        meta.create_vault(user, &v).unwrap();
        Db { meta, _dir: dir, user, vault }
    }

    fn record(db: &mut Db, id: u8, parent: Option<u8>) -> RecordInfo {
        let r = NewRecord {
            id: RecordId([id; 16]),
            parent: parent.map(|p| RecordId([p; 16])),
            title: Sealed(vec![id]),
            fields: Sealed(Vec::new()),
        };
        db.meta.create_record(db.vault, &r).unwrap()
    }

    fn file(db: &mut Db, id: u8, record: u8) -> FileInfo {
        let f = NewFile {
            id: FileId([id; 16]),
            name: Sealed(vec![id]),
            e2e: true,
            mtime_ms: None,
            meta: Sealed::default(),
        };
        db.meta.create_file(RecordId([record; 16]), &f, 0).unwrap()
    }

    fn head(db: &Db) -> u64 {
        db.meta.vault_of(db.user, db.vault).unwrap().changes
    }

    /// Every write to a vault's records, files, members or name is a change;
    /// the feed lists each object once, as it is now, oldest change first,
    /// in pages that add up to the whole.
    #[test]
    fn every_write_is_a_change_and_each_object_is_listed_once() {
        let mut db = db();
        let start = head(&db);
        assert_eq!(
            db.meta.changes(db.vault, start, 100).unwrap(),
            Some(Changes { until: start, ..Changes::default() })
        );
        record(&mut db, 1, None);
        record(&mut db, 2, None);
        file(&mut db, 3, 1);
        file(&mut db, 4, 1);
        let renamed = FileUpdate {
            name: Some(Sealed(b"new".to_vec())),
            record: Some(RecordId([2; 16])),
            ..Default::default()
        };
        db.meta.update_file(FileId([3; 16]), 1, &renamed).unwrap();
        db.meta.delete_file(FileId([4; 16]), 1).unwrap();
        let moved =
            RecordUpdate { parent: Some(ParentChange { to: Some(RecordId([2; 16])) }), ..Default::default() };
        db.meta.update_record(RecordId([1; 16]), 1, &moved).unwrap();
        let all = db.meta.changes(db.vault, start, 100).unwrap().unwrap();
        assert_eq!(all.until, head(&db));
        assert!(!all.more && !all.vault_changed);
        let ids: Vec<_> = all.records.iter().map(|r| r.id).collect();
        assert_eq!(ids, [RecordId([2; 16]), RecordId([1; 16])], "oldest change first, each once");
        assert_eq!(all.records[1].parent, Some(RecordId([2; 16])), "as it is now");
        assert_eq!(all.files.len(), 1);
        assert_eq!((all.files[0].name.0.as_slice(), all.files[0].record), (&b"new"[..], RecordId([2; 16])));
        assert_eq!(all.deleted_files, [FileId([4; 16])]);
        // Pages of one.
        let (mut since, mut pages, mut records, mut files) = (start, 0, 0, 0);
        loop {
            let page = db.meta.changes(db.vault, since, 1).unwrap().unwrap();
            pages += 1;
            records += page.records.len();
            files += page.files.len() + page.deleted_files.len();
            assert!(page.until > since || !page.more);
            since = page.until;
            if !page.more {
                break;
            }
        }
        assert_eq!((records, files, since), (2, 2, all.until));
        assert!(pages >= 4, "{pages}");
        // From the middle: only what changed after.
        let later = db.meta.changes(db.vault, all.until, 100).unwrap().unwrap();
        assert!(later.records.is_empty() && later.files.is_empty());
        // Members and the vault's name count as changes of the vault.
        let m = Member { user: "alice".into(), rights: Rights::Admin, wrapped_key: Some(Sealed(vec![1])) };
        db.meta.set_member(db.vault, &m).unwrap();
        let after = db.meta.changes(db.vault, all.until, 100).unwrap().unwrap();
        assert!(after.vault_changed && after.until > all.until);
        let renamed = VaultUpdate { name: Some(Sealed(b"w".to_vec())), e2e_required: None };
        db.meta.update_vault(db.vault, 1, &renamed).unwrap();
        assert!(db.meta.changes(db.vault, after.until, 100).unwrap().unwrap().vault_changed);
    }

    /// An owner holding locks on two files shows once on each (its label
    /// row is per file).
    #[test]
    fn a_lock_owner_on_two_files_is_listed_once_on_each() {
        use crate::ids::HolderId;
        use crate::protocol::{LockRange, SetLocks};
        let mut db = db();
        record(&mut db, 1, None);
        file(&mut db, 2, 1);
        file(&mut db, 3, 1);
        for (f, seq) in [(2u8, 1), (3, 2)] {
            let req = SetLocks {
                holder: HolderId([7; 16]),
                owner: 42,
                seq,
                ranges: vec![LockRange { start: 0, end: 9, exclusive: true }],
                label: format!("host:{f}"),
                wait_ms: 0,
            };
            let done = db.meta.set_locks(FileId([f; 16]), db.user, &req, 1000, 30_000).unwrap();
            assert_eq!(done, LockOutcome::Granted { released: false });
        }
        let held = db.meta.locks(FileId([2; 16]), 1000).unwrap();
        assert_eq!(held.len(), 1, "{held:?}");
        assert_eq!(held[0].0.label, "host:2");
    }

    /// A client further behind than the deletions kept, or ahead of the
    /// vault (a server restored from a backup), is told to list again.
    #[test]
    fn a_client_too_far_behind_or_ahead_lists_again() {
        let mut db = db();
        record(&mut db, 1, None);
        file(&mut db, 5, 1);
        db.meta.delete_file(FileId([5; 16]), 1).unwrap();
        let start = head(&db);
        assert_eq!(db.meta.changes(db.vault, start + 1, 10).unwrap(), None, "ahead");
        let tx = db.meta.conn.transaction().unwrap();
        for _ in 0..CHANGE_HISTORY {
            tx.exec("UPDATE records SET version = version + 1 WHERE id = ?1", [&[1u8; 16][..]]).unwrap();
        }
        tx.commit().unwrap();
        let now = head(&db);
        assert_eq!(now, start + CHANGE_HISTORY);
        assert!(db.meta.changes(db.vault, start, 10).unwrap().is_some(), "just within");
        assert_eq!(db.meta.changes(db.vault, start - 1, 10).unwrap(), None, "too far behind");
        // Deletions older than that are forgotten, newer ones kept.
        file(&mut db, 2, 1);
        db.meta.delete_file(FileId([2; 16]), 1).unwrap();
        let gone = db.meta.changes(db.vault, now, 10).unwrap().unwrap();
        assert_eq!(gone.deleted_files, [FileId([2; 16])]);
        let tombstone = |id: u8| -> i64 {
            db.meta
                .conn
                .q_row("SELECT COUNT(*) FROM changes WHERE object = ?1 AND gone = 1", [&[id; 16][..]], |r| {
                    r.get(0)
                })
                .unwrap()
        };
        assert_eq!((tombstone(5), tombstone(2)), (0, 1), "the old deletion forgotten, the new one kept");
    }

    /// A database whose triggers are older (or missing, as before the feed)
    /// gets them at the next open; one that has them is left as it is.
    #[test]
    fn an_older_database_gets_the_triggers_at_open() {
        let mut db = db();
        let path = db._dir.path().join("meta.db");
        db.meta.conn.execute_batch("DROP TRIGGER records_inserted; PRAGMA user_version = 0;").unwrap();
        record(&mut db, 1, None);
        let before = head(&db);
        drop(db.meta);
        let mut meta = Meta::open(&path).unwrap();
        let version: i64 = meta.conn.pragma_query_value(None, "user_version", |r| r.get(0)).unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        let r = NewRecord {
            id: RecordId([2; 16]),
            parent: None,
            title: Sealed(vec![2]),
            fields: Sealed(Vec::new()),
        };
        meta.create_record(db.vault, &r).unwrap();
        let changes = meta.changes(db.vault, before, 10).unwrap().unwrap();
        assert_eq!(changes.records.iter().map(|r| r.id).collect::<Vec<_>>(), [RecordId([2; 16])]);
    }

    /// A transaction of the server that reads and then writes, while
    /// another process (`vaultfs admin backup` writing its hold) writes
    /// between the two: the other process waits, the server's write goes
    /// through. (Seen in CI as uploads refused with "database is locked"
    /// during a backup.)
    #[test]
    fn another_process_writing_waits_for_a_transaction_that_read_first() {
        let mut db = db();
        let mut admin = Meta::open(&db._dir.path().join("meta.db")).unwrap();
        // Told at once rather than after waiting.
        admin.conn.busy_timeout(std::time::Duration::ZERO).unwrap();
        let tx = db.meta.conn.transaction().unwrap();
        let held: i64 = tx.q_row("SELECT COUNT(*) FROM blob_holds", [], |r| r.get(0)).unwrap();
        assert_eq!(held, 0);
        let e = admin.hold_blobs(&[1; 16], i64::MAX).expect_err("the admin wrote inside the transaction");
        assert!(e.to_string().contains("locked"), "{e}");
        tx.exec("INSERT INTO deferred_blobs (blob_id) VALUES ('ab')", []).unwrap();
        tx.commit().unwrap();
        admin.hold_blobs(&[1; 16], i64::MAX).unwrap();
    }

    /// A database a newer vaultfs wrote is refused before anything in it
    /// changes; one at version 2 (whose lock tables and some columns came
    /// at any open, not with a version) gets them, and the holds, at the
    /// next.
    #[test]
    fn versions_are_upgraded_in_steps_and_a_newer_one_is_refused() {
        let db = db();
        let path = db._dir.path().join("meta.db");
        db.meta
            .conn
            .execute_batch(
                "DROP TABLE lock_owners; DROP TABLE locks; DROP TABLE blob_holds; \
                 ALTER TABLE users DROP COLUMN public_key; PRAGMA user_version = 2;",
            )
            .unwrap();
        drop(db.meta);
        let meta = Meta::open(&path).unwrap();
        assert_eq!(schema_version(&meta.conn).unwrap(), SCHEMA_VERSION);
        let tables: i64 = meta
            .conn
            .query_row(
                "SELECT COUNT(*) FROM sqlite_master WHERE name IN ('locks', 'lock_owners', 'blob_holds')",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(tables, 3);
        assert!(meta.public_key("alice").unwrap().is_none(), "the column added without a version is back");
        meta.conn.pragma_update(None, "journal_mode", "DELETE").unwrap();
        meta.conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1).unwrap();
        drop(meta);
        let before = std::fs::read(&path).unwrap();
        let e = Meta::open(&path).err().expect("a newer schema was opened");
        assert!(matches!(e, MetaError::TooNew { found, .. } if found == SCHEMA_VERSION + 1), "{e}");
        assert!(e.to_string().contains("newer vaultfs"), "{e}");
        assert!(std::fs::read(&path).unwrap() == before, "the refused database changed");
    }

    /// Deleting a vault deletes its changes (its members' triggers do not
    /// stand in the way), and its feed is gone.
    #[test]
    fn a_deleted_vault_takes_its_changes() {
        let mut db = db();
        record(&mut db, 1, None);
        file(&mut db, 2, 1);
        db.meta.delete_file(FileId([2; 16]), 1).unwrap();
        db.meta.delete_record(RecordId([1; 16]), 1).unwrap();
        db.meta.delete_vault(db.vault, 1).unwrap();
        assert!(matches!(db.meta.changes(db.vault, 0, 10), Err(MetaError::NotFound(_))));
        let left: i64 = db.meta.conn.q_row("SELECT COUNT(*) FROM changes", [], |r| r.get(0)).unwrap();
        assert_eq!(left, 0);
    }
}
