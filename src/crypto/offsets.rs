//! Plaintext ↔ ciphertext offset arithmetic for the chunked file format.
//!
//! A vault file is `header || chunk_0 || ... || chunk_{n-1}`. Chunk `i` holds
//! plaintext bytes `[i * CHUNK_SIZE, min((i+1) * CHUNK_SIZE, len))` followed by a
//! 16-byte tag. There is always at least one chunk: an empty file is a single
//! empty final chunk, so "truncated to zero chunks" is distinguishable from "empty".
//! A file whose length is a multiple of `CHUNK_SIZE` ends with a full chunk (no
//! trailing empty chunk).
//!
//! All of the arithmetic lives here, away from the cryptography, so it can be
//! tested exhaustively at the boundaries (gocryptfs keeps its equivalent in
//! `contentenc/offsets.go` for the same reason).

use std::ops::Range;

use super::aead::TAG_LEN;

/// Plaintext bytes per chunk: 64 KiB. Large enough that the 16-byte tag costs
/// 0.02% and the per-chunk call overhead vanishes; small enough that a random 4 KiB
/// read decrypts at most 64 KiB, and that streaming holds only one chunk in memory.
pub const CHUNK_SIZE: u64 = 64 * 1024;

/// Length of the fixed file header (see docs/FORMAT.md).
pub const HEADER_LEN: u64 = 128;

/// Ciphertext bytes of one full chunk.
pub const CHUNK_CIPHER_SIZE: u64 = CHUNK_SIZE + TAG_LEN as u64;

/// Largest plaintext the format accepts (2^56 bytes). The header stores the length
/// in 64 bits; the bound keeps every derived ciphertext offset far from overflow.
pub const MAX_PLAINTEXT_LEN: u64 = 1 << 56;

/// Index of a chunk within a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChunkIndex(pub u64);

/// The chunk layout of a file with a known plaintext length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    plaintext_len: u64,
}

impl Layout {
    /// The layout of a `plaintext_len`-byte file, or `None` above [`MAX_PLAINTEXT_LEN`].
    pub fn new(plaintext_len: u64) -> Option<Self> {
        (plaintext_len <= MAX_PLAINTEXT_LEN).then_some(Layout { plaintext_len })
    }

    /// The layout whose ciphertext is `len` bytes long, or `None` if no valid file
    /// has that length (used to show plaintext sizes from server-reported sizes).
    pub fn from_ciphertext_len(len: u64) -> Option<Self> {
        let body = len.checked_sub(HEADER_LEN)?;
        let full = body / CHUNK_CIPHER_SIZE;
        let rest = body % CHUNK_CIPHER_SIZE;
        let plaintext_len = match (full, rest) {
            (0, 0) => return None,
            (_, 0) => full * CHUNK_SIZE,
            (_, r) if r >= TAG_LEN as u64 => full * CHUNK_SIZE + r - TAG_LEN as u64,
            _ => return None,
        };
        let layout = Layout::new(plaintext_len)?;
        (layout.ciphertext_len() == len).then_some(layout)
    }

    /// The plaintext length.
    pub fn plaintext_len(&self) -> u64 {
        self.plaintext_len
    }

    /// Number of chunks: at least one.
    pub fn chunk_count(&self) -> u64 {
        self.plaintext_len.div_ceil(CHUNK_SIZE).max(1)
    }

    /// The final chunk, which is sealed with the "last" flag.
    pub fn last_chunk(&self) -> ChunkIndex {
        ChunkIndex(self.chunk_count() - 1)
    }

    /// Whether `index` is a chunk of this file.
    pub fn contains(&self, index: ChunkIndex) -> bool {
        index.0 < self.chunk_count()
    }

    /// Plaintext bytes in chunk `index` (0 for an index past the end).
    pub fn chunk_plain_len(&self, index: ChunkIndex) -> u64 {
        if !self.contains(index) {
            return 0;
        }
        let start = index.0 * CHUNK_SIZE;
        (self.plaintext_len - start).min(CHUNK_SIZE)
    }

    /// Ciphertext bytes of chunk `index` (plaintext plus tag; 0 past the end).
    pub fn chunk_cipher_len(&self, index: ChunkIndex) -> u64 {
        if self.contains(index) {
            self.chunk_plain_len(index) + TAG_LEN as u64
        } else {
            0
        }
    }

    /// Plaintext byte range covered by chunk `index`.
    pub fn chunk_plain_range(&self, index: ChunkIndex) -> Range<u64> {
        let start = (index.0 * CHUNK_SIZE).min(self.plaintext_len);
        start..start + self.chunk_plain_len(index)
    }

    /// Byte offset of chunk `index` within the whole ciphertext (header included).
    pub fn chunk_cipher_offset(&self, index: ChunkIndex) -> u64 {
        HEADER_LEN + index.0.min(self.chunk_count()) * CHUNK_CIPHER_SIZE
    }

    /// Total ciphertext length: header, plaintext and one tag per chunk.
    pub fn ciphertext_len(&self) -> u64 {
        HEADER_LEN + self.plaintext_len + self.chunk_count() * TAG_LEN as u64
    }

    /// The chunk holding plaintext offset `offset` (may be past the last chunk).
    pub fn chunk_of(&self, offset: u64) -> ChunkIndex {
        ChunkIndex(offset / CHUNK_SIZE)
    }

    /// Chunks a read of `len` bytes at plaintext `offset` needs, clipped to the
    /// file. Empty when the read is empty or starts at or past the end.
    pub fn chunks_for(&self, offset: u64, len: u64) -> Range<u64> {
        let end = offset.saturating_add(len).min(self.plaintext_len);
        if offset >= end {
            return 0..0;
        }
        (offset / CHUNK_SIZE)..end.div_ceil(CHUNK_SIZE)
    }

    /// Ciphertext byte range (within the whole file) holding chunks `chunks`.
    pub fn cipher_range_for(&self, chunks: Range<u64>) -> Range<u64> {
        if chunks.start >= chunks.end {
            let at = self.chunk_cipher_offset(ChunkIndex(chunks.start));
            return at..at;
        }
        let last = ChunkIndex(chunks.end - 1);
        self.chunk_cipher_offset(ChunkIndex(chunks.start))
            ..self.chunk_cipher_offset(last) + self.chunk_cipher_len(last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const C: u64 = CHUNK_SIZE;
    const T: u64 = TAG_LEN as u64;

    #[test]
    fn chunk_count_at_the_boundaries() {
        let cases =
            [(0, 1), (1, 1), (C - 1, 1), (C, 1), (C + 1, 2), (2 * C, 2), (2 * C + 1, 3), (100 * C + 7, 101)];
        for (len, chunks) in cases {
            let l = Layout::new(len).unwrap();
            assert_eq!(l.chunk_count(), chunks, "len {len}");
            assert_eq!(l.last_chunk(), ChunkIndex(chunks - 1), "len {len}");
            assert_eq!(l.ciphertext_len(), HEADER_LEN + len + chunks * T, "len {len}");
        }
    }

    #[test]
    fn chunk_lengths_at_the_boundaries() {
        let l = Layout::new(0).unwrap();
        assert_eq!(l.chunk_plain_len(ChunkIndex(0)), 0);
        assert_eq!(l.chunk_cipher_len(ChunkIndex(0)), T);
        assert_eq!(l.chunk_cipher_len(ChunkIndex(1)), 0);

        let l = Layout::new(C + 1).unwrap();
        assert_eq!(l.chunk_plain_len(ChunkIndex(0)), C);
        assert_eq!(l.chunk_plain_len(ChunkIndex(1)), 1);
        assert_eq!(l.chunk_plain_len(ChunkIndex(2)), 0);
        assert_eq!(l.chunk_plain_range(ChunkIndex(1)), C..C + 1);
        assert_eq!(l.chunk_cipher_offset(ChunkIndex(1)), HEADER_LEN + C + T);

        let l = Layout::new(C).unwrap();
        assert_eq!(l.chunk_plain_len(ChunkIndex(0)), C);
        assert_eq!(l.chunk_plain_range(ChunkIndex(0)), 0..C);

        let l = Layout::new(C - 1).unwrap();
        assert_eq!(l.chunk_plain_len(ChunkIndex(0)), C - 1);
    }

    #[test]
    fn chunks_for_reads_at_the_boundaries() {
        let l = Layout::new(3 * C).unwrap();
        assert_eq!(l.chunks_for(0, 0), 0..0);
        assert_eq!(l.chunks_for(0, 1), 0..1);
        assert_eq!(l.chunks_for(C - 1, 1), 0..1);
        assert_eq!(l.chunks_for(C - 1, 2), 0..2);
        assert_eq!(l.chunks_for(C, 1), 1..2);
        assert_eq!(l.chunks_for(C, C), 1..2);
        assert_eq!(l.chunks_for(C, C + 1), 1..3);
        assert_eq!(l.chunks_for(0, u64::MAX), 0..3);
        assert_eq!(l.chunks_for(3 * C, 10), 0..0);
        assert_eq!(l.chunks_for(u64::MAX, u64::MAX), 0..0);
        assert_eq!(Layout::new(0).unwrap().chunks_for(0, 100), 0..0);
        assert_eq!(Layout::new(1).unwrap().chunks_for(0, 100), 0..1);
    }

    #[test]
    fn cipher_range_covers_exactly_the_chunks() {
        let l = Layout::new(2 * C + 5).unwrap();
        assert_eq!(l.cipher_range_for(0..1), HEADER_LEN..HEADER_LEN + C + T);
        assert_eq!(l.cipher_range_for(2..3), HEADER_LEN + 2 * (C + T)..l.ciphertext_len());
        assert_eq!(l.cipher_range_for(0..3), HEADER_LEN..l.ciphertext_len());
        assert_eq!(l.cipher_range_for(1..1).start, l.cipher_range_for(1..1).end);
    }

    #[test]
    fn every_plaintext_byte_belongs_to_exactly_one_chunk() {
        for len in [0, 1, C - 1, C, C + 1, 5 * C, 5 * C + 3] {
            let l = Layout::new(len).unwrap();
            let mut next = 0;
            let mut cipher_next = HEADER_LEN;
            for i in 0..l.chunk_count() {
                let r = l.chunk_plain_range(ChunkIndex(i));
                assert_eq!(r.start, next, "len {len} chunk {i}");
                next = r.end;
                assert_eq!(l.chunk_cipher_offset(ChunkIndex(i)), cipher_next);
                cipher_next += l.chunk_cipher_len(ChunkIndex(i));
                if i + 1 < l.chunk_count() {
                    assert_eq!(r.end - r.start, C, "only the last chunk may be short");
                }
            }
            assert_eq!(next, len);
            assert_eq!(cipher_next, l.ciphertext_len());
            for off in [0, 1, C - 1, C, C + 1].into_iter().filter(|&o| o < len) {
                let chunk = l.chunk_of(off);
                assert!(l.chunk_plain_range(chunk).contains(&off));
            }
        }
    }

    #[test]
    fn ciphertext_length_maps_back_to_exactly_one_plaintext_length() {
        for len in [0, 1, C - 1, C, C + 1, 2 * C, 2 * C + 1, 7 * C + 13] {
            let l = Layout::new(len).unwrap();
            assert_eq!(Layout::from_ciphertext_len(l.ciphertext_len()), Some(l), "len {len}");
        }
        for bad in [0, HEADER_LEN, HEADER_LEN + T - 1, HEADER_LEN + C + T + 5] {
            assert_eq!(Layout::from_ciphertext_len(bad), None, "ciphertext len {bad}");
        }
    }

    #[test]
    fn length_limit() {
        assert!(Layout::new(MAX_PLAINTEXT_LEN).is_some());
        assert!(Layout::new(MAX_PLAINTEXT_LEN + 1).is_none());
        let l = Layout::new(MAX_PLAINTEXT_LEN).unwrap();
        assert!(l.ciphertext_len() > MAX_PLAINTEXT_LEN);
    }
}
