//! Faults staged on purpose against a real mount: the server killed during an
//! upload or down at open, the daemon killed with SIGKILL, and many processes
//! at once. Nothing hangs, errors arrive as errnos, and no closed file is lost.

mod support;

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use support::mount::TestMount;

fn xattr(path: &Path, name: &str) -> String {
    let out = Command::new("getfattr").args(["-n", name, "--only-values"]).arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An extended attribute read through an open descriptor (no path lookup,
/// which would ask the server).
fn fxattr(fd: i32, name: &str) -> String {
    let name = std::ffi::CString::new(name).unwrap();
    let mut buf = [0u8; 64];
    // SAFETY: fgetxattr writes at most buf.len() bytes into buf.
    let n = unsafe { libc::fgetxattr(fd, name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return String::new();
    }
    String::from_utf8_lossy(&buf[..n as usize]).into_owned()
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(29).wrapping_add(seed) ^ (i >> 14) as u8).collect()
}

/// Waits up to `limit` for `cond`.
fn wait_for(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

#[test]
fn the_server_killed_during_an_upload_keeps_the_old_version_and_the_data_is_retried() {
    let mut m = TestMount::start();
    std::fs::create_dir(m.path("Family/r")).unwrap();
    let path = m.path("Family/r/report.bin");
    let v1 = pattern(2_000_000, 1);
    std::fs::write(&path, &v1).unwrap();
    let blobs_before = blob_sizes(&m.server.data_dir);

    // v2 (25 MB, end-to-end) is written; the server dies while fsync uploads it.
    let v2 = pattern(25_000_000, 2);
    let mut f = std::fs::OpenOptions::new().write(true).truncate(true).open(&path).unwrap();
    f.write_all(&v2).unwrap();
    // The server is frozen (SIGSTOP) so the upload is surely under way when it
    // is killed: once the mount says "uploading", SIGKILL.
    let server_pid = m.server.pid();
    // Signals are sent directly: a forked `kill` would inherit the open file,
    // and its exit (closing that copy) would already save the file.
    // SAFETY: kill(2) with a valid pid and signal.
    assert_eq!(unsafe { libc::kill(server_pid as i32, libc::SIGSTOP) }, 0);
    let watcher = {
        let fd = std::os::unix::io::AsRawFd::as_raw_fd(&f);
        std::thread::spawn(move || {
            let seen = wait_for(Duration::from_secs(20), || fxattr(fd, "user.vaultfs.state") == "uploading");
            // SAFETY: as above.
            unsafe { libc::kill(server_pid as i32, libc::SIGKILL) };
            seen
        })
    };
    let start = Instant::now();
    let synced = f.sync_all();
    let took = start.elapsed();
    let saw_upload = watcher.join().unwrap();
    m.server.kill_hard(); // reap it
    assert!(saw_upload, "the upload never started\n{}", m.log());
    // The writer gets an error, not a hang, and the data stays in memory.
    let e = synced.expect_err("fsync cannot succeed with the server killed mid-upload");
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    assert!(took < Duration::from_secs(60), "fsync took {took:?}");
    drop(f);
    assert_eq!(xattr(&path, "user.vaultfs.state"), "dirty", "{}", m.log());
    // Nothing partial on the server: its stored files are exactly as before.
    assert_eq!(blob_sizes(&m.server.data_dir), blobs_before, "the server changed its stored files");
    // The server comes back: the data is retried until it is stored.
    m.server.restart();
    assert!(
        wait_for(Duration::from_secs(90), || xattr(&path, "user.vaultfs.state") == "clean"),
        "never stored after the server came back\n{}",
        m.log()
    );
    m.unmount();
    m.mount();
    assert!(std::fs::read(&path).unwrap() == v2, "the new version, whole");
}

/// Sizes of the server's blob files, sorted.
fn blob_sizes(data: &Path) -> Vec<u64> {
    let mut sizes = Vec::new();
    let mut stack = vec![data.join("blobs")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let meta = e.metadata().unwrap();
            if meta.is_dir() {
                stack.push(e.path());
            } else {
                sizes.push(meta.len());
            }
        }
    }
    sizes.sort_unstable();
    sizes
}

#[test]
fn the_server_down_at_open_gives_an_errno_in_bounded_time_and_the_mount_stays_usable() {
    let mut m = TestMount::start();
    std::fs::create_dir(m.path("Family/r")).unwrap();
    std::fs::write(m.path("Family/r/a.txt"), b"stored").unwrap();
    m.unmount();
    m.mount();
    let _ = std::fs::read_dir(m.path("Family/r")).unwrap().count(); // listing known
    m.server.kill_hard();
    let start = Instant::now();
    let err = std::fs::read(m.path("Family/r/a.txt")).unwrap_err();
    let took = start.elapsed();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(took < Duration::from_secs(30), "open took {took:?} with the server down");
    // The rest of the mount answers meanwhile.
    let start = Instant::now();
    assert!(std::fs::metadata(m.path("Family")).unwrap().is_dir());
    assert!(start.elapsed() < Duration::from_secs(10));
    // And once the server is back, the file opens again.
    m.server.restart();
    assert!(
        wait_for(Duration::from_secs(30), || std::fs::read(m.path("Family/r/a.txt"))
            .is_ok_and(|d| d == b"stored")),
        "{}",
        m.log()
    );
}

#[test]
fn after_sigkill_of_the_daemon_the_mount_point_recovers_and_closed_files_are_stored() {
    let mut m = TestMount::start();
    std::fs::create_dir(m.path("Family/r")).unwrap();
    let files: Vec<(String, Vec<u8>)> =
        (0..5).map(|i| (format!("Family/r/f{i}.bin"), pattern(100_000 + i * 7_000, i as u8))).collect();
    for (name, data) in &files {
        std::fs::write(m.path(name), data).unwrap();
    }
    let pid = m.pid();
    assert!(Command::new("kill").args(["-KILL", &pid.to_string()]).status().unwrap().success());
    // The mount point is dead now ("transport endpoint is not connected");
    // `vaultfs unmount` clears it.
    assert!(wait_for(Duration::from_secs(10), || !Path::new(&format!("/proc/{pid}")).exists()
        || std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z "))));
    let out =
        Command::new(support::server::vaultfs_bin()).arg("unmount").arg(&m.mountpoint).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    m.forget_child();
    m.mount();
    for (name, data) in &files {
        assert!(std::fs::read(m.path(name)).unwrap() == *data, "{name}");
    }
}

#[test]
fn eight_processes_at_once_on_distinct_and_shared_files() {
    let m = TestMount::start();
    std::fs::create_dir(m.path("Family/busy")).unwrap();
    std::fs::write(m.path("Family/busy/shared.txt"), b"shared\n").unwrap();
    let dir = m.path("Family/busy");
    let children: Vec<std::process::Child> = (0..8)
        .map(|p| {
            let script = format!(
                "set -e; for i in $(seq 1 25); do \
                   printf 'process {p} line %s\\n' $i >> own{p}.txt; \
                   head -c 20000 /dev/urandom > blob{p}; cp blob{p} copy{p}; cmp blob{p} copy{p}; \
                   grep -q shared shared.txt; \
                 done"
            );
            Command::new("sh").arg("-c").arg(script).current_dir(&dir).spawn().unwrap()
        })
        .collect();
    for (p, mut c) in children.into_iter().enumerate() {
        assert!(c.wait().unwrap().success(), "process {p} failed\n{}", m.log());
    }
    for p in 0..8 {
        let own = std::fs::read_to_string(dir.join(format!("own{p}.txt"))).unwrap();
        let expected: String = (1..=25).map(|i| format!("process {p} line {i}\n")).collect();
        assert_eq!(own, expected, "process {p}");
        assert_eq!(
            std::fs::read(dir.join(format!("blob{p}"))).unwrap(),
            std::fs::read(dir.join(format!("copy{p}"))).unwrap()
        );
    }
    assert_eq!(std::fs::read(dir.join("shared.txt")).unwrap(), b"shared\n");
}
