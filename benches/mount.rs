//! Mount throughput on this machine: a real `vaultfs serve` on loopback and a real
//! `vaultfs mount` (release build), measured with ordinary file operations.
//!
//! `cargo bench --bench mount` prints a markdown table; `-- --quick` runs a small
//! version (a smoke test for CI). Figures, not pass/fail.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use support::mount::TestMount;

fn median(mut xs: Vec<Duration>) -> Duration {
    xs.sort();
    xs[xs.len() / 2]
}

fn time<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let t = Instant::now();
    let v = f();
    (v, t.elapsed())
}

fn mb_s(bytes: usize, d: Duration) -> String {
    format!("{:.0} MB/s", bytes as f64 / d.as_secs_f64() / 1e6)
}

fn walk(dir: &std::path::Path) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let _ = e.metadata().unwrap();
        n += 1;
        if e.file_type().unwrap().is_dir() {
            n += walk(&e.path());
        }
    }
    n
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (size, files, reps) = if quick { (3_000_000, 200, 1) } else { (30_000_000, 2000, 3) };
    let data: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
    let mut m = TestMount::start();
    let dir = m.path("Family/bench");
    std::fs::create_dir(&dir).unwrap();

    let mut write = Vec::new();
    let mut warm = Vec::new();
    let mut cold = Vec::new();
    for r in 0..reps {
        let p = dir.join(format!("big{r}.bin"));
        let (_, d) = time(|| std::fs::write(&p, &data).unwrap());
        write.push(d);
        let (got, d) = time(|| std::fs::read(&p).unwrap());
        assert!(got == data);
        warm.push(d);
    }
    m.unmount();
    m.mount();
    for r in 0..reps {
        let p = m.path(&format!("Family/bench/big{r}.bin"));
        let (got, d) = time(|| std::fs::read(&p).unwrap());
        assert!(got == data);
        cold.push(d);
    }
    // Time to the first 4 KiB of a file not in the cache: open returns once the
    // header is checked, the read once its chunk has arrived.
    m.unmount();
    m.mount();
    let mut first = Vec::new();
    for r in 0..reps {
        let p = m.path(&format!("Family/bench/big{r}.bin"));
        let (got, d) = time(|| {
            let mut buf = vec![0u8; 4096];
            std::io::Read::read_exact(&mut std::fs::File::open(&p).unwrap(), &mut buf).unwrap();
            buf
        });
        assert!(got == data[..4096]);
        first.push(d);
        // Let the rest of that download finish before timing the next file.
        std::thread::sleep(std::time::Duration::from_millis(300));
    }

    // Many small files, spread over records like an unpacked source tree.
    let small = m.path("Family/tree");
    std::fs::create_dir(&small).unwrap();
    let (_, small_write) = time(|| {
        for i in 0..files {
            let d = small.join(format!("d{}", i % 40));
            if i < 40 {
                std::fs::create_dir(&d).unwrap();
            }
            std::fs::write(d.join(format!("f{i}.txt")), vec![b'x'; 1000 + (i * 37) % 9000]).unwrap();
        }
    });
    m.unmount();
    m.mount();
    let root = m.path("Family/tree");
    let (n, list_cold) = time(|| walk(&root));
    let (_, list_warm) = time(|| walk(&root));
    assert_eq!(n, files + 40);

    // SQLite commits (rollback journal), each taking and giving up its
    // locks: held on the server (seen by every mount), then, remounted with
    // --local-locks, on this machine only.
    let commits = if quick { 20 } else { 200 };
    let sqlite = |m: &TestMount, name: &str| -> f64 {
        let script = format!(
            "import sqlite3, time\nd = sqlite3.connect('{name}')\nd.execute('create table t(n int)')\nd.commit()\n\
             t = time.perf_counter()\nfor i in range({commits}):\n    d.execute('insert into t values(?)', (i,))\n    \
             d.commit()\nprint(time.perf_counter() - t)\n"
        );
        let out = std::process::Command::new("python3")
            .arg("-c")
            .arg(&script)
            .current_dir(m.path("Family/bench"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{name}: {}\n{}", String::from_utf8_lossy(&out.stderr), m.log());
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    };
    let locks_on_server = sqlite(&m, "server.db");
    m.set_mount_args(&["--local-locks"]);
    m.unmount();
    m.mount();
    let locks_here = sqlite(&m, "local.db");

    drop(m);

    // Memory: the plaintext cache stays within its budget however much is read,
    // so the daemon's peak is the budget plus a fixed overhead. Files together
    // several times the budget are written, then read cold.
    let (budget_mib, count, each) = if quick { (8, 4, 3_000_000) } else { (64, 8, 30_000_000) };
    let mut b = TestMount::start_with(&format!("[mount]\ncache_budget = \"{budget_mib} MiB\"\n"), &[]);
    let dir = b.path("Family/budget");
    std::fs::create_dir(&dir).unwrap();
    let blob: Vec<u8> = (0..each).map(|i| (i * 13 % 251) as u8).collect();
    for i in 0..count {
        std::fs::write(dir.join(format!("f{i}")), &blob).unwrap();
    }
    b.unmount();
    b.mount();
    support::reset_peak_rss(b.pid()).unwrap();
    let idle_kib = support::peak_rss_kib(b.pid());
    for i in 0..count {
        assert!(std::fs::read(b.path(&format!("Family/budget/f{i}"))).unwrap() == blob);
    }
    let peak_kib = support::peak_rss_kib(b.pid());
    drop(b);

    println!(
        "\n## vaultfs mount on loopback ({} build)\n",
        if cfg!(debug_assertions) { "debug" } else { "release" }
    );
    println!("| workload | time | rate |");
    println!("|---|---:|---:|");
    let w = median(write);
    println!(
        "| write+close {} MB (stored on the server when close returns) | {:.3} s | {} |",
        size / 1_000_000,
        w.as_secs_f64(),
        mb_s(size, w)
    );
    let r = median(warm);
    println!(
        "| read {} MB warm (plaintext cache) | {:.3} s | {} |",
        size / 1_000_000,
        r.as_secs_f64(),
        mb_s(size, r)
    );
    let c = median(cold);
    println!(
        "| read {} MB cold (after remount: download + decrypt) | {:.3} s | {} |",
        size / 1_000_000,
        c.as_secs_f64(),
        mb_s(size, c)
    );
    println!(
        "| first 4 KiB of a {} MB file, cold (open + read) | {:.4} s | |",
        size / 1_000_000,
        median(first).as_secs_f64()
    );
    println!(
        "| write {files} small files in 40 records | {:.2} s | {:.1} ms/file |",
        small_write.as_secs_f64(),
        small_write.as_secs_f64() * 1000.0 / files as f64
    );
    println!(
        "| list them recursively with stat, cold (after remount) | {:.3} s | |",
        list_cold.as_secs_f64()
    );
    println!("| list them recursively with stat, warm | {:.3} s | |", list_warm.as_secs_f64());
    for (how, secs) in [("locks on the server", locks_on_server), ("--local-locks", locks_here)] {
        println!(
            "| {commits} SQLite commits, {how} | {secs:.2} s | {:.1} ms/commit |",
            secs * 1000.0 / commits as f64
        );
    }
    println!(
        "| daemon peak memory reading {count} x {} MB cold with a {budget_mib} MiB cache budget | {} MiB | {} MiB idle after mounting |",
        each / 1_000_000,
        peak_kib / 1024,
        idle_kib / 1024
    );
}
