//! The metadata database a server runs on, whichever it is: the one place
//! that knows. The service hands it units of work (closures over a
//! [`MetaStore`]) and gets their results back; it never learns which
//! database ran them.
//!
//! SQLite: one connection behind a mutex (SQLite serializes writers
//! anyway); a unit runs under the lock, so it is atomic, and whether it
//! changed a vault is read from the change count afterwards (what wakes
//! this instance's waits for changes).

use std::sync::{Arc, Mutex, TryLockError};

use super::{Meta, MetaError, MetaStore, Result};

/// A shared handle on the metadata database (cheap to clone).
#[derive(Clone)]
pub struct MetaDb {
    inner: Inner,
}

#[derive(Clone)]
enum Inner {
    Sqlite(Arc<Mutex<Meta>>),
}

impl From<Meta> for MetaDb {
    fn from(meta: Meta) -> Self {
        MetaDb { inner: Inner::Sqlite(Arc::new(Mutex::new(meta))) }
    }
}

fn poisoned() -> MetaError {
    MetaError::Unavailable("metadata lock poisoned".into())
}

impl MetaDb {
    /// Runs `f` as one atomic unit, blocking the thread until it is done
    /// (call it on the blocking pool); with whether it changed a vault.
    pub fn run<T>(&self, f: impl FnOnce(&mut dyn MetaStore) -> Result<T>) -> (Result<T>, bool) {
        match &self.inner {
            Inner::Sqlite(meta) => match meta.lock() {
                Ok(mut guard) => run_sqlite(&mut guard, f),
                Err(_) => (Err(poisoned()), false),
            },
        }
    }

    /// Runs `f` right here if that takes no waiting (SQLite, and nobody
    /// holds the connection: microseconds for a lookup by key); otherwise
    /// gives `f` back, to be run on the blocking pool.
    pub fn run_if_free<T, F>(&self, f: F) -> std::result::Result<(Result<T>, bool), F>
    where
        F: FnOnce(&mut dyn MetaStore) -> Result<T>,
    {
        match &self.inner {
            Inner::Sqlite(meta) => match meta.try_lock() {
                Ok(mut guard) => Ok(run_sqlite(&mut guard, f)),
                Err(TryLockError::WouldBlock) => Err(f),
                Err(TryLockError::Poisoned(_)) => Ok((Err(poisoned()), false)),
            },
        }
    }
}

/// Runs `f` on the SQLite store; also says whether it changed a vault (the
/// feed's count is looked at only after a call that wrote rows, so reads,
/// most calls, cost nothing more). A count that cannot be read counts as a
/// change: `f` is done (perhaps committed) either way, and a wait woken for
/// nothing only asks again.
fn run_sqlite<T>(meta: &mut Meta, f: impl FnOnce(&mut dyn MetaStore) -> Result<T>) -> (Result<T>, bool) {
    let before = meta.rows_written();
    let result = f(meta);
    let wrote = meta.rows_written() != before
        && meta.vaults_changed().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot read whether a vault changed; waking the waits for changes");
            true
        });
    (result, wrote)
}
