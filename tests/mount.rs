//! Real mounts: `vaultfs mount` over `vaultfs serve` on loopback, driven with
//! ordinary tools and std::fs. Needs /dev/fuse and root (as in CI).

mod support;

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use support::mount::TestMount;
use support::sh;

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).max(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

#[test]
fn everyday_tools_work_on_the_mount() {
    let m = TestMount::start();
    let root = m.path("Family");
    assert!(root.is_dir(), "the vault is a top-level directory");
    sh(
        &root,
        "mkdir -p Taxes/2026/receipts && echo 'hello vault' > Taxes/2026/note.txt && cat Taxes/2026/note.txt",
    );
    assert_eq!(std::fs::read_to_string(root.join("Taxes/2026/note.txt")).unwrap(), "hello vault\n");
    let listing = sh(&root, "ls -l Taxes/2026");
    assert!(listing.contains("note.txt") && listing.contains("receipts"), "{listing}");

    // Appends, truncates, dd at offsets.
    sh(&root, "echo more >> Taxes/2026/note.txt");
    assert_eq!(std::fs::read_to_string(root.join("Taxes/2026/note.txt")).unwrap(), "hello vault\nmore\n");
    sh(&root, "dd if=/dev/zero of=Taxes/z.bin bs=64k count=20 status=none && truncate -s 100000 Taxes/z.bin");
    assert_eq!(std::fs::metadata(root.join("Taxes/z.bin")).unwrap().len(), 100_000);
    sh(&root, "printf XYZ | dd of=Taxes/z.bin bs=1 seek=65535 conv=notrunc status=none");
    let z = std::fs::read(root.join("Taxes/z.bin")).unwrap();
    assert_eq!((&z[65_535..65_538], z.len()), (&b"XYZ"[..], 100_000));

    // cp -r in, mv within and across records, rm -r.
    let src = tempfile::tempdir().unwrap();
    for i in 0..20 {
        std::fs::create_dir_all(src.path().join(format!("d{}", i % 4))).unwrap();
        std::fs::write(src.path().join(format!("d{}/f{i}.bin", i % 4)), pattern(1000 * i + 1, i as u32))
            .unwrap();
    }
    let cmd = format!("cp -r {}/. copied && diff -r {} copied", src.path().display(), src.path().display());
    sh(&root, &format!("mkdir copied && {cmd}"));
    sh(
        &root,
        "mv copied/d1/f1.bin copied/d1/renamed.bin && mv copied/d2/f2.bin Taxes/2026/ && mv copied/d3 Taxes/",
    );
    assert_eq!(std::fs::read(root.join("Taxes/2026/f2.bin")).unwrap(), pattern(2001, 2));
    assert_eq!(std::fs::read(root.join("copied/d1/renamed.bin")).unwrap(), pattern(1001, 1));
    assert_eq!(std::fs::read(root.join("Taxes/d3/f3.bin")).unwrap(), pattern(3001, 3));
    sh(&root, "rm -r copied && test ! -e copied");

    // tar, git and sqlite work unchanged.
    sh(
        &root,
        &format!(
            "mkdir unpacked && tar -C {} -cf - . | tar -C unpacked -xf - && diff -r {} unpacked",
            src.path().display(),
            src.path().display()
        ),
    );
    sh(&root, "mkdir repo && cd repo && git init -q && echo hi > a && git add a && git -c user.email=t@t -c user.name=t commit -qm one && git log --oneline | grep -q one");
    let py = "import sqlite3; d=sqlite3.connect('db.sqlite'); d.execute('create table t(x)'); \
              d.executemany('insert into t values (?)', [(i,) for i in range(500)]); d.commit(); \
              print(d.execute('select sum(x) from t').fetchone()[0])";
    let out = Command::new("python3").args(["-c", py]).current_dir(root.join("repo")).output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "124750",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // rsync a tree in, then verify every file by checksum: a second rsync with
    // --checksum must find nothing to transfer, and sha256sums must match.
    let tree = src.path().display();
    sh(&root, &format!("rsync -a {tree}/ synced/"));
    let changes = sh(&root, &format!("rsync -a --checksum --dry-run --itemize-changes {tree}/ synced/"));
    assert!(changes.trim().is_empty(), "rsync --checksum still sees differences: {changes}");
    let sums = |dir: &str| sh(Path::new(dir), "find . -type f | sort | xargs sha256sum");
    let ours = sums(&root.join("synced").display().to_string());
    assert_eq!(ours, sums(&tree.to_string()));
    assert_eq!(ours.lines().count(), 20, "{ours}");

    // cp -a keeps modification times (to the second at least).
    sh(
        src.path(),
        "touch -m -d '2001-02-03 04:05:06 UTC' d0/f0.bin && touch -m -d '2010-06-07 08:09:10 UTC' d1",
    );
    sh(&root, &format!("cp -a {tree}/d0 {tree}/d1 ."));
    let mtimes = |base: &Path| sh(base, "stat -c '%n %Y' d0/f0.bin d0/f4.bin d1 d1/f1.bin");
    assert_eq!(mtimes(&root), mtimes(src.path()), "cp -a must keep modification times");
    assert!(mtimes(&root).contains("d0/f0.bin 981173106"), "{}", mtimes(&root));

    // Extended attributes; others are refused (documented).
    let e2e = Command::new("getfattr")
        .args(["-n", "user.vaultfs.e2e", "--only-values"])
        .arg(root.join("Taxes/2026/note.txt"))
        .output();
    if let Ok(out) = e2e {
        if out.status.success() {
            assert_eq!(String::from_utf8_lossy(&out.stdout), "1");
        }
    }
    // Files cannot live directly in a vault (they belong to records): EPERM.
    let err = std::fs::write(root.join("loose.txt"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");
    // Across vaults a rename is EXDEV (mv then copies).
    sh(&m.mountpoint, "test -d Family");
}

#[test]
fn editors_save_by_renaming_over_the_original_and_two_readers_agree() {
    let m = TestMount::start();
    let dir = m.path("Family/notes");
    std::fs::create_dir(&dir).unwrap();
    let target = dir.join("todo.txt");
    std::fs::write(&target, b"version one").unwrap();
    // The way editors save: temp file, fsync, rename over.
    let tmp = dir.join(".todo.txt.swp");
    let mut f = std::fs::File::create(&tmp).unwrap();
    f.write_all(b"version two, saved safely").unwrap();
    f.sync_all().unwrap();
    drop(f);
    std::fs::rename(&tmp, &target).unwrap();
    assert_eq!(std::fs::read(&target).unwrap(), b"version two, saved safely");
    let names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, ["todo.txt"]);

    // Two readers at once.
    let big = pattern(3 << 20, 7);
    std::fs::write(dir.join("big.bin"), &big).unwrap();
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let p = dir.join("big.bin");
            std::thread::spawn(move || std::fs::read(p).unwrap())
        })
        .collect();
    for r in readers {
        assert!(r.join().unwrap() == big);
    }
    // Random access reads.
    let mut f = std::fs::File::open(dir.join("big.bin")).unwrap();
    let mut buf = vec![0u8; 4096];
    f.seek(SeekFrom::Start(2_000_000)).unwrap();
    f.read_exact(&mut buf).unwrap();
    assert_eq!(buf, big[2_000_000..2_004_096]);
}

/// The names one getdents64 call on `fd` returns into a `size`-byte buffer
/// (empty at the end of the directory).
fn getdents(fd: i32, size: usize) -> Vec<String> {
    let mut buf = vec![0u8; size];
    let n = unsafe { libc::syscall(libc::SYS_getdents64, fd, buf.as_mut_ptr(), buf.len()) };
    assert!(n >= 0, "getdents64: {}", std::io::Error::last_os_error());
    let (mut names, mut at) = (Vec::new(), 0);
    while at < n as usize {
        // struct linux_dirent64: ino (8), off (8), reclen (2), type (1), name.
        let reclen = u16::from_ne_bytes([buf[at + 16], buf[at + 17]]) as usize;
        let name = &buf[at + 19..at + reclen];
        let end = name.iter().position(|&b| b == 0).unwrap();
        names.push(String::from_utf8(name[..end].to_vec()).unwrap());
        at += reclen;
    }
    names
}

/// A directory read in small pieces, with a file sorting first made and one
/// not yet read removed between two pieces, lists every other entry once;
/// after a rewind, it lists the directory as it is.
#[test]
fn a_directory_read_in_pieces_lists_each_entry_once() {
    let m = TestMount::start();
    let dir = m.path("Family/many");
    std::fs::create_dir(&dir).unwrap();
    let made: Vec<String> = (0..20).map(|i| format!("m{i:02}")).collect();
    for name in &made {
        std::fs::write(dir.join(name), b"x").unwrap();
    }
    let d = std::fs::File::open(&dir).unwrap();
    let fd = d.as_raw_fd();
    // About five entries of 24 bytes fit in 128.
    let mut read = getdents(fd, 128);
    assert!(read.len() < made.len(), "the first piece holds a few entries: {read:?}");
    std::fs::write(dir.join("a0"), b"x").unwrap();
    std::fs::remove_file(dir.join("m19")).unwrap();
    loop {
        let piece = getdents(fd, 128);
        if piece.is_empty() {
            break;
        }
        read.extend(piece);
    }
    read.retain(|n| n != "." && n != "..");
    assert_eq!(read, made[..19], "each entry once, the removed one not again");
    assert_eq!(unsafe { libc::lseek(fd, 0, libc::SEEK_SET) }, 0);
    let mut after: Vec<String> =
        std::iter::from_fn(|| Some(getdents(fd, 4096)).filter(|p| !p.is_empty())).flatten().collect();
    after.retain(|n| n != "." && n != "..");
    let mut now = vec!["a0".to_owned()];
    now.extend_from_slice(&made[..19]);
    assert_eq!(after, now, "a rewind lists the directory as it is");
}

#[test]
fn a_reader_sees_what_a_write_only_handle_writes() {
    // Write-only handles bypass the page cache (direct I/O); a reader holding
    // cached pages of the same file must still see their bytes at once.
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let m = TestMount::start();
    let dir = m.path("Family/coherence");
    std::fs::create_dir(&dir).unwrap();
    let p = dir.join("shared.bin");
    let mut want = pattern(3 << 20, 21);
    std::fs::write(&p, &want).unwrap();
    let reader = std::fs::File::open(&p).unwrap();
    let mut seen = vec![0u8; want.len()];
    reader.read_exact_at(&mut seen, 0).unwrap();
    assert!(seen == want);
    let writer = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    writer.write_all_at(b"written past the reader's cache", 1_000_000).unwrap();
    want[1_000_000..1_000_031].copy_from_slice(b"written past the reader's cache");
    let mut part = vec![0u8; 64];
    reader.read_exact_at(&mut part, 999_990).unwrap();
    assert_eq!(part, want[999_990..1_000_054], "while both are open");
    drop(writer);
    let appender = std::fs::OpenOptions::new().append(true).custom_flags(libc::O_WRONLY).open(&p).unwrap();
    (&appender).write_all(b"tail").unwrap();
    drop(appender);
    want.extend_from_slice(b"tail");
    assert_eq!(std::fs::metadata(&p).unwrap().len(), want.len() as u64);
    reader.read_exact_at(&mut seen, 0).unwrap();
    assert!(seen == want[..seen.len()], "the reader's cached pages were dropped");
    assert!(std::fs::read(&p).unwrap() == want, "a new reader");
}

/// Files under `root` changed since `since` that contain `needle`; `skip` (the
/// mount itself, which is not disk) is not entered. Older files cannot hold what
/// this test wrote, and skipping them keeps the scan fast even when a build tree
/// lives under /tmp.
fn find_in_tree(
    root: &Path,
    skip: &Path,
    since: std::time::SystemTime,
    needle: &[u8],
    hits: &mut Vec<String>,
) {
    let Ok(entries) = std::fs::read_dir(root) else { return };
    for e in entries.flatten() {
        let p = e.path();
        let Ok(ft) = e.file_type() else { continue };
        if p == skip {
            continue;
        }
        if ft.is_dir() {
            find_in_tree(&p, skip, since, needle, hits);
        } else if ft.is_file() {
            let fresh = e.metadata().and_then(|m| m.modified()).map(|t| t >= since).unwrap_or(true);
            if !fresh {
                continue;
            }
            if let Ok(bytes) = std::fs::read(&p) {
                if bytes.windows(needle.len()).any(|w| w == needle) {
                    hits.push(p.display().to_string());
                }
            }
        }
    }
}

/// Regular files the process has open for writing, from /proc.
fn writable_regular_files(pid: u32) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return found };
    for fd in fds.flatten() {
        let Ok(target) = std::fs::read_link(fd.path()) else { continue };
        if !std::fs::metadata(&target).map(|m| m.is_file()).unwrap_or(false) {
            continue;
        }
        let info =
            std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", fd.file_name().to_string_lossy()))
                .unwrap_or_default();
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .and_then(|f| i64::from_str_radix(f.trim(), 8).ok())
            .unwrap_or(0);
        if flags & i64::from(libc::O_ACCMODE) != i64::from(libc::O_RDONLY) {
            found.push(target.display().to_string());
        }
    }
    found
}

/// strace attached to a running daemon (all its threads), its trace in
/// memory (/dev/shm); detached when finished or dropped.
struct Strace {
    child: std::process::Child,
    out: tempfile::NamedTempFile,
}

impl Strace {
    fn attach(pid: u32) -> Self {
        let out = tempfile::Builder::new().prefix("vaultfs-strace").tempfile_in("/dev/shm").unwrap();
        let child = Command::new("strace")
            .args(["-f", "-qq", "-e", "signal=none", "-s", "0", "-o"])
            .arg(out.path())
            .args([
                "-e",
                "trace=open,openat,openat2,creat,truncate,rename,renameat,renameat2,link,linkat,write,writev,sendto,sendmsg,memfd_create",
                "-p",
                &pid.to_string(),
            ])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("strace (CI installs it)");
        // Attached once the kernel names a tracer for the daemon.
        let traced = || {
            std::fs::read_to_string(format!("/proc/{pid}/status"))
                .unwrap_or_default()
                .lines()
                .any(|l| l.starts_with("TracerPid:") && l.split_whitespace().nth(1) != Some("0"))
        };
        let start = std::time::Instant::now();
        while !traced() {
            assert!(start.elapsed() < Duration::from_secs(10), "strace did not attach to the daemon");
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(200)); // the other threads
        Strace { child, out }
    }

    /// Detaches (SIGINT) and returns the trace.
    fn finish(mut self) -> String {
        let _ = Command::new("kill").arg("-INT").arg(self.child.id().to_string()).status();
        let _ = self.child.wait();
        std::fs::read_to_string(self.out.path()).unwrap()
    }
}

impl Drop for Strace {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether an strace line shows a file on a disk being opened for writing,
/// created, truncated, renamed or linked (devices, /proc and /sys aside).
fn writes_to_disk(line: &str) -> bool {
    let path = line.split('"').nth(1).unwrap_or("");
    let pseudo = ["/dev/", "/proc/", "/sys/"].iter().any(|p| path.starts_with(p));
    // "PID call(args) = result" (the pid is there with -f).
    let call = line.split_whitespace().find(|w| w.contains('(')).unwrap_or("");
    if ["truncate(", "rename", "link", "creat("].iter().any(|c| call.starts_with(c)) {
        return !pseudo;
    }
    if call.starts_with("open") {
        let writing =
            ["O_WRONLY", "O_RDWR", "O_CREAT", "O_TRUNC", "O_APPEND"].iter().any(|f| line.contains(f));
        return writing && !pseudo;
    }
    false
}

#[test]
fn the_strace_check_recognises_writes_to_disk() {
    // Lines as strace -f -s 0 prints them.
    assert!(writes_to_disk(r#"26671 openat(AT_FDCWD, "/tmp/xx.txt", O_WRONLY|O_CREAT|O_TRUNC, 0666) = 3"#));
    assert!(writes_to_disk(r#"7 openat(AT_FDCWD, "/root/.cache/x", O_RDWR|O_CLOEXEC) = -1 ENOENT"#));
    assert!(writes_to_disk(r#"7 rename("/tmp/a", "/tmp/b") = 0"#));
    assert!(!writes_to_disk(r#"26671 openat(AT_FDCWD, "/etc/ld.so.cache", O_RDONLY|O_CLOEXEC) = 3"#));
    assert!(!writes_to_disk(r#"9 openat(AT_FDCWD, "/dev/fuse", O_RDWR|O_CLOEXEC) = 7"#));
    assert!(!writes_to_disk(r#"9 openat(AT_FDCWD, "/proc/self/clear_refs", O_WRONLY) = 7"#));
    assert!(!writes_to_disk(r#"26671 write(1, ""..., 3)                = 3"#));
}

#[test]
fn plaintext_never_reaches_the_disk() {
    let started = std::time::SystemTime::now() - Duration::from_secs(2);
    let m = TestMount::start();
    let canary = b"CANARY-7f3a9c1e-this-plaintext-must-never-touch-a-disk";
    let dir = m.path("Family/secret-record-title-canary-9b2e");
    std::fs::create_dir(&dir).unwrap();
    let pid = m.pid();

    // Watch the daemon's open files while it works.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (stop2, watcher_pid) = (std::sync::Arc::clone(&stop), pid);
    let watcher = std::thread::spawn(move || {
        let mut seen = Vec::new();
        while !stop2.load(std::sync::atomic::Ordering::SeqCst) {
            seen.extend(writable_regular_files(watcher_pid));
            std::thread::sleep(Duration::from_millis(5));
        }
        seen
    });
    // Large enough to be read back through a backing file (passthrough).
    let mut body = Vec::new();
    for _ in 0..6000 {
        body.extend_from_slice(canary);
    }
    let strace = Strace::attach(pid);
    std::fs::write(dir.join("canary-file-name-4c1d.txt"), &body).unwrap();
    assert_eq!(std::fs::read(dir.join("canary-file-name-4c1d.txt")).unwrap(), body);
    std::fs::rename(dir.join("canary-file-name-4c1d.txt"), dir.join("canary-renamed-88aa.txt")).unwrap();
    assert_eq!(std::fs::read(dir.join("canary-renamed-88aa.txt")).unwrap(), body);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    // The one file the daemon may write: the freshness state (file ids and
    // generation numbers, sealed; no content, no names, no keys), which the
    // search below also finds none of the canaries in.
    let state_dir = m.home.join("state/vaultfs");
    let state_dir = state_dir.to_string_lossy().into_owned();
    let mut opened = watcher.join().unwrap();
    opened.retain(|path| !path.starts_with(&state_dir));
    assert!(opened.is_empty(), "the daemon opened regular files for writing: {opened:?}");
    let trace = strace.finish();
    // The trace saw the daemon at work (it answered the kernel and talked to the server)...
    assert!(
        trace.lines().filter(|l| l.contains("write") || l.contains("send")).count() > 10,
        "strace saw too little of the daemon's work:\n{trace}"
    );
    // Read back through a backing file in memory, where the kernel allows it.
    if std::env::var_os("VAULTFS_NO_PASSTHROUGH").is_none() {
        assert!(trace.contains("memfd_create("), "no backing file was made:\n{trace}");
    }
    // ...and it never opened, created, truncated or renamed a file on a disk.
    let bad: Vec<&str> =
        trace.lines().filter(|l| writes_to_disk(l) && !l.contains(&format!("\"{state_dir}/"))).collect();
    assert!(bad.is_empty(), "the daemon wrote to files:\n{}", bad.join("\n"));

    // Neither the content nor the names are in any file the server, the
    // daemon or its user could have written: server data, temp dirs, home, config.
    let tmp = std::env::temp_dir();
    let mut places = vec![
        m.server.data_dir.clone(),
        m.server.blob_root(),
        m.home.clone(),
        tmp,
        std::path::PathBuf::from("/var/tmp"),
    ];
    if let Some(h) = std::env::var_os("HOME") {
        places.push(Path::new(&h).join(".config/vaultfs"));
        places.push(Path::new(&h).join(".cache"));
    }
    for needle in
        [&canary[..], b"secret-record-title-canary-9b2e", b"canary-file-name-4c1d", b"canary-renamed-88aa"]
    {
        let mut hits = Vec::new();
        for place in &places {
            find_in_tree(place, &m.mountpoint, started, needle, &mut hits);
        }
        // The test's own source and binaries are not the daemon's writing.
        hits.retain(|h| !h.contains("/target/") && !h.ends_with(".rs"));
        assert!(hits.is_empty(), "{:?} found on disk in {hits:?}", String::from_utf8_lossy(needle));
    }
    // Core dumps are off for the daemon.
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let core = limits.lines().find(|l| l.starts_with("Max core file size")).unwrap();
    assert!(core.split_whitespace().nth(4) == Some("0"), "{core}");
}

#[test]
fn sigterm_saves_dirty_files_and_unmounts_cleanly() {
    let mut m = TestMount::start();
    let dir = m.path("Family/r");
    std::fs::create_dir(&dir).unwrap();
    let mut f = std::fs::File::create(dir.join("unsaved.txt")).unwrap();
    f.write_all(b"written but never closed").unwrap();
    // The file is still open: its data is dirty in the daemon. Stop the daemon.
    let status = m.unmount().expect("daemon exit status");
    drop(f);
    assert!(status.success(), "daemon failed: {}", m.log());
    assert!(!m.is_mounted(), "still mounted after SIGTERM");
    m.mount();
    assert_eq!(std::fs::read(m.path("Family/r/unsaved.txt")).unwrap(), b"written but never closed");
}

#[test]
fn a_30_mb_file_round_trips_and_survives_a_remount() {
    let mut m = TestMount::start();
    let dir = m.path("Family/big");
    std::fs::create_dir(&dir).unwrap();
    let data = pattern(30_000_000, 3);
    let t = std::time::Instant::now();
    std::fs::write(dir.join("30mb.bin"), &data).unwrap();
    let write = t.elapsed();
    let t = std::time::Instant::now();
    assert!(std::fs::read(dir.join("30mb.bin")).unwrap() == data);
    let warm = t.elapsed();
    m.unmount();
    m.mount();
    let t = std::time::Instant::now();
    assert!(std::fs::read(m.path("Family/big/30mb.bin")).unwrap() == data);
    let cold = t.elapsed();
    // Figures for the note, not assertions (speed goals live in benchmarks).
    eprintln!(
        "30 MB: write+close {write:?}, warm read {warm:?}, cold read after remount {cold:?} (debug build)"
    );
}

#[test]
fn background_mount_and_vaultfs_unmount() {
    let mut m = TestMount::start();
    std::fs::create_dir(m.path("Family/r")).unwrap();
    std::fs::write(m.path("Family/r/a.txt"), b"kept").unwrap();
    m.unmount();
    assert!(!m.is_mounted());

    // Without --foreground: returns once mounted, leaving a detached daemon.
    let out = Command::new(support::server::vaultfs_bin())
        .arg("mount")
        .arg(&m.mountpoint)
        .env("XDG_CONFIG_HOME", &m.home)
        .env("VAULTFS_PASSPHRASE_FILE", &m.pass)
        .env("VAULTFS_POLICY", &m.policy)
        .env("VAULTFS_LOG", "info")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let pid: Option<u32> =
        stdout.split("(process ").nth(1).and_then(|r| r.split(')').next()).and_then(|p| p.parse().ok());
    struct Reap(Option<u32>, std::path::PathBuf);
    impl Drop for Reap {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.1).status();
            if let Some(pid) = self.0 {
                let _ = Command::new("kill").arg(pid.to_string()).status();
            }
        }
    }
    let _reap = Reap(pid, m.mountpoint.clone());
    assert!(pid.is_some(), "{stdout}");
    assert!(m.is_mounted());
    assert_eq!(std::fs::read(m.path("Family/r/a.txt")).unwrap(), b"kept");
    // Its standard error is gone, but its log is kept in its memory.
    let out = Command::new(support::server::vaultfs_bin())
        .args(["status", "--log"])
        .arg(&m.mountpoint)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("recent log lines:"), "{text}");
    assert!(text.lines().any(|l| l.contains("INFO") && l.contains("mounted")), "{text}");

    let out =
        Command::new(support::server::vaultfs_bin()).arg("unmount").arg(&m.mountpoint).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!m.is_mounted());
    // The daemon goes away once unmounted.
    let gone = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        !Path::new(&format!("/proc/{}", pid.unwrap())).exists()
            || std::fs::read_to_string(format!("/proc/{}/stat", pid.unwrap()))
                .is_ok_and(|s| s.contains(") Z "))
    });
    assert!(gone, "the background daemon did not exit after unmount");
}

#[test]
fn large_files_pass_through_without_being_held_in_memory() {
    let mut m = TestMount::start();
    let dir = m.path("Family/media");
    std::fs::create_dir(&dir).unwrap();
    support::reset_peak_rss(m.pid()).unwrap();
    let watch = support::RssWatch::start(m.pid());
    // Above the default end-to-end limit of 30 MB: streamed as plain HTTPS.
    let data = pattern(250_000_000, 11);
    std::fs::write(dir.join("video.bin"), &data).unwrap_or_else(|e| panic!("writing: {e}\n{}", m.log()));
    assert_eq!(
        support::xattr(&dir.join("video.bin"), "user.vaultfs.e2e"),
        "0",
        "must be marked as not end-to-end encrypted\n{}",
        m.log()
    );
    assert_eq!(std::fs::metadata(dir.join("video.bin")).unwrap().len(), 250_000_000);
    let peak_write = support::peak_rss_kib(m.pid());
    let parts_write = watch.finish();
    let state = |name: &str| support::xattr(&dir.join(name), "user.vaultfs.state");
    // The stream ends at release, just after close returns.
    let clean = |name: &str| {
        (0..300).any(|_| {
            std::thread::sleep(Duration::from_millis(100));
            state(name) == "clean"
        })
    };
    assert!(clean("video.bin"), "{}", m.log());
    // A child that inherits the descriptor and exits (closing its copy) must not
    // end the stream: the rest is still written.
    let second = pattern(40_000_000, 12);
    {
        use std::io::Write;
        let mut f = std::fs::File::create(dir.join("child.bin")).unwrap();
        f.write_all(&second[..35_000_000]).unwrap();
        assert!(Command::new("true").status().unwrap().success());
        assert_eq!(state("child.bin"), "uploading");
        f.write_all(&second[35_000_000..]).unwrap();
    }
    assert!(clean("child.bin"), "{}", m.log());
    m.unmount();
    m.mount();
    support::reset_peak_rss(m.pid()).unwrap();
    assert!(
        std::fs::read(m.path("Family/media/child.bin")).unwrap() == second,
        "the stream went on after the child's close"
    );
    let back = std::fs::read(m.path("Family/media/video.bin")).unwrap();
    if back != data {
        let first = back.iter().zip(&data).position(|(a, b)| a != b);
        let again = std::fs::read(m.path("Family/media/video.bin")).unwrap();
        let first_again = again.iter().zip(&data).position(|(a, b)| a != b);
        let f = first.unwrap_or(0);
        eprintln!(
            "second read: first difference {first_again:?}; got {:?} want {:?}",
            &back[f..f + 8],
            &data[f..f + 8]
        );
        let shifted =
            (1..=4).map(|k| k << 20).find(|&k| f >= k && back[f..f + 4096] == data[f - k..f - k + 4096]);
        eprintln!("content at the difference equals the expected data from {shifted:?} bytes earlier");
        let run = back[f..].iter().position(|&b| b != 0).unwrap_or(back.len() - f);
        let next_bad =
            back[f + run..].iter().zip(&data[f + run..]).position(|(a, b)| a != b).map(|p| p + f + run);
        eprintln!("zeros from {f} for {run} bytes; next difference after that: {next_bad:?}");
        // A pass-through blob is stored as is: compare the server's copy directly.
        let blobs = m.server.stored_blobs();
        for b in blobs {
            let stored = std::fs::read(&b).unwrap();
            if stored.len() == data.len() {
                let d = stored.iter().zip(&data).position(|(a, b)| a != b);
                eprintln!("server blob {}: first difference {d:?}", b.display());
            }
        }
        panic!(
            "pass-through content differs: lengths {} vs {}, first difference at {first:?}\n{}",
            back.len(),
            data.len(),
            m.log()
        );
    }
    let peak_read = support::peak_rss_kib(m.pid());
    // Never the whole file in memory: the first 30 MB are buffered until the
    // limit is passed, then writes stream; reads stream at most 8 MiB ahead.
    assert!(
        peak_write < 150 * 1024,
        "daemon peaked at {peak_write} KiB while writing 250 MB (largest seen: {parts_write})\n{}",
        m.log()
    );
    // About 30 MB of that is the idle daemon, and about 40 MB the pages of
    // the (debug) binary it mapped; the 64 MiB of the Argon2id unlock at
    // mount are not counted (the peak is reset after mounting). Measured
    // 61-65 MB on 2026-12-06, with this build and the one before: a bound of
    // 64 MiB failed one run in four. Far below the file's 250 MB either way.
    assert!(peak_read < 96 * 1024, "daemon peaked at {peak_read} KiB while reading 250 MB");
    eprintln!("peak RSS: writing {peak_write} KiB ({parts_write}), reading {peak_read} KiB");
}

#[test]
fn vaultfs_status_shows_cache_and_uploads_in_progress() {
    let m = TestMount::start();
    let dir = m.path("Family/s");
    std::fs::create_dir(&dir).unwrap();
    let status = |target: &Path| {
        let out = Command::new(support::server::vaultfs_bin()).arg("status").arg(target).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, text) = status(&m.mountpoint);
    assert!(ok, "{text}");
    assert!(text.contains("cache") && text.contains("uploading  nothing"), "{text}");

    // A large file streaming up shows as an upload in progress.
    let target = dir.join("big.bin");
    let writer = std::thread::spawn(move || {
        let mut f = std::fs::File::create(target).unwrap();
        let piece = vec![9u8; 1 << 20];
        for _ in 0..100 {
            f.write_all(&piece).unwrap();
        }
    });
    let mut seen = false;
    for _ in 0..400 {
        let (_, text) = status(&m.mountpoint);
        if text.contains("big.bin") {
            seen = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    writer.join().unwrap();
    assert!(seen, "the upload never showed in vaultfs status");
    // A streamed file is finished when its last descriptor is released, which
    // close() does not wait for: the upload leaves the list shortly after.
    let mut text = String::new();
    let done = (0..300).any(|_| {
        let (ok, t) = status(&m.mountpoint);
        text = t;
        std::thread::sleep(Duration::from_millis(50));
        ok && text.contains("uploading  nothing")
    });
    assert!(done, "{text}");
    // Not a mount: a clear error.
    let (ok, text) = status(Path::new("/"));
    assert!(!ok && text.contains("not a running vaultfs mount"), "{text}");
}

/// An inotify watch on a directory (no crate needed: three system calls).
struct Watch(std::os::fd::OwnedFd);

impl Watch {
    fn on(dir: &Path) -> Watch {
        use std::os::fd::FromRawFd;
        use std::os::unix::ffi::OsStrExt;
        // SAFETY: plain system calls on a descriptor this struct owns.
        #[allow(unsafe_code)]
        unsafe {
            let fd = libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC);
            assert!(fd >= 0, "inotify_init1: {}", std::io::Error::last_os_error());
            let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).unwrap();
            let mask = libc::IN_ALL_EVENTS;
            assert!(
                libc::inotify_add_watch(fd, path.as_ptr(), mask) >= 0,
                "{}",
                std::io::Error::last_os_error()
            );
            Watch(std::os::fd::OwnedFd::from_raw_fd(fd))
        }
    }

    /// The names of the events of `mask` that arrive within `limit` (empty
    /// names for events of the watched object itself).
    fn names(&self, mask: u32, limit: Duration) -> Vec<String> {
        use std::os::fd::AsRawFd;
        let deadline = std::time::Instant::now() + limit;
        let mut names = Vec::new();
        let mut buf = [0u8; 4096];
        while names.is_empty() && std::time::Instant::now() < deadline {
            // SAFETY: reads into a buffer this function owns.
            #[allow(unsafe_code)]
            let n = unsafe { libc::read(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            let mut at = 0;
            while at + 16 <= n as usize {
                let event_mask = u32::from_ne_bytes(buf[at + 4..at + 8].try_into().unwrap());
                let len = u32::from_ne_bytes(buf[at + 12..at + 16].try_into().unwrap()) as usize;
                let name = &buf[at + 16..at + 16 + len];
                let name = String::from_utf8_lossy(name).trim_end_matches('\0').to_string();
                if event_mask & mask != 0 {
                    names.push(name);
                }
                at += 16 + len;
            }
        }
        names
    }
}

/// How long until `cond` holds (polled every 5 ms), failing after `limit`.
fn seen_within(what: &str, limit: Duration, log: &dyn Fn() -> String, cond: impl Fn() -> bool) -> Duration {
    let start = std::time::Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "mount B never saw {what} within {limit:?}\n{}", log());
        std::thread::sleep(Duration::from_millis(5));
    }
    start.elapsed()
}

/// Two mounts of one vault: each change on A (create, write, rename, delete,
/// mkdir, a record moved, rmdir) is seen by B's stat, listing and read
/// within a second (the change feed pushes it; without it a change could
/// take the listing's two seconds and the kernel's one), each after B's
/// kernel had cached the old state; and an inotify watcher of a file on B
/// hears when A deletes it (IN_DELETE_SELF: of what the daemon tells it, the
/// kernel passes on to watchers only that a file it held is gone).
#[test]
fn two_mounts_see_each_others_changes_at_once() {
    let mut m = TestMount::start();
    let a_root = m.path("Family");
    let a = |rel: &str| a_root.join(rel);
    std::fs::create_dir(a("shared")).unwrap();
    std::fs::create_dir(a("archive")).unwrap();
    std::fs::write(a("shared/old.txt"), b"old").unwrap();
    std::fs::write(a("shared/later.txt"), b"later").unwrap();
    let other = m.second_mount();
    let b = |rel: &str| other.path(&format!("Family/{rel}"));
    let a_log = m.log_reader();
    let log = || format!("--- A ---\n{}\n--- B ---\n{}", a_log(), other.log());
    const LIMIT: Duration = Duration::from_secs(1);
    seen_within("the first listing", Duration::from_secs(10), &log, || b("shared/later.txt").exists());
    // B's kernel caches what it saw; then A changes it.
    let mut times = Vec::new();
    let mut step = |what: &str, limit: Duration, on_a: &dyn Fn(), on_b: &dyn Fn() -> bool| {
        assert!(!on_b(), "{what}: B saw it before A did it");
        on_a();
        times.push((what.to_string(), seen_within(what, limit, &log, on_b)));
    };
    step("a new file", LIMIT, &|| std::fs::write(a("shared/new.txt"), b"new").unwrap(), &|| {
        std::fs::read(b("shared/new.txt")).is_ok_and(|d| d == b"new")
    });
    step("a write", LIMIT, &|| std::fs::write(a("shared/new.txt"), b"written on A").unwrap(), &|| {
        std::fs::metadata(b("shared/new.txt")).is_ok_and(|s| s.len() == 12)
            && std::fs::read(b("shared/new.txt")).is_ok_and(|d| d == b"written on A")
    });
    step(
        "a rename",
        LIMIT,
        &|| std::fs::rename(a("shared/new.txt"), a("shared/renamed.txt")).unwrap(),
        &|| !b("shared/new.txt").exists() && b("shared/renamed.txt").exists(),
    );
    step("a new directory", LIMIT, &|| std::fs::create_dir(a("shared/sub")).unwrap(), &|| {
        std::fs::read_dir(b("shared")).unwrap().flatten().any(|e| e.file_name() == "sub")
    });
    step("a record moved", LIMIT, &|| std::fs::rename(a("shared/sub"), a("archive/sub")).unwrap(), &|| {
        b("archive/sub").is_dir() && !b("shared/sub").exists()
    });
    step("a removed directory", LIMIT, &|| std::fs::remove_dir(a("archive/sub")).unwrap(), &|| {
        !b("archive/sub").exists()
    });
    // A watcher of the file (as an editor has of the file it shows).
    let watch = Watch::on(&b("shared/old.txt"));
    step("a deletion", LIMIT, &|| std::fs::remove_file(a("shared/old.txt")).unwrap(), &|| {
        !b("shared/old.txt").exists()
    });
    let heard = watch.names(libc::IN_DELETE_SELF, Duration::from_secs(2));
    assert_eq!(heard.len(), 1, "the watcher on B hears of the deletion\n{}", log());

    // The server killed and started again: both mounts lose the feed, ask
    // as needed, and take it up again; a deletion is then pushed to B's
    // watcher again (nothing else tells watchers).
    m.server.restart();
    step(
        "a file after the restart",
        Duration::from_secs(10),
        &|| std::fs::write(a("shared/restarted.txt"), b"r").unwrap(),
        &|| b("shared/restarted.txt").exists(),
    );
    let watch = Watch::on(&b("shared/later.txt"));
    std::fs::remove_file(a("shared/later.txt")).unwrap();
    let heard = watch.names(libc::IN_DELETE_SELF, Duration::from_secs(10));
    assert_eq!(heard.len(), 1, "after the restart, the watcher on B hears of a deletion\n{}", log());
    let figures: Vec<String> = times.iter().map(|(w, t)| format!("{w} {} ms", t.as_millis())).collect();
    support::report(&format!("two mounts: seen on B after {}", figures.join(", ")));
    drop(other);
}

/// Sends SIGCONT to a stopped process when dropped, also when the test fails.
struct Resume(i32);

impl Drop for Resume {
    fn drop(&mut self) {
        // SAFETY: kill(2) with a valid pid and signal.
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

/// Passthrough, as root: a file open for reading is read by the kernel from
/// a backing file in memory. With the daemon stopped, reads of two such files
/// still come, each from its own bytes; a write through a handle opened for
/// writing next to a reader shows to the reader at once, as does one made
/// through a shared map, and both are saved; another client's version shows
/// at the next open.
#[test]
fn passthrough_reads_need_no_daemon_and_see_every_change() {
    use std::os::unix::fs::FileExt;
    if std::env::var_os("VAULTFS_NO_PASSTHROUGH").is_some() {
        eprintln!("skipped: passthrough turned off for this run");
        return;
    }
    let m = TestMount::start();
    let status = || {
        let out =
            Command::new(support::server::vaultfs_bin()).arg("status").arg(&m.mountpoint).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(status().contains("passthrough on"), "{}", status());
    std::fs::create_dir(m.path("Family/pt")).unwrap();
    let (a, b) = (pattern(1 << 20, 1), pattern(600_000, 2));
    // Written by another mount, so this one's page cache holds none of it.
    let other = m.second_mount();
    let log_a = m.log_reader();
    let log = || format!("--- A ---\n{}\n--- B ---\n{}", log_a(), other.log());
    let theirs = |name: &str| other.path(&format!("Family/pt/{name}"));
    let ours = |name: &str| m.path(&format!("Family/pt/{name}"));
    seen_within("the record", Duration::from_secs(10), &log, || theirs("").is_dir());
    std::fs::write(theirs("a.bin"), &a).unwrap();
    std::fs::write(theirs("b.bin"), &b).unwrap();
    seen_within("the files", Duration::from_secs(10), &log, || {
        std::fs::metadata(ours("b.bin")).is_ok_and(|s| s.len() == b.len() as u64)
    });

    // Read once (a cold open reads through the page cache while it
    // downloads), and the kernel told to drop the pages it cached: a read it
    // answers after this comes from a backing file or from the daemon.
    for name in ["a.bin", "b.bin"] {
        let f = std::fs::File::open(ours(name)).unwrap();
        std::io::copy(&mut &f, &mut std::io::sink()).unwrap();
        // SAFETY: posix_fadvise on a descriptor we hold.
        assert_eq!(unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) }, 0);
    }
    // The next opens read from backing files, once the kernel's release of
    // the handles above (sent after close returns) has reached the daemon.
    let served = || {
        let text = status();
        let n = text.split(" open(s) served so").next().and_then(|t| t.rsplit(' ').next()).map(str::to_owned);
        n.and_then(|n| n.parse::<u64>().ok()).unwrap_or(0)
    };
    let open_passthrough = |name: &str| {
        let start = std::time::Instant::now();
        loop {
            let before = served();
            let f = std::fs::File::open(ours(name)).unwrap();
            if served() > before {
                return f;
            }
            assert!(start.elapsed() < Duration::from_secs(10), "{name} never got a backing file\n{}", log());
            drop(f);
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let (fa, fb) = (open_passthrough("a.bin"), open_passthrough("b.bin"));
    // SAFETY: kill(2) with a valid pid and signal.
    assert_eq!(unsafe { libc::kill(m.pid() as i32, libc::SIGSTOP) }, 0);
    let resume = Resume(m.pid() as i32);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut got = Vec::new();
        for off in [0u64, 4096, 300_000, 599_000, 1_000_000] {
            for f in [&fa, &fb] {
                let mut buf = vec![0u8; 8192];
                let n = f.read_at(&mut buf, off).unwrap();
                buf.truncate(n);
                got.push(buf);
            }
        }
        let _ = tx.send(got);
    });
    let got = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("reads waited for the stopped daemon: no passthrough");
    drop(resume);
    let mut i = 0;
    for off in [0usize, 4096, 300_000, 599_000, 1_000_000] {
        for data in [&a, &b] {
            let want = &data[off.min(data.len())..(off + 8192).min(data.len())];
            assert!(got[i] == want, "read {i} at {off} is not that file's bytes");
            i += 1;
        }
    }

    // A write next to a reader shows to it at once, and is saved.
    let reader = std::fs::File::open(ours("a.bin")).unwrap();
    let writer = std::fs::OpenOptions::new().read(true).write(true).open(ours("a.bin")).unwrap();
    writer.write_all_at(b"written", 100).unwrap();
    let mut seen = [0u8; 7];
    reader.read_exact_at(&mut seen, 100).unwrap();
    assert_eq!(&seen, b"written");
    // So does one through a shared writable map of the writer's handle.
    // SAFETY: a new shared mapping of a file we hold open, unmapped below.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            writer.as_raw_fd(),
            0,
        )
    };
    assert_ne!(map, libc::MAP_FAILED, "{}", std::io::Error::last_os_error());
    // SAFETY: 6 bytes inside the 4096 just mapped.
    unsafe { std::ptr::copy_nonoverlapping(b"mapped".as_ptr(), map.cast::<u8>().add(200), 6) };
    reader.read_exact_at(&mut seen[..6], 200).unwrap();
    assert_eq!(&seen[..6], b"mapped");
    // SAFETY: the mapping made above.
    unsafe { libc::munmap(map, 4096) };
    drop(writer);
    drop(reader);
    let mut want = a.clone();
    want[100..107].copy_from_slice(b"written");
    want[200..206].copy_from_slice(b"mapped");
    seen_within("the writes", Duration::from_secs(10), &log, || {
        std::fs::read(theirs("a.bin")).is_ok_and(|d| d == want)
    });

    // Another client's version: at the next open.
    let newer = pattern(700_000, 3);
    std::fs::write(theirs("a.bin"), &newer).unwrap();
    seen_within("the new version", Duration::from_secs(10), &log, || {
        std::fs::read(ours("a.bin")).is_ok_and(|d| d == newer)
    });
}
