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
//! Data flow. The service times each small write wherever it runs (the blob's
//! write and fsync, the commit's), and [`WritePace::observe`] keeps a moving
//! average. While the average stays under [`QUICK`], the next small write runs
//! in place (if nobody holds the database, see `MetaDb::run_if_free`);
//! otherwise on the blocking pool. It starts on the pool, so a slow disk
//! never blocks a worker before it has shown itself quick, and a write that
//! turns slow sends the next ones back to the pool at once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Small writes averaging under this run in place.
pub(super) const QUICK: Duration = Duration::from_micros(500);
/// Where the average starts: above [`QUICK`], so writes go to the pool until
/// some have been timed.
const START_MICROS: u64 = 4 * QUICK.as_micros() as u64;
/// One observation's weight in the average (1/8): a few quick writes after a
/// start or a slow spell bring writes back in place; one slow write of
/// `8 × QUICK` or more sends them to the pool.
const WEIGHT_SHIFT: u32 = 3;
/// Observations are capped here, so one very slow write (a stalled disk)
/// does not keep writes on the pool for long once the disk is quick again.
const CAP_MICROS: u64 = 100 * QUICK.as_micros() as u64;

/// The moving average of small writes' durations (cheap to clone; clones
/// share it).
#[derive(Clone)]
pub(super) struct WritePace {
    average_micros: Arc<AtomicU64>,
}

impl WritePace {
    pub(super) fn new() -> Self {
        WritePace { average_micros: Arc::new(AtomicU64::new(START_MICROS)) }
    }

    /// Whether the next small write may run in place.
    pub(super) fn quick(&self) -> bool {
        self.average_micros.load(Ordering::Relaxed) < QUICK.as_micros() as u64
    }

    /// Takes in how long a small write took (its own work, without any
    /// hand-off).
    pub(super) fn observe(&self, took: Duration) {
        let sample = (took.as_micros() as u64).min(CAP_MICROS);
        let _ = self.average_micros.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |avg| {
            Some(avg - (avg >> WEIGHT_SHIFT) + (sample >> WEIGHT_SHIFT))
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAST: Duration = Duration::from_micros(60);

    #[test]
    fn starts_on_the_pool_and_comes_in_place_once_writes_are_quick() {
        let pace = WritePace::new();
        assert!(!pace.quick(), "a server that has timed nothing must not block a worker");
        let mut n = 0;
        while !pace.quick() {
            pace.observe(FAST);
            n += 1;
            assert!(n < 50, "quick writes never brought writes in place");
        }
        assert!(n > 3, "one quick write is not enough to judge the storage ({n})");
    }

    #[test]
    fn one_slow_write_sends_the_next_to_the_pool() {
        let pace = WritePace::new();
        (0..100).for_each(|_| pace.observe(FAST));
        assert!(pace.quick());
        pace.observe(Duration::from_millis(8));
        assert!(!pace.quick(), "an 8 ms fsync must send the next writes to the pool");
    }

    #[test]
    fn writes_on_a_slow_disk_stay_on_the_pool() {
        let pace = WritePace::new();
        for _ in 0..1000 {
            pace.observe(Duration::from_millis(2));
            assert!(!pace.quick());
        }
        // Mostly quick with a slow one every third write: still too slow
        // on average to block a worker.
        for i in 0..1000 {
            pace.observe(if i % 3 == 0 { Duration::from_millis(2) } else { FAST });
        }
        assert!(!pace.quick());
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
