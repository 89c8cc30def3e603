//! The command line against a real server: admin, login, vault.

mod support;

use std::path::Path;
use std::process::{Command, Output};

use support::server::{vaultfs_bin, TestServer};

fn run(config_home: &Path, args: &[&str]) -> Output {
    Command::new(vaultfs_bin())
        .args(args)
        .env("XDG_CONFIG_HOME", config_home)
        .env("XDG_STATE_HOME", config_home.join("state"))
        .env_remove("VAULTFS_PASSPHRASE_FILE")
        .output()
        .expect("run vaultfs")
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn fails(out: Output) -> String {
    assert!(!out.status.success(), "unexpectedly succeeded: {}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A server whose login-key parameters meet the CLI's floor (19 MiB, 2 passes):
/// the CLI refuses anything cheaper, as a hostile server might offer.
fn start_for_cli(dir: &Path) -> TestServer {
    let config = dir.join("server.toml");
    std::fs::write(&config, "[login_kdf]\nm_cost_kib = 19456\nt_cost = 2\np_cost = 1\n").unwrap();
    TestServer::start_with_config(&dir.join("data"), &config)
}

#[test]
fn enroll_login_create_and_list_vaults() {
    let server_dir = tempfile::tempdir().unwrap();
    let s = start_for_cli(server_dir.path());
    let home = tempfile::tempdir().unwrap();
    let pass = home.path().join("pass");
    std::fs::write(&pass, "correct horse battery staple\n").unwrap();
    let pass = pass.to_str().unwrap();
    let code = s.add_user("alice", &[]);
    let fp = s.fingerprint.clone().unwrap();

    let out = ok(run(
        home.path(),
        &[
            "login",
            "--server",
            &s.url,
            "--user",
            "alice",
            "--fingerprint",
            &fp,
            "--enroll",
            &code,
            "--passphrase-file",
            pass,
        ],
    ));
    assert!(out.contains("logged in"), "{out}");
    // The saved login holds the URL, user and pin: no passphrase, key or token.
    let saved = std::fs::read_to_string(home.path().join("vaultfs/login.toml")).unwrap();
    assert!(saved.contains(&fp) && saved.contains("alice"));
    assert!(!saved.contains("correct horse") && !saved.contains("token"), "{saved}");
    // The code works once.
    let err = fails(run(
        home.path(),
        &[
            "login",
            "--server",
            &s.url,
            "--user",
            "alice",
            "--fingerprint",
            &fp,
            "--enroll",
            &code,
            "--passphrase-file",
            pass,
        ],
    ));
    assert!(err.contains("not authorized"), "{err}");

    ok(run(home.path(), &["vault", "create", "Family", "--passphrase-file", pass]));
    ok(run(home.path(), &["vault", "create", "Tax 2026", "--e2e-required", "--passphrase-file", pass]));
    let list = ok(run(home.path(), &["vault", "list", "--passphrase-file", pass]));
    assert!(list.contains("Family\tadmin"), "{list}");
    assert!(list.contains("Tax 2026\tadmin") && list.contains("e2e-required"), "{list}");

    // The server never saw the names: they are not anywhere in its data directory.
    for entry in walk(&s.data_dir) {
        let bytes = std::fs::read(&entry).unwrap_or_default();
        for name in [&b"Family"[..], b"Tax 2026", b"correct horse"] {
            assert!(
                !contains(&bytes, name),
                "{} contains {:?}",
                entry.display(),
                String::from_utf8_lossy(name)
            );
        }
    }

    // A wrong passphrase, and no way to ask for one, are clear errors.
    let wrong = home.path().join("wrong");
    std::fs::write(&wrong, "nope").unwrap();
    let err = fails(run(home.path(), &["vault", "list", "--passphrase-file", wrong.to_str().unwrap()]));
    assert!(err.contains("not authorized"), "{err}");
    let err = fails(run(home.path(), &["vault", "list"]));
    assert!(err.contains("passphrase"), "{err}");
    let err = fails(run(home.path(), &["vault", "create", "a/b", "--passphrase-file", pass]));
    assert!(err.contains("invalid vault name"), "{err}");

    // A new passphrase: the login and the wallet change together, and the old
    // one opens neither from then on.
    let err =
        fails(run(home.path(), &["passphrase", "--passphrase-file", pass, "--new-passphrase-file", pass]));
    assert!(err.contains("the new passphrase is the old one"), "{err}");
    let new = home.path().join("new");
    std::fs::write(&new, "a new and longer passphrase\n").unwrap();
    let new = new.to_str().unwrap();
    let out = ok(run(home.path(), &["passphrase", "--passphrase-file", pass, "--new-passphrase-file", new]));
    assert!(out.contains("passphrase changed"), "{out}");
    let err = fails(run(home.path(), &["vault", "list", "--passphrase-file", pass]));
    assert!(err.contains("not authorized"), "{err}");
    let list = ok(run(home.path(), &["vault", "list", "--passphrase-file", new]));
    assert!(
        list.contains("Family\tadmin") && list.contains("Tax 2026"),
        "the wallet opens with the new one: {list}"
    );
}

/// Writes `text` to `dir/name`; returns the path.
fn file(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

/// The code in what `vaultfs admin user reset` printed.
fn reset_code(out: &str) -> String {
    out.lines()
        .find_map(|l| l.split("new enrollment code for ").nth(1)?.split(": ").nth(1))
        .unwrap_or_else(|| panic!("no code in {out}"))
        .trim()
        .to_string()
}

/// A recovery key brings back the wallet and every vault after an admin's
/// reset, under a new passphrase; a mistyped one stops before anything is
/// sent, a wrong one changes nothing. Without one, the user starts over only
/// when they ask to.
#[test]
fn a_recovery_key_restores_a_reset_user_and_without_one_they_start_over() {
    let server_dir = tempfile::tempdir().unwrap();
    let s = start_for_cli(server_dir.path());
    let fp = s.fingerprint.clone().unwrap();
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let old = file(h, "old", "the passphrase that gets lost\n");
    let new = file(h, "new", "a passphrase chosen after the reset\n");
    let login = |user: &str, extra: &[&str]| {
        let mut args = vec!["login", "--server", &s.url, "--user", user, "--fingerprint", &fp];
        args.extend_from_slice(extra);
        run(h, &args)
    };
    let code = s.add_user("alice", &[]);
    ok(login("alice", &["--enroll", &code, "--passphrase-file", &old]));
    ok(run(h, &["vault", "create", "Family", "--passphrase-file", &old]));
    assert!(ok(run(h, &["whoami", "--passphrase-file", &old])).contains("recovery key: none"));
    let out = ok(run(h, &["recovery-key", "--passphrase-file", &old]));
    let paper = out
        .split_whitespace()
        .find(|w| w.len() == 34 && w.matches('-').count() == 6)
        .unwrap_or_else(|| panic!("no recovery key in {out}"))
        .to_string();
    let err = fails(run(h, &["recovery-key", "--passphrase-file", &old]));
    assert!(err.contains("--replace"), "{err}");
    assert!(ok(run(h, &["whoami", "--passphrase-file", &old])).contains("recovery key: made"));
    // A vault made after the key is recoverable too.
    ok(run(h, &["vault", "create", "Tax", "--passphrase-file", &old]));

    let reset = s.admin(&["user", "reset", "alice"]);
    assert!(reset.contains("made a recovery key") && reset.contains("--recovery-key"), "{reset}");
    let code = reset_code(&reset);
    // One character mistyped: refused by the checksum, before the code is used.
    let typo = {
        let mut t = paper.clone();
        let c = if t.starts_with('Z') { "Y" } else { "Z" };
        t.replace_range(0..1, c);
        file(h, "typo", &t)
    };
    let err =
        fails(login("alice", &["--enroll", &code, "--passphrase-file", &new, "--recovery-key-file", &typo]));
    assert!(err.contains("mistyped"), "{err}");
    // Another (well-formed) key: the code is used, the wallet left as it was.
    let other = file(
        h,
        "other",
        &vaultfs::crypto::RecoveryKey::generate(&mut vaultfs::crypto::OsRandom).unwrap().to_string(),
    );
    let err =
        fails(login("alice", &["--enroll", &code, "--passphrase-file", &new, "--recovery-key-file", &other]));
    assert!(err.contains("does not open the wallet") && err.contains("without --enroll"), "{err}");
    let err = fails(login("alice", &["--passphrase-file", &new]));
    assert!(err.contains("--recovery-key") && err.contains("it has one"), "{err}");
    let right = file(h, "paper", &format!("{}\n", paper.to_lowercase()));
    let out = ok(login("alice", &["--passphrase-file", &new, "--recovery-key-file", &right]));
    assert!(out.contains("restored"), "{out}");
    let list = ok(run(h, &["vault", "list", "--passphrase-file", &new]));
    assert!(list.contains("Family\tadmin") && list.contains("Tax\tadmin"), "{list}");
    let err = fails(run(h, &["vault", "list", "--passphrase-file", &old]));
    assert!(err.contains("not authorized"), "{err}");

    // Bob made no recovery key: the admin is told, and only --start-over
    // replaces his wallet.
    let code = s.add_user("bob", &[]);
    ok(login("bob", &["--enroll", &code, "--passphrase-file", &old]));
    ok(run(h, &["vault", "create", "Bobs", "--passphrase-file", &old]));
    let reset = s.admin(&["user", "reset", "bob"]);
    assert!(reset.contains("has no recovery key") && reset.contains("--start-over"), "{reset}");
    let err = fails(login("bob", &["--enroll", &reset_code(&reset), "--passphrase-file", &new]));
    assert!(err.contains("--start-over") && err.contains("nothing is changed"), "{err}");
    let out = ok(login("bob", &["--passphrase-file", &new, "--start-over"]));
    assert!(out.contains("start over"), "{out}");
    let list = ok(run(h, &["vault", "list", "--passphrase-file", &new]));
    assert!(list.contains("<name cannot be decrypted>") && !list.contains("Bobs"), "{list}");
    let err = fails(login("bob", &["--passphrase-file", &new, "--start-over"]));
    assert!(err.contains("nothing to start over"), "{err}");
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.path().is_dir() {
            out.extend(walk(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn admin_manages_users_limits_and_lists_vaults() {
    let s = TestServer::start();
    s.add_user("alice", &["--upload-limit", "1MB"]);
    s.add_user("bob", &[]);
    let list = s.admin(&["user", "list"]);
    assert!(
        list.contains("alice") && list.contains("1000000") && list.contains("awaiting enrollment"),
        "{list}"
    );
    let changed = s.admin(&["user", "limits", "alice", "--e2e-limit", "500kB"]);
    assert!(changed.contains("upload limit 1000000, e2e limit 500000"), "{changed}");
    s.admin(&["user", "remove", "bob"]);
    assert!(!s.admin(&["user", "list"]).contains("bob"));
    let reset = s.admin(&["user", "reset", "alice"]);
    assert!(reset.contains("new enrollment code"), "{reset}");

    // Errors name what is wrong.
    let bad = |args: &[&str]| {
        let out = Command::new(vaultfs_bin())
            .arg("admin")
            .arg("--data-dir")
            .arg(&s.data_dir)
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    assert!(bad(&["user", "add", "alice"]).contains("already exists"));
    assert!(bad(&["user", "add", "bad name"]).contains("invalid user name"));
    assert!(bad(&["user", "limits", "alice", "--e2e-limit", "2MB"]).contains("must not exceed"));
    assert!(bad(&["user", "remove", "nobody"]).contains("not found"));
    assert!(bad(&["user", "add", "carol", "--upload-limit", "12XB"]).contains("invalid size unit"));
    let empty = tempfile::tempdir().unwrap();
    let out = Command::new(vaultfs_bin())
        .arg("admin")
        .arg("--data-dir")
        .arg(empty.path())
        .args(["user", "list"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("no vaultfs server data here"));
}

#[test]
fn serve_refuses_bad_configuration_with_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("server.toml");
    std::fs::write(&config, "listen = \"127.0.0.1:0\"\nupload_limit = 5\n").unwrap();
    let out = Command::new(vaultfs_bin()).args(["serve", "--config"]).arg(&config).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("server.toml") && err.contains("line 2") && err.contains("upload_limit"), "{err}");
    // Plain HTTP away from loopback is refused.
    let out = Command::new(vaultfs_bin())
        .args(["serve", "--listen", "0.0.0.0:0", "--plain-http", "--data-dir"])
        .arg(dir.path().join("d"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("loopback"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_certificate_from_a_ca_is_trusted_through_the_ca_file() {
    use vaultfs::remote::http::{HttpRemote, ServerAccess};
    use vaultfs::remote::tls::Trust;
    use vaultfs::remote::Remote;

    // A CA, and a server certificate for 127.0.0.1 signed by it.
    let dir = tempfile::tempdir().unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    let (ca_pem, cert_pem, key_pem) =
        (dir.path().join("ca.pem"), dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&ca_pem, ca_cert.pem()).unwrap();
    std::fs::write(&cert_pem, leaf.pem()).unwrap();
    std::fs::write(&key_pem, leaf_key.serialize_pem()).unwrap();

    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let config = dir.path().join("server.toml");
    std::fs::write(
        &config,
        format!(
            "[tls]\ncert = {:?}\nkey = {:?}\n[login_kdf]\nm_cost_kib = 256\nt_cost = 1\np_cost = 1\n",
            cert_pem, key_pem
        ),
    )
    .unwrap();
    let s = TestServer::start_with_config(&data, &config);
    let code = s.add_user("alice", &[]);
    let access = ServerAccess::new(s.url.clone(), Some(Trust::CaFile(ca_pem.clone())));
    let alice = HttpRemote::enroll(&access, "alice", &code, b"pw", support::server::TEST_KDF).await.unwrap();
    assert_eq!(alice.me().await.unwrap().user, "alice");

    // Another CA's file does not vouch for this server.
    let other_key = rcgen::KeyPair::generate().unwrap();
    let mut other = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    other.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let other_pem = dir.path().join("other.pem");
    std::fs::write(&other_pem, other.self_signed(&other_key).unwrap().pem()).unwrap();
    let access = ServerAccess::new(s.url.clone(), Some(Trust::CaFile(other_pem)));
    assert!(HttpRemote::login(&access, "alice", b"pw", support::server::TEST_KDF).await.is_err());
}

#[test]
fn login_refuses_a_server_that_asks_for_a_cheap_login_kdf() {
    // TestServer::start() announces 256 KiB / 1 pass: below the CLI's floor.
    let s = TestServer::start();
    let code = s.add_user("alice", &[]);
    let home = tempfile::tempdir().unwrap();
    let pass = home.path().join("pass");
    std::fs::write(&pass, "pw").unwrap();
    let fp = s.fingerprint.clone().unwrap();
    let err = fails(run(
        home.path(),
        &[
            "login",
            "--server",
            &s.url,
            "--user",
            "alice",
            "--fingerprint",
            &fp,
            "--enroll",
            &code,
            "--passphrase-file",
            pass.to_str().unwrap(),
        ],
    ));
    assert!(err.contains("below this client's minimum"), "{err}");
    assert!(!home.path().join("vaultfs/login.toml").exists());
}
