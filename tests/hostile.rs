//! The server is the adversary, and the daemon's own traces must not betray
//! what the server may not see: through real mounts over a real `vaultfs
//! serve`, whose storage (SQLite metadata and blob files) these tests change
//! behind its back, or whose admin changes what it tells the client.

mod support;

use std::path::Path;
use std::time::Duration;

use support::mount::{MountSetup, TestMount};

/// Every name of this session carries this marker; it is not hex, so no id in
/// a log line can contain it by chance.
const MARK: &str = "Qx";

fn write(path: &Path, data: &[u8]) {
    std::fs::write(path, data).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// A session of writes, renames, conflicts, duplicates and failures, logged at
/// the most verbose level: no decrypted name or title reaches the daemon's
/// stderr (journald, on a real system), though the events are all logged.
/// With --log-names, the log says names are on, and then shows them.
#[test]
fn no_name_or_title_reaches_the_daemons_log() {
    let vault = format!("Zebra vault {MARK}");
    let policy = "[defaults]\ne2e_limit = \"1 MB\"\n";
    let mut m = TestMount::start_setup(MountSetup {
        policy,
        vaults: &[&vault],
        user: &["--upload-limit", "3MB"],
        log: Some("vaultfs=trace,info"),
        ..Default::default()
    });
    let record = m.path(&format!("{vault}/Ocelot record {MARK}"));
    std::fs::create_dir(&record).unwrap();
    std::fs::create_dir(record.join(format!("Inner {MARK}"))).unwrap();
    let file = record.join(format!("Narwhal {MARK}.txt"));
    write(&file, b"first");
    let renamed = record.join(format!("Walrus {MARK}.txt"));
    std::fs::rename(&file, &renamed).unwrap();
    write(&record.join(format!("Platypus {MARK}.bin")), &vec![7u8; 1_500_000]);
    // Failures: too large, not empty, no such entry, a name too long.
    let big = std::fs::write(record.join(format!("Huge {MARK}.bin")), vec![1u8; 3_500_000]);
    assert_eq!(big.unwrap_err().raw_os_error(), Some(libc::EFBIG));
    assert!(std::fs::remove_dir(&record).is_err());
    assert!(std::fs::remove_file(record.join(format!("Missing {MARK}"))).is_err());
    assert!(std::fs::write(record.join(format!("{MARK}{}", "l".repeat(300))), b"x").is_err());
    // A conflict, and two files of one name, made by a second mount.
    let other = m.second_mount();
    let theirs = other.path(&format!("{vault}/Ocelot record {MARK}"));
    let _ = std::fs::read_dir(&theirs).unwrap().count();
    {
        use std::io::Write;
        let mut ours = std::fs::OpenOptions::new().write(true).open(&renamed).unwrap();
        write(&theirs.join(format!("Walrus {MARK}.txt")), b"theirs");
        ours.write_all(b"ours, written after theirs was stored").unwrap();
    }
    // Both at once: each mount learns of the other's file from the change
    // feed within tens of milliseconds, and a mount that knows the name
    // opens that file instead (a conflict copy, not a duplicate).
    let start = std::sync::Barrier::new(2);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            start.wait();
            write(&record.join(format!("Twin {MARK}")), b"one");
        });
        start.wait();
        write(&theirs.join(format!("Twin {MARK}")), b"two");
    });
    std::thread::sleep(Duration::from_millis(2500)); // both listings expire
    let names: Vec<String> = std::fs::read_dir(&record)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into())
        .collect();
    assert!(names.iter().any(|n| n.contains("conflict")), "no conflict copy: {names:?}\n{}", m.log());
    assert!(names.iter().any(|n| n.contains("duplicate")), "no duplicate: {names:?}\n{}", m.log());
    let their_log = other.log();
    drop(other);
    m.unmount();
    let log = m.log() + &their_log;
    for event in ["conflict copy saved", "same name", "file too large", "streaming it as plain HTTPS"] {
        assert!(log.contains(event), "the session did not log {event:?}:\n{log}");
    }
    let leaked: Vec<&str> = log.lines().filter(|l| l.contains(MARK)).collect();
    assert!(leaked.is_empty(), "names in the daemon's log:\n{}", leaked.join("\n"));

    // Asked for, names show, and the log says they do.
    m.set_mount_args(&["--log-names"]);
    m.mount();
    let twins: Vec<_> = std::fs::read_dir(&record).unwrap().collect();
    assert!(!twins.is_empty());
    m.unmount();
    let log = m.log();
    assert!(log.contains("--log-names is on"), "{log}");
    assert!(log.lines().any(|l| l.contains("same name") && l.contains(MARK)), "{log}");
}

/// Runs the CLI as a user whose config lives in `home`; returns (success, output).
fn cli(home: &Path, pass: &Path, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(support::server::vaultfs_bin())
        .args(args)
        .env("XDG_CONFIG_HOME", home)
        .env("VAULTFS_PASSPHRASE_FILE", pass)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// A server with the CLI's minimum Argon2id cost for login keys.
fn cli_server(dir: &Path) -> support::server::TestServer {
    let config = dir.join("server.toml");
    std::fs::write(&config, "[login_kdf]\nm_cost_kib = 19456\nt_cost = 2\np_cost = 1\n").unwrap();
    support::server::TestServer::start_with_config(&dir.join("data"), &config)
}

/// What a relaying server captured: the login keys sent to it.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>);

/// A hostile server on loopback (plain HTTP, which the client allows there):
/// it answers pre-login with another server's answer for the same user name,
/// fetched live, and keeps the login key the client then sends.
fn relaying_server(victim: &support::server::TestServer, rt: &tokio::runtime::Runtime) -> (String, Captured) {
    use axum::routing::{get, post};
    let captured = Captured::default();
    let client = reqwest_for(victim);
    let victim_url = victim.url.clone();
    let keep = captured.clone();
    let app = axum::Router::new()
        .route(
            "/v1/prelogin",
            get(move |q: axum::extract::Query<std::collections::HashMap<String, String>>| {
                let (client, url) = (client.clone(), victim_url.clone());
                async move {
                    let user = q.get("user").cloned().unwrap_or_default();
                    let answer =
                        client.get(format!("{url}/v1/prelogin")).query(&[("user", user)]).send().await;
                    answer.unwrap().text().await.unwrap()
                }
            }),
        )
        .route(
            "/v1/login",
            post(move |body: axum::Json<vaultfs::protocol::LoginRequest>| {
                let keep = keep.clone();
                async move {
                    keep.0.lock().unwrap().push(body.login_key.0.clone());
                    (axum::http::StatusCode::UNAUTHORIZED, "{}")
                }
            }),
        );
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    rt.spawn(async move { axum::serve(listener, app).await });
    (url, captured)
}

/// An HTTPS client that trusts `server`'s pinned certificate.
fn reqwest_for(server: &support::server::TestServer) -> reqwest::Client {
    let trust = vaultfs::remote::tls::Trust::Pinned(server.fingerprint.clone().unwrap());
    let config = vaultfs::remote::tls::client_config(&trust).unwrap();
    reqwest::Client::builder().tls_backend_preconfigured(config).build().unwrap()
}

/// Status of `POST /v1/login` at `server` with `key`.
fn try_login(rt: &tokio::runtime::Runtime, server: &support::server::TestServer, key: &[u8]) -> u16 {
    let body = vaultfs::protocol::LoginRequest {
        user: "alice".into(),
        login_key: vaultfs::protocol::Sealed(key.to_vec()),
    };
    let client = reqwest_for(server);
    rt.block_on(async { client.post(format!("{}/v1/login", server.url)).json(&body).send().await })
        .unwrap()
        .status()
        .as_u16()
}

/// A hostile server relays another server's pre-login answer for the same
/// user name (who uses the same passphrase on both) and keeps the login key
/// the client derives: that key is useless at the other server, because it is
/// bound to the identity of the server the client verified.
#[test]
fn a_relayed_pre_login_yields_no_key_for_the_other_server() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let victim = cli_server(dir.path());
    let (home, pass) = (dir.path().join("home"), dir.path().join("pass"));
    std::fs::write(&pass, "the same passphrase on both servers").unwrap();
    let code = victim.add_user("alice", &[]);
    let fp = victim.fingerprint.clone().unwrap();
    let (ok, out) = cli(
        &home,
        &pass,
        &["login", "--server", &victim.url, "--user", "alice", "--fingerprint", &fp, "--enroll", &code],
    );
    assert!(ok, "{out}");

    let (hostile, captured) = relaying_server(&victim, &rt);
    let other_home = dir.path().join("other-home");
    let (ok, out) = cli(&other_home, &pass, &["login", "--server", &hostile, "--user", "alice"]);
    assert!(!ok, "the hostile server refused the login, so the command fails: {out}");
    let keys = captured.0.lock().unwrap().clone();
    assert_eq!(keys.len(), 1, "the client sent the hostile server one login key: {out}");
    assert_eq!(try_login(&rt, &victim, &keys[0]), 401, "the relayed key must not open the victim's account");
    // The victim itself still takes the real login.
    let (ok, out) = cli(&home, &pass, &["vault", "list"]);
    assert!(ok, "{out}");
}

/// A login made by an older vaultfs (an unbound key) still works, and the
/// first login replaces it with a bound one; from then on this machine
/// refuses a server that asks for an unbound key again.
#[test]
fn an_old_login_is_upgraded_once_and_never_downgraded() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let s = cli_server(dir.path());
    let (home, pass) = (dir.path().join("home"), dir.path().join("pass"));
    std::fs::write(&pass, "an old passphrase").unwrap();
    // Enrolled as an older client did: a version-1 key, and a wallet.
    let code = s.add_user("alice", &[]);
    let client = reqwest_for(&s);
    let prelogin = || -> vaultfs::protocol::PreLogin {
        let get = client.get(format!("{}/v1/prelogin", s.url)).query(&[("user", "alice")]).send();
        rt.block_on(async { get.await.unwrap().json().await.unwrap() })
    };
    let pre = prelogin();
    assert_eq!(pre.login_version, 1, "not enrolled yet: an older server's default");
    let k = pre.kdf;
    let params = vaultfs::crypto::KdfParams { m_cost_kib: k.m_cost_kib, t_cost: k.t_cost, p_cost: k.p_cost };
    let old =
        vaultfs::crypto::login::derive_legacy_login_key(b"an old passphrase", &pre.salt.0, params, params)
            .unwrap();
    let enroll = serde_json::json!({
        "user": "alice", "code": code, "login_key": vaultfs::protocol::Sealed(old.to_vec())
    });
    let session: vaultfs::protocol::Session = rt.block_on(async {
        let resp = client.post(format!("{}/v1/enroll", s.url)).json(&enroll).send().await.unwrap();
        resp.json().await.unwrap()
    });
    let fast = vaultfs::crypto::KdfParams { m_cost_kib: 64, t_cost: 1, p_cost: 1 };
    let wallet =
        vaultfs::crypto::Wallet::new().seal(b"an old passphrase", fast, &mut vaultfs::crypto::OsRandom);
    let put = client
        .put(format!("{}/v1/wallet", s.url))
        .bearer_auth(&session.token)
        .header("if-none-match", "*")
        .body(wallet.unwrap());
    assert!(rt.block_on(put.send()).unwrap().status().is_success());
    assert_eq!(prelogin().login_version, 1);

    // This version logs in with it once, and replaces it with a bound key.
    let fp = s.fingerprint.clone().unwrap();
    let (ok, out) =
        cli(&home, &pass, &["login", "--server", &s.url, "--user", "alice", "--fingerprint", &fp]);
    assert!(ok, "{out}");
    assert!(out.contains(&format!("bound to the server identity tls-cert:{fp}")), "{out}");
    assert_eq!(try_login(&rt, &s, &old[..]), 401, "the unbound key was replaced");
    assert_eq!(prelogin().login_version, 2);
    let (ok, out) = cli(&home, &pass, &["vault", "list"]);
    assert!(ok, "{out}");

    // The server (or one relaying an old answer) claims version 1 again.
    let db = rusqlite::Connection::open(s.data_dir.join("meta.sqlite3")).unwrap();
    db.execute("UPDATE users SET login_version = 1 WHERE name = 'alice'", []).unwrap();
    let (ok, out) = cli(&home, &pass, &["vault", "list"]);
    assert!(!ok && out.contains("unbound (version 1) login key"), "{out}");
}

/// The server's storage, opened beside it (SQLite metadata, blob files).
struct Storage {
    db: rusqlite::Connection,
    data: std::path::PathBuf,
}

impl Storage {
    fn open(data: &Path) -> Self {
        let db = rusqlite::Connection::open(data.join("meta.sqlite3")).unwrap();
        db.busy_timeout(Duration::from_secs(10)).unwrap();
        Storage { db, data: data.to_path_buf() }
    }

    fn id(hex: &str) -> Vec<u8> {
        vaultfs::ids::hex_decode(hex).unwrap()
    }

    /// The blob file of file `id` (hex), if it has one.
    fn blob(&self, id: &str) -> Option<std::path::PathBuf> {
        let blob: Option<String> = self
            .db
            .query_row("SELECT blob_id FROM files WHERE id = ?1", [Self::id(id)], |r| r.get(0))
            .unwrap();
        blob.map(|b| self.data.join("blobs").join(&b[..2]).join(&b))
    }

    /// Runs `sql` with the file's id as ?1.
    fn set(&self, id: &str, sql: &str) {
        assert_eq!(self.db.execute(sql, [Self::id(id)]).unwrap(), 1, "{sql}");
    }

    /// Replaces file `id`'s content with `bytes`, and its size to match.
    fn replace(&self, id: &str, bytes: &[u8]) {
        std::fs::write(self.blob(id).unwrap(), bytes).unwrap();
        self.db
            .execute(
                "UPDATE files SET size = ?2 WHERE id = ?1",
                rusqlite::params![Self::id(id), bytes.len() as i64],
            )
            .unwrap();
    }

    fn meta(&self, id: &str) -> Vec<u8> {
        self.db.query_row("SELECT meta FROM files WHERE id = ?1", [Self::id(id)], |r| r.get(0)).unwrap()
    }

    fn set_meta(&self, id: &str, meta: &[u8]) {
        self.db
            .execute("UPDATE files SET meta = ?2 WHERE id = ?1", rusqlite::params![Self::id(id), meta])
            .unwrap();
    }

    /// Whether any stored blob contains `needle`.
    fn holds(&self, needle: &[u8]) -> bool {
        let mut stack = vec![self.data.join("blobs")];
        while let Some(dir) = stack.pop() {
            for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                if e.path().is_dir() {
                    stack.push(e.path());
                } else if std::fs::read(e.path()).unwrap().windows(needle.len()).any(|w| w == needle) {
                    return true;
                }
            }
        }
        false
    }
}

/// Distinct content (splitmix64 from the seed): no 64-byte window of one
/// seed's content shows up in another's.
fn content(len: usize, seed: u8) -> Vec<u8> {
    let mut state = u64::from(seed).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5eed;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Reading `path` must fail with EIO (never return bytes).
#[track_caller]
fn assert_eio(path: &Path, what: &str, log: &str) {
    match std::fs::read(path) {
        Ok(data) => panic!("{what}: {} returned {} bytes\n{log}", path.display(), data.len()),
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{what}: {e}\n{log}"),
    }
}

/// Reads `len` bytes of `path` at `offset`.
fn read_at(path: &Path, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; len];
    let n = f.read_at(&mut buf, offset)?;
    buf.truncate(n);
    Ok(buf)
}

/// What the server stores or says about a file can no longer decide what the
/// client takes it for: flipping the end-to-end flag changes nothing; flipping
/// it and serving bytes of the server's choosing, emptying, cutting, extending
/// or swapping content, of end-to-end and of pass-through files, and altering
/// or swapping manifests, all read as EIO with a log line naming the file, and
/// never as altered bytes. A piece of a pass-through file that was not touched
/// still reads (each is checked on its own).
#[test]
fn what_a_file_is_cannot_be_changed_by_the_server() {
    let mut m = TestMount::start_with("[defaults]\ne2e_limit = \"1 MB\"\n", &[]);
    std::fs::create_dir(m.path("Family/r")).unwrap();
    let files: [(&str, usize); 14] = [
        ("e2e-flag-only", 200_000),
        ("e2e-forged", 100_000),
        ("e2e-emptied", 120_000),
        ("e2e-cut", 300_000),
        ("meta-altered", 10_000),
        ("meta-swap-a", 11_000),
        ("meta-swap-b", 12_000),
        ("pt-flag-only", 2_600_000),
        ("pt-flipped", 2_600_000),
        ("pt-swap-a", 2_600_000),
        ("pt-swap-b", 2_600_000),
        ("pt-cut", 2_600_000),
        ("pt-extended", 2_600_000),
        ("pt-emptied", 2_600_000),
    ];
    let mut ids = std::collections::HashMap::new();
    let mut plain = std::collections::HashMap::new();
    for (i, (name, len)) in files.iter().enumerate() {
        let path = m.path(&format!("Family/r/{name}"));
        let data = content(*len, i as u8 * 17);
        write(&path, &data);
        let e2e = support::xattr(&path, "user.vaultfs.e2e");
        assert_eq!(e2e, if name.starts_with("pt") { "0" } else { "1" }, "{name}");
        ids.insert(*name, support::xattr(&path, "user.vaultfs.id"));
        plain.insert(*name, data);
    }
    m.unmount();
    let s = Storage::open(&m.server.data_dir);
    let id = |name: &str| ids[name].clone();
    // Nothing the policy encrypts is stored in plaintext.
    for (name, data) in &plain {
        if !name.starts_with("pt") {
            assert!(!s.holds(&data[5000..5064]), "{name}: plaintext on the server");
        }
    }
    s.set(&id("e2e-flag-only"), "UPDATE files SET e2e = 0 WHERE id = ?1");
    s.set(&id("pt-flag-only"), "UPDATE files SET e2e = 1 WHERE id = ?1");
    // Declared plain, with bytes of the server's choosing.
    s.set(&id("e2e-forged"), "UPDATE files SET e2e = 0 WHERE id = ?1");
    s.replace(&id("e2e-forged"), &vec![b'F'; 100_000]);
    for name in ["e2e-emptied", "pt-emptied"] {
        s.set(&id(name), "UPDATE files SET size = 0, blob_id = NULL WHERE id = ?1");
    }
    let cut = std::fs::read(s.blob(&id("e2e-cut")).unwrap()).unwrap();
    s.replace(&id("e2e-cut"), &cut[..cut.len() - 65552]);
    let mut meta = s.meta(&id("meta-altered"));
    *meta.last_mut().unwrap() ^= 1;
    s.set_meta(&id("meta-altered"), &meta);
    let (a, b) = (s.meta(&id("meta-swap-a")), s.meta(&id("meta-swap-b")));
    s.set_meta(&id("meta-swap-a"), &b);
    s.set_meta(&id("meta-swap-b"), &a);
    let mut flipped = std::fs::read(s.blob(&id("pt-flipped")).unwrap()).unwrap();
    flipped[1_500_000] ^= 0x20;
    std::fs::write(s.blob(&id("pt-flipped")).unwrap(), &flipped).unwrap();
    let (a, b) = (s.blob(&id("pt-swap-a")).unwrap(), s.blob(&id("pt-swap-b")).unwrap());
    let (da, db) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    std::fs::write(&a, &db).unwrap();
    std::fs::write(&b, &da).unwrap();
    s.replace(&id("pt-cut"), &plain["pt-cut"][..1_500_000]);
    let mut longer = plain["pt-extended"].clone();
    longer.extend_from_slice(b"appended by the server");
    s.replace(&id("pt-extended"), &longer);
    // Clients see new content where the version moved on.
    s.db.execute("UPDATE files SET version = version + 1", []).unwrap();

    m.mount();
    let path = |name: &str| m.path(&format!("Family/r/{name}"));
    for name in ["e2e-flag-only", "pt-flag-only"] {
        let back = std::fs::read(path(name)).unwrap_or_else(|e| panic!("{name}: {e}\n{}", m.log()));
        assert!(back == plain[name], "{name}: the flag alone changes nothing");
    }
    assert_eq!(support::xattr(&path("e2e-flag-only"), "user.vaultfs.e2e"), "1", "the manifest's mode");
    assert_eq!(support::xattr(&path("pt-flag-only"), "user.vaultfs.e2e"), "0");
    let damaged = [
        "e2e-forged",
        "e2e-emptied",
        "e2e-cut",
        "meta-altered",
        "meta-swap-a",
        "meta-swap-b",
        "pt-flipped",
        "pt-swap-a",
        "pt-swap-b",
        "pt-cut",
        "pt-extended",
        "pt-emptied",
    ];
    for name in damaged {
        assert_eio(&path(name), name, &m.log());
    }
    // Sizes are the authenticated ones, not the server's.
    let size = |name: &str| std::fs::metadata(path(name)).map(|m| m.len()).ok();
    assert_eq!(size("e2e-emptied"), Some(120_000));
    assert_eq!(size("pt-extended"), Some(2_600_000));
    // Pieces nobody touched still read, checked each on its own.
    let first = read_at(&path("pt-flipped"), 0, 1 << 20).unwrap();
    assert!(first == plain["pt-flipped"][..1 << 20], "piece 0 of the flipped file");
    let err = read_at(&path("pt-flipped"), 1_400_000, 4096).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "piece 1 holds the flipped byte");
    m.unmount();
    let log = m.log();
    for name in damaged {
        assert!(log.contains(&id(name)), "no log line names {name} ({}):\n{log}", id(name));
    }
}

/// Whatever limits the server states, nothing the client's policy encrypts
/// reaches it in plaintext: an e2e limit of zero (an operator's change) makes
/// small writes and rewrites fail with EFBIG, a low one refuses what lies
/// between it and the policy's, and an end-to-end only vault refuses the
/// write that would pass a file through, before any upload and without a
/// retry loop. A one-pixel image edge from the server stops at the policy's
/// floor, and without a policy asking, images are not reduced at all.
#[test]
fn server_limits_can_refuse_but_never_get_plaintext_or_destroy() {
    let policy = "[defaults]\ne2e_limit = \"1 MB\"\n[vaults.Photos.images]\nreduce = true\n";
    let mut m = TestMount::start_with(policy, &["Photos"]);
    m.unmount();
    let (home, pass) = (m.home.clone(), m.pass.clone());
    let (ok, out) = cli(&home, &pass, &["vault", "create", "--e2e-required", "Strict"]);
    assert!(ok, "{out}");
    m.mount();
    for dir in ["Family/r", "Photos/r"] {
        std::fs::create_dir(m.path(dir)).unwrap();
    }
    let before = content(40_000, 1);
    write(&m.path("Family/r/before.txt"), &before);
    // The end-to-end only vault: the write that crosses the policy's 1 MB
    // fails; what was written before is saved end to end.
    std::fs::create_dir(m.path("Strict/r")).unwrap();
    let strict = content(1_500_000, 5);
    {
        use std::io::Write;
        let mut f = std::fs::File::create(m.path("Strict/r/doc.bin")).unwrap();
        f.write_all(&strict[..900_000]).unwrap();
        let crossing = f.write_all(&strict[900_000..]);
        assert_eq!(crossing.map_err(|e| e.raw_os_error()), Err(Some(libc::EFBIG)));
    }
    let kept = std::fs::read(m.path("Strict/r/doc.bin")).unwrap();
    assert!(kept.len() >= 900_000 && kept[..] == strict[..kept.len()], "what was written before is kept");
    assert_eq!(support::xattr(&m.path("Strict/r/doc.bin"), "user.vaultfs.e2e"), "1");
    m.unmount();

    // Images: the server's one-pixel edge stops at the policy's floor (1024);
    // a vault whose policy does not reduce keeps the image as written.
    m.server.admin(&["user", "limits", "alice", "--image-max-edge", "1"]);
    m.mount();
    let img = image::RgbImage::from_fn(3000, 2000, |x, y| image::Rgb([(x % 251) as u8, (y % 241) as u8, 7]));
    let mut jpeg = std::io::Cursor::new(Vec::new());
    img.write_to(&mut jpeg, image::ImageFormat::Jpeg).unwrap();
    let jpeg = jpeg.into_inner();
    write(&m.path("Photos/r/photo.jpg"), &jpeg);
    write(&m.path("Family/r/photo.jpg"), &jpeg);
    let reduced = image::load_from_memory(&std::fs::read(m.path("Photos/r/photo.jpg")).unwrap()).unwrap();
    assert_eq!((reduced.width(), reduced.height()), (1024, 683), "the floor, not one pixel");
    assert!(std::fs::read(m.path("Family/r/photo.jpg")).unwrap() == jpeg, "no policy asked: unchanged");
    m.unmount();

    // An e2e limit of zero: small writes and rewrites refused.
    m.server.admin(&["user", "limits", "alice", "--e2e-limit", "0"]);
    m.mount();
    let efbig = |r: std::io::Result<()>| r.map_err(|e| e.raw_os_error());
    let small = b"a 35-byte secret that stays secret!";
    assert_eq!(efbig(std::fs::write(m.path("Family/r/small.txt"), small)), Err(Some(libc::EFBIG)));
    let rewrite = std::fs::OpenOptions::new().write(true).open(m.path("Family/r/before.txt"));
    {
        use std::io::Write;
        assert_eq!(rewrite.unwrap().write_all(small).map_err(|e| e.raw_os_error()), Err(Some(libc::EFBIG)));
    }
    assert!(std::fs::read(m.path("Family/r/before.txt")).unwrap() == before, "the stored file is intact");
    // An empty file holds nothing to encrypt.
    write(&m.path("Family/r/empty"), b"");
    m.unmount();
    // A low limit: what the policy passes through is stored; what it encrypts
    // but the server's figure would not is refused.
    m.server.admin(&["user", "limits", "alice", "--e2e-limit", "100kB"]);
    m.mount();
    let fine = content(50_000, 2);
    write(&m.path("Family/r/fine.bin"), &fine);
    let middle = content(500_000, 3);
    assert_eq!(efbig(std::fs::write(m.path("Family/r/middle.bin"), &middle)), Err(Some(libc::EFBIG)));
    let big = content(1_500_000, 4);
    write(&m.path("Family/r/big.bin"), &big);
    assert_eq!(
        support::xattr(&m.path("Family/r/big.bin"), "user.vaultfs.e2e"),
        "0",
        "above the policy's limit"
    );
    m.unmount();

    let s = Storage::open(&m.server.data_dir);
    for (what, data) in
        [("small", &small[..]), ("rewrite", &small[..]), ("middle", &middle[..]), ("strict", &strict[..])]
    {
        assert!(!s.holds(&data[..32.min(data.len())]), "{what}: plaintext reached the server");
    }
    assert!(!s.holds(&before[1000..1064]) && !s.holds(&fine[1000..1064]), "encrypted files in plaintext");
    assert!(s.holds(&big[1000..1064]), "the pass-through file is plain on the server, as configured");
    let log = m.log();
    assert!(log.contains("refuses rather than send"), "the refusal is logged with its reason:\n{log}");
    assert!(log.contains("end-to-end only"), "{log}");
    assert!(!log.contains("retrying"), "no retry loop:\n{log}");
}

/// A server that serves an older version of a file after a remount, or an
/// older wallet, is refused: this machine remembers, across mounts, the newest
/// generation of each file and the newest wallet revision it saw (in a state
/// file sealed with a key from the wallet). `vaultfs status` lists the
/// refusal. A state file that was altered stops the mount with what to do;
/// deleting it gives the protection up, and loses nothing.
#[test]
fn older_versions_and_wallets_are_refused_after_a_remount() {
    let mut m = TestMount::start_with("[defaults]\ne2e_limit = \"1 MB\"\n", &[]);
    std::fs::create_dir(m.path("Family/r")).unwrap();
    let (old_small, old_big) = (content(50_000, 1), content(2_200_000, 2));
    write(&m.path("Family/r/small.bin"), &old_small);
    write(&m.path("Family/r/big.bin"), &old_big);
    let small_id = support::xattr(&m.path("Family/r/small.bin"), "user.vaultfs.id");
    let big_id = support::xattr(&m.path("Family/r/big.bin"), "user.vaultfs.id");
    m.unmount();
    // What the server holds now, to serve again later.
    let s = Storage::open(&m.server.data_dir);
    let keep = |id: &str| (std::fs::read(s.blob(id).unwrap()).unwrap(), s.meta(id));
    let (small_then, big_then) = (keep(&small_id), keep(&big_id));
    let wallet_then: (Vec<u8>, i64) =
        s.db.query_row("SELECT blob, version FROM wallets", [], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();

    // Newer versions, seen by this machine; a vault added (a newer wallet).
    m.mount();
    let (new_small, new_big) = (content(60_000, 3), content(2_300_000, 4));
    write(&m.path("Family/r/small.bin"), &new_small);
    write(&m.path("Family/r/big.bin"), &new_big);
    m.unmount();
    let (ok, out) = cli(&m.home, &m.pass, &["vault", "create", "Later"]);
    assert!(ok, "{out}");
    m.mount();
    assert!(m.path("Later").is_dir());
    m.unmount();

    // The server rolls both files back.
    for (id, (blob, meta)) in [(&small_id, &small_then), (&big_id, &big_then)] {
        let path = s.blob(id).unwrap();
        std::fs::write(&path, blob).unwrap();
        s.set_meta(id, meta);
        s.db.execute(
            "UPDATE files SET size = ?2, version = version + 5 WHERE id = ?1",
            rusqlite::params![Storage::id(id), blob.len() as i64],
        )
        .unwrap();
    }
    m.mount();
    assert_eio(&m.path("Family/r/small.bin"), "an older end-to-end version", &m.log());
    assert_eio(&m.path("Family/r/big.bin"), "an older pass-through version", &m.log());
    let (ok, status) = cli(&m.home, &m.pass, &["status", m.mountpoint.to_str().unwrap()]);
    assert!(ok && status.contains("refused") && status.contains("stale version"), "{status}");
    assert!(status.contains(&small_id) && status.contains(&big_id), "{status}");
    m.unmount();
    assert!(m.log().contains("stale version"), "{}", m.log());

    // The server serves the wallet as it was before the vault was added.
    let current: (Vec<u8>, i64) =
        s.db.query_row("SELECT blob, version FROM wallets", [], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
    s.db.execute("UPDATE wallets SET blob = ?1", [&wallet_then.0]).unwrap();
    let failed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| m.mount()));
    assert!(failed.is_err(), "a mount over a rolled-back wallet must fail");
    assert!(m.log().contains("older than revision"), "{}", m.log());
    s.db.execute("UPDATE wallets SET blob = ?1", [&current.0]).unwrap();

    // An altered state file stops the mount, saying what to do.
    let state_dir = m.home.join("state/vaultfs");
    let state = std::fs::read_dir(&state_dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "state"));
    let state = state.expect("a state file");
    let saved = std::fs::read(&state).unwrap();
    let mut altered = saved.clone();
    altered[40] ^= 1;
    std::fs::write(&state, &altered).unwrap();
    let failed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| m.mount()));
    assert!(failed.is_err(), "a mount with an altered state file must fail");
    assert!(m.log().contains("does not open with this account's state key"), "{}", m.log());
    // Deleted: the protection is gone, the data is not.
    std::fs::remove_file(&state).unwrap();
    m.mount();
    assert!(std::fs::read(m.path("Family/r/small.bin")).unwrap() == old_small, "the older version, now");
    m.unmount();
}

/// Modes and links live in the sealed manifest: the server can neither roll
/// a chmod back on a machine that saw it, nor point a link elsewhere, nor
/// turn a file into a link.
#[test]
fn modes_and_links_cannot_be_changed_by_the_server() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let mut m = TestMount::start();
    let r = m.path("Family/r");
    std::fs::create_dir(&r).unwrap();
    write(&r.join("script.sh"), b"#!/bin/sh\necho ran\n");
    write(&r.join("plain.txt"), b"just text");
    let script = support::xattr(&r.join("script.sh"), "user.vaultfs.id");
    let plain = support::xattr(&r.join("plain.txt"), "user.vaultfs.id");
    std::os::unix::fs::symlink("first/target", r.join("l1")).unwrap();
    std::os::unix::fs::symlink("second/target", r.join("l2")).unwrap();
    assert_eq!(std::fs::read_link(r.join("l1")).unwrap(), Path::new("first/target"));
    assert_eq!(std::fs::read_link(r.join("l2")).unwrap(), Path::new("second/target"));
    let s = Storage::open(&m.server.data_dir);
    let before_chmod = s.meta(&script);
    std::fs::set_permissions(r.join("script.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    m.unmount();

    // The links are the files without content.
    let links: Vec<String> = {
        let mut q = s.db.prepare("SELECT lower(hex(id)) FROM files WHERE size = 0").unwrap();
        q.query_map([], |row| row.get(0)).unwrap().map(Result::unwrap).collect()
    };
    assert_eq!(links.len(), 2, "{links:?}");
    // The chmod rolled back; the links' targets swapped; a file given a link's manifest.
    s.set_meta(&script, &before_chmod);
    let (a, b) = (s.meta(&links[0]), s.meta(&links[1]));
    s.set_meta(&links[0], &b);
    s.set_meta(&links[1], &a);
    s.set_meta(&plain, &a);
    for id in [&script, &links[0], &links[1], &plain] {
        s.set(id, "UPDATE files SET version = version + 5 WHERE id = ?1");
    }
    m.mount();
    let mode = std::fs::metadata(r.join("script.sh")).unwrap().mode() & 0o7777;
    assert_eq!(mode, 0, "a rolled-back chmod shows no permissions (it was 0644 before it)");
    assert_eio(&r.join("script.sh"), "a rolled-back chmod", &m.log());
    // A chmod now must not seal the older manifest anew (which would make
    // its older content current again).
    let again = std::fs::set_permissions(r.join("script.sh"), std::fs::Permissions::from_mode(0o644));
    assert_eq!(again.unwrap_err().raw_os_error(), Some(libc::EIO), "a chmod over a rolled-back manifest");
    assert_eio(&r.join("script.sh"), "after a refused chmod", &m.log());
    for l in ["l1", "l2"] {
        let e = std::fs::read_link(r.join(l)).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO), "{l}: a target moved to another link");
    }
    match std::fs::symlink_metadata(r.join("plain.txt")) {
        Ok(meta) => assert!(!meta.file_type().is_symlink(), "a file given a link's manifest became a link"),
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}"),
    }
    assert!(std::fs::read_link(r.join("plain.txt")).is_err());
    assert_eio(&r.join("plain.txt"), "a file given a link's manifest", &m.log());
    m.unmount();
}
