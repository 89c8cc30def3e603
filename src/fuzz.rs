//! Fuzz targets: one function per parser of bytes that vaultfs does not trust.
//!
//! Data flow: a fuzzer (cargo fuzz in `fuzz/`, or the stable smoke harness in
//! `tests/fuzz.rs` that CI runs) hands each target arbitrary bytes. A target
//! feeds them to the parser and checks an oracle, not just "no panic": the
//! crypto targets start from a genuine ciphertext of known plaintext, alter it as
//! the input says, and assert that whatever decrypts successfully is exactly the
//! original plaintext (an altered file may fail, never return altered bytes).
//!
//! Everything here is deterministic (fixed keys, a seeded random source), so a
//! crash found by a fuzzer reproduces from its input alone.

use std::path::Path;
use std::sync::OnceLock;

use crate::crypto::error::Result as CryptoResult;
use crate::crypto::names::name_key_id;
use crate::crypto::{
    decrypt_file, encrypt_file, open_name, peek_header, seal_name, ChunkIndex, FileContext, FileDecryptor,
    KeyId, Layout, NameContext, RandomSource, VaultKey, Wallet, HEADER_LEN,
};
use crate::ids::{FileId, RecordId, VaultId};
use crate::protocol;

/// A fuzz target: takes any bytes, panics only if an oracle is violated.
pub type Target = fn(&[u8]);

/// Every target by name, as `fuzz/` and the smoke harness run them.
pub const TARGETS: &[(&str, Target)] = &[
    ("file_header", file_header),
    ("file_chunks", file_chunks),
    ("sealed_name", sealed_name),
    ("wallet", wallet),
    ("server_responses", server_responses),
    ("client_requests", client_requests),
    ("policy", policy),
];

/// A deterministic random source (xorshift), so reference ciphertexts are fixed.
struct Seeded(u64);

impl RandomSource for Seeded {
    fn fill(&mut self, dest: &mut [u8]) -> CryptoResult<()> {
        for b in dest {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            *b = self.0 as u8;
        }
        Ok(())
    }
}

fn key() -> VaultKey {
    VaultKey::from_bytes(KeyId([7; 16]), [0x5a; 32])
}

fn ctx(file: u8) -> FileContext {
    FileContext { vault: VaultId([1; 16]), record: RecordId([2; 16]), file: FileId([file; 16]) }
}

/// Three full chunks and a partial one: chunk boundaries matter.
const PLAIN_LEN: usize = 3 * 65_536 + 1_234;

struct Reference {
    plain: Vec<u8>,
    cipher: Vec<u8>,
    /// The same plaintext stored as another file (for swaps and splices).
    other: Vec<u8>,
}

fn reference() -> &'static Reference {
    static R: OnceLock<Reference> = OnceLock::new();
    R.get_or_init(|| {
        let plain: Vec<u8> = (0..PLAIN_LEN).map(|i| (i % 251) as u8).collect();
        let cipher = encrypt_file(&key(), &ctx(3), 5, &plain, &mut Seeded(0x9e37_79b9_7f4a_7c15)).unwrap();
        let other = encrypt_file(&key(), &ctx(4), 5, &plain, &mut Seeded(0x0123_4567_89ab_cdef)).unwrap();
        Reference { plain, cipher, other }
    })
}

/// Reads little-endian numbers off the front of the input.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }

    fn u32(&mut self) -> Option<u32> {
        let mut v = 0u32;
        for i in 0..4 {
            v |= u32::from(self.byte()?) << (8 * i);
        }
        Some(v)
    }
}

/// Alters `file` as the input says: flip bits, truncate, append, swap or
/// duplicate chunks, splice in bytes of another file, or replace it wholesale.
fn mutate(file: &[u8], other: &[u8], data: &[u8]) -> Vec<u8> {
    let mut input = Input(data);
    let mut out = file.to_vec();
    let chunk = 65_536 + 16;
    let chunks = out.len().saturating_sub(HEADER_LEN as usize).div_ceil(chunk).max(1);
    let at = |n: u32, len: usize| if len == 0 { 0 } else { n as usize % len };
    while let Some(op) = input.byte() {
        match op % 7 {
            0 => {
                let (Some(pos), Some(x)) = (input.u32(), input.byte()) else { break };
                let i = at(pos, out.len());
                if let Some(b) = out.get_mut(i) {
                    *b ^= x.max(1);
                }
            }
            1 => {
                let Some(pos) = input.u32() else { break };
                out.truncate(at(pos, out.len() + 1));
            }
            2 => {
                let Some(n) = input.byte() else { break };
                let n = usize::from(n).min(input.0.len());
                out.extend_from_slice(&input.0[..n]);
                input.0 = &input.0[n..];
            }
            3 | 4 => {
                // Swap (3) or copy over (4) two whole chunks.
                let (Some(a), Some(b)) = (input.byte(), input.byte()) else { break };
                let (a, b) = (usize::from(a) % chunks, usize::from(b) % chunks);
                let range = |i: usize| {
                    let s = HEADER_LEN as usize + i * chunk;
                    s.min(out.len())..(s + chunk).min(out.len())
                };
                let (ra, rb) = (range(a), range(b));
                if ra.len() == rb.len() && ra != rb {
                    let copy = out[ra.clone()].to_vec();
                    if op % 7 == 3 {
                        out.copy_within(rb.clone(), ra.start);
                        out[rb].copy_from_slice(&copy);
                    } else {
                        out[rb].copy_from_slice(&copy);
                    }
                }
            }
            5 => {
                // Another file's bytes at the same place (header or chunks).
                let (Some(pos), Some(len)) = (input.u32(), input.u32()) else { break };
                let s = at(pos, out.len().min(other.len()));
                let e = (s + len as usize % 70_000).min(out.len()).min(other.len());
                out[s..e].copy_from_slice(&other[s..e]);
            }
            _ => {
                out = input.0.to_vec();
                break;
            }
        }
    }
    out
}

/// Decrypts `blob` every way the mount does (whole, streamed in pieces, chunk by
/// chunk at random) and checks that nothing but the original plaintext comes out.
fn decrypt_all_ways(blob: &[u8], split: usize, min_generation: u64) {
    let r = reference();
    let (key, ctx) = (key(), ctx(3));
    if let Ok((info, plain)) = decrypt_file(blob, &key, &ctx, min_generation) {
        assert!(plain[..] == r.plain[..], "decrypt_file returned altered plaintext");
        assert_eq!(info.plaintext_len, PLAIN_LEN as u64);
    }
    let Ok(dec) =
        FileDecryptor::open(&blob[..blob.len().min(HEADER_LEN as usize)], &key, &ctx, min_generation)
    else {
        return;
    };
    // The header authenticated: its layout is the genuine one.
    let layout: Layout = dec.layout();
    assert_eq!(layout.plaintext_len(), PLAIN_LEN as u64, "an altered header authenticated");
    for i in 0..layout.chunk_count() {
        let range = layout.cipher_range_for(i..i + 1);
        let (s, e) = (range.start as usize, (range.end as usize).min(blob.len()));
        let mut out = Vec::new();
        if s <= e && dec.decrypt_chunk(ChunkIndex(i), &blob[s..e], &mut out).is_ok() {
            let p = layout.chunk_plain_range(ChunkIndex(i));
            assert!(
                out[..] == r.plain[p.start as usize..p.end as usize],
                "chunk {i} decrypted to altered bytes"
            );
        }
    }
    let mut stream = dec.into_stream();
    let mut out = Vec::new();
    let mut failed = false;
    for piece in blob[HEADER_LEN.min(blob.len() as u64) as usize..].chunks(split.max(1)) {
        if stream.update(piece, &mut out).is_err() {
            failed = true;
            break;
        }
        assert!(out[..] == r.plain[..out.len().min(r.plain.len())], "the stream returned altered bytes");
        assert!(out.len() <= r.plain.len(), "the stream returned more than the file holds");
    }
    if !failed && stream.finish().is_ok() {
        assert!(out[..] == r.plain[..], "a finished stream returned altered or missing bytes");
    }
}

/// Arbitrary bytes as a whole stored file (header and chunks): must not
/// decrypt, and the header's public fields parse without panicking.
pub fn file_header(data: &[u8]) {
    let _ = peek_header(data);
    decrypt_all_ways(data, 4096, 0);
}

/// A genuine file altered as the input says (see [`mutate`]): only the
/// original plaintext may come out, and an older generation is refused.
pub fn file_chunks(data: &[u8]) {
    let r = reference();
    let (split, data) = match data.split_first() {
        Some((&s, rest)) => (61 + usize::from(s) * 1021, rest),
        None => (65_552, data),
    };
    let blob = mutate(&r.cipher, &r.other, data);
    decrypt_all_ways(&blob, split, 0);
    // A replayed file (generation 5) is refused when 6 is required.
    assert!(
        FileDecryptor::open(&blob[..blob.len().min(HEADER_LEN as usize)], &key(), &ctx(3), 6).is_err(),
        "a stale generation was accepted"
    );
}

fn name_ctx(file: u8) -> NameContext {
    NameContext::FileName { vault: VaultId([1; 16]), record: RecordId([2; 16]), file: FileId([file; 16]) }
}

const NAME: &[u8] = "tax return 2026 – final.pdf".as_bytes();

fn sealed_reference() -> &'static (Vec<u8>, Vec<u8>) {
    static S: OnceLock<(Vec<u8>, Vec<u8>)> = OnceLock::new();
    S.get_or_init(|| {
        let a = seal_name(&key(), &name_ctx(3), NAME, &mut Seeded(42)).unwrap();
        let b = seal_name(&key(), &name_ctx(4), b"another name.txt", &mut Seeded(43)).unwrap();
        (a, b)
    })
}

/// A sealed name altered as the input says, or raw bytes: opens only to the
/// original name, and never under another object's context.
pub fn sealed_name(data: &[u8]) {
    let (sealed, other) = sealed_reference();
    let blob = mutate(sealed, other, data);
    let _ = name_key_id(&blob);
    if let Ok(name) = open_name(&key(), &name_ctx(3), &blob) {
        assert!(name[..] == *NAME, "an altered sealed name opened to {:?}", String::from_utf8_lossy(&name));
    }
    // Under file 4's context only file 4's genuine sealed name opens (a splice
    // can rebuild it whole), and then to file 4's name.
    if let Ok(name) = open_name(&key(), &name_ctx(4), &blob) {
        assert!(
            blob == *other && name[..] == *b"another name.txt",
            "a name opened under another file's context"
        );
    }
    let _ = open_name(&key(), &NameContext::VaultName { vault: VaultId([1; 16]) }, data);
}

/// A wallet blob: the header parses (the KDF parameters are checked before any
/// work), the decrypted body's parser takes any bytes, a blob with cheap
/// parameters is tried with a passphrase and every blob with a recovery key
/// (neither must open); the same bytes as a typed recovery key parse or not.
pub fn wallet(data: &[u8]) {
    let _ = Wallet::deserialize(data);
    // A share (a keyring sealed for this user) comes from the server too: it
    // must parse without panicking, and never open without the sender's key.
    if let Ok(sender) = crate::crypto::share::share_sender(data) {
        static FROM: std::sync::OnceLock<crate::crypto::UserPublic> = std::sync::OnceLock::new();
        let me = crate::crypto::UserSecret::from_bytes(&[7; 32]).expect("any 32 bytes are a key");
        let from = FROM.get_or_init(|| {
            crate::crypto::UserSecret::from_bytes(&[8; 32]).expect("any 32 bytes are a key").public()
        });
        let ctx = crate::crypto::share::ShareContext {
            vault: crate::ids::VaultId([1; 16]),
            sender,
            recipient: "fuzz",
        };
        assert!(crate::crypto::share::open_share(data, &ctx, &me, from).is_err(), "a forged share opened");
    }
    if let Ok(params) = crate::crypto::wallet::wallet_kdf_params(data) {
        if params.m_cost_kib <= 64 && params.t_cost <= 2 && params.p_cost <= 1 {
            assert!(Wallet::open(data, b"fuzz passphrase").is_err(), "a forged wallet opened");
        }
    }
    // The recovery path (no KDF): any blob, a fixed recovery key; forged
    // bytes never open, and `wallet_has_recovery_slot` never panics.
    let _ = crate::crypto::wallet::wallet_has_recovery_slot(data);
    static PAPER: std::sync::OnceLock<crate::crypto::RecoveryKey> = std::sync::OnceLock::new();
    let paper = PAPER.get_or_init(|| {
        crate::crypto::RecoveryKey::generate(&mut crate::crypto::random::ReplayRandom::new(vec![9; 16]))
            .expect("16 bytes")
    });
    assert!(Wallet::open_with_recovery(data, paper).is_err(), "a forged wallet opened with a recovery key");
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = text.parse::<crate::crypto::RecoveryKey>();
    }
}

/// What a server sends back: JSON bodies of every kind, ETags, Content-Range.
pub fn server_responses(data: &[u8]) {
    use protocol::*;
    let _ = serde_json::from_slice::<Me>(data);
    let _ = serde_json::from_slice::<UserKey>(data);
    let _ = serde_json::from_slice::<Vec<Member>>(data);
    let _ = serde_json::from_slice::<Vec<VaultInfo>>(data);
    let _ = serde_json::from_slice::<Vec<RecordInfo>>(data);
    let _ = serde_json::from_slice::<Vec<FileInfo>>(data);
    let _ = serde_json::from_slice::<UploadResult>(data);
    let _ = serde_json::from_slice::<ErrorBody>(data);
    let _ = serde_json::from_slice::<PreLogin>(data);
    let _ = serde_json::from_slice::<Session>(data);
    let text = String::from_utf8_lossy(data);
    if let Some(v) = parse_etag(&text) {
        assert_eq!(parse_etag(&etag(v)), Some(v));
    }
    let _ = parse_content_range_len(&text);
}

/// What a client sends the server: Range and conflict-copy headers, ids, and
/// JSON request bodies.
pub fn client_requests(data: &[u8]) {
    use protocol::*;
    let text = String::from_utf8_lossy(data);
    if let Some(crate::server::api::RangeSpec::From(start, Some(end))) =
        crate::server::api::parse_range_value(&text)
    {
        assert!(start < end, "an empty or inverted range was accepted: {text:?}");
    }
    let _ = crate::server::api::parse_conflict_copy(&text);
    let _ = text.parse::<FileId>();
    let _ = serde_json::from_slice::<NewFile>(data);
    let _ = serde_json::from_slice::<FileUpdate>(data);
    let _ = serde_json::from_slice::<NewRecord>(data);
    let _ = serde_json::from_slice::<RecordUpdate>(data);
    let _ = serde_json::from_slice::<NewVault>(data);
    let _ = serde_json::from_slice::<LoginRequest>(data);
    let _ = serde_json::from_slice::<EnrollRequest>(data);
}

/// A policy file: any text gives a policy or an error naming the file, never a panic.
pub fn policy(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Err(e) = crate::policy::PolicyFile::parse(Path::new("/fuzz/policy.toml"), &text) {
        assert!(e.to_string().contains("/fuzz/policy.toml"), "error without the file name: {e}");
    }
}

/// Valid inputs for `target` to start mutating from (and the smoke run's seeds).
pub fn seeds(target: &str) -> Vec<Vec<u8>> {
    match target {
        "file_header" => vec![reference().cipher.clone(), reference().cipher[..200].to_vec()],
        "file_chunks" | "sealed_name" => vec![vec![], vec![64, 0, 5, 0, 0, 0, 1], vec![1, 1, 0, 0, 1, 0]],
        "wallet" => {
            let mut w = Wallet::new();
            let _ = w.add_key(VaultId([1; 16]), key());
            let params = crate::crypto::KdfParams { m_cost_kib: 8, t_cost: 1, p_cost: 1 };
            let sealed = w.seal(b"pw", params, &mut Seeded(9)).unwrap_or_default();
            // With a recovery slot (for another recovery key than the
            // target's, which must never open a mutated blob).
            let other = crate::crypto::RecoveryKey::generate(&mut Seeded(8));
            let recoverable = other
                .map(|k| {
                    w.set_recovery(&k);
                    (w.seal(b"pw", params, &mut Seeded(7)).unwrap_or_default(), k.to_string().into_bytes())
                })
                .unwrap_or_default();
            // And a share, for the share parser.
            use crate::crypto::share::{seal_share, EpochKey, Keyring, ShareContext};
            let ring = Keyring { keys: vec![EpochKey { epoch: 0, key: key() }], flags: 1 };
            let ctx = ShareContext { vault: VaultId([1; 16]), sender: "alice", recipient: "fuzz" };
            let share = match (
                crate::crypto::UserSecret::from_bytes(&[9; 32]),
                crate::crypto::UserSecret::from_bytes(&[7; 32]),
            ) {
                (Ok(from), Ok(to)) => {
                    seal_share(&ring, &ctx, &from, &to.public(), &mut Seeded(3)).unwrap_or_default()
                }
                _ => Vec::new(),
            };
            vec![sealed, share, recoverable.0, recoverable.1]
        }
        "server_responses" => vec![
            br#"{"error":{"code":"not_found","message":"no such file"}}"#.to_vec(),
            br#"[{"id":"0102030405060708090a0b0c0d0e0f10","version":3}]"#.to_vec(),
            b"bytes 0-99/1000".to_vec(),
            b"\"17\"".to_vec(),
        ],
        "client_requests" => vec![
            b"bytes=0-99".to_vec(),
            b"bytes=-5".to_vec(),
            b"0102030405060708090a0b0c0d0e0f10:AQID".to_vec(),
            br#"{"id":"0102030405060708090a0b0c0d0e0f10","name":"AQID","e2e":true}"#.to_vec(),
        ],
        "policy" => {
            vec![include_bytes!("../config/policy.toml").to_vec(), b"[mount]\ncache = \"1x\"\n".to_vec()]
        }
        _ => vec![],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oracle_rejects_a_file_that_authenticates_with_other_content() {
        // Stands in for a decryptor bug that lets altered bytes through: a
        // genuine ciphertext of different content must trip the oracle.
        let mut plain = reference().plain.clone();
        plain[70_000] ^= 1;
        let forged = encrypt_file(&key(), &ctx(3), 5, &plain, &mut Seeded(77)).unwrap();
        let caught = std::panic::catch_unwind(|| decrypt_all_ways(&forged, 4096, 0));
        assert!(caught.is_err(), "the oracle accepted altered plaintext");
        // And the genuine file passes every way.
        decrypt_all_ways(&reference().cipher, 4096, 0);
        decrypt_all_ways(&reference().cipher, 1, 0);
    }

    #[test]
    fn every_target_accepts_its_seeds() {
        for &(name, target) in TARGETS {
            let seeds = seeds(name);
            assert!(!seeds.is_empty(), "{name}");
            for seed in seeds {
                target(&seed);
            }
        }
    }
}
