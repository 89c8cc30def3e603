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
    let policy = "[mount]\nallow_other = true\ndefault_permissions = true\n";
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
    println!(
        "SUITE pjdfstest: {passed} passed, {failed} failed, {known} known exceptions, {skipped} skipped"
    );
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
