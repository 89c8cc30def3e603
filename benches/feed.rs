//! The change feed at scale (issue 20): a vault of many files in many
//! records, made through the API (not the mount, to keep it quick), then
//! measured through real mounts (release build):
//!
//! - `ls -lR` of the whole vault on a fresh mount, against gocryptfs on the
//!   same tree (empty files, the same names);
//! - the daemon's memory per listed entry (resident set before and after);
//! - the first `stat` of a file after the mount sat idle (past every reuse
//!   time);
//! - how long a file written on one mount takes to show to `stat` on another;
//! - the server's CPU time while idle mounts follow it.
//!
//! `cargo bench --bench feed` (100,000 files in 1,000 records, 10 idle mounts
//! for 60 s; about 10 minutes); `-- --quick` (2,000 files in 20 records, 3
//! mounts for 5 s: the CI smoke run). `VAULTFS_BENCH_BASELINE=BIN` adds a
//! column for another build's vaultfs mounting the same server: before and
//! after in one run. Prints a markdown table; figures, not pass/fail.

#[path = "../tests/support/mod.rs"]
mod support;

mod shared;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shared::cpu_time;
use support::mount::TestMount;
use vaultfs::crypto::{seal_manifest, seal_name, FileContext, FileManifest, NameContext, OsRandom};
use vaultfs::ids::{FileId, RecordId, VaultId};
use vaultfs::protocol::{NewFile, NewRecord, Sealed};
use vaultfs::remote::account::Unlocked;
use vaultfs::remote::http::HttpRemote;
use vaultfs::remote::Remote;

struct Size {
    records: usize,
    per_record: usize,
    idle: Duration,
    idle_mounts: usize,
    idle_watch: Duration,
    rounds: usize,
}

const FULL: Size = Size {
    records: 1000,
    per_record: 100,
    idle: Duration::from_secs(10),
    idle_mounts: 10,
    idle_watch: Duration::from_secs(60),
    rounds: 5,
};
const QUICK: Size = Size {
    records: 20,
    per_record: 100,
    idle: Duration::from_secs(3),
    idle_mounts: 3,
    idle_watch: Duration::from_secs(5),
    rounds: 3,
};

fn time<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let t = Instant::now();
    let v = f();
    (v, t.elapsed())
}

fn median(mut xs: Vec<Duration>) -> Duration {
    xs.sort();
    xs[xs.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

/// Record `r`'s title and file `f`'s name.
fn record_name(r: usize) -> String {
    format!("record-{r:04}")
}
fn file_name(f: usize) -> String {
    format!("file-{f:03}.txt")
}

/// Resident memory of `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Makes the vault's records and files through the API, `jobs` at a time.
fn populate(m: &TestMount, size: &Size) -> Duration {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let access = m.server.access();
    let start = Instant::now();
    rt.block_on(async {
        let floor = vaultfs::crypto::KdfParams { m_cost_kib: 8, t_cost: 1, p_cost: 1 };
        let remote = HttpRemote::login(&access, "alice", b"mount test passphrase", floor).await.unwrap();
        let account = Unlocked::open(remote, b"mount test passphrase").await.unwrap();
        let vaults = account.vaults().await.unwrap();
        let vault: VaultId =
            vaults.iter().find(|v| v.name.as_deref() == Some("Family")).expect("vault Family").info.id;
        let key = Arc::new(account.sealing_key(vault).unwrap());
        let remote = Arc::new(account.remote);
        let jobs = Arc::new(tokio::sync::Semaphore::new(16));
        let mut tasks = tokio::task::JoinSet::new();
        for r in 0..size.records {
            let record = RecordId::random().unwrap();
            let title = seal_name(
                &key,
                &NameContext::RecordTitle { vault, record },
                record_name(r).as_bytes(),
                &mut OsRandom,
            )
            .unwrap();
            let new = NewRecord { id: record, parent: None, title: Sealed(title), fields: Sealed::default() };
            remote.create_record(vault, new).await.unwrap();
            for f in 0..size.per_record {
                let (key, remote) = (Arc::clone(&key), Arc::clone(&remote));
                let permit = Arc::clone(&jobs).acquire_owned().await.unwrap();
                tasks.spawn(async move {
                    let id = FileId::random().unwrap();
                    let name_ctx = NameContext::FileName { vault, record, file: id };
                    let name = seal_name(&key, &name_ctx, file_name(f).as_bytes(), &mut OsRandom).unwrap();
                    let ctx = FileContext { vault, record, file: id };
                    let meta =
                        seal_manifest(&key, &ctx, &FileManifest::new_empty(1, 0o644), &mut OsRandom).unwrap();
                    let new =
                        NewFile { id, name: Sealed(name), e2e: true, mtime_ms: None, meta: Sealed(meta) };
                    remote.create_file(record, new).await.unwrap();
                    drop(permit);
                });
            }
            while tasks.try_join_next().is_some() {}
        }
        while tasks.join_next().await.is_some() {}
    });
    start.elapsed()
}

/// `ls -lR` of `dir`, output thrown away.
fn ls_lr(dir: &Path) -> Duration {
    let (status, took) =
        time(|| Command::new("ls").arg("-lR").arg(dir).stdout(Stdio::null()).status().unwrap());
    assert!(status.success(), "ls -lR {}", dir.display());
    took
}

/// What one vaultfs build measured.
struct Figures {
    ls_cold: Duration,
    kib_before: u64,
    kib_after: u64,
    first_stat: Duration,
    visible: Duration,
    idle_cpu: Duration,
    mounts_cpu: Duration,
}

/// Measures through mounts of `m`'s server by the vaultfs binary in use.
fn measure(m: &mut TestMount, size: &Size, tag: &str) -> Figures {
    let entries = size.records * (size.per_record + 1);
    let a = m.extra_mount(&format!("{tag}-a"));
    let family = a.path("Family");
    let kib_before = rss_kib(a.pid());
    let ls_cold = ls_lr(&family);
    let kib_after = rss_kib(a.pid());
    eprintln!("{tag}: ls -lR of {entries} entries: {}", ms(ls_cold));

    // The first stat of a file after the mount sat idle.
    let mut firsts = Vec::new();
    for round in 0..size.rounds {
        std::thread::sleep(size.idle);
        let path =
            family.join(record_name(round * 7 % size.records)).join(file_name(round * 13 % size.per_record));
        let (meta, took) = time(|| std::fs::metadata(&path));
        meta.unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        firsts.push(took);
    }
    let first_stat = median(firsts);
    eprintln!("{tag}: first stat after {:?} idle: {}", size.idle, ms(first_stat));

    // A file written on mount A, seen by stat on mount B.
    let b = m.extra_mount(&format!("{tag}-b"));
    let dir = record_name(size.records / 2);
    let _ = std::fs::read_dir(b.path(&format!("Family/{dir}"))).unwrap().count();
    let mut seen = Vec::new();
    for round in 0..size.rounds {
        let name = format!("Family/{dir}/pushed-{tag}-{round}.txt");
        let on_b = b.path(&name);
        assert!(!on_b.exists());
        std::fs::write(a.path(&name), b"x").unwrap();
        let written = Instant::now();
        while !on_b.exists() {
            assert!(written.elapsed() < Duration::from_secs(30), "{name} never showed on mount B");
            std::thread::sleep(Duration::from_micros(500));
        }
        seen.push(written.elapsed());
    }
    let visible = median(seen);
    eprintln!("{tag}: a write on A seen by stat on B after {}", ms(visible));
    drop(b);
    drop(a);

    // Idle mounts: the server's CPU while they sit, each having listed the vault.
    let idle: Vec<_> = (0..size.idle_mounts).map(|i| m.extra_mount(&format!("{tag}-idle{i}"))).collect();
    for mount in &idle {
        let _ = std::fs::read_dir(mount.path("Family")).unwrap().count();
    }
    std::thread::sleep(Duration::from_secs(1));
    let server = m.server.pid();
    let mounts_cpu_before: Duration = idle.iter().map(|i| cpu_time(i.pid())).sum();
    let before = cpu_time(server);
    std::thread::sleep(size.idle_watch);
    let idle_cpu = cpu_time(server) - before;
    let mounts_cpu = idle.iter().map(|i| cpu_time(i.pid())).sum::<Duration>() - mounts_cpu_before;
    eprintln!("{tag}: {} idle mounts over {:?}: server {}", size.idle_mounts, size.idle_watch, ms(idle_cpu));
    drop(idle);
    Figures { ls_cold, kib_before, kib_after, first_stat, visible, idle_cpu, mounts_cpu }
}

/// gocryptfs over the same tree (empty files, the same names): `ls -lR`
/// cold (after a remount), and the first stat after idle, if gocryptfs is
/// installed.
fn gocryptfs(size: &Size) -> Option<(Duration, Duration)> {
    if Command::new("gocryptfs").arg("-version").output().is_err() {
        eprintln!("gocryptfs is not installed: its column is left out");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let (cipher, plain, pass) =
        (dir.path().join("cipher"), dir.path().join("plain"), dir.path().join("pass"));
    std::fs::create_dir_all(&cipher).unwrap();
    std::fs::create_dir_all(&plain).unwrap();
    std::fs::write(&pass, "bench passphrase").unwrap();
    let pass_arg = format!("{}", pass.display());
    let ok = |cmd: &mut Command| assert!(cmd.stdout(Stdio::null()).status().unwrap().success(), "{cmd:?}");
    ok(Command::new("gocryptfs")
        .args(["-init", "-q", "-scryptn", "10", "-passfile", &pass_arg])
        .arg(&cipher));
    let mount = || {
        ok(Command::new("gocryptfs").args(["-q", "-passfile", &pass_arg]).arg(&cipher).arg(&plain));
    };
    let unmount = |p: &PathBuf| {
        let _ = Command::new("fusermount3").arg("-u").arg(p).status();
        if Command::new("mountpoint").arg("-q").arg(p).status().is_ok_and(|s| s.success()) {
            let _ = Command::new("umount").arg("-l").arg(p).status();
        }
    };
    mount();
    let family = plain.join("Family");
    for r in 0..size.records {
        let record = family.join(record_name(r));
        std::fs::create_dir_all(&record).unwrap();
        for f in 0..size.per_record {
            std::fs::File::create(record.join(file_name(f))).unwrap();
        }
    }
    unmount(&plain);
    mount();
    let took = ls_lr(&family);
    let mut firsts = Vec::new();
    for round in 0..size.rounds {
        std::thread::sleep(size.idle);
        let path =
            family.join(record_name(round * 7 % size.records)).join(file_name(round * 13 % size.per_record));
        firsts.push(time(|| std::fs::metadata(&path).unwrap()).1);
    }
    unmount(&plain);
    Some((took, median(firsts)))
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    if !support::mount::fuse_available() {
        eprintln!("no /dev/fuse: the feed benchmark needs FUSE");
        return;
    }
    let size = if quick { QUICK } else { FULL };
    let files = size.records * size.per_record;
    let mut m = TestMount::start();
    m.unmount();
    let made = populate(&m, &size);
    eprintln!(
        "made {files} files in {} records through the API in {:.1} s",
        size.records,
        made.as_secs_f64()
    );

    let mut columns = vec![("vaultfs".to_string(), measure(&mut m, &size, "new"))];
    if let Some(bin) = std::env::var("VAULTFS_BENCH_BASELINE").ok().filter(|b| !b.is_empty()) {
        support::server::use_vaultfs_bin(Some(bin));
        let figures = measure(&mut m, &size, "base");
        support::server::use_vaultfs_bin(None);
        columns.push(("vaultfs baseline".to_string(), figures));
    }
    let gocryptfs = gocryptfs(&size);

    let entries = size.records * (size.per_record + 1);
    println!("\n### Change feed: {files} files in {} records\n", size.records);
    let mut header = String::from("| |");
    let mut rule = String::from("|---|");
    for (name, _) in &columns {
        header.push_str(&format!(" {name} |"));
        rule.push_str("---|");
    }
    if gocryptfs.is_some() {
        header.push_str(" gocryptfs |");
        rule.push_str("---|");
    }
    println!("{header}\n{rule}");
    let row = |label: &str, cell: &dyn Fn(&Figures) -> String, other: Option<String>| {
        let mut line = format!("| {label} |");
        for (_, f) in &columns {
            line.push_str(&format!(" {} |", cell(f)));
        }
        if gocryptfs.is_some() {
            line.push_str(&format!(" {} |", other.unwrap_or_else(|| "–".into())));
        }
        println!("{line}");
    };
    row("`ls -lR` of the vault, cold", &|f| ms(f.ls_cold), gocryptfs.map(|g| ms(g.0)));
    row(
        "daemon memory per listed entry",
        &|f| format!("{:.0} B", f.kib_after.saturating_sub(f.kib_before) as f64 * 1024.0 / entries as f64),
        None,
    );
    row(
        &format!("first stat after {} s idle (median)", size.idle.as_secs()),
        &|f| ms(f.first_stat),
        gocryptfs.map(|g| ms(g.1)),
    );
    row("write on mount A seen by stat on mount B (median)", &|f| ms(f.visible), None);
    row(
        &format!("server CPU, {} idle mounts over {} s", size.idle_mounts, size.idle_watch.as_secs()),
        &|f| ms(f.idle_cpu),
        None,
    );
    row("those mounts' own CPU", &|f| ms(f.mounts_cpu), None);
    support::report(&format!(
        "feed bench: {files} files; {}",
        columns
            .iter()
            .map(|(n, f)| format!(
                "{n}: ls -lR {}, first stat {}, seen on B {}, idle server CPU {}",
                ms(f.ls_cold),
                ms(f.first_stat),
                ms(f.visible),
                ms(f.idle_cpu)
            ))
            .collect::<Vec<_>>()
            .join("; ")
    ));
}
