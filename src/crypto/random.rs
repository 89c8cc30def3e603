//! Where randomness comes from.
//!
//! Every function that needs random bytes takes a [`RandomSource`], so the format
//! code stays deterministic under test: test vectors replay known "random" bytes
//! through [`ReplayRandom`]. Production code passes [`OsRandom`], the kernel's CSPRNG
//! (getrandom(2)); that syscall is the only contact this module has with the system.

use super::error::{CryptoError, Result};

/// A source of cryptographically secure random bytes.
pub trait RandomSource {
    /// Fills `dest` entirely with random bytes.
    fn fill(&mut self, dest: &mut [u8]) -> Result<()>;
}

/// The operating system's CSPRNG.
#[derive(Debug, Default, Clone, Copy)]
pub struct OsRandom;

impl RandomSource for OsRandom {
    fn fill(&mut self, dest: &mut [u8]) -> Result<()> {
        getrandom::getrandom(dest).map_err(|e| CryptoError::Backend(format!("getrandom: {e}")))
    }
}

/// Replays a fixed byte string as "randomness", for test vectors only. Using it to
/// seal real data would reuse nonces and keys; it fails once its bytes run out so
/// that a test notices when the format starts drawing more randomness than specified.
#[doc(hidden)]
#[derive(Debug)]
pub struct ReplayRandom {
    bytes: Vec<u8>,
    pos: usize,
}

impl ReplayRandom {
    /// A source that will hand out exactly `bytes`, in order.
    pub fn new(bytes: Vec<u8>) -> Self {
        ReplayRandom { bytes, pos: 0 }
    }

    /// How many bytes have not been consumed yet.
    pub fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }
}

impl RandomSource for ReplayRandom {
    fn fill(&mut self, dest: &mut [u8]) -> Result<()> {
        let end = self.pos + dest.len();
        let src =
            self.bytes.get(self.pos..end).ok_or(CryptoError::Misuse("ReplayRandom ran out of bytes"))?;
        dest.copy_from_slice(src);
        self.pos = end;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_random_fills_and_differs() {
        let (mut a, mut b) = ([0u8; 32], [0u8; 32]);
        OsRandom.fill(&mut a).unwrap();
        OsRandom.fill(&mut b).unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn replay_random_hands_out_bytes_in_order_then_fails() {
        let mut r = ReplayRandom::new(vec![1, 2, 3]);
        let mut two = [0u8; 2];
        r.fill(&mut two).unwrap();
        assert_eq!(two, [1, 2]);
        assert_eq!(r.remaining(), 1);
        assert!(r.fill(&mut two).is_err());
    }
}
