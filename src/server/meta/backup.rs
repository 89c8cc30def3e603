//! Holds on blob deletion, for backups taken while the server runs.
//!
//! A backup copies the metadata as it was at one instant (SQLite's online
//! backup), then copies the blobs that snapshot names. Meanwhile the server
//! goes on: an upload replaces a file's blob, a delete removes one, and the
//! replaced blob would be deleted before the backup reached it. So a backup
//! first writes a *hold* (a row with an expiry, renewed while it copies) and
//! only then takes its snapshot; while any hold stands, blobs the server no
//! longer needs are written down as *deferred* instead of deleted, and
//! deleted once no hold stands.
//!
//! Why it is enough: a blob the snapshot names was some file's at the
//! snapshot, so the commit that let it go came after the snapshot, which came
//! after the hold; the server asks for holds (in this database, so in order
//! with both) only after that commit, and sees it. A hold that expired (a
//! backup that stopped renewing it) protects nothing more: the backup then
//! finds a blob gone and fails, and says so.

use std::path::Path;
use std::sync::mpsc::RecvTimeoutError;
use std::time::Duration;

use rusqlite::backup::StepResult;
use rusqlite::{params, Connection, OpenFlags};

use super::{CachedSql, Meta, MetaError, Result};
use crate::server::blob::BlobId;

/// Tables of holds and deferred deletions; made by the migration to
/// schema version 3.
pub(super) const HOLD_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS blob_holds (id BLOB PRIMARY KEY, expires_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS deferred_blobs (blob_id TEXT PRIMARY KEY);
";

impl Meta {
    /// Holds every blob until `expires_ms` (Unix ms), under `id`: set again
    /// with a later time to renew it.
    pub fn hold_blobs(&mut self, id: &[u8; 16], expires_ms: i64) -> Result<()> {
        self.conn.exec(
            "INSERT INTO blob_holds (id, expires_ms) VALUES (?1, ?2)
             ON CONFLICT (id) DO UPDATE SET expires_ms = excluded.expires_ms",
            params![&id[..], expires_ms],
        )?;
        Ok(())
    }

    /// Ends hold `id`.
    pub fn end_hold(&mut self, id: &[u8; 16]) -> Result<()> {
        self.conn.exec("DELETE FROM blob_holds WHERE id = ?1", [&id[..]])?;
        Ok(())
    }

    /// Blobs no file needs any more: those that may be deleted now (with
    /// the ones deferred earlier), or none while a hold stands (they are
    /// written down for later). Without holds or deferred blobs, as nearly
    /// always, this only reads (in a transaction that writes nothing).
    pub fn release_blobs(&mut self, blobs: &[BlobId], now_ms: i64) -> Result<Vec<BlobId>> {
        // One transaction (it takes the write lock at once): a backup that
        // ends its hold and collects what was deferred does so either before
        // (this frees the blobs) or after (it collects them), never between
        // this seeing the hold and deferring under it (left behind).
        let tx = self.conn.transaction()?;
        let held: i64 =
            tx.q_row("SELECT COUNT(*) FROM blob_holds WHERE expires_ms > ?1", [now_ms], |r| r.get(0))?;
        if held > 0 {
            for b in blobs {
                tx.exec("INSERT OR IGNORE INTO deferred_blobs (blob_id) VALUES (?1)", [b.to_hex()])?;
            }
            tx.commit()?;
            return Ok(Vec::new());
        }
        let deferred: Vec<String> = {
            let mut stmt = tx.prepare_cached("SELECT blob_id FROM deferred_blobs")?;
            let rows = stmt.query_map([], |r| r.get(0))?.collect::<rusqlite::Result<_>>()?;
            rows
        };
        let mut free = blobs.to_vec();
        if !deferred.is_empty() {
            // Startup collection hands in what was deferred too: once each.
            let given: std::collections::HashSet<String> = blobs.iter().map(BlobId::to_hex).collect();
            let deferred: Vec<String> = deferred.into_iter().filter(|h| !given.contains(h)).collect();
            tx.exec("DELETE FROM deferred_blobs", [])?;
            tx.exec("DELETE FROM blob_holds WHERE expires_ms <= ?1", [now_ms])?;
            free.extend(deferred.iter().filter_map(|h| BlobId::from_hex(h)));
        }
        tx.commit()?;
        Ok(free)
    }

    /// Copies the whole database as it is at one instant into a new file
    /// at `to`: SQLite's online backup in one step, which reads in one
    /// transaction while the server goes on writing (WAL). The copy keeps
    /// no holds, deferred deletions or staged uploads (content sent but not
    /// committed, whose blobs the backup does not copy: their clients send
    /// them again), and is one file (no WAL).
    pub fn snapshot_to(&self, to: &Path) -> Result<()> {
        let mut copy = Connection::open(to)?;
        {
            let backup = rusqlite::backup::Backup::new(&self.conn, &mut copy)?;
            let mut busy = 0;
            loop {
                match backup.step(-1)? {
                    StepResult::Done => break,
                    _ if busy < SNAPSHOT_TRIES => {
                        busy += 1;
                        std::thread::sleep(std::time::Duration::from_millis(50));
                    }
                    _ => return Err(MetaError::Refused("the database stayed busy: try again".into())),
                }
            }
        }
        copy.execute_batch(
            "PRAGMA journal_mode = DELETE;
             DELETE FROM blob_holds; DELETE FROM deferred_blobs; DELETE FROM staged;",
        )?;
        copy.close().map_err(|(_, e)| e)?;
        Ok(())
    }
}

/// Renews a hold from a thread of its own until dropped: a copy of one
/// large blob may take longer than a hold lasts.
pub struct HoldKeeper {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HoldKeeper {
    /// Renews hold `id` in the database at `path` every `every`, to
    /// `hold_for` ahead (on a connection of its own). A hold that lapsed
    /// meanwhile is not made again: what it protected may be gone, and the
    /// backup finds that out.
    pub fn start(path: &Path, id: [u8; 16], every: Duration, hold_for: Duration) -> Result<Self> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(10))?;
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(every) {
                let until = crate::protocol::now_ms() + hold_for.as_millis() as i64;
                let renewed = conn
                    .execute("UPDATE blob_holds SET expires_ms = ?2 WHERE id = ?1", params![&id[..], until]);
                if let Err(e) = renewed {
                    tracing::warn!(error = %e, "could not renew the backup's hold on blob deletion");
                }
            }
        });
        Ok(HoldKeeper { stop: Some(stop), thread: Some(thread) })
    }
}

impl Drop for HoldKeeper {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Times a busy database is asked again for its snapshot (50 ms apart).
const SNAPSHOT_TRIES: u32 = 200;

/// Every blob a snapshot's files point at, with the length the file
/// records for it.
pub fn snapshot_blobs(path: &Path) -> Result<Vec<(BlobId, u64)>> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let mut stmt = conn.prepare(
        "SELECT blob_id, MAX(size) FROM files WHERE blob_id IS NOT NULL GROUP BY blob_id ORDER BY blob_id",
    )?;
    let rows = stmt
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    rows.into_iter()
        .map(|(hex, size)| {
            let id = BlobId::from_hex(&hex)
                .ok_or_else(|| MetaError::Refused(format!("a file names blob {hex:?}")))?;
            Ok((id, size.max(0) as u64))
        })
        .collect()
}

/// Checks a snapshot with SQLite's own integrity check (every page, index
/// and constraint), and that its foreign keys hold.
pub fn check_snapshot(path: &Path) -> Result<()> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let problems: Vec<String> = {
        let mut stmt = conn.prepare("PRAGMA integrity_check")?;
        let rows = stmt.query_map([], |r| r.get(0))?.collect::<rusqlite::Result<_>>()?;
        rows
    };
    if problems != ["ok"] {
        return Err(MetaError::Refused(format!("damaged database: {}", problems.join("; "))));
    }
    let broken: i64 = conn.query_row("SELECT COUNT(*) FROM pragma_foreign_key_check", [], |r| r.get(0))?;
    if broken > 0 {
        return Err(MetaError::Refused(format!(
            "damaged database: {broken} row(s) name rows that are not there"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::meta::MetaStore;

    fn blob(n: u8) -> BlobId {
        BlobId([n; 16])
    }

    #[test]
    fn blobs_wait_while_a_hold_stands_and_go_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = Meta::open(&dir.path().join("m.sqlite3")).unwrap();
        assert_eq!(m.release_blobs(&[blob(1)], 1000).unwrap(), vec![blob(1)], "no hold: freed at once");
        m.hold_blobs(&[7; 16], 5000).unwrap();
        assert!(m.release_blobs(&[blob(2)], 2000).unwrap().is_empty(), "held");
        assert!(m.release_blobs(&[blob(3)], 3000).unwrap().is_empty(), "held");
        m.hold_blobs(&[8; 16], 9000).unwrap();
        m.end_hold(&[7; 16]).unwrap();
        assert!(m.release_blobs(&[], 4000).unwrap().is_empty(), "another hold still stands");
        // The second hold expires unrenewed: everything deferred goes.
        let mut freed = m.release_blobs(&[blob(4)], 9000).unwrap();
        freed.sort_by_key(|b| b.0);
        assert_eq!(freed, vec![blob(2), blob(3), blob(4)]);
        assert!(m.release_blobs(&[], 9001).unwrap().is_empty(), "each goes once");
    }

    #[test]
    fn a_snapshot_is_one_checked_file_without_holds() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = Meta::open(&dir.path().join("m.sqlite3")).unwrap();
        m.put_setting("k", b"v").unwrap();
        m.hold_blobs(&[7; 16], i64::MAX).unwrap();
        assert!(m.release_blobs(&[blob(2)], 0).unwrap().is_empty());
        let snap = dir.path().join("snap.sqlite3");
        m.snapshot_to(&snap).unwrap();
        check_snapshot(&snap).unwrap();
        assert!(snapshot_blobs(&snap).unwrap().is_empty());
        let whole = std::fs::read(&snap).unwrap();
        let mut copy = Meta::open(&snap).unwrap();
        assert_eq!(copy.setting("k").unwrap().as_deref(), Some(&b"v"[..]));
        assert_eq!(
            copy.release_blobs(&[blob(3)], 1).unwrap(),
            vec![blob(3)],
            "no hold or deferred blob came along"
        );
        drop(copy);
        // Cut short, as a copy that stopped half way: refused.
        let cut = dir.path().join("cut.sqlite3");
        std::fs::write(&cut, &whole[..whole.len() / 2]).unwrap();
        assert!(check_snapshot(&cut).is_err());
    }
}
