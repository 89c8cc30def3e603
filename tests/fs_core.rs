//! The filesystem core without FUSE, against the in-memory server: the tree,
//! file I/O with encryption, renames, conflicts, outages, and a reference model.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::sync::Arc;

use proptest::prelude::*;
use vaultfs::crypto::{KdfParams, VaultKey};
use vaultfs::fs::core::{Kind, ReadFrom, XATTR_E2E, XATTR_STATE, XATTR_VERSION};
use vaultfs::fs::{FsError, FsOptions, VaultFs, ROOT};
use vaultfs::protocol::Limits;
use vaultfs::remote::account::Unlocked;
use vaultfs::remote::faulty::{FaultyRemote, Outage};
use vaultfs::remote::memory::{MemoryRemote, MemoryServer};
use vaultfs::remote::Remote as _;

const FAST: KdfParams = KdfParams { m_cost_kib: 64, t_cost: 1, p_cost: 1 };

struct Setup {
    server: MemoryServer,
    alice: MemoryRemote,
}

async fn setup(vaults: &[&str]) -> Setup {
    let server = MemoryServer::new().unwrap();
    let alice = server
        .add_user("alice", Limits { upload_limit: 10_000_000, e2e_limit: 5_000_000, image_max_edge: 2560 })
        .await
        .unwrap();
    let mut u = Unlocked::create_wallet(alice.clone(), b"pw", FAST).await.unwrap();
    for v in vaults {
        u.create_vault(v, false).await.unwrap();
    }
    Setup { server, alice }
}

/// Options for mounts that must see another mount's change on their next
/// open: the server is asked every time (the default trusts its answer for a
/// second; `an_open_soon_after_the_server_confirmed_...` tests that).
fn strict() -> FsOptions {
    FsOptions { confirmed_for: std::time::Duration::ZERO, policy: test_policy(), ..FsOptions::default() }
}

/// The policy of these tests: files above 5 MB pass through (the server's
/// e2e limit in `setup` says the same, and decides nothing), and images are
/// reduced.
fn test_policy() -> vaultfs::policy::Policy {
    let text = "[defaults]\ne2e_limit = 5000000\n[defaults.images]\nreduce = true\n";
    vaultfs::policy::Policy {
        admin: vaultfs::policy::PolicyFile::parse(std::path::Path::new("test-policy.toml"), text).unwrap(),
        user: vaultfs::policy::PolicyFile::default(),
    }
}

async fn mount(remote: MemoryRemote) -> Arc<VaultFs<MemoryRemote>> {
    let account = Unlocked::open(remote, b"pw").await.unwrap();
    Arc::new(VaultFs::new(account, strict()).await.unwrap())
}

async fn mount_faulty(remote: MemoryRemote) -> (Arc<VaultFs<FaultyRemote<MemoryRemote>>>, Outage) {
    mount_faulty_with(remote, strict()).await
}

async fn mount_faulty_with(
    remote: MemoryRemote,
    options: FsOptions,
) -> (Arc<VaultFs<FaultyRemote<MemoryRemote>>>, Outage) {
    let (faulty, outage) = FaultyRemote::new(remote);
    let account = Unlocked::open(faulty, b"pw").await.unwrap();
    (Arc::new(VaultFs::new(account, options).await.unwrap()), outage)
}

fn n(s: &str) -> &OsStr {
    OsStr::new(s)
}

async fn write_file<R: vaultfs::remote::Remote>(
    fs: &Arc<VaultFs<R>>,
    dir: u64,
    name: &str,
    data: &[u8],
) -> u64 {
    let (attr, fh) = fs.create(dir, n(name), 0o644).await.unwrap();
    fs.write(fh, 0, data).await.unwrap();
    fs.fsync(attr.ino, fh).await.unwrap();
    fs.release(attr.ino, fh).await.unwrap();
    attr.ino
}

async fn read_file<R: vaultfs::remote::Remote>(
    fs: &Arc<VaultFs<R>>,
    dir: u64,
    name: &str,
) -> Result<Vec<u8>, FsError> {
    let attr = fs.lookup(dir, n(name)).await?;
    let fh = fs.open(attr.ino, false, false).await?;
    let data = fs.read(fh, 0, u32::MAX).await.map(|d| d.to_vec());
    fs.release(attr.ino, fh).await?;
    data
}

/// What a fresh mount reads at `vault/record/file`: what the server holds.
async fn read_on_server(remote: &MemoryRemote, [vault, record, file]: [&str; 3]) -> Vec<u8> {
    let other = mount(remote.clone()).await;
    let v = other.lookup(ROOT, n(vault)).await.unwrap();
    let r = other.lookup(v.ino, n(record)).await.unwrap();
    read_file(&other, r.ino, file).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vaults_records_and_files_make_a_tree() {
    let s = setup(&["Family", "Work"]).await;
    let fs = mount(s.alice.clone()).await;
    let top: Vec<OsString> = fs.readdir(ROOT).await.unwrap().into_iter().map(|(_, _, name)| name).collect();
    assert_eq!(top, ["Family", "Work"]);
    let family = fs.lookup(ROOT, n("Family")).await.unwrap();
    assert_eq!(family.kind, Kind::Dir);

    // Files need a record; records nest.
    assert!(matches!(fs.create(family.ino, n("loose.txt"), 0o644).await, Err(FsError::NotPermitted(_))));
    let taxes = fs.mkdir(family.ino, n("Taxes")).await.unwrap();
    let y2026 = fs.mkdir(taxes.ino, n("2026")).await.unwrap();
    assert!(matches!(fs.mkdir(taxes.ino, n("2026")).await, Err(FsError::Exists)));
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let f = write_file(&fs, y2026.ino, "return.pdf", &data).await;
    assert_eq!(fs.getattr(f).unwrap().size, 200_000);
    assert_eq!(read_file(&fs, y2026.ino, "return.pdf").await.unwrap(), data);

    // A second mount (new session, empty cache) sees the same tree and decrypts.
    let fs2 = mount(s.alice.clone()).await;
    let fam2 = fs2.lookup(ROOT, n("Family")).await.unwrap();
    let tax2 = fs2.lookup(fam2.ino, n("Taxes")).await.unwrap();
    let y2 = fs2.lookup(tax2.ino, n("2026")).await.unwrap();
    let attr = fs2.lookup(y2.ino, n("return.pdf")).await.unwrap();
    assert_eq!(attr.size, 200_000, "stat shows the plaintext size");
    assert_eq!(read_file(&fs2, y2.ino, "return.pdf").await.unwrap(), data);

    // The kernel may keep its cached pages while the content is unchanged, and
    // must drop them once another client changed the file.
    let (fh, keep) = fs2.open_keeping_cache(attr.ino, false, false).await.unwrap();
    assert!(keep);
    fs2.release(attr.ino, fh).await.unwrap();
    let a1 = fs.lookup(y2026.ino, n("return.pdf")).await.unwrap();
    let fh = fs.open(a1.ino, false, true).await.unwrap();
    fs.write(fh, 0, b"changed").await.unwrap();
    fs.fsync(a1.ino, fh).await.unwrap();
    fs.release(a1.ino, fh).await.unwrap();
    let (fh, keep) = fs2.open_keeping_cache(attr.ino, false, false).await.unwrap();
    assert!(!keep, "stale pages must be dropped");
    assert_eq!(&fs2.read(fh, 0, 7).await.unwrap(), b"changed");
    fs2.release(attr.ino, fh).await.unwrap();

    // Extended attributes.
    assert_eq!(fs2.getxattr(attr.ino, n(XATTR_E2E)).unwrap(), b"1");
    assert_eq!(fs2.getxattr(attr.ino, n(XATTR_STATE)).unwrap(), b"clean");
    assert_eq!(fs2.getxattr(attr.ino, n(XATTR_VERSION)).unwrap(), b"3");
    assert!(matches!(fs2.getxattr(attr.ino, n("user.other")), Err(FsError::NoAttr)));
    assert_eq!(fs2.listxattr(attr.ino).unwrap().len(), 4);

    // rmdir: only empty records; vaults are not removed through the mount.
    assert!(matches!(fs.rmdir(family.ino, n("Taxes")).await, Err(FsError::NotEmpty)));
    fs.unlink(y2026.ino, n("return.pdf")).await.unwrap();
    assert!(matches!(fs.lookup(y2026.ino, n("return.pdf")).await, Err(FsError::NotFound)));
    let _ = data;
    fs.rmdir(taxes.ino, n("2026")).await.unwrap();
    fs.rmdir(family.ino, n("Taxes")).await.unwrap();
    assert!(matches!(fs.rmdir(ROOT, n("Family")).await, Err(FsError::NotPermitted(_))));
    assert!(fs.readdir(family.ino).await.unwrap().is_empty());
}

/// Modes and links in the core: chmod on a file seals a new manifest (a newer
/// generation, the content untouched and still readable), on a directory is
/// accepted and changes nothing; links keep their target across a mount.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modes_are_stored_and_links_keep_their_targets() {
    let s = setup(&["V"]).await;
    let fs = mount(s.alice.clone()).await;
    let v = fs.lookup(ROOT, n("V")).await.unwrap();
    let r = fs.mkdir(v.ino, n("r")).await.unwrap();
    let (a, fh) = fs.create(r.ino, n("run.sh"), 0o600).await.unwrap();
    assert_eq!(a.perm, 0o600);
    fs.write(fh, 0, b"#!/bin/sh").await.unwrap();
    fs.release(a.ino, fh).await.unwrap();
    assert_eq!(fs.chmod(a.ino, 0o755).await.unwrap().perm, 0o755);
    assert_eq!(fs.chmod(r.ino, 0o700).await.unwrap().perm, r.perm, "a directory keeps its mode");
    let l = fs.symlink(r.ino, n("link"), b"run.sh").await.unwrap();
    assert_eq!((l.kind, l.size), (vaultfs::fs::core::Kind::Symlink, 6));
    assert_eq!(errno(fs.symlink(r.ino, n("link"), b"x").await), libc::EEXIST);
    assert_eq!(errno(fs.symlink(r.ino, n("empty"), b"").await), libc::ENOENT);
    assert_eq!(fs.readlink(a.ino).unwrap_err().errno(), libc::EINVAL);

    let fs2 = mount(s.alice.clone()).await;
    let v2 = fs2.lookup(ROOT, n("V")).await.unwrap();
    let r2 = fs2.lookup(v2.ino, n("r")).await.unwrap();
    let a2 = fs2.lookup(r2.ino, n("run.sh")).await.unwrap();
    assert_eq!(a2.perm, 0o755, "the mode is stored");
    assert_eq!(read_file(&fs2, r2.ino, "run.sh").await.unwrap(), b"#!/bin/sh", "the content is untouched");
    let l2 = fs2.lookup(r2.ino, n("link")).await.unwrap();
    assert_eq!(fs2.readlink(l2.ino).unwrap(), b"run.sh");
    // A write after the chmod keeps the mode.
    let fh = fs2.open(a2.ino, true, true).await.unwrap();
    fs2.write(fh, 0, b"#!/bin/sh\necho 2").await.unwrap();
    fs2.release(a2.ino, fh).await.unwrap();
    let a3 = mount(s.alice.clone()).await;
    let v3 = a3.lookup(ROOT, n("V")).await.unwrap();
    let r3 = a3.lookup(v3.ino, n("r")).await.unwrap();
    assert_eq!(a3.lookup(r3.ino, n("run.sh")).await.unwrap().perm, 0o755);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_at_offsets_truncation_and_reopen() {
    let s = setup(&["V"]).await;
    let fs = mount(s.alice.clone()).await;
    let v = fs.lookup(ROOT, n("V")).await.unwrap();
    let r = fs.mkdir(v.ino, n("r")).await.unwrap();
    let (attr, fh) = fs.create(r.ino, n("f"), 0o644).await.unwrap();
    fs.write(fh, 10, b"world").await.unwrap();
    fs.write(fh, 0, b"hello").await.unwrap();
    assert_eq!(fs.read(fh, 0, 100).await.unwrap(), b"hello\0\0\0\0\0world");
    assert_eq!(fs.getxattr(attr.ino, n(XATTR_STATE)).unwrap(), b"dirty");
    fs.fsync(attr.ino, fh).await.unwrap();
    fs.release(attr.ino, fh).await.unwrap();

    // O_TRUNC, then append-like writes.
    let fh = fs.open(attr.ino, true, true).await.unwrap();
    assert_eq!(fs.getattr(attr.ino).unwrap().size, 0);
    fs.write(fh, 0, b"abc").await.unwrap();
    fs.write(fh, 3, b"def").await.unwrap();
    fs.fsync(attr.ino, fh).await.unwrap();
    fs.release(attr.ino, fh).await.unwrap();
    // truncate(2) without an open handle is stored at once.
    fs.setattr(attr.ino, Some(2), None).await.unwrap();
    let fs2 = mount(s.alice.clone()).await;
    let v2 = fs2.lookup(ROOT, n("V")).await.unwrap();
    let r2 = fs2.lookup(v2.ino, n("r")).await.unwrap();
    assert_eq!(read_file(&fs2, r2.ino, "f").await.unwrap(), b"ab");
    // Extending with truncate fills zeros; mtime can be set.
    let when = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
    let a = fs.setattr(attr.ino, Some(5), Some(when)).await.unwrap();
    assert_eq!((a.size, a.mtime), (5, when));
    assert_eq!(read_file(&fs, r.ino, "f").await.unwrap(), b"ab\0\0\0");

    // cp -a: write, set the time on the open file, close. The stored file
    // keeps that time (not the time of the upload), seen from another mount.
    let (g, fh) = fs.create(r.ino, n("copied"), 0o644).await.unwrap();
    fs.write(fh, 0, b"data").await.unwrap();
    let old = std::time::UNIX_EPOCH + std::time::Duration::from_secs(981_173_106);
    assert_eq!(fs.setattr(g.ino, None, Some(old)).await.unwrap().mtime, old);
    fs.fsync(g.ino, fh).await.unwrap();
    fs.release(g.ino, fh).await.unwrap();
    assert_eq!(fs.getattr(g.ino).unwrap().mtime, old);
    let fs3 = mount(s.alice.clone()).await;
    let r3 = fs3.lookup(fs3.lookup(ROOT, n("V")).await.unwrap().ino, n("r")).await.unwrap();
    assert_eq!(fs3.lookup(r3.ino, n("copied")).await.unwrap().mtime, old);
    // A write after the time was set makes the file newer again.
    let fh = fs.open(g.ino, false, true).await.unwrap();
    fs.setattr(g.ino, None, Some(old)).await.unwrap();
    fs.write(fh, 4, b"more").await.unwrap();
    fs.fsync(g.ino, fh).await.unwrap();
    fs.release(g.ino, fh).await.unwrap();
    let newer = fs.getattr(g.ino).unwrap().mtime;
    assert!(newer > old + std::time::Duration::from_secs(86_400 * 365), "{newer:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renames_moves_and_the_editor_save_pattern() {
    let s = setup(&["A", "B"]).await;
    let fs = mount(s.alice.clone()).await;
    let a = fs.lookup(ROOT, n("A")).await.unwrap();
    let b = fs.lookup(ROOT, n("B")).await.unwrap();
    let r1 = fs.mkdir(a.ino, n("r1")).await.unwrap();
    let r2 = fs.mkdir(a.ino, n("r2")).await.unwrap();
    let rb = fs.mkdir(b.ino, n("rb")).await.unwrap();
    write_file(&fs, r1.ino, "doc.txt", b"version 1").await;

    // Rename in place, then move to another record of the same vault.
    fs.rename(r1.ino, n("doc.txt"), r1.ino, n("renamed.txt")).await.unwrap();
    assert_eq!(read_file(&fs, r1.ino, "renamed.txt").await.unwrap(), b"version 1");
    let before = fs.lookup(r1.ino, n("renamed.txt")).await.unwrap().ino;
    fs.rename(r1.ino, n("renamed.txt"), r2.ino, n("moved.txt")).await.unwrap();
    assert!(matches!(fs.lookup(r1.ino, n("renamed.txt")).await, Err(FsError::NotFound)));
    // The kernel keeps the inode number of a renamed entry: it must stay valid.
    assert_eq!(fs.lookup(r2.ino, n("moved.txt")).await.unwrap().ino, before);
    assert_eq!(fs.getattr(before).unwrap().size, 9);
    let fh = fs.open(before, false, false).await.unwrap();
    assert_eq!(fs.read(fh, 0, 100).await.unwrap(), b"version 1");
    fs.release(before, fh).await.unwrap();
    assert_eq!(read_file(&fs, r2.ino, "moved.txt").await.unwrap(), b"version 1");
    // Across vaults: EXDEV, so mv copies instead.
    assert_eq!(fs.rename(r2.ino, n("moved.txt"), rb.ino, n("x")).await.unwrap_err().errno(), libc::EXDEV);

    // Editors: write a temp file, fsync, rename over the original.
    write_file(&fs, r2.ino, ".moved.txt.swp", b"version 2").await;
    fs.rename(r2.ino, n(".moved.txt.swp"), r2.ino, n("moved.txt")).await.unwrap();
    assert_eq!(read_file(&fs, r2.ino, "moved.txt").await.unwrap(), b"version 2");
    let names: Vec<OsString> = fs.readdir(r2.ino).await.unwrap().into_iter().map(|e| e.2).collect();
    assert_eq!(names, ["moved.txt"]);

    // Records move and rename too; a fresh mount agrees.
    fs.rename(a.ino, n("r2"), r1.ino, n("inner")).await.unwrap();
    let fs2 = mount(s.alice.clone()).await;
    let a2 = fs2.lookup(ROOT, n("A")).await.unwrap();
    let r1b = fs2.lookup(a2.ino, n("r1")).await.unwrap();
    let inner = fs2.lookup(r1b.ino, n("inner")).await.unwrap();
    assert_eq!(read_file(&fs2, inner.ino, "moved.txt").await.unwrap(), b"version 2");
    assert!(matches!(fs2.lookup(a2.ino, n("r2")).await, Err(FsError::NotFound)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncating_a_file_this_mount_never_opened_empties_it_on_the_server() {
    let s = setup(&["V"]).await;
    let fs1 = mount(s.alice.clone()).await;
    let v1 = fs1.lookup(ROOT, n("V")).await.unwrap();
    let r1 = fs1.mkdir(v1.ino, n("r")).await.unwrap();
    write_file(&fs1, r1.ino, "big.txt", b"some content").await;
    // Another mount truncates it without opening it (truncate(2)): its
    // cache has no loaded copy, and the emptying must still be stored.
    let fs2 = mount(s.alice.clone()).await;
    let v2 = fs2.lookup(ROOT, n("V")).await.unwrap();
    let r2 = fs2.lookup(v2.ino, n("r")).await.unwrap();
    let a2 = fs2.lookup(r2.ino, n("big.txt")).await.unwrap();
    assert_eq!(fs2.setattr(a2.ino, Some(0), None).await.unwrap().size, 0);
    let fs3 = mount(s.alice.clone()).await;
    let v3 = fs3.lookup(ROOT, n("V")).await.unwrap();
    let r3 = fs3.lookup(v3.ino, n("r")).await.unwrap();
    assert_eq!(read_file(&fs3, r3.ino, "big.txt").await.unwrap(), b"");
    drop(s.server);
}

/// A vault created by another client of the same user (the CLI) while the
/// mount runs: the mount reads the changed wallet at its next listing, so
/// the vault opens there instead of showing as unreadable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vault_created_by_another_client_opens_in_a_running_mount() {
    let s = setup(&["V"]).await;
    let fs = mount(s.alice.clone()).await;
    fs.lookup(ROOT, n("V")).await.unwrap();
    let mut cli = Unlocked::open(s.alice.clone(), b"pw").await.unwrap();
    cli.create_vault("Later", false).await.unwrap();
    tokio::time::sleep(vaultfs::fs::core::LISTING_TTL + std::time::Duration::from_millis(100)).await;
    let later = fs.lookup(ROOT, n("Later")).await.expect("the new vault is listed under its name");
    let r = fs.mkdir(later.ino, n("r")).await.unwrap();
    write_file(&fs, r.ino, "a.txt", b"written by the running mount").await;
    let fs2 = mount(s.alice.clone()).await;
    let later2 = fs2.lookup(ROOT, n("Later")).await.unwrap();
    let r2 = fs2.lookup(later2.ino, n("r")).await.unwrap();
    assert_eq!(read_file(&fs2, r2.ino, "a.txt").await.unwrap(), b"written by the running mount");
}

/// Alice shares vault "V" with bob, then removes him (the key rotates):
/// her CLI session, the vault, and the key from before.
async fn share_and_remove_bob(s: &Setup) -> (Unlocked<MemoryRemote>, vaultfs::protocol::VaultInfo, VaultKey) {
    let mut cli = Unlocked::open(s.alice.clone(), b"pw").await.unwrap();
    cli.ensure_user_key().await.unwrap();
    let bob_remote = s.server.add_user("bob", Limits::DEFAULT).await.unwrap();
    let mut bob = Unlocked::create_wallet(bob_remote, b"pw", FAST).await.unwrap();
    bob.ensure_user_key().await.unwrap();
    let vault =
        cli.vaults().await.unwrap().into_iter().find(|x| x.name.as_deref() == Some("V")).unwrap().info;
    let (key, _) = cli.colleague_key("bob").await.unwrap();
    cli.pin("bob", key.fingerprint()).unwrap();
    cli.share_vault(&vault, "bob", vaultfs::protocol::Rights::Read, &key).await.unwrap();
    let old = cli.active_key(vault.id).unwrap();
    cli.unshare(&vault, "bob").await.unwrap();
    (cli, vault, old)
}

/// After a member's removal rotated the key, `rekey` seals the vault's old
/// content afresh: the old key opens none of it (handed the stored bytes
/// directly), mounts read it as before, and a second run finds nothing to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rekey_after_a_removal_leaves_nothing_under_the_old_key() {
    let s = setup(&["V"]).await;
    let fs = mount(s.alice.clone()).await;
    let v = fs.lookup(ROOT, n("V")).await.unwrap();
    let r = fs.mkdir(v.ino, n("r")).await.unwrap();
    write_file(&fs, r.ino, "a.txt", b"sealed before the removal").await;
    write_file(&fs, r.ino, "empty", b"").await;
    let (cli, vault, old) = share_and_remove_bob(&s).await;
    assert_eq!(cli.files_under_older_keys(vault.id).await.unwrap(), (2, 2));

    let mut seen = Vec::new();
    let done = cli.rekey_vault(vault.id, |k, total| seen.push((k, total))).await.unwrap();
    assert_eq!((done.reencrypted, done.resealed, done.records, done.skipped.len()), (2, 0, 1, 0), "{done:?}");
    assert_eq!(seen, vec![(1, 2), (2, 2)]);
    assert_eq!(cli.files_under_older_keys(vault.id).await.unwrap(), (0, 2));
    // The stored bytes do not open with the old key.
    for a in s.alice.files(vault.id).await.unwrap() {
        let stored =
            vaultfs::remote::collect(s.alice.download(a.id, None).await.unwrap().stream).await.unwrap();
        let ctx = vaultfs::crypto::FileContext { vault: vault.id, record: a.record, file: a.id };
        assert!(vaultfs::crypto::decrypt_file(&stored, &old, &ctx, 0).is_err(), "{} bytes", stored.len());
    }
    // Mounts read it as before: the running one (after reading the changed
    // wallet) and a new one.
    tokio::time::sleep(vaultfs::fs::core::LISTING_TTL + std::time::Duration::from_millis(100)).await;
    fs.lookup(ROOT, n("V")).await.unwrap();
    assert_eq!(read_file(&fs, r.ino, "a.txt").await.unwrap(), b"sealed before the removal");
    let fs2 = mount(s.alice.clone()).await;
    let v2 = fs2.lookup(ROOT, n("V")).await.unwrap();
    let r2 = fs2.lookup(v2.ino, n("r")).await.unwrap();
    assert_eq!(read_file(&fs2, r2.ino, "a.txt").await.unwrap(), b"sealed before the removal");
    assert_eq!(read_file(&fs2, r2.ino, "empty").await.unwrap(), b"");
    // Resumable: a second run finds everything current.
    let again = cli.rekey_vault(vault.id, |_, _| {}).await.unwrap();
    assert_eq!((again.reencrypted, again.resealed, again.records, again.current), (0, 0, 0, 2));
}

/// A rekey seals what the server serves at a new generation: a file whose
/// manifest (and content) the server rolled back below what this machine saw
/// is left alone, not made current again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rekey_leaves_a_replayed_file_alone() {
    let s = setup(&["V"]).await;
    let fs = mount(s.alice.clone()).await;
    let v = fs.lookup(ROOT, n("V")).await.unwrap();
    let r = fs.mkdir(v.ino, n("r")).await.unwrap();
    let ino = write_file(&fs, r.ino, "a.txt", b"first").await;
    let (cli, vault, _) = share_and_remove_bob(&s).await;
    let then = s.alice.files(vault.id).await.unwrap().remove(0);
    let then_blob =
        vaultfs::remote::collect(s.alice.download(then.id, None).await.unwrap().stream).await.unwrap();
    let fh = fs.open(ino, true, true).await.unwrap();
    fs.write(fh, 0, b"second").await.unwrap();
    fs.fsync(ino, fh).await.unwrap();
    fs.release(ino, fh).await.unwrap();
    // The server serves the first version again.
    let now = s.alice.file(then.id).await.unwrap();
    let body = vaultfs::remote::UploadBody::from_bytes(then_blob).with_meta(then.meta.clone());
    s.alice.upload(then.id, now.version, true, None, body).await.unwrap();

    let freshness = Arc::clone(fs.freshness());
    let seen = move |id| freshness.generation(id);
    let generations = vaultfs::remote::rekey::Generations { seen: &seen, wrote: &|_, _| {} };
    let done = cli.rekey_vault_checked(vault.id, &generations, |_, _| {}).await.unwrap();
    assert_eq!((done.reencrypted, done.skipped.len()), (0, 1), "{done:?}");
    assert!(done.skipped[0].contains("older than a version this machine saw"), "{done:?}");
}

/// A rekey of a vault with many files, stopped partway (its future dropped,
/// as Ctrl-C does) and run again: the second run takes up the rest, skips what
/// the first finished, and every file reads back as written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_rekey_resumes_where_it_stopped() {
    const FILES: usize = 24;
    let s = setup(&["V"]).await;
    let fs = mount(s.alice.clone()).await;
    let v = fs.lookup(ROOT, n("V")).await.unwrap();
    let r = fs.mkdir(v.ino, n("r")).await.unwrap();
    for i in 0..FILES {
        write_file(&fs, r.ino, &format!("f{i}"), format!("content {i}").repeat(100).as_bytes()).await;
    }
    let (cli, vault, _) = share_and_remove_bob(&s).await;
    assert_eq!(cli.files_under_older_keys(vault.id).await.unwrap(), (FILES, FILES));

    // Stopped once a third of the files are done: the next upload is held
    // (against the in-memory server, a run could otherwise get through every
    // file in the one poll that saw the third).
    let (faulty, outage) = FaultyRemote::new(s.alice.clone());
    let stopping = Unlocked::open(faulty, b"pw").await.unwrap();
    let stop = tokio::sync::Notify::new();
    let run = stopping.rekey_vault(vault.id, |done, _| {
        if done == FILES / 3 {
            outage.hold_uploads(true);
            stop.notify_one();
        }
    });
    tokio::select! {
        biased;
        () = stop.notified() => {}
        r = run => panic!("the rekey should have been stopped: {r:?}"),
    }
    outage.hold_uploads(false);
    let (older, all) = cli.files_under_older_keys(vault.id).await.unwrap();
    assert_eq!((older, all), (FILES - FILES / 3, FILES), "still under the old key");

    let done = cli.rekey_vault(vault.id, |_, _| {}).await.unwrap();
    assert_eq!((done.reencrypted, done.resealed), (older, 0), "{done:?}");
    assert_eq!(done.current, FILES - older, "{done:?}");
    assert!(done.skipped.is_empty(), "{done:?}");
    assert_eq!(cli.files_under_older_keys(vault.id).await.unwrap(), (0, FILES));
    let fs2 = mount(s.alice.clone()).await;
    let v2 = fs2.lookup(ROOT, n("V")).await.unwrap();
    let r2 = fs2.lookup(v2.ino, n("r")).await.unwrap();
    for i in 0..FILES {
        let back = read_file(&fs2, r2.ino, &format!("f{i}")).await.unwrap();
        assert_eq!(back, format!("content {i}").repeat(100).as_bytes(), "f{i}");
    }
}

/// A vault whose change number has not moved since it was listed is not
/// listed again: after the listing's reuse time, a lookup asks for the vault
/// list only. Another client's change moves the number, and the next lookup
/// fetches the vault's changes and finds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unchanged_vault_is_not_listed_again() {
    let s = setup(&["V"]).await;
    let (fs, outage) = mount_faulty(s.alice.clone()).await;
    let v = fs.lookup(ROOT, n("V")).await.unwrap();
    let r = fs.mkdir(v.ino, n("r")).await.unwrap();
    write_file(&fs, r.ino, "a.txt", b"a").await;
    let wait = || tokio::time::sleep(vaultfs::fs::core::LISTING_TTL + std::time::Duration::from_millis(100));
    wait().await;
    fs.lookup(r.ino, n("a.txt")).await.unwrap();
    let listed = outage.listings();
    for _ in 0..2 {
        wait().await;
        fs.lookup(r.ino, n("a.txt")).await.unwrap();
        assert_eq!(fs.readdir(r.ino).await.unwrap().len(), 1);
        assert_eq!(outage.listings(), listed, "nothing changed: not listed again");
    }
    let other = mount(s.alice.clone()).await;
    let v2 = other.lookup(ROOT, n("V")).await.unwrap();
    let r2 = other.lookup(v2.ino, n("r")).await.unwrap();
    write_file(&other, r2.ino, "b.txt", b"b").await;
    wait().await;
    assert_eq!(read_file(&fs, r.ino, "b.txt").await.unwrap(), b"b");
    assert!(outage.feeds() > 0, "changed: its changes were fetched");
}

/// A vault that changed since it was listed is brought up to date from its
/// changes, not listed whole again: another client's new file, rename,
/// delete, new directory and file in it all show, and the mount's own
/// changes (already in its tree) cost a page of changes too, not a listing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_vault_follows_its_changes_instead_of_listing_again() {
    let s = setup(&["V"]).await;
    let (fs, outage) = mount_faulty(s.alice.clone()).await;
    let v = fs.lookup(ROOT, n("V")).await.unwrap();
    let r = fs.mkdir(v.ino, n("r")).await.unwrap();
    let wait = || tokio::time::sleep(vaultfs::fs::core::LISTING_TTL + std::time::Duration::from_millis(100));
    wait().await;
    fs.lookup(r.ino, n("x")).await.unwrap_err();
    let listed = outage.listings();
    write_file(&fs, r.ino, "a.txt", b"a").await;
    write_file(&fs, r.ino, "b.txt", b"b").await;
    wait().await;
    assert_eq!(read_file(&fs, r.ino, "a.txt").await.unwrap(), b"a");

    let other = mount(s.alice.clone()).await;
    let v2 = other.lookup(ROOT, n("V")).await.unwrap();
    let r2 = other.lookup(v2.ino, n("r")).await.unwrap();
    write_file(&other, r2.ino, "c.txt", b"from the other client").await;
    other.rename(r2.ino, n("a.txt"), r2.ino, n("a2.txt")).await.unwrap();
    other.unlink(r2.ino, n("b.txt")).await.unwrap();
    let d = other.mkdir(v2.ino, n("d")).await.unwrap();
    write_file(&other, d.ino, "e.txt", b"e").await;
    wait().await;
    let mut names: Vec<_> = fs.readdir(r.ino).await.unwrap().into_iter().map(|(_, _, name)| name).collect();
    names.sort();
    assert_eq!(names, ["a2.txt", "c.txt"]);
    assert_eq!(read_file(&fs, r.ino, "c.txt").await.unwrap(), b"from the other client");
    assert_eq!(read_file(&fs, r.ino, "a2.txt").await.unwrap(), b"a");
    let d1 = fs.lookup(v.ino, n("d")).await.unwrap();
    assert_eq!(read_file(&fs, d1.ino, "e.txt").await.unwrap(), b"e");
    assert_eq!(outage.listings(), listed, "followed the changes, never listed whole");
    assert!(outage.feeds() >= 2, "{}", outage.feeds());
}

/// Bob's share of a rotated key is withheld by the server: once his mount
/// sees the vault use the key he was not given, it seals nothing in it (new
/// files and saves get EACCES; a save's data stays in memory and is retried),
/// and the retried save goes through under the new key once the share
/// arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mount_seals_nothing_while_the_vault_uses_a_key_it_was_not_given() {
    use vaultfs::protocol::{Member, Rights};
    let s = setup(&["V"]).await;
    let fs = mount(s.alice.clone()).await;
    let v = fs.lookup(ROOT, n("V")).await.unwrap();
    let r = fs.mkdir(v.ino, n("r")).await.unwrap();
    write_file(&fs, r.ino, "a.txt", b"before").await;
    let mut cli = Unlocked::open(s.alice.clone(), b"pw").await.unwrap();
    let alice_key = cli.ensure_user_key().await.unwrap();
    let vault = cli.vaults().await.unwrap().remove(0).info;
    let mut remotes = Vec::new();
    for name in ["bob", "carol"] {
        let remote = s.server.add_user(name, Limits::DEFAULT).await.unwrap();
        let mut u = Unlocked::create_wallet(remote.clone(), b"pw", FAST).await.unwrap();
        let key = u.ensure_user_key().await.unwrap();
        cli.pin(name, key.fingerprint()).unwrap();
        cli.share_vault(&vault, name, Rights::Write, &key).await.unwrap();
        remotes.push(remote);
    }
    let bob = Unlocked::open(remotes[0].clone(), b"pw").await.unwrap();
    bob.pin("alice", alice_key.fingerprint()).unwrap();
    let bob = Arc::new(VaultFs::new(bob, strict()).await.unwrap());
    let bv = bob.lookup(ROOT, n("V")).await.unwrap();
    let br = bob.lookup(bv.ino, n("r")).await.unwrap();
    assert_eq!(read_file(&bob, br.ino, "a.txt").await.unwrap(), b"before");

    let bobs_share = |members: Vec<Member>| members.into_iter().find(|m| m.user == "bob").unwrap();
    let withheld = bobs_share(s.alice.members(vault.id).await.unwrap());
    cli.unshare(&vault, "carol").await.unwrap();
    let new_key = cli.active_key(vault.id).unwrap().id();
    let real = bobs_share(s.alice.members(vault.id).await.unwrap());
    s.alice.set_member(vault.id, withheld).await.unwrap();
    let a_id = s.alice.files(vault.id).await.unwrap()[0].id;
    // Alice's new mount seals under the new key.
    let fs2 = mount(s.alice.clone()).await;
    let v2 = fs2.lookup(ROOT, n("V")).await.unwrap();
    let r2 = fs2.lookup(v2.ino, n("r")).await.unwrap();
    write_file(&fs2, r2.ino, "b.txt", b"under the new key").await;

    tokio::time::sleep(vaultfs::fs::core::LISTING_TTL + std::time::Duration::from_millis(100)).await;
    bob.readdir(br.ino).await.unwrap();
    assert_eq!(errno(bob.create(br.ino, n("new.txt"), 0o644).await), libc::EACCES);
    assert_eq!(errno(bob.mkdir(bv.ino, n("r2")).await), libc::EACCES);
    let a = bob.lookup(br.ino, n("a.txt")).await.unwrap();
    let fh = bob.open(a.ino, true, true).await.unwrap();
    bob.write(fh, 0, b"edited by bob").await.unwrap();
    assert_eq!(errno(bob.flush(a.ino, fh).await), libc::EACCES);
    bob.release(a.ino, fh).await.unwrap();
    assert_eq!(s.alice.files(vault.id).await.unwrap().len(), 2, "nothing new on the server");
    let stored = s.alice.file(a_id).await.unwrap();
    let old_key = vaultfs::crypto::manifest::manifest_key_id(&stored.meta.0).unwrap();
    assert_ne!(old_key, new_key, "a.txt is as it was before the rotation");

    // The server hands bob his share: the retried save goes through.
    s.alice.set_member(vault.id, real).await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let now = s.alice.file(stored.id).await.unwrap();
        if now.version > stored.version {
            let id = vaultfs::crypto::manifest::manifest_key_id(&now.meta.0).unwrap();
            assert_eq!(id, new_key, "saved under the new key");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the save was not retried once the key arrived");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let fs3 = mount(s.alice.clone()).await;
    let v3 = fs3.lookup(ROOT, n("V")).await.unwrap();
    let r3 = fs3.lookup(v3.ino, n("r")).await.unwrap();
    assert_eq!(read_file(&fs3, r3.ino, "a.txt").await.unwrap(), b"edited by bob");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_mounts_editing_one_file_keep_both_versions() {
    let s = setup(&["V"]).await;
    let fs1 = mount(s.alice.clone()).await;
    let fs2 = mount(s.alice.clone()).await;
    let fs4 = mount(s.alice.clone()).await;
    let v1 = fs1.lookup(ROOT, n("V")).await.unwrap();
    let r1 = fs1.mkdir(v1.ino, n("r")).await.unwrap();
    write_file(&fs1, r1.ino, "shared.txt", b"base").await;
    let v4 = fs4.lookup(ROOT, n("V")).await.unwrap();
    let r4 = fs4.lookup(v4.ino, n("r")).await.unwrap();
    let a4 = fs4.lookup(r4.ino, n("shared.txt")).await.unwrap();
    let h4 = fs4.open(a4.ino, false, true).await.unwrap();
    fs4.write(h4, 0, b"edit from mount four").await.unwrap();

    let v2 = fs2.lookup(ROOT, n("V")).await.unwrap();
    let r2 = fs2.lookup(v2.ino, n("r")).await.unwrap();
    let a1 = fs1.lookup(r1.ino, n("shared.txt")).await.unwrap();
    let a2 = fs2.lookup(r2.ino, n("shared.txt")).await.unwrap();
    let h1 = fs1.open(a1.ino, false, true).await.unwrap();
    let h2 = fs2.open(a2.ino, false, true).await.unwrap();
    fs1.write(h1, 0, b"edit from mount one").await.unwrap();
    fs2.write(h2, 0, b"edit from mount two").await.unwrap();
    fs1.fsync(a1.ino, h1).await.unwrap();
    // The second save conflicts: it succeeds, as a conflict copy.
    fs2.fsync(a2.ino, h2).await.unwrap();
    fs1.release(a1.ino, h1).await.unwrap();
    fs2.release(a2.ino, h2).await.unwrap();
    // A third, most likely in the same second: a copy of another name.
    fs4.fsync(a4.ino, h4).await.unwrap();
    fs4.release(a4.ino, h4).await.unwrap();

    let fs3 = mount(s.alice.clone()).await;
    let v3 = fs3.lookup(ROOT, n("V")).await.unwrap();
    let r3 = fs3.lookup(v3.ino, n("r")).await.unwrap();
    let mut contents = BTreeMap::new();
    for (_, _, name) in fs3.readdir(r3.ino).await.unwrap() {
        contents.insert(name.clone(), read_file(&fs3, r3.ino, name.to_str().unwrap()).await.unwrap());
    }
    assert_eq!(contents.len(), 3, "{contents:?}");
    assert_eq!(contents[OsStr::new("shared.txt")], b"edit from mount one");
    let copies: BTreeMap<_, _> =
        contents.iter().filter(|(k, _)| k.to_str().unwrap().contains("(conflict ")).collect();
    for copy in copies.keys() {
        assert!(
            copy.to_str().unwrap().starts_with("shared (conflict ")
                && copy.to_str().unwrap().ends_with(").txt"),
            "{copy:?}"
        );
    }
    let mut kept: Vec<&[u8]> = copies.values().map(|d| d.as_slice()).collect();
    kept.sort();
    assert_eq!(kept, [&b"edit from mount four"[..], b"edit from mount two"]);
    drop(s.server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_upload_keeps_the_data_and_is_retried() {
    let s = setup(&["V"]).await;
    let (fs, outage) = mount_faulty(s.alice.clone()).await;
    let v = fs.lookup(ROOT, n("V")).await.unwrap();
    let r = fs.mkdir(v.ino, n("r")).await.unwrap();
    let (attr, fh) = fs.create(r.ino, n("precious.txt"), 0o644).await.unwrap();
    fs.write(fh, 0, b"do not lose me").await.unwrap();
    outage.set(true);
    let err = fs.fsync(attr.ino, fh).await.unwrap_err();
    assert_eq!(err.errno(), libc::EIO, "{err}");
    assert_eq!(fs.getxattr(attr.ino, n(XATTR_STATE)).unwrap(), b"dirty");
    // Closing with unsaved data starts background retries.
    fs.release(attr.ino, fh).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    outage.set(false);
    let stored = async {
        loop {
            if fs.getxattr(attr.ino, n(XATTR_STATE)).unwrap() == b"clean" {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), stored)
        .await
        .expect("retry must store the data");
    let other = mount(s.alice.clone()).await;
    let v2 = other.lookup(ROOT, n("V")).await.unwrap();
    let r2 = other.lookup(v2.ino, n("r")).await.unwrap();
    assert_eq!(read_file(&other, r2.ino, "precious.txt").await.unwrap(), b"do not lose me");
}

/// A background retry of a failed save, while the file is open again and
/// half rewritten: it must not store the half (a version nobody wrote, which
/// a backup taken then kept); the handle's close saves the whole, and when
/// that close fails too, the waiting retry stores what it finished, also
/// while a reader holds the file open. (Seen in CI: a save refused during
/// a backup, retried while `fs::write` was between its two writes.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_save_waits_for_a_writer_that_reopened_the_file() {
    use std::time::Duration;
    let s = setup(&["V"]).await;
    let on_server = || read_on_server(&s.alice, ["V", "r", "f"]);
    let (fs, outage) = mount_faulty(s.alice.clone()).await;
    let v = fs.lookup(ROOT, n("V")).await.unwrap();
    let r = fs.mkdir(v.ino, n("r")).await.unwrap();
    let version = |g: u8| vec![g; 200_000];
    let ino = write_file(&fs, r.ino, "f", &version(1)).await;
    let rewrite = |g: u8, whole: bool| {
        let fs = Arc::clone(&fs);
        async move {
            let fh = fs.open(ino, true, true).await.unwrap();
            let data = version(g);
            let end = if whole { data.len() } else { data.len() / 2 };
            fs.write(fh, 0, &data[..end]).await.unwrap();
            fh
        }
    };
    let close = |fh: u64| {
        let fs = Arc::clone(&fs);
        async move {
            let flushed = fs.flush(ino, fh).await;
            fs.release(ino, fh).await.unwrap();
            flushed
        }
    };
    // Version 2 fails to save: its close leaves a retry, which fails once at
    // once and then waits a second.
    outage.set(true);
    let fh = rewrite(2, true).await;
    assert!(close(fh).await.is_err());
    tokio::time::sleep(Duration::from_millis(300)).await;
    outage.set(false);
    // Reopened, emptied and half of version 3 written, as the retry wakes.
    let fh = rewrite(3, false).await;
    tokio::time::sleep(Duration::from_millis(1700)).await;
    let seen = on_server().await;
    assert!(
        seen == version(1) || seen == version(2),
        "the server holds {} bytes of a version nobody wrote",
        seen.len()
    );
    // The rest of version 3; its close fails too, while the retry waits.
    // A reader that keeps the file open meanwhile does not hold it back.
    fs.write(fh, 100_000, &version(3)[100_000..]).await.unwrap();
    outage.set(true);
    assert!(close(fh).await.is_err());
    let reader = fs.open(ino, false, false).await.unwrap();
    outage.set(false);
    let stored = async {
        while fs.getxattr(ino, n(XATTR_STATE)).unwrap() != b"clean" {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(15), stored).await.expect("the retry must store version 3");
    assert!(on_server().await == version(3));
    fs.release(ino, reader).await.unwrap();
}

/// A retry follows its file when it moves to another record (a new id),
/// and lets go of it; the next failed save starts a retry again, which
/// stores changes no close marked finished (a release without a flush, as
/// after writes through a map) once nobody else holds the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_follows_a_moved_file_and_stores_what_a_release_left() {
    use std::time::Duration;
    let s = setup(&["V"]).await;
    let (fs, outage) = mount_faulty(s.alice.clone()).await;
    let v = fs.lookup(ROOT, n("V")).await.unwrap();
    let (r1, r2) = (fs.mkdir(v.ino, n("r1")).await.unwrap(), fs.mkdir(v.ino, n("r2")).await.unwrap());
    let ino = write_file(&fs, r1.ino, "f", b"version 1").await;
    outage.set(true);
    let fh = fs.open(ino, true, true).await.unwrap();
    fs.write(fh, 0, b"version 2").await.unwrap();
    assert!(fs.flush(ino, fh).await.is_err());
    fs.release(ino, fh).await.unwrap();
    outage.set(false);
    // Moved while the retry waits: the move stores version 2 under a new id.
    fs.rename(r1.ino, n("f"), r2.ino, n("g")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Written again and let go without a flush while the server is away.
    outage.set(true);
    let fh = fs.open(ino, true, true).await.unwrap();
    fs.write(fh, 0, b"version 3").await.unwrap();
    fs.release(ino, fh).await.unwrap();
    outage.set(false);
    let stored = async {
        while fs.getxattr(ino, n(XATTR_STATE)).unwrap() != b"clean" {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(15), stored).await.expect("no retry stored version 3");
    assert_eq!(read_on_server(&s.alice, ["V", "r2", "g"]).await, b"version 3");
}

/// Offset of chunk `i` in a vault file (128-byte header, 64 KiB + 16 per chunk).
fn chunk_at(i: u64) -> u64 {
    128 + i * (65536 + 16)
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8 ^ (i >> 16) as u8).collect()
}

type Faulty = Arc<VaultFs<FaultyRemote<MemoryRemote>>>;

/// Stores `data` as V/r/`name` through one mount, and returns the writing
/// mount and a second one, over a failure-injecting remote, with the file's
/// attributes there.
async fn stored_then_faulty(
    s: &Setup,
    name: &str,
    data: &[u8],
) -> (Arc<VaultFs<MemoryRemote>>, Faulty, Outage, vaultfs::fs::core::Attr) {
    let writer = mount(s.alice.clone()).await;
    let v = writer.lookup(ROOT, n("V")).await.unwrap();
    let r = writer.mkdir(v.ino, n("r")).await.unwrap();
    write_file(&writer, r.ino, name, data).await;
    let (fs, outage) = mount_faulty(s.alice.clone()).await;
    let attr = faulty_lookup(&fs, name).await;
    (writer, fs, outage, attr)
}

async fn faulty_lookup(fs: &Faulty, name: &str) -> vaultfs::fs::core::Attr {
    fs.lookup(r_ino(fs).await, n(name)).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_soon_after_the_server_confirmed_the_version_does_not_ask_again() {
    use std::time::Duration;
    const WINDOW: Duration = Duration::from_millis(400);
    let s = setup(&["V"]).await;
    let writer = mount(s.alice.clone()).await;
    let v = writer.lookup(ROOT, n("V")).await.unwrap();
    let r = writer.mkdir(v.ino, n("r")).await.unwrap();
    // End-to-end, and passed through (above the 5 MB end-to-end limit).
    let files = [("small.bin", pattern(100_000)), ("large.bin", pattern(6_000_000))];
    for (name, data) in &files {
        write_file(&writer, r.ino, name, data).await;
    }
    let (fs, outage) =
        mount_faulty_with(s.alice.clone(), FsOptions { confirmed_for: WINDOW, ..strict() }).await;
    for (name, data) in &files {
        let attr = faulty_lookup(&fs, name).await;
        let changed: Vec<u8> = data.iter().map(|b| b ^ 0x5a).collect();
        for (round, content) in [data, &changed].into_iter().enumerate() {
            if round == 1 {
                // Once the answer is older than the window, the next open
                // asks, and sees another client's change.
                write_over(&writer, r.ino, name, &changed).await;
                tokio::time::sleep(WINDOW).await;
            }
            let (fh, keep) = fs.open_keeping_cache(attr.ino, false, false).await.unwrap();
            assert!(!keep, "{name} round {round}: nothing or stale pages cached");
            assert_eq!(fs.read(fh, 0, 8192).await.unwrap(), &content[..8192], "{name} round {round}");
            fs.release(attr.ino, fh).await.unwrap();
            // Just confirmed: opened again without asking (the server is down).
            outage.set(true);
            let (fh, keep) = fs.open_keeping_cache(attr.ino, false, false).await.unwrap();
            assert!(keep, "{name} round {round}: the pages are kept");
            fs.release(attr.ino, fh).await.unwrap();
            outage.set(false);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_wait_only_for_the_chunks_they_need() {
    use std::time::Duration;
    let s = setup(&["V"]).await;
    let data = pattern(3_000_000);
    let (_writer, fs, outage, attr) = stored_then_faulty(&s, "big.bin", &data).await;
    // A slow link: only the header and the first two chunks arrive.
    outage.hold_downloads_at(Some(chunk_at(2)));
    let fh = tokio::time::timeout(Duration::from_secs(5), fs.open(attr.ino, false, false))
        .await
        .expect("open must not wait for the whole file")
        .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(5), fs.read(fh, 1000, 60_000))
        .await
        .expect("a read of the first chunk must not wait for the rest")
        .unwrap();
    assert_eq!(first, &data[1000..61_000]);
    // A read holds the file's data until its reply is sent (dropped).
    drop(first);
    let later = tokio::time::timeout(Duration::from_millis(300), fs.read(fh, 2_000_000, 4096)).await;
    assert!(later.is_err(), "a read of a chunk that has not arrived cannot be answered yet");
    outage.hold_downloads_at(None);
    let later = tokio::time::timeout(Duration::from_secs(5), fs.read(fh, 2_000_000, 4096)).await.unwrap();
    assert_eq!(later.unwrap(), &data[2_000_000..2_004_096]);
    assert_eq!(fs.read(fh, 2_999_000, 4096).await.unwrap(), &data[2_999_000..]);
    assert!(fs.read(fh, 3_000_000, 10).await.unwrap().is_empty());
    fs.release(attr.ino, fh).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_chunk_or_a_broken_download_fails_reads_with_eio_and_recovers() {
    let s = setup(&["V"]).await;
    let data = pattern(1_500_000);
    // A server that flips a byte in chunk 10: chunks before it are authentic and
    // readable; once chunk 10 arrives, the file fails, and so does every read.
    let (writer, fs, outage, attr) = stored_then_faulty(&s, "f.bin", &data).await;
    outage.hold_downloads_at(Some(chunk_at(10)));
    outage.flip_download_byte(Some(chunk_at(10) + 7));
    let fh = fs.open(attr.ino, false, false).await.unwrap();
    assert_eq!(fs.read(fh, 0, 4096).await.unwrap(), &data[..4096]);
    outage.hold_downloads_at(None);
    let err = fs.read(fh, 1_000_000, 4096).await.unwrap_err();
    assert!(matches!(err, FsError::Integrity { .. }), "{err}");
    assert_eq!(err.errno(), libc::EIO);
    // Nothing of the failed download stays readable: the next read waits for
    // a fresh download (held here at its first byte) instead of being served
    // from what was decrypted before the failure.
    outage.hold_downloads_at(Some(0));
    let waiting = tokio::time::timeout(std::time::Duration::from_millis(300), fs.read(fh, 0, 4096)).await;
    assert!(waiting.is_err(), "a read after a failure must wait for a fresh download");
    // Chunks before the damage authenticate again; the damaged one fails again.
    // (Held before the damage until the first read is answered: released at
    // once, the download could fail the file before that read is even asked.)
    outage.hold_downloads_at(Some(chunk_at(10)));
    assert_eq!(fs.read(fh, 0, 4096).await.unwrap(), &data[..4096]);
    outage.hold_downloads_at(None);
    let err = fs.read(fh, 1_000_000, 4096).await.unwrap_err();
    assert_eq!(err.errno(), libc::EIO, "{err}");
    // The server behaves again: the next read downloads the file afresh.
    outage.flip_download_byte(None);
    assert_eq!(fs.read(fh, 1_000_000, 4096).await.unwrap(), &data[1_000_000..1_004_096]);
    fs.release(attr.ino, fh).await.unwrap();

    // The connection breaks in the middle of the download: EIO, then recovery.
    let (fs, outage) = mount_faulty(s.alice.clone()).await;
    let attr = faulty_lookup(&fs, "f.bin").await;
    outage.hold_downloads_at(Some(chunk_at(5)));
    let fh = fs.open(attr.ino, false, false).await.unwrap();
    outage.set(true);
    let err = fs.read(fh, 1_000_000, 4096).await.unwrap_err();
    assert_eq!(err.errno(), libc::EIO, "{err}");
    outage.set(false);
    outage.hold_downloads_at(None);
    assert_eq!(fs.read(fh, 1_000_000, 4096).await.unwrap(), &data[1_000_000..1_004_096]);
    // Writing needs the whole file, and gets it.
    fs.write(fh, 0, b"HEAD").await.unwrap();
    fs.fsync(attr.ino, fh).await.unwrap();
    fs.release(attr.ino, fh).await.unwrap();
    let mut expected = data.clone();
    expected[..4].copy_from_slice(b"HEAD");
    assert_eq!(read_file(&writer, r_ino(&writer).await, "f.bin").await.unwrap(), expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_end_to_end_only_vault_never_gets_plaintext_and_keeps_the_data() {
    let s = setup(&[]).await;
    let mut u = Unlocked::open(s.alice.clone(), b"pw").await.unwrap();
    u.create_vault("Strict", true).await.unwrap();
    let fs = mount(s.alice.clone()).await;
    let v = fs.lookup(ROOT, n("Strict")).await.unwrap();
    let r = fs.mkdir(v.ino, n("r")).await.unwrap();
    let (attr, fh) = fs.create(r.ino, n("big.bin"), 0o644).await.unwrap();
    // The policy passes files above 5 MB through; this vault is end-to-end
    // only, so the write that crosses 5 MB fails, and nothing is uploaded.
    let data = pattern(6_000_000);
    fs.write(fh, 0, &data[..4_000_000]).await.unwrap();
    let err = fs.write(fh, 4_000_000, &data[4_000_000..]).await.unwrap_err();
    assert_eq!(err.errno(), libc::EFBIG, "{err}");
    assert!(err.to_string().contains("end-to-end only"), "{err}");
    // Written back to front (held in memory, not streamed): refused as well.
    let (attr2, fh2) = fs.create(r.ino, n("back.bin"), 0o644).await.unwrap();
    assert_eq!(fs.write(fh2, 5_500_000, b"tail").await.unwrap_err().errno(), libc::EFBIG);
    assert_eq!(fs.setattr(attr2.ino, Some(5_000_001), None).await.unwrap_err().errno(), libc::EFBIG);
    fs.release(attr2.ino, fh2).await.unwrap();
    // What was written so far is kept, and saved end to end.
    assert_eq!(fs.read(fh, 3_999_000, 1000).await.unwrap(), &data[3_999_000..4_000_000]);
    fs.fsync(attr.ino, fh).await.unwrap();
    fs.release(attr.ino, fh).await.unwrap();
    assert_eq!(fs.getxattr(attr.ino, n(XATTR_E2E)).unwrap(), b"1");
    assert!(!s.server.stored_blobs().iter().any(|b| contains(b, &data[1000..1064])), "plaintext stored");
    let other = mount(s.alice).await;
    let v2 = other.lookup(ROOT, n("Strict")).await.unwrap();
    let r2 = other.lookup(v2.ino, n("r")).await.unwrap();
    assert_eq!(read_file(&other, r2.ino, "big.bin").await.unwrap(), &data[..4_000_000]);
}

/// Whether `needle` occurs in `hay`.
fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// The server's e2e limit decides nothing: at zero (an operator's change, or
/// a lying `/v1/me`), small files are still encrypted, and a file the policy
/// encrypts but the server says to pass through is refused (EFBIG), never
/// sent in plaintext, also a rewrite of a file that was end-to-end before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_e2e_limit_of_zero_gets_no_plaintext() {
    let s = setup(&["V"]).await;
    let fs = mount(s.alice.clone()).await;
    let v = fs.lookup(ROOT, n("V")).await.unwrap();
    let r = fs.mkdir(v.ino, n("r")).await.unwrap();
    write_file(&fs, r.ino, "before.txt", b"end-to-end before the change").await;
    drop(fs);
    s.server
        .set_limits("alice", Limits { upload_limit: 10_000_000, e2e_limit: 0, image_max_edge: 2560 })
        .await
        .unwrap();
    let fs = mount(s.alice.clone()).await;
    let r = r_ino(&fs).await;
    let secret = b"a 35-byte secret that stays secret";
    let (attr, fh) = fs.create(r, n("small.txt"), 0o644).await.unwrap();
    let err = fs.write(fh, 0, secret).await.unwrap_err();
    assert_eq!(err.errno(), libc::EFBIG, "{err}");
    assert!(err.to_string().contains("refuses rather than send"), "{err}");
    fs.release(attr.ino, fh).await.unwrap();
    // A rewrite of the file stored end to end before: refused too.
    let before = fs.lookup(r, n("before.txt")).await.unwrap();
    let fh = fs.open(before.ino, false, true).await.unwrap();
    assert_eq!(fs.write(fh, 0, secret).await.unwrap_err().errno(), libc::EFBIG);
    fs.release(before.ino, fh).await.unwrap();
    assert!(!s.server.stored_blobs().iter().any(|b| contains(b, secret)), "plaintext reached the server");
    assert_eq!(read_file(&fs, r, "before.txt").await.unwrap(), b"end-to-end before the change");
    // An empty file still is what it is.
    let (attr, fh) = fs.create(r, n("empty"), 0o644).await.unwrap();
    fs.fsync(attr.ino, fh).await.unwrap();
    fs.release(attr.ino, fh).await.unwrap();
}

/// A tiny upload limit from the server lowers the end-to-end limit with it
/// (`min(upload_limit)`), but never makes a file stream past it in
/// plaintext: what is above the upload limit is refused first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_upload_limit_below_the_file_gets_no_plaintext() {
    let s = setup(&["V"]).await;
    s.server
        .set_limits("alice", Limits { upload_limit: 1000, e2e_limit: 5_000_000, image_max_edge: 2560 })
        .await
        .unwrap();
    let fs = mount(s.alice.clone()).await;
    let v = fs.lookup(ROOT, n("V")).await.unwrap();
    let r = fs.mkdir(v.ino, n("r")).await.unwrap();
    let secret = b"a secret written front to back, piece after piece, past the limit ".repeat(100);
    let (attr, fh) = fs.create(r.ino, n("big.txt"), 0o644).await.unwrap();
    let mut refused = None;
    for (i, piece) in secret.chunks(500).enumerate() {
        if let Err(e) = fs.write(fh, (i * 500) as u64, piece).await {
            refused = Some(e);
            break;
        }
    }
    assert_eq!(refused.expect("a write past the upload limit is refused").errno(), libc::EFBIG);
    let _ = fs.fsync(attr.ino, fh).await;
    fs.release(attr.ino, fh).await.unwrap();
    assert!(
        !s.server.stored_blobs().iter().any(|b| contains(b, &secret[..500])),
        "plaintext reached the server"
    );
    drop(s.server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_whose_file_changed_meanwhile_is_kept_as_a_conflict_copy() {
    // setup(): e2e limit 5 MB, so 6 MB written front to back streams.
    let s = setup(&["V"]).await;
    let a = mount(s.alice.clone()).await;
    let v = a.lookup(ROOT, n("V")).await.unwrap();
    let r = a.mkdir(v.ino, n("r")).await.unwrap();
    let (attr, fh) = a.create(r.ino, n("clip.mov"), 0o644).await.unwrap();
    let ours = pattern(6_000_000);
    a.write(fh, 0, &ours[..5_500_000]).await.unwrap();
    assert_eq!(a.getxattr(attr.ino, n(XATTR_STATE)).unwrap(), b"uploading");
    // Another client saves the same file in the meantime.
    let b = mount(s.alice.clone()).await;
    write_over(&b, r_ino(&b).await, "clip.mov", b"theirs").await;
    a.write(fh, 5_500_000, &ours[5_500_000..]).await.unwrap();
    a.fsync(attr.ino, fh).await.expect("close succeeds: nothing was lost");
    a.release(attr.ino, fh).await.unwrap();
    let check = mount(s.alice.clone()).await;
    let dir = r_ino(&check).await;
    assert_eq!(read_file(&check, dir, "clip.mov").await.unwrap(), b"theirs");
    let names: Vec<String> = check
        .readdir(dir)
        .await
        .unwrap()
        .into_iter()
        .map(|(_, _, n)| n.to_string_lossy().into_owned())
        .collect();
    let copy = names.iter().find(|n| n.starts_with("clip (conflict ")).expect("a conflict copy");
    assert!(copy.ends_with(").mov"), "{copy}");
    assert!(read_file(&check, dir, copy).await.unwrap() == ours, "the copy holds every streamed byte");
}

async fn write_over<R: vaultfs::remote::Remote>(fs: &Arc<VaultFs<R>>, dir: u64, name: &str, data: &[u8]) {
    let attr = fs.lookup(dir, n(name)).await.unwrap();
    let fh = fs.open(attr.ino, true, true).await.unwrap();
    fs.write(fh, 0, data).await.unwrap();
    fs.fsync(attr.ino, fh).await.unwrap();
    fs.release(attr.ino, fh).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_names_and_titles_are_listed_as_unreadable_and_give_eio() {
    use vaultfs::protocol::{FileUpdate, RecordUpdate, Sealed};
    use vaultfs::remote::Remote;
    let s = setup(&["V"]).await;
    let fs = mount(s.alice.clone()).await;
    let v = fs.lookup(ROOT, n("V")).await.unwrap();
    let r = fs.mkdir(v.ino, n("r")).await.unwrap();
    let t = fs.mkdir(v.ino, n("taxes")).await.unwrap();
    write_file(&fs, r.ino, "secret.txt", b"content").await;
    write_file(&fs, r.ino, "fine.txt", b"fine").await;
    write_file(&fs, t.ino, "inside.txt", b"x").await;
    // The server flips one bit of a sealed file name and of a record title.
    let vault = s.alice.vaults().await.unwrap()[0].id;
    let files = s.alice.files(vault).await.unwrap();
    let f =
        files.iter().find(|f| f.size > 0 && f.size == files.iter().map(|g| g.size).max().unwrap()).unwrap();
    let mut name = f.name.0.clone();
    name[40] ^= 1;
    let update = FileUpdate { name: Some(Sealed(name)), ..Default::default() };
    s.alice.update_file(f.id, f.version, update).await.unwrap();
    let records = s.alice.records(vault).await.unwrap();
    let rec = records.iter().find(|x| x.id != f.record).unwrap();
    let mut title = rec.title.0.clone();
    title[40] ^= 1;
    let update = RecordUpdate { title: Some(Sealed(title)), ..Default::default() };
    s.alice.update_record(rec.id, rec.version, update).await.unwrap();

    let fresh = mount(s.alice.clone()).await;
    let v = fresh.lookup(ROOT, n("V")).await.unwrap();
    let top: Vec<String> = fresh
        .readdir(v.ino)
        .await
        .unwrap()
        .iter()
        .map(|(_, _, n)| n.to_string_lossy().into_owned())
        .collect();
    let bad_dir = top.iter().find(|n| n.starts_with("UNREADABLE record ")).expect("the record is listed");
    let err = fresh.lookup(v.ino, n(bad_dir)).await.unwrap_err();
    assert_eq!(err.errno(), libc::EIO, "{err}");
    assert!(err.to_string().contains(&rec.id.to_string()), "the error names the record: {err}");
    let good_dir = top.iter().find(|n| !n.starts_with("UNREADABLE")).unwrap();
    let d = fresh.lookup(v.ino, n(good_dir)).await.unwrap();
    let names: Vec<String> = fresh
        .readdir(d.ino)
        .await
        .unwrap()
        .iter()
        .map(|(_, _, n)| n.to_string_lossy().into_owned())
        .collect();
    let bad_file = names.iter().find(|n| n.starts_with("UNREADABLE file ")).expect("the file is listed");
    assert!(!names.iter().any(|n| n == "secret.txt"), "{names:?}");
    let err = fresh.lookup(d.ino, n(bad_file)).await.unwrap_err();
    assert_eq!(err.errno(), libc::EIO, "{err}");
    assert!(err.to_string().contains(&f.id.to_string()), "the error names the file: {err}");
    // Listings with attributes give none for it (so the kernel caches nothing
    // and each use comes back as EIO), nor may a lookup skip the check.
    let plus = fresh.listing(d.ino, fresh.opendir(d.ino), ReadFrom::Start).await.unwrap();
    for (_, (_, _, name, attr)) in &plus {
        assert_eq!(attr.is_none(), name == bad_file.as_str(), "{name:?}");
    }
    assert_eq!(fresh.lookup_now(d.ino, n(bad_file)).expect("fresh").unwrap_err().errno(), libc::EIO);
    let bad_ino =
        fresh.readdir(v.ino).await.unwrap().into_iter().find(|e| e.2 == bad_dir.as_str()).unwrap().0;
    let bad_fh = fresh.opendir(bad_ino);
    assert!(
        fresh.listing_now(bad_ino, bad_fh, ReadFrom::Start).is_none() && fresh.readdir_now(bad_ino).is_none()
    );
    assert_eq!(fresh.listing(bad_ino, bad_fh, ReadFrom::Start).await.unwrap_err().errno(), libc::EIO);
    // The others are untouched.
    assert_eq!(read_file(&fresh, d.ino, "fine.txt").await.unwrap(), b"fine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_core_enforces_the_mount_policy() {
    use vaultfs::policy::{Policy, PolicyFile};
    let s = setup(&["V", "Ro", "Keep"]).await;
    let fs = mount(s.alice.clone()).await;
    for v in ["Ro", "Keep"] {
        let vi = fs.lookup(ROOT, n(v)).await.unwrap();
        let r = fs.mkdir(vi.ino, n("r")).await.unwrap();
        write_file(&fs, r.ino, "f", b"data").await;
    }
    let admin = "[vaults.Ro]\nread_only = true\n[vaults.Keep]\nallow_delete = false\n\
                 [defaults]\ne2e_limit = 1000\noversize = \"refuse\"";
    let policy = Policy {
        admin: PolicyFile::parse(std::path::Path::new("admin.toml"), admin).unwrap(),
        user: PolicyFile::default(),
    };
    let account = Unlocked::open(s.alice.clone(), b"pw").await.unwrap();
    let fs = Arc::new(VaultFs::new(account, FsOptions { policy, ..FsOptions::default() }).await.unwrap());
    let ro = fs.lookup(ROOT, n("Ro")).await.unwrap();
    let ro_r = fs.lookup(ro.ino, n("r")).await.unwrap();
    let f = fs.lookup(ro_r.ino, n("f")).await.unwrap();
    assert_eq!(errno(fs.create(ro_r.ino, n("g"), 0o644).await), libc::EROFS);
    assert_eq!(errno(fs.mkdir(ro.ino, n("x")).await), libc::EROFS);
    assert_eq!(errno(fs.open(f.ino, false, true).await), libc::EROFS);
    assert_eq!(errno(fs.setattr(f.ino, Some(0), None).await), libc::EROFS);
    assert_eq!(errno(fs.unlink(ro_r.ino, n("f")).await), libc::EROFS);
    assert_eq!(errno(fs.rename(ro_r.ino, n("f"), ro_r.ino, n("g")).await), libc::EROFS);
    assert_eq!(read_file(&fs, ro_r.ino, "f").await.unwrap(), b"data");
    let keep = fs.lookup(ROOT, n("Keep")).await.unwrap();
    let keep_r = fs.lookup(keep.ino, n("r")).await.unwrap();
    assert_eq!(errno(fs.unlink(keep_r.ino, n("f")).await), libc::EPERM);
    let empty = fs.mkdir(keep.ino, n("empty")).await.unwrap();
    assert_eq!(errno(fs.rmdir(keep.ino, n("empty")).await), libc::EPERM);
    let _ = empty;
    // Above the policy's end-to-end limit of 1000 bytes: refused in every vault.
    let (a, fh) = fs.create(keep_r.ino, n("big"), 0o644).await.unwrap();
    fs.write(fh, 0, &[1u8; 1000]).await.unwrap();
    assert_eq!(errno(fs.write(fh, 1000, b"x").await), libc::EFBIG);
    assert_eq!(errno(fs.setattr(a.ino, Some(5000), None).await), libc::EFBIG);
    fs.fsync(a.ino, fh).await.unwrap();
    fs.release(a.ino, fh).await.unwrap();
    assert_eq!(fs.getxattr(a.ino, n(XATTR_E2E)).unwrap(), b"1");
}

/// One runtime thread: if reducing an image ran on it, nothing else could run
/// meanwhile, and the other operations below would finish after the save.
#[tokio::test]
async fn a_large_image_reduction_does_not_block_other_operations() {
    let s = setup(&["V"]).await;
    let fs = mount(s.alice.clone()).await;
    let v = fs.lookup(ROOT, n("V")).await.unwrap();
    let r = fs.mkdir(v.ino, n("r")).await.unwrap();
    write_file(&fs, r.ino, "other.txt", b"other").await;
    let img = image::RgbImage::from_fn(3200, 2400, |x, y| {
        image::Rgb([(x / 13) as u8, (y / 11) as u8, ((x ^ y) % 97) as u8])
    });
    let mut jpeg = Vec::new();
    img.write_with_encoder(image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 95)).unwrap();
    let (attr, fh) = fs.create(r.ino, n("photo.jpg"), 0o644).await.unwrap();
    fs.write(fh, 0, &jpeg).await.unwrap();
    let saving = tokio::spawn({
        let fs = Arc::clone(&fs);
        async move { fs.fsync(attr.ino, fh).await }
    });
    tokio::task::yield_now().await; // the save starts, and hands the image to a blocking thread
    assert_eq!(read_file(&fs, r.ino, "other.txt").await.unwrap(), b"other");
    assert_eq!(fs.readdir(r.ino).await.unwrap().len(), 2);
    // Still the size the application wrote: the reduction has not finished, yet
    // the operations above were answered.
    let size = fs.getattr(attr.ino).unwrap().size;
    assert_eq!(size, jpeg.len() as u64, "other operations had to wait for the reduction");
    saving.await.unwrap().unwrap();
    fs.release(attr.ino, fh).await.unwrap();
    let back = read_file(&fs, r.ino, "photo.jpg").await.unwrap();
    let reduced = image::load_from_memory(&back).unwrap();
    assert_eq!((reduced.width(), reduced.height()), (2560, 1920));
}

fn errno<T>(r: Result<T, FsError>) -> i32 {
    r.map(|_| ()).unwrap_err().errno()
}

async fn r_ino<R: vaultfs::remote::Remote>(fs: &Arc<VaultFs<R>>) -> u64 {
    let v = fs.lookup(ROOT, n("V")).await.unwrap();
    fs.lookup(v.ino, n("r")).await.unwrap().ino
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_and_bad_names_give_the_expected_errno() {
    let s = setup(&["V"]).await;
    let fs = mount(s.alice.clone()).await;
    let v = fs.lookup(ROOT, n("V")).await.unwrap();
    let r = fs.mkdir(v.ino, n("r")).await.unwrap();
    let (attr, fh) = fs.create(r.ino, n("big"), 0o644).await.unwrap();
    assert_eq!(fs.write(fh, 10_000_000, b"x").await.unwrap_err().errno(), libc::EFBIG);
    assert_eq!(fs.setattr(attr.ino, Some(10_000_001), None).await.unwrap_err().errno(), libc::EFBIG);
    fs.release(attr.ino, fh).await.unwrap();
    assert_eq!(fs.create(r.ino, n("a/b"), 0o644).await.unwrap_err().errno(), libc::EINVAL);
    assert_eq!(fs.mkdir(r.ino, n(&"x".repeat(300))).await.unwrap_err().errno(), libc::ENAMETOOLONG);
    assert_eq!(fs.lookup(r.ino, n("missing")).await.unwrap_err().errno(), libc::ENOENT);
    assert_eq!(fs.mkdir(ROOT, n("new vault")).await.unwrap_err().errno(), libc::EPERM);
}

// ---- reference model --------------------------------------------------------

#[derive(Debug, Clone)]
enum Op {
    Write { file: u8, offset: u16, data: Vec<u8> },
    Truncate { file: u8, size: u16 },
    Rename { from: u8, to: u8 },
    Unlink { file: u8 },
    Remount,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..4, 0u16..3000, proptest::collection::vec(any::<u8>(), 0..200))
            .prop_map(|(file, offset, data)| Op::Write { file, offset, data }),
        1 => (0u8..4, 0u16..3000).prop_map(|(file, size)| Op::Truncate { file, size }),
        1 => (0u8..4, 0u8..4).prop_map(|(from, to)| Op::Rename { from, to }),
        1 => (0u8..4).prop_map(|file| Op::Unlink { file }),
        1 => Just(Op::Remount),
    ]
}

fn fname(i: u8) -> String {
    format!("file{i}")
}

async fn run_model(ops: Vec<Op>) {
    let s = setup(&["V"]).await;
    let mut fs = mount(s.alice.clone()).await;
    let v = fs.lookup(ROOT, n("V")).await.unwrap();
    let r = fs.mkdir(v.ino, n("r")).await.unwrap();
    let mut dir = r.ino;
    let mut model: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for (step, op) in ops.into_iter().enumerate() {
        match op {
            Op::Write { file, offset, data } => {
                let name = fname(file);
                let (ino, fh) = match fs.lookup(dir, n(&name)).await {
                    Ok(a) => (a.ino, fs.open(a.ino, false, true).await.unwrap()),
                    Err(_) => {
                        let (a, fh) = fs.create(dir, n(&name), 0o644).await.unwrap();
                        (a.ino, fh)
                    }
                };
                // Both write paths: the one on the FUSE thread where it applies, the async one otherwise.
                match fs.write_now(fh, u64::from(offset), &data) {
                    Some(written) => assert_eq!(written as usize, data.len()),
                    None => {
                        assert_eq!(fs.write(fh, u64::from(offset), &data).await.unwrap() as usize, data.len())
                    }
                }
                fs.fsync(ino, fh).await.unwrap();
                fs.release(ino, fh).await.unwrap();
                let m = model.entry(name).or_default();
                let end = offset as usize + data.len();
                if m.len() < end {
                    m.resize(end, 0);
                }
                m[offset as usize..end].copy_from_slice(&data);
            }
            Op::Truncate { file, size } => {
                let name = fname(file);
                if let Ok(a) = fs.lookup(dir, n(&name)).await {
                    fs.setattr(a.ino, Some(u64::from(size)), None).await.unwrap();
                    model.get_mut(&name).unwrap().resize(size as usize, 0);
                }
            }
            Op::Rename { from, to } => {
                let (f, t) = (fname(from), fname(to));
                let res = fs.rename(dir, n(&f), dir, n(&t)).await;
                match model.remove(&f) {
                    Some(data) => {
                        res.unwrap();
                        model.insert(t, data);
                    }
                    None => assert!(matches!(res, Err(FsError::NotFound)), "step {step}: {res:?}"),
                }
            }
            Op::Unlink { file } => {
                let name = fname(file);
                let res = fs.unlink(dir, n(&name)).await;
                assert_eq!(res.is_ok(), model.remove(&name).is_some(), "step {step}: {res:?}");
            }
            Op::Remount => {
                // As at unmount: what is unsaved is saved, what was removed
                // deleted on the server.
                fs.flush_all().await;
                fs = mount(s.alice.clone()).await;
                let v = fs.lookup(ROOT, n("V")).await.unwrap();
                dir = fs.lookup(v.ino, n("r")).await.unwrap().ino;
            }
        }
        // After every step the filesystem holds exactly the model.
        let names: Vec<String> =
            fs.readdir(dir).await.unwrap().into_iter().map(|e| e.2.into_string().unwrap()).collect();
        assert_eq!(names, model.keys().cloned().collect::<Vec<_>>(), "step {step}");
        for (name, data) in &model {
            assert_eq!(fs.lookup(dir, n(name)).await.unwrap().size, data.len() as u64, "step {step} {name}");
            assert_eq!(&read_file(&fs, dir, name).await.unwrap(), data, "step {step} {name}");
            let a = fs.lookup(dir, n(name)).await.unwrap();
            let fh = fs.open(a.ino, false, false).await.unwrap();
            let _ = fs.read(fh, 0, u32::MAX).await.unwrap();
            // Once whole in memory (the download task marks it just after its
            // last piece), the read on the caller's thread agrees.
            if let Some(now) = fs.read_now(fh, 0, u32::MAX) {
                assert_eq!(&now.unwrap(), data, "step {step} {name} (read_now)");
            }
            fs.release(a.ino, fh).await.unwrap();
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn the_core_behaves_like_a_simple_model(ops in proptest::collection::vec(op(), 1..25)) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(run_model(ops));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_above_the_e2e_limit_stream_through_as_plain_https() {
    // setup(): e2e limit 5 MB, upload limit 10 MB.
    let s = setup(&["V"]).await;
    let fs = mount(s.alice.clone()).await;
    let v = fs.lookup(ROOT, n("V")).await.unwrap();
    let r = fs.mkdir(v.ino, n("r")).await.unwrap();
    let data: Vec<u8> = (0..8_000_000u32).map(|i| (i % 253) as u8).collect();
    let (attr, fh) = fs.create(r.ino, n("video.mkv"), 0o644).await.unwrap();
    for (i, piece) in data.chunks(1 << 20).enumerate() {
        fs.write(fh, (i << 20) as u64, piece).await.unwrap();
    }
    assert_eq!(fs.getattr(attr.ino).unwrap().size, 8_000_000, "size while streaming");
    assert_eq!(
        fs.getxattr(attr.ino, n(XATTR_E2E)).unwrap(),
        b"0",
        "not end-to-end from the moment it streams"
    );
    assert_eq!(fs.getxattr(attr.ino, n(XATTR_STATE)).unwrap(), b"uploading");
    // A close (perhaps a forked child closing its copy of the descriptor) must
    // not end the stream: writing goes on, past a hole.
    fs.flush(attr.ino, fh).await.unwrap();
    assert_eq!(fs.getxattr(attr.ino, n(XATTR_STATE)).unwrap(), b"uploading");
    let extra = vec![1u8; 100];
    fs.write(fh, 8_000_050, &extra).await.unwrap();
    // fsync ends it and returns once the server has it.
    fs.fsync(attr.ino, fh).await.unwrap();
    assert_eq!(fs.getxattr(attr.ino, n(XATTR_STATE)).unwrap(), b"clean");
    let fresh = mount(s.alice.clone()).await;
    let stored = fresh.lookup(r_ino(&fresh).await, n("video.mkv")).await.unwrap();
    assert_eq!(stored.size, 8_000_150, "stored when the opener's close returned");
    // A write behind the stream: the file is stored, then edited in memory.
    fs.write(fh, 0, b"rewrite").await.unwrap();
    fs.fsync(attr.ino, fh).await.unwrap();
    fs.release(attr.ino, fh).await.unwrap();
    let mut data = data;
    data[..7].copy_from_slice(b"rewrite");
    data.extend_from_slice(&[0u8; 50]);
    data.extend_from_slice(&extra);
    assert_eq!(fs.getxattr(attr.ino, n(XATTR_E2E)).unwrap(), b"0", "marked as not end-to-end encrypted");
    assert_eq!(fs.getxattr(attr.ino, n(XATTR_STATE)).unwrap(), b"clean");

    // A fresh mount reads it in ranges from the server.
    let fs2 = mount(s.alice.clone()).await;
    let v2 = fs2.lookup(ROOT, n("V")).await.unwrap();
    let r2 = fs2.lookup(v2.ino, n("r")).await.unwrap();
    let a2 = fs2.lookup(r2.ino, n("video.mkv")).await.unwrap();
    assert_eq!(a2.size, 8_000_150);
    let fh2 = fs2.open(a2.ino, false, false).await.unwrap();
    assert_eq!(fs2.read(fh2, 7_999_990, 200).await.unwrap(), data[7_999_990..]);
    assert_eq!(fs2.read(fh2, 123_456, 4096).await.unwrap(), data[123_456..127_552]);
    let mut all = Vec::new();
    while (all.len() as u64) < a2.size {
        all.extend_from_slice(&fs2.read(fh2, all.len() as u64, 131_072).await.unwrap());
    }
    assert!(all == data);
    fs2.release(a2.ino, fh2).await.unwrap();
    // Nothing of it went into the plaintext cache.
    assert_eq!(fs2.cache().stats().used, 0);

    // Past the upload limit: EFBIG at the write that crosses it.
    let (attr, fh) = fs.create(r.ino, n("too big"), 0o644).await.unwrap();
    let piece = vec![7u8; 1 << 20];
    let mut offset = 0u64;
    let err = loop {
        match fs.write(fh, offset, &piece).await {
            Ok(n) => offset += u64::from(n),
            Err(e) => break e,
        }
    };
    assert_eq!(err.errno(), libc::EFBIG);
    assert!(offset <= 10_000_000 && offset + (1 << 20) > 10_000_000, "failed at {offset}");
    let _ = fs.fsync(attr.ino, fh).await;
    fs.release(attr.ino, fh).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_takes_writes_on_the_callers_thread_while_its_queue_has_room() {
    // setup(): e2e limit 5 MB, upload limit 10 MB.
    let s = setup(&["V"]).await;
    let (fs, outage) = mount_faulty(s.alice.clone()).await;
    let v = fs.lookup(ROOT, n("V")).await.unwrap();
    let r = fs.mkdir(v.ino, n("r")).await.unwrap();
    let data = pattern(9_000_000);
    let (attr, fh) = fs.create(r.ino, n("film.mkv"), 0o644).await.unwrap();
    // A stalled link: the upload reads nothing, so the stream's queue fills.
    outage.hold_uploads(true);
    let piece = 100_000;
    let mut at = 0;
    while at <= 5_000_000 {
        // Crossing the end-to-end limit starts the stream: the async path's job.
        assert!(at < 5_000_000 || fs.write_now(fh, at as u64, &data[at..at + piece]).is_none());
        fs.write(fh, at as u64, &data[at..at + piece]).await.unwrap();
        at += piece;
    }
    assert_eq!(fs.getxattr(attr.ino, n(XATTR_STATE)).unwrap(), b"uploading");
    // A write that does not continue the stream is not taken here.
    assert!(fs.write_now(fh, at as u64 + 1, &data[..10]).is_none(), "a hole");
    assert!(fs.write_now(fh, 0, &data[..10]).is_none(), "a write behind the stream");
    // Continuing writes are taken on the caller's thread until the queue is full.
    let mut taken = 0;
    while let Some(written) = fs.write_now(fh, at as u64, &data[at..at + piece]) {
        assert_eq!(written as usize, piece);
        at += piece;
        taken += 1;
        assert!(taken < 30, "the queue of a stalled upload never filled");
    }
    assert!(taken >= 1, "a stream with room in its queue was not fed on the caller's thread");
    let sent = |fs: &Arc<VaultFs<_>>| fs.status().uploads.iter().map(|u| u.sent).sum::<u64>();
    assert_eq!(sent(&fs), at as u64, "progress counts what the caller's thread handed over");
    // The async path waits for room instead of failing.
    let next = {
        let (fs, part) = (Arc::clone(&fs), data[at..at + piece].to_vec());
        tokio::spawn(async move { fs.write(fh, at as u64, &part).await })
    };
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert!(!next.is_finished(), "a write to a full queue waits for room");
    outage.hold_uploads(false);
    assert_eq!(next.await.unwrap().unwrap() as usize, piece);
    at += piece;
    // The rest, by whichever path takes it.
    while at < data.len() {
        let end = (at + piece).min(data.len());
        match fs.write_now(fh, at as u64, &data[at..end]) {
            Some(written) => written,
            None => fs.write(fh, at as u64, &data[at..end]).await.unwrap(),
        };
        at = end;
    }
    fs.fsync(attr.ino, fh).await.unwrap();
    fs.release(attr.ino, fh).await.unwrap();
    assert_eq!(fs.getxattr(attr.ino, n(XATTR_STATE)).unwrap(), b"clean");
    let fresh = mount(s.alice.clone()).await;
    assert_eq!(read_file(&fresh, r_ino(&fresh).await, "film.mkv").await.unwrap(), data, "stored in order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pass_through_reads_fetch_small_ranges_when_seeking_and_prefetch_when_streaming() {
    let s = setup(&["V"]).await;
    let fs = mount(s.alice.clone()).await;
    let v = fs.lookup(ROOT, n("V")).await.unwrap();
    let r = fs.mkdir(v.ino, n("r")).await.unwrap();
    // 9.5 MB, above this user's 5 MB end-to-end limit: stored plain.
    let data = pattern(9_500_000);
    write_file(&fs, r.ino, "movie.bin", &data).await;

    let (fs2, outage) = mount_faulty(s.alice.clone()).await;
    let v2 = fs2.lookup(ROOT, n("V")).await.unwrap();
    let r2 = fs2.lookup(v2.ino, n("r")).await.unwrap();
    let a = fs2.lookup(r2.ino, n("movie.bin")).await.unwrap();
    let fh = fs2.open(a.ino, false, false).await.unwrap();
    outage.take_downloads();
    // Seeking around (as fio or a video player does): each read one request,
    // for the one 1 MiB piece it falls in (a piece is checked whole).
    for &off in &[9_000_000u64, 1_000_000, 7_777_777, 3_333_333, 6_000_000] {
        let got = fs2.read(fh, off, 4096).await.unwrap();
        assert_eq!(got, &data[off as usize..off as usize + 4096]);
    }
    let seeks = outage.take_downloads();
    assert_eq!(seeks.len(), 5, "{seeks:?}");
    assert!(
        seeks.iter().flatten().all(|r| r.end - r.start <= 1 << 20 && r.start % (1 << 20) == 0),
        "{seeks:?}"
    );
    // Front to back in 128 KiB reads: one streamed request for all of it.
    let mut back = Vec::new();
    while back.len() < data.len() {
        let piece = fs2.read(fh, back.len() as u64, 128 << 10).await.unwrap();
        assert!(!piece.is_empty());
        back.extend_from_slice(&piece);
    }
    assert!(back == data, "sequential read differs");
    let streams = outage.take_downloads();
    assert_eq!(streams, vec![Some(0..9_500_000)], "one request for 9.5 MB read front to back");
    // Front to back again, with reads a little out of order (the kernel's
    // read-ahead sends several at once): still one request.
    fs2.read(fh, 5_000_000, 4096).await.unwrap(); // a seek: forgets what was held
    outage.take_downloads();
    let k = 128u64 << 10;
    let mut order = vec![0];
    for pair in (1..data.len() as u64 / k).collect::<Vec<_>>().chunks(2) {
        order.extend(pair.iter().rev().map(|i| i * k));
    }
    for off in order {
        let got = fs2.read(fh, off, k as u32).await.unwrap();
        assert_eq!(got, &data[off as usize..(off + k) as usize], "at {off}");
    }
    let reordered = outage.take_downloads();
    assert_eq!(reordered.len(), 1, "{reordered:?}");
    fs2.release(a.ino, fh).await.unwrap();

    // Opened again unchanged: the kernel may keep the pages it cached. Once
    // another client stored a new version, it must drop them, and reads see it.
    let (fh, keep) = fs2.open_keeping_cache(a.ino, false, false).await.unwrap();
    assert!(keep, "unchanged pass-through file: pages kept");
    fs2.release(a.ino, fh).await.unwrap();
    let changed = pattern(9_000_000).into_iter().map(|b| b ^ 0x5a).collect::<Vec<u8>>();
    write_over(&fs, r.ino, "movie.bin", &changed).await;
    let (fh, keep) = fs2.open_keeping_cache(a.ino, false, false).await.unwrap();
    assert!(!keep, "stale pages must be dropped");
    assert_eq!(fs2.getattr(a.ino).unwrap().size, 9_000_000, "the new size, not the listing's");
    assert_eq!(fs2.read(fh, 8_990_000, 10_000).await.unwrap(), &changed[8_990_000..]);
    fs2.release(a.ino, fh).await.unwrap();
    let (fh, keep) = fs2.open_keeping_cache(a.ino, false, false).await.unwrap();
    assert!(keep);
    fs2.release(a.ino, fh).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_and_writes_without_waiting_apply_only_when_nothing_would_wait() {
    // setup(): e2e limit 5 MB.
    let s = setup(&["V"]).await;
    let data = pattern(3_000_000);
    let (_writer, fs, outage, attr) = stored_then_faulty(&s, "big.bin", &data).await;
    outage.hold_downloads_at(Some(chunk_at(2)));
    let fh = fs.open(attr.ino, false, true).await.unwrap();
    // Still downloading: neither may answer on the caller's thread.
    assert!(fs.read_now(fh, 0, 100).is_none(), "the plaintext is not whole yet");
    assert!(fs.write_now(fh, 0, b"x").is_none(), "a write waits for the whole file");
    outage.hold_downloads_at(None);
    assert_eq!(fs.read(fh, 2_000_000, 10).await.unwrap(), &data[2_000_000..2_000_010]);
    let _ = fs.read(fh, 2_999_999, 1).await.unwrap();
    // The download task marks the entry whole just after its last piece.
    let mut whole = None;
    for _ in 0..100 {
        whole = fs.read_now(fh, 1000, 10);
        if whole.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(whole.expect("whole now").unwrap(), &data[1000..1010]);
    assert!(fs.read_now(fh, 3_000_000, 10).unwrap().unwrap().is_empty(), "at the end");
    assert_eq!(fs.write_now(fh, 10, b"hello").expect("applies"), 5);
    // Crossing the end-to-end limit starts a stream: that is the async path's job.
    assert!(fs.write_now(fh, 4_999_999, b"ab").is_none());
    let mut want = data.clone();
    want[10..15].copy_from_slice(b"hello");
    assert_eq!(fs.read_now(fh, 0, u32::MAX).unwrap().unwrap(), want);
    assert_eq!(fs.getxattr(attr.ino, n(XATTR_STATE)).unwrap(), b"dirty");
    fs.fsync(attr.ino, fh).await.unwrap();
    fs.release(attr.ino, fh).await.unwrap();
    // What the fast path wrote is what was stored.
    let other = mount(s.alice.clone()).await;
    let r = r_ino(&other).await;
    assert!(read_file(&other, r, "big.bin").await.unwrap() == want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_listings_answer_lookups_and_listings_without_the_server() {
    use vaultfs::fs::core::LISTING_TTL;
    let s = setup(&["V"]).await;
    let fs = mount(s.alice.clone()).await;
    let v = fs.lookup(ROOT, n("V")).await.unwrap();
    let r = fs.mkdir(v.ino, n("r")).await.unwrap();
    write_file(&fs, r.ino, "a.txt", b"hello").await;
    let a = fs.lookup_now(r.ino, n("a.txt")).expect("the listing is fresh").unwrap();
    assert_eq!(a.size, 5);
    assert!(matches!(fs.lookup_now(r.ino, n("nope")), Some(Err(FsError::NotFound))));
    let long = "x".repeat(300);
    assert!(matches!(fs.lookup_now(r.ino, n(&long)), Some(Err(FsError::NameTooLong))));
    let fh = fs.opendir(r.ino);
    let plus = fs.listing_now(r.ino, fh, ReadFrom::Start).expect("fresh").unwrap();
    assert_eq!(plus.len(), 1);
    let (at, (ino, kind, name, attr)) = &plus[0];
    assert_eq!((*at, *ino, *kind, name.as_os_str()), (0, a.ino, Kind::File, n("a.txt")));
    let attr = attr.as_ref().expect("a readable entry has attributes");
    assert_eq!((attr.ino, attr.size, attr.mtime), (a.ino, 5, a.mtime));
    let names = fs.readdir_now(v.ino).expect("fresh").unwrap();
    assert_eq!(names, vec![(r.ino, Kind::Dir, OsString::from("r"))]);
    // Another client adds a file. Once the listing's reuse time is over, the
    // answers without the server step aside and the async path fetches it.
    let other = mount(s.alice.clone()).await;
    write_file(&other, r_ino(&other).await, "b.txt", b"x").await;
    tokio::time::sleep(LISTING_TTL + std::time::Duration::from_millis(100)).await;
    assert!(fs.lookup_now(r.ino, n("b.txt")).is_none(), "stale listing: must ask the server");
    assert!(fs.listing_now(r.ino, fh, ReadFrom::Start).is_none() && fs.readdir_now(r.ino).is_none());
    assert!(fs.listing_now(r.ino, fh, ReadFrom::At(1)).is_none(), "a pass going on asks too");
    let plus = fs.listing(r.ino, fh, ReadFrom::Start).await.unwrap();
    let names: Vec<_> = plus.iter().map(|e| e.1 .2.clone()).collect();
    assert_eq!(names, ["a.txt", "b.txt"]);
    assert_eq!(fs.lookup_now(r.ino, n("b.txt")).expect("fresh again").unwrap().size, 1);
}

/// A file moved to another record with a change not saved yet keeps the
/// time of that change (the time its save would have recorded), here and on
/// the server, not the time of its last save.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_file_keeps_the_time_of_its_unsaved_change() {
    let s = setup(&["V"]).await;
    let fs = mount(s.alice.clone()).await;
    let v = fs.lookup(ROOT, n("V")).await.unwrap();
    let (r1, r2) = (fs.mkdir(v.ino, n("r1")).await.unwrap(), fs.mkdir(v.ino, n("r2")).await.unwrap());
    let ino = write_file(&fs, r1.ino, "a.txt", b"saved").await;
    let saved = fs.getattr(ino).unwrap().mtime;
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let fh = fs.open(ino, true, false).await.unwrap();
    fs.write(fh, 0, b"changed").await.unwrap();
    let changed = fs.getattr(ino).unwrap().mtime;
    assert!(changed > saved);
    fs.rename(r1.ino, n("a.txt"), r2.ino, n("b.txt")).await.unwrap();
    let ms = |t: std::time::SystemTime| vaultfs::protocol::ms_of(t);
    assert_eq!(ms(fs.getattr(ino).unwrap().mtime), ms(changed), "here");
    fs.release(ino, fh).await.unwrap();
    let other = mount(s.alice.clone()).await;
    let v2 = other.lookup(ROOT, n("V")).await.unwrap();
    let r2b = other.lookup(v2.ino, n("r2")).await.unwrap();
    assert_eq!(ms(other.lookup(r2b.ino, n("b.txt")).await.unwrap().mtime), ms(changed), "on the server");
    assert_eq!(read_file(&other, r2b.ino, "b.txt").await.unwrap(), b"changed");
}

/// A directory read in several calls (the kernel's offset is a position)
/// lists each entry once, even when an entry sorting before those still to
/// come appears between the calls; one removed meanwhile is not listed
/// again, and a new pass from position 0 (rewinddir) sees both changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_read_in_pieces_lists_each_entry_once() {
    let s = setup(&["V"]).await;
    let fs = mount(s.alice.clone()).await;
    let v = fs.lookup(ROOT, n("V")).await.unwrap();
    let r = fs.mkdir(v.ino, n("r")).await.unwrap();
    for name in ["b.txt", "c.txt", "d.txt", "e.txt"] {
        write_file(&fs, r.ino, name, b"x").await;
    }
    let names = |l: vaultfs::fs::core::Listing| -> Vec<(usize, String)> {
        l.into_iter().map(|(at, e)| (at, e.2.into_string().unwrap())).collect()
    };
    let fh = fs.opendir(r.ino);
    let first = names(fs.listing(r.ino, fh, ReadFrom::Start).await.unwrap());
    assert_eq!(first.iter().map(|e| e.1.as_str()).collect::<Vec<_>>(), ["b.txt", "c.txt", "d.txt", "e.txt"]);
    // The first call got b and c. A file sorting first arrives, e goes, and
    // another file is renamed over d.
    write_file(&fs, r.ino, "a.txt", b"x").await;
    fs.unlink(r.ino, n("e.txt")).await.unwrap();
    let over = write_file(&fs, r.ino, ".d.txt.swp", b"y").await;
    fs.rename(r.ino, n(".d.txt.swp"), r.ino, n("d.txt")).await.unwrap();
    let rest = fs.listing(r.ino, fh, ReadFrom::At(2)).await.unwrap();
    assert_eq!(rest.iter().map(|(_, e)| e.0).collect::<Vec<_>>(), [over], "d is the file renamed over it");
    let rest = names(rest);
    assert_eq!(rest, [(2, "d.txt".to_owned())], "the pass goes on where it was");
    let now = names(fs.listing_now(r.ino, fh, ReadFrom::At(2)).expect("nothing to fetch").unwrap());
    assert_eq!(now, rest);
    let again = names(fs.listing(r.ino, fh, ReadFrom::Start).await.unwrap());
    let again: Vec<_> = again.iter().map(|e| e.1.as_str()).collect();
    assert_eq!(again, ["a.txt", "b.txt", "c.txt", "d.txt"], "a new pass sees the changes");
    fs.releasedir(fh);

    // A call answers with entries still there, however many names before
    // them went (an empty answer would end the read).
    let big = fs.mkdir(v.ino, n("big")).await.unwrap();
    let made: Vec<String> = (0..600).map(|i| format!("f{i:03}")).collect();
    for name in &made {
        let (attr, fh) = fs.create(big.ino, n(name), 0o644).await.unwrap();
        fs.release(attr.ino, fh).await.unwrap();
    }
    let fh = fs.opendir(big.ino);
    assert!(!fs.listing(big.ino, fh, ReadFrom::Start).await.unwrap().is_empty());
    for name in &made[1..598] {
        fs.unlink(big.ino, n(name)).await.unwrap();
    }
    let rest = names(fs.listing(big.ino, fh, ReadFrom::At(1)).await.unwrap());
    assert_eq!(rest, [(598, "f598".to_owned()), (599, "f599".to_owned())]);
    fs.releasedir(fh);
}

/// A vault written by a vaultfs older than manifests keeps opening (its files
/// read as the server says they are); `vault migrate` gives each file the
/// manifest its content deserves and flags the vault, after which a file whose
/// manifest the server removes is refused instead of trusted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vault_from_before_manifests_opens_migrates_and_is_then_protected() {
    use vaultfs::crypto::{encrypt_file, seal_name, FileContext, NameContext, OsRandom, VaultKey, Wallet};
    use vaultfs::ids::{FileId, RecordId, VaultId};
    use vaultfs::protocol::{FileUpdate, NewFile, NewRecord, NewVault, Sealed};
    use vaultfs::remote::{Remote, UploadBody};
    let server = MemoryServer::new().unwrap();
    let limits = Limits { upload_limit: 10_000_000, e2e_limit: 5_000_000, image_max_edge: 2560 };
    let alice = server.add_user("alice", limits).await.unwrap();
    // What an older client made: a wallet with the vault's key and no flag,
    // files without manifests.
    let vault = VaultId::random().unwrap();
    let mut wallet = Wallet::new();
    wallet.add_key(vault, VaultKey::generate(&mut OsRandom).unwrap()).unwrap();
    alice.put_wallet(wallet.seal(b"pw", FAST, &mut OsRandom).unwrap(), None).await.unwrap();
    let key = wallet.active_key(vault).unwrap();
    let sealed =
        |ctx: NameContext, name: &str| Sealed(seal_name(key, &ctx, name.as_bytes(), &mut OsRandom).unwrap());
    let name = sealed(NameContext::VaultName { vault }, "Old");
    alice.create_vault(NewVault { id: vault, name, e2e_required: false, wrapped_key: None }).await.unwrap();
    let record = RecordId::random().unwrap();
    let title = sealed(NameContext::RecordTitle { vault, record }, "r");
    let new_record = NewRecord { id: record, parent: None, title, fields: Sealed::default() };
    alice.create_record(vault, new_record).await.unwrap();
    let small = pattern(70_000);
    let big = pattern(6_000_000);
    let mut ids = Vec::new();
    for (name, data, e2e) in
        [("small.txt", &small, true), ("big.bin", &big, false), ("empty", &Vec::new(), true)]
    {
        let id = FileId::random().unwrap();
        let sealed_name = sealed(NameContext::FileName { vault, record, file: id }, name);
        let new = NewFile { id, name: sealed_name, e2e, mtime_ms: None, meta: Sealed::default() };
        let info = alice.create_file(record, new).await.unwrap();
        if !data.is_empty() {
            let body = if e2e {
                encrypt_file(key, &FileContext { vault, record, file: id }, 2, data, &mut OsRandom).unwrap()
            } else {
                data.to_vec()
            };
            alice.upload(id, info.version, e2e, None, UploadBody::from_bytes(body)).await.unwrap();
        }
        ids.push(id);
    }
    let read_all = |fs: Arc<VaultFs<MemoryRemote>>| async move {
        let v = fs.lookup(ROOT, n("Old")).await.unwrap();
        let r = fs.lookup(v.ino, n("r")).await.unwrap();
        let mut out = Vec::new();
        for name in ["small.txt", "big.bin", "empty"] {
            out.push(read_file(&fs, r.ino, name).await);
        }
        out
    };
    // It opens, as it always did.
    let got = read_all(mount(alice.clone()).await).await;
    assert_eq!((got[0].as_deref().unwrap(), got[1].as_deref().unwrap()), (&small[..], &big[..]));
    assert!(got[2].as_ref().unwrap().is_empty());

    let mut unlocked = Unlocked::open(alice.clone(), b"pw").await.unwrap();
    let done = unlocked.migrate_vault(vault).await.unwrap();
    assert_eq!((done.end_to_end, done.pass_through, done.had_one), (2, 1, 0), "{done:?}");
    assert!(done.skipped.is_empty() && done.flagged, "{done:?}");
    assert_eq!(unlocked.migrate_vault(vault).await.unwrap().had_one, 3, "a second run has nothing to do");
    for id in &ids {
        assert!(!alice.file(*id).await.unwrap().meta.0.is_empty());
    }
    let got = read_all(mount(alice.clone()).await).await;
    assert_eq!((got[0].as_deref().unwrap(), got[1].as_deref().unwrap()), (&small[..], &big[..]));

    // The server strips a manifest: no longer trusted, refused.
    for id in &ids[..2] {
        let v = alice.file(*id).await.unwrap().version;
        alice
            .update_file(*id, v, FileUpdate { meta: Some(Sealed::default()), ..Default::default() })
            .await
            .unwrap();
    }
    let got = read_all(mount(alice).await).await;
    for (i, r) in got[..2].iter().enumerate() {
        assert_eq!(r.as_ref().map(|_| ()).unwrap_err().errno(), libc::EIO, "file {i}");
    }
}

/// A server that answers with metadata of another file or vault than asked:
/// a file it lists under a vault but says belongs elsewhere (where no manifest
/// rule or another policy would apply) is left out, and an answer about a file
/// that names another file is refused, so one file's content never shows
/// under another's name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_for_another_file_or_vault_is_refused() {
    let s = setup(&["V"]).await;
    let big = pattern(6_000_000);
    let (writer, fs, outage, attr) = stored_then_faulty(&s, "big.bin", &big).await;
    let r = r_ino(&writer).await;
    write_file(&writer, r, "other.bin", &pattern(5_500_000)).await;
    let other_info = s.alice.clone();
    let other_id = {
        use vaultfs::remote::Remote;
        let v = other_info.vaults().await.unwrap()[0].id;
        let files = other_info.files(v).await.unwrap();
        files.into_iter().find(|f| f.size == 5_500_000).unwrap()
    };
    // file() about big.bin answers with other.bin's (genuine) metadata.
    let swapped = other_id.clone();
    outage.lie_about_files(Some(std::sync::Arc::new(move |f: &mut vaultfs::protocol::FileInfo| {
        if f.id != swapped.id && f.size == 6_000_000 {
            *f = swapped.clone();
        }
    })));
    assert_eq!(errno(fs.open(attr.ino, false, false).await), libc::EIO, "another file's answer");
    // A listing that says a file is of another vault (with no manifest and
    // "not end-to-end", as a legacy file would be): left out, not trusted.
    outage.lie_about_files(Some(std::sync::Arc::new(|f: &mut vaultfs::protocol::FileInfo| {
        f.vault = vaultfs::ids::VaultId([7; 16]);
        f.meta = vaultfs::protocol::Sealed::default();
        f.e2e = false;
    })));
    let (fresh, outage2) = mount_faulty(s.alice.clone()).await;
    outage2.lie_about_files(Some(std::sync::Arc::new(|f: &mut vaultfs::protocol::FileInfo| {
        f.vault = vaultfs::ids::VaultId([7; 16]);
        f.meta = vaultfs::protocol::Sealed::default();
        f.e2e = false;
    })));
    let v = fresh.lookup(ROOT, n("V")).await.unwrap();
    let r = fresh.lookup(v.ino, n("r")).await.unwrap();
    assert!(fresh.readdir(r.ino).await.unwrap().is_empty(), "files of another vault are left out");
    assert_eq!(errno(fresh.lookup(r.ino, n("big.bin")).await), libc::ENOENT);
    // The same through the change feed: a file written since, that the feed
    // says is of another vault, is left out too.
    let listed = outage2.listings();
    write_file(&writer, r_ino(&writer).await, "later.txt", b"later").await;
    tokio::time::sleep(vaultfs::fs::core::LISTING_TTL + std::time::Duration::from_millis(100)).await;
    assert_eq!(errno(fresh.lookup(r.ino, n("later.txt")).await), libc::ENOENT);
    assert!(outage2.feeds() > 0 && outage2.listings() == listed, "through the feed");
    outage2.lie_about_files(None);
    tokio::time::sleep(vaultfs::fs::core::LISTING_TTL + std::time::Duration::from_millis(100)).await;
    write_file(&writer, r_ino(&writer).await, "honest.txt", b"h").await;
    tokio::time::sleep(vaultfs::fs::core::LISTING_TTL + std::time::Duration::from_millis(100)).await;
    assert_eq!(read_file(&fresh, r.ino, "honest.txt").await.unwrap(), b"h", "the feed's truth is taken");
}

/// A record the server lists under a record of another vault (its own
/// title authentic) is left out: shown there, it would take new files sealed
/// under its own vault's key among the other vault's. Through a listing and
/// through the change feed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_under_a_record_of_another_vault_is_left_out() {
    let s = setup(&["V", "W"]).await;
    let writer = mount(s.alice.clone()).await;
    let v = writer.lookup(ROOT, n("V")).await.unwrap();
    let w = writer.lookup(ROOT, n("W")).await.unwrap();
    writer.mkdir(v.ino, n("r")).await.unwrap();
    let w_rec = writer.mkdir(w.ino, n("w")).await.unwrap();
    // On the server now, not at the first file saved in them.
    writer.fsyncdir(v.ino).await.unwrap();
    writer.fsyncdir(w.ino).await.unwrap();
    let id = |ino| String::from_utf8(writer.getxattr(ino, n(vaultfs::fs::core::XATTR_ID)).unwrap()).unwrap();
    let (v_id, w_rec_id) = (id(v.ino), id(w_rec.ino));
    let under_w = move |r: &mut vaultfs::protocol::RecordInfo| {
        if r.vault.to_string() == v_id {
            r.parent = Some(w_rec_id.parse().unwrap());
        }
    };
    let (fs, outage) = mount_faulty(s.alice.clone()).await;
    outage.lie_about_records(Some(std::sync::Arc::new(under_w)));
    let v1 = fs.lookup(ROOT, n("V")).await.unwrap();
    let w1 = fs.lookup(ROOT, n("W")).await.unwrap();
    let w1_rec = fs.lookup(w1.ino, n("w")).await.unwrap();
    assert!(fs.readdir(w1_rec.ino).await.unwrap().is_empty(), "not among W's records");
    assert!(fs.readdir(v1.ino).await.unwrap().is_empty());
    // Through the feed: a record made since, listed under W's record.
    let listed = outage.listings();
    writer.mkdir(v.ino, n("later")).await.unwrap();
    writer.fsyncdir(v.ino).await.unwrap();
    tokio::time::sleep(vaultfs::fs::core::LISTING_TTL + std::time::Duration::from_millis(100)).await;
    assert!(fs.readdir(v1.ino).await.unwrap().is_empty());
    assert!(fs.readdir(w1_rec.ino).await.unwrap().is_empty(), "not among W's records");
    assert!(outage.feeds() > 0 && outage.listings() == listed, "through the feed");

    // A record of V listed under W's record's id claimed for V, that
    // record's parent: neither is taken (W's record stays W's).
    let c = writer.mkdir(writer.lookup(v.ino, n("r")).await.unwrap().ino, n("c")).await.unwrap();
    writer.fsyncdir(writer.lookup(v.ino, n("r")).await.unwrap().ino).await.unwrap();
    let r_id = id(writer.lookup(v.ino, n("r")).await.unwrap().ino);
    let (_, w_id) = (id(c.ino), id(w_rec.ino));
    let claim = move |rec: &mut vaultfs::protocol::RecordInfo| {
        if rec.id.to_string() == r_id {
            rec.id = w_id.parse().unwrap();
        }
        if rec.parent.is_some_and(|p| p.to_string() == r_id) {
            rec.parent = Some(w_id.parse().unwrap());
        }
    };
    let (fs2, outage2) = mount_faulty(s.alice.clone()).await;
    let w2 = fs2.lookup(ROOT, n("W")).await.unwrap();
    let w2_rec = fs2.lookup(w2.ino, n("w")).await.unwrap();
    outage2.lie_about_records(Some(std::sync::Arc::new(claim)));
    let v2 = fs2.lookup(ROOT, n("V")).await.unwrap();
    fs2.readdir(v2.ino).await.unwrap();
    assert!(fs2.readdir(w2_rec.ino).await.unwrap().is_empty(), "nothing of V among W's records");
    assert_eq!(fs2.lookup(w2.ino, n("w")).await.unwrap().ino, w2_rec.ino, "W's record stays where it is");
    assert_eq!(
        errno(fs2.lookup(v2.ino, n("r")).await),
        libc::ENOENT,
        "the record claiming its id is left out"
    );
}

/// An upload the server stored but whose answer was lost, then a retry that
/// the server (ignoring versions) stores over it: the retry has a newer
/// generation, so the server cannot serve the first upload (as authentic as
/// it is) in its place afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_with_a_lost_answer_cannot_be_served_after_its_retry() {
    use vaultfs::remote::{Remote, UploadBody};
    let s = setup(&["V"]).await;
    let (fs, outage) = mount_faulty(s.alice.clone()).await;
    let v = fs.lookup(ROOT, n("V")).await.unwrap();
    let r = fs.mkdir(v.ino, n("r")).await.unwrap();
    let ino = write_file(&fs, r.ino, "f.txt", b"first").await;
    let id = {
        let vault = s.alice.vaults().await.unwrap()[0].id;
        s.alice.files(vault).await.unwrap()[0].id
    };
    // Upload A is stored, but its answer is lost: the write stays dirty. The
    // server ignores versions, so the retry replaces A rather than conflict.
    outage.accept_any_version(true);
    outage.lose_upload_answers(true);
    let fh = fs.open(ino, true, true).await.unwrap();
    fs.write(fh, 0, b"version A").await.unwrap();
    assert!(fs.fsync(ino, fh).await.is_err());
    outage.lose_upload_answers(false);
    let a = s.alice.file(id).await.unwrap();
    let a_content = vaultfs::remote::collect(s.alice.download(id, None).await.unwrap().stream).await.unwrap();
    // The application writes on; B is stored and answered.
    fs.write(fh, 0, b"version B").await.unwrap();
    fs.fsync(ino, fh).await.unwrap();
    fs.release(ino, fh).await.unwrap();
    // The server puts A back, with A's own (genuine) manifest.
    let now = s.alice.file(id).await.unwrap().version;
    let body = UploadBody::from_bytes(a_content).with_meta(a.meta.clone());
    s.alice.upload(id, now, true, None, body).await.unwrap();
    let v = fs.lookup(ROOT, n("V")).await.unwrap();
    let r = fs.lookup(v.ino, n("r")).await.unwrap();
    assert_eq!(errno(read_file(&fs, r.ino, "f.txt").await), libc::EIO, "A is older than B");
}

/// A pass-through file rewritten by another writer while a handle reads it:
/// the old handle's next piece fails as "replaced" (ESTALE), not as tampering
/// (no integrity refusal); a new open reads the new content.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pass_through_file_replaced_while_open_gives_estale_not_eio() {
    let s = setup(&["V"]).await;
    let old = pattern(6_000_000);
    let (writer, fs, _outage, attr) = stored_then_faulty(&s, "movie.bin", &old).await;
    let fh = fs.open(attr.ino, false, false).await.unwrap();
    assert_eq!(fs.read(fh, 4_500_000, 4096).await.unwrap(), &old[4_500_000..4_504_096]);
    let new: Vec<u8> = old.iter().map(|b| b ^ 0x33).collect();
    write_over(&writer, r_ino(&writer).await, "movie.bin", &new).await;
    assert_eq!(errno(fs.read(fh, 1_000_000, 4096).await), libc::ESTALE);
    fs.release(attr.ino, fh).await.unwrap();
    assert!(fs.status().refused.is_empty(), "{:?}", fs.status().refused);
    let back = read_file(&fs, r_ino(&fs).await, "movie.bin").await.unwrap();
    assert!(back == new);
}

/// The mount's follow task, stopped when the test ends (also when it fails),
/// and what the mount told the kernel to forget.
struct Following {
    task: tokio::task::JoinHandle<()>,
    told: tokio::sync::mpsc::UnboundedReceiver<vaultfs::fs::Invalidation>,
}

impl Drop for Following {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn follow<R: vaultfs::remote::Remote>(fs: &Arc<VaultFs<R>>) -> Following {
    let (tx, told) = tokio::sync::mpsc::unbounded_channel();
    fs.set_invalidator(Box::new(move |batch| batch.into_iter().for_each(|i| drop(tx.send(i)))));
    Following { task: tokio::spawn(fs.follow()), told }
}

impl Following {
    /// Waits (at most 5 s) until the kernel is told `what`.
    async fn told(&mut self, what: vaultfs::fs::Invalidation) {
        let wait = async {
            while let Some(i) = self.told.recv().await {
                if i == what {
                    return;
                }
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(5), wait)
            .await
            .unwrap_or_else(|_| panic!("never told the kernel {what:?}"));
    }
}

/// Waits (at most 5 s) until `cond` holds.
async fn until(what: &str, cond: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !cond() {
        assert!(std::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// A mount that follows the change feed: while idle it asks the server
/// nothing (lookups, listings and opens answer from the tree past the
/// listing's reuse time); another client's changes reach it at once, and the
/// kernel is told what to forget (a directory with a new name, a rename, a
/// deletion, a new version); a cut connection makes it ask again until the feed is back,
/// and what changed meanwhile shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_followed_mount_asks_nothing_while_idle_and_sees_changes_at_once() {
    use vaultfs::fs::Invalidation;
    let s = setup(&["V"]).await;
    let (fs, outage) = mount_faulty_with(s.alice.clone(), FsOptions::default()).await;
    let v = fs.lookup(ROOT, n("V")).await.unwrap();
    let r = fs.mkdir(v.ino, n("r")).await.unwrap();
    let a = write_file(&fs, r.ino, "a.txt", b"a").await;
    let mut feed = follow(&fs);
    until("the feed is live", || fs.feed_live()).await;
    // Idle past every reuse time: nothing asked.
    tokio::time::sleep(vaultfs::fs::core::LISTING_TTL + std::time::Duration::from_millis(200)).await;
    let asked = outage.requests();
    assert!(fs.lookup_now(r.ino, n("a.txt")).is_some(), "answered on the caller's thread");
    assert_eq!(fs.readdir(r.ino).await.unwrap().len(), 1);
    assert_eq!(read_file(&fs, r.ino, "a.txt").await.unwrap(), b"a");
    assert_eq!(outage.requests(), asked, "idle and live: the server was not asked");

    let other = mount(s.alice.clone()).await;
    let v2 = other.lookup(ROOT, n("V")).await.unwrap();
    let r2 = other.lookup(v2.ino, n("r")).await.unwrap();
    write_file(&other, r2.ino, "c.txt", b"from the other client").await;
    // A new name: the directory's attributes (the kernel keeps no negative
    // entries, so the name itself needs no word).
    feed.told(Invalidation::Inode(r.ino)).await;
    // The feed may have brought the new file before its content was saved.
    let size = || fs.lookup_now(r.ino, n("c.txt")).expect("fresh").map(|a| a.size).unwrap_or(0);
    until("the content is in", || size() == 21).await;
    let c = fs.lookup_now(r.ino, n("c.txt")).expect("fresh").unwrap();
    assert_eq!(read_file(&fs, r.ino, "c.txt").await.unwrap(), b"from the other client");
    other.rename(r2.ino, n("a.txt"), r2.ino, n("b.txt")).await.unwrap();
    feed.told(Invalidation::Entry { parent: r.ino, name: "a.txt".into() }).await;
    assert_eq!(fs.lookup_now(r.ino, n("b.txt")).expect("fresh").unwrap().ino, a, "same inode");
    assert!(fs.lookup_now(r.ino, n("a.txt")).expect("fresh").is_err());
    write_over(&other, r2.ino, "c.txt", b"changed").await;
    feed.told(Invalidation::Inode(c.ino)).await;
    assert_eq!(read_file(&fs, r.ino, "c.txt").await.unwrap(), b"changed");
    other.unlink(r2.ino, n("c.txt")).await.unwrap();
    feed.told(Invalidation::Deleted { parent: r.ino, child: c.ino, name: "c.txt".into() }).await;

    // The connection is cut while the server is unreachable: the feed is
    // lost, and what changes meanwhile shows once it is back.
    assert_eq!(read_file(&fs, r.ino, "b.txt").await.unwrap(), b"a", "cached at its current version");
    outage.set(true);
    outage.cut_waits();
    until("the feed is lost", || !fs.feed_live()).await;
    // Without the feed, an open past the confirmation window asks the
    // server (which is down) instead of trusting the tree.
    tokio::time::sleep(vaultfs::fs::core::CONFIRMED_FOR + std::time::Duration::from_millis(100)).await;
    assert!(fs.open(a, false, false).await.is_err(), "the feed lost, the open asked the server");
    write_file(&other, r2.ino, "d.txt", b"d").await;
    outage.set(false);
    feed.told(Invalidation::Inode(r.ino)).await;
    until("d.txt is listed", || fs.lookup_now(r.ino, n("d.txt")).is_some_and(|a| a.is_ok())).await;
    assert_eq!(read_file(&fs, r.ino, "d.txt").await.unwrap(), b"d");
    let d = fs.lookup(r.ino, n("d.txt")).await.unwrap();
    until("the feed is live again", || fs.feed_live()).await;

    // Told to list again (too far behind): listed whole, nothing stale.
    outage.tell_to_relist(true);
    let listed = outage.listings();
    other.unlink(r2.ino, n("d.txt")).await.unwrap();
    feed.told(Invalidation::Deleted { parent: r.ino, child: d.ino, name: "d.txt".into() }).await;
    assert!(outage.listings() > listed, "listed whole");
    let names: Vec<_> = fs.readdir(r.ino).await.unwrap().into_iter().map(|(_, _, name)| name).collect();
    assert_eq!(names, ["b.txt"]);
    assert_eq!(fs.lookup(r.ino, n("b.txt")).await.unwrap().ino, a, "inodes kept");
}

/// A mount without the feed that learns of a new version by asking (at an
/// open past the confirmation window, and after its save became a conflict
/// copy) tells the kernel to drop the file's attributes and pages: a reader
/// must not get the new content cut at the old length.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_learnt_by_asking_is_told_to_the_kernel() {
    use vaultfs::fs::Invalidation;
    let s = setup(&["V"]).await;
    let fs = mount(s.alice.clone()).await;
    let (tx, mut told) = tokio::sync::mpsc::unbounded_channel();
    fs.set_invalidator(Box::new(move |batch| batch.into_iter().for_each(|i| drop(tx.send(i)))));
    let v = fs.lookup(ROOT, n("V")).await.unwrap();
    let r = fs.mkdir(v.ino, n("r")).await.unwrap();
    let a = write_file(&fs, r.ino, "a.txt", b"short").await;
    assert_eq!(read_file(&fs, r.ino, "a.txt").await.unwrap(), b"short");
    let other = mount(s.alice.clone()).await;
    let v2 = other.lookup(ROOT, n("V")).await.unwrap();
    let r2 = other.lookup(v2.ino, n("r")).await.unwrap();
    let mut told_of_a = || {
        let mut seen = false;
        while let Ok(i) = told.try_recv() {
            seen |= i == Invalidation::Inode(a);
        }
        seen
    };

    write_over(&other, r2.ino, "a.txt", b"a longer content").await;
    tokio::time::sleep(vaultfs::fs::core::CONFIRMED_FOR + std::time::Duration::from_millis(100)).await;
    told_of_a();
    let fh = fs.open(a, false, false).await.unwrap();
    assert_eq!(fs.read(fh, 0, 4096).await.unwrap().to_vec(), b"a longer content");
    fs.release(a, fh).await.unwrap();
    assert!(told_of_a(), "a new version found at open is told");

    // Both hold the file; the other saves first, so ours becomes a copy and
    // the original shows the other's version.
    let fh = fs.open(a, false, true).await.unwrap();
    write_over(&other, r2.ino, "a.txt", b"the other's newest content").await;
    told_of_a();
    fs.write(fh, 0, b"ours").await.unwrap();
    fs.fsync(a, fh).await.unwrap();
    assert!(told_of_a(), "the version after a conflict copy is told");
    fs.release(a, fh).await.unwrap();
    assert_eq!(read_file(&fs, r.ino, "a.txt").await.unwrap(), b"the other's newest content");
    let names: Vec<_> = fs.readdir(r.ino).await.unwrap().into_iter().map(|(_, _, name)| name).collect();
    assert_eq!(names.len(), 2, "{names:?}");
}

/// A vault the root does not show (a share whose sender's key is not
/// confirmed yet) is still named in the wait for changes: the server does not
/// answer at once, again and again, and the idle mount asks nearly nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vault_not_shown_does_not_make_the_feed_spin() {
    let s = setup(&["V"]).await;
    let mut alice = Unlocked::open(s.alice.clone(), b"pw").await.unwrap();
    alice.ensure_user_key().await.unwrap();
    let bob_remote = s.server.add_user("bob", Limits::DEFAULT).await.unwrap();
    let mut bob = Unlocked::create_wallet(bob_remote.clone(), b"pw", FAST).await.unwrap();
    bob.ensure_user_key().await.unwrap();
    bob.create_vault("Own", false).await.unwrap();
    let vault =
        alice.vaults().await.unwrap().into_iter().find(|x| x.name.as_deref() == Some("V")).unwrap().info;
    let (key, _) = alice.colleague_key("bob").await.unwrap();
    alice.pin("bob", key.fingerprint()).unwrap();
    alice.share_vault(&vault, "bob", vaultfs::protocol::Rights::Read, &key).await.unwrap();
    // Bob has not confirmed alice's key: V is not shown in his mount.
    let (faulty, outage) = FaultyRemote::new(bob_remote);
    let account = Unlocked::open(faulty, b"pw").await.unwrap();
    let fs = Arc::new(VaultFs::new(account, strict()).await.unwrap());
    let names: Vec<_> = fs.readdir(ROOT).await.unwrap().into_iter().map(|(_, _, name)| name).collect();
    assert_eq!(names, ["Own"]);
    let _feed = follow(&fs);
    until("the feed is live", || fs.feed_live()).await;
    let asked = outage.requests();
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let more = outage.requests() - asked;
    assert!(more <= 2, "{more} requests in an idle second");
}

/// A server that answers every wait at once, each time naming a vault never
/// seen: the mount takes at most a round every 50 ms (a few requests each),
/// shows no vault it was only told of, and is back to quiet once the server
/// is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_answering_waits_at_once_gets_a_bounded_rate() {
    let s = setup(&["V"]).await;
    let (fs, outage) = mount_faulty_with(s.alice.clone(), FsOptions::default()).await;
    fs.lookup(ROOT, n("V")).await.unwrap();
    let _feed = follow(&fs);
    until("the feed is live", || fs.feed_live()).await;
    outage.spin_waits(true);
    // The wait held now ends (an error: the task pauses a second), and every
    // one after it is answered at once.
    outage.cut_waits();
    tokio::time::sleep(std::time::Duration::from_millis(1300)).await;
    let asked = outage.requests();
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let spun = outage.requests() - asked;
    outage.spin_waits(false);
    // Each round: the wait, the wallet's version, the vault list.
    assert!((3..=80).contains(&spun), "{spun} requests in a second of instant answers");
    assert_eq!(fs.readdir(ROOT).await.unwrap().len(), 1, "V only: no vault it was only told of");
    until("the feed is live again", || fs.feed_live()).await;
    let asked = outage.requests();
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    assert!(outage.requests() - asked <= 2, "quiet again");
}

/// A lock over the whole file for `owner`.
fn whole(owner: u64, kind: vaultfs::fs::core::LockKind) -> vaultfs::fs::core::LockRequest {
    vaultfs::fs::core::LockRequest { owner, pid: 7, start: 0, end: i64::MAX as u64, kind }
}

/// Two mounts of one vault: a lock held through one keeps the other out
/// (refused, or waited for until it goes), an interrupted wait gets EINTR
/// and leaves nothing held, and a lock granted after another mount wrote
/// under its own lock reads what that mount wrote, not its own older copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_keep_two_mounts_in_turn_and_bring_the_file_up_to_date() {
    use vaultfs::fs::core::LockKind::{Read, Unlock, Write};
    let never = std::future::pending::<()>;
    let s = setup(&["V"]).await;
    let (fs1, fs2) = (mount(s.alice.clone()).await, mount(s.alice.clone()).await);
    let v1 = fs1.lookup(ROOT, n("V")).await.unwrap();
    let r1 = fs1.mkdir(v1.ino, n("r")).await.unwrap();
    write_file(&fs1, r1.ino, "db", b"base").await;
    let a1 = fs1.lookup(r1.ino, n("db")).await.unwrap();
    let a2 = fs2.lookup(r_ino(&fs2).await, n("db")).await.unwrap();
    let (h1, h2) =
        (fs1.open(a1.ino, false, true).await.unwrap(), fs2.open(a2.ino, false, true).await.unwrap());
    assert_eq!(fs2.read(h2, 0, 100).await.unwrap().to_vec(), b"base", "mount 2 holds the file in memory");

    fs1.setlk(a1.ino, h1, whole(1, Write), false, never()).await.unwrap();
    assert_eq!(errno(fs2.setlk(a2.ino, h2, whole(2, Read), false, never()).await), libc::EAGAIN);
    let seen = fs2.getlk(a2.ino, whole(2, Read)).await.unwrap().expect("mount 1's lock");
    assert!(seen.exclusive && seen.pid == 0, "another machine's lock, no local pid: {seen:?}");
    let local = fs1.getlk(a1.ino, whole(3, Read)).await.unwrap().expect("owner 1's lock");
    assert_eq!(local.pid, 7, "a lock of this mount names its process");
    assert_eq!(fs1.getlk(a1.ino, whole(1, Write)).await.unwrap(), None, "an owner never blocks itself");

    // Interrupted while waiting: EINTR, and nothing is left held for owner 2.
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let fs = Arc::clone(&fs2);
    let waiting = tokio::spawn(async move {
        fs.setlk(a2.ino, h2, whole(2, Write), true, async { drop(stopped.await) }).await
    });
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(!waiting.is_finished(), "a blocking request waits");
    stop.send(()).unwrap();
    assert_eq!(errno(waiting.await.unwrap()), libc::EINTR);

    // Mount 1 writes under its lock; mount 2's waiter is granted when it lets
    // go, and reads the new bytes (its own copy was older).
    fs1.write(h1, 0, b"written under the lock").await.unwrap();
    let fs = Arc::clone(&fs2);
    let waiting = tokio::spawn(async move { fs.setlk(a2.ino, h2, whole(2, Write), true, never()).await });
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(!waiting.is_finished(), "waits while mount 1 holds the lock");
    fs1.setlk(a1.ino, h1, whole(1, Unlock), false, never()).await.unwrap();
    waiting.await.unwrap().unwrap();
    assert_eq!(fs2.read(h2, 0, 100).await.unwrap().to_vec(), b"written under the lock");

    // A flush (a close by owner 2) gives up owner 2's locks; then mount 1 gets one.
    assert_eq!(errno(fs1.setlk(a1.ino, h1, whole(1, Read), false, never()).await), libc::EAGAIN);
    fs2.unlock_owner(a2.ino, 2).await.unwrap();
    fs1.setlk(a1.ino, h1, whole(1, Read), false, never()).await.unwrap();
    // The release of the handle a flock was taken through gives it up too.
    fs2.setlk(a2.ino, h2, whole(9, Read), false, never()).await.unwrap();
    assert_eq!(fs1.status().locks_held, 1);
    assert_eq!(fs2.status().locks_held, 1);
    fs2.unlock_handle(h2).await;
    fs2.release(a2.ino, h2).await.unwrap();
    assert_eq!(fs2.status().locks_held, 0);
    let holders = String::from_utf8(fs1.lock_holders(a1.ino).await.unwrap()).unwrap();
    assert_eq!(holders.lines().count(), 1, "{holders}");
    assert!(holders.starts_with("read lock on bytes 0-end by alice at ") && holders.contains("(this mount)"));
    fs1.unlock_handle(h1).await;
    fs1.release(a1.ino, h1).await.unwrap();
    drop(s.server);
}

/// The server's side of a taken-back request: a request numbered below one
/// already seen for its owner is void, and one still waiting when a newer
/// one arrives gives up instead of being granted later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_request_taken_back_is_never_granted_later() {
    use vaultfs::ids::HolderId;
    use vaultfs::protocol::{LockRange, SetLocks};
    let s = setup(&["V"]).await;
    let fs = mount(s.alice.clone()).await;
    let v = fs.lookup(ROOT, n("V")).await.unwrap();
    let r = fs.mkdir(v.ino, n("r")).await.unwrap();
    write_file(&fs, r.ino, "f", b"x").await;
    let ino = fs.lookup(r.ino, n("f")).await.unwrap().ino;
    let id: vaultfs::ids::FileId =
        String::from_utf8(fs.getxattr(ino, n("user.vaultfs.id")).unwrap()).unwrap().parse().unwrap();
    let (one, two) = (HolderId([1; 16]), HolderId([2; 16]));
    let all = vec![LockRange { start: 0, end: 99, exclusive: true }];
    let ask = |holder, seq, ranges: &Vec<LockRange>, wait_ms| SetLocks {
        holder,
        owner: 5,
        seq,
        ranges: ranges.clone(),
        label: "test".into(),
        wait_ms,
    };
    assert!(s.alice.set_locks(id, ask(one, 10, &all, 0)).await.unwrap().granted);
    // Holder two waits for the range, then takes the request back (seq 21).
    let remote = s.alice.clone();
    let waiting = tokio::spawn({
        let all = all.clone();
        async move { remote.set_locks(id, ask(two, 20, &all, 10_000)).await.unwrap() }
    });
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(!waiting.is_finished());
    assert!(s.alice.set_locks(id, ask(two, 21, &Vec::new(), 0)).await.unwrap().granted);
    // Holder one lets go: the old request must not be granted now.
    assert!(s.alice.set_locks(id, ask(one, 11, &Vec::new(), 0)).await.unwrap().granted);
    let answer = tokio::time::timeout(std::time::Duration::from_secs(5), waiting).await.unwrap().unwrap();
    assert!(!answer.granted && answer.blocker.is_none(), "{answer:?}");
    assert!(s.alice.file_locks(id).await.unwrap().is_empty(), "nothing held");
    // An older number than one seen is void too.
    assert!(!s.alice.set_locks(id, ask(two, 19, &all, 0)).await.unwrap().granted);
    assert!(s.alice.file_locks(id).await.unwrap().is_empty());

    // A renewal keeps only what the mount names: a lock whose answer it
    // never got (here owner 6's) goes at once instead of being kept alive.
    let some = vec![LockRange { start: 0, end: 9, exclusive: false }];
    assert!(s.alice.set_locks(id, ask(one, 30, &some, 0)).await.unwrap().granted);
    let mut stray = ask(one, 31, &some, 0);
    stray.owner = 6;
    assert!(s.alice.set_locks(id, stray).await.unwrap().granted);
    let named = vec![vaultfs::protocol::LockOwnerOf { file: id, owner: 5 }];
    assert_eq!(s.alice.renew_locks(one, named).await.unwrap().ranges, 1);
    let left = s.alice.file_locks(id).await.unwrap();
    assert_eq!(left.iter().map(|l| l.owner).collect::<Vec<_>>(), [5], "{left:?}");
    drop(s.server);
}

/// A chmod of a file with unsaved changes (tar's fchmod before close) asks
/// the server nothing: the bits go up with the content, in the manifest its
/// upload seals, and another mount sees them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chmod_before_the_close_goes_up_with_the_content() {
    let s = setup(&["V"]).await;
    let (fs, outage) = mount_faulty(s.alice.clone()).await;
    let v = fs.lookup(ROOT, n("V")).await.unwrap();
    let r = fs.mkdir(v.ino, n("r")).await.unwrap();
    let (attr, fh) = fs.create(r.ino, n("run.sh"), 0o644).await.unwrap();
    fs.write(fh, 0, b"#!/bin/sh\n").await.unwrap();
    let asked = outage.requests();
    assert_eq!(fs.chmod(attr.ino, 0o755).await.unwrap().perm, 0o755, "shown at once");
    assert_eq!(outage.requests(), asked, "nothing asked of the server");
    fs.flush(attr.ino, fh).await.unwrap();
    fs.release(attr.ino, fh).await.unwrap();
    assert_eq!(fs.getattr(attr.ino).unwrap().perm, 0o755);
    let seen_elsewhere = || async {
        let other = mount(s.alice.clone()).await;
        let ov = other.lookup(ROOT, n("V")).await.unwrap();
        let or = other.lookup(ov.ino, n("r")).await.unwrap();
        other.lookup(or.ino, n("run.sh")).await.unwrap().perm
    };
    assert_eq!(seen_elsewhere().await, 0o755, "sealed with the content");
    // After the save, a chmod is a request of its own again.
    let asked = outage.requests();
    assert_eq!(fs.chmod(attr.ino, 0o700).await.unwrap().perm, 0o700);
    assert!(outage.requests() > asked);
    assert_eq!(seen_elsewhere().await, 0o700);
    drop(s.server);
}

/// A failure-injecting mount of `s`'s user, with a new record `V/r`.
async fn faulty_in_record(
    s: &Setup,
) -> (Arc<VaultFs<FaultyRemote<MemoryRemote>>>, Outage, vaultfs::fs::core::Attr) {
    let (fs, outage) = mount_faulty(s.alice.clone()).await;
    let v = fs.lookup(ROOT, n("V")).await.unwrap();
    let r = fs.mkdir(v.ino, n("r")).await.unwrap();
    (fs, outage, r)
}

/// What another, fresh mount of the user sees in `V/r`: each name with its
/// content, mode and time.
async fn seen_by_another(s: &Setup) -> BTreeMap<String, (Vec<u8>, u16, std::time::SystemTime)> {
    let other = mount(s.alice.clone()).await;
    let v = other.lookup(ROOT, n("V")).await.unwrap();
    let r = other.lookup(v.ino, n("r")).await.unwrap();
    let mut seen = BTreeMap::new();
    for (ino, _, name) in other.readdir(r.ino).await.unwrap() {
        let attr = other.getattr(ino).unwrap();
        let data = read_file(&other, r.ino, name.to_str().unwrap()).await.unwrap();
        seen.insert(name.to_string_lossy().into_owned(), (data, attr.perm, attr.mtime));
    }
    seen
}

/// A new file reaches the server at its first save, with its content, mode
/// and time in one request (what tar -x does per file: create, write,
/// fchmod, futimens, close). Until then only this mount has it: another
/// sees nothing, and a full listing here keeps it. A file closed unwritten
/// (touch) is created empty; one unlinked before its first save costs no
/// request and leaves nothing; one renamed first is created, then renamed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_file_goes_up_with_its_content_in_one_request() {
    let s = setup(&["V"]).await;
    let (fs, outage, r) = faulty_in_record(&s).await;
    write_file(&fs, r.ino, "old.txt", b"old").await;

    let asked = outage.requests();
    let (a, fh) = fs.create(r.ino, n("a.txt"), 0o600).await.unwrap();
    fs.write(fh, 0, b"hello").await.unwrap();
    fs.chmod(a.ino, 0o640).await.unwrap();
    let when = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
    fs.setattr(a.ino, None, Some(when)).await.unwrap();
    assert_eq!(outage.requests(), asked, "nothing is sent before the first save");
    assert!(!seen_by_another(&s).await.contains_key("a.txt"));
    // A full listing of the vault (told to list again) keeps it here.
    tokio::time::sleep(vaultfs::fs::core::LISTING_TTL + std::time::Duration::from_millis(100)).await;
    let writer = mount(s.alice.clone()).await;
    let wv = writer.lookup(ROOT, n("V")).await.unwrap();
    write_file(&writer, writer.lookup(wv.ino, n("r")).await.unwrap().ino, "b.txt", b"b").await;
    outage.tell_to_relist(true);
    let listed = outage.listings();
    let names: Vec<_> = fs.readdir(r.ino).await.unwrap().into_iter().map(|(_, _, name)| name).collect();
    assert!(outage.listings() > listed, "listed whole");
    assert_eq!(names, ["a.txt", "b.txt", "old.txt"]);
    outage.tell_to_relist(false);

    let asked = outage.requests();
    fs.flush(a.ino, fh).await.unwrap();
    assert_eq!(outage.requests() - asked, 1, "one request creates it with its content");
    fs.release(a.ino, fh).await.unwrap();
    let seen = seen_by_another(&s).await;
    assert_eq!(seen["a.txt"], (b"hello".to_vec(), 0o640, when));
    assert_eq!(fs.getattr(a.ino).unwrap().size, 5);

    // touch: created empty, in one request.
    let asked = outage.requests();
    let (t, fh) = fs.create(r.ino, n("touched"), 0o644).await.unwrap();
    fs.flush(t.ino, fh).await.unwrap();
    fs.release(t.ino, fh).await.unwrap();
    assert_eq!(outage.requests() - asked, 1);
    assert_eq!(seen_by_another(&s).await["touched"].0, b"");

    // Unlinked before its first save: nothing sent, nothing left.
    let asked = outage.requests();
    let (g, fh) = fs.create(r.ino, n("gone"), 0o644).await.unwrap();
    fs.write(fh, 0, b"scratch").await.unwrap();
    fs.unlink(r.ino, n("gone")).await.unwrap();
    assert_eq!(fs.read(fh, 0, 100).await.unwrap().to_vec(), b"scratch", "still open");
    fs.flush(g.ino, fh).await.unwrap();
    fs.release(g.ino, fh).await.unwrap();
    assert_eq!(outage.requests(), asked, "never sent");
    // Renamed before its first save, over an existing file: created, then
    // renamed, and the content follows at the close.
    let (m, fh) = fs.create(r.ino, n("draft"), 0o644).await.unwrap();
    fs.write(fh, 0, b"final").await.unwrap();
    fs.rename(r.ino, n("draft"), r.ino, n("old.txt")).await.unwrap();
    fs.flush(m.ino, fh).await.unwrap();
    fs.release(m.ino, fh).await.unwrap();
    let seen = seen_by_another(&s).await;
    assert_eq!(seen.keys().collect::<Vec<_>>(), ["a.txt", "b.txt", "old.txt", "touched"]);
    assert_eq!(seen["old.txt"].0, b"final");
    drop(s.server);
}

/// The first save of a new file whose answer was lost is sent again as the
/// id the server already has: the file is taken as ours and the content goes
/// up over it (no second file, nothing lost). Against an older server (404
/// to the one-request create) files are created, then uploaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_first_save_and_an_older_server_lose_nothing() {
    let s = setup(&["V"]).await;
    let (fs, outage, r) = faulty_in_record(&s).await;
    let (a, fh) = fs.create(r.ino, n("a.txt"), 0o644).await.unwrap();
    fs.write(fh, 0, b"first").await.unwrap();
    outage.lose_upload_answers(true);
    assert!(fs.fsync(a.ino, fh).await.is_err(), "the answer was lost");
    outage.lose_upload_answers(false);
    fs.write(fh, 5, b" and more").await.unwrap();
    fs.flush(a.ino, fh).await.unwrap();
    fs.release(a.ino, fh).await.unwrap();
    let seen = seen_by_another(&s).await;
    assert_eq!(seen.keys().collect::<Vec<_>>(), ["a.txt"]);
    assert_eq!(seen["a.txt"].0, b"first and more");

    // A lock after a lost first save creates the file (409: it is there) and
    // asks for it; a manifest that does not open for it (here junk) is not
    // taken: the file keeps this mount's, and its content and mode go up.
    let (d, fh) = fs.create(r.ino, n("d.txt"), 0o640).await.unwrap();
    fs.write(fh, 0, b"locked").await.unwrap();
    outage.lose_upload_answers(true);
    assert!(fs.fsync(d.ino, fh).await.is_err(), "the answer was lost");
    outage.lose_upload_answers(false);
    outage.lie_about_files_asked_for(Some(Arc::new(|f: &mut vaultfs::protocol::FileInfo| {
        f.meta = vaultfs::protocol::Sealed(vec![7; 120]);
    })));
    use vaultfs::fs::core::LockKind::{Unlock, Write};
    let never = std::future::pending::<()>;
    fs.setlk(d.ino, fh, whole(1, Write), false, never()).await.unwrap();
    outage.lie_about_files_asked_for(None);
    fs.write(fh, 6, b" in").await.unwrap();
    fs.flush(d.ino, fh).await.unwrap();
    fs.setlk(d.ino, fh, whole(1, Unlock), false, never()).await.unwrap();
    fs.release(d.ino, fh).await.unwrap();
    let seen = seen_by_another(&s).await;
    assert_eq!((&seen["d.txt"].0[..], seen["d.txt"].1), (&b"locked in"[..], 0o640));

    outage.be_older_server(true);
    for (name, data) in [("b.txt", &b"bee"[..]), ("c.txt", &b"sea"[..])] {
        let asked = outage.requests();
        write_file(&fs, r.ino, name, data).await;
        // The first learns (404, then a create and an upload); the next
        // asks no more.
        assert_eq!(outage.requests() - asked, if name == "b.txt" { 3 } else { 2 }, "{name}");
    }
    let seen = seen_by_another(&s).await;
    assert_eq!(seen["b.txt"].0, b"bee");
    assert_eq!(seen["c.txt"].0, b"sea");
    drop(s.server);
}

/// Writes `data` through `fh` front to back in 1 MiB writes (past the
/// end-to-end limit, a stream to the server).
async fn write_in_pieces<R: vaultfs::remote::Remote>(fs: &Arc<VaultFs<R>>, fh: u64, data: &[u8]) {
    for (i, piece) in data.chunks(1 << 20).enumerate() {
        fs.write(fh, (i << 20) as u64, piece).await.unwrap();
    }
}

/// A file streamed up past the end-to-end limit and read back through the
/// writer's handle before it is closed: the stream is committed and the
/// bytes come from the server (the mount keeps none of what it sent; on a
/// real mount the kernel's own pages hid this until they were dropped).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_read_back_while_it_streams_up_reads_what_was_written() {
    let s = setup(&["V"]).await;
    let fs = mount(s.alice.clone()).await;
    let v = fs.lookup(ROOT, n("V")).await.unwrap();
    let r = fs.mkdir(v.ino, n("r")).await.unwrap();
    let data = pattern(6 << 20);
    let (a, fh) = fs.create(r.ino, n("big.bin"), 0o644).await.unwrap();
    write_in_pieces(&fs, fh, &data).await;
    assert_eq!(fs.getattr(a.ino).unwrap().size, data.len() as u64);
    assert!(fs.read(fh, 0, 8192).await.unwrap() == data[..8192], "read back while streaming");
    assert!(fs.read(fh, 5 << 20, 8192).await.unwrap() == data[5 << 20..(5 << 20) + 8192]);
    fs.release(a.ino, fh).await.unwrap();

    // Cut short while it streams: the cut keeps the front of what was written.
    let (cut, fh) = fs.create(r.ino, n("cut.bin"), 0o644).await.unwrap();
    write_in_pieces(&fs, fh, &data).await;
    fs.setattr(cut.ino, Some(3 << 20), None).await.unwrap();
    fs.flush(cut.ino, fh).await.unwrap();
    fs.release(cut.ino, fh).await.unwrap();
    // Emptied while it streams: it stays empty.
    let (empty, fh) = fs.create(r.ino, n("empty.bin"), 0o644).await.unwrap();
    write_in_pieces(&fs, fh, &data).await;
    fs.setattr(empty.ino, Some(0), None).await.unwrap();
    fs.flush(empty.ino, fh).await.unwrap();
    fs.release(empty.ino, fh).await.unwrap();
    // Moved to another record while it streams: the whole of it moves.
    let r2 = fs.mkdir(v.ino, n("r2")).await.unwrap();
    let (moved, fh) = fs.create(r.ino, n("moved.bin"), 0o644).await.unwrap();
    write_in_pieces(&fs, fh, &data).await;
    fs.rename(r.ino, n("moved.bin"), r2.ino, n("moved.bin")).await.unwrap();
    fs.release(moved.ino, fh).await.unwrap();

    let other = mount(s.alice.clone()).await;
    let ov = other.lookup(ROOT, n("V")).await.unwrap();
    let or = other.lookup(ov.ino, n("r")).await.unwrap();
    assert!(read_file(&other, or.ino, "big.bin").await.unwrap() == data);
    assert!(read_file(&other, or.ino, "cut.bin").await.unwrap() == data[..3 << 20], "cut while streaming");
    assert_eq!(read_file(&other, or.ino, "empty.bin").await.unwrap(), b"", "emptied while streaming");
    let or2 = other.lookup(ov.ino, n("r2")).await.unwrap();
    assert!(read_file(&other, or2.ino, "moved.bin").await.unwrap() == data, "moved while streaming");
}

/// A new file unlinked before its first save leaves nothing on the server,
/// even when something created it there meanwhile (written past the
/// end-to-end limit: a stream needs the file there), or when its first save
/// got no answer (it may have been stored).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unlinked_new_file_leaves_nothing_on_the_server() {
    let s = setup(&["V"]).await;
    let (fs, outage, r) = faulty_in_record(&s).await;
    write_file(&fs, r.ino, "kept", b"kept").await;

    let (big, fh) = fs.create(r.ino, n("big.tmp"), 0o600).await.unwrap();
    fs.unlink(r.ino, n("big.tmp")).await.unwrap();
    let data = pattern(6 << 20);
    for (i, piece) in data.chunks(1 << 20).enumerate() {
        fs.write(fh, (i << 20) as u64, piece).await.unwrap();
    }
    assert!(fs.read(fh, 0, 4096).await.unwrap() == data[..4096]);
    fs.release(big.ino, fh).await.unwrap();

    let (lost, fh) = fs.create(r.ino, n("lost"), 0o600).await.unwrap();
    fs.write(fh, 0, b"maybe stored").await.unwrap();
    outage.lose_upload_answers(true);
    assert!(fs.fsync(lost.ino, fh).await.is_err(), "the answer was lost");
    outage.lose_upload_answers(false);
    fs.unlink(r.ino, n("lost")).await.unwrap();
    fs.release(lost.ino, fh).await.unwrap();

    // Deleted in the background since their last close.
    fs.deletes_settled(None).await;
    assert_eq!(seen_by_another(&s).await.keys().collect::<Vec<_>>(), ["kept"]);
    drop(s.server);
}

/// A lying server that answers a save with a conflict copy nobody asked for
/// (an end-to-end file's save never asks for one) is not believed: the save
/// fails, the content stays unsaved here and goes up once the server stops
/// lying, for a new file's first save and for a later one alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflict_copy_nobody_asked_for_does_not_drop_the_content() {
    let s = setup(&["V"]).await;
    let (fs, outage, r) = faulty_in_record(&s).await;
    let (a, fh) = fs.create(r.ino, n("a.txt"), 0o644).await.unwrap();
    fs.write(fh, 0, b"first").await.unwrap();
    outage.invent_conflict_copies(true);
    assert!(fs.fsync(a.ino, fh).await.is_err(), "a first save answered with a copy");
    fs.write(fh, 0, b"FIRST").await.unwrap();
    assert!(fs.fsync(a.ino, fh).await.is_err(), "a later save answered with a copy");
    assert_eq!(fs.read(fh, 0, 100).await.unwrap().to_vec(), b"FIRST", "still here");
    outage.invent_conflict_copies(false);
    fs.flush(a.ino, fh).await.unwrap();
    fs.release(a.ino, fh).await.unwrap();
    assert_eq!(seen_by_another(&s).await["a.txt"].0, b"FIRST");
    drop(s.server);
}

/// A file's modification time is that of its last change, before and after
/// the save that stores it: a new file closed later (pjdfstest keeps its
/// descriptor open, and a forked child's close saves it) shows the same time
/// throughout, to the nanosecond.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_save_keeps_the_time_of_the_last_change() {
    let s = setup(&["V"]).await;
    let (fs, _outage, r) = faulty_in_record(&s).await;
    let (a, fh) = fs.create(r.ino, n("a.txt"), 0o644).await.unwrap();
    let created = fs.getattr(a.ino).unwrap().mtime;
    tokio::time::sleep(std::time::Duration::from_millis(30)).await;
    fs.flush(a.ino, fh).await.unwrap();
    assert_eq!(fs.getattr(a.ino).unwrap().mtime, created, "the first save");
    fs.write(fh, 0, b"x").await.unwrap();
    let written = fs.getattr(a.ino).unwrap().mtime;
    assert!(written > created);
    tokio::time::sleep(std::time::Duration::from_millis(30)).await;
    fs.flush(a.ino, fh).await.unwrap();
    fs.release(a.ino, fh).await.unwrap();
    assert_eq!(fs.getattr(a.ino).unwrap().mtime, written, "a later save");
    assert_eq!(seen_by_another(&s).await["a.txt"].2, written, "as stored");
    drop(s.server);
}

/// What a backing file holds, read through its descriptor (as the kernel
/// reads it for a passthrough handle).
fn backing_bytes(b: &vaultfs::fs::core::Backing) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::from(b.fd().try_clone_to_owned().unwrap());
    let mut out = vec![0u8; b.len() as usize + 100];
    let n = file.read_at(&mut out, 0).unwrap();
    out.truncate(n);
    out
}

fn how(flags: i32) -> vaultfs::fs::core::OpenHow {
    vaultfs::fs::core::OpenHow::from_flags(flags)
}

/// Opens `ino` for reading only until the kernel is told to read it from a
/// backing file: an open whose kernel pages are good keeps reading those
/// while the backing file is made in the background, for the next open.
async fn open_passthrough<R: vaultfs::remote::Remote>(
    fs: &Arc<VaultFs<R>>,
    ino: u64,
) -> (u64, vaultfs::fs::core::KernelOpen) {
    use vaultfs::fs::core::KernelOpen;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (fh, k) = fs.open_for_kernel(ino, how(libc::O_RDONLY)).await.unwrap();
        if matches!(k, KernelOpen::Passthrough { .. }) {
            return (fh, k);
        }
        assert!(matches!(k, KernelOpen::PageCache { keep: true }), "only good kernel pages wait for one");
        fs.release(ino, fh).await.unwrap();
        assert!(std::time::Instant::now() < deadline, "no backing file was made");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_handles_share_one_backing_file_that_follows_every_change() {
    use vaultfs::fs::core::{KernelOpen, PassthroughMode, PASSTHROUGH_MIN};
    let s = setup(&["V"]).await;
    let fs = mount(s.alice.clone()).await;
    fs.set_passthrough(PassthroughMode::On);
    let v = fs.lookup(ROOT, n("V")).await.unwrap();
    let r = fs.mkdir(v.ino, n("r")).await.unwrap();
    let data = pattern(PASSTHROUGH_MIN as usize * 4);
    let ino = write_file(&fs, r.ino, "big.bin", &data).await;
    let small = write_file(&fs, r.ino, "small.txt", b"small").await;

    // Written just now, the kernel's pages are good: an open reads those, and
    // nothing is copied while it does; its backing file is made at its close.
    let (w0, k0) = fs.open_for_kernel(ino, how(libc::O_RDONLY)).await.unwrap();
    assert!(matches!(k0, KernelOpen::PageCache { keep: true }));
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert_eq!(fs.status().backing_bytes, 0, "a copy made while the kernel reads its pages");
    fs.release(ino, w0).await.unwrap();
    // Reads only, large enough: the kernel reads from a backing file, one per file.
    let (r1, k1) = open_passthrough(&fs, ino).await;
    let KernelOpen::Passthrough { backing: b1, direct: false } = k1 else { panic!("no backing file") };
    assert!(backing_bytes(&b1) == data);
    let (r2, k2) = fs.open_for_kernel(ino, how(libc::O_RDONLY)).await.unwrap();
    let KernelOpen::Passthrough { backing: b2, direct: false } = k2 else { panic!("no backing file") };
    assert!(Arc::ptr_eq(&b1, &b2), "the kernel wants one backing file per inode");
    // Small files keep the page cache.
    let (sh, sk) = fs.open_for_kernel(small, how(libc::O_RDONLY)).await.unwrap();
    assert!(matches!(sk, KernelOpen::PageCache { .. }), "a small file has no backing file");
    fs.release(small, sh).await.unwrap();

    // Opened for writing next to them: names the same backing file, with direct I/O.
    let (w, kw) = fs.open_for_kernel(ino, how(libc::O_RDWR)).await.unwrap();
    let KernelOpen::Passthrough { backing: bw, direct: true } = kw else {
        panic!("a writer must name the backing file")
    };
    assert!(Arc::ptr_eq(&b1, &bw));
    // Every change reaches the backing file before it is answered.
    fs.write(w, 10, b"changed").await.unwrap();
    let mut want = data.clone();
    want[10..17].copy_from_slice(b"changed");
    assert!(backing_bytes(&b1) == want, "a write");
    fs.write(w, want.len() as u64, b"grown").await.unwrap();
    want.extend_from_slice(b"grown");
    assert!(backing_bytes(&b1) == want, "a write past the end");
    fs.setattr(ino, Some(300_000), None).await.unwrap();
    want.truncate(300_000);
    assert!(backing_bytes(&b1) == want, "a truncation");
    fs.flush(ino, w).await.unwrap();
    fs.release(ino, w).await.unwrap();
    assert_eq!(fs.status().backing_bytes, 300_000);

    // Another client's version shows in the backing file at the next open.
    let other = mount(s.alice.clone()).await;
    let ov = other.lookup(ROOT, n("V")).await.unwrap();
    let or = other.lookup(ov.ino, n("r")).await.unwrap();
    assert!(read_file(&other, or.ino, "big.bin").await.unwrap() == want, "the writes were saved");
    let newer = pattern(PASSTHROUGH_MIN as usize * 2 + 3);
    let oa = other.lookup(or.ino, n("big.bin")).await.unwrap();
    let oh = other.open(oa.ino, true, true).await.unwrap();
    other.write(oh, 0, &newer).await.unwrap();
    other.flush(oa.ino, oh).await.unwrap();
    other.release(oa.ino, oh).await.unwrap();
    let (r3, k3) = fs.open_for_kernel(ino, how(libc::O_RDONLY)).await.unwrap();
    // Read from it if the new version was whole here at the open (counted
    // then), else with direct I/O until it is: the download races the open.
    let KernelOpen::Passthrough { backing: b3, direct: d3 } = k3 else { panic!("no backing file") };
    assert!(Arc::ptr_eq(&b1, &b3), "still the one the open handles name");
    // Once downloaded (a read waits for it), for the handles opened before too.
    assert!(fs.read(r3, 0, u32::MAX).await.unwrap().to_vec() == newer);
    // The download task copies it in just after its last piece, which the
    // read above may have returned before.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while backing_bytes(&b1) != newer && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert!(backing_bytes(&b1) == newer, "the new version, for the handles opened before too");

    // Not kept after the last handle once a writer named it (a shared map of
    // its handle could go on writing into it)...
    for fh in [r1, r2, r3] {
        fs.release(ino, fh).await.unwrap();
    }
    drop((b1, b2, bw, b3));
    assert_eq!(fs.status().backing_bytes, 0);
    assert_eq!(fs.status().passthrough_opens, if d3 { 2 } else { 3 }, "opens that read from it");
    // ...else kept for the next open.
    let (r4, k4) = open_passthrough(&fs, ino).await;
    let KernelOpen::Passthrough { backing: b4, .. } = k4 else { panic!("no backing file") };
    assert!(backing_bytes(&b4) == newer);
    fs.release(ino, r4).await.unwrap();
    assert_eq!(fs.status().backing_bytes, newer.len() as u64);
    let (r5, k5) = fs.open_for_kernel(ino, how(libc::O_RDONLY)).await.unwrap();
    let KernelOpen::Passthrough { backing: b5, .. } = k5 else { panic!("no backing file") };
    assert!(Arc::ptr_eq(&b4, &b5), "the one kept");
    fs.release(ino, r5).await.unwrap();
    drop((b4, b5));
    // It goes with the file.
    fs.unlink(r.ino, n("big.bin")).await.unwrap();
    assert_eq!(fs.status().backing_bytes, 0);
    drop(s.server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_stays_off_where_the_kernel_would_refuse_it() {
    use vaultfs::fs::core::{KernelOpen, PassthroughMode, PASSTHROUGH_MIN};
    let s = setup(&["V"]).await;
    let fs = mount(s.alice.clone()).await;
    let v = fs.lookup(ROOT, n("V")).await.unwrap();
    let r = fs.mkdir(v.ino, n("r")).await.unwrap();
    let data = pattern(PASSTHROUGH_MIN as usize * 2);
    let ino = write_file(&fs, r.ino, "big.bin", &data).await;

    // Not turned on (no kernel): the page cache.
    let (fh, k) = fs.open_for_kernel(ino, how(libc::O_RDONLY)).await.unwrap();
    assert!(matches!(k, KernelOpen::PageCache { .. }));
    fs.release(ino, fh).await.unwrap();

    // A handle on the page cache first: readers use it too (the kernel
    // refuses a backing file next to it).
    fs.set_passthrough(PassthroughMode::On);
    let (w, kw) = fs.open_for_kernel(ino, how(libc::O_RDWR)).await.unwrap();
    assert!(matches!(kw, KernelOpen::PageCache { .. }));
    let (r1, k1) = fs.open_for_kernel(ino, how(libc::O_RDONLY)).await.unwrap();
    assert!(matches!(k1, KernelOpen::PageCache { .. }), "no backing file next to a page-cache handle");
    fs.release(ino, w).await.unwrap();
    fs.release(ino, r1).await.unwrap();
    // Write-only and O_DIRECT opens never read from a backing file.
    let (wo, kwo) = fs.open_for_kernel(ino, how(libc::O_WRONLY)).await.unwrap();
    assert!(matches!(kwo, KernelOpen::Direct { .. }));
    fs.release(ino, wo).await.unwrap();
    let (d, kd) = fs.open_for_kernel(ino, how(libc::O_RDONLY | libc::O_DIRECT)).await.unwrap();
    assert!(matches!(kd, KernelOpen::PageCache { .. }));
    fs.release(ino, d).await.unwrap();

    // The kernel refused one: direct I/O for it, and no more are made.
    let (r2, k2) = open_passthrough(&fs, ino).await;
    drop(k2);
    fs.passthrough_refused(r2, "Operation not permitted");
    assert!(matches!(fs.passthrough_mode(), PassthroughMode::Off(_)));
    assert_eq!(fs.status().backing_bytes, 0, "the refused backing file is gone");
    let (r3, k3) = fs.open_for_kernel(ino, how(libc::O_RDONLY)).await.unwrap();
    assert!(matches!(k3, KernelOpen::PageCache { .. }), "the page cache goes with the demoted handle");
    fs.release(ino, r2).await.unwrap();
    fs.release(ino, r3).await.unwrap();
    drop(s.server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backing_files_stay_within_the_cache_budget() {
    use vaultfs::fs::core::{KernelOpen, PassthroughMode, PASSTHROUGH_MIN};
    let s = setup(&["V"]).await;
    let size = PASSTHROUGH_MIN as usize * 4;
    // Room for the file and one copy of it, not two files and their copies.
    let options = FsOptions { cache_budget: size * 3, ..strict() };
    let account = Unlocked::open(s.alice.clone(), b"pw").await.unwrap();
    let fs = Arc::new(VaultFs::new(account, options).await.unwrap());
    fs.set_passthrough(PassthroughMode::On);
    let v = fs.lookup(ROOT, n("V")).await.unwrap();
    let r = fs.mkdir(v.ino, n("r")).await.unwrap();
    let a = write_file(&fs, r.ino, "a.bin", &pattern(size)).await;
    let b = write_file(&fs, r.ino, "b.bin", &pattern(size)).await;
    let (ha, ka) = open_passthrough(&fs, a).await;
    assert!(matches!(ka, KernelOpen::Passthrough { .. }));
    // The first open of b would have one made in the background: none is.
    let (hb, _) = fs.open_for_kernel(b, how(libc::O_RDONLY)).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    fs.release(b, hb).await.unwrap();
    let (hb, kb) = fs.open_for_kernel(b, how(libc::O_RDONLY)).await.unwrap();
    assert!(matches!(kb, KernelOpen::PageCache { .. }), "over the budget: the page cache");
    let st = fs.status();
    assert!(st.cache_used + st.backing_bytes <= st.cache_budget, "{st:?}");
    fs.release(a, ha).await.unwrap();
    fs.release(b, hb).await.unwrap();
    drop(s.server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unlink_and_rmdir_answer_at_once_and_the_server_deletes_in_the_background() {
    let s = setup(&["V"]).await;
    let (fs, outage) = mount_faulty(s.alice.clone()).await;
    let v = fs.lookup(ROOT, n("V")).await.unwrap();
    let p = fs.mkdir(v.ino, n("p")).await.unwrap();
    let r = fs.mkdir(p.ino, n("r")).await.unwrap();
    fs.mkdir(v.ino, n("q")).await.unwrap();
    // q on the server too (p and r go with r's first file).
    fs.fsyncdir(v.ino).await.unwrap();
    let names: Vec<String> = (0..20).map(|i| format!("f{i}")).collect();
    for name in &names {
        write_file(&fs, r.ino, name, b"content").await;
    }
    // The server cannot be reached: unlink and rmdir still answer, and what
    // they removed is gone here, a record in a record too.
    outage.set(true);
    for name in &names {
        fs.unlink(r.ino, n(name)).await.unwrap();
    }
    assert!(fs.readdir(r.ino).await.unwrap().is_empty(), "gone from the mount");
    assert_eq!(fs.status().deleting, 20);
    fs.rmdir(p.ino, n("r")).await.unwrap();
    fs.rmdir(v.ino, n("p")).await.unwrap();
    fs.rmdir(v.ino, n("q")).await.unwrap();
    assert!(matches!(fs.lookup(v.ino, n("p")).await, Err(FsError::NotFound)));
    assert!(matches!(fs.lookup(v.ino, n("q")).await, Err(FsError::NotFound)));
    assert_eq!(fs.status().deleting, 23);
    // Still on the server.
    let other = mount(s.alice.clone()).await;
    let ov = other.lookup(ROOT, n("V")).await.unwrap();
    let op = other.lookup(ov.ino, n("p")).await.unwrap();
    let or = other.lookup(op.ino, n("r")).await.unwrap();
    assert_eq!(other.readdir(or.ino).await.unwrap().len(), 20);
    // Another client puts a file into q before the server hears of its rmdir.
    let oq = other.lookup(ov.ino, n("q")).await.unwrap();
    write_file(&other, oq.ino, "theirs.txt", b"keep me").await;
    // The server is back: everything goes, each record after what was in it;
    // q is refused (not empty) and shows again, with their file.
    outage.set(false);
    tokio::time::timeout(std::time::Duration::from_secs(10), fs.deletes_settled(None)).await.unwrap();
    assert_eq!(fs.status().deleting, 0);
    let third = mount(s.alice.clone()).await;
    let tv = third.lookup(ROOT, n("V")).await.unwrap();
    assert!(matches!(third.lookup(tv.ino, n("p")).await, Err(FsError::NotFound)), "deleted on the server");
    let q = fs.lookup(v.ino, n("q")).await.expect("a refused rmdir shows the record again");
    assert!(read_file(&fs, q.ino, "theirs.txt").await.unwrap() == b"keep me");
    assert!(fs.status().refused.iter().any(|r| r.contains("delete refused")), "the refusal is noted");
    drop(s.server);
}

/// `rm -r` of many files sends few requests: what queued while a request
/// was out goes in the next one. A server that does not know deletes in one
/// request, or answers them with the wrong number of outcomes (a lying
/// server), gets one request per object, and everything is still deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletes_go_many_per_request_or_one_by_one_to_a_server_that_cannot() {
    for server in ["batches", "older", "short answers"] {
        let s = setup(&["V"]).await;
        let (fs, outage) = mount_faulty(s.alice.clone()).await;
        let v = fs.lookup(ROOT, n("V")).await.unwrap();
        let r = fs.mkdir(v.ino, n("r")).await.unwrap();
        for i in 0..100 {
            write_file(&fs, r.ino, &format!("f{i}"), b"content").await;
        }
        outage.be_older_server(server == "older");
        outage.short_delete_answers(server == "short answers");
        outage.hold_file_deletes(true);
        for i in 0..100 {
            fs.unlink(r.ino, n(&format!("f{i}"))).await.unwrap();
        }
        fs.rmdir(v.ino, n("r")).await.unwrap();
        let before = outage.requests();
        outage.hold_file_deletes(false);
        tokio::time::timeout(std::time::Duration::from_secs(10), fs.deletes_settled(None))
            .await
            .unwrap_or_else(|_| panic!("{server}: deletes never settled"));
        let requests = outage.requests() - before;
        assert!(fs.status().refused.is_empty(), "{server}: {:?}", fs.status().refused);
        let other = mount(s.alice.clone()).await;
        let ov = other.lookup(ROOT, n("V")).await.unwrap();
        assert!(matches!(other.lookup(ov.ino, n("r")).await, Err(FsError::NotFound)), "{server}");
        if server == "batches" {
            assert!(requests < 20, "{requests} requests for 101 deletes");
        } else {
            assert!(requests >= 101, "{server}: {requests} requests");
        }
        drop(s.server);
    }
}

/// A delete that waited long for the server does not take another client's
/// later work with it: a file written elsewhere meanwhile is kept (and the
/// refusal noted). Heard of soon, a change elsewhere does not stop unlink.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_that_waited_long_keeps_a_file_written_elsewhere() {
    let s = setup(&["V"]).await;
    let (fs, outage, r) = faulty_in_record(&s).await;
    write_file(&fs, r.ino, "soon", b"ours").await;
    write_file(&fs, r.ino, "late", b"ours").await;
    let other = mount(s.alice.clone()).await;
    let ov = other.lookup(ROOT, n("V")).await.unwrap();
    let or = other.lookup(ov.ino, n("r")).await.unwrap();
    // Changed elsewhere just before the unlink reaches the server: it goes.
    outage.set(true);
    fs.unlink(r.ino, n("soon")).await.unwrap();
    write_over(&other, or.ino, "soon", b"theirs, soon").await;
    outage.set(false);
    tokio::time::timeout(std::time::Duration::from_secs(10), fs.deletes_settled(None)).await.unwrap();
    assert!(!seen_by_another(&s).await.contains_key("soon"), "deleted, as unlink always did");
    // Written elsewhere while the server could not be reached for longer.
    outage.set(true);
    fs.unlink(r.ino, n("late")).await.unwrap();
    write_over(&other, or.ino, "late", b"theirs, later").await;
    tokio::time::sleep(std::time::Duration::from_millis(10_500)).await;
    outage.set(false);
    tokio::time::timeout(std::time::Duration::from_secs(70), fs.deletes_settled(None)).await.unwrap();
    assert_eq!(seen_by_another(&s).await["late"].0, b"theirs, later", "their work is kept");
    assert!(fs.status().refused.iter().any(|r| r.contains("changed elsewhere")), "{:?}", fs.status().refused);
    drop(s.server);
}

/// rename(2) over an empty directory whose contents were removed just now
/// (their deletes still on their way) replaces it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_emptied_just_now_can_be_renamed_over() {
    let s = setup(&["V"]).await;
    let fs = mount(s.alice.clone()).await;
    let v = fs.lookup(ROOT, n("V")).await.unwrap();
    let a = fs.mkdir(v.ino, n("a")).await.unwrap();
    let b = fs.mkdir(v.ino, n("b")).await.unwrap();
    let c = fs.mkdir(b.ino, n("c")).await.unwrap();
    write_file(&fs, c.ino, "f", b"x").await;
    write_file(&fs, b.ino, "g", b"x").await;
    fs.unlink(c.ino, n("f")).await.unwrap();
    fs.rmdir(b.ino, n("c")).await.unwrap();
    fs.unlink(b.ino, n("g")).await.unwrap();
    fs.rename(v.ino, n("a"), v.ino, n("b")).await.unwrap();
    assert_eq!(fs.lookup(v.ino, n("b")).await.unwrap().ino, a.ino);
    drop(s.server);
}

/// A record removed here is deleted on the server only after the files
/// unlinked from it are: the server refuses a record that is not empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_is_deleted_after_its_files() {
    let s = setup(&["V"]).await;
    let (fs, outage) = mount_faulty(s.alice.clone()).await;
    let v = fs.lookup(ROOT, n("V")).await.unwrap();
    let r = fs.mkdir(v.ino, n("r")).await.unwrap();
    write_file(&fs, r.ino, "f", b"content").await;
    outage.hold_file_deletes(true);
    fs.unlink(r.ino, n("f")).await.unwrap();
    fs.rmdir(v.ino, n("r")).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(fs.status().deleting, 2, "the record waits for its file");
    outage.hold_file_deletes(false);
    tokio::time::timeout(std::time::Duration::from_secs(10), fs.deletes_settled(None)).await.unwrap();
    assert!(fs.status().refused.is_empty(), "{:?}", fs.status().refused);
    let other = mount(s.alice.clone()).await;
    let ov = other.lookup(ROOT, n("V")).await.unwrap();
    assert!(matches!(other.lookup(ov.ino, n("r")).await, Err(FsError::NotFound)), "deleted on the server");
    drop(s.server);
}

/// The names of `dir`'s entries as another mount of the user sees them
/// (`dir`: a path from the vault V down).
async fn names_seen_by_another(s: &Setup, dir: &[&str]) -> Vec<String> {
    let other = mount(s.alice.clone()).await;
    let mut at = other.lookup(ROOT, n("V")).await.unwrap().ino;
    for name in dir {
        at = other.lookup(at, n(name)).await.unwrap().ino;
    }
    let mut names: Vec<String> = other
        .readdir(at)
        .await
        .unwrap()
        .into_iter()
        .map(|(_, _, name)| name.to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// A directory made here goes to the server with the first file saved in
/// it: mkdir asks nothing, and the directory and its first file take one
/// request (what `tar -x` pays per directory). Records above it that are not
/// there yet go first, on their own. Until then a listing keeps it; an
/// rmdir sends nothing; a rename sends it first; one nothing is saved in is
/// sent on its own shortly after. A server that does not know records with
/// files answers 404: the record goes alone, then the file, and from then
/// on records go first. A lost answer is made sure of.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_directory_goes_to_the_server_with_its_first_file() {
    use vaultfs::remote::Remote;
    let s = setup(&["V"]).await;
    let (fs, outage) = mount_faulty(s.alice.clone()).await;
    let v = fs.lookup(ROOT, n("V")).await.unwrap();
    fs.readdir(v.ino).await.unwrap();
    let vault: vaultfs::ids::VaultId =
        String::from_utf8(fs.getxattr(v.ino, n(vaultfs::fs::core::XATTR_ID)).unwrap())
            .unwrap()
            .parse()
            .unwrap();
    let on_server = || async { s.alice.records(vault).await.unwrap().len() };

    let asked = outage.requests();
    let d = fs.mkdir(v.ino, n("d")).await.unwrap();
    assert_eq!(outage.requests(), asked, "mkdir asked the server");
    assert_eq!(on_server().await, 0);
    write_file(&fs, d.ino, "a.txt", b"first").await;
    assert_eq!(outage.requests() - asked, 1, "the directory and its file in one request");
    assert_eq!(names_seen_by_another(&s, &["d"]).await, ["a.txt"]);

    // Nested: the outer record alone, the inner with its file.
    let asked = outage.requests();
    let p = fs.mkdir(v.ino, n("p")).await.unwrap();
    let q = fs.mkdir(p.ino, n("q")).await.unwrap();
    write_file(&fs, q.ino, "b.txt", b"second").await;
    assert_eq!(outage.requests() - asked, 2, "p alone, then q with b.txt");
    assert_eq!(names_seen_by_another(&s, &["p", "q"]).await, ["b.txt"]);

    // Removed before it was sent: nothing is sent, ever (listings keep one
    // not sent yet: the tree's unit tests).
    let records = on_server().await;
    let e = fs.mkdir(v.ino, n("e")).await.unwrap();
    fs.mkdir(e.ino, n("inner")).await.unwrap();
    assert_eq!(fs.readdir(e.ino).await.unwrap().len(), 1);
    assert!(matches!(fs.rmdir(v.ino, n("e")).await, Err(FsError::NotEmpty)));
    fs.rmdir(e.ino, n("inner")).await.unwrap();
    fs.rmdir(v.ino, n("e")).await.unwrap();
    assert!(matches!(fs.lookup(v.ino, n("e")).await, Err(FsError::NotFound)));

    // Renamed and moved before it was sent: here only; over an empty one
    // not sent either, which goes here only. Then sent under its name.
    let asked = outage.requests();
    let g = fs.mkdir(v.ino, n("g")).await.unwrap();
    let k = fs.mkdir(v.ino, n("k")).await.unwrap();
    fs.mkdir(v.ino, n("h")).await.unwrap();
    fs.rename(v.ino, n("g"), k.ino, n("g2")).await.unwrap();
    fs.rename(k.ino, n("g2"), v.ino, n("h")).await.unwrap();
    assert!(matches!(fs.rename(v.ino, n("h"), v.ino, n("d")).await, Err(FsError::NotEmpty)));
    assert_eq!(outage.requests(), asked, "renames of directories not sent asked the server");
    assert_eq!(fs.lookup(v.ino, n("h")).await.unwrap().ino, g.ino);
    write_file(&fs, g.ino, "c.txt", b"third").await;
    assert_eq!(outage.requests() - asked, 1, "h with c.txt");
    assert_eq!(names_seen_by_another(&s, &["h"]).await, ["c.txt"]);
    fs.rmdir(v.ino, n("k")).await.unwrap();
    // A first file over the bound: the directory goes alone first, so no
    // save in it waits for a long upload.
    let asked = outage.requests();
    let big = fs.mkdir(v.ino, n("big")).await.unwrap();
    write_file(&fs, big.ino, "big.bin", &pattern(2 << 20)).await;
    assert_eq!(outage.requests() - asked, 2, "the record alone, then the file");

    // Nothing saved in it: sent on its own shortly after, as is a record
    // made in it (fsyncdir sends at once).
    fs.mkdir(v.ino, n("lone")).await.unwrap();
    let x = fs.mkdir(d.ino, n("x")).await.unwrap();
    fs.mkdir(x.ino, n("y")).await.unwrap();
    fs.fsyncdir(x.ino).await.unwrap();
    assert_eq!(names_seen_by_another(&s, &["d", "x"]).await, ["y"]);
    tokio::time::sleep(vaultfs::fs::core::SEND_NEW_DIR_AFTER + std::time::Duration::from_millis(300)).await;
    assert_eq!(names_seen_by_another(&s, &[]).await, ["big", "d", "h", "lone", "p"]);
    // e and inner were never sent, nor deleted: only these were made.
    assert_eq!(on_server().await, records + 5, "h, big, lone, x, y");
    assert_eq!(fs.status().deleting, 0);

    // The answer lost: the next save makes sure of the record and the file.
    let z = fs.mkdir(v.ino, n("z")).await.unwrap();
    let (f, fh) = fs.create(z.ino, n("f.txt"), 0o644).await.unwrap();
    fs.write(fh, 0, b"lost?").await.unwrap();
    outage.lose_upload_answers(true);
    assert!(fs.fsync(f.ino, fh).await.is_err(), "the answer was lost");
    outage.lose_upload_answers(false);
    fs.write(fh, 5, b" no").await.unwrap();
    fs.flush(f.ino, fh).await.unwrap();
    fs.release(f.ino, fh).await.unwrap();
    let other = mount(s.alice.clone()).await;
    let ov = other.lookup(ROOT, n("V")).await.unwrap();
    let oz = other.lookup(ov.ino, n("z")).await.unwrap();
    assert_eq!(read_file(&other, oz.ino, "f.txt").await.unwrap(), b"lost? no");

    // Moved here only under another not sent yet: that one goes first, then
    // this one with its file.
    let asked = outage.requests();
    let outer = fs.mkdir(v.ino, n("outer")).await.unwrap();
    let moved = fs.mkdir(v.ino, n("moved")).await.unwrap();
    fs.rename(v.ino, n("moved"), outer.ino, n("in")).await.unwrap();
    write_file(&fs, moved.ino, "m.txt", b"moved").await;
    assert_eq!(outage.requests() - asked, 2, "outer alone, then in with m.txt");
    assert_eq!(names_seen_by_another(&s, &["outer", "in"]).await, ["m.txt"]);
    // Not sent while the server is down: tried again until it is back.
    outage.set(true);
    fs.mkdir(v.ino, n("offline")).await.unwrap();
    tokio::time::sleep(vaultfs::fs::core::SEND_NEW_DIR_AFTER + std::time::Duration::from_millis(300)).await;
    outage.set(false);
    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    assert!(
        names_seen_by_another(&s, &[]).await.contains(&"offline".to_string()),
        "sent once the server was back"
    );

    // A server that says a new record exists, and makes none: not believed
    // until its listing names it (the directory stays unsent, sent later).
    let liar = fs.mkdir(v.ino, n("liar")).await.unwrap();
    outage.claim_records_exist(true);
    assert!(fs.fsyncdir(liar.ino).await.is_err(), "a record said to exist but not listed");
    outage.claim_records_exist(false);
    fs.fsyncdir(liar.ino).await.unwrap();
    assert_eq!(names_seen_by_another(&s, &["liar"]).await, Vec::<String>::new());

    // A server that ignores the record's headers.
    outage.ignore_records_with_files(true);
    for name in ["old1", "old2"] {
        let asked = outage.requests();
        let o = fs.mkdir(v.ino, n(name)).await.unwrap();
        write_file(&fs, o.ino, "f.txt", name.as_bytes()).await;
        // The first learns (404, the record, the file); the next sends the
        // record first.
        assert_eq!(outage.requests() - asked, if name == "old1" { 3 } else { 2 }, "{name}");
        assert_eq!(names_seen_by_another(&s, &[name]).await, ["f.txt"]);
    }
    drop(s.server);
}

/// rename(2) is all or nothing: a rename over a file or an empty directory
/// that fails on the server leaves what it would have replaced, here and
/// there (it used to be deleted first). Once the rename goes through, the
/// replaced entry goes, and another client listing then sees one name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rename_that_fails_on_the_server_replaces_nothing() {
    let s = setup(&["V"]).await;
    let (fs, outage) = mount_faulty(s.alice.clone()).await;
    let v = fs.lookup(ROOT, n("V")).await.unwrap();
    let r = fs.mkdir(v.ino, n("r")).await.unwrap();
    let other_r = fs.mkdir(v.ino, n("o")).await.unwrap();
    write_file(&fs, r.ino, "target.txt", b"keep me").await;
    write_file(&fs, r.ino, "new.txt", b"new").await;
    write_file(&fs, other_r.ino, "moved.txt", b"moved").await;
    for d in ["d1", "d2"] {
        let d = fs.mkdir(r.ino, n(d)).await.unwrap();
        fs.fsyncdir(d.ino).await.unwrap();
    }
    let listed = ["d1", "d2", "new.txt", "target.txt"];
    assert_eq!(names_seen_by_another(&s, &["r"]).await, listed);

    // Renames in one record, of a file and of a directory, cut off.
    outage.fail_updates(true);
    let err = fs.rename(r.ino, n("new.txt"), r.ino, n("target.txt")).await.unwrap_err();
    assert_eq!(err.errno(), libc::EIO, "{err}");
    let err = fs.rename(r.ino, n("d1"), r.ino, n("d2")).await.unwrap_err();
    assert_eq!(err.errno(), libc::EIO, "{err}");
    outage.fail_updates(false);
    // A move to another record (a new file there, then the old one deleted)
    // whose upload's answer is lost.
    outage.lose_upload_answers(true);
    assert!(fs.rename(other_r.ino, n("moved.txt"), r.ino, n("target.txt")).await.is_err());
    outage.lose_upload_answers(false);
    assert_eq!(read_file(&fs, r.ino, "target.txt").await.unwrap(), b"keep me");
    assert!(fs.lookup(r.ino, n("d2")).await.is_ok());
    // Nothing gone, and nothing more: the file made for the move is deleted.
    assert_eq!(names_seen_by_another(&s, &["r"]).await, listed);
    assert_eq!(fs.status().deleting, 0);
    assert_eq!(names_seen_by_another(&s, &["o"]).await, ["moved.txt"]);
    let other = mount(s.alice.clone()).await;
    let ov = other.lookup(ROOT, n("V")).await.unwrap();
    let or = other.lookup(ov.ino, n("r")).await.unwrap();
    assert_eq!(read_file(&other, or.ino, "target.txt").await.unwrap(), b"keep me");

    // Through: the replaced file and directory go, here and on the server.
    fs.rename(r.ino, n("new.txt"), r.ino, n("target.txt")).await.unwrap();
    fs.rename(r.ino, n("d1"), r.ino, n("d2")).await.unwrap();
    assert_eq!(read_file(&fs, r.ino, "target.txt").await.unwrap(), b"new");
    // Gone on the server when rename returns: another client sees one name.
    assert_eq!(names_seen_by_another(&s, &["r"]).await, ["d2", "target.txt"]);
    let other = mount(s.alice.clone()).await;
    let ov = other.lookup(ROOT, n("V")).await.unwrap();
    let or = other.lookup(ov.ino, n("r")).await.unwrap();
    assert_eq!(read_file(&other, or.ino, "target.txt").await.unwrap(), b"new");
}

/// A move to another record copies the file, then deletes it where it was at
/// the version it copied: a change another client made meanwhile is not
/// deleted with it (the source stays, with that change; the copy has what
/// was moved).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_keeps_a_source_another_client_changed_meanwhile() {
    let s = setup(&["V"]).await;
    let (fs, outage) = mount_faulty(s.alice.clone()).await;
    let v = fs.lookup(ROOT, n("V")).await.unwrap();
    let o = fs.mkdir(v.ino, n("o")).await.unwrap();
    let r = fs.mkdir(v.ino, n("r")).await.unwrap();
    write_file(&fs, o.ino, "m.txt", b"first").await;
    fs.fsyncdir(r.ino).await.unwrap();
    // The source's delete waits once the copy is stored.
    outage.hold_file_deletes(true);
    let mover = tokio::spawn({
        let fs = Arc::clone(&fs);
        async move { fs.rename(o.ino, n("m.txt"), r.ino, n("m.txt")).await }
    });
    let copied = async {
        while names_seen_by_another(&s, &["r"]).await != ["m.txt"] {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), copied).await.expect("the copy is stored");
    let other = mount(s.alice.clone()).await;
    let ov = other.lookup(ROOT, n("V")).await.unwrap();
    let oo = other.lookup(ov.ino, n("o")).await.unwrap();
    write_over(&other, oo.ino, "m.txt", b"second").await;
    outage.hold_file_deletes(false);
    mover.await.unwrap().unwrap();
    assert_eq!(read_file(&fs, r.ino, "m.txt").await.unwrap(), b"first");
    assert_eq!(read_file(&fs, o.ino, "m.txt").await.unwrap(), b"second", "the change made meanwhile is kept");
    assert_eq!(names_seen_by_another(&s, &["o"]).await, ["m.txt"]);
}

/// A move deletes its source at the version of the bytes it copied, never at
/// a newer one: not when this mount's unsaved change is based on an older
/// version than another client's (the move copies the change; the other
/// client's version stays), nor when the delete waits in the background for
/// the server and another client changes the file meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_deletes_its_source_only_at_the_version_it_copied() {
    let s = setup(&["V"]).await;
    let (fs, outage) = mount_faulty(s.alice.clone()).await;
    let v = fs.lookup(ROOT, n("V")).await.unwrap();
    let o = fs.mkdir(v.ino, n("o")).await.unwrap();
    let r = fs.mkdir(v.ino, n("r")).await.unwrap();
    write_file(&fs, o.ino, "dirty.txt", b"base").await;
    write_file(&fs, o.ino, "later.txt", b"first").await;
    fs.fsyncdir(r.ino).await.unwrap();
    let other = mount(s.alice.clone()).await;
    let ov = other.lookup(ROOT, n("V")).await.unwrap();
    let oo = other.lookup(ov.ino, n("o")).await.unwrap();

    // Changed here (not saved), and elsewhere; this mount then lists the
    // other client's version.
    let a = fs.lookup(o.ino, n("dirty.txt")).await.unwrap();
    let version = || fs.getxattr(a.ino, n("user.vaultfs.version")).unwrap();
    let before = version();
    let fh = fs.open(a.ino, false, true).await.unwrap();
    fs.write(fh, 0, b"mine").await.unwrap();
    write_over(&other, oo.ino, "dirty.txt", b"theirs").await;
    let listed = async {
        while version() == before {
            let _ = fs.readdir(o.ino).await;
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), listed)
        .await
        .expect("the other version is listed");
    fs.rename(o.ino, n("dirty.txt"), r.ino, n("dirty.txt")).await.unwrap();
    fs.release(a.ino, fh).await.unwrap();
    assert_eq!(read_file(&fs, r.ino, "dirty.txt").await.unwrap(), b"mine");
    assert_eq!(
        read_file(&other, oo.ino, "dirty.txt").await.unwrap(),
        b"theirs",
        "the other client's version is kept"
    );

    // The source's delete cannot be made now, and waits; meanwhile another
    // client changes it.
    outage.fail_file_deletes(true);
    fs.rename(o.ino, n("later.txt"), r.ino, n("later.txt")).await.unwrap();
    write_over(&other, oo.ino, "later.txt", b"second").await;
    outage.fail_file_deletes(false);
    tokio::time::timeout(std::time::Duration::from_secs(30), fs.deletes_settled(None)).await.unwrap();
    assert_eq!(read_file(&fs, r.ino, "later.txt").await.unwrap(), b"first");
    assert_eq!(
        read_file(&other, oo.ino, "later.txt").await.unwrap(),
        b"second",
        "the change made meanwhile is kept"
    );
    assert_eq!(read_file(&fs, o.ino, "later.txt").await.unwrap(), b"second", "and shows again here");
    let kept = fs.status().refused.iter().filter(|r| r.contains("moved, but changed elsewhere")).count();
    assert_eq!(kept, 2, "vaultfs status says why each source is still there");
}
