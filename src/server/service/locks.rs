//! Locks across clients: the rules around the rows of `meta::locks`.
//!
//! Data flow. A mount sends what one of its lock owners holds on a file from
//! now on ([`SetLocks`]); the metadata store grants it at once or names a
//! lock in the way. A request that may wait is held here, without polling:
//! it looks again when any lock is given up anywhere on this server (the
//! `released` counter) or when the lock in the way expires, until its wait
//! is over. A read lock needs read rights in the file's vault, a write lock
//! write rights; every member may see who holds what (`user.vaultfs.locks`).

use std::time::Duration;

use super::{check_rights, now_ms, Caller, Result, Service, ServiceError, WaitSlot};
use crate::ids::{FileId, HolderId};
use crate::protocol::{
    HeldLock, LockAnswer, LockOwnerOf, LocksRenewed, Rights, SetLocks, LOCK_END_MAX, MAX_LOCK_LABEL,
    MAX_LOCK_OWNERS, MAX_LOCK_RANGES, MAX_WAIT_MS,
};
use crate::server::blob::BlobStore;
use crate::server::meta::LockOutcome;

/// How long a lock lasts unless renewed, by default.
pub const DEFAULT_LOCK_TTL: Duration = Duration::from_millis(crate::protocol::DEFAULT_LOCK_TTL_MS);
/// Most lock requests one user may have waiting at once.
pub const MAX_LOCK_WAITS: usize = 64;

fn check_request(req: &SetLocks) -> Result<()> {
    if req.ranges.len() > MAX_LOCK_RANGES {
        return Err(ServiceError::BadRequest(format!("at most {MAX_LOCK_RANGES} lock ranges per owner")));
    }
    if req.ranges.iter().any(|r| r.start > r.end || r.end > LOCK_END_MAX) {
        return Err(ServiceError::BadRequest(format!("a lock range needs start <= end <= {LOCK_END_MAX}")));
    }
    if req.label.len() > MAX_LOCK_LABEL || req.label.chars().any(char::is_control) {
        return Err(ServiceError::BadRequest(format!(
            "a lock label is at most {MAX_LOCK_LABEL} bytes, without control characters"
        )));
    }
    Ok(())
}

impl<B: BlobStore> Service<B> {
    /// How long a lock lasts unless renewed.
    fn lock_ttl_ms(&self) -> i64 {
        self.config.lock_ttl.as_millis().min(i64::MAX as u128) as i64
    }

    /// Makes what `req.owner` of `req.holder` holds on `file` exactly
    /// `req.ranges`, waiting up to `req.wait_ms` for conflicting locks to go.
    pub async fn set_locks(&self, caller: &Caller, file: FileId, req: SetLocks) -> Result<LockAnswer> {
        check_request(&req)?;
        // Giving everything up needs no right: a member removed from the
        // vault may still let go of what it held.
        let giving_up = req.ranges.is_empty();
        if !giving_up {
            let need = if req.ranges.iter().any(|r| r.exclusive) { Rights::Write } else { Rights::Read };
            self.file_checked(caller, file, need).await?;
        }
        let wait = Duration::from_millis(req.wait_ms.min(MAX_WAIT_MS));
        let deadline = tokio::time::Instant::now() + wait;
        let mut slot = None;
        let (uid, ttl) = (caller.user.id, self.lock_ttl_ms());
        let req = std::sync::Arc::new(req);
        let mut released = self.lock_released.subscribe();
        loop {
            // Marked seen before looking: a release after the look wakes the wait.
            released.borrow_and_update();
            let asked = std::sync::Arc::clone(&req);
            let now = now_ms();
            let (outcome, version, changes) = self
                .db(move |m| {
                    let outcome = m.set_locks(file, uid, &asked, now, ttl)?;
                    let row = m.file(file)?;
                    let changes = match m.vault_of(uid, row.info.vault) {
                        Ok(v) => v.changes,
                        Err(_) if giving_up => 0,
                        Err(e) => return Err(e),
                    };
                    Ok((outcome, row.info.version, changes))
                })
                .await?;
            let answer =
                |granted, blocker| LockAnswer { granted, blocker, version, changes, ttl_ms: ttl as u64 };
            let (blocker, expires) = match outcome {
                LockOutcome::Granted { released } => {
                    if released {
                        // It may hold less than before: waiters look again.
                        self.lock_released.send_modify(|n| *n = n.wrapping_add(1));
                    }
                    return Ok(answer(true, None));
                }
                LockOutcome::Superseded => return Ok(answer(false, None)),
                LockOutcome::Blocked(blocker, expires) => (blocker, expires),
            };
            let now = tokio::time::Instant::now();
            if now >= deadline || self.draining() {
                return Ok(answer(false, Some(blocker)));
            }
            if slot.is_none() {
                slot = Some(self.lock_wait_slot(caller)?);
            }
            let lapses = now + Duration::from_millis((expires - now_ms()).max(1) as u64);
            match tokio::time::timeout_at(deadline.min(lapses), released.changed()).await {
                Ok(Ok(())) | Err(_) => continue,
                Ok(Err(_)) => return Ok(answer(false, Some(blocker))),
            }
        }
    }

    /// One of the caller's lock waits, counted down when dropped.
    fn lock_wait_slot(&self, caller: &Caller) -> Result<WaitSlot<'_>> {
        let mut waits = self.lock_waits.lock();
        let n = waits.entry(caller.user.id).or_insert(0);
        if *n >= MAX_LOCK_WAITS {
            return Err(ServiceError::Refused(format!(
                "at most {MAX_LOCK_WAITS} lock requests waiting at once"
            )));
        }
        *n += 1;
        Ok(WaitSlot { waits: &self.lock_waits, user: caller.user.id })
    }

    /// The live locks on a file (any member).
    pub async fn file_locks(&self, caller: &Caller, file: FileId) -> Result<Vec<HeldLock>> {
        let uid = caller.user.id;
        let now = now_ms();
        let (locks, rights) = self
            .db(move |m| {
                let row = m.file(file)?;
                Ok((m.locks(file, now)?, m.rights(uid, row.info.vault)?))
            })
            .await?;
        check_rights(rights, Rights::Read, "file")?;
        Ok(locks.into_iter().map(|(l, _)| l).collect())
    }

    /// Keeps the locks of the caller's mount `holder` on the (file, owner)
    /// pairs `held` names for another lock lifetime, and drops its others.
    pub async fn renew_locks(
        &self,
        caller: &Caller,
        holder: HolderId,
        held: Vec<LockOwnerOf>,
    ) -> Result<LocksRenewed> {
        if held.len() > MAX_LOCK_OWNERS {
            return Err(ServiceError::BadRequest(format!(
                "a renewal names at most {MAX_LOCK_OWNERS} owners"
            )));
        }
        let held: Vec<(FileId, u64)> = held.into_iter().map(|h| (h.file, h.owner)).collect();
        let (uid, ttl, now) = (caller.user.id, self.lock_ttl_ms(), now_ms());
        let ranges = self.db(move |m| m.renew_locks(uid, holder, &held, now, ttl)).await?;
        Ok(LocksRenewed { ranges, ttl_ms: ttl as u64 })
    }

    /// Gives up every lock of the caller's mount `holder` (at unmount).
    pub async fn drop_locks(&self, caller: &Caller, holder: HolderId) -> Result<LocksRenewed> {
        let uid = caller.user.id;
        let ranges = self.db(move |m| m.drop_locks(uid, holder)).await?;
        self.lock_released.send_modify(|n| *n = n.wrapping_add(1));
        Ok(LocksRenewed { ranges, ttl_ms: self.lock_ttl_ms() as u64 })
    }
}
