//! The vault file format: a 128-byte header followed by 64 KiB chunks.
//!
//! Data flow on upload: [`FileEncryptor::new`] draws a fresh content key, chunk
//! nonce prefix and wrap nonce, wraps the content key under the vault key (binding
//! vault, record, file, generation and length), and returns the header; plaintext
//! then flows through [`FileEncryptor::update`] one chunk at a time (at most one
//! chunk is buffered) and [`FileEncryptor::finish`] checks the declared length was
//! met. On download, [`FileDecryptor::open`] authenticates the header, after which
//! any chunk can be decrypted on its own ([`FileDecryptor::decrypt_chunk`]) or the
//! whole body streamed ([`StreamDecryptor`]).
//!
//! Why each attack fails (docs/FORMAT.md has the byte layout):
//! - bit flips: every chunk and the header key-wrap are AEAD-authenticated;
//! - truncation, extension: the authenticated header states the plaintext length,
//!   and the final chunk is sealed with a "last" flag in its nonce;
//! - reordering, duplication: the chunk index is part of the chunk nonce;
//! - chunks from another file, or another upload of the same file: every upload
//!   has its own random content key;
//! - whole files swapped between names, records or vaults: the key wrap's
//!   associated data binds vault id, record id and file id;
//! - replay of an older version: the authenticated generation is compared with the
//!   lowest generation the caller knows to exist.

use zeroize::Zeroizing;

use super::aead::{self, Sink, SubKey, KEY_LEN, NONCE_PREFIX_LEN, NONCE_SUFFIX_LEN, TAG_LEN, XNONCE_LEN};
use super::error::{auth_failure, check_prefix, length_failure, CryptoError, IntegrityFailure, Result};
use super::keys::{ContentKey, KeyId, VaultKey, KEY_ID_LEN};
use super::offsets::{ChunkIndex, Layout, CHUNK_SIZE, HEADER_LEN};
use super::random::RandomSource;
use crate::ids::{FileId, RecordId, VaultId};

/// First four bytes of every vault file.
pub const FILE_MAGIC: [u8; 4] = *b"VLTF";
/// The format version this build writes and reads.
pub const FILE_FORMAT_VERSION: u8 = 1;
/// log2 of [`CHUNK_SIZE`], stored in the header so a later version may change it.
const CHUNK_SIZE_LOG2: u8 = 16;
/// Domain-separation label in the key-wrap associated data.
const FILE_KEY_DOMAIN: &[u8] = b"vaultfs/file-key/v1";

const HEADER: usize = HEADER_LEN as usize;
/// Bytes of the header covered by the key wrap's associated data (all but the
/// wrapped key itself).
const HEADER_AUTHENTICATED_LEN: usize = 80;
const WRAPPED_KEY_LEN: usize = KEY_LEN + TAG_LEN;
const _: () = assert!(HEADER_AUTHENTICATED_LEN + WRAPPED_KEY_LEN == HEADER);
const _: () = assert!(1u64 << CHUNK_SIZE_LOG2 == CHUNK_SIZE);

/// Where a file lives. Ciphertext made for one context does not open in another,
/// so the server cannot move a file to another name, record or vault unnoticed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileContext {
    /// The vault the file belongs to.
    pub vault: VaultId,
    /// The record the file is linked to.
    pub record: RecordId,
    /// The file's own id (its encrypted name is bound to the same id).
    pub file: FileId,
}

/// Header fields a reader may look at before authenticating (to pick the key);
/// after [`FileDecryptor::open`] succeeds they are authentic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderInfo {
    /// Id of the vault key that wrapped the content key.
    pub key_id: KeyId,
    /// Writer-chosen version counter, for replay detection.
    pub generation: u64,
    /// Plaintext length in bytes.
    pub plaintext_len: u64,
    /// The chunk nonce prefix: random per upload, so it names the upload (a
    /// file's manifest says which upload it describes).
    pub upload_id: [u8; NONCE_PREFIX_LEN],
}

struct ParsedHeader {
    authenticated: [u8; HEADER_AUTHENTICATED_LEN],
    info: HeaderInfo,
    nonce_prefix: [u8; NONCE_PREFIX_LEN],
    wrap_nonce: [u8; XNONCE_LEN],
    wrapped_key: [u8; WRAPPED_KEY_LEN],
}

fn array<const N: usize>(bytes: &[u8], at: usize) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&bytes[at..at + N]);
    a
}

fn parse_header(bytes: &[u8]) -> Result<ParsedHeader> {
    check_prefix(bytes, &FILE_MAGIC, FILE_FORMAT_VERSION, HEADER, "file header")?;
    if bytes[5] != CHUNK_SIZE_LOG2 || bytes[6..8] != [0, 0] {
        return Err(CryptoError::Malformed("file header (chunk size or reserved bits)"));
    }
    let plaintext_len = u64::from_be_bytes(array(bytes, 32));
    if Layout::new(plaintext_len).is_none() {
        return Err(CryptoError::Malformed("file header (length out of range)"));
    }
    Ok(ParsedHeader {
        authenticated: array(bytes, 0),
        info: HeaderInfo {
            key_id: KeyId(array(bytes, 8)),
            generation: u64::from_be_bytes(array(bytes, 24)),
            plaintext_len,
            upload_id: array(bytes, 40),
        },
        nonce_prefix: array(bytes, 40),
        wrap_nonce: array(bytes, 56),
        wrapped_key: array(bytes, 80),
    })
}

/// Reads the header's public fields without authenticating them: use only to pick
/// the vault key, then [`FileDecryptor::open`].
pub fn peek_header(bytes: &[u8]) -> Result<HeaderInfo> {
    parse_header(bytes).map(|h| h.info)
}

fn wrap_aad(authenticated: &[u8; HEADER_AUTHENTICATED_LEN], ctx: &FileContext) -> Vec<u8> {
    let mut aad = Vec::with_capacity(FILE_KEY_DOMAIN.len() + HEADER_AUTHENTICATED_LEN + 48);
    aad.extend_from_slice(FILE_KEY_DOMAIN);
    aad.extend_from_slice(authenticated);
    aad.extend_from_slice(ctx.vault.as_bytes());
    aad.extend_from_slice(ctx.record.as_bytes());
    aad.extend_from_slice(ctx.file.as_bytes());
    aad
}

fn build_header(
    vault_key: &VaultKey,
    ctx: &FileContext,
    generation: u64,
    plaintext_len: u64,
    content_key: &ContentKey,
    nonce_prefix: &[u8; NONCE_PREFIX_LEN],
    wrap_nonce: &[u8; XNONCE_LEN],
) -> Result<[u8; HEADER]> {
    let mut header = [0u8; HEADER];
    header[..4].copy_from_slice(&FILE_MAGIC);
    header[4] = FILE_FORMAT_VERSION;
    header[5] = CHUNK_SIZE_LOG2;
    header[8..8 + KEY_ID_LEN].copy_from_slice(&vault_key.id().0);
    header[24..32].copy_from_slice(&generation.to_be_bytes());
    header[32..40].copy_from_slice(&plaintext_len.to_be_bytes());
    header[40..56].copy_from_slice(nonce_prefix);
    header[56..80].copy_from_slice(wrap_nonce);
    let authenticated: [u8; HEADER_AUTHENTICATED_LEN] = array(&header, 0);
    let wrapped =
        aead::seal(vault_key.secret(), wrap_nonce, &wrap_aad(&authenticated, ctx), &content_key.0[..])?;
    header[HEADER_AUTHENTICATED_LEN..].copy_from_slice(&wrapped);
    Ok(header)
}

fn unwrap_content_key(h: &ParsedHeader, vault_key: &VaultKey, ctx: &FileContext) -> Result<ContentKey> {
    if h.info.key_id != vault_key.id() {
        return Err(CryptoError::WrongKey { found: h.info.key_id, supplied: vault_key.id() });
    }
    let aad = wrap_aad(&h.authenticated, ctx);
    let key = aead::open(vault_key.secret(), &h.wrap_nonce, &aad, &h.wrapped_key)?;
    let mut content = Zeroizing::new([0u8; KEY_LEN]);
    content.copy_from_slice(&key);
    Ok(ContentKey(content))
}

/// The 8 nonce bytes after the per-file prefix: the chunk index as a 56-bit
/// big-endian number, then 0x01 for the final chunk and 0x00 for every other.
fn chunk_nonce_suffix(index: ChunkIndex, last: bool) -> [u8; NONCE_SUFFIX_LEN] {
    let mut suffix = [0u8; NONCE_SUFFIX_LEN];
    suffix[..7].copy_from_slice(&index.0.to_be_bytes()[1..]);
    suffix[7] = u8::from(last);
    suffix
}

/// Streaming encryptor for one upload of one file. Holds at most one chunk of
/// plaintext, in a buffer that is wiped on drop.
pub struct FileEncryptor {
    subkey: SubKey,
    upload_id: [u8; NONCE_PREFIX_LEN],
    layout: Layout,
    next: ChunkIndex,
    pending: Zeroizing<Vec<u8>>,
    consumed: u64,
}

impl std::fmt::Debug for FileEncryptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileEncryptor")
            .field("layout", &self.layout)
            .field("next", &self.next)
            .field("consumed", &self.consumed)
            .finish_non_exhaustive()
    }
}

impl FileEncryptor {
    /// Starts an upload of exactly `plaintext_len` bytes and returns the header to
    /// send first. Draws, in this order, 32 bytes of content key, 16 bytes of chunk
    /// nonce prefix and 24 bytes of wrap nonce from `rng`.
    pub fn new(
        vault_key: &VaultKey,
        ctx: &FileContext,
        generation: u64,
        plaintext_len: u64,
        rng: &mut dyn RandomSource,
    ) -> Result<(Self, [u8; HEADER])> {
        let layout =
            Layout::new(plaintext_len).ok_or(CryptoError::Misuse("file too large for the format"))?;
        let content_key = ContentKey::generate(rng)?;
        let mut nonce_prefix = [0u8; NONCE_PREFIX_LEN];
        rng.fill(&mut nonce_prefix)?;
        let mut wrap_nonce = [0u8; XNONCE_LEN];
        rng.fill(&mut wrap_nonce)?;
        let header = build_header(
            vault_key,
            ctx,
            generation,
            plaintext_len,
            &content_key,
            &nonce_prefix,
            &wrap_nonce,
        )?;
        let encryptor = FileEncryptor {
            subkey: SubKey::derive(&content_key.0, &nonce_prefix),
            upload_id: nonce_prefix,
            layout,
            next: ChunkIndex(0),
            pending: Zeroizing::new(Vec::with_capacity(CHUNK_SIZE as usize)),
            consumed: 0,
        };
        Ok((encryptor, header))
    }

    /// The upload's id (its chunk nonce prefix), for the file's manifest.
    pub fn upload_id(&self) -> [u8; NONCE_PREFIX_LEN] {
        self.upload_id
    }

    /// Seals `plaintext` as chunk `*next` and advances `*next`. A free-standing
    /// helper so the plaintext may be borrowed from `self.pending`.
    fn seal_at(
        subkey: &SubKey,
        layout: &Layout,
        next: &mut ChunkIndex,
        plaintext: &[u8],
        out: &mut (impl Sink + ?Sized),
    ) -> Result<()> {
        let last = *next == layout.last_chunk();
        subkey.seal_into(&chunk_nonce_suffix(*next, last), &[], plaintext, out)?;
        *next = ChunkIndex(next.0 + 1);
        Ok(())
    }

    /// Encrypts `input`, appending every chunk it completes to `out`. Writing more
    /// than the declared length is an error.
    pub fn update(&mut self, mut input: &[u8], out: &mut (impl Sink + ?Sized)) -> Result<()> {
        let total = self.consumed.checked_add(input.len() as u64);
        if total.is_none_or(|t| t > self.layout.plaintext_len()) {
            return Err(CryptoError::Misuse("more plaintext than declared"));
        }
        self.consumed += input.len() as u64;
        while !input.is_empty() {
            let chunk_len = self.layout.chunk_plain_len(self.next) as usize;
            if self.pending.is_empty() && input.len() >= chunk_len {
                let (chunk, rest) = input.split_at(chunk_len);
                Self::seal_at(&self.subkey, &self.layout, &mut self.next, chunk, out)?;
                input = rest;
                continue;
            }
            let take = (chunk_len - self.pending.len()).min(input.len());
            self.pending.extend_from_slice(&input[..take]);
            input = &input[take..];
            if self.pending.len() == chunk_len {
                Self::seal_at(&self.subkey, &self.layout, &mut self.next, &self.pending, out)?;
                // Zeroize empties the buffer and wipes it, keeping its capacity.
                zeroize::Zeroize::zeroize(&mut *self.pending);
            }
        }
        Ok(())
    }

    /// Completes the upload. Fails if fewer bytes were written than declared (the
    /// output would not be a valid file).
    pub fn finish(mut self, out: &mut (impl Sink + ?Sized)) -> Result<()> {
        if self.consumed != self.layout.plaintext_len() {
            return Err(CryptoError::Misuse("less plaintext than declared"));
        }
        if self.layout.plaintext_len() == 0 {
            // The one empty final chunk that every empty file carries.
            Self::seal_at(&self.subkey, &self.layout, &mut self.next, &[], out)?;
        }
        debug_assert_eq!(self.next.0, self.layout.chunk_count());
        Ok(())
    }
}

/// Encrypts a whole file in memory: header and all chunks.
pub fn encrypt_file(
    vault_key: &VaultKey,
    ctx: &FileContext,
    generation: u64,
    plaintext: &[u8],
    rng: &mut dyn RandomSource,
) -> Result<Vec<u8>> {
    let (mut enc, header) = FileEncryptor::new(vault_key, ctx, generation, plaintext.len() as u64, rng)?;
    let mut out = Vec::with_capacity(enc.layout.ciphertext_len() as usize);
    out.extend_from_slice(&header);
    enc.update(plaintext, &mut out)?;
    enc.finish(&mut out)?;
    Ok(out)
}

/// An authenticated header: decrypts any chunk of the file on its own.
pub struct FileDecryptor {
    subkey: SubKey,
    layout: Layout,
    info: HeaderInfo,
}

impl std::fmt::Debug for FileDecryptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileDecryptor").field("info", &self.info).finish_non_exhaustive()
    }
}

impl FileDecryptor {
    /// Authenticates `header` (the first [`HEADER_LEN`] bytes of the file) for the
    /// file at `ctx`, and refuses it if its generation is below `min_generation`.
    pub fn open(header: &[u8], vault_key: &VaultKey, ctx: &FileContext, min_generation: u64) -> Result<Self> {
        let parsed = parse_header(header)?;
        let content_key = unwrap_content_key(&parsed, vault_key, ctx)?;
        let info = parsed.info;
        // Checked only after authentication, so the generation compared is genuine.
        if info.generation < min_generation {
            return Err(CryptoError::Integrity(IntegrityFailure::Stale {
                found: info.generation,
                required: min_generation,
            }));
        }
        let layout = Layout::new(info.plaintext_len).ok_or_else(length_failure)?;
        Ok(FileDecryptor { subkey: SubKey::derive(&content_key.0, &parsed.nonce_prefix), layout, info })
    }

    /// The authenticated header fields.
    pub fn info(&self) -> HeaderInfo {
        self.info
    }

    /// The file's chunk layout (authenticated length).
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Checks a ciphertext length reported by the server against the header.
    pub fn check_ciphertext_len(&self, len: u64) -> Result<()> {
        if len == self.layout.ciphertext_len() {
            Ok(())
        } else {
            Err(length_failure())
        }
    }

    /// Decrypts chunk `index` (`sealed` is exactly that chunk's ciphertext and tag),
    /// appending its plaintext to `out`. Nothing is appended on failure.
    pub fn decrypt_chunk(
        &self,
        index: ChunkIndex,
        sealed: &[u8],
        out: &mut (impl Sink + ?Sized),
    ) -> Result<()> {
        if !self.layout.contains(index) || sealed.len() as u64 != self.layout.chunk_cipher_len(index) {
            return Err(length_failure());
        }
        let last = index == self.layout.last_chunk();
        self.subkey.open_into(&chunk_nonce_suffix(index, last), &[], sealed, out)
    }

    /// Decrypts consecutive chunks starting at `first`; `sealed` must hold whole
    /// chunks and nothing more. All or nothing: on failure `out` is unchanged.
    pub fn decrypt_chunks(
        &self,
        first: ChunkIndex,
        mut sealed: &[u8],
        out: &mut (impl Sink + ?Sized),
    ) -> Result<()> {
        let start = out.len();
        let mut index = first;
        let result = (|| {
            while !sealed.is_empty() {
                let len = self.layout.chunk_cipher_len(index) as usize;
                if len == 0 || sealed.len() < len {
                    return Err(length_failure());
                }
                let (chunk, rest) = sealed.split_at(len);
                self.decrypt_chunk(index, chunk, out)?;
                sealed = rest;
                index = ChunkIndex(index.0 + 1);
            }
            Ok(())
        })();
        if result.is_err() {
            out.wipe_to(start);
        }
        result
    }

    /// Turns this decryptor into a sequential one fed with the bytes after the header.
    pub fn into_stream(self) -> StreamDecryptor {
        StreamDecryptor { dec: self, next: ChunkIndex(0), pending: Vec::new(), failed: false }
    }
}

/// Sequential decryption with bounded memory (one chunk of ciphertext buffered).
/// Only [`StreamDecryptor::finish`] proves the file was not truncated; a caller
/// that wants that guarantee up front checks the server-reported length with
/// [`FileDecryptor::check_ciphertext_len`] first.
pub struct StreamDecryptor {
    dec: FileDecryptor,
    next: ChunkIndex,
    pending: Vec<u8>,
    failed: bool,
}

impl std::fmt::Debug for StreamDecryptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamDecryptor").field("next", &self.next).finish_non_exhaustive()
    }
}

impl StreamDecryptor {
    /// Feeds ciphertext, appending the plaintext of every chunk it completes.
    /// After any error the stream stays failed.
    pub fn update(&mut self, input: &[u8], out: &mut (impl Sink + ?Sized)) -> Result<()> {
        if self.failed {
            return Err(auth_failure());
        }
        let result = self.feed(input, out);
        self.failed = result.is_err();
        result
    }

    fn feed(&mut self, mut input: &[u8], out: &mut (impl Sink + ?Sized)) -> Result<()> {
        while !input.is_empty() {
            let len = self.dec.layout.chunk_cipher_len(self.next) as usize;
            if len == 0 {
                return Err(length_failure()); // bytes after the final chunk
            }
            if self.pending.is_empty() && input.len() >= len {
                let (chunk, rest) = input.split_at(len);
                self.dec.decrypt_chunk(self.next, chunk, out)?;
                input = rest;
            } else {
                let take = (len - self.pending.len()).min(input.len());
                self.pending.extend_from_slice(&input[..take]);
                input = &input[take..];
                if self.pending.len() < len {
                    continue;
                }
                self.dec.decrypt_chunk(self.next, &self.pending, out)?;
                self.pending.clear(); // ciphertext: no need to wipe
            }
            self.next = ChunkIndex(self.next.0 + 1);
        }
        Ok(())
    }

    /// Checks that every chunk arrived. Fails on truncation.
    pub fn finish(self) -> Result<HeaderInfo> {
        if self.failed {
            return Err(auth_failure());
        }
        if self.next.0 != self.dec.layout.chunk_count() || !self.pending.is_empty() {
            return Err(length_failure());
        }
        Ok(self.dec.info)
    }
}

/// Decrypts a whole file held in memory. The plaintext is returned only if every
/// byte authenticated and the length matches the header.
pub fn decrypt_file(
    blob: &[u8],
    vault_key: &VaultKey,
    ctx: &FileContext,
    min_generation: u64,
) -> Result<(HeaderInfo, Zeroizing<Vec<u8>>)> {
    let dec = FileDecryptor::open(blob, vault_key, ctx, min_generation)?;
    dec.check_ciphertext_len(blob.len() as u64)?;
    let info = dec.info();
    let mut out = Zeroizing::new(Vec::with_capacity(info.plaintext_len as usize));
    dec.decrypt_chunks(ChunkIndex(0), &blob[HEADER..], &mut out)?;
    Ok((info, out))
}

/// Re-wraps a file's content key for a new vault key, a new location or a new
/// generation, without touching the chunks: key rotation and moves between
/// records cost one header, not a re-encryption. Draws a 24-byte wrap nonce.
#[allow(clippy::too_many_arguments)]
pub fn rewrap_header(
    header: &[u8],
    old_key: &VaultKey,
    old_ctx: &FileContext,
    new_key: &VaultKey,
    new_ctx: &FileContext,
    new_generation: u64,
    rng: &mut dyn RandomSource,
) -> Result<[u8; HEADER]> {
    let parsed = parse_header(header)?;
    let content_key = unwrap_content_key(&parsed, old_key, old_ctx)?;
    let mut wrap_nonce = [0u8; XNONCE_LEN];
    rng.fill(&mut wrap_nonce)?;
    build_header(
        new_key,
        new_ctx,
        new_generation,
        parsed.info.plaintext_len,
        &content_key,
        &parsed.nonce_prefix,
        &wrap_nonce,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::random::OsRandom;

    fn ctx() -> FileContext {
        FileContext { vault: VaultId([1; 16]), record: RecordId([2; 16]), file: FileId([3; 16]) }
    }

    #[test]
    fn nonce_suffix_layout() {
        assert_eq!(chunk_nonce_suffix(ChunkIndex(0), false), [0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(chunk_nonce_suffix(ChunkIndex(0), true), [0, 0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(chunk_nonce_suffix(ChunkIndex(0x0102), false), [0, 0, 0, 0, 0, 1, 2, 0]);
    }

    #[test]
    fn header_is_parsed_back() {
        let key = VaultKey::from_bytes(KeyId([7; 16]), [8; 32]);
        let blob = encrypt_file(&key, &ctx(), 42, b"abc", &mut OsRandom).unwrap();
        let info = peek_header(&blob).unwrap();
        assert_eq!(
            info,
            HeaderInfo {
                key_id: KeyId([7; 16]),
                generation: 42,
                plaintext_len: 3,
                upload_id: array(&blob, 40)
            }
        );
        assert_eq!(blob.len() as u64, Layout::new(3).unwrap().ciphertext_len());
    }

    #[test]
    fn encryptor_refuses_wrong_lengths() {
        let key = VaultKey::from_bytes(KeyId([7; 16]), [8; 32]);
        let (mut enc, _) = FileEncryptor::new(&key, &ctx(), 1, 4, &mut OsRandom).unwrap();
        let mut out = Vec::new();
        assert!(matches!(enc.update(b"12345", &mut out), Err(CryptoError::Misuse(_))));
        enc.update(b"123", &mut out).unwrap();
        assert!(matches!(enc.finish(&mut out), Err(CryptoError::Misuse(_))));
    }
}
