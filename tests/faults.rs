//! Faults staged on purpose against a real mount: the server killed during an
//! upload or down at open, the daemon killed with SIGKILL, and many processes
//! at once. Nothing hangs, errors arrive as errnos, and no closed file is lost.

mod support;

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use support::mount::TestMount;
use support::{fxattr, xattr};

/// The tests here run one at a time. A test that forks (every Command) while
/// another holds a file open for writing gives the child a copy of that
/// descriptor; the child's exec closes it, and that close saves the file (FUSE
/// flush), which breaks a test that counts what the server stored.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
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
    let _serial = serial();
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
    // Not stored: "dirty", or "uploading" while the background retry tries
    // the dead server again (it starts right after the failed close).
    let state = xattr(&path, "user.vaultfs.state");
    assert!(state == "dirty" || state == "uploading", "state {state}\n{}", m.log());
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
    let _serial = serial();
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
    let _serial = serial();
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
    let _serial = serial();
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

/// A small tmpfs, unmounted when dropped (also when the test fails).
struct SmallDisk {
    path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl SmallDisk {
    /// Mounts a tmpfs of `size` (mount(8) syntax) in a temp dir; None if this
    /// user may not mount (the test then says so and does nothing; CI runs as root).
    fn mount(size: &str) -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        std::fs::create_dir(&path).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs"])
            .arg(&path)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        ok.then_some(SmallDisk { path, _dir: dir })
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// close(2) of a raw descriptor, returning its errno (Rust's File drops it).
fn close_errno(f: std::fs::File) -> Option<i32> {
    use std::os::fd::IntoRawFd;
    let fd = f.into_raw_fd();
    // SAFETY: fd is owned here and closed exactly once.
    let r = unsafe { libc::close(fd) };
    (r != 0).then(|| std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
}

#[test]
fn a_full_server_disk_gives_the_writer_enospc_and_keeps_the_data() {
    let _serial = serial();
    // Declared first so it is unmounted last, after the server has stopped.
    let Some(disk) = SmallDisk::mount("24m") else {
        eprintln!("SKIPPED: mounting a tmpfs needs root (CI runs as root)");
        return;
    };
    let m = TestMount::start_on(&disk.path, &[]);
    std::fs::create_dir(m.path("Family/r")).unwrap();
    std::fs::write(m.path("Family/r/small.txt"), b"fits\n").unwrap();

    // 28 MB (end-to-end, below the 30 MB limit) cannot fit in 24 MB.
    let big = pattern(28_000_000, 5);
    let path = m.path("Family/r/big.bin");
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(&big).unwrap();
    let started = Instant::now();
    let errno = close_errno(f);
    assert_eq!(errno, Some(libc::ENOSPC), "close must report the full disk as ENOSPC\n{}", m.log());
    assert!(started.elapsed() < Duration::from_secs(30), "close took {:?}", started.elapsed());
    // Unsaved and kept (the background retry may be trying again already).
    let state = xattr(&path, "user.vaultfs.state");
    assert!(
        state == "dirty" || state == "uploading",
        "state {state:?}: the data must stay unsaved, not dropped"
    );
    assert!(std::fs::read(&path).unwrap() == big, "the unsaved data is still readable");

    // The server cleaned up after itself: what fits is still stored.
    std::fs::write(m.path("Family/r/after.txt"), b"still works\n").unwrap();
    assert_eq!(std::fs::read(m.path("Family/r/small.txt")).unwrap(), b"fits\n");
    // Making the file fit lets it be saved.
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(1_000_000).unwrap();
    f.sync_all().unwrap_or_else(|e| panic!("fsync after shrinking: {e}\n{}", m.log()));
    assert_eq!(xattr(&path, "user.vaultfs.state"), "clean");
    drop(f);
    drop(m);
    drop(disk);
}

#[test]
fn two_mounts_editing_one_file_lose_no_update() {
    let _serial = serial();
    let m = TestMount::start();
    std::fs::create_dir(m.path("Family/shared")).unwrap();
    std::fs::write(m.path("Family/shared/plan.txt"), b"version 1\n").unwrap();
    let other = m.second_mount();
    let theirs = other.path("Family/shared/plan.txt");
    assert!(
        wait_for(Duration::from_secs(10), || std::fs::read(&theirs)
            .map(|d| d == b"version 1\n")
            .unwrap_or(false)),
        "the second mount sees the file\n{}",
        other.log()
    );

    // Both open the same version for writing; the first close wins, the
    // second one's data must survive as a conflict copy.
    let mut a = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(m.path("Family/shared/plan.txt"))
        .unwrap();
    let mut b = std::fs::OpenOptions::new().write(true).truncate(true).open(&theirs).unwrap();
    a.write_all(b"edited on mount A\n").unwrap();
    b.write_all(b"edited on mount B\n").unwrap();
    assert_eq!(close_errno(a), None, "{}", m.log());
    assert_eq!(close_errno(b), None, "{}", other.log());

    // Each mount, once its listing is refreshed, shows both edits.
    for (name, dir, log) in
        [("A", m.path("Family/shared"), m.log()), ("B", other.path("Family/shared"), other.log())]
    {
        let mut seen = Vec::new();
        let both = wait_for(Duration::from_secs(10), || {
            seen = std::fs::read_dir(&dir)
                .unwrap()
                .flatten()
                .filter_map(|e| std::fs::read(e.path()).ok().map(|d| (e.file_name(), d)))
                .collect::<Vec<_>>();
            // The change feed may show the conflict copy as created (empty)
            // a moment before its content is stored.
            seen.len() == 2 && seen.iter().all(|(_, d)| !d.is_empty())
        });
        assert!(both, "mount {name} sees {:?}\n{log}", seen.iter().map(|s| &s.0).collect::<Vec<_>>());
        let main = seen.iter().find(|(n, _)| n == "plan.txt").expect("plan.txt is kept");
        assert_eq!(main.1, b"edited on mount A\n", "the first close wins the name");
        let copy = seen.iter().find(|(n, _)| n != "plan.txt").unwrap();
        let copy_name = copy.0.to_string_lossy();
        assert!(
            copy_name.starts_with("plan (conflict ") && copy_name.ends_with(").txt"),
            "conflict copy named {copy_name}"
        );
        assert_eq!(copy.1, b"edited on mount B\n", "the losing edit is kept whole");
    }
    drop(other);
}
