//! The POSIX features real tools need beyond files and directories, on real
//! mounts: symbolic links, stored permission bits, and a project tree with
//! both carried through git, tar and rsync unchanged.

mod support;

use std::io::{BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::mount::{MountSetup, TestMount};
use support::sh;

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path).unwrap().mode() & 0o7777
}

/// Links: made, read, listed, followed, renamed, moved, deleted; dangling and
/// outside targets kept as written; O_NOFOLLOW refused; seen by another mount.
#[test]
fn symbolic_links_work_and_show_on_other_mounts() {
    let m = TestMount::start();
    let r = m.path("Family/links");
    std::fs::create_dir(&r).unwrap();
    std::fs::create_dir(m.path("Family/other")).unwrap();
    std::fs::write(r.join("target.txt"), b"pointed at").unwrap();
    std::os::unix::fs::symlink("target.txt", r.join("rel")).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", r.join("outside")).unwrap();
    std::os::unix::fs::symlink("nowhere/at/all", r.join("dangling")).unwrap();
    std::os::unix::fs::symlink("../links/target.txt", m.path("Family/other/up")).unwrap();

    let meta = std::fs::symlink_metadata(r.join("rel")).unwrap();
    assert!(meta.file_type().is_symlink(), "lstat sees a link");
    assert_eq!(meta.len(), "target.txt".len() as u64, "a link's size is its target's length");
    assert_eq!(std::fs::read_link(r.join("rel")).unwrap(), Path::new("target.txt"));
    assert_eq!(std::fs::read(r.join("rel")).unwrap(), b"pointed at", "followed");
    assert_eq!(std::fs::read(m.path("Family/other/up")).unwrap(), b"pointed at", "followed across records");
    assert_eq!(std::fs::read_link(r.join("outside")).unwrap(), Path::new("/etc/hostname"));
    assert_eq!(std::fs::read(r.join("outside")).unwrap(), std::fs::read("/etc/hostname").unwrap());
    assert_eq!(std::fs::read(r.join("dangling")).unwrap_err().raw_os_error(), Some(libc::ENOENT));
    let listing = sh(&r, "ls -l");
    assert!(
        listing.contains("rel -> target.txt") && listing.contains("dangling -> nowhere/at/all"),
        "{listing}"
    );
    // O_NOFOLLOW on a link: ELOOP.
    let nofollow = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(r.join("rel"))
        .unwrap_err();
    assert_eq!(nofollow.raw_os_error(), Some(libc::ELOOP), "{nofollow}");
    // A link over an existing name: EEXIST.
    let taken = std::os::unix::fs::symlink("x", r.join("target.txt")).unwrap_err();
    assert_eq!(taken.raw_os_error(), Some(libc::EEXIST));

    // Renamed in its record, moved to another, deleted.
    std::fs::rename(r.join("rel"), r.join("renamed")).unwrap();
    std::fs::rename(r.join("renamed"), m.path("Family/other/moved")).unwrap();
    assert_eq!(std::fs::read_link(m.path("Family/other/moved")).unwrap(), Path::new("target.txt"));
    std::fs::remove_file(r.join("dangling")).unwrap();
    assert!(std::fs::symlink_metadata(r.join("dangling")).is_err());

    // Another mount, and this one after a remount, see the same.
    let other = m.second_mount();
    let seen = |base: &dyn Fn(&str) -> std::path::PathBuf| {
        (
            std::fs::read_link(base("Family/other/moved")).unwrap(),
            std::fs::read_link(base("Family/links/outside")).unwrap(),
            std::fs::symlink_metadata(base("Family/links/dangling")).is_err(),
        )
    };
    let expected = (Path::new("target.txt").to_path_buf(), Path::new("/etc/hostname").to_path_buf(), true);
    assert_eq!(seen(&|p| other.path(p)), expected);
    drop(other);

    // The server holds no target in the clear.
    let mut db = std::fs::read(m.server.data_dir.join("meta.sqlite3")).unwrap();
    db.extend(std::fs::read(m.server.data_dir.join("meta.sqlite3-wal")).unwrap_or_default());
    for needle in [&b"/etc/hostname"[..], b"nowhere/at/all", b"../links/target.txt"] {
        assert!(!db.windows(needle.len()).any(|w| w == needle), "a target in the server's database");
    }
}

/// chmod is stored: it survives a remount, shows on another mount, and an
/// executable script runs; new files take the creator's mode and umask.
#[test]
fn permission_bits_are_stored_and_seen_everywhere() {
    let mut m = TestMount::start();
    let r = m.path("Family/modes");
    std::fs::create_dir(&r).unwrap();
    std::fs::write(r.join("build.sh"), b"#!/bin/sh\necho built\n").unwrap();
    assert_eq!(mode(&r.join("build.sh")), 0o644, "created with 0666 less the umask 022");
    std::fs::set_permissions(r.join("build.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    assert_eq!(sh(&r, "./build.sh"), "built\n");
    sh(&r, "umask 077 && echo secret > private && chmod 640 build.sh && chmod 755 build.sh");
    assert_eq!(mode(&r.join("private")), 0o600);
    std::fs::write(r.join("plain.txt"), b"x").unwrap();
    std::fs::set_permissions(r.join("plain.txt"), std::fs::Permissions::from_mode(0o400)).unwrap();
    // A chmod after writing keeps the content.
    std::fs::write(r.join("build.sh"), b"#!/bin/sh\necho rebuilt\n").unwrap();
    assert_eq!(mode(&r.join("build.sh")), 0o755, "a content change keeps the mode");

    // A chmod while a file above the end-to-end limit streams (cp -p does
    // fchmod before close) goes with the stream's commit: no conflict copy.
    let py = "import os, sys\nfd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o644)\n\
              block = b'x' * (1 << 20)\nfor i in range(34): os.write(fd, block)\n\
              os.fchmod(fd, 0o750)\nos.write(fd, block)\nos.close(fd)\n";
    let out = std::process::Command::new("python3").args(["-c", py]).arg(r.join("big.bin")).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(mode(&r.join("big.bin")), 0o750);
    assert_eq!(std::fs::metadata(r.join("big.bin")).unwrap().len(), 35 << 20);
    let names: Vec<_> = std::fs::read_dir(&r).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names.len(), 4, "no conflict copy: {names:?}");

    let other = m.second_mount();
    let modes = |base: &dyn Fn(&str) -> std::path::PathBuf| {
        ["build.sh", "private", "plain.txt", "big.bin"].map(|f| mode(&base(&format!("Family/modes/{f}"))))
    };
    assert_eq!(modes(&|p| other.path(p)), [0o755, 0o600, 0o400, 0o750]);
    drop(other);
    m.unmount();
    m.mount();
    assert_eq!(modes(&|p| m.path(p)), [0o755, 0o600, 0o400, 0o750]);
    assert_eq!(sh(&r, "./build.sh"), "rebuilt\n");
    assert_eq!(std::fs::read(r.join("private")).unwrap(), b"secret\n");
}

/// A project tree with links and executable files: cloned with git (status
/// and fsck clean), and carried through tar and `rsync -a` with every byte,
/// mode and link target as in the source.
#[test]
fn a_repository_with_links_and_executables_survives_git_tar_and_rsync() {
    let m = TestMount::start();
    let src = tempfile::tempdir().unwrap();
    let git = "git -c user.email=t@t -c user.name=t -c init.defaultBranch=main";
    sh(
        src.path(),
        &format!(
            "mkdir -p proj/bin proj/lib && cd proj && {git} init -q . \
             && printf '#!/bin/sh\\necho built\\n' > build.sh && chmod 755 build.sh \
             && printf 'tool\\n' > bin/tool && chmod 700 bin/tool \
             && printf 'secret\\n' > lib/private && chmod 600 lib/private \
             && printf 'lib\\n' > lib/code.txt && ln -s lib/code.txt current && ln -s ../build.sh bin/build \
             && ln -s /etc/hostname host && ln -s missing dangling \
             && {git} add -A && {git} commit -qm tree"
        ),
    );
    let r = m.path("Family/work");
    std::fs::create_dir(&r).unwrap();
    let proj = src.path().join("proj");
    sh(&r, &format!("{git} clone -q {} clone", proj.display()));
    let clone = r.join("clone");
    assert_eq!(sh(&clone, "git status --porcelain"), "", "a fresh clone is clean");
    sh(&clone, "git fsck --no-progress 2>&1");
    assert_eq!(sh(&clone, "./build.sh"), "built\n");
    assert_eq!(std::fs::read_link(clone.join("bin/build")).unwrap(), Path::new("../build.sh"));

    // What each entry is, its mode and its content or target.
    let describe = |dir: &Path| {
        sh(
            dir,
            "find . -path ./.git -prune -o -print | sort | while read -r p; do \
               if [ -L \"$p\" ]; then echo \"$p link $(readlink \"$p\")\"; \
               elif [ -d \"$p\" ]; then echo \"$p dir\"; \
               else echo \"$p $(stat -c %a \"$p\") $(sha256sum < \"$p\" | cut -c1-16)\"; fi; done",
        )
    };
    let expected = describe(&proj);
    assert!(
        expected.contains("./build.sh 755") && expected.contains("./current link lib/code.txt"),
        "{expected}"
    );
    // git keeps only 755 or 644: compared with a clone on local disk.
    let local = tempfile::tempdir().unwrap();
    sh(local.path(), &format!("{git} clone -q {} clone", proj.display()));
    assert_eq!(describe(&clone), describe(&local.path().join("clone")), "git clone");
    sh(
        &r,
        &format!(
            "mkdir untarred && tar -C {} --exclude=.git -cf - . | tar -C untarred -xpf -",
            proj.display()
        ),
    );
    assert_eq!(describe(&r.join("untarred")), expected, "tar");
    sh(&r, &format!("rsync -a --exclude=.git {}/ synced/", proj.display()));
    assert_eq!(describe(&r.join("synced")), expected, "rsync -a");
    let again = sh(
        &r,
        &format!(
            "rsync -a --checksum --dry-run --itemize-changes --exclude=.git {}/ synced/",
            proj.display()
        ),
    );
    assert!(again.trim().is_empty(), "rsync still sees differences: {again}");
    // And back out of the mount.
    let out = tempfile::tempdir().unwrap();
    sh(&r, &format!("tar -C synced -cf - . | tar -C {} -xpf -", out.path().display()));
    assert_eq!(describe(out.path()), expected, "tar out of the mount");
}

/// The temp-file pattern on a file above the end-to-end limit: created,
/// unlinked while open, then read, written and read back through the
/// descriptor; the server's copy goes once it is closed.
#[test]
fn an_unlinked_open_file_above_the_limit_keeps_working() {
    let m = TestMount::start();
    let r = m.path("Family/tmp");
    std::fs::create_dir(&r).unwrap();
    let py = r#"
import os, sys, hashlib
path = sys.argv[1]
size = 100 * 1024 * 1024
block = bytes(range(256)) * 4096          # 1 MiB
fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
for i in range(size // len(block)):
    os.write(fd, block)
os.unlink(path)
assert not os.path.exists(path), "the name is gone"
os.lseek(fd, 0, os.SEEK_SET)
got = b""
while len(got) < 3 * len(block):
    piece = os.read(fd, len(block))
    assert piece, f"end of file at {len(got)} (size {os.fstat(fd).st_size})"
    got += piece
assert got[:3 * len(block)] == block * 3, "read back after unlink"
os.pwrite(fd, b"CHANGED", 50 * 1024 * 1024)
back = os.pread(fd, 7, 50 * 1024 * 1024)
assert back == b"CHANGED", back
assert os.fstat(fd).st_size == size and os.fstat(fd).st_nlink == 0
os.close(fd)
print("ok")
"#;
    let out = std::process::Command::new("python3").args(["-c", py]).arg(r.join("big.tmp")).output().unwrap();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "ok",
        "{}\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        m.log()
    );
    assert_eq!(std::fs::read_dir(&r).unwrap().count(), 0, "nothing left in the record");
    // Nothing of it left on the server once closed (the record is empty there too).
    let other = m.second_mount();
    assert_eq!(std::fs::read_dir(other.path("Family/tmp")).unwrap().count(), 0);
}

/// Waits (up to 10 s) until `done` holds.
fn wait_until(what: &str, done: impl Fn() -> bool) {
    let until = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < until, "not within 10 s: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// fcntl F_SETLK / F_SETLKW / F_GETLK over `len` bytes from `start`; the
/// lock as the kernel answered it (for F_GETLK) or the errno.
fn fcntl_lock(file: &std::fs::File, cmd: i32, typ: i32, start: i64, len: i64) -> Result<libc::flock, i32> {
    // SAFETY: a zeroed flock is valid; fcntl reads and writes only it.
    #[allow(unsafe_code)]
    unsafe {
        let mut fl: libc::flock = std::mem::zeroed();
        fl.l_type = typ as i16;
        fl.l_whence = libc::SEEK_SET as i16;
        fl.l_start = start;
        fl.l_len = len;
        if libc::fcntl(file.as_raw_fd(), cmd, &mut fl) == 0 {
            Ok(fl)
        } else {
            Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
        }
    }
}

/// flock and fcntl locks taken through one mount hold on another mount of
/// the vault (another machine, as far as the server can tell): refused
/// without waiting, waited for, interrupted, shown with their holder, and
/// gone when the holding process dies or its whole mount does (within the
/// server's lock lifetime, 4 s here).
#[test]
fn locks_hold_across_mounts_and_go_with_their_holder() {
    let m = TestMount::start_setup(MountSetup { server_toml: "lock_ttl_secs = 4", ..Default::default() });
    let m2 = m.second_mount();
    let r = m.path("Family/locks");
    std::fs::create_dir(&r).unwrap();
    std::fs::write(r.join("f"), b"shared").unwrap();
    let (a, b) = (r.join("f"), m2.path("Family/locks/f"));
    wait_until("mount 2 sees the file", || b.exists());
    let flock = |args: &[&str], path: &Path| {
        let mut c = Command::new("flock");
        c.args(args).arg(path);
        c
    };

    // flock: a process on mount 1 holds the file.
    let hold = "import fcntl, sys, time; f = open(sys.argv[1], 'r+'); fcntl.flock(f, fcntl.LOCK_EX); \
                print('locked', flush=True); time.sleep(60)";
    let mut holder =
        Command::new("python3").args(["-c", hold]).arg(&a).stdout(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(holder.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line, "locked\n");
    let refused = flock(&["-n", "-x"], &b).arg("true").status().unwrap();
    assert!(!refused.success(), "mount 2 must not get a lock mount 1 holds");
    // A wait that runs out: flock -w ends it with a signal (SIGALRM), which
    // must interrupt the waiting request rather than leave it hanging.
    let started = Instant::now();
    let timed_out = flock(&["-w", "1", "-x"], &b).arg("true").status().unwrap();
    assert!(!timed_out.success());
    assert!(started.elapsed() < Duration::from_secs(5), "the wait took {:?}", started.elapsed());
    // A waiter gets it once the holder dies (SIGKILL closes its descriptor).
    let waiter = flock(&["-x"], &b).args(["-c", "echo got"]).stdout(Stdio::piped()).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    holder.kill().unwrap();
    holder.wait().unwrap();
    let got = waiter.wait_with_output().unwrap();
    assert!(got.status.success() && got.stdout == b"got\n", "{got:?}");

    // fcntl record locks, from this process through both mounts.
    let open = |p: &Path| std::fs::OpenOptions::new().read(true).write(true).open(p).unwrap();
    let (fa, fb) = (open(&a), open(&b));
    // The waiter's flock goes with its release, which the kernel sends after
    // the process ended, without waiting for it.
    wait_until("the waiter's flock is given up", || {
        fcntl_lock(&fa, libc::F_SETLK, libc::F_WRLCK, 0, 10).is_ok()
    });
    assert_eq!(fcntl_lock(&fb, libc::F_SETLK, libc::F_WRLCK, 5, 1).unwrap_err(), libc::EAGAIN);
    assert_eq!(fcntl_lock(&fb, libc::F_SETLK, libc::F_RDLCK, 9, 100).unwrap_err(), libc::EAGAIN);
    fcntl_lock(&fb, libc::F_SETLK, libc::F_WRLCK, 20, 5).expect("bytes nobody holds");
    let seen = fcntl_lock(&fb, libc::F_GETLK, libc::F_RDLCK, 0, 0).unwrap();
    assert_eq!(
        (i32::from(seen.l_type), seen.l_start, seen.l_len, seen.l_pid),
        (libc::F_WRLCK, 0, 10, 0),
        "F_GETLK names the other machine's lock (no local process)"
    );
    let who = Command::new("getfattr")
        .args(["-n", "user.vaultfs.locks", "--only-values"])
        .arg(&a)
        .output()
        .unwrap();
    let who = String::from_utf8_lossy(&who.stdout).into_owned();
    assert!(who.contains("write lock on bytes 0-9 by alice at ") && who.contains("(this mount)"), "{who}");
    assert!(who.contains("write lock on bytes 20-24 by alice"), "{who}");
    // F_SETLKW on mount 2 waits until mount 1 lets go.
    let (tx, rx) = std::sync::mpsc::channel();
    let waiting = std::thread::spawn(move || {
        let got = fcntl_lock(&fb, libc::F_SETLKW, libc::F_WRLCK, 0, 10);
        tx.send(()).unwrap();
        got.map(|_| fb)
    });
    assert!(rx.recv_timeout(Duration::from_millis(500)).is_err(), "F_SETLKW must wait");
    fcntl_lock(&fa, libc::F_SETLK, libc::F_UNLCK, 0, 10).unwrap();
    rx.recv_timeout(Duration::from_secs(10)).expect("F_SETLKW granted once the holder let go");
    let fb = waiting.join().unwrap().unwrap();

    // Mount 2's daemon dies holding bytes 0-9 and 20-24: its locks lapse
    // within the lock lifetime, and mount 1 gets them.
    // SAFETY: signalling a child process we started.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(m2.pid() as i32, libc::SIGKILL);
    }
    let killed = Instant::now();
    assert_eq!(fcntl_lock(&fa, libc::F_SETLK, libc::F_WRLCK, 0, 30).unwrap_err(), libc::EAGAIN);
    fcntl_lock(&fa, libc::F_SETLKW, libc::F_WRLCK, 0, 30).unwrap();
    let lapsed = killed.elapsed();
    assert!(lapsed < Duration::from_secs(8), "a dead mount's locks lapsed after {lapsed:?}");
    drop(fb);
    drop(m2);
}

/// SQLite in rollback-journal mode, written from two mounts at once: every
/// committed row is there and the database is intact, seen from both.
#[test]
fn sqlite_written_from_two_mounts_at_once_keeps_every_row() {
    let m = TestMount::start();
    let m2 = m.second_mount();
    let r = m.path("Family/db");
    std::fs::create_dir(&r).unwrap();
    let py = |dir: &Path, script: &str| {
        Command::new("python3").arg("-c").arg(script).current_dir(dir).spawn().unwrap()
    };
    let made = py(
        &r,
        "import sqlite3; d=sqlite3.connect('t.db'); d.execute('pragma journal_mode=delete'); \
                       d.execute('create table t(k text primary key, n int)'); d.commit()",
    )
    .wait()
    .unwrap();
    assert!(made.success());
    let r2 = m2.path("Family/db");
    wait_until("mount 2 sees the database", || r2.join("t.db").exists());
    const ROWS: usize = 30;
    let writer = |tag: &str| {
        format!(
            "import sqlite3\nd=sqlite3.connect('t.db', timeout=120)\nfor i in range({ROWS}):\n    \
             d.execute('insert into t values(?,?)', ('{tag}%d' % i, i))\n    d.commit()\n"
        )
    };
    let (mut one, mut two) = (py(&r, &writer("a")), py(&r2, &writer("b")));
    assert!(one.wait().unwrap().success() && two.wait().unwrap().success(), "both writers commit");
    for dir in [&r, &r2] {
        let check = Command::new("python3")
            .arg("-c")
            .arg("import sqlite3; d=sqlite3.connect('t.db', timeout=60); \
                  print(d.execute('pragma integrity_check').fetchone()[0], d.execute('select count(*) from t').fetchone()[0])")
            .current_dir(dir)
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&check.stdout).into_owned();
        assert_eq!(out.trim(), format!("ok {}", 2 * ROWS), "{}", String::from_utf8_lossy(&check.stderr));
    }
}

/// A process that starts working in a directory of a mount just started
/// keeps its path: the mount's first listings must not make the kernel drop
/// the entries it just looked up (getcwd failed with ENOENT, and SQLite,
/// which asks for it, could not open a database).
#[test]
fn a_working_directory_in_a_fresh_mount_keeps_its_path() {
    let mut m = TestMount::start();
    std::fs::create_dir(m.path("Family/work")).unwrap();
    std::fs::write(m.path("Family/work/x"), b"x").unwrap();
    m.unmount();
    m.mount();
    let out = Command::new("python3")
        .arg("-c")
        .arg("import os, time\nbad = 0\nfor i in range(40):\n    try: os.getcwd()\n    except OSError: bad += 1\n    time.sleep(0.025)\nprint(bad)")
        .current_dir(m.path("Family/work"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0", "{}", String::from_utf8_lossy(&out.stderr));
}
