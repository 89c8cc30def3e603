//! Two `vaultfs serve` instances on one PostgreSQL database and one S3
//! bucket (s3s-fs), with the same certificate, as behind a load balancer
//! (docs/SCALING.md): mounts on different instances, writers racing on one
//! file, a session carried from one instance to the other, and an instance
//! killed in the middle of an upload while the other serves on.
//!
//! PostgreSQL comes from a throwaway cluster (tests/support/postgres.rs) and
//! S3 from s3s-fs, both stopped when the test ends, also when it fails.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use support::mount::{MountSetup, TestMount};
use support::postgres::PgCluster;
use support::server::{S3Server, TestServer, TEST_KDF};
use vaultfs::ids::{FileId, RecordId, VaultId};
use vaultfs::protocol::{NewFile, NewRecord, NewVault, Sealed};
use vaultfs::remote::http::HttpRemote;
use vaultfs::remote::{collect, Remote, RemoteError, UploadBody};

/// Both instances' configuration: the mounts' Argon2id cost, the bucket,
/// the database.
fn shared_config(dir: &Path, s3: &S3Server, pg: &PgCluster) -> std::path::PathBuf {
    let database = pg.database_for(&dir.join("db"));
    let config = dir.join("server.toml");
    let text = format!(
        "[login_kdf]\nm_cost_kib = 19456\nt_cost = 2\np_cost = 1\n{}{}",
        s3.config(),
        pg.config(&database)
    );
    std::fs::write(&config, text).unwrap();
    config
}

/// Starts instance B on `data` with instance A's certificate and key (a
/// certificate made on A's first start), so clients pin one fingerprint.
fn second_instance(a: &TestServer, data: &Path, config: &Path) -> TestServer {
    copy_dir(&a.data_dir.join("tls"), &data.join("tls"));
    let b = TestServer::start_exact(data, config);
    assert_eq!(a.fingerprint, b.fingerprint, "both instances present one certificate");
    assert_ne!(a.url, b.url);
    b
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    std::fs::set_permissions(to, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Names and contents of the regular files in `dir`.
fn contents(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap()))
        .collect();
    out.sort();
    out
}

#[test]
fn two_instances_share_one_database_and_bucket() {
    let dir = tempfile::tempdir().unwrap();
    let s3 = S3Server::start(&dir.path().join("s3"));
    let pg = PgCluster::get();
    let config = shared_config(dir.path(), &s3, &pg);
    let a = TestServer::start_exact(&dir.path().join("a"), &config);
    let b = second_instance(&a, &dir.path().join("b"), &config);
    let b_url = b.url.clone();

    // Alice mounts through A, and on a second machine through B.
    let m = TestMount::start_setup(MountSetup { server: Some(a), ..Default::default() });
    let on_b = m.mount_via("mnt-b", &b_url);
    let log = || format!("--- A ---\n{}\n--- B ---\n{}", m.log(), on_b.log());
    std::fs::create_dir(m.path("Family/shared")).unwrap();
    let a_dir = m.path("Family/shared");
    let b_dir = on_b.path("Family/shared");

    // A change made through one instance reaches a mount of the other at
    // once (the feed's notification crosses instances).
    std::fs::write(a_dir.join("race.txt"), b"round 0").unwrap();
    wait_for("B sees A's file", Duration::from_secs(5), || {
        std::fs::read(b_dir.join("race.txt")).is_ok_and(|d| d == b"round 0")
    });

    // Writers on both racing on one file, each round: both hold one
    // version open, both save; exactly one save replaces the file, the
    // other is kept as a conflict copy, and no content is lost.
    for round in 1..=3u32 {
        let mine = [format!("round {round} from A"), format!("round {round} from B")];
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
        let writers: Vec<_> = [a_dir.join("race.txt"), b_dir.join("race.txt")]
            .into_iter()
            .zip(mine.clone())
            .map(|(path, text)| {
                let barrier = std::sync::Arc::clone(&barrier);
                std::thread::spawn(move || {
                    use std::io::Write;
                    let mut f = std::fs::OpenOptions::new().write(true).truncate(true).open(&path).unwrap();
                    barrier.wait(); // both have it open at one version
                    f.write_all(text.as_bytes()).unwrap();
                    barrier.wait();
                    drop(f); // both save at once
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        let expected_copies = round as usize;
        let started = Instant::now();
        let seen = loop {
            let (on_a, on_b) = (contents(&a_dir), contents(&b_dir));
            let copies = on_a.iter().filter(|(n, _)| n.contains("(conflict ")).count();
            // The same files on both, by content: two conflict copies made in
            // one second share a name, which each mount tells apart with a
            // suffix of its own.
            let bodies = |l: &[(String, Vec<u8>)]| {
                let mut b: Vec<Vec<u8>> = l.iter().map(|(_, d)| d.clone()).collect();
                b.sort();
                b
            };
            let same_current =
                on_a.iter().find(|(n, _)| n == "race.txt") == on_b.iter().find(|(n, _)| n == "race.txt");
            if bodies(&on_a) == bodies(&on_b) && same_current && copies == expected_copies {
                break on_a;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "round {round} does not settle: {expected_copies} conflict copies wanted\nA: {on_a:?}\nB: {on_b:?}\n{}",
                log()
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        let current = &seen.iter().find(|(n, _)| n == "race.txt").expect("race.txt").1;
        let copy = seen
            .iter()
            .filter(|(n, _)| n.contains("(conflict "))
            .find(|(_, d)| mine.iter().any(|m| m.as_bytes() == &d[..]) && d != current)
            .unwrap_or_else(|| {
                panic!("round {round}: the losing save as a conflict copy: {seen:?}\n{}", log())
            });
        let mut round_contents = vec![current.clone(), copy.1.clone()];
        round_contents.sort();
        let mut wanted: Vec<Vec<u8>> = mine.iter().map(|m| m.as_bytes().to_vec()).collect();
        wanted.sort();
        assert_eq!(round_contents, wanted, "round {round}: one save won, the other is the copy\n{}", log());
    }
    drop(on_b);
    drop(m);
}

fn sealed(s: &str) -> Sealed {
    Sealed(s.as_bytes().to_vec())
}

/// A session made on one instance works on the other and ends on both; an
/// instance killed mid-upload leaves the old version whole on the other,
/// which serves on, and nothing of the upload visible.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_and_a_killed_instance() {
    let dir = tempfile::tempdir().unwrap();
    let s3 = S3Server::start(&dir.path().join("s3"));
    let pg = PgCluster::get();
    let config = shared_config(dir.path(), &s3, &pg);
    let a = TestServer::start_exact(&dir.path().join("a"), &config);
    let mut b = second_instance(&a, &dir.path().join("b"), &config);

    // Enrolled through A, logged in through B.
    let on_a = a.user("bob", &[]).await;
    let on_b = HttpRemote::login(&b.access(), "bob", b"bob passphrase", TEST_KDF).await.unwrap();
    let vault = VaultId::random().unwrap();
    on_a.create_vault(NewVault { id: vault, name: sealed("v"), e2e_required: false, wrapped_key: None })
        .await
        .unwrap();
    assert_eq!(on_b.vaults().await.unwrap().len(), 1, "B sees the vault A made");

    // A's session token works on B, and a logout through A ends it on B.
    let token = on_a.session_token().await.expect("a session");
    let client = vaultfs::remote::http::build_client(&b.access()).unwrap();
    let vaults_on_b = || client.get(format!("{}/v1/vaults", b.url)).bearer_auth(&token).send();
    assert_eq!(vaults_on_b().await.unwrap().status(), 200, "a session made on A works on B");
    // B now holds the session in its cache of confirmed ones (for a second):
    // the logout's notification must drop it there, well before then.
    assert_eq!(vaults_on_b().await.unwrap().status(), 200);
    let cached = Instant::now();
    on_a.logout().await.unwrap();
    loop {
        let status = vaults_on_b().await.unwrap().status();
        if status == 401 {
            break;
        }
        assert!(
            cached.elapsed() < Duration::from_millis(800),
            "the session lives on on B (from its cache) after a logout through A: {status}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A file with content, then a large upload through B, killed midway.
    let record = RecordId::random().unwrap();
    on_b.create_record(vault, NewRecord { id: record, parent: None, title: sealed("r"), fields: sealed("") })
        .await
        .unwrap();
    let file = FileId::random().unwrap();
    on_b.create_file(
        record,
        NewFile { id: file, name: sealed("f"), e2e: true, mtime_ms: Some(1), meta: Sealed::default() },
    )
    .await
    .unwrap();
    let old: Vec<u8> = (0..2_000_000u32).map(|i| (i % 251) as u8).collect();
    on_b.upload(file, 1, true, None, UploadBody::from_bytes(old.clone())).await.unwrap();
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = std::sync::Arc::clone(&sent);
    let piece = Bytes::from(vec![0x55u8; 1 << 20]);
    let body = futures_util::stream::unfold(0u32, move |n| {
        let (piece, counter) = (piece.clone(), std::sync::Arc::clone(&counter));
        async move {
            if n == 100 {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            counter.fetch_add(piece.len() as u64, std::sync::atomic::Ordering::SeqCst);
            Some((Ok::<_, std::io::Error>(piece), n + 1))
        }
    });
    let upload = tokio::spawn(async move {
        on_b.upload(
            file,
            2,
            true,
            None,
            UploadBody { len: Some(100 << 20), stream: Box::pin(body), conflict_copy: None, meta: None },
        )
        .await
    });
    while sent.load(std::sync::atomic::Ordering::SeqCst) < 20 << 20 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    b.kill_hard();
    let result =
        tokio::time::timeout(Duration::from_secs(30), upload).await.expect("fails, not hangs").unwrap();
    assert!(matches!(result, Err(RemoteError::Unavailable(_))), "{result:?}");

    // A serves on: the old version, whole; new work goes through.
    let on_a = HttpRemote::login(&a.access(), "bob", b"bob passphrase", TEST_KDF).await.unwrap();
    let info = on_a.file(file).await.unwrap();
    assert_eq!((info.version, info.size), (2, old.len() as u64), "nothing of the killed upload shows");
    assert_eq!(collect(on_a.download(file, None).await.unwrap().stream).await.unwrap(), old);
    let newer = b"written through A while B is down".to_vec();
    on_a.upload(file, 2, true, None, UploadBody::from_bytes(newer.clone())).await.unwrap();

    // B back: it sees what A committed, and the store holds no part of the
    // killed upload once B has cleaned up after itself.
    b.restart();
    let on_b = HttpRemote::login(&b.access(), "bob", b"bob passphrase", TEST_KDF).await.unwrap();
    assert_eq!(collect(on_b.download(file, None).await.unwrap().stream).await.unwrap(), newer);
    let objects = support::server::walk_files(&s3.root);
    let big = objects.iter().filter(|p| std::fs::metadata(p).is_ok_and(|m| m.len() >= 5 << 20)).count();
    assert_eq!(big, 0, "a part of the killed upload is left in the bucket: {objects:?}");
}

/// With `tls = "require"` the server talks to the database over TLS only,
/// and only to a database whose certificate the configured authority
/// signed; a cluster that takes TLS connections only shows it is used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_connection_can_require_tls() {
    let dir = tempfile::tempdir().unwrap();
    let pg = PgCluster::start_tls();
    let database = pg.database_for(&dir.path().join("db"));
    let config_with = |name: &str, extra: &str| {
        let path = dir.path().join(name);
        let text =
            format!("[login_kdf]\nm_cost_kib = 256\nt_cost = 1\np_cost = 1\n{}{extra}", pg.config(&database));
        std::fs::write(&path, text).unwrap();
        path
    };
    let admin = |config: &Path| {
        std::process::Command::new(support::server::vaultfs_bin())
            .args(["admin", "--config"])
            .arg(config)
            .args(["user", "list"])
            .output()
            .unwrap()
    };
    // Plain TCP: the cluster refuses it.
    let plain = admin(&config_with("plain.toml", ""));
    assert!(!plain.status.success(), "a plain connection was taken");
    // TLS with an authority that did not sign the database's certificate.
    let other = dir.path().join("other-ca.pem");
    let key = rcgen::KeyPair::generate().unwrap();
    std::fs::write(
        &other,
        rcgen::CertificateParams::new(vec!["x".to_string()]).unwrap().self_signed(&key).unwrap().pem(),
    )
    .unwrap();
    let wrong =
        admin(&config_with("wrong.toml", &format!("tls = \"require\"\nca_file = \"{}\"\n", other.display())));
    let err = String::from_utf8_lossy(&wrong.stderr);
    assert!(!wrong.status.success(), "a certificate from an unknown authority was accepted");
    assert!(err.contains("invalid peer certificate: UnknownIssuer"), "{err}");
    // The right authority: the server runs, and serves.
    let tls =
        config_with("tls.toml", &format!("tls = \"require\"\nca_file = \"{}\"\n", pg.ca_file().display()));
    let ok = admin(&tls);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let server = TestServer::start_exact(&dir.path().join("data"), &tls);
    let carol = server.user("carol", &[]).await;
    let vault = VaultId::random().unwrap();
    carol
        .create_vault(NewVault { id: vault, name: sealed("v"), e2e_required: false, wrapped_key: None })
        .await
        .unwrap();
    assert_eq!(carol.vaults().await.unwrap().len(), 1);
}

/// A database a newer vaultfs upgraded is refused, with both versions
/// named, and left as it was.
#[test]
fn a_database_from_a_newer_vaultfs_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pg = PgCluster::get();
    let database = pg.database_for(&dir.path().join("db"));
    let config = dir.path().join("server.toml");
    std::fs::write(&config, pg.config(&database)).unwrap();
    let admin = |args: &[&str]| {
        std::process::Command::new(support::server::vaultfs_bin())
            .args(["admin", "--config"])
            .arg(&config)
            .args(args)
            .output()
            .unwrap()
    };
    // Made by this vaultfs (the first use makes the schema).
    let made = admin(&["user", "add", "dave"]);
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    // As a newer vaultfs would leave it.
    pg.sql(&database, "UPDATE vaultfs_schema SET version = 99");
    let refused = admin(&["user", "list"]);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "a newer schema was used");
    assert!(err.contains("newer vaultfs") && err.contains("99"), "{err}");
    assert_eq!(
        pg.sql(&database, "SELECT version FROM vaultfs_schema").trim(),
        "99",
        "changed by the refusal"
    );
}

/// A unit PostgreSQL aborts for a deadlock runs again and succeeds: one
/// request deletes a file in each of two vaults (it locks the vaults in
/// order) while another transaction holds the second vault and then asks
/// for the first. Without the retry the request fails (500).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unit_aborted_for_a_deadlock_runs_again() {
    use vaultfs::protocol::{DeleteItem, DeleteOutcome};
    let dir = tempfile::tempdir().unwrap();
    let pg = PgCluster::get();
    let database = pg.database_for(&dir.path().join("db"));
    let config = dir.path().join("server.toml");
    let text = format!("[login_kdf]\nm_cost_kib = 19456\nt_cost = 2\np_cost = 1\n{}", pg.config(&database));
    std::fs::write(&config, text).unwrap();
    let server = TestServer::start_exact(&dir.path().join("data"), &config);
    let bob = server.user("bob", &[]).await;
    let mut vaults = Vec::new();
    for name in ["one", "two"] {
        let vault = VaultId::random().unwrap();
        bob.create_vault(NewVault { id: vault, name: sealed(name), e2e_required: false, wrapped_key: None })
            .await
            .unwrap();
        let record = RecordId::random().unwrap();
        let new = NewRecord { id: record, parent: None, title: sealed("r"), fields: sealed("") };
        bob.create_record(vault, new).await.unwrap();
        let file = FileId::random().unwrap();
        let f =
            NewFile { id: file, name: sealed("f"), e2e: true, mtime_ms: Some(1), meta: Sealed::default() };
        let made = bob.create_file(record, f).await.unwrap();
        vaults.push((vault, file, made.version));
    }
    // The unit locks the vaults in the order of their ids.
    vaults.sort_by_key(|(vault, ..)| vault.0);
    let (first, second) = (vaults[0].0, vaults[1].0);

    let (other, connection) =
        tokio_postgres::connect(&pg.conninfo(&database), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let lock = "SELECT 1 FROM vaults WHERE id = $1 FOR NO KEY UPDATE";
    other.batch_execute("BEGIN").await.unwrap();
    other.execute(lock, &[&&second.0[..]]).await.unwrap();
    let items = vaults.iter().map(|&(_, id, version)| DeleteItem::File { id, version }).collect();
    let deleting = tokio::spawn(async move { bob.delete_many(items).await });
    // Once the unit waits for the second vault (holding the first), the
    // other transaction asks for the first: a deadlock, which the unit,
    // waiting longer, finds and is aborted for.
    let waiting = "SELECT COUNT(*) FROM pg_stat_activity \
                   WHERE datname = current_database() AND wait_event_type = 'Lock'";
    let deadline = Instant::now() + Duration::from_secs(20);
    while other.query_one(waiting, &[]).await.unwrap().get::<_, i64>(0) == 0 {
        assert!(Instant::now() < deadline, "the delete never waited for the vault held");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    other.execute(lock, &[&&first.0[..]]).await.unwrap();
    other.batch_execute("COMMIT").await.unwrap();
    let outcomes = deleting.await.unwrap().expect("the delete failed: its unit was not run again");
    assert!(outcomes.iter().all(|o| matches!(o, DeleteOutcome::Deleted)), "{outcomes:?}");
    // PostgreSQL counts the deadlock (its statistics come within a second or so).
    let counted = "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()";
    let deadline = Instant::now() + Duration::from_secs(10);
    while other.query_one(counted, &[]).await.unwrap().get::<_, i64>(0) == 0 {
        assert!(Instant::now() < deadline, "no deadlock happened, so nothing was tested");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(server);
}
