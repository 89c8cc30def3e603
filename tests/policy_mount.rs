//! Mount policies through a real mount: read-only vaults, refused deletes,
//! oversized files refused or passed through, and image reduction.

mod support;

use std::io::{Cursor, Write};
use std::path::Path;
use std::process::Command;

use support::mount::TestMount;
use support::xattr;

fn errno_of(r: std::io::Result<impl Sized>) -> Option<i32> {
    r.err().and_then(|e| e.raw_os_error())
}

/// Puts `policy` in place and mounts again.
fn remount_with(m: &mut TestMount, policy: &str) {
    m.unmount();
    std::fs::write(&m.policy, policy).unwrap();
    m.mount();
}

#[test]
fn read_only_vaults_refuse_changes_and_deletes_can_be_refused() {
    let mut m = TestMount::start_with("", &["Archive"]);
    for dir in ["Archive/r", "Archive/empty", "Family/r", "Family/empty"] {
        std::fs::create_dir(m.path(dir)).unwrap();
    }
    std::fs::write(m.path("Archive/r/a.txt"), b"kept").unwrap();
    std::fs::write(m.path("Family/r/b.txt"), b"mine").unwrap();
    remount_with(&mut m, "[vaults.Archive]\nread_only = true\n\n[vaults.Family]\nallow_delete = false\n");

    // Archive: reads work, every change is EROFS.
    assert_eq!(std::fs::read(m.path("Archive/r/a.txt")).unwrap(), b"kept");
    assert_eq!(errno_of(std::fs::write(m.path("Archive/r/new.txt"), b"x")), Some(libc::EROFS));
    assert_eq!(errno_of(std::fs::write(m.path("Archive/r/a.txt"), b"x")), Some(libc::EROFS));
    let append = std::fs::OpenOptions::new().append(true).open(m.path("Archive/r/a.txt"));
    assert_eq!(errno_of(append), Some(libc::EROFS));
    assert_eq!(errno_of(std::fs::create_dir(m.path("Archive/r2"))), Some(libc::EROFS));
    assert_eq!(errno_of(std::fs::remove_file(m.path("Archive/r/a.txt"))), Some(libc::EROFS));
    assert_eq!(errno_of(std::fs::remove_dir(m.path("Archive/empty"))), Some(libc::EROFS));
    assert_eq!(
        errno_of(std::fs::rename(m.path("Archive/r/a.txt"), m.path("Archive/r/b.txt"))),
        Some(libc::EROFS)
    );
    let out = Command::new("truncate").args(["-s", "0"]).arg(m.path("Archive/r/a.txt")).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("Read-only file system"), "{err}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(m.path("Archive/r/a.txt")).unwrap().permissions().mode();
    assert_eq!(mode & 0o222, 0, "read-only files show no write bits: {mode:o}");
    assert_eq!(std::fs::read(m.path("Archive/r/a.txt")).unwrap(), b"kept");

    // Family: changes work, deletes are EPERM.
    std::fs::write(m.path("Family/r/c.txt"), b"new").unwrap();
    assert_eq!(errno_of(std::fs::remove_file(m.path("Family/r/b.txt"))), Some(libc::EPERM));
    assert_eq!(errno_of(std::fs::remove_dir(m.path("Family/empty"))), Some(libc::EPERM));
    std::fs::rename(m.path("Family/r/c.txt"), m.path("Family/r/d.txt")).unwrap();
    assert_eq!(std::fs::read(m.path("Family/r/b.txt")).unwrap(), b"mine");
    assert_eq!(std::fs::read(m.path("Family/r/d.txt")).unwrap(), b"new");
}

#[test]
fn oversized_files_are_refused_or_passed_through_as_the_policy_says() {
    let policy = "[defaults]\ne2e_limit = \"1 MB\"\n\n[vaults.Strict]\noversize = \"refuse\"\n";
    let m = TestMount::start_with(policy, &["Strict"]);
    std::fs::create_dir(m.path("Strict/r")).unwrap();
    std::fs::create_dir(m.path("Family/r")).unwrap();
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 241) as u8).collect();

    let mut f = std::fs::File::create(m.path("Strict/r/big.bin")).unwrap();
    let err = f.write_all(&data).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EFBIG), "{err}");
    drop(f);
    let kept = std::fs::metadata(m.path("Strict/r/big.bin")).unwrap().len();
    assert!(kept <= 1_000_000, "nothing past the limit was taken: {kept}");
    assert_eq!(xattr(&m.path("Strict/r/big.bin"), "user.vaultfs.e2e"), "1");

    std::fs::write(m.path("Family/r/big.bin"), &data).unwrap();
    assert_eq!(xattr(&m.path("Family/r/big.bin"), "user.vaultfs.e2e"), "0", "passed through, marked");
    assert!(std::fs::read(m.path("Family/r/big.bin")).unwrap() == data);
    // Below the limit, files are end-to-end encrypted as usual.
    std::fs::write(m.path("Strict/r/small.bin"), &data[..500_000]).unwrap();
    assert_eq!(xattr(&m.path("Strict/r/small.bin"), "user.vaultfs.e2e"), "1");
}

/// A photo-like image: gradients with some texture (so JPEG has work to do).
fn photo(w: u32, h: u32) -> image::RgbImage {
    image::RgbImage::from_fn(w, h, |x, y| {
        let n = (x.wrapping_mul(7919) ^ y.wrapping_mul(104_729)) % 23;
        image::Rgb([(x * 255 / w) as u8, (y * 255 / h) as u8, ((x / 3 + y / 5) % 200) as u8 + n as u8])
    })
}

fn encoded(img: &image::RgbImage, format: image::ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, format).unwrap();
    out.into_inner()
}

#[test]
fn images_are_reduced_to_the_policys_edge_and_broken_ones_are_kept() {
    let policy = "[defaults.images]\nreduce = true\nmax_edge = 1000\njpeg_quality = 80\n";
    let mut m = TestMount::start_with(policy, &[]);
    std::fs::create_dir(m.path("Family/photos")).unwrap();
    let jpeg = encoded(&photo(4000, 3000), image::ImageFormat::Jpeg);
    let png = encoded(&photo(2000, 1500), image::ImageFormat::Png);
    let small = encoded(&photo(640, 480), image::ImageFormat::Jpeg);
    let mut corrupt = jpeg[..2].to_vec(); // a JPEG's first bytes, then garbage
    corrupt.extend((0..200_000u32).map(|i| (i * 31 % 251) as u8));
    std::fs::write(m.path("Family/photos/big.jpg"), &jpeg).unwrap();
    std::fs::write(m.path("Family/photos/big.PNG"), &png).unwrap();
    std::fs::write(m.path("Family/photos/small.jpg"), &small).unwrap();
    std::fs::write(m.path("Family/photos/corrupt.jpg"), &corrupt).unwrap();
    std::fs::write(m.path("Family/photos/notes.txt"), &jpeg).unwrap();

    let check = |m: &TestMount, when: &str| {
        for (name, w, h) in [("big.jpg", 1000, 750), ("big.PNG", 1000, 750)] {
            let path = m.path(&format!("Family/photos/{name}"));
            let back = std::fs::read(&path).unwrap();
            assert_eq!(
                std::fs::metadata(&path).unwrap().len(),
                back.len() as u64,
                "{when}: stat and read agree"
            );
            let img =
                image::load_from_memory(&back).unwrap_or_else(|e| panic!("{when}: {name}: {e}\n{}", m.log()));
            assert_eq!((img.width(), img.height()), (w, h), "{when}: {name}");
        }
        assert_eq!(std::fs::read(m.path("Family/photos/small.jpg")).unwrap(), small, "{when}");
        assert_eq!(std::fs::read(m.path("Family/photos/corrupt.jpg")).unwrap(), corrupt, "{when}");
        assert!(
            std::fs::read(m.path("Family/photos/notes.txt")).unwrap() == jpeg,
            "{when}: not an image name"
        );
    };
    check(&m, "right after close");
    assert!(m.log().contains("could not be reduced"), "the corrupt image is logged:\n{}", m.log());
    m.unmount();
    m.mount();
    check(&m, "after a remount");
}

#[test]
fn a_bad_policy_stops_the_mount_and_policy_check_explains() {
    let mut m = TestMount::start_with("", &[]);
    m.unmount();
    std::fs::write(&m.policy, "[defaults]\nread_only = true\nreadonly = false\n").unwrap();
    let out = Command::new(support::server::vaultfs_bin())
        .arg("mount")
        .arg(&m.mountpoint)
        .arg("--foreground")
        .env("XDG_CONFIG_HOME", &m.home)
        .env("VAULTFS_PASSPHRASE_FILE", &m.pass)
        .env("VAULTFS_POLICY", &m.policy)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("policy.toml") && err.contains("line 3") && err.contains("readonly"), "{err}");
    assert!(!m.is_mounted());

    // `vaultfs policy check` names the same problem, and prints the effective
    // policy for a good file, with the user's config on top.
    let check = |file: &Path| {
        Command::new(support::server::vaultfs_bin())
            .args(["policy", "check"])
            .arg(file)
            .env("XDG_CONFIG_HOME", &m.home)
            .output()
            .unwrap()
    };
    let out = check(&m.policy);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("readonly"));
    std::fs::write(&m.policy, "[defaults]\nread_only = false\n[vaults.Family]\nallow_delete = false\n")
        .unwrap();
    std::fs::create_dir_all(m.home.join("vaultfs")).unwrap();
    std::fs::write(m.home.join("vaultfs/config.toml"), "[defaults]\nread_only = true\n").unwrap();
    let out = check(&m.policy);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("[vaults.\"Family\"]"), "{text}");
    assert!(text.contains("read_only = true"), "the user tightened it: {text}");
    assert!(text.contains("allow_delete = false"), "{text}");
    // A mount point outside the allowed ones is refused.
    std::fs::write(&m.policy, "[mount]\nallowed_mountpoints = [\"/nowhere\"]\n").unwrap();
    std::fs::remove_file(m.home.join("vaultfs/config.toml")).unwrap();
    let out = Command::new(support::server::vaultfs_bin())
        .arg("mount")
        .arg(&m.mountpoint)
        .arg("--foreground")
        .env("XDG_CONFIG_HOME", &m.home)
        .env("VAULTFS_PASSPHRASE_FILE", &m.pass)
        .env("VAULTFS_POLICY", &m.policy)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("does not allow mounting"), "{err}");
}

#[test]
fn presented_owner_and_permissions_follow_the_policy() {
    use std::os::unix::fs::MetadataExt;
    let policy = "[mount]\nuid = 4242\ngid = 4343\numask = \"077\"\ndefault_permissions = true\n";
    let m = TestMount::start_with(policy, &[]);
    std::fs::create_dir(m.path("Family/r")).unwrap();
    std::fs::write(m.path("Family/r/a.txt"), b"x").unwrap();
    let dir = std::fs::metadata(m.path("Family/r")).unwrap();
    let file = std::fs::metadata(m.path("Family/r/a.txt")).unwrap();
    assert_eq!((dir.uid(), dir.gid(), dir.mode() & 0o777), (4242, 4343, 0o700));
    assert_eq!((file.uid(), file.gid(), file.mode() & 0o777), (4242, 4343, 0o600));
    let options = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = options.lines().find(|l| l.contains(m.mountpoint.to_str().unwrap())).unwrap().to_string();
    assert!(line.contains("default_permissions"), "{line}");
}
