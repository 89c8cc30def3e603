//! Suites we did not write, against a live mount over a real server: pjdfstest
//! (POSIX conformance) with a short, justified list of exceptions, and fsx
//! (random operations checked against a model).
//!
//! The tools are installed by `.ci/test` (`cargo install pjdfstest fsx`); run
//! alone, these tests say how to install them.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use support::mount::TestMount;
use support::report;

fn tool(name: &str) -> PathBuf {
    let cargo_bin = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .map(|d| d.join("bin").join(name));
    if let Some(p) = cargo_bin.filter(|p| p.exists()) {
        return p;
    }
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(name))
        .find(|p| p.exists());
    found.unwrap_or_else(|| panic!("{name} is not installed: run .ci/test, or `cargo install {name}`"))
}

/// pjdfstest's configuration: its two dummy users mapped to ones every Debian
/// system has, and the features Linux offers.
const PJD_CONFIG: &str = r#"
[features]
posix_fallocate = {}
utimensat = {}
utime_now = {}
[settings]
naptime = 0.001
allow_remount = false
[dummy_auth]
entries = [["nobody", "nogroup"], ["daemon", "daemon"]]
"#;

/// Runs pjdfstest in `dir`; returns each test's outcome ("ok", "FAILED", "skipped").
fn pjdfstest(dir: &Path, config: &Path) -> (BTreeMap<String, String>, String) {
    let out = Command::new(tool("pjdfstest"))
        .arg("-c")
        .arg(config)
        .arg("-p")
        .arg(dir)
        .current_dir(dir)
        .output()
        .expect("run pjdfstest");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let mut results = BTreeMap::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if let (Some(name), Some(outcome), None) = (words.next(), words.next(), words.next()) {
            if name.contains("::") && matches!(outcome, "ok" | "FAILED" | "skipped") {
                results.insert(name.to_string(), outcome.to_string());
            }
        }
    }
    (results, text)
}

/// The exceptions: `pattern  # reason`; see [`excepted`] for the patterns.
fn exceptions() -> Vec<(String, String)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/pjdfstest-exceptions.txt");
    let text = std::fs::read_to_string(&path).unwrap();
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (pattern, reason) = l.split_once('#').unwrap_or_else(|| panic!("no reason given: {l}"));
            assert!(!reason.trim().is_empty(), "no reason given: {l}");
            (pattern.trim().to_string(), reason.trim().to_string())
        })
        .collect()
}

/// Whether `name` matches an exception: the exact name, a prefix ending in
/// `::` (a group of tests), or `*::x` (every test whose name ends in `::x`).
fn excepted<'a>(name: &str, list: &'a [(String, String)]) -> Option<&'a str> {
    list.iter()
        .find(|(p, _)| {
            name == p
                || (p.ends_with("::") && name.starts_with(p.as_str()))
                || p.strip_prefix('*').is_some_and(|suffix| name.ends_with(suffix))
        })
        .map(|(p, _)| p.as_str())
}

#[test]
fn pjdfstest_passes_everything_but_the_listed_exceptions() {
    // No umask: the modes pjdfstest sets show as set.
    let policy = "[mount]\nallow_other = true\ndefault_permissions = true\numask = \"000\"\n";
    let m = TestMount::start_with(policy, &[]);
    let dir = m.path("Family/pjdfstest");
    std::fs::create_dir(&dir).unwrap();
    // The dummy users switch into this directory.
    let config = m.home.join("pjdfstest.toml");
    std::fs::write(&config, PJD_CONFIG).unwrap();
    let (results, text) = pjdfstest(&dir, &config);
    assert!(results.len() > 100, "pjdfstest ran too few tests:\n{text}");
    let list = exceptions();
    let mut unexpected = Vec::new();
    let mut used = std::collections::BTreeSet::new();
    let (mut passed, mut failed, mut skipped, mut known) = (0, 0, 0, 0);
    for (name, outcome) in &results {
        match (outcome.as_str(), excepted(name, &list)) {
            ("ok", _) => passed += 1,
            ("skipped", _) => skipped += 1,
            (_, Some(p)) => {
                known += 1;
                used.insert(p);
            }
            _ => {
                failed += 1;
                unexpected.push(name.clone());
            }
        }
    }
    let stale: Vec<&str> = list.iter().map(|(p, _)| p.as_str()).filter(|p| !used.contains(p)).collect();
    report(&format!("pjdfstest (POSIX) | {passed} | {failed} | {known} known exceptions, {skipped} skipped"));
    for name in &unexpected {
        let detail: Vec<&str> = text
            .lines()
            .skip_while(|l| !l.starts_with(name.as_str()))
            .skip(1)
            .take_while(|l| l.starts_with('\t'))
            .collect();
        eprintln!("FAILED {name}\n{}", detail.join("\n"));
    }
    assert!(unexpected.is_empty(), "{} unexpected failures (see above)", unexpected.len());
    assert!(stale.is_empty(), "exceptions that no longer fail (remove them): {stale:?}");
}

/// An ext4 file system in a loop-mounted image, unmounted when dropped.
struct Ext4 {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Ext4 {
    /// None if it cannot be made here (mkfs.ext4 missing, or not root).
    fn mount() -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let (image, path) = (dir.path().join("ext4.img"), dir.path().join("mnt"));
        std::fs::create_dir(&path).unwrap();
        std::fs::File::create(&image).unwrap().set_len(256 << 20).unwrap();
        let ok = |c: &mut Command| c.output().is_ok_and(|o| o.status.success());
        (ok(Command::new("mkfs.ext4").args(["-q", "-I", "256"]).arg(&image))
            && ok(Command::new("mount").arg("-o").arg("loop").arg(&image).arg(&path)))
        .then_some(Ext4 { path, _dir: dir })
    }
}

impl Drop for Ext4 {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).status();
    }
}

#[test]
fn pjdfstest_on_ext4_is_the_reference() {
    let Some(ext4) = Ext4::mount() else {
        eprintln!("SKIPPED: a loop-mounted ext4 needs root and mkfs.ext4 (CI has both)");
        return;
    };
    let dir = ext4.path.join("pjdfstest");
    std::fs::create_dir(&dir).unwrap();
    let config = ext4.path.join("pjdfstest.toml");
    // ext4 takes times from the kernel's coarse clock (a few ms per tick): the
    // time-change tests need a nap longer than a tick there.
    std::fs::write(&config, PJD_CONFIG.replace("naptime = 0.001", "naptime = 0.02")).unwrap();
    let (results, text) = pjdfstest(&dir, &config);
    assert!(results.len() > 100, "pjdfstest ran too few tests:\n{text}");
    let count = |o: &str| results.values().filter(|v| *v == o).count();
    let (passed, failed, skipped) = (count("ok"), count("FAILED"), count("skipped"));
    // What ext4 passes and vaultfs fails by design (the exceptions list).
    let list = exceptions();
    let by_design = results.iter().filter(|(n, o)| *o == "ok" && excepted(n, &list).is_some()).count();
    report(&format!(
        "pjdfstest on ext4 (the reference) | {passed} | {failed} | {skipped} skipped; {by_design} of its passes match vaultfs's exception list"
    ));
    let failures: Vec<&String> = results.iter().filter(|(_, o)| *o == "FAILED").map(|(n, _)| n).collect();
    assert!(failures.is_empty(), "the reference itself fails: {failures:?}\n{text}");
}

/// fsx's settings: the operations Linux and a FUSE mount offer (not
/// fallocate or hole punching, which vaultfs does not implement), on a file of
/// up to `flen` bytes.
fn fsx_config(flen: u64) -> String {
    // nomsyncafterwrite: an msync(MS_SYNC) after every mapped write is an fsync,
    // which vaultfs answers with a durable, encrypted upload of the whole file;
    // with it, 100,000 operations take minutes. Mapped writes still reach the
    // file through the page cache, are saved at the next fsync or close, and are
    // checked by every later read.
    format!(
        "flen = {flen}\nnomsyncafterwrite = true\n[opsize]\nmax = 65536\nmin = 0\nalign = 1\n[weights]\nclose_open = 1\nread = 10\n\
         write = 10\nmapread = 10\nmapwrite = 10\ninvalidate = 1\ntruncate = 2\nfsync = 1\nfdatasync = 1\n\
         posix_fallocate = 0\npunch_hole = 0\nsendfile = 1\nposix_fadvise = 1\ncopy_file_range = 1\n"
    )
}

/// Runs `ops` fsx operations on `file`; panics with fsx's log on a miscompare.
fn fsx(m: &TestMount, file: &Path, flen: u64, ops: u32, seed: u32) -> String {
    let config = m.home.join(format!("fsx-{seed}.toml"));
    std::fs::write(&config, fsx_config(flen)).unwrap();
    // fsx writes its artifacts (the expected content on failure) to -P: keep
    // them outside the mount and out of the way.
    let artifacts = m.home.join("fsx-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let out = Command::new(tool("fsx"))
        .args(["-N", &ops.to_string(), "-S", &seed.to_string(), "-f"])
        .arg(&config)
        .arg("-P")
        .arg(&artifacts)
        .arg(file)
        .output()
        .expect("run fsx");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let tail: Vec<&str> = text.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect();
    assert!(
        out.status.success(),
        "fsx failed (seed {seed}):\n{}\n--- mount log:\n{}",
        tail.join("\n"),
        m.log()
    );
    text
}

#[test]
fn fsx_100000_random_operations_on_an_end_to_end_file() {
    let m = TestMount::start();
    std::fs::create_dir(m.path("Family/fsx")).unwrap();
    let file = m.path("Family/fsx/e2e.bin");
    fsx(&m, &file, 256 * 1024, 100_000, 20261123);
    assert_eq!(support::xattr(&file, "user.vaultfs.e2e"), "1");
    report("fsx, end-to-end file (100,000 operations) | 1 | 0 | no miscompare");
}

#[test]
fn fsx_across_the_end_to_end_limit_into_pass_through() {
    // An end-to-end limit of 1 MB and a file of up to 3 MB: the file keeps
    // crossing the limit, and is stored plain above it.
    let m = TestMount::start_with("[defaults]\ne2e_limit = \"1 MB\"\n", &[]);
    std::fs::create_dir(m.path("Family/fsx")).unwrap();
    let file = m.path("Family/fsx/big.bin");
    fsx(&m, &file, 3_000_000, 5_000, 7);
    report("fsx, across the end-to-end limit (5,000 operations) | 1 | 0 | no miscompare");
}
