//! Locks across clients, as rows: who holds which bytes of which file, until
//! when (docs/API.md "Locks").
//!
//! A lock is held by an *owner* (a process or an open file, as the kernel
//! names it) within a *holder* (one mount), for one user. A request names
//! everything an owner holds on a file from now on, so a request sent twice
//! does no harm, and a client that gave up on a wait takes back what it asked
//! by sending what it held before, under a newer `seq`. Rows last until
//! `expires`; a mount renews all of its own at once, and a crashed one's go
//! when that time passes (they are ignored from then on, and deleted when the
//! file's locks are next changed).

use rusqlite::{params, OptionalExtension};

use super::{id16, Meta, Result};
use crate::ids::{FileId, HolderId};
use crate::protocol::{HeldLock, LockRange, SetLocks};

/// Tables of locks; made at open with the rest of the schema.
pub(super) const LOCK_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS locks (
    file_id BLOB NOT NULL REFERENCES files(id) ON DELETE CASCADE,
    user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    holder BLOB NOT NULL,
    owner INTEGER NOT NULL,
    start INTEGER NOT NULL,
    last INTEGER NOT NULL,
    exclusive INTEGER NOT NULL,
    expires INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS locks_by_file ON locks(file_id);
CREATE INDEX IF NOT EXISTS locks_by_holder ON locks(user_id, holder);
CREATE INDEX IF NOT EXISTS locks_by_expiry ON locks(expires);
CREATE TABLE IF NOT EXISTS lock_owners (
    user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    holder BLOB NOT NULL,
    owner INTEGER NOT NULL,
    file_id BLOB NOT NULL,
    seq INTEGER NOT NULL,
    label TEXT NOT NULL,
    expires INTEGER NOT NULL,
    PRIMARY KEY (user_id, holder, owner, file_id)
);
CREATE INDEX IF NOT EXISTS lock_owners_by_expiry ON lock_owners(expires);
";

/// How long an owner's last request number is kept at least: longer than
/// any wait, so a wait it voided cannot come back after a short lock lifetime.
const OWNER_KEPT_MS: i64 = 2 * crate::protocol::MAX_WAIT_MS as i64;

/// How a request to hold locks ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LockOutcome {
    /// The owner holds what it asked for; `released`: it held something
    /// before (which it may have given up).
    Granted {
        /// Whether the owner held anything before.
        released: bool,
    },
    /// Another owner's lock stands in the way (its expiry in Unix ms).
    Blocked(HeldLock, i64),
    /// A newer request of the same owner came first: this one is void.
    Superseded,
}

/// The owner as stored (SQLite integers are signed; the bits are kept).
fn owner_db(owner: u64) -> i64 {
    owner as i64
}

impl Meta {
    /// Makes what `req.owner` of `req.holder` (user `user_id`) holds on `file`
    /// exactly `req.ranges`, if no other owner's live lock conflicts; rows
    /// last until `now_ms + ttl_ms`. Expired rows of the file go first.
    pub fn set_locks(
        &mut self,
        file: FileId,
        user_id: i64,
        req: &SetLocks,
        now_ms: i64,
        ttl_ms: i64,
    ) -> Result<LockOutcome> {
        let tx = self.conn.transaction()?;
        let (holder, owner) = (&req.holder.0[..], owner_db(req.owner));
        let seq: Option<i64> = tx
            .query_row(
                "SELECT seq FROM lock_owners WHERE user_id = ?1 AND holder = ?2 AND owner = ?3 AND file_id = ?4",
                params![user_id, holder, owner, &file.0[..]],
                |r| r.get(0),
            )
            .optional()?;
        if seq.is_some_and(|s| s as u64 > req.seq) {
            return Ok(LockOutcome::Superseded);
        }
        tx.execute(
            "INSERT INTO lock_owners (user_id, holder, owner, file_id, seq, label, expires)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT (user_id, holder, owner, file_id) DO UPDATE SET seq = ?5, label = ?6, expires = ?7",
            params![
                user_id,
                holder,
                owner,
                &file.0[..],
                req.seq as i64,
                req.label,
                now_ms + ttl_ms.max(OWNER_KEPT_MS)
            ],
        )?;
        tx.execute("DELETE FROM locks WHERE file_id = ?1 AND expires <= ?2", params![&file.0[..], now_ms])?;
        let (own, others): (Vec<_>, Vec<_>) =
            live_locks(&tx, file, now_ms)?.into_iter().partition(|(l, _)| {
                l.lock.holder == req.holder && l.lock.owner == req.owner && l.user_is(user_id)
            });
        // What the owner already holds (or less of it) is never refused:
        // giving up part of a lock cannot wait on anyone.
        let held = |r: &LockRange| {
            own.iter().any(|(o, _)| {
                let o = &o.lock.range;
                o.start <= r.start && r.end <= o.end && (o.exclusive || !r.exclusive)
            })
        };
        let blocker = others
            .into_iter()
            .find(|(l, _)| req.ranges.iter().any(|r| !held(r) && r.conflicts_with(&l.lock.range)));
        if let Some((l, expires)) = blocker {
            // The seq is kept: an older request still waiting gives up.
            tx.commit()?;
            return Ok(LockOutcome::Blocked(l.lock, expires));
        }
        tx.execute(
            "DELETE FROM locks WHERE file_id = ?1 AND user_id = ?2 AND holder = ?3 AND owner = ?4",
            params![&file.0[..], user_id, holder, owner],
        )?;
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO locks (file_id, user_id, holder, owner, start, last, exclusive, expires)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?;
            for r in &req.ranges {
                insert.execute(params![
                    &file.0[..],
                    user_id,
                    holder,
                    owner,
                    r.start as i64,
                    r.end as i64,
                    r.exclusive,
                    now_ms + ttl_ms
                ])?;
            }
        }
        tx.commit()?;
        Ok(LockOutcome::Granted { released: !own.is_empty() })
    }

    /// The live locks on `file`, with their expiry in Unix ms.
    pub fn locks(&self, file: FileId, now_ms: i64) -> Result<Vec<(HeldLock, i64)>> {
        Ok(live_locks(&self.conn, file, now_ms)?.into_iter().map(|(l, e)| (l.lock, e)).collect())
    }

    /// Extends the locks of `holder` (user `user_id`) on the (file, owner)
    /// pairs it says it holds to `now_ms + ttl_ms`, and drops its others (a
    /// request whose answer it never got) and those on files of vaults the
    /// user is no longer a member of; returns how many ranges it holds.
    /// Expired rows anywhere go.
    pub fn renew_locks(
        &mut self,
        user_id: i64,
        holder: HolderId,
        held: &[(FileId, u64)],
        now_ms: i64,
        ttl_ms: i64,
    ) -> Result<u64> {
        let tx = self.conn.transaction()?;
        let until = now_ms + ttl_ms;
        tx.execute(
            "DELETE FROM locks WHERE user_id = ?1 AND holder = ?2 AND NOT EXISTS
             (SELECT 1 FROM files f JOIN members m ON m.vault_id = f.vault_id
              WHERE f.id = locks.file_id AND m.user_id = locks.user_id)",
            params![user_id, &holder.0[..]],
        )?;
        let rows = {
            let mut stmt = tx.prepare_cached(
                "SELECT rowid, file_id, owner FROM locks WHERE user_id = ?1 AND holder = ?2",
            )?;
            let rows = stmt
                .query_map(params![user_id, &holder.0[..]], |r| {
                    Ok((r.get::<_, i64>(0)?, id16(r.get(1)?, FileId)?, r.get::<_, i64>(2)? as u64))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            rows
        };
        let held: std::collections::HashSet<(FileId, u64)> = held.iter().copied().collect();
        for (rowid, file, owner) in rows {
            if !held.contains(&(file, owner)) {
                tx.execute("DELETE FROM locks WHERE rowid = ?1", [rowid])?;
            }
        }
        tx.execute("DELETE FROM locks WHERE expires <= ?1", [now_ms])?;
        let n = tx.execute(
            "UPDATE locks SET expires = ?4 WHERE user_id = ?1 AND holder = ?2 AND expires > ?3",
            params![user_id, &holder.0[..], now_ms, until],
        )?;
        tx.execute(
            "UPDATE lock_owners SET expires = max(expires, ?4) WHERE user_id = ?1 AND holder = ?2 AND expires > ?3",
            params![user_id, &holder.0[..], now_ms, until],
        )?;
        tx.execute("DELETE FROM lock_owners WHERE expires <= ?1", [now_ms])?;
        tx.commit()?;
        Ok(n as u64)
    }

    /// Drops every lock of `holder` (user `user_id`); returns how many ranges
    /// it held.
    pub fn drop_locks(&mut self, user_id: i64, holder: HolderId) -> Result<u64> {
        let tx = self.conn.transaction()?;
        let n = tx.execute(
            "DELETE FROM locks WHERE user_id = ?1 AND holder = ?2",
            params![user_id, &holder.0[..]],
        )?;
        tx.execute(
            "DELETE FROM lock_owners WHERE user_id = ?1 AND holder = ?2",
            params![user_id, &holder.0[..]],
        )?;
        tx.commit()?;
        Ok(n as u64)
    }
}

/// A live lock and the user id that holds it.
struct Row {
    lock: HeldLock,
    user_id: i64,
}

impl Row {
    fn user_is(&self, id: i64) -> bool {
        self.user_id == id
    }
}

fn live_locks(conn: &rusqlite::Connection, file: FileId, now_ms: i64) -> Result<Vec<(Row, i64)>> {
    let mut stmt = conn.prepare_cached(
        "SELECT l.user_id, u.name, COALESCE(o.label, ''), l.holder, l.owner, l.start, l.last, l.exclusive, l.expires
         FROM locks l JOIN users u ON u.id = l.user_id
         LEFT JOIN lock_owners o ON o.user_id = l.user_id AND o.holder = l.holder AND o.owner = l.owner
             AND o.file_id = l.file_id
         WHERE l.file_id = ?1 AND l.expires > ?2 ORDER BY l.start",
    )?;
    let rows = stmt
        .query_map(params![&file.0[..], now_ms], |r| {
            let expires: i64 = r.get(8)?;
            let lock = HeldLock {
                user: r.get(1)?,
                label: r.get(2)?,
                holder: id16(r.get(3)?, HolderId)?,
                owner: r.get::<_, i64>(4)? as u64,
                range: LockRange {
                    start: r.get::<_, i64>(5)? as u64,
                    end: r.get::<_, i64>(6)? as u64,
                    exclusive: r.get(7)?,
                },
                expires_in_ms: (expires - now_ms).max(0) as u64,
            };
            Ok((Row { lock, user_id: r.get(0)? }, expires))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(rows)
}
