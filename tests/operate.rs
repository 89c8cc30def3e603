//! Running vaultfs the way other tools run: `mount -t fuse.vaultfs` (an fstab
//! line) with its options and passphrase sources, and `umount`. Needs root
//! and /dev/fuse, as the other mount tests.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use support::mount::TestMount;
use support::server::vaultfs_bin;

/// Runs `mount -t fuse.vaultfs vaults MOUNTPOINT -o OPTIONS` as from an
/// fstab line: mount(8) calls fuse3's mount.fuse, which runs `vaultfs` from
/// the shell's default path, with a bare environment (no HOME, PATH or XDG
/// variables: the `home` option names the test user's), plus `env`.
fn fstab_mount(m: &TestMount, options: &str, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new("mount");
    cmd.args(["-t", "fuse.vaultfs", "vaults"])
        .arg(&m.mountpoint)
        .arg("-o")
        .arg(format!("home={},{options}", m.home.display()))
        .env_remove("VAULTFS_PASSPHRASE_FILE")
        .env_remove("VAULTFS_PASSPHRASE_COMMAND")
        .env_remove("CREDENTIALS_DIRECTORY");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("running mount")
}

/// `vaultfs` on the shell's default path, as the package installs it: a
/// link to the binary under test in /usr/local/bin, removed when dropped.
struct OnDefaultPath(PathBuf);

impl OnDefaultPath {
    fn link() -> Self {
        let link = PathBuf::from("/usr/local/bin/vaultfs");
        match std::fs::symlink_metadata(&link) {
            Ok(meta) if !meta.file_type().is_symlink() => {
                panic!("{} is an installed vaultfs, which this test would shadow: remove it", link.display())
            }
            Ok(_) => std::fs::remove_file(&link).unwrap(), // a link left by an earlier run
            Err(_) => {}
        }
        std::os::unix::fs::symlink(vaultfs_bin(), &link).unwrap();
        OnDefaultPath(link)
    }
}

impl Drop for OnDefaultPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The daemons mounted on `mountpoint` (found by their command line).
fn daemons(mountpoint: &Path) -> Vec<u32> {
    let out =
        Command::new("pgrep").arg("-f").arg(format!("mount {}", mountpoint.display())).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.trim().parse().ok()).collect()
}

/// Unmounts with umount(8), as an admin would, and waits for the daemon to
/// save and exit.
fn umount(mountpoint: &Path) {
    let out = Command::new("umount").arg(mountpoint).output().unwrap();
    assert!(out.status.success(), "umount: {}", String::from_utf8_lossy(&out.stderr));
    let start = Instant::now();
    while !daemons(mountpoint).is_empty() {
        assert!(start.elapsed() < Duration::from_secs(20), "the daemon did not exit after umount");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn mounted(mountpoint: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(1) == mountpoint.to_str())
}

/// Leaves nothing behind when the test fails half way: the mount goes, and
/// the daemon exits on its own once it sees that.
struct Unmounted(PathBuf);

impl Drop for Unmounted {
    fn drop(&mut self) {
        if mounted(&self.0) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

#[test]
fn an_fstab_mount_takes_its_options_and_passphrase_and_umount_saves_every_file() {
    let mut m = TestMount::start();
    m.unmount();
    let _guard = Unmounted(m.mountpoint.clone());
    let _linked = OnDefaultPath::link();
    // The test user's login is in HOME/vaultfs (XDG_CONFIG_HOME=HOME); with
    // only HOME, vaultfs looks in HOME/.config/vaultfs.
    std::os::unix::fs::symlink(&m.home, m.home.join(".config")).unwrap();
    let pass = m.pass.display().to_string();

    // Bad inputs: a clear error each, and nothing mounted.
    let bad = [
        ("colour=blue", "unknown mount option colour"),
        ("passphrase_command=exit 7", "failed"),
        ("passphrase_command=true", "printed no passphrase"),
        ("passphrase_command=echo wrong passphrase", ""),
        ("ro", "read-only"),
    ];
    for (options, says) in bad {
        let out = fstab_mount(&m, options, &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(says), "-o {options}: {err}");
        assert!(!mounted(&m.mountpoint), "-o {options} mounted");
        assert!(!err.contains("mount test passphrase"), "the passphrase in an error: {err}");
    }

    // The options of an fstab line, the passphrase from a command.
    let options =
        format!("rw,_netdev,noauto,nofail,x-systemd.automount,passphrase_command=cat {pass},cache_mib=64");
    let out = fstab_mount(&m, &options, &[]);
    assert!(out.status.success(), "mount: {}", String::from_utf8_lossy(&out.stderr));
    assert!(mounted(&m.mountpoint));
    let pids = daemons(&m.mountpoint);
    assert_eq!(pids.len(), 1, "one daemon: {pids:?}");
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", pids[0])).unwrap();
    assert!(!String::from_utf8_lossy(&cmdline).contains("mount test passphrase"));
    let files: Vec<(String, Vec<u8>)> =
        (0..20).map(|i| (format!("Family/fstab/f{i}"), vec![i as u8; 1000 + i * 4099])).collect();
    std::fs::create_dir_all(m.path("Family/fstab")).unwrap();
    for (name, data) in &files {
        std::fs::write(m.path(name), data).unwrap();
    }
    umount(&m.mountpoint);
    assert!(!mounted(&m.mountpoint));

    // Again with the passphrase from a systemd credential: every file is there.
    let creds = m.home.join("credentials");
    std::fs::create_dir_all(&creds).unwrap();
    std::fs::copy(&m.pass, creds.join("vaultfs-passphrase")).unwrap();
    let out = fstab_mount(&m, "defaults", &[("CREDENTIALS_DIRECTORY", creds.to_str().unwrap())]);
    assert!(out.status.success(), "mount: {}", String::from_utf8_lossy(&out.stderr));
    for (name, data) in &files {
        assert!(std::fs::read(m.path(name)).unwrap() == *data, "{name} differs after umount and mount");
    }
    umount(&m.mountpoint);
}
