//! Following the server's changes while mounted.
//!
//! Data flow. One task per mount ([`VaultFs::follow`]) holds a long poll on
//! the server (`Remote::wait_for_changes`) with each listed vault's latest
//! known change number; the server answers as soon as one of them moves (a
//! vault added, left, renamed, shared, or its records and files changed), or
//! after [`WAIT`] with nothing new; the wallet's version is watched too (a
//! vault created or a sender's key confirmed by another client of the user). The answer's numbers go to the tree. When
//! anything moved, the vault list is read again (names, shares, the wallet)
//! and each vault this mount has listed is brought up to date from its change
//! feed (super::namespace: only what changed, checked as a listing is); the
//! kernel is told what to forget ([`super::Invalidation`]). Changes this
//! mount made come back too, and change nothing the tree does not hold.
//!
//! While a poll is held (for at most [`WAIT`] and [`GRACE`]) the feed is
//! live: a vault listing current at the latest change number is
//! fresh without asking, so is the vault list, and an open trusts the
//! version the tree holds. When a poll fails the feed is not
//! live, the mount asks as it did without a feed (`LISTING_TTL`,
//! `CONFIRMED_FOR`), and the task tries again after a growing pause; a server
//! that answers at once, again and again, gets at most one round every
//! [`MIN_ROUND`].
//!
//! A server's answers here are worth what its listings are worth: one that
//! says nothing changed only shows an older state, as an older listing could;
//! what a change brings is checked as any listing is, and a file's content
//! still opens only at a generation this machine has not seen surpassed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::{FsError, Result, VaultFs};
use crate::ids::VaultId;
use crate::protocol::VaultChanges;
use crate::remote::account::AccountError;
use crate::remote::Remote;

/// How long the server may hold a poll.
const WAIT: Duration = Duration::from_secs(15);
/// How long past [`WAIT`] a poll may go unanswered before the feed counts as
/// lost (a connection that died without a word).
const GRACE: Duration = Duration::from_secs(3);
/// The shortest round: bounds the rounds a burst of changes (or a server
/// that answers at once) costs to 20 a second.
const MIN_ROUND: Duration = Duration::from_millis(50);
/// The longest pause between tries while the server cannot be reached.
const MOST_PAUSE: Duration = Duration::from_secs(30);

/// Whether the change feed is live. A leaf lock.
#[derive(Debug, Default)]
pub(super) struct Feed {
    /// Until when the feed vouches for the tree (`None`: not live).
    live_until: Mutex<Option<Instant>>,
    /// What the next wait says of the wallet, once an answer was taken:
    /// the version the server last named (so a wallet refused is not asked
    /// about again and again), `None` if it named none (not watched).
    /// Before any answer, the version held.
    wallet_seen: Mutex<Option<Option<u64>>>,
}

impl Feed {
    /// Whether a poll is held now, after one that answered.
    pub(super) fn live(&self) -> bool {
        self.live_until.lock().is_some_and(|t| Instant::now() < t)
    }

    fn set(&self, until: Option<Instant>) {
        *self.live_until.lock() = until;
    }
}

/// The pause after `failures` failed rounds in a row: 1, 2, 4 … 30 s.
fn pause_after(failures: u32) -> Duration {
    Duration::from_secs(1u64 << failures.saturating_sub(1).min(5)).min(MOST_PAUSE)
}

impl<R: Remote> VaultFs<R> {
    /// Follows the server's changes until the filesystem is dropped: run it
    /// on the runtime (once per mount).
    pub fn follow(self: &Arc<Self>) -> impl std::future::Future<Output = ()> + Send + 'static {
        let fs = Arc::downgrade(self);
        async move {
            let (mut failures, mut taken) = (0u32, false);
            loop {
                let Some(me) = fs.upgrade() else { return };
                let started = Instant::now();
                let round = me.follow_round(taken).await;
                taken = round.is_ok();
                let pause = match round {
                    // At least as long as taking the answer took: a server
                    // that answers at once, again and again, gets at most
                    // half of the task's time.
                    Ok(work) => {
                        failures = 0;
                        (started + MIN_ROUND).saturating_duration_since(Instant::now()).max(work)
                    }
                    Err(e) => {
                        me.feed.set(None);
                        failures += 1;
                        if failures == 1 {
                            tracing::info!(error = %e, "lost the server's change feed; asking as needed until it is back");
                        } else {
                            tracing::debug!(error = %e, failures, "the change feed is still down");
                        }
                        pause_after(failures)
                    }
                };
                drop(me);
                tokio::time::sleep(pause).await;
            }
        }
    }

    /// One poll, and what follows from its answer; `taken`: the previous
    /// round's answer was taken, so the tree knows where each vault is (else
    /// the vault list is read first, and vaults behind brought up to date).
    /// The feed vouches for the tree while the poll is held: the server
    /// answers it as soon as anything moves past what the tree knows.
    /// Returns how long taking the answer took.
    async fn follow_round(&self, taken: bool) -> Result<Duration> {
        if !taken || self.tree.lock().known_changes().is_empty() {
            self.load_root(true).await?;
            self.catch_up_behind().await;
        }
        let known = self.tree.lock().known_changes();
        let seen = *self.feed.wallet_seen.lock();
        let wallet = seen.unwrap_or_else(|| Some(self.account.held_wallet_version()));
        self.feed.set(Some(Instant::now() + WAIT + GRACE));
        // Bounded as a whole, not only each read: a server that trickles
        // bytes does not hold the feed forever.
        let wait = self.remote().wait_for_changes(known.clone(), wallet, WAIT);
        let answer = tokio::time::timeout(WAIT + GRACE, wait)
            .await
            .map_err(|_| FsError::Unavailable("the wait for changes was not answered in time".into()))??;
        if answer.vaults == known && (wallet.is_none() || answer.wallet == wallet) {
            return Ok(Duration::ZERO);
        }
        // Not vouched for while the answer is taken (no poll is held).
        self.feed.set(None);
        let started = Instant::now();
        self.take_changes(answer).await?;
        Ok(started.elapsed())
    }

    /// Brings the tree to what `answer` says. A failure to read the wallet
    /// or the vault list fails the round: the next one reads the list
    /// first, after a pause, and the feed vouches for nothing meanwhile.
    async fn take_changes(&self, answer: VaultChanges) -> Result<()> {
        self.tree.lock().note_vault_changes(answer.vaults);
        if answer.wallet.is_some_and(|v| v != self.account.held_wallet_version()) {
            let fresh = &self.freshness;
            let accept = |revision| fresh.check_wallet(revision).map_err(|e| e.to_string());
            match self.account.refresh_wallet(accept).await {
                Ok(_) => {}
                Err(AccountError::Remote(e)) => return Err(e.into()),
                // Refused (older than the one held, or than this machine saw):
                // kept the one held; not asked about again for this version.
                Err(e) => tracing::warn!(error = %e, "the wallet changed on the server but was not taken"),
            }
        }
        *self.feed.wallet_seen.lock() = Some(answer.wallet);
        // The list again (names, shares, vaults added or left); then every
        // vault this mount listed that is behind.
        self.load_root(true).await?;
        self.catch_up_behind().await;
        Ok(())
    }

    /// Brings every vault this mount listed that is behind up to date.
    async fn catch_up_behind(&self) {
        let behind = self.tree.lock().listed_behind();
        for vault in behind {
            if let Err(e) = self.catch_up(vault).await {
                tracing::debug!(%vault, error = %e, "cannot bring the vault up to date; it is listed when next used");
            }
        }
    }

    /// Brings `vault` up to date if this mount has listed it and it is not
    /// current (a vault never opened is listed when it is).
    pub(super) async fn catch_up(&self, vault: VaultId) -> Result<()> {
        if self.tree.lock().listed_at(vault).is_none() {
            return Ok(());
        }
        let loading = self.loading_lock(vault);
        let _one = loading.lock().await;
        if self.tree.lock().vault_current(vault) {
            return Ok(());
        }
        self.refresh_vault(vault, false).await
    }

    /// Whether the change feed is live: a poll held, after one that answered.
    pub fn feed_live(&self) -> bool {
        self.feed.live()
    }

    /// Whether the feed vouches that the tree's version of `vault`'s objects
    /// is the server's: live, and the vault's listing current.
    pub(super) fn feed_vouches(&self, vault: VaultId) -> bool {
        self.feed.live() && self.tree.lock().vault_current(vault)
    }

    /// `vault`'s loading lock (see the lock order).
    pub(super) fn loading_lock(&self, vault: VaultId) -> Arc<tokio::sync::Mutex<()>> {
        Arc::clone(self.loading.lock().entry(vault).or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_grow_to_a_bound() {
        let pauses: Vec<u64> = (1..=9).map(|n| pause_after(n).as_secs()).collect();
        assert_eq!(pauses, [1, 2, 4, 8, 16, 30, 30, 30, 30]);
    }

    #[test]
    fn the_feed_is_live_only_until_its_deadline() {
        let feed = Feed::default();
        assert!(!feed.live());
        feed.set(Some(Instant::now() + Duration::from_secs(5)));
        assert!(feed.live());
        feed.set(Some(Instant::now()));
        assert!(!feed.live());
    }
}
