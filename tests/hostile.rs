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
