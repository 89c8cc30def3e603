//! `vaultfs demo`, the README's first command: it must come up, serve a mounted
//! vault, and leave nothing behind after Ctrl-C.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use support::server::vaultfs_bin;

#[test]
fn demo_mounts_a_vault_and_cleans_up_on_ctrl_c() {
    assert!(std::path::Path::new("/dev/fuse").exists(), "the demo needs FUSE");
    let mut child = Command::new(vaultfs_bin())
        .arg("demo")
        .env("VAULTFS_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // Make sure the child is stopped even if an assertion fails.
    struct Stop(u32);
    impl Drop for Stop {
        fn drop(&mut self) {
            let _ = Command::new("kill").arg("-INT").arg(self.0.to_string()).status();
        }
    }
    let stop = Stop(child.id());

    let mountpoint = loop {
        let line = rx.recv_timeout(Duration::from_secs(60)).expect("demo did not become ready");
        if let Some(rest) = line.strip_prefix("vaultfs demo: ready at ") {
            break std::path::PathBuf::from(rest.trim());
        }
    };
    let mut data_dir = None;
    let mut shared = None;
    while let Ok(line) = rx.recv_timeout(Duration::from_millis(500)) {
        if let Some(rest) = line.trim().strip_prefix("server data") {
            data_dir = rest.split_whitespace().next().map(std::path::PathBuf::from);
        }
        if let Some(rest) = line.trim().strip_prefix("shared with") {
            shared = Some(rest.trim().to_string());
        }
        if line.starts_with("Press Ctrl-C") {
            break;
        }
    }
    let readme = std::fs::read_to_string(mountpoint.join("Demo vault/Welcome/README.txt")).unwrap();
    assert!(readme.starts_with("Welcome to vaultfs."), "{readme}");
    std::fs::create_dir_all(mountpoint.join("Demo vault/Mine")).unwrap();
    std::fs::write(mountpoint.join("Demo vault/Mine/a.txt"), b"mine").unwrap();
    // The demo shares its vault with a second user, whose client opened it.
    let shared = shared.expect("the demo says whom it shared the vault with");
    assert!(shared.contains("read rights") && shared.contains("sees \"Demo vault\""), "{shared}");
    let data_dir = data_dir.expect("the demo names its data directory");
    assert!(data_dir.exists());

    drop(stop); // Ctrl-C
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "demo did not stop after Ctrl-C");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "demo exited with {status}");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(mountpoint.to_str().unwrap()), "still mounted");
    assert!(!data_dir.exists(), "demo left {} behind", data_dir.display());
}
