//! File manifests: what the writer of a file's content says about it, sealed
//! under the vault key, so that nothing the server stores or says about a file
//! decides how the client treats it.
//!
//! A manifest states the content's mode (end-to-end, or passed through as plain
//! bytes), its generation and its plaintext length, bound to the file's vault,
//! record and file id. Every content upload writes a new one; the server keeps
//! it beside the content and hands it out with the file's metadata.
//!
//! - An **end-to-end** manifest names the upload it describes (the content's
//!   chunk nonce prefix, random per upload), so its header must match it in
//!   generation, length and upload: a server can neither flip the mode, nor
//!   replace or empty the content, nor pair the manifest with another upload.
//! - A **pass-through** manifest carries a fresh random tag key and one 16-byte
//!   tag per [`PIECE_SIZE`] piece of the plain content: the tag of piece `i` is
//!   XChaCha20-Poly1305 sealing nothing under the tag key with the nonce
//!   `0^16 || i (7 bytes) || 00` and the piece as associated data (a Poly1305
//!   MAC with a one-time key per piece). The content stays plain on the wire
//!   and on the server, but a reader checks each piece before returning any of
//!   its bytes, and any piece on its own, so random reads stay possible.
//!
//! - A **symbolic link**'s manifest holds its target (padded, so the sealed
//!   length tells the server only a bucket): a link is a file with no content.
//!
//! Version 2 adds the file's permission bits and the content's own
//! generation, so a chmod seals a new manifest (a newer generation, which a
//! server cannot roll back on a machine that saw it) without re-encrypting the
//! content. Version 1 manifests are still read (permissions [`LEGACY_PERM`]).
//!
//! Layout (docs/FORMAT.md "File manifests"): `version (1) || key id (16) ||
//! nonce (24) || Seal(vault key, nonce, AAD, body)`.

use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use super::aead::{self, Mac, SubKey, KEY_LEN, NONCE_PREFIX_LEN, NONCE_SUFFIX_LEN, TAG_LEN, XNONCE_LEN};
use super::error::{auth_failure, length_failure, CryptoError, Result};
use super::keys::{KeyId, VaultKey, KEY_ID_LEN};
use super::random::RandomSource;
use super::FileContext;

/// Version byte of the manifests this version seals.
pub const MANIFEST_VERSION: u8 = 2;
/// Version byte of manifests before permissions (still read).
pub const MANIFEST_V1: u8 = 1;
/// Permission bits of a file whose manifest states none (version 1, or no
/// manifest): as files were shown before modes were stored.
pub const LEGACY_PERM: u16 = 0o666;
/// Permission bits a manifest can state (`07777`: rwx for all, setuid,
/// setgid, sticky).
pub const PERM_MASK: u16 = 0o7777;
/// Longest symbolic link target (PATH_MAX less its terminating zero).
pub const MAX_LINK_TARGET: usize = 4095;
/// Link targets are padded with zeros to a multiple of this.
const LINK_PAD: usize = 64;
/// Pass-through content is authenticated in pieces of this size (1 MiB): a
/// reader fetches and checks at least one piece, and a manifest holds one
/// 16-byte tag per piece (about 5 KB for a 300 MB file).
pub const PIECE_SIZE: u64 = 1 << PIECE_SIZE_LOG2;
const PIECE_SIZE_LOG2: u8 = 20;
/// Length of a piece's tag.
pub const PIECE_TAG_LEN: usize = TAG_LEN;
/// Largest sealed manifest accepted (8 MiB: tags for 512 GiB of content).
/// Bounds what an untrusted blob can make the client allocate.
pub const MAX_MANIFEST_LEN: usize = 8 << 20;
const DOMAIN: &[u8] = b"vaultfs/file-meta/v1";
const PREFIX_LEN: usize = 1 + KEY_ID_LEN + XNONCE_LEN;
const MODE_E2E: u8 = 1;
const MODE_PLAIN: u8 = 2;
const MODE_LINK: u8 = 3;
/// Version 1: mode (1) + generation (8) + length (8).
const BODY_FIXED_V1: usize = 17;
/// Version 2: version 1's, then content generation (8) + permissions (2).
const BODY_FIXED: usize = 27;

/// What a file's content is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContentMode {
    /// End-to-end encrypted (a vault file). `upload` is the content's chunk
    /// nonce prefix ([`super::HeaderInfo::upload_id`]); all zero, with length
    /// 0, for a file created empty that never had content uploaded.
    EndToEnd {
        /// Which upload this manifest describes.
        upload: [u8; NONCE_PREFIX_LEN],
    },
    /// Plain bytes, each piece authenticated.
    Plain(PieceTags),
    /// A symbolic link: no content, the target (at most
    /// [`MAX_LINK_TARGET`] bytes, no zero byte) is here.
    Link(LinkTarget),
}

/// A symbolic link's target. `Debug` shows its length only (targets are
/// names, and names are not logged).
#[derive(Clone, PartialEq, Eq)]
pub struct LinkTarget(Zeroizing<Vec<u8>>);

impl LinkTarget {
    /// A target: refused if empty, longer than [`MAX_LINK_TARGET`] or holding
    /// a zero byte (as Linux refuses them).
    pub fn new(target: &[u8]) -> Result<Self> {
        if target.is_empty() || target.len() > MAX_LINK_TARGET || target.contains(&0) {
            return Err(CryptoError::Malformed("symbolic link target"));
        }
        Ok(LinkTarget(Zeroizing::new(target.to_vec())))
    }

    /// The target's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for LinkTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkTarget").field("len", &self.0.len()).finish_non_exhaustive()
    }
}

/// The tag key and piece tags of pass-through content. `Debug` hides the key.
#[derive(Clone, PartialEq, Eq)]
pub struct PieceTags {
    key: Zeroizing<[u8; KEY_LEN]>,
    tags: Vec<[u8; PIECE_TAG_LEN]>,
}

impl std::fmt::Debug for PieceTags {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PieceTags").field("pieces", &self.tags.len()).finish_non_exhaustive()
    }
}

/// Pieces of `length` bytes of content.
pub fn piece_count(length: u64) -> u64 {
    length.div_ceil(PIECE_SIZE)
}

fn piece_nonce_suffix(index: u64) -> [u8; NONCE_SUFFIX_LEN] {
    let mut suffix = [0u8; NONCE_SUFFIX_LEN];
    suffix[..7].copy_from_slice(&index.to_be_bytes()[1..]);
    suffix
}

impl PieceTags {
    /// The tags.
    pub fn tags(&self) -> &[[u8; PIECE_TAG_LEN]] {
        &self.tags
    }

    fn subkey(&self) -> SubKey {
        SubKey::derive(&self.key, &[0u8; NONCE_PREFIX_LEN])
    }

    /// A checker for pieces of this content.
    pub fn verifier(&self) -> PieceVerifier {
        PieceVerifier { subkey: self.subkey(), tags: self.tags.clone() }
    }
}

/// Checks pieces of pass-through content against their tags.
pub struct PieceVerifier {
    subkey: SubKey,
    tags: Vec<[u8; PIECE_TAG_LEN]>,
}

impl std::fmt::Debug for PieceVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PieceVerifier").field("pieces", &self.tags.len()).finish_non_exhaustive()
    }
}

impl PieceVerifier {
    /// Checks that `parts`, joined, are exactly piece `index` (whose length
    /// the caller took from the authenticated length). An integrity error if
    /// not, or if there is no such piece.
    pub fn verify<'a>(&self, index: u64, parts: impl IntoIterator<Item = &'a [u8]>) -> Result<()> {
        let expected =
            usize::try_from(index).ok().and_then(|i| self.tags.get(i)).ok_or_else(length_failure)?;
        let mut mac = self.subkey.mac(&piece_nonce_suffix(index))?;
        for part in parts {
            mac.update(part)?;
        }
        if bool::from(mac.finish()?.ct_eq(expected)) {
            Ok(())
        } else {
            Err(auth_failure())
        }
    }
}

/// Tags content as it streams past, in [`PIECE_SIZE`] pieces, for a new
/// pass-through manifest. Draws its tag key from the random source.
pub struct PieceTagger {
    key: Zeroizing<[u8; KEY_LEN]>,
    subkey: SubKey,
    current: Option<Mac>,
    in_piece: u64,
    index: u64,
    length: u64,
    tags: Vec<[u8; PIECE_TAG_LEN]>,
}

impl std::fmt::Debug for PieceTagger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PieceTagger").field("length", &self.length).finish_non_exhaustive()
    }
}

impl PieceTagger {
    /// A tagger with a fresh random tag key (32 bytes from `rng`).
    pub fn new(rng: &mut dyn RandomSource) -> Result<Self> {
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        rng.fill(&mut key[..])?;
        let subkey = SubKey::derive(&key, &[0u8; NONCE_PREFIX_LEN]);
        Ok(PieceTagger { key, subkey, current: None, in_piece: 0, index: 0, length: 0, tags: Vec::new() })
    }

    /// Feeds the next bytes of the content.
    pub fn update(&mut self, mut data: &[u8]) -> Result<()> {
        while !data.is_empty() {
            let mac = match &mut self.current {
                Some(mac) => mac,
                None => self.current.insert(self.subkey.mac(&piece_nonce_suffix(self.index))?),
            };
            let take = (PIECE_SIZE - self.in_piece).min(data.len() as u64) as usize;
            mac.update(&data[..take])?;
            data = &data[take..];
            self.in_piece += take as u64;
            self.length += take as u64;
            if self.in_piece == PIECE_SIZE {
                self.close_piece()?;
            }
        }
        Ok(())
    }

    fn close_piece(&mut self) -> Result<()> {
        if let Some(mac) = self.current.take() {
            self.tags.push(mac.finish()?);
            self.index += 1;
            self.in_piece = 0;
        }
        Ok(())
    }

    /// Bytes fed so far.
    pub fn length(&self) -> u64 {
        self.length
    }

    /// The tags of everything fed.
    pub fn finish(mut self) -> Result<PieceTags> {
        self.close_piece()?;
        Ok(PieceTags { key: self.key, tags: self.tags })
    }
}

/// A file's manifest, opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileManifest {
    /// The writer's generation counter: higher is newer. Every manifest
    /// sealed for a file has a higher one than the last (a chmod too).
    pub generation: u64,
    /// Plaintext length in bytes (a link: its target's length).
    pub length: u64,
    /// What the content is.
    pub mode: ContentMode,
    /// The generation the content was written with (its header's, for
    /// end-to-end content): `generation` unless only the manifest changed since.
    pub content_generation: u64,
    /// Permission bits (within [`PERM_MASK`]).
    pub perm: u16,
}

impl FileManifest {
    /// A manifest for content written with `generation`.
    pub fn new(generation: u64, length: u64, mode: ContentMode, perm: u16) -> Self {
        FileManifest { generation, length, mode, content_generation: generation, perm: perm & PERM_MASK }
    }

    /// Whether the content is end-to-end encrypted.
    pub fn is_e2e(&self) -> bool {
        matches!(self.mode, ContentMode::EndToEnd { .. })
    }

    /// Whether this is a symbolic link's manifest.
    pub fn is_link(&self) -> bool {
        matches!(self.mode, ContentMode::Link(_))
    }

    /// A manifest for an end-to-end file created empty, with nothing uploaded.
    pub fn new_empty(generation: u64, perm: u16) -> Self {
        Self::new(generation, 0, ContentMode::EndToEnd { upload: [0; NONCE_PREFIX_LEN] }, perm)
    }

    /// A symbolic link's manifest.
    pub fn new_link(generation: u64, target: LinkTarget) -> Self {
        Self::new(generation, target.0.len() as u64, ContentMode::Link(target), 0o777)
    }

    /// The same content with other permission bits, as generation `generation`.
    pub fn with_perm(&self, generation: u64, perm: u16) -> Self {
        FileManifest { generation, perm: perm & PERM_MASK, ..self.clone() }
    }

    /// Whether this is the manifest of a file created empty with nothing
    /// uploaded (its content is empty whatever the server holds).
    pub fn is_never_uploaded(&self) -> bool {
        self.length == 0 && self.mode == ContentMode::EndToEnd { upload: [0; NONCE_PREFIX_LEN] }
    }

    /// Checks that an authenticated header describes the upload this manifest
    /// names (end-to-end content only).
    pub fn check_header(&self, header: &super::HeaderInfo) -> Result<()> {
        match &self.mode {
            ContentMode::EndToEnd { upload }
                if header.generation == self.content_generation
                    && header.plaintext_len == self.length
                    && bool::from(header.upload_id.ct_eq(upload)) =>
            {
                Ok(())
            }
            _ => Err(auth_failure()),
        }
    }

    fn body(&self) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::with_capacity(BODY_FIXED + 64));
        let mode = match self.mode {
            ContentMode::EndToEnd { .. } => MODE_E2E,
            ContentMode::Plain(_) => MODE_PLAIN,
            ContentMode::Link(_) => MODE_LINK,
        };
        out.push(mode);
        out.extend_from_slice(&self.generation.to_be_bytes());
        out.extend_from_slice(&self.length.to_be_bytes());
        out.extend_from_slice(&self.content_generation.to_be_bytes());
        out.extend_from_slice(&(self.perm & PERM_MASK).to_be_bytes());
        match &self.mode {
            ContentMode::Link(target) => {
                out.extend_from_slice(target.as_bytes());
                out.resize(BODY_FIXED + target.0.len().next_multiple_of(LINK_PAD), 0);
            }
            ContentMode::EndToEnd { upload } => out.extend_from_slice(upload),
            ContentMode::Plain(p) => {
                out.push(PIECE_SIZE_LOG2);
                out.extend_from_slice(&p.key[..]);
                for tag in &p.tags {
                    out.extend_from_slice(tag);
                }
            }
        }
        out
    }

    fn parse(version: u8, body: &[u8]) -> Result<Self> {
        let bad = || CryptoError::Malformed("file manifest");
        let fixed = if version == MANIFEST_V1 { BODY_FIXED_V1 } else { BODY_FIXED };
        if body.len() < fixed {
            return Err(bad());
        }
        let u64_at = |at: usize| u64::from_be_bytes(body[at..at + 8].try_into().unwrap_or([0; 8]));
        let (generation, length) = (u64_at(1), u64_at(9));
        let (content_generation, perm) = if version == MANIFEST_V1 {
            (generation, LEGACY_PERM)
        } else {
            let perm = u16::from_be_bytes([body[25], body[26]]);
            if perm & !PERM_MASK != 0 || u64_at(17) > generation {
                return Err(bad());
            }
            (u64_at(17), perm)
        };
        let rest = &body[fixed..];
        let mode = match body[0] {
            MODE_LINK if version != MANIFEST_V1 => {
                let len = usize::try_from(length).map_err(|_| bad())?;
                if len > MAX_LINK_TARGET
                    || rest.len() != len.next_multiple_of(LINK_PAD)
                    || rest[len..].iter().any(|b| *b != 0)
                {
                    return Err(bad());
                }
                ContentMode::Link(LinkTarget::new(&rest[..len]).map_err(|_| bad())?)
            }
            MODE_E2E => {
                let upload: [u8; NONCE_PREFIX_LEN] = rest.try_into().map_err(|_| bad())?;
                ContentMode::EndToEnd { upload }
            }
            MODE_PLAIN => {
                if rest.len() < 1 + KEY_LEN || rest[0] != PIECE_SIZE_LOG2 {
                    return Err(bad());
                }
                let mut key = Zeroizing::new([0u8; KEY_LEN]);
                key.copy_from_slice(&rest[1..1 + KEY_LEN]);
                let raw = &rest[1 + KEY_LEN..];
                if raw.len() % PIECE_TAG_LEN != 0 || (raw.len() / PIECE_TAG_LEN) as u64 != piece_count(length)
                {
                    return Err(bad());
                }
                let tags = raw.chunks_exact(PIECE_TAG_LEN).map(|t| t.try_into().unwrap_or([0; 16])).collect();
                ContentMode::Plain(PieceTags { key, tags })
            }
            _ => return Err(bad()),
        };
        Ok(FileManifest { generation, length, mode, content_generation, perm })
    }
}

fn aad(version: u8, key_id: &KeyId, ctx: &FileContext) -> Vec<u8> {
    let mut aad = Vec::with_capacity(DOMAIN.len() + 1 + KEY_ID_LEN + 48);
    aad.extend_from_slice(DOMAIN);
    aad.push(version);
    aad.extend_from_slice(&key_id.0);
    aad.extend_from_slice(ctx.vault.as_bytes());
    aad.extend_from_slice(ctx.record.as_bytes());
    aad.extend_from_slice(ctx.file.as_bytes());
    aad
}

/// Seals `manifest` for the file at `ctx` under `key`. Draws a 24-byte nonce.
pub fn seal_manifest(
    key: &VaultKey,
    ctx: &FileContext,
    manifest: &FileManifest,
    rng: &mut dyn RandomSource,
) -> Result<Vec<u8>> {
    let mut nonce = [0u8; XNONCE_LEN];
    rng.fill(&mut nonce)?;
    let key_id = key.id();
    let sealed = aead::seal(key.secret(), &nonce, &aad(MANIFEST_VERSION, &key_id, ctx), &manifest.body())?;
    let mut out = Vec::with_capacity(PREFIX_LEN + sealed.len());
    out.push(MANIFEST_VERSION);
    out.extend_from_slice(&key_id.0);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&sealed);
    Ok(out)
}

/// The id of the key a sealed manifest needs (unauthenticated; for key lookup).
pub fn manifest_key_id(blob: &[u8]) -> Result<KeyId> {
    if blob.is_empty() {
        return Err(CryptoError::Malformed("file manifest (empty)"));
    }
    if blob[0] != MANIFEST_VERSION && blob[0] != MANIFEST_V1 {
        return Err(CryptoError::UnsupportedVersion { what: "file manifest", version: blob[0] });
    }
    if blob.len() < PREFIX_LEN + BODY_FIXED_V1 + TAG_LEN || blob.len() > MAX_MANIFEST_LEN {
        return Err(CryptoError::Malformed("file manifest (length)"));
    }
    let mut id = [0u8; KEY_ID_LEN];
    id.copy_from_slice(&blob[1..1 + KEY_ID_LEN]);
    Ok(KeyId(id))
}

/// Opens a sealed manifest for the file at `ctx`: an integrity error if it
/// was altered or belongs to another file.
pub fn open_manifest(key: &VaultKey, ctx: &FileContext, blob: &[u8]) -> Result<FileManifest> {
    let key_id = manifest_key_id(blob)?;
    if key_id != key.id() {
        return Err(CryptoError::WrongKey { found: key_id, supplied: key.id() });
    }
    let mut nonce = [0u8; XNONCE_LEN];
    nonce.copy_from_slice(&blob[1 + KEY_ID_LEN..PREFIX_LEN]);
    // The version is in the AAD: a version 2 manifest cannot pass as version 1.
    let body = aead::open(key.secret(), &nonce, &aad(blob[0], &key_id, ctx), &blob[PREFIX_LEN..])?;
    // Authenticated: a malformed body means a buggy writer; refuse all the same.
    FileManifest::parse(blob[0], &body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::random::OsRandom;
    use crate::ids::{FileId, RecordId, VaultId};

    fn key() -> VaultKey {
        VaultKey::from_bytes(KeyId([5; 16]), [6; 32])
    }

    fn ctx(file: u8) -> FileContext {
        FileContext { vault: VaultId([1; 16]), record: RecordId([2; 16]), file: FileId([file; 16]) }
    }

    fn tagged(data: &[u8], step: usize) -> PieceTags {
        let mut t = PieceTagger::new(&mut OsRandom).unwrap();
        for piece in data.chunks(step.max(1)) {
            t.update(piece).unwrap();
        }
        t.finish().unwrap()
    }

    #[test]
    fn manifests_round_trip_and_are_bound_to_their_file() {
        let data: Vec<u8> = (0..(2 * PIECE_SIZE as usize + 5)).map(|i| (i % 251) as u8).collect();
        let plain = FileManifest::new(7, data.len() as u64, ContentMode::Plain(tagged(&data, 4096)), 0o640);
        let e2e = FileManifest::new(3, 10, ContentMode::EndToEnd { upload: [9; 16] }, 0o755);
        let link = FileManifest::new_link(2, LinkTarget::new(b"../some/where").unwrap());
        let chmodded = e2e.with_perm(4, 0o4711);
        for m in [plain, e2e, FileManifest::new_empty(1, 0o600), link, chmodded] {
            let blob = seal_manifest(&key(), &ctx(3), &m, &mut OsRandom).unwrap();
            assert_eq!(open_manifest(&key(), &ctx(3), &blob).unwrap(), m);
            assert!(open_manifest(&key(), &ctx(4), &blob).unwrap_err().is_integrity(), "another file");
            let mut bad = blob.clone();
            *bad.last_mut().unwrap() ^= 1;
            assert!(open_manifest(&key(), &ctx(3), &bad).unwrap_err().is_integrity());
        }
        assert!(FileManifest::new_empty(1, 0o644).is_never_uploaded());
    }

    #[test]
    fn pieces_verify_alone_and_nothing_else_does() {
        let data: Vec<u8> = (0..(3 * PIECE_SIZE as usize - 10)).map(|i| (i * 7 % 253) as u8).collect();
        // The same tags however the content is fed.
        let a = tagged(&data, 1 << 20);
        let mut b = a.clone();
        b.tags = tagged(&data, 999).tags;
        assert_ne!(a.tags, b.tags, "another upload, another key");
        let mut t = PieceTagger::new(&mut crate::crypto::random::ReplayRandom::new(vec![1; 32])).unwrap();
        t.update(&data).unwrap();
        let whole = t.finish().unwrap();
        let mut t = PieceTagger::new(&mut crate::crypto::random::ReplayRandom::new(vec![1; 32])).unwrap();
        for p in data.chunks(777) {
            t.update(p).unwrap();
        }
        assert_eq!(t.finish().unwrap(), whole);
        assert_eq!(whole.tags().len(), 3);

        let v = whole.verifier();
        let pieces: Vec<&[u8]> = data.chunks(PIECE_SIZE as usize).collect();
        for (i, p) in pieces.iter().enumerate() {
            v.verify(i as u64, [*p]).unwrap();
            let (x, y) = p.split_at(p.len() / 3);
            v.verify(i as u64, [x, y]).unwrap();
        }
        let mut flipped = pieces[1].to_vec();
        flipped[12345] ^= 1;
        assert!(v.verify(1, [&flipped[..]]).unwrap_err().is_integrity(), "a flipped bit");
        assert!(v.verify(0, [pieces[1]]).unwrap_err().is_integrity(), "a piece in another place");
        assert!(v.verify(2, [&pieces[2][..100]]).unwrap_err().is_integrity(), "a truncated piece");
        let mut longer = pieces[2].to_vec();
        longer.push(0);
        assert!(v.verify(2, [&longer[..]]).unwrap_err().is_integrity(), "an extended piece");
        assert!(v.verify(3, [&b""[..]]).is_err(), "no such piece");
        let other = tagged(&data, 4096);
        let mixed = PieceTags { key: whole.key.clone(), tags: other.tags.clone() };
        assert!(mixed.verifier().verify(0, [pieces[0]]).is_err(), "another upload's tags");
    }

    #[test]
    fn headers_must_match_the_manifest() {
        let m = FileManifest::new(3, 10, ContentMode::EndToEnd { upload: [9; 16] }, 0o644);
        let h = |generation, plaintext_len, upload_id| crate::crypto::HeaderInfo {
            key_id: KeyId([5; 16]),
            generation,
            plaintext_len,
            upload_id,
        };
        m.check_header(&h(3, 10, [9; 16])).unwrap();
        for bad in [h(2, 10, [9; 16]), h(3, 11, [9; 16]), h(3, 10, [8; 16])] {
            assert!(m.check_header(&bad).unwrap_err().is_integrity(), "{bad:?}");
        }
        let plain = FileManifest::new(3, 0, ContentMode::Plain(tagged(b"", 1)), 0o644);
        // A chmod keeps the content's generation: the header still matches.
        m.with_perm(9, 0o600).check_header(&h(3, 10, [9; 16])).unwrap();
        assert!(m.with_perm(9, 0o600).check_header(&h(9, 10, [9; 16])).is_err());
        assert!(plain.check_header(&h(3, 0, [0; 16])).is_err(), "a pass-through file has no header");
    }

    #[test]
    fn malformed_manifests_are_refused_before_decryption() {
        assert!(matches!(manifest_key_id(&[]), Err(CryptoError::Malformed(_))));
        assert!(matches!(manifest_key_id(&[9; 100]), Err(CryptoError::UnsupportedVersion { .. })));
        assert!(matches!(manifest_key_id(&[1; 20]), Err(CryptoError::Malformed(_))));
        assert!(matches!(manifest_key_id(&vec![1; MAX_MANIFEST_LEN + 1]), Err(CryptoError::Malformed(_))));
        // Authentic but inconsistent: tags for another length.
        let mut m = FileManifest::new(1, 5, ContentMode::Plain(tagged(&[1; 5], 5)), 0o644);
        m.length = PIECE_SIZE + 1;
        let blob = seal_manifest(&key(), &ctx(3), &m, &mut OsRandom).unwrap();
        assert!(matches!(open_manifest(&key(), &ctx(3), &blob), Err(CryptoError::Malformed(_))));
        // A link whose stated length is not its target's, a content
        // generation above the manifest's, permission bits outside 07777.
        let link = FileManifest::new_link(2, LinkTarget::new(b"target").unwrap());
        let bad_link = FileManifest { length: 7, ..link.clone() };
        let ahead = FileManifest { content_generation: 3, ..link.clone() };
        let bits = FileManifest { perm: 0o10000, ..link.clone() };
        for m in [bad_link, ahead, bits] {
            let mut body = m.body();
            if m.perm > PERM_MASK {
                body[25..27].copy_from_slice(&m.perm.to_be_bytes());
            }
            let sealed = seal_body(&body);
            assert!(
                matches!(open_manifest(&key(), &ctx(3), &sealed), Err(CryptoError::Malformed(_))),
                "{m:?}"
            );
        }
        for bad in [&b""[..], b"a\0b", &[b'x'; MAX_LINK_TARGET + 1]] {
            assert!(LinkTarget::new(bad).is_err());
        }
    }

    /// Seals a raw version-2 body (for bodies no writer makes).
    fn seal_body(body: &[u8]) -> Vec<u8> {
        let nonce = [3u8; XNONCE_LEN];
        let k = key();
        let sealed = aead::seal(k.secret(), &nonce, &aad(MANIFEST_VERSION, &k.id(), &ctx(3)), body).unwrap();
        [&[MANIFEST_VERSION][..], &k.id().0, &nonce, &sealed].concat()
    }

    #[test]
    fn a_version_2_manifest_does_not_pass_as_version_1() {
        let m = FileManifest::new(3, 10, ContentMode::EndToEnd { upload: [9; 16] }, 0o755);
        let mut blob = seal_manifest(&key(), &ctx(3), &m, &mut OsRandom).unwrap();
        blob[0] = MANIFEST_V1;
        assert!(open_manifest(&key(), &ctx(3), &blob).unwrap_err().is_integrity());
    }

    #[test]
    fn link_targets_are_padded_to_buckets() {
        let sealed = |len: usize| {
            let m = FileManifest::new_link(1, LinkTarget::new(&vec![b'a'; len]).unwrap());
            seal_manifest(&key(), &ctx(3), &m, &mut OsRandom).unwrap().len()
        };
        assert_eq!(sealed(1), sealed(64));
        assert!(sealed(65) > sealed(64));
    }
}
