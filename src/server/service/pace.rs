//! Whether this server's small writes are quick enough to run on the thread
//! that received the request.
//!
//! A unit of work handed to the blocking pool and back costs two thread
//! switches. On a small virtual machine a switch costs about 30 µs, so the
//! hand-off was a fifth of a small file's upload, and of a mkdir, when the
//! data sits on fast storage (benches/load.rs `--latency`). On a disk whose
//! fsync takes milliseconds the hand-off is noise, and running the write on an
//! async worker would stall every connection that worker serves for that
//! long.
//!
//! Data flow. The service times the work of each small write on SQLite
//! wherever it runs (the blob's write and fsync, and the commit from the
//! moment it holds the database: waiting for the database is not the
//! storage's speed), failed ones too, and [`WritePace::observe`] keeps a
//! moving average. [`WritePace::in_place`] allows the next small write in
//! place while the average stays under [`QUICK`] and no other write runs in
//! place, so at most one worker waits on the disk at a time, even while a
//! disk stalls before the average has seen it; the commit itself runs in
//! place only if nobody holds the database (`MetaDb::run_if_free`). It
//! starts on the pool, so a slow disk never blocks a worker before it has
//! shown itself quick; one write of 8 × [`QUICK`] or more sends the next ones
//! back to the pool.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Small writes averaging under this run in place.
pub(super) const QUICK: Duration = Duration::from_micros(500);
/// Bodies up to this size may be stored in place (larger small bodies go to
/// the pool): a typical source file or document, not the megabyte that a
/// run of tiny files could let through on a low average.
pub(super) const IN_PLACE_MAX: u64 = 128 << 10;
/// Where the average starts: above [`QUICK`], so writes go to the pool until
/// some have been timed.
const START_MICROS: u64 = 4 * QUICK.as_micros() as u64;
/// One observation's weight in the average (1/8): a few quick writes after a
/// start or a slow spell bring writes back in place.
const WEIGHT_SHIFT: u32 = 3;
/// Observations are capped here, so one very slow write (a stalled disk)
/// does not keep writes on the pool for long once the disk is quick again.
const CAP_MICROS: u64 = 100 * QUICK.as_micros() as u64;

/// The moving average of small writes' durations, and the one write allowed
/// in place at a time (cheap to clone; clones share both).
#[derive(Clone)]
pub(super) struct WritePace {
    shared: Arc<Shared>,
}

struct Shared {
    average_micros: AtomicU64,
    /// A write runs in place now.
    busy: AtomicBool,
    /// Writes run in place so far (for tests).
    in_place: AtomicU64,
    /// Set by tests: the average no longer moves.
    pinned: AtomicBool,
}

/// Leave to run one small write in place; given back when dropped.
pub(super) struct InPlace<'a>(&'a Shared);

impl Drop for InPlace<'_> {
    fn drop(&mut self) {
        self.0.busy.store(false, Ordering::Release);
    }
}

impl WritePace {
    pub(super) fn new() -> Self {
        WritePace {
            shared: Arc::new(Shared {
                average_micros: AtomicU64::new(START_MICROS),
                busy: AtomicBool::new(false),
                in_place: AtomicU64::new(0),
                pinned: AtomicBool::new(false),
            }),
        }
    }

    /// Whether small writes have been quick.
    pub(super) fn quick(&self) -> bool {
        self.shared.average_micros.load(Ordering::Relaxed) < QUICK.as_micros() as u64
    }

    /// Leave to run the next small write in place: while writes are quick
    /// and no other runs in place.
    pub(super) fn in_place(&self) -> Option<InPlace<'_>> {
        if !self.quick() {
            return None;
        }
        self.shared.busy.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).ok()?;
        self.shared.in_place.fetch_add(1, Ordering::Relaxed);
        Some(InPlace(&self.shared))
    }

    /// Takes in how long a small write's own work took (without any
    /// hand-off or wait for the database).
    pub(super) fn observe(&self, took: Duration) {
        if self.shared.pinned.load(Ordering::Relaxed) {
            return;
        }
        let sample = (took.as_micros() as u64).min(CAP_MICROS);
        let _ = self.shared.average_micros.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |avg| {
            Some(avg - (avg >> WEIGHT_SHIFT) + (sample >> WEIGHT_SHIFT))
        });
    }

    /// Fixes the pace: quick (small writes in place) or slow (on the pool),
    /// whatever is observed from now on.
    #[cfg(test)]
    pub(super) fn pin(&self, quick: bool) {
        let avg = if quick { 0 } else { START_MICROS };
        self.shared.average_micros.store(avg, Ordering::Relaxed);
        self.shared.pinned.store(true, Ordering::Relaxed);
    }

    /// Writes run in place so far.
    #[cfg(test)]
    pub(super) fn in_place_count(&self) -> u64 {
        self.shared.in_place.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAST: Duration = Duration::from_micros(60);

    #[test]
    fn starts_on_the_pool_and_comes_in_place_once_writes_are_quick() {
        let pace = WritePace::new();
        assert!(pace.in_place().is_none(), "a server that has timed nothing must not block a worker");
        let mut n = 0;
        while pace.in_place().is_none() {
            pace.observe(FAST);
            n += 1;
            assert!(n < 50, "quick writes never brought writes in place");
        }
        assert!(n > 3, "one quick write is not enough to judge the storage ({n})");
    }

    #[test]
    fn one_write_in_place_at_a_time() {
        let pace = WritePace::new();
        (0..100).for_each(|_| pace.observe(FAST));
        let first = pace.in_place().expect("quick writes run in place");
        assert!(pace.in_place().is_none(), "a second write in place while one runs");
        drop(first);
        assert!(pace.in_place().is_some(), "the leave was not given back");
    }

    #[test]
    fn one_slow_write_sends_the_next_to_the_pool() {
        let pace = WritePace::new();
        (0..100).for_each(|_| pace.observe(FAST));
        assert!(pace.quick());
        pace.observe(Duration::from_millis(4));
        assert!(!pace.quick(), "a 4 ms fsync must send the next writes to the pool");
    }

    #[test]
    fn writes_on_a_slow_disk_stay_on_the_pool() {
        let pace = WritePace::new();
        for _ in 0..1000 {
            pace.observe(Duration::from_millis(2));
            assert!(!pace.quick());
        }
        // Mostly quick with a slow one every third write: still too slow
        // on average to block a worker, at every point.
        for i in 0..1000 {
            pace.observe(if i % 3 == 0 { Duration::from_millis(2) } else { FAST });
            assert!(!pace.quick(), "in place after write {i}");
        }
    }

    #[test]
    fn a_stalled_write_is_forgotten_once_the_disk_is_quick_again() {
        let pace = WritePace::new();
        pace.observe(Duration::from_secs(30));
        let back = (1..).find(|_| {
            pace.observe(FAST);
            pace.quick()
        });
        assert!(back.is_some_and(|n| n < 60), "took {back:?} quick writes");
    }
}
