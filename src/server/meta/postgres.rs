//! Server metadata in PostgreSQL, shared by several server instances.
//!
//! How a unit of the service's work flows: [`PgStore::run`] takes a
//! connection from the pool, opens a transaction (READ COMMITTED), gives the
//! unit a [`PgTx`] (a [`MetaStore`]), and commits when the unit succeeds, or
//! rolls back when it fails; a unit PostgreSQL aborted for a deadlock or a
//! serialization failure runs again from the start (so units are `Fn`).
//! Each call that writes runs in a savepoint, so a call that fails leaves
//! nothing behind even when the unit goes on (as a failed SQLite
//! transaction leaves nothing).
//!
//! What SQLite gets from its one connection, this gets from row locks:
//! - every call that checks and then changes a vault's contents (a
//!   version, emptiness, a record's ancestors, the last admin) first locks
//!   the vault's row, the same row the change feed's triggers update, so
//!   writers of one vault take turns as on SQLite; vaults always before
//!   files, so two units never wait on each other in a cycle;
//! - lock requests on a file take turns on the file's row, staged uploads on
//!   their own row, wallets on theirs.
//!
//! The change feed is made by triggers, as on SQLite; they also `NOTIFY`,
//! and every instance `LISTEN`s ([`Listener`]), so a wait for changes (or
//! for a lock) on one instance wakes on a change made through another, and
//! a session ended through one is dropped from every instance's cache.
//!
//! The driver is async (tokio-postgres, pooled by deadpool); the service
//! calls the store from its blocking pool, as it calls SQLite, and each
//! query is awaited there. The connections' I/O runs on a small runtime of
//! the store's own, so a call never depends on which runtime (if any) the
//! caller runs in.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row};

use super::{Committed, FileRow, LockOutcome, MetaError, MetaStore, Result, User, CHANGE_HISTORY};
use crate::ids::{FileId, HolderId, RecordId, VaultId};
use crate::protocol::{
    Changes, DeleteItem, DeleteOutcome, FileInfo, FileUpdate, HeldLock, KdfWire, Limits, LockRange, Member,
    NewFile, NewRecord, NewVault, RecordInfo, RecordUpdate, Rights, Sealed, SetLocks, VaultInfo, VaultUpdate,
};
use crate::server::blob::BlobId;

mod listen;
mod schema;
pub use listen::Events;

/// How long a unit waits for a connection from the pool, and for a new
/// connection to be made, before it fails (the request gets an error, the
/// readiness check says the database does not answer).
const POOL_WAIT: Duration = Duration::from_secs(10);

/// Tries of a unit PostgreSQL keeps aborting for deadlocks (see [`PgStore::run`]).
const UNIT_TRIES: u32 = 5;

/// Why PostgreSQL aborts a transaction that would succeed if run again:
/// a deadlock (40P01), a serialization failure (40001).
const CONFLICTS: [SqlState; 2] = [SqlState::T_R_DEADLOCK_DETECTED, SqlState::T_R_SERIALIZATION_FAILURE];

/// What the store is opened with (from `[metadata]` in the server's config).
#[derive(Clone)]
pub struct PgSettings {
    /// The parsed connection settings, password included.
    pub config: tokio_postgres::Config,
    /// Connections kept at most.
    pub pool_size: usize,
    /// TLS to the database (see [`tls_connector`]); `None`: plain TCP.
    pub tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
}

/// TLS to the database, trusting only the authorities in the PEM file
/// `ca_file`, with the database's name checked against the URL's host.
pub fn tls_connector(ca_file: &std::path::Path) -> Result<tokio_postgres_rustls::MakeRustlsConnect> {
    use rustls::pki_types::pem::PemObject;
    let bad = |e: String| MetaError::Unavailable(format!("{}: {e}", ca_file.display()));
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca_file).map_err(|e| bad(e.to_string()))? {
        roots.add(cert.map_err(|e| bad(e.to_string()))?).map_err(|e| bad(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(bad("no certificate in the file".into()));
    }
    let config =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

impl std::fmt::Debug for PgSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the password.
        f.debug_struct("PgSettings")
            .field("hosts", &self.config.get_hosts())
            .field("ports", &self.config.get_ports())
            .field("user", &self.config.get_user())
            .field("dbname", &self.config.get_dbname())
            .field("pool_size", &self.pool_size)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// The runtime the connections' I/O runs on; shut down without waiting
/// when the store goes (dropping a runtime inside another one would panic).
struct IoRuntime(Option<tokio::runtime::Runtime>);

impl IoRuntime {
    fn handle(&self) -> &tokio::runtime::Handle {
        self.0.as_ref().expect("runtime present until drop").handle()
    }

    /// Waits for `fut` on this thread, with the store's runtime entered
    /// (where new connections and their I/O go).
    fn wait<F: Future>(&self, fut: F) -> F::Output {
        let _entered = self.handle().enter();
        futures_executor::block_on(fut)
    }
}

impl Drop for IoRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// The PostgreSQL metadata store: a pool of connections (cheap to clone).
#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
    rt: Arc<IoRuntime>,
    settings: PgSettings,
}

impl PgStore {
    /// Connects, and brings the schema to this vaultfs's version (or
    /// refuses a database a newer vaultfs wrote, changing nothing).
    pub fn open(settings: PgSettings) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("vaultfs-pg")
            .enable_all()
            .build()
            .map_err(|e| MetaError::Unavailable(format!("starting the database runtime: {e}")))?;
        let rt = Arc::new(IoRuntime(Some(rt)));
        let manager_config = ManagerConfig { recycling_method: RecyclingMethod::Fast };
        let manager = match &settings.tls {
            Some(tls) => Manager::from_config(settings.config.clone(), tls.clone(), manager_config),
            None => Manager::from_config(settings.config.clone(), NoTls, manager_config),
        };
        let pool = {
            let _entered = rt.handle().enter();
            Pool::builder(manager)
                .max_size(settings.pool_size.max(1))
                .runtime(deadpool_postgres::Runtime::Tokio1)
                .wait_timeout(Some(POOL_WAIT))
                .create_timeout(Some(POOL_WAIT))
                .build()
                .map_err(|e| MetaError::Unavailable(format!("making the connection pool: {e}")))?
        };
        let store = PgStore { pool, rt, settings };
        let mut client = store.client()?;
        store.rt.wait(schema::migrate(&mut client))?;
        Ok(store)
    }

    fn client(&self) -> Result<deadpool_postgres::Object> {
        self.rt.wait(self.pool.get()).map_err(|e| {
            MetaError::Unavailable(format!("no database connection: {}", crate::with_causes(&e)))
        })
    }

    /// Runs `f` in one transaction (see the module comment); again, from
    /// the start, when PostgreSQL aborted it for a deadlock or a
    /// serialization failure (nothing of it was kept, and the other
    /// transaction went on), up to [`UNIT_TRIES`] times in all.
    pub fn run<T, E: From<MetaError>>(
        &self,
        f: impl Fn(&mut dyn MetaStore) -> std::result::Result<T, E>,
    ) -> std::result::Result<T, E> {
        let mut tries = 1;
        loop {
            let (result, conflicted) = self.run_once(&f);
            if !conflicted || tries == UNIT_TRIES {
                return result;
            }
            tracing::debug!(tries, "a unit met a deadlock or a serialization failure: running it again");
            // Apart by a random few milliseconds, growing: two units that
            // met once do not meet again in step.
            let mut jitter = [0u8; 1];
            let _ = getrandom::getrandom(&mut jitter);
            std::thread::sleep(Duration::from_millis(u64::from(tries) * (5 + u64::from(jitter[0] % 20))));
            tries += 1;
        }
    }

    /// One try of [`PgStore::run`]: its result, and whether it failed
    /// because PostgreSQL aborted it for a conflict with another.
    fn run_once<T, E: From<MetaError>>(
        &self,
        f: &impl Fn(&mut dyn MetaStore) -> std::result::Result<T, E>,
    ) -> (std::result::Result<T, E>, bool) {
        let client = match self.client() {
            Ok(c) => c,
            Err(e) => return (Err(e.into()), false),
        };
        if let Err(e) = self.rt.wait(client.batch_execute("BEGIN")) {
            return (Err(MetaError::from(e).into()), false);
        }
        let mut tx = PgTx {
            client: Some(client),
            rt: Arc::clone(&self.rt),
            open: true,
            failed: Default::default(),
            conflicted: Default::default(),
        };
        let mut result = f(&mut tx);
        if result.is_ok() && tx.failed.get() {
            result = Err(
                MetaError::Unavailable("a statement of this unit failed: nothing was kept".into()).into()
            );
        }
        let end = if result.is_ok() { "COMMIT" } else { "ROLLBACK" };
        let ended = tx.batch(end);
        tx.open = false;
        match (result, ended) {
            (Ok(v), Ok(())) => (Ok(v), false),
            // A COMMIT that failed may still have committed: never again.
            (Ok(_), Err(e)) => (Err(e.into()), false),
            (Err(e), _) => (Err(e), tx.conflicted.get()),
        }
    }

    /// Starts listening for other instances' changes (see [`Events`]).
    pub fn listen(&self, events: Events) {
        listen::start(self.rt.handle(), self.settings.config.clone(), self.settings.tls.clone(), events);
    }
}

/// One unit's transaction on one pooled connection.
pub struct PgTx {
    client: Option<deadpool_postgres::Object>,
    rt: Arc<IoRuntime>,
    /// Still inside `BEGIN` (not committed or rolled back).
    open: bool,
    /// A statement failed outside a savepoint: PostgreSQL has aborted the
    /// transaction, and a `COMMIT` would quietly roll it back, so the unit
    /// fails whatever it returns.
    failed: std::cell::Cell<bool>,
    /// A statement failed for a deadlock or a serialization failure: a
    /// unit that then fails is run again ([`PgStore::run`]).
    conflicted: std::cell::Cell<bool>,
}

impl Drop for PgTx {
    fn drop(&mut self) {
        // A unit that panicked leaves its transaction open: that connection
        // is closed, never handed to the next unit mid-transaction.
        if self.open {
            if let Some(client) = self.client.take() {
                drop(deadpool_postgres::Object::take(client));
            }
        }
    }
}

type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

impl PgTx {
    fn c(&self) -> &deadpool_postgres::Object {
        self.client.as_ref().expect("client present until drop")
    }

    /// Notes a failed statement (see [`PgTx::failed`]).
    fn noted<T>(&self, r: std::result::Result<T, tokio_postgres::Error>) -> Result<T> {
        if let Err(e) = &r {
            self.failed.set(true);
            if e.code().is_some_and(|c| CONFLICTS.contains(c)) {
                self.conflicted.set(true);
            }
        }
        Ok(r?)
    }

    fn batch(&self, sql: &str) -> Result<()> {
        self.noted(self.rt.wait(self.c().batch_execute(sql)))
    }

    fn query(&self, sql: &str, params: Params<'_>) -> Result<Vec<Row>> {
        let c = self.c();
        self.noted(self.rt.wait(async {
            let statement = c.prepare_cached(sql).await?;
            c.query(&statement, params).await
        }))
    }

    fn opt(&self, sql: &str, params: Params<'_>) -> Result<Option<Row>> {
        Ok(self.query(sql, params)?.into_iter().next())
    }

    fn one(&self, sql: &str, params: Params<'_>) -> Result<Row> {
        self.opt(sql, params)?.ok_or_else(|| MetaError::Unavailable(format!("no row from: {sql}")))
    }

    fn exec(&self, sql: &str, params: Params<'_>) -> Result<u64> {
        let c = self.c();
        self.noted(self.rt.wait(async {
            let statement = c.prepare_cached(sql).await?;
            c.execute(&statement, params).await
        }))
    }

    /// Runs `f` in a savepoint: what it wrote is undone if it fails.
    fn step<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        self.batch("SAVEPOINT step")?;
        let failed_before = self.failed.get();
        match f(self) {
            Ok(v) => {
                self.batch("RELEASE SAVEPOINT step")?;
                Ok(v)
            }
            Err(e) => {
                // Undone: what failed inside no longer aborts the transaction.
                self.batch("ROLLBACK TO SAVEPOINT step; RELEASE SAVEPOINT step")?;
                self.failed.set(failed_before);
                Err(e)
            }
        }
    }

    /// Takes the vault's row lock for the rest of the transaction (see the
    /// module comment); `NotFound` if there is no such vault.
    fn lock_vault(&self, vault: VaultId) -> Result<()> {
        self.opt("SELECT 1 FROM vaults WHERE id = $1 FOR NO KEY UPDATE", &[&&vault.0[..]])?
            .map(|_| ())
            .ok_or(MetaError::NotFound("vault"))
    }

    /// The vault a file is in (never changes), or `NotFound`.
    fn file_vault(&self, id: FileId) -> Result<VaultId> {
        let row = self.opt("SELECT vault_id FROM files WHERE id = $1", &[&&id.0[..]])?;
        id16(row.ok_or(MetaError::NotFound("file"))?.try_get(0)?, VaultId)
    }

    fn record_vault(&self, id: RecordId) -> Result<VaultId> {
        let row = self.opt("SELECT vault_id FROM records WHERE id = $1", &[&&id.0[..]])?;
        id16(row.ok_or(MetaError::NotFound("record"))?.try_get(0)?, VaultId)
    }

    fn load_file(&self, id: FileId) -> Result<FileRow> {
        let row = self.opt(&format!("SELECT {FILE_COLUMNS} FROM files WHERE id = $1"), &[&&id.0[..]])?;
        file_of(&row.ok_or(MetaError::NotFound("file"))?)
    }

    fn load_record(&self, id: RecordId) -> Result<RecordInfo> {
        let row = self.opt(&format!("SELECT {RECORD_COLUMNS} FROM records WHERE id = $1"), &[&&id.0[..]])?;
        record_of(&row.ok_or(MetaError::NotFound("record"))?)
    }

    fn member_rights(&self, user_id: i64, vault: VaultId) -> Result<Option<Rights>> {
        let row = self.opt(
            "SELECT rights FROM members WHERE vault_id = $1 AND user_id = $2",
            &[&&vault.0[..], &user_id],
        )?;
        Ok(match row {
            Some(r) => Rights::parse(&r.try_get::<_, String>(0)?),
            None => None,
        })
    }

    /// Points file `id` at new content if it is still at `expected` (its
    /// vault locked by the caller).
    fn commit_in(&self, id: FileId, expected: u64, c: &Committed) -> Result<(u64, Option<BlobId>)> {
        let row = self.load_file(id)?;
        check_version(row.info.version, expected)?;
        self.exec(
            "UPDATE files SET blob_id = $2, size = $3, e2e = $4, mtime_ms = $5, meta = $6, version = version + 1 \
             WHERE id = $1",
            &[
                &&id.0[..],
                &c.blob.to_hex(),
                &(c.size as i64),
                &c.e2e,
                &c.mtime_ms,
                &c.meta.as_ref().and_then(meta_column),
            ],
        )?;
        Ok((expected + 1, row.blob))
    }

    /// Creates record `r` in `vault` (the caller holds the vault's lock):
    /// its parent, if any, must be a record of the same vault.
    fn record_in(&self, vault: VaultId, r: &NewRecord) -> Result<RecordInfo> {
        if let Some(parent) = r.parent {
            if self.record_vault(parent)? != vault {
                // The answer for a record that does not exist: one in a vault
                // the caller may not see is not told apart.
                return Err(MetaError::NotFound("record"));
            }
        }
        let n = self.exec(
            "INSERT INTO records (id, vault_id, parent_id, title, fields, version) \
             VALUES ($1, $2, $3, $4, $5, 1) ON CONFLICT (id) DO NOTHING",
            &[&&r.id.0[..], &&vault.0[..], &r.parent.as_ref().map(|p| &p.0[..]), &r.title.0, &r.fields.0],
        )?;
        if n == 0 {
            return Err(MetaError::Exists("record"));
        }
        Ok(r.created_in(vault))
    }

    fn create_in(&self, record: RecordId, f: &NewFile, now_ms: i64) -> Result<FileInfo> {
        let vault = self.record_vault(record)?;
        let mtime = f.mtime_ms.unwrap_or(now_ms);
        let n = self.exec(
            "INSERT INTO files (id, vault_id, record_id, name, size, version, e2e, mtime_ms, blob_id, meta) \
             VALUES ($1, $2, $3, $4, 0, 1, $5, $6, NULL, $7) ON CONFLICT (id) DO NOTHING",
            &[&&f.id.0[..], &&vault.0[..], &&record.0[..], &f.name.0, &f.e2e, &mtime, &meta_column(&f.meta)],
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

    fn copy_in(&self, id: FileId, copy: &NewFile, c: &Committed) -> Result<(u64, Option<BlobId>)> {
        let row = self.opt("SELECT record_id FROM files WHERE id = $1", &[&&id.0[..]])?;
        let record = id16(row.ok_or(MetaError::NotFound("file"))?.try_get(0)?, RecordId)?;
        let created = self.create_in(record, copy, c.mtime_ms)?;
        let for_copy = Committed { meta: Some(copy.meta.clone()), ..c.clone() };
        self.commit_in(created.id, created.version, &for_copy)
    }

    fn delete_file_in(&self, id: FileId, expected: u64) -> Result<Option<BlobId>> {
        let row = self.load_file(id)?;
        check_version(row.info.version, expected)?;
        self.exec("DELETE FROM files WHERE id = $1", &[&&id.0[..]])?;
        Ok(row.blob)
    }

    fn delete_record_in(&self, id: RecordId, expected: u64) -> Result<()> {
        let current = self.load_record(id)?;
        check_version(current.version, expected)?;
        let children: i64 = self
            .one(
                "SELECT (SELECT COUNT(*) FROM records WHERE parent_id = $1) \
                 + (SELECT COUNT(*) FROM files WHERE record_id = $1)",
                &[&&id.0[..]],
            )?
            .try_get(0)?;
        if children > 0 {
            return Err(refuse("record is not empty"));
        }
        self.exec("DELETE FROM records WHERE id = $1", &[&&id.0[..]])?;
        Ok(())
    }

    fn ensure_an_admin(&self, vault: VaultId) -> Result<()> {
        let admins: i64 = self
            .one("SELECT COUNT(*) FROM members WHERE vault_id = $1 AND rights = 'admin'", &[&&vault.0[..]])?
            .try_get(0)?;
        if admins == 0 {
            return Err(refuse("a vault must keep at least one admin"));
        }
        Ok(())
    }

    fn vault_query(&self, filter: &str, params: Params<'_>) -> Result<Vec<VaultInfo>> {
        let rows = self.query(
            &format!(
                "SELECT v.id, v.name, m.rights, v.e2e_required, v.version, m.wrapped_key, v.seq \
                 FROM vaults v JOIN members m ON m.vault_id = v.id WHERE {filter} ORDER BY v.id"
            ),
            params,
        )?;
        rows.iter()
            .map(|r| {
                Ok(VaultInfo {
                    id: id16(r.try_get(0)?, VaultId)?,
                    name: Sealed(r.try_get(1)?),
                    rights: Rights::parse(&r.try_get::<_, String>(2)?).unwrap_or(Rights::Read),
                    e2e_required: r.try_get(3)?,
                    version: r.try_get::<_, i64>(4)? as u64,
                    wrapped_key: r.try_get::<_, Option<Vec<u8>>>(5)?.map(Sealed),
                    changes: r.try_get::<_, i64>(6)? as u64,
                })
            })
            .collect()
    }

    fn live_locks(&self, file: FileId, now_ms: i64) -> Result<Vec<(HeldLock, i64, i64)>> {
        let rows = self.query(
            "SELECT l.user_id, u.name, COALESCE(o.label, ''), l.holder, l.owner, l.start, l.last, l.exclusive, l.expires
             FROM locks l JOIN users u ON u.id = l.user_id
             LEFT JOIN lock_owners o ON o.user_id = l.user_id AND o.holder = l.holder AND o.owner = l.owner
                 AND o.file_id = l.file_id
             WHERE l.file_id = $1 AND l.expires > $2 ORDER BY l.start",
            &[&&file.0[..], &now_ms],
        )?;
        rows.iter()
            .map(|r| {
                let expires: i64 = r.try_get(8)?;
                let lock = HeldLock {
                    user: r.try_get(1)?,
                    label: r.try_get(2)?,
                    holder: id16(r.try_get(3)?, HolderId)?,
                    owner: r.try_get::<_, i64>(4)? as u64,
                    range: LockRange {
                        start: r.try_get::<_, i64>(5)? as u64,
                        end: r.try_get::<_, i64>(6)? as u64,
                        exclusive: r.try_get(7)?,
                    },
                    expires_in_ms: (expires - now_ms).max(0) as u64,
                };
                Ok((lock, expires, r.try_get::<_, i64>(0)?))
            })
            .collect()
    }
}

fn id16<T>(bytes: Vec<u8>, make: fn([u8; 16]) -> T) -> Result<T> {
    let arr: [u8; 16] = bytes
        .try_into()
        .map_err(|_| MetaError::Unavailable("an id in the database is not 16 bytes".into()))?;
    Ok(make(arr))
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

fn meta_column(meta: &Sealed) -> Option<&[u8]> {
    (!meta.0.is_empty()).then_some(&meta.0[..])
}

const USER_COLUMNS: &str = "u.id, u.name, u.upload_limit, u.e2e_limit, u.image_max_edge, u.login_salt, \
                            u.kdf_m, u.kdf_t, u.kdf_p, u.login_hash, u.enroll_hash, u.login_version";

fn user_of(r: &Row) -> Result<User> {
    Ok(User {
        id: r.try_get(0)?,
        name: r.try_get(1)?,
        limits: Limits {
            upload_limit: r.try_get::<_, i64>(2)? as u64,
            e2e_limit: r.try_get::<_, i64>(3)? as u64,
            image_max_edge: r.try_get::<_, i64>(4)? as u32,
        },
        login_salt: r.try_get(5)?,
        kdf: KdfWire {
            m_cost_kib: r.try_get::<_, i64>(6)? as u32,
            t_cost: r.try_get::<_, i64>(7)? as u32,
            p_cost: r.try_get::<_, i64>(8)? as u32,
        },
        login_hash: r.try_get(9)?,
        enroll_hash: r.try_get(10)?,
        login_version: r.try_get::<_, i64>(11)? as u8,
    })
}

const RECORD_COLUMNS: &str = "id, vault_id, parent_id, title, fields, version";

fn record_of(r: &Row) -> Result<RecordInfo> {
    Ok(RecordInfo {
        id: id16(r.try_get(0)?, RecordId)?,
        vault: id16(r.try_get(1)?, VaultId)?,
        parent: r.try_get::<_, Option<Vec<u8>>>(2)?.map(|p| id16(p, RecordId)).transpose()?,
        title: Sealed(r.try_get(3)?),
        fields: Sealed(r.try_get(4)?),
        version: r.try_get::<_, i64>(5)? as u64,
    })
}

const FILE_COLUMNS: &str = "id, vault_id, record_id, name, size, version, e2e, mtime_ms, blob_id, meta";

fn file_of(r: &Row) -> Result<FileRow> {
    Ok(FileRow {
        info: FileInfo {
            id: id16(r.try_get(0)?, FileId)?,
            vault: id16(r.try_get(1)?, VaultId)?,
            record: id16(r.try_get(2)?, RecordId)?,
            name: Sealed(r.try_get(3)?),
            size: r.try_get::<_, i64>(4)? as u64,
            version: r.try_get::<_, i64>(5)? as u64,
            e2e: r.try_get(6)?,
            mtime_ms: r.try_get(7)?,
            meta: Sealed(r.try_get::<_, Option<Vec<u8>>>(9)?.unwrap_or_default()),
        },
        blob: r.try_get::<_, Option<String>>(8)?.and_then(|h| BlobId::from_hex(&h)),
    })
}

/// How long an owner's last request number is kept at least (as on SQLite).
const OWNER_KEPT_MS: i64 = 2 * crate::protocol::MAX_WAIT_MS as i64;

impl MetaStore for PgTx {
    fn server_secret(&mut self) -> Result<[u8; 32]> {
        // Every instance uses the first one written (the pre-login answers
        // must agree whichever instance gives them).
        let mut secret = [0u8; 32];
        getrandom::getrandom(&mut secret).map_err(|e| refuse(format!("getrandom: {e}")))?;
        self.exec(
            "INSERT INTO settings (key, value) VALUES ('secret', $1) ON CONFLICT (key) DO NOTHING",
            &[&&secret[..]],
        )?;
        let stored: Vec<u8> = self.one("SELECT value FROM settings WHERE key = 'secret'", &[])?.try_get(0)?;
        <[u8; 32]>::try_from(stored)
            .map_err(|_| MetaError::Unavailable("the stored secret is not 32 bytes".into()))
    }

    fn put_setting(&mut self, key: &str, value: &[u8]) -> Result<()> {
        self.exec(
            "INSERT INTO settings (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            &[&key, &value],
        )?;
        Ok(())
    }

    fn setting(&self, key: &str) -> Result<Option<Vec<u8>>> {
        self.opt("SELECT value FROM settings WHERE key = $1", &[&key])?.map(|r| Ok(r.try_get(0)?)).transpose()
    }

    fn create_user(
        &mut self,
        name: &str,
        limits: Limits,
        login_salt: &[u8],
        kdf: KdfWire,
        enroll_hash: &[u8],
    ) -> Result<()> {
        let done = self.exec(
            "INSERT INTO users (name, upload_limit, e2e_limit, image_max_edge, login_salt, kdf_m, kdf_t, kdf_p, \
             enroll_hash) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (name) DO NOTHING",
            &[
                &name,
                &(limits.upload_limit as i64),
                &(limits.e2e_limit as i64),
                &(limits.image_max_edge as i64),
                &login_salt,
                &(kdf.m_cost_kib as i64),
                &(kdf.t_cost as i64),
                &(kdf.p_cost as i64),
                &enroll_hash,
            ],
        )?;
        if done == 0 {
            return Err(MetaError::Exists("user"));
        }
        Ok(())
    }

    fn user_by_name(&self, name: &str) -> Result<Option<User>> {
        self.opt(&format!("SELECT {USER_COLUMNS} FROM users u WHERE u.name = $1"), &[&name])?
            .map(|r| user_of(&r))
            .transpose()
    }

    fn users(&self) -> Result<Vec<User>> {
        self.query(&format!("SELECT {USER_COLUMNS} FROM users u ORDER BY u.name"), &[])?
            .iter()
            .map(user_of)
            .collect()
    }

    fn set_limits(&mut self, name: &str, limits: Limits) -> Result<()> {
        let n = self.exec(
            "UPDATE users SET upload_limit = $2, e2e_limit = $3, image_max_edge = $4 WHERE name = $1",
            &[
                &name,
                &(limits.upload_limit as i64),
                &(limits.e2e_limit as i64),
                &(limits.image_max_edge as i64),
            ],
        )?;
        if n == 0 {
            return Err(MetaError::NotFound("user"));
        }
        Ok(())
    }

    fn remove_user(&mut self, name: &str) -> Result<()> {
        if self.exec("DELETE FROM users WHERE name = $1", &[&name])? == 0 {
            return Err(MetaError::NotFound("user"));
        }
        Ok(())
    }

    fn reset_enrollment(&mut self, name: &str, enroll_hash: &[u8], login_salt: &[u8]) -> Result<()> {
        self.step(|tx| {
            let id: i64 = tx
                .opt("SELECT id FROM users WHERE name = $1", &[&name])?
                .ok_or(MetaError::NotFound("user"))?
                .try_get(0)?;
            tx.exec(
                "UPDATE users SET enroll_hash = $2, login_hash = NULL, login_salt = $3 WHERE id = $1",
                &[&id, &enroll_hash, &login_salt],
            )?;
            tx.exec("DELETE FROM sessions WHERE user_id = $1", &[&id])?;
            Ok(())
        })
    }

    fn complete_enrollment(&mut self, user_id: i64, login_hash: &[u8], version: u8) -> Result<()> {
        self.exec(
            "UPDATE users SET login_hash = $2, login_version = $3, enroll_hash = NULL WHERE id = $1",
            &[&user_id, &login_hash, &(version as i64)],
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
        let n = self.exec(
            "UPDATE users SET login_hash = $3, login_version = $4 WHERE id = $1 AND login_hash = $2",
            &[&user_id, &old_hash, &new_hash, &(version as i64)],
        )?;
        Ok(n == 1)
    }

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
        self.step(|tx| {
            let n = tx.exec(
                "UPDATE users SET login_hash = $3, login_version = $4 WHERE id = $1 AND login_hash = $2",
                &[&user_id, &old_hash, &new_hash, &(version as i64)],
            )?;
            if n != 1 {
                return Ok(None);
            }
            let current = tx.opt("SELECT version FROM wallets WHERE user_id = $1 FOR UPDATE", &[&user_id])?;
            match current.map(|r| r.try_get::<_, i64>(0)).transpose()? {
                Some(cur) if cur as u64 == wallet_version => {}
                Some(cur) => return Err(MetaError::VersionMismatch { current: cur as u64 }),
                None => return Err(MetaError::NotFound("wallet")),
            }
            tx.exec(
                "UPDATE wallets SET blob = $2, version = version + 1 WHERE user_id = $1",
                &[&user_id, &wallet],
            )?;
            tx.exec(
                "DELETE FROM sessions WHERE user_id = $1 AND token_hash != $2",
                &[&user_id, &keep_session],
            )?;
            tx.batch("NOTIFY vaultfs_changes")?;
            Ok(Some(wallet_version + 1))
        })
    }

    fn set_public_key(&mut self, user_id: i64, key: &[u8]) -> Result<()> {
        self.exec("UPDATE users SET public_key = $1 WHERE id = $2", &[&key, &user_id])?;
        Ok(())
    }

    fn public_key(&self, name: &str) -> Result<Option<Vec<u8>>> {
        Ok(match self.opt("SELECT public_key FROM users WHERE name = $1", &[&name])? {
            Some(r) => r.try_get(0)?,
            None => None,
        })
    }

    fn create_session(&mut self, user_id: i64, token_hash: &[u8], expires: i64) -> Result<()> {
        self.exec("DELETE FROM sessions WHERE expires < $1", &[&(expires - 366 * 86_400)])?;
        self.exec(
            "INSERT INTO sessions (token_hash, user_id, expires) VALUES ($1, $2, $3)",
            &[&token_hash, &user_id, &expires],
        )?;
        Ok(())
    }

    fn session_user(&self, token_hash: &[u8], now: i64) -> Result<Option<User>> {
        self.opt(
            &format!(
                "SELECT {USER_COLUMNS} FROM sessions s JOIN users u ON u.id = s.user_id \
                 WHERE s.token_hash = $1 AND s.expires > $2"
            ),
            &[&token_hash, &now],
        )?
        .map(|r| user_of(&r))
        .transpose()
    }

    fn delete_session(&mut self, token_hash: &[u8]) -> Result<()> {
        self.exec("DELETE FROM sessions WHERE token_hash = $1", &[&token_hash])?;
        Ok(())
    }

    fn wallet(&self, user_id: i64) -> Result<Option<(Vec<u8>, u64)>> {
        self.opt("SELECT blob, version FROM wallets WHERE user_id = $1", &[&user_id])?
            .map(|r| Ok((r.try_get(0)?, r.try_get::<_, i64>(1)? as u64)))
            .transpose()
    }

    fn wallet_version(&self, user_id: i64) -> Result<Option<u64>> {
        self.opt("SELECT version FROM wallets WHERE user_id = $1", &[&user_id])?
            .map(|r| Ok(r.try_get::<_, i64>(0)? as u64))
            .transpose()
    }

    fn put_wallet(&mut self, user_id: i64, blob: &[u8], expected: Option<u64>) -> Result<u64> {
        self.step(|tx| {
            let current = tx
                .opt("SELECT version FROM wallets WHERE user_id = $1 FOR UPDATE", &[&user_id])?
                .map(|r| r.try_get::<_, i64>(0))
                .transpose()?;
            match (current, expected) {
                (None, None) => {
                    let n = tx.exec(
                        "INSERT INTO wallets (user_id, blob, version) VALUES ($1, $2, 1) \
                         ON CONFLICT (user_id) DO NOTHING",
                        &[&user_id, &blob],
                    )?;
                    if n == 0 {
                        // Another instance stored the first one just now.
                        let cur = tx.wallet_version(user_id)?.unwrap_or(1);
                        return Err(MetaError::VersionMismatch { current: cur });
                    }
                    tx.batch("NOTIFY vaultfs_changes")?;
                    Ok(1)
                }
                (Some(cur), Some(exp)) if cur as u64 == exp => {
                    tx.exec(
                        "UPDATE wallets SET blob = $2, version = version + 1 WHERE user_id = $1",
                        &[&user_id, &blob],
                    )?;
                    // Waits for changes watch the wallet too.
                    tx.batch("NOTIFY vaultfs_changes")?;
                    Ok(exp + 1)
                }
                (Some(cur), _) => Err(MetaError::VersionMismatch { current: cur as u64 }),
                (None, Some(_)) => Err(MetaError::NotFound("wallet")),
            }
        })
    }

    fn rights(&self, user_id: i64, vault: VaultId) -> Result<Option<Rights>> {
        self.member_rights(user_id, vault)
    }

    fn create_vault(&mut self, user_id: i64, v: &NewVault) -> Result<u64> {
        self.step(|tx| {
            let n = tx.exec(
                "INSERT INTO vaults (id, name, e2e_required, version) VALUES ($1, $2, $3, 1) \
                 ON CONFLICT (id) DO NOTHING",
                &[&&v.id.0[..], &v.name.0, &v.e2e_required],
            )?;
            if n == 0 {
                return Err(MetaError::Exists("vault"));
            }
            tx.exec(
                "INSERT INTO members (vault_id, user_id, rights, wrapped_key) VALUES ($1, $2, 'admin', $3)",
                &[&&v.id.0[..], &user_id, &v.wrapped_key.as_ref().map(|k| &k.0[..])],
            )?;
            Ok(1)
        })
    }

    fn vaults_of(&self, user_id: i64) -> Result<Vec<VaultInfo>> {
        self.vault_query("m.user_id = $1", &[&user_id])
    }

    fn vault_of(&self, user_id: i64, vault: VaultId) -> Result<VaultInfo> {
        self.vault_query("m.user_id = $1 AND v.id = $2", &[&user_id, &&vault.0[..]])?
            .pop()
            .ok_or(MetaError::NotFound("vault"))
    }

    fn e2e_required(&self, vault: VaultId) -> Result<bool> {
        Ok(self
            .opt("SELECT e2e_required FROM vaults WHERE id = $1", &[&&vault.0[..]])?
            .ok_or(MetaError::NotFound("vault"))?
            .try_get(0)?)
    }

    fn update_vault(&mut self, vault: VaultId, expected: u64, u: &VaultUpdate) -> Result<u64> {
        self.step(|tx| {
            let current: i64 = tx
                .opt("SELECT version FROM vaults WHERE id = $1 FOR NO KEY UPDATE", &[&&vault.0[..]])?
                .ok_or(MetaError::NotFound("vault"))?
                .try_get(0)?;
            check_version(current as u64, expected)?;
            if let Some(name) = &u.name {
                tx.exec("UPDATE vaults SET name = $2 WHERE id = $1", &[&&vault.0[..], &name.0])?;
            }
            if let Some(flag) = u.e2e_required {
                tx.exec("UPDATE vaults SET e2e_required = $2 WHERE id = $1", &[&&vault.0[..], &flag])?;
            }
            tx.exec("UPDATE vaults SET version = version + 1 WHERE id = $1", &[&&vault.0[..]])?;
            Ok(expected + 1)
        })
    }

    fn delete_vault(&mut self, vault: VaultId, expected: u64) -> Result<()> {
        self.step(|tx| {
            let current: i64 = tx
                .opt("SELECT version FROM vaults WHERE id = $1 FOR UPDATE", &[&&vault.0[..]])?
                .ok_or(MetaError::NotFound("vault"))?
                .try_get(0)?;
            check_version(current as u64, expected)?;
            let records: i64 =
                tx.one("SELECT COUNT(*) FROM records WHERE vault_id = $1", &[&&vault.0[..]])?.try_get(0)?;
            if records > 0 {
                return Err(refuse("vault is not empty"));
            }
            tx.exec("DELETE FROM vaults WHERE id = $1", &[&&vault.0[..]])?;
            Ok(())
        })
    }

    fn members(&self, vault: VaultId) -> Result<Vec<Member>> {
        self.query(
            "SELECT u.name, m.rights, m.wrapped_key FROM members m JOIN users u ON u.id = m.user_id \
             WHERE m.vault_id = $1 ORDER BY u.name",
            &[&&vault.0[..]],
        )?
        .iter()
        .map(|r| {
            Ok(Member {
                user: r.try_get(0)?,
                rights: Rights::parse(&r.try_get::<_, String>(1)?).unwrap_or(Rights::Read),
                wrapped_key: r.try_get::<_, Option<Vec<u8>>>(2)?.map(Sealed),
            })
        })
        .collect()
    }

    fn set_member(&mut self, vault: VaultId, m: &Member) -> Result<()> {
        self.step(|tx| {
            tx.lock_vault(vault)?;
            let user_id: i64 = tx
                .opt("SELECT id FROM users WHERE name = $1", &[&m.user])?
                .ok_or(MetaError::NotFound("user"))?
                .try_get(0)?;
            tx.exec(
                "INSERT INTO members (vault_id, user_id, rights, wrapped_key) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (vault_id, user_id) DO UPDATE SET rights = excluded.rights, wrapped_key = excluded.wrapped_key",
                &[&&vault.0[..], &user_id, &m.rights.as_str(), &m.wrapped_key.as_ref().map(|k| &k.0[..])],
            )?;
            tx.ensure_an_admin(vault)
        })
    }

    fn remove_member(&mut self, vault: VaultId, user: &str) -> Result<()> {
        self.step(|tx| {
            tx.lock_vault(vault).map_err(|e| match e {
                MetaError::NotFound(_) => MetaError::NotFound("member"),
                e => e,
            })?;
            let n = tx.exec(
                "DELETE FROM members WHERE vault_id = $1 AND user_id = (SELECT id FROM users WHERE name = $2)",
                &[&&vault.0[..], &user],
            )?;
            if n == 0 {
                return Err(MetaError::NotFound("member"));
            }
            tx.ensure_an_admin(vault)
        })
    }

    fn all_vaults(&self) -> Result<Vec<(VaultId, Vec<Member>)>> {
        let ids = self.query("SELECT id FROM vaults ORDER BY id", &[])?;
        ids.iter()
            .map(|r| {
                let id = id16(r.try_get(0)?, VaultId)?;
                Ok((id, self.members(id)?))
            })
            .collect()
    }

    fn changes(&self, vault: VaultId, since: u64, limit: usize) -> Result<Option<Changes>> {
        let head = self
            .opt("SELECT seq FROM vaults WHERE id = $1", &[&&vault.0[..]])?
            .ok_or(MetaError::NotFound("vault"))?
            .try_get::<_, i64>(0)? as u64;
        if since > head || head - since > CHANGE_HISTORY {
            return Ok(None);
        }
        // Only up to the head read above: each statement sees the database
        // as of its own start, and changes committed since are the next
        // call's (an object they delete is skipped below, its deletion comes
        // with them).
        let rows = self.query(
            "SELECT object, kind, gone, seq FROM changes WHERE vault_id = $1 AND seq > $2 AND seq <= $3 \
             ORDER BY seq LIMIT $4",
            &[&&vault.0[..], &(since as i64), &(head as i64), &(limit as i64 + 1)],
        )?;
        // A deletion committed between the two reads may have pruned
        // tombstones this answer needed: then the client lists again.
        let head_now =
            self.one("SELECT seq FROM vaults WHERE id = $1", &[&&vault.0[..]])?.try_get::<_, i64>(0)? as u64;
        if head_now.saturating_sub(since) > CHANGE_HISTORY {
            return Ok(None);
        }
        let more = rows.len() > limit;
        let rows = &rows[..rows.len().min(limit)];
        let mut out = Changes { until: head, more, ..Changes::default() };
        if let (true, Some(last)) = (more, rows.last()) {
            out.until = last.try_get::<_, i64>(3)? as u64;
        }
        for r in rows {
            let (object, kind, gone): (Vec<u8>, i64, bool) = (r.try_get(0)?, r.try_get(1)?, r.try_get(2)?);
            match (kind as u8, gone) {
                (super::KIND_RECORD, false) => match self.load_record(id16(object, RecordId)?) {
                    Ok(record) => out.records.push(record),
                    Err(MetaError::NotFound(_)) => {}
                    Err(e) => return Err(e),
                },
                (super::KIND_RECORD, true) => out.deleted_records.push(id16(object, RecordId)?),
                (super::KIND_FILE, false) => match self.load_file(id16(object, FileId)?) {
                    Ok(file) => out.files.push(file.info),
                    Err(MetaError::NotFound(_)) => {}
                    Err(e) => return Err(e),
                },
                (super::KIND_FILE, true) => out.deleted_files.push(id16(object, FileId)?),
                _ => out.vault_changed = true,
            }
        }
        Ok(Some(out))
    }

    fn create_record(&mut self, vault: VaultId, r: &NewRecord) -> Result<RecordInfo> {
        self.step(|tx| {
            tx.lock_vault(vault)?;
            tx.record_in(vault, r)
        })
    }

    fn record(&self, id: RecordId) -> Result<RecordInfo> {
        self.load_record(id)
    }

    fn records(&self, vault: VaultId) -> Result<Vec<RecordInfo>> {
        self.query(
            &format!("SELECT {RECORD_COLUMNS} FROM records WHERE vault_id = $1 ORDER BY id"),
            &[&&vault.0[..]],
        )?
        .iter()
        .map(record_of)
        .collect()
    }

    fn update_record(&mut self, id: RecordId, expected: u64, u: &RecordUpdate) -> Result<RecordInfo> {
        self.step(|tx| {
            tx.lock_vault(tx.record_vault(id)?)?;
            let current = tx.load_record(id)?;
            check_version(current.version, expected)?;
            if let Some(change) = u.parent {
                if let Some(parent) = change.to {
                    if tx.record_vault(parent)? != current.vault {
                        return Err(refuse("a record can only move within its vault"));
                    }
                    // Walk up from the new parent: reaching `id` would make a cycle.
                    let mut cursor = Some(parent);
                    while let Some(c) = cursor {
                        if c == id {
                            return Err(refuse("a record cannot move into itself or its descendants"));
                        }
                        cursor = tx
                            .one("SELECT parent_id FROM records WHERE id = $1", &[&&c.0[..]])?
                            .try_get::<_, Option<Vec<u8>>>(0)?
                            .map(|p| id16(p, RecordId))
                            .transpose()?;
                    }
                }
                tx.exec(
                    "UPDATE records SET parent_id = $2 WHERE id = $1",
                    &[&&id.0[..], &change.to.as_ref().map(|p| &p.0[..])],
                )?;
            }
            if let Some(title) = &u.title {
                tx.exec("UPDATE records SET title = $2 WHERE id = $1", &[&&id.0[..], &title.0])?;
            }
            if let Some(fields) = &u.fields {
                tx.exec("UPDATE records SET fields = $2 WHERE id = $1", &[&&id.0[..], &fields.0])?;
            }
            tx.exec("UPDATE records SET version = version + 1 WHERE id = $1", &[&&id.0[..]])?;
            tx.load_record(id)
        })
    }

    fn delete_record(&mut self, id: RecordId, expected: u64) -> Result<()> {
        self.step(|tx| {
            tx.lock_vault(tx.record_vault(id)?)?;
            tx.delete_record_in(id, expected)
        })
    }

    fn delete_many(
        &mut self,
        user_id: i64,
        items: &[DeleteItem],
    ) -> Result<(Vec<DeleteOutcome>, Vec<BlobId>)> {
        self.step(|tx| {
            // The vaults concerned, locked in one order (two of these never
            // wait on each other in a cycle).
            let mut vaults = BTreeSet::new();
            for item in items {
                let vault = match *item {
                    DeleteItem::File { id, .. } => tx.file_vault(id),
                    DeleteItem::Record { id, .. } => tx.record_vault(id),
                };
                if let Ok(v) = vault {
                    vaults.insert(v.0);
                }
            }
            for v in &vaults {
                match tx.lock_vault(VaultId(*v)) {
                    // A vault gone meanwhile: its items are not found below.
                    Ok(()) | Err(MetaError::NotFound(_)) => {}
                    Err(e) => return Err(e),
                }
            }
            let mut rights = HashMap::new();
            let (mut outcomes, mut blobs) = (Vec::with_capacity(items.len()), Vec::new());
            for item in items {
                let vault = match *item {
                    DeleteItem::File { id, .. } => tx.load_file(id).map(|f| f.info.vault),
                    DeleteItem::Record { id, .. } => tx.load_record(id).map(|r| r.vault),
                };
                let done = vault.and_then(|vault| {
                    // Made after the vaults were locked: lock its vault now
                    // (a rare second lock out of order).
                    if vaults.insert(vault.0) {
                        tx.lock_vault(vault)?;
                    }
                    let held = match rights.get(&vault) {
                        Some(held) => *held,
                        None => *rights.entry(vault).or_insert(tx.member_rights(user_id, vault)?),
                    };
                    if let Some(refused) = super::may_delete(held)? {
                        return Ok(Some(refused));
                    }
                    match *item {
                        DeleteItem::File { id, version } => blobs.extend(tx.delete_file_in(id, version)?),
                        DeleteItem::Record { id, version } => tx.delete_record_in(id, version)?,
                    }
                    Ok(None)
                });
                outcomes.push(super::delete_outcome(done)?);
            }
            Ok((outcomes, blobs))
        })
    }

    fn create_file(&mut self, record: RecordId, f: &NewFile, now_ms: i64) -> Result<FileInfo> {
        self.step(|tx| {
            tx.lock_vault(tx.record_vault(record)?)?;
            tx.create_in(record, f, now_ms)
        })
    }

    fn file(&self, id: FileId) -> Result<FileRow> {
        self.load_file(id)
    }

    fn files(&self, vault: VaultId, record: Option<RecordId>) -> Result<Vec<FileInfo>> {
        let rows = match record {
            Some(r) => self.query(
                &format!("SELECT {FILE_COLUMNS} FROM files WHERE record_id = $1 ORDER BY id"),
                &[&&r.0[..]],
            )?,
            None => self.query(
                &format!("SELECT {FILE_COLUMNS} FROM files WHERE vault_id = $1 ORDER BY id"),
                &[&&vault.0[..]],
            )?,
        };
        rows.iter().map(|r| Ok(file_of(r)?.info)).collect()
    }

    fn commit_upload(&mut self, id: FileId, expected: u64, c: &Committed) -> Result<(u64, Option<BlobId>)> {
        self.step(|tx| {
            tx.lock_vault(tx.file_vault(id)?)?;
            tx.commit_in(id, expected, c)
        })
    }

    fn create_with_content(
        &mut self,
        new_record: Option<(VaultId, &NewRecord)>,
        record: RecordId,
        f: &NewFile,
        c: &Committed,
    ) -> Result<u64> {
        self.step(|tx| {
            match new_record {
                Some((vault, r)) => {
                    debug_assert_eq!(r.id, record);
                    tx.lock_vault(vault)?;
                    tx.record_in(vault, r)?;
                }
                None => tx.lock_vault(tx.record_vault(record)?)?,
            }
            let created = tx.create_in(record, f, c.mtime_ms)?;
            Ok(tx.commit_in(created.id, created.version, c)?.0)
        })
    }

    fn commit_to_copy(&mut self, id: FileId, copy: &NewFile, c: &Committed) -> Result<(u64, Option<BlobId>)> {
        self.step(|tx| {
            tx.lock_vault(tx.file_vault(id)?)?;
            tx.copy_in(id, copy, c)
        })
    }

    fn stage(&mut self, token: &[u8], file: FileId, user_id: i64, s: &Committed, now_ms: i64) -> Result<()> {
        self.exec(
            "INSERT INTO staged (token, file_id, user_id, blob_id, size, e2e, created_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
            &[&token, &&file.0[..], &user_id, &s.blob.to_hex(), &(s.size as i64), &s.e2e, &now_ms],
        )?;
        Ok(())
    }

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
        self.step(|tx| {
            tx.lock_vault(tx.file_vault(id)?)?;
            // Locked too: garbage collection of old staged content waits for
            // this commit, and then finds the entry used up.
            let row = tx
                .opt(
                    "SELECT blob_id, size, e2e FROM staged WHERE token = $1 AND file_id = $2 AND user_id = $3 \
                     FOR UPDATE",
                    &[&token, &&id.0[..], &user_id],
                )?
                .ok_or(MetaError::NotFound("staged upload"))?;
            let (blob, size, e2e): (String, i64, bool) = (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
            let blob = BlobId::from_hex(&blob).ok_or(MetaError::NotFound("staged upload"))?;
            let c = Committed { blob, size: size as u64, e2e, mtime_ms, meta: Some(meta.clone()) };
            let (version, old, copied) = match (tx.commit_in(id, expected, &c), conflict_copy) {
                (Ok((v, old)), _) => (v, old, false),
                (Err(MetaError::VersionMismatch { .. } | MetaError::NotFound("file")), Some(copy)) => {
                    let (v, old) = tx.copy_in(id, copy, &c)?;
                    (v, old, true)
                }
                (Err(e), _) => return Err(e),
            };
            tx.exec("DELETE FROM staged WHERE token = $1", &[&token])?;
            Ok((version, old, size as u64, copied))
        })
    }

    fn collect_staged(&mut self, before_ms: i64) -> Result<Vec<BlobId>> {
        let rows = self.query("DELETE FROM staged WHERE created_ms < $1 RETURNING blob_id", &[&before_ms])?;
        Ok(rows
            .iter()
            .filter_map(|r| r.try_get::<_, String>(0).ok())
            .filter_map(|h| BlobId::from_hex(&h))
            .collect())
    }

    fn update_file(&mut self, id: FileId, expected: u64, u: &FileUpdate) -> Result<FileInfo> {
        self.step(|tx| {
            tx.lock_vault(tx.file_vault(id)?)?;
            let row = tx.load_file(id)?;
            check_version(row.info.version, expected)?;
            if let Some(record) = u.record {
                if tx.record_vault(record)? != row.info.vault {
                    return Err(refuse("a file can only move within its vault"));
                }
                tx.exec("UPDATE files SET record_id = $2 WHERE id = $1", &[&&id.0[..], &&record.0[..]])?;
            }
            if let Some(name) = &u.name {
                tx.exec("UPDATE files SET name = $2 WHERE id = $1", &[&&id.0[..], &name.0])?;
            }
            if let Some(mtime) = u.mtime_ms {
                tx.exec("UPDATE files SET mtime_ms = $2 WHERE id = $1", &[&&id.0[..], &mtime])?;
            }
            if let Some(meta) = &u.meta {
                tx.exec("UPDATE files SET meta = $2 WHERE id = $1", &[&&id.0[..], &meta_column(meta)])?;
            }
            tx.exec("UPDATE files SET version = version + 1 WHERE id = $1", &[&&id.0[..]])?;
            Ok(tx.load_file(id)?.info)
        })
    }

    fn delete_file(&mut self, id: FileId, expected: u64) -> Result<Option<BlobId>> {
        self.step(|tx| {
            tx.lock_vault(tx.file_vault(id)?)?;
            tx.delete_file_in(id, expected)
        })
    }

    fn stored_bytes(&self) -> Result<u64> {
        let total: i64 = self
            .one("SELECT COALESCE(SUM(size), 0)::BIGINT FROM files WHERE blob_id IS NOT NULL", &[])?
            .try_get(0)?;
        Ok(total.max(0) as u64)
    }

    fn blobs_in_use(&self) -> Result<HashSet<String>> {
        self.query(
            "SELECT blob_id FROM files WHERE blob_id IS NOT NULL UNION SELECT blob_id FROM staged",
            &[],
        )?
        .iter()
        .map(|r| Ok(r.try_get(0)?))
        .collect()
    }

    fn hold_blobs(&mut self, id: &[u8; 16], expires_ms: i64) -> Result<()> {
        self.exec(
            "INSERT INTO blob_holds (id, expires_ms) VALUES ($1, $2) \
             ON CONFLICT (id) DO UPDATE SET expires_ms = excluded.expires_ms",
            &[&&id[..], &expires_ms],
        )?;
        Ok(())
    }

    fn end_hold(&mut self, id: &[u8; 16]) -> Result<()> {
        self.exec("DELETE FROM blob_holds WHERE id = $1", &[&&id[..]])?;
        Ok(())
    }

    fn release_blobs(&mut self, blobs: &[BlobId], now_ms: i64) -> Result<Vec<BlobId>> {
        self.step(|tx| {
            let held: i64 =
                tx.one("SELECT COUNT(*) FROM blob_holds WHERE expires_ms > $1", &[&now_ms])?.try_get(0)?;
            if held > 0 {
                for b in blobs {
                    tx.exec(
                        "INSERT INTO deferred_blobs (blob_id) VALUES ($1) ON CONFLICT DO NOTHING",
                        &[&b.to_hex()],
                    )?;
                }
                return Ok(Vec::new());
            }
            let deferred = tx.query("DELETE FROM deferred_blobs RETURNING blob_id", &[])?;
            tx.exec("DELETE FROM blob_holds WHERE expires_ms <= $1", &[&now_ms])?;
            let given: HashSet<String> = blobs.iter().map(BlobId::to_hex).collect();
            let mut free = blobs.to_vec();
            for r in deferred {
                let hex: String = r.try_get(0)?;
                if !given.contains(&hex) {
                    free.extend(BlobId::from_hex(&hex));
                }
            }
            Ok(free)
        })
    }

    fn set_locks(
        &mut self,
        file: FileId,
        user_id: i64,
        req: &SetLocks,
        now_ms: i64,
        ttl_ms: i64,
    ) -> Result<LockOutcome> {
        self.step(|tx| {
            // Requests on one file take turns on its row.
            tx.opt("SELECT 1 FROM files WHERE id = $1 FOR NO KEY UPDATE", &[&&file.0[..]])?
                .ok_or(MetaError::NotFound("file"))?;
            let (holder, owner) = (&req.holder.0[..], req.owner as i64);
            let seq = tx
                .opt(
                    "SELECT seq FROM lock_owners WHERE user_id = $1 AND holder = $2 AND owner = $3 AND file_id = $4",
                    &[&user_id, &holder, &owner, &&file.0[..]],
                )?
                .map(|r| r.try_get::<_, i64>(0))
                .transpose()?;
            if seq.is_some_and(|s| s as u64 > req.seq) {
                return Ok(LockOutcome::Superseded);
            }
            tx.exec(
                "INSERT INTO lock_owners (user_id, holder, owner, file_id, seq, label, expires)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)
                 ON CONFLICT (user_id, holder, owner, file_id) DO UPDATE SET seq = $5, label = $6, expires = $7",
                &[
                    &user_id,
                    &holder,
                    &owner,
                    &&file.0[..],
                    &(req.seq as i64),
                    &req.label,
                    &(now_ms + ttl_ms.max(OWNER_KEPT_MS)),
                ],
            )?;
            tx.exec("DELETE FROM locks WHERE file_id = $1 AND expires <= $2", &[&&file.0[..], &now_ms])?;
            let (own, others): (Vec<_>, Vec<_>) = tx
                .live_locks(file, now_ms)?
                .into_iter()
                .partition(|(l, _, uid)| l.holder == req.holder && l.owner == req.owner && *uid == user_id);
            let held = |r: &LockRange| {
                own.iter().any(|(o, _, _)| {
                    let o = &o.range;
                    o.start <= r.start && r.end <= o.end && (o.exclusive || !r.exclusive)
                })
            };
            let blocker =
                others.into_iter().find(|(l, _, _)| req.ranges.iter().any(|r| !held(r) && r.conflicts_with(&l.range)));
            if let Some((l, expires, _)) = blocker {
                return Ok(LockOutcome::Blocked(l, expires));
            }
            tx.exec(
                "DELETE FROM locks WHERE file_id = $1 AND user_id = $2 AND holder = $3 AND owner = $4",
                &[&&file.0[..], &user_id, &holder, &owner],
            )?;
            for r in &req.ranges {
                tx.exec(
                    "INSERT INTO locks (file_id, user_id, holder, owner, start, last, exclusive, expires)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                    &[
                        &&file.0[..],
                        &user_id,
                        &holder,
                        &owner,
                        &(r.start as i64),
                        &(r.end as i64),
                        &r.exclusive,
                        &(now_ms + ttl_ms),
                    ],
                )?;
            }
            if !own.is_empty() {
                tx.batch("NOTIFY vaultfs_locks")?;
            }
            Ok(LockOutcome::Granted { released: !own.is_empty() })
        })
    }

    fn locks(&self, file: FileId, now_ms: i64) -> Result<Vec<(HeldLock, i64)>> {
        Ok(self.live_locks(file, now_ms)?.into_iter().map(|(l, e, _)| (l, e)).collect())
    }

    fn renew_locks(
        &mut self,
        user_id: i64,
        holder: HolderId,
        held: &[(FileId, u64)],
        now_ms: i64,
        ttl_ms: i64,
    ) -> Result<u64> {
        self.step(|tx| {
            let until = now_ms + ttl_ms;
            let holder = &holder.0[..];
            tx.exec(
                "DELETE FROM locks WHERE user_id = $1 AND holder = $2 AND NOT EXISTS
                 (SELECT 1 FROM files f JOIN members m ON m.vault_id = f.vault_id
                  WHERE f.id = locks.file_id AND m.user_id = locks.user_id)",
                &[&user_id, &holder],
            )?;
            let rows = tx.query(
                "SELECT id, file_id, owner FROM locks WHERE user_id = $1 AND holder = $2",
                &[&user_id, &holder],
            )?;
            let held: HashSet<(FileId, u64)> = held.iter().copied().collect();
            for r in rows {
                let (row, file, owner): (i64, Vec<u8>, i64) = (r.try_get(0)?, r.try_get(1)?, r.try_get(2)?);
                if !held.contains(&(id16(file, FileId)?, owner as u64)) {
                    tx.exec("DELETE FROM locks WHERE id = $1", &[&row])?;
                }
            }
            // Expired rows of every file: those no other unit holds (one
            // sweeping the same rows in another order would deadlock).
            tx.exec(
                "DELETE FROM locks WHERE id IN (SELECT id FROM locks WHERE expires <= $1 FOR UPDATE SKIP LOCKED)",
                &[&now_ms],
            )?;
            let n = tx.exec(
                "UPDATE locks SET expires = $4 WHERE user_id = $1 AND holder = $2 AND expires > $3",
                &[&user_id, &holder, &now_ms, &until],
            )?;
            tx.exec(
                "UPDATE lock_owners SET expires = GREATEST(expires, $4) \
                 WHERE user_id = $1 AND holder = $2 AND expires > $3",
                &[&user_id, &holder, &now_ms, &until],
            )?;
            tx.exec(
                "DELETE FROM lock_owners WHERE ctid IN \
                 (SELECT ctid FROM lock_owners WHERE expires <= $1 FOR UPDATE SKIP LOCKED)",
                &[&now_ms],
            )?;
            tx.batch("NOTIFY vaultfs_locks")?;
            Ok(n)
        })
    }

    fn drop_locks(&mut self, user_id: i64, holder: HolderId) -> Result<u64> {
        self.step(|tx| {
            let n =
                tx.exec("DELETE FROM locks WHERE user_id = $1 AND holder = $2", &[&user_id, &&holder.0[..]])?;
            tx.exec(
                "DELETE FROM lock_owners WHERE user_id = $1 AND holder = $2",
                &[&user_id, &&holder.0[..]],
            )?;
            tx.batch("NOTIFY vaultfs_locks")?;
            Ok(n)
        })
    }
}
