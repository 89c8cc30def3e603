//! The server as the adversary, through a real mount: with direct access to
//! the server's storage (its SQLite metadata and blob files), each test damages
//! stored files in one way, and every read through the mount must fail with EIO
//! (and a log line naming the file); altered bytes must never come back.

mod support;

use std::path::{Path, PathBuf};

use rusqlite::{params, Connection};
use support::mount::TestMount;

/// Ciphertext length of a plaintext of `len` bytes (128-byte header, 64 KiB
/// chunks with 16-byte tags).
fn cipher_len(len: u64) -> u64 {
    128 + len + 16 * len.div_ceil(65536).max(1)
}

/// Offset of chunk `i` in a file.
fn chunk_at(i: u64) -> u64 {
    128 + i * (65536 + 16)
}

fn content(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 12) as u8).collect()
}

/// The server's storage, opened beside the running server.
struct Storage {
    db: Connection,
    data: PathBuf,
}

/// One stored file: its id (hex), blob path, record and vault ids.
struct Row {
    id: Vec<u8>,
    blob: PathBuf,
}

impl Storage {
    fn open(data: &Path) -> Self {
        let db = Connection::open(data.join("meta.sqlite3")).unwrap();
        db.busy_timeout(std::time::Duration::from_secs(10)).unwrap();
        Storage { db, data: data.to_path_buf() }
    }

    /// The file whose stored (ciphertext) size is `size`.
    fn by_size(&self, size: u64) -> Row {
        let (id, blob): (Vec<u8>, String) = self
            .db
            .query_row("SELECT id, blob_id FROM files WHERE size = ?1", params![size as i64], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap_or_else(|e| panic!("no file of {size} bytes: {e}"));
        Row { id, blob: self.data.join("blobs").join(&blob[..2]).join(&blob) }
    }

    fn set_size(&self, row: &Row, size: u64) {
        self.db.execute("UPDATE files SET size = ?1 WHERE id = ?2", params![size as i64, row.id]).unwrap();
    }

    /// Bumps the version, as a server does for new content: clients fetch again.
    fn bump(&self, row: &Row) {
        self.db.execute("UPDATE files SET version = version + 1 WHERE id = ?1", params![row.id]).unwrap();
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Reading `path` must fail with EIO.
fn assert_eio(path: &Path, what: &str) {
    match std::fs::read(path) {
        Ok(data) => panic!("{what}: {} returned {} bytes", path.display(), data.len()),
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{what}: {e}"),
    }
}

/// The one entry of `dir` whose name starts with `prefix`.
fn entry(dir: &Path, prefix: &str) -> PathBuf {
    let found: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| e.path())
        .collect();
    assert_eq!(found.len(), 1, "entries of {} starting with {prefix:?}: {found:?}", dir.display());
    found.into_iter().next().unwrap()
}

#[test]
fn every_kind_of_stored_damage_reads_as_eio_and_is_logged() {
    let mut m = TestMount::start_with("", &["Other"]);
    for d in ["Family/r1", "Family/r2", "Other/r3"] {
        std::fs::create_dir(m.path(d)).unwrap();
    }
    // One file per attack, each of a distinct size so the storage row is known.
    let attacks = [
        "flip",
        "cut_at_chunk",
        "cut_inside",
        "append",
        "reorder",
        "swap_a",
        "swap_b",
        "to_record",
        "to_vault",
        "name",
    ];
    let mut plain = Vec::new();
    for (i, name) in attacks.iter().enumerate() {
        let data = content(300_000 + i * 1000, i as u8);
        std::fs::write(m.path(&format!("Family/r1/{name}.bin")), &data).unwrap();
        plain.push(data);
    }
    m.unmount();
    let s = Storage::open(&m.server.data_dir);
    let row = |i: usize| s.by_size(cipher_len(plain[i].len() as u64));
    let mut ids = Vec::new();

    // 0: one bit flipped in chunk 2.
    let r = row(0);
    let mut b = std::fs::read(&r.blob).unwrap();
    b[chunk_at(2) as usize + 10] ^= 0x01;
    std::fs::write(&r.blob, &b).unwrap();
    ids.push(hex(&r.id));
    // 1: truncated at a chunk boundary (the length in the metadata agrees).
    let r = row(1);
    let b = std::fs::read(&r.blob).unwrap();
    std::fs::write(&r.blob, &b[..chunk_at(3) as usize]).unwrap();
    s.set_size(&r, chunk_at(3));
    ids.push(hex(&r.id));
    // 2: truncated inside a chunk.
    let r = row(2);
    let b = std::fs::read(&r.blob).unwrap();
    std::fs::write(&r.blob, &b[..chunk_at(3) as usize + 100]).unwrap();
    s.set_size(&r, chunk_at(3) + 100);
    ids.push(hex(&r.id));
    // 3: a whole extra chunk appended (taken from another file).
    let r = row(3);
    let mut b = std::fs::read(&r.blob).unwrap();
    let other = std::fs::read(row(4).blob).unwrap();
    b.extend_from_slice(&other[chunk_at(1) as usize..chunk_at(2) as usize]);
    std::fs::write(&r.blob, &b).unwrap();
    s.set_size(&r, b.len() as u64);
    ids.push(hex(&r.id));
    // 4: chunks 0 and 1 swapped.
    let r = row(4);
    let mut b = std::fs::read(&r.blob).unwrap();
    let (c0, c1, c2) = (chunk_at(0) as usize, chunk_at(1) as usize, chunk_at(2) as usize);
    let first = b[c0..c1].to_vec();
    let second = b[c1..c2].to_vec();
    b[c0..c0 + second.len()].copy_from_slice(&second);
    b[c0 + second.len()..c2].copy_from_slice(&first);
    std::fs::write(&r.blob, &b).unwrap();
    ids.push(hex(&r.id));
    // 5, 6: two files' contents swapped (blob ids and sizes exchanged).
    let (a, bb) = (row(5), row(6));
    let swap = "UPDATE files SET blob_id = (SELECT blob_id FROM files WHERE id = ?2), \
                size = (SELECT size FROM files WHERE id = ?2) WHERE id = ?1";
    let (blob_a, size_a): (String, i64) =
        s.db.query_row("SELECT blob_id, size FROM files WHERE id = ?1", params![a.id], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    s.db.execute(swap, params![a.id, bb.id]).unwrap();
    s.db.execute("UPDATE files SET blob_id = ?1, size = ?2 WHERE id = ?3", params![blob_a, size_a, bb.id])
        .unwrap();
    ids.push(hex(&a.id));
    ids.push(hex(&bb.id));
    // 7: the file moved to another record (r2) by the server.
    let r = row(7);
    let r2: Vec<u8> =
        s.db.query_row(
            "SELECT id FROM records WHERE vault_id = (SELECT vault_id FROM files WHERE id = ?1) \
             AND id != (SELECT record_id FROM files WHERE id = ?1) AND parent_id IS NULL",
            params![r.id],
            |x| x.get(0),
        )
        .unwrap();
    s.db.execute("UPDATE files SET record_id = ?1 WHERE id = ?2", params![r2, r.id]).unwrap();
    let moved_id = hex(&r.id);
    // 8: the file moved into another vault's record (r3).
    let r = row(8);
    let (r3, other_vault): (Vec<u8>, Vec<u8>) =
        s.db.query_row(
            "SELECT id, vault_id FROM records WHERE vault_id != (SELECT vault_id FROM files WHERE id = ?1)",
            params![r.id],
            |x| Ok((x.get(0)?, x.get(1)?)),
        )
        .unwrap();
    s.db.execute(
        "UPDATE files SET record_id = ?1, vault_id = ?2 WHERE id = ?3",
        params![r3, other_vault, r.id],
    )
    .unwrap();
    let to_vault_id = hex(&r.id);
    // 9: one bit of the sealed file name flipped; and one of a record title.
    let r = row(9);
    let mut name: Vec<u8> =
        s.db.query_row("SELECT name FROM files WHERE id = ?1", params![r.id], |x| x.get(0)).unwrap();
    name[30] ^= 0x01;
    s.db.execute("UPDATE files SET name = ?1 WHERE id = ?2", params![name, r.id]).unwrap();
    let name_id = hex(&r.id);
    let mut title: Vec<u8> =
        s.db.query_row("SELECT title FROM records WHERE id = ?1", params![r3], |x| x.get(0)).unwrap();
    title[30] ^= 0x01;
    s.db.execute("UPDATE records SET title = ?1 WHERE id = ?2", params![title, r3]).unwrap();
    let r3_id = hex(&r3);

    m.mount();
    // Content attacks: the file is still listed under its name; reads are EIO.
    for (i, attack) in attacks.iter().enumerate().take(7) {
        let path = m.path(&format!("Family/r1/{attack}.bin"));
        assert_eio(&path, attack);
        // A read of a range before the damage may succeed, but only with the
        // original bytes; it must never return altered ones.
        use std::io::Read;
        match std::fs::File::open(&path) {
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{attack}: open: {e}"),
            Ok(mut f) => {
                let mut buf = vec![0u8; 4096];
                if let Ok(n) = f.read(&mut buf) {
                    assert_eq!(&buf[..n], &plain[i][..n], "{attack}: altered bytes returned");
                }
            }
        }
    }
    // Moved to another record: the name no longer opens (it is bound to its
    // record), so the file shows as unreadable there, and reads are EIO.
    assert!(!m.path("Family/r1/to_record.bin").exists());
    assert_eio(&entry(&m.path("Family/r2"), "UNREADABLE file"), "to_record");
    assert!(!m.path("Family/r1/to_vault.bin").exists());
    // The other vault's record lost its title too: it is itself unreadable.
    let other = m.path("Other");
    let bad_record = entry(&other, "UNREADABLE record");
    assert_eq!(std::fs::read_dir(&bad_record).unwrap_err().raw_os_error(), Some(libc::EIO));
    assert!(!m.path("Family/r1/name.bin").exists());
    assert_eio(&entry(&m.path("Family/r1"), "UNREADABLE file"), "name");

    for id in ids.iter().chain([&moved_id, &to_vault_id, &name_id, &r3_id]) {
        assert!(logged(&m, id), "no log line names {id}:\n{}", m.log());
    }
}

#[test]
fn a_replayed_older_version_is_refused_within_a_session() {
    let mut m = TestMount::start();
    std::fs::create_dir(m.path("Family/r")).unwrap();
    let path = m.path("Family/r/doc.bin");
    let v1 = content(200_000, 1);
    std::fs::write(&path, &v1).unwrap();
    let s = Storage::open(&m.server.data_dir);
    let old = s.by_size(cipher_len(v1.len() as u64));
    let old_blob = std::fs::read(&old.blob).unwrap();
    let v2 = content(200_000, 2);
    std::fs::write(&path, &v2).unwrap();
    // The mount has seen version 2; a fresh session reads it.
    m.unmount();
    m.mount();
    assert!(std::fs::read(&path).unwrap() == v2);
    // The server puts the old, authentic ciphertext back as "new" content.
    let current = s.by_size(cipher_len(v2.len() as u64));
    std::fs::write(&current.blob, &old_blob).unwrap();
    s.bump(&current);
    // The mount learns of the "new" version when it next asks: while its
    // change feed is live, when the server's wait next ends (this write went
    // around the server, so nothing woke it: at most 15 s). Until then reads
    // return version 2, which it holds; never the replayed version 1.
    let start = std::time::Instant::now();
    loop {
        match std::fs::read(&path) {
            Ok(data) => {
                assert!(data == v2, "the replayed version 1 was served");
                assert!(start.elapsed() < std::time::Duration::from_secs(30), "the replay was never noticed");
                std::thread::sleep(std::time::Duration::from_millis(250));
            }
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::EIO), "replay: {e}");
                break;
            }
        }
    }
    assert!(logged(&m, &hex(&current.id)), "{}", m.log());
}

/// Whether the daemon's log names `needle`, waiting up to 5 s: its stderr is
/// collected by another thread, so a line can arrive just after the failing read.
fn logged(m: &TestMount, needle: &str) -> bool {
    let start = std::time::Instant::now();
    while start.elapsed() < std::time::Duration::from_secs(5) {
        if m.log().contains(needle) {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    false
}
