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
    write(&record.join(format!("Twin {MARK}")), b"one");
    write(&theirs.join(format!("Twin {MARK}")), b"two");
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
