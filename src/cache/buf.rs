//! [`SecretBuf`]: the buffer a file's plaintext lives in.
//!
//! Why not a `Vec<u8>`: a vector that grows is copied to a new allocation and
//! the old one freed, so every growth of a plaintext buffer would leave a copy
//! behind unless it were wiped by hand, and a file written front to back in
//! 1 MiB pieces would be copied, wiped and page-faulted in 4 KiB pages over and
//! over (measured: the larger part of the daemon's CPU time for a 30 MB write).
//!
//! So small buffers (up to [`MAP_THRESHOLD`]) are ordinary heap vectors, grown
//! by hand with the old allocation wiped, and larger ones are private anonymous
//! memory mappings of their own:
//! - they grow with `mremap`, which moves the pages themselves to a larger
//!   range of addresses: nothing is copied and no copy is left behind;
//! - their pages are populated a megabyte at a time with one system call, so
//!   filling 30 MB does not take 7,500 page faults;
//! - they are excluded from core dumps and wiped in any child of a fork
//!   (`MADV_DONTDUMP`, `MADV_WIPEONFORK`) on top of the process-wide hardening;
//! - everything past the length is kept zero (fresh pages are zero; shrinking
//!   wipes what it drops), so growing needs no zero-filling either.
//!
//! Whatever the representation, bytes are wiped before their memory is given
//! back, and a truncation wipes the bytes it drops.
#![allow(unsafe_code)]

use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// Buffers up to this capacity live on the heap; larger ones get a mapping.
/// Small enough that a 1 MiB write already lands in a mapping, large enough
/// that many small files do not use up the process's mapping count
/// (vm.max_map_count, 65,530 by default).
pub const MAP_THRESHOLD: usize = 256 << 10;

/// Mapped capacities are multiples of this (the size of a transparent huge
/// page on x86-64, though none is asked for: inside a virtual machine fresh
/// huge pages cost far more to clear than they save).
const HUGE: usize = 2 << 20;

/// How far ahead of the length a mapping's pages are populated at once.
const POPULATE_STEP: usize = 1 << 20;

/// A byte buffer for plaintext: wiped when dropped or shrunk, never copied
/// behind the owner's back. Dereferences to the bytes held (`len`, not the
/// capacity).
pub struct SecretBuf {
    repr: Repr,
}

enum Repr {
    Heap(WipedVec),
    Mapped(Mapping),
}

/// A private anonymous mapping of `cap` bytes, of which `len` are in use and
/// the rest are zero.
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
    /// The first `populated` bytes have pages behind them already.
    populated: usize,
}

// SAFETY: the mapping is owned exclusively by its `Mapping` (no aliases are
// handed out beyond borrows tied to `&self`/`&mut self`), so moving it to or
// sharing it with another thread is as safe as for a `Vec<u8>`.
unsafe impl Send for Mapping {}
// SAFETY: see `Send`; shared access only reads.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `cap` bytes (a multiple of [`HUGE`]); `None` if the system refuses.
    fn new(cap: usize) -> Option<Mapping> {
        // SAFETY: an anonymous private mapping at an address of the kernel's
        // choosing: no existing memory is affected.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                cap,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return None;
        }
        let m = Mapping { ptr: NonNull::new(ptr.cast())?, len: 0, cap, populated: 0 };
        m.advise();
        Some(m)
    }

    /// Hints for the whole mapping; each is best effort (an older kernel or THP
    /// switched off just means 4 KiB pages, or one protection fewer).
    fn advise(&self) {
        for advice in [libc::MADV_DONTDUMP, libc::MADV_WIPEONFORK] {
            // SAFETY: madvise on our own mapping, with hints that do not change
            // its contents.
            unsafe { libc::madvise(self.ptr.as_ptr().cast(), self.cap, advice) };
        }
    }

    /// Grows the capacity to `cap`, moving the pages if need be (no copy).
    fn grow(&mut self, cap: usize) -> bool {
        // SAFETY: remaps our own mapping; on success the old address range is
        // gone and only the new pointer is used from here on.
        let ptr = unsafe { libc::mremap(self.ptr.as_ptr().cast(), self.cap, cap, libc::MREMAP_MAYMOVE) };
        if ptr == libc::MAP_FAILED {
            return false;
        }
        let Some(ptr) = NonNull::new(ptr.cast()) else { return false };
        self.ptr = ptr;
        self.cap = cap;
        self.advise();
        true
    }

    /// Sets the length, first giving the pages up to it (and a step beyond)
    /// their memory in one call rather than one page fault per 4 KiB page,
    /// each of which costs a few microseconds (more inside a virtual machine).
    fn set_len(&mut self, len: usize) {
        debug_assert!(len <= self.cap);
        if len > self.populated {
            // Whole steps, so every range starts on a page boundary.
            let end = (len.div_ceil(POPULATE_STEP) * POPULATE_STEP)
                .max(self.populated + POPULATE_STEP)
                .min(self.cap);
            // SAFETY: prefaults a range of our own mapping, page aligned (the
            // mapping starts on a page and `populated` is a multiple of a
            // step, and the capacity of [`HUGE`]). Failure (a kernel before
            // 5.14) only means the pages fault in one by one as before.
            let ok = unsafe {
                libc::madvise(
                    self.ptr.as_ptr().add(self.populated).cast(),
                    end - self.populated,
                    libc::MADV_POPULATE_WRITE,
                ) == 0
            };
            self.populated = if ok { end } else { self.cap };
        }
        self.len = len;
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: `ptr` maps `cap >= len` readable bytes, owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`, and `&mut self` makes the borrow exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

/// Overwrites `bytes` with zeros at memory speed. `zeroize` stores one byte
/// at a time through volatile writes, about 0.4 GB/s here: wiping the 30 MB
/// a pass-through stream starts with took 75 ms, an eighth of the daemon's
/// time for a 300 MB write. A plain fill compiles to memset; handing the
/// slice to `black_box` afterwards means the optimizer must assume the zeros
/// are read, so it cannot drop the stores as dead.
pub fn wipe(bytes: &mut [u8]) {
    bytes.fill(0);
    std::hint::black_box(&*bytes);
}

/// A heap vector of plaintext, wiped with [`wipe`] (its whole capacity)
/// when dropped: the small-buffer form of [`SecretBuf`]. (`Zeroizing<Vec>`
/// wiped a byte at a time: each 1 MiB FUSE write copied for the async path
/// cost a tenth of the daemon's time writing a 300 MB file.)
struct WipedVec(Vec<u8>);

impl Deref for WipedVec {
    type Target = Vec<u8>;
    fn deref(&self) -> &Vec<u8> {
        &self.0
    }
}

impl DerefMut for WipedVec {
    fn deref_mut(&mut self) -> &mut Vec<u8> {
        &mut self.0
    }
}

impl Drop for WipedVec {
    fn drop(&mut self) {
        // Within the capacity, so nothing moves; the spare part gets wiped too.
        let cap = self.0.capacity();
        self.0.resize(cap, 0);
        wipe(&mut self.0);
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // Past `len` everything is zero already.
        wipe(self.bytes_mut());
        // SAFETY: unmaps our own mapping, which nothing borrows any more.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.cap) };
    }
}

fn round_to_huge(n: usize) -> usize {
    n.div_ceil(HUGE).saturating_mul(HUGE)
}

impl Default for SecretBuf {
    fn default() -> Self {
        Self::new()
    }
}

impl SecretBuf {
    /// An empty buffer (no allocation).
    pub fn new() -> Self {
        SecretBuf { repr: Repr::Heap(WipedVec(Vec::new())) }
    }

    /// An empty buffer that can take `cap` bytes without moving.
    pub fn with_capacity(cap: usize) -> Self {
        let mut buf = Self::new();
        buf.reserve_total(cap);
        buf
    }

    /// Takes over `bytes` (wiped when this buffer drops).
    pub fn from_vec(bytes: Vec<u8>) -> Self {
        SecretBuf { repr: Repr::Heap(WipedVec(bytes)) }
    }

    /// Bytes held.
    pub fn len(&self) -> usize {
        match &self.repr {
            Repr::Heap(v) => v.len(),
            Repr::Mapped(m) => m.len,
        }
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes it can hold without growing.
    pub fn capacity(&self) -> usize {
        match &self.repr {
            Repr::Heap(v) => v.capacity(),
            Repr::Mapped(m) => m.cap,
        }
    }

    /// Whether the bytes live in a mapping of their own (for tests).
    pub fn is_mapped(&self) -> bool {
        matches!(self.repr, Repr::Mapped(_))
    }

    /// Makes room for `total` bytes in all. Growth doubles, so a file written
    /// front to back grows a logarithmic number of times.
    fn reserve_total(&mut self, total: usize) {
        let cap = self.capacity();
        if total <= cap {
            return;
        }
        let want = total.max(cap.saturating_mul(2));
        match &mut self.repr {
            Repr::Mapped(m) => {
                if !m.grow(round_to_huge(want)) && !m.grow(round_to_huge(total)) {
                    panic!("out of memory: cannot grow a plaintext buffer to {total} bytes");
                }
            }
            Repr::Heap(v) if total <= MAP_THRESHOLD => {
                // Grown by hand so the old allocation is wiped, not just freed.
                let mut bigger = WipedVec(Vec::with_capacity(want.min(MAP_THRESHOLD).max(total)));
                bigger.extend_from_slice(v);
                *v = bigger;
            }
            Repr::Heap(v) => {
                let cap = round_to_huge(total.max(if v.is_empty() { 0 } else { want }));
                let Some(mut m) = Mapping::new(cap).or_else(|| Mapping::new(round_to_huge(total))) else {
                    panic!("out of memory: cannot map {total} bytes for a plaintext buffer");
                };
                m.set_len(v.len());
                m.bytes_mut().copy_from_slice(v);
                // The heap copy is wiped as `v`'s old value drops.
                *v = WipedVec(Vec::new());
                self.repr = Repr::Mapped(m);
            }
        }
    }

    /// Sets the length: growing adds zero bytes, shrinking wipes the bytes dropped.
    pub fn resize(&mut self, len: usize) {
        let old = self.len();
        if len <= old {
            self.truncate(len);
            return;
        }
        self.reserve_total(len);
        match &mut self.repr {
            Repr::Heap(v) => v.resize(len, 0),
            // Past the old length the mapping is zero already.
            Repr::Mapped(m) => m.set_len(len),
        }
    }

    /// Shortens to `len` bytes, wiping the rest (capacity is kept).
    pub fn truncate(&mut self, len: usize) {
        if len >= self.len() {
            return;
        }
        wipe(&mut self[len..]);
        match &mut self.repr {
            Repr::Heap(v) => v.truncate(len),
            Repr::Mapped(m) => m.len = len,
        }
    }

    /// Appends `bytes`.
    pub fn extend_from_slice(&mut self, bytes: &[u8]) {
        crate::crypto::Sink::append(self, bytes.len()).copy_from_slice(bytes);
    }

    /// Hands the buffer to a [`bytes::Bytes`] without copying it; the bytes are
    /// wiped when the last `Bytes` referring to them drops.
    pub fn into_bytes(self) -> bytes::Bytes {
        bytes::Bytes::from_owner(self)
    }
}

impl crate::crypto::Sink for SecretBuf {
    fn len(&self) -> usize {
        SecretBuf::len(self)
    }

    fn append(&mut self, n: usize) -> &mut [u8] {
        let start = self.len();
        self.resize(start + n);
        &mut self[start..]
    }

    fn wipe_to(&mut self, len: usize) {
        self.truncate(len);
    }
}

impl Deref for SecretBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &self.repr {
            Repr::Heap(v) => v,
            Repr::Mapped(m) => m.bytes(),
        }
    }
}

impl DerefMut for SecretBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        match &mut self.repr {
            Repr::Heap(v) => v,
            Repr::Mapped(m) => m.bytes_mut(),
        }
    }
}

impl AsRef<[u8]> for SecretBuf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl std::fmt::Debug for SecretBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretBuf({} bytes, {})", self.len(), if self.is_mapped() { "mapped" } else { "heap" })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::Sink;

    fn pattern(n: usize, seed: u8) -> Vec<u8> {
        (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed ^ (i >> 13) as u8).collect()
    }

    #[test]
    fn grows_front_to_back_like_a_file_being_written() {
        let piece = pattern(1 << 20, 7);
        let mut buf = SecretBuf::new();
        let mut model = Vec::new();
        for i in 0..12 {
            let at = buf.len();
            buf.resize(at + piece.len());
            buf[at..].copy_from_slice(&piece);
            model.extend_from_slice(&piece);
            assert_eq!(buf.len(), model.len(), "after piece {i}");
        }
        assert!(buf.is_mapped(), "12 MiB should live in a mapping");
        assert_eq!(buf.capacity() % HUGE, 0);
        assert!(buf[..] == model[..]);
    }

    #[test]
    fn crossing_the_threshold_keeps_the_bytes() {
        let mut buf = SecretBuf::new();
        let small = pattern(1000, 1);
        buf.extend_from_slice(&small);
        assert!(!buf.is_mapped());
        let big = pattern(MAP_THRESHOLD * 3, 2);
        buf.extend_from_slice(&big);
        assert!(buf.is_mapped());
        assert_eq!(&buf[..1000], &small[..]);
        assert!(buf[1000..] == big[..]);
    }

    #[test]
    fn shrinking_then_growing_shows_zeros_not_old_bytes() {
        for size in [100, MAP_THRESHOLD + 5, 5 << 20] {
            let mut buf = SecretBuf::new();
            buf.extend_from_slice(&vec![0xAB; size]);
            buf.truncate(10);
            assert_eq!(buf.len(), 10);
            buf.resize(size);
            assert!(buf[10..].iter().all(|&b| b == 0), "size {size}: stale bytes after regrowth");
            assert!(buf[..10].iter().all(|&b| b == 0xAB));
            // Resize down wipes too.
            buf.resize(3);
            buf.resize(20);
            assert!(buf[3..].iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn with_capacity_does_not_move_while_filled() {
        let total = 7 << 20;
        let mut buf = SecretBuf::with_capacity(total);
        assert!(buf.is_mapped());
        let ptr = buf.as_ptr();
        let piece = pattern(65536, 3);
        while buf.len() < total {
            let n = piece.len().min(total - buf.len());
            buf.extend_from_slice(&piece[..n]);
        }
        assert_eq!(buf.as_ptr(), ptr, "the buffer moved while filling its reserved capacity");
        assert_eq!(buf.len(), total);
    }

    #[test]
    fn wipe_zeroes_every_byte() {
        let mut bytes = pattern(3 << 20, 7);
        bytes[0] = 1;
        wipe(&mut bytes[1..]);
        assert_eq!(bytes[0], 1);
        assert!(bytes[1..].iter().all(|&b| b == 0));
    }

    #[test]
    fn sink_appends_and_wipes_back() {
        let mut buf = SecretBuf::new();
        buf.append(5).copy_from_slice(b"hello");
        let start = buf.len();
        buf.append(MAP_THRESHOLD).fill(9);
        buf.wipe_to(start);
        assert_eq!(&buf[..], b"hello");
        buf.resize(start + 4);
        assert_eq!(&buf[start..], &[0, 0, 0, 0]);
    }

    #[test]
    fn into_bytes_shares_without_copying() {
        let mut buf = SecretBuf::new();
        buf.extend_from_slice(&pattern(3 << 20, 4));
        let ptr = buf.as_ptr();
        let bytes = buf.into_bytes();
        assert_eq!(bytes.as_ptr(), ptr);
        assert!(bytes[..] == pattern(3 << 20, 4)[..]);
    }

    #[test]
    fn decrypts_straight_into_a_mapped_buffer() {
        use crate::crypto::{FileContext, FileDecryptor, KeyId, VaultKey, HEADER_LEN};
        use crate::ids::{FileId, RecordId, VaultId};
        let key = VaultKey::from_bytes(KeyId([1; 16]), [2; 32]);
        let ctx = FileContext { vault: VaultId([3; 16]), record: RecordId([4; 16]), file: FileId([5; 16]) };
        let plain = pattern(3_000_001, 5);
        let blob = crate::crypto::encrypt_file(&key, &ctx, 1, &plain, &mut crate::crypto::OsRandom).unwrap();
        let dec = FileDecryptor::open(&blob[..HEADER_LEN as usize], &key, &ctx, 0).unwrap();
        let mut stream = dec.into_stream();
        let mut out = SecretBuf::with_capacity(plain.len());
        for piece in blob[HEADER_LEN as usize..].chunks(16_000) {
            stream.update(piece, &mut out).unwrap();
        }
        stream.finish().unwrap();
        assert!(out[..] == plain[..]);
    }
}
