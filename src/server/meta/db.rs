//! The metadata database a server runs on, whichever it is: the one place
//! that knows. The service hands it units of work (closures over a
//! [`MetaStore`]) and gets their results back; it never learns which
//! database ran them.
//!
//! - SQLite: one connection behind a mutex (SQLite serializes writers
//!   anyway); a unit runs under the lock, so it is atomic, and whether it
//!   changed a vault is read from the change count afterwards (what wakes
//!   this instance's waits for changes).
//! - PostgreSQL ([`PgStore`]): a unit is one transaction on a pooled
//!   connection; what changed, here or on another instance, is told by
//!   notifications ([`MetaDb::listen`]), so a unit itself reports nothing.

use std::sync::{Arc, Mutex, TryLockError};

use super::postgres::{Events, PgStore};
use super::{Meta, MetaError, MetaStore};

/// A shared handle on the metadata database (cheap to clone).
#[derive(Clone)]
pub struct MetaDb {
    inner: Inner,
}

#[derive(Clone)]
enum Inner {
    Sqlite(Arc<Mutex<Meta>>),
    Postgres(Box<PgStore>),
}

impl From<Meta> for MetaDb {
    fn from(meta: Meta) -> Self {
        MetaDb { inner: Inner::Sqlite(Arc::new(Mutex::new(meta))) }
    }
}

impl From<PgStore> for MetaDb {
    fn from(store: PgStore) -> Self {
        MetaDb { inner: Inner::Postgres(Box::new(store)) }
    }
}

fn poisoned() -> MetaError {
    MetaError::Unavailable("metadata lock poisoned".into())
}

impl MetaDb {
    /// Runs `f` as one atomic unit, blocking the thread until it is done
    /// (call it on the blocking pool); with whether it changed a vault
    /// (always `false` where notifications tell that). `f` may run more
    /// than once (PostgreSQL runs a unit it aborted for a deadlock again),
    /// so it is `Fn`: nothing it does outside the store may count.
    pub fn run<T, E: From<MetaError>>(
        &self,
        f: impl Fn(&mut dyn MetaStore) -> Result<T, E>,
    ) -> (Result<T, E>, bool) {
        match &self.inner {
            Inner::Sqlite(meta) => match meta.lock() {
                Ok(mut guard) => run_sqlite(&mut guard, f),
                Err(_) => (Err(poisoned().into()), false),
            },
            Inner::Postgres(store) => (store.run(f), false),
        }
    }

    /// Runs `f` right here if that takes no waiting (SQLite, and nobody
    /// holds the connection: microseconds for a lookup by key); otherwise
    /// gives `f` back, to be run on the blocking pool.
    pub fn run_if_free<T, F>(&self, f: F) -> std::result::Result<(Result<T, MetaError>, bool), F>
    where
        F: Fn(&mut dyn MetaStore) -> Result<T, MetaError>,
    {
        match &self.inner {
            Inner::Sqlite(meta) => match meta.try_lock() {
                Ok(mut guard) => Ok(run_sqlite(&mut guard, f)),
                Err(TryLockError::WouldBlock) => Err(f),
                Err(TryLockError::Poisoned(_)) => Ok((Err(poisoned()), false)),
            },
            Inner::Postgres(_) => Err(f),
        }
    }

    /// Has `events` called when this or another instance changes what
    /// they are about; nothing on SQLite, where one instance makes every
    /// change and [`MetaDb::run`] says what it changed.
    pub fn listen(&self, events: Events) {
        match &self.inner {
            Inner::Sqlite(_) => {}
            Inner::Postgres(store) => store.listen(events),
        }
    }

    /// Whether the database runs in this process (SQLite): a unit then
    /// waits on no network, and may run on an async worker when it is quick
    /// (see `service::pace`).
    pub fn in_process(&self) -> bool {
        matches!(self.inner, Inner::Sqlite(_))
    }

    /// Whether other instances may share this database (then nothing may be
    /// kept in one instance that another could change).
    pub fn shared(&self) -> bool {
        matches!(self.inner, Inner::Postgres(_))
    }
}

/// Runs `f` on the SQLite store; also says whether it changed a vault (the
/// feed's count is looked at only after a call that wrote rows, so reads,
/// most calls, cost nothing more). A count that cannot be read counts as a
/// change: `f` is done (perhaps committed) either way, and a wait woken for
/// nothing only asks again.
fn run_sqlite<T, E>(meta: &mut Meta, f: impl Fn(&mut dyn MetaStore) -> Result<T, E>) -> (Result<T, E>, bool) {
    let before = meta.rows_written();
    let result = f(meta);
    let wrote = meta.rows_written() != before
        && meta.vaults_changed().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot read whether a vault changed; waking the waits for changes");
            true
        });
    (result, wrote)
}
