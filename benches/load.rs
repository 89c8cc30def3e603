//! Load on the server (issue 24): many clients at once, each making a mix
//! of small-file requests (create with content, write, read, list, rename,
//! delete) in a record of its own, for a while; against one instance with
//! SQLite, one with PostgreSQL (local blobs, then an S3 bucket: s3s-fs), and
//! two instances sharing the database and the bucket. Each client knows what it wrote, and checks every read
//! against that, and at the end everything it should have: a lost update
//! shows as a mismatch.
//!
//! `cargo bench --bench load` (64 clients for 60 s each); `-- --quick`
//! (8 clients for 5 s: the CI smoke run); `-- --latency` (one client, one
//! request at a time: what each kind of round trip costs on its own; with
//! `VAULTFS_BENCH_BASELINE=BIN`, another build's side by side); `-- --sqlite`
//! (the SQLite setup alone). Prints a markdown table: requests
//! per second, median and 99th-percentile latency, errors, lost updates.
//! Figures, not pass/fail; every instance, client, database and bucket runs
//! on this one machine, so two instances share its cores.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::postgres::PgCluster;
use support::server::{S3Server, TestServer, TEST_KDF};
use vaultfs::ids::{FileId, RecordId, VaultId};
use vaultfs::protocol::{FileUpdate, NewFile, NewRecord, NewVault, Sealed};
use vaultfs::remote::http::HttpRemote;
use vaultfs::remote::{collect, Remote, UploadBody};

struct Size {
    clients: usize,
    users: usize,
    run: Duration,
}

const FULL: Size = Size { clients: 64, users: 8, run: Duration::from_secs(60) };
const QUICK: Size = Size { clients: 8, users: 2, run: Duration::from_secs(5) };

/// The servers of one configuration, and what they run on.
struct Setup {
    name: &'static str,
    servers: Vec<TestServer>,
    _s3: Option<S3Server>,
    _pg: Option<Arc<PgCluster>>,
    _dir: tempfile::TempDir,
}

const KDF_TOML: &str = "[login_kdf]\nm_cost_kib = 256\nt_cost = 1\np_cost = 1\n";

fn sqlite() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("server.toml");
    std::fs::write(&config, KDF_TOML).unwrap();
    let server = TestServer::start_exact(&dir.path().join("a"), &config);
    Setup { name: "SQLite, local blobs", servers: vec![server], _s3: None, _pg: None, _dir: dir }
}

/// PostgreSQL for the metadata, and an S3 bucket for the blobs (local blobs
/// with one instance: the database's own cost, apart from the bucket's).
fn postgres(instances: usize, bucket: bool) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let s3 = bucket.then(|| S3Server::start(&dir.path().join("s3")));
    let pg = PgCluster::get();
    let database = pg.database_for(&dir.path().join("db"));
    let config = dir.path().join("server.toml");
    let storage = s3.as_ref().map(S3Server::config).unwrap_or_default();
    let text =
        format!("{KDF_TOML}{storage}{}", pg.config(&database).replace("pool_size = 8", "pool_size = 16"));
    std::fs::write(&config, text).unwrap();
    let first = TestServer::start_exact(&dir.path().join("a"), &config);
    let mut servers = vec![first];
    for n in 1..instances {
        let data = dir.path().join(format!("i{n}"));
        copy_dir(&servers[0].data_dir.join("tls"), &data.join("tls"));
        servers.push(TestServer::start_exact(&data, &config));
    }
    let name = match (bucket, instances) {
        (false, _) => "PostgreSQL, local blobs",
        (true, 1) => "PostgreSQL + S3",
        (true, _) => "PostgreSQL + S3, two instances",
    };
    Setup { name, servers, _s3: s3, _pg: Some(pg), _dir: dir }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    std::fs::set_permissions(to, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// What one client did.
#[derive(Default)]
struct Tally {
    latencies: Vec<Duration>,
    errors: u64,
    first_error: Option<String>,
    /// Reads (during the run and at the end) that did not give what the
    /// client last wrote, and files it should have that were gone or changed.
    lost: u64,
}

impl Tally {
    fn error(&mut self, what: &str, e: impl std::fmt::Display) {
        self.errors += 1;
        self.first_error.get_or_insert_with(|| format!("{what}: {e}"));
    }
}

/// A small deterministic generator (xorshift), one per client.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn sealed(b: &[u8]) -> Sealed {
    Sealed(b.to_vec())
}

/// One client's run: its own record in `vault`, its files' versions and
/// contents as it wrote them.
async fn client(remote: HttpRemote, vault: VaultId, seed: u64, until: Instant) -> Tally {
    let mut t = Tally::default();
    let mut rng = Rng(seed | 1);
    let record = RecordId::random().unwrap();
    if let Err(e) = remote
        .create_record(
            vault,
            NewRecord { id: record, parent: None, title: sealed(b"r"), fields: sealed(b"") },
        )
        .await
    {
        t.error("create record", e);
        return t;
    }
    let mut mine: HashMap<FileId, (u64, Vec<u8>)> = HashMap::new();
    let mut n = 0u64;
    while Instant::now() < until {
        n += 1;
        let body: Vec<u8> = format!("client {seed} write {n} ").bytes().cycle().take(4096).collect();
        let pick = mine.keys().nth((rng.next() as usize) % mine.len().max(1)).copied();
        let roll = rng.next() % 100;
        let started = Instant::now();
        match (roll, pick) {
            (0..20, _) | (_, None) => {
                let id = FileId::random().unwrap();
                let f =
                    NewFile { id, name: sealed(b"n"), e2e: true, mtime_ms: Some(1), meta: Sealed::default() };
                match remote.create_with_content(record, None, f, UploadBody::from_bytes(body.clone())).await
                {
                    Ok(done) => drop(mine.insert(id, (done.version, body))),
                    Err(e) => t.error("create", e),
                }
            }
            (20..45, Some(id)) => {
                let version = mine[&id].0;
                match remote.upload(id, version, true, Some(2), UploadBody::from_bytes(body.clone())).await {
                    Ok(done) => drop(mine.insert(id, (done.version, body))),
                    Err(e) => {
                        t.error("write", e);
                        resync(&remote, id, &mut mine).await;
                    }
                }
            }
            (45..70, Some(id)) => match remote.download(id, None).await {
                Ok(c) => {
                    let got = collect(c.stream).await.unwrap_or_default();
                    if (c.version, &got) != (mine[&id].0, &mine[&id].1) {
                        t.lost += 1;
                    }
                }
                Err(e) => t.error("read", e),
            },
            (70..85, _) => match remote.files(vault).await {
                Ok(all) => {
                    let listed = all.iter().filter(|f| f.record == record).count();
                    if listed != mine.len() {
                        t.lost += 1;
                    }
                }
                Err(e) => t.error("list", e),
            },
            (85..95, Some(id)) => {
                let update =
                    FileUpdate { name: Some(sealed(format!("n{n}").as_bytes())), ..Default::default() };
                match remote.update_file(id, mine[&id].0, update).await {
                    Ok(info) => mine.get_mut(&id).unwrap().0 = info.version,
                    Err(e) => {
                        t.error("rename", e);
                        resync(&remote, id, &mut mine).await;
                    }
                }
            }
            (_, Some(id)) => match remote.delete_file(id, mine[&id].0).await {
                Ok(()) => drop(mine.remove(&id)),
                Err(e) => t.error("delete", e),
            },
        }
        t.latencies.push(started.elapsed());
    }
    // Everything this client knows it wrote, and nothing else.
    match remote.files(vault).await {
        Ok(all) => {
            let listed: HashMap<FileId, u64> =
                all.iter().filter(|f| f.record == record).map(|f| (f.id, f.version)).collect();
            t.lost += mine.iter().filter(|(id, (v, _))| listed.get(id) != Some(v)).count() as u64;
            t.lost += listed.keys().filter(|id| !mine.contains_key(id)).count() as u64;
        }
        Err(e) => t.error("final list", e),
    }
    for (id, (_, data)) in &mine {
        match remote.download(*id, None).await {
            Ok(c) => {
                if !collect(c.stream).await.is_ok_and(|got| &got == data) {
                    t.lost += 1;
                }
            }
            Err(e) => t.error("final read", e),
        }
    }
    t
}

/// After a failed write, the file's version as the server has it (the
/// write may have been done, its answer lost).
async fn resync(remote: &HttpRemote, id: FileId, mine: &mut HashMap<FileId, (u64, Vec<u8>)>) {
    if let Ok(info) = remote.file(id).await {
        if let (Ok(c), Some(entry)) = (remote.download(id, None).await, mine.get_mut(&id)) {
            let data = collect(c.stream).await.unwrap_or_default();
            *entry = (info.version, data);
        }
    }
}

struct Row {
    name: &'static str,
    instances: usize,
    requests: usize,
    per_second: f64,
    p50: Duration,
    p99: Duration,
    errors: u64,
    lost: u64,
    first_error: Option<String>,
}

async fn measure(setup: &Setup, size: &Size) -> Row {
    // Users, each with a vault; clients spread over the instances.
    let mut vaults = Vec::new();
    for u in 0..size.users {
        let name = format!("load{u}");
        let first = setup.servers[0].user(&name, &[]).await;
        let vault = VaultId::random().unwrap();
        first
            .create_vault(NewVault { id: vault, name: sealed(b"v"), e2e_required: false, wrapped_key: None })
            .await
            .unwrap();
        vaults.push((name, vault));
    }
    let mut remotes = Vec::new();
    for c in 0..size.clients {
        let (name, vault) = &vaults[c % size.users];
        let server = &setup.servers[c % setup.servers.len()];
        let pass = format!("{name} passphrase");
        remotes.push((
            HttpRemote::login(&server.access(), name, pass.as_bytes(), TEST_KDF).await.unwrap(),
            *vault,
        ));
    }
    let until = Instant::now() + size.run;
    let started = Instant::now();
    let tasks: Vec<_> = remotes
        .into_iter()
        .enumerate()
        .map(|(c, (remote, vault))| tokio::spawn(client(remote, vault, c as u64 + 1, until)))
        .collect();
    let mut all = Tally::default();
    for task in tasks {
        let t = task.await.unwrap();
        all.latencies.extend(t.latencies);
        all.errors += t.errors;
        all.lost += t.lost;
        if all.first_error.is_none() {
            all.first_error = t.first_error;
        }
    }
    let elapsed = started.elapsed().min(size.run).as_secs_f64();
    all.latencies.sort();
    let at = |q: f64| {
        all.latencies
            .get(((all.latencies.len() as f64 * q) as usize).min(all.latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    Row {
        name: setup.name,
        instances: setup.servers.len(),
        requests: all.latencies.len(),
        per_second: all.latencies.len() as f64 / elapsed,
        p50: at(0.5),
        p99: at(0.99),
        errors: all.errors,
        lost: all.lost,
        first_error: all.first_error,
    }
}

/// `--latency`: one client on an idle SQLite server, each kind of request
/// made `n` times one after another, so a round trip's own cost shows apart
/// from queueing under load: the median of each, in microseconds. What a
/// mount's close (a create with content) and mkdir (a record) wait for.
async fn latency(setup: &Setup, n: usize) -> Vec<(&'static str, Duration)> {
    let remote = setup.servers[0].user("lat", &[]).await;
    let vault = VaultId::random().unwrap();
    remote
        .create_vault(NewVault { id: vault, name: sealed(b"v"), e2e_required: false, wrapped_key: None })
        .await
        .unwrap();
    let record = RecordId::random().unwrap();
    let new_record = |id| NewRecord { id, parent: Some(record), title: sealed(b"r"), fields: sealed(b"") };
    remote.create_record(vault, NewRecord { parent: None, ..new_record(record) }).await.unwrap();
    let body: Vec<u8> = (0..4096u32).map(|i| i as u8).collect();
    let access = setup.servers[0].access();
    let raw = vaultfs::remote::http::build_client(&access).unwrap();
    let health = format!("{}/v1/health", access.url);
    let mut rows: Vec<(&str, Vec<Duration>)> = vec![
        ("health (the transport alone)", vec![]),
        ("list vaults", vec![]),
        ("create record", vec![]),
        ("create file with 4 KiB", vec![]),
        ("read file", vec![]),
    ];
    let mut last = None;
    for _ in 0..n {
        let t = Instant::now();
        assert!(raw.get(&health).send().await.unwrap().status().is_success());
        rows[0].1.push(t.elapsed());
        let t = Instant::now();
        remote.vaults().await.unwrap();
        rows[1].1.push(t.elapsed());
        let t = Instant::now();
        remote.create_record(vault, new_record(RecordId::random().unwrap())).await.unwrap();
        rows[2].1.push(t.elapsed());
        let id = FileId::random().unwrap();
        let f = NewFile { id, name: sealed(b"n"), e2e: true, mtime_ms: Some(1), meta: Sealed::default() };
        let t = Instant::now();
        remote.create_with_content(record, None, f, UploadBody::from_bytes(body.clone())).await.unwrap();
        rows[3].1.push(t.elapsed());
        if let Some(id) = last.replace(id) {
            let t = Instant::now();
            let c = remote.download(id, None).await.unwrap();
            assert_eq!(collect(c.stream).await.unwrap(), body);
            rows[4].1.push(t.elapsed());
        }
    }
    rows.into_iter()
        .map(|(what, mut times)| {
            times.sort();
            (what, times[times.len() / 2])
        })
        .collect()
}

/// The `--latency` table: this build, and the build `VAULTFS_BENCH_BASELINE`
/// names if set, taking turns (two rounds each) so drift on the machine
/// falls on both.
fn latency_table(rt: &tokio::runtime::Runtime, quick: bool) {
    let n = if quick { 100 } else { 1000 };
    let baseline = std::env::var("VAULTFS_BENCH_BASELINE").ok().filter(|b| !b.is_empty());
    let builds: Vec<Option<String>> = std::iter::once(None).chain(baseline.clone().map(Some)).collect();
    let mut medians: Vec<Vec<Vec<(&str, Duration)>>> = vec![vec![]; builds.len()];
    for _round in 0..2 {
        for (b, bin) in builds.iter().enumerate() {
            support::server::use_vaultfs_bin(bin.clone());
            let setup = sqlite();
            medians[b].push(rt.block_on(latency(&setup, n)));
        }
    }
    support::server::use_vaultfs_bin(None);
    println!("\nOne client, one request at a time, {} of each per round, two rounds (SQLite, local blobs; medians of the rounds' medians, µs):\n", n);
    let names: Vec<&str> = medians[0][0].iter().map(|(w, _)| *w).collect();
    println!("| request | this build |{}", if baseline.is_some() { " baseline |" } else { "" });
    println!("|---|---:|{}", if baseline.is_some() { "---:|" } else { "" });
    for (i, what) in names.iter().enumerate() {
        let cells: Vec<String> = medians
            .iter()
            .map(|rounds| {
                let mut v: Vec<Duration> = rounds.iter().map(|r| r[i].1).collect();
                v.sort();
                format!(" {} |", v[v.len() / 2].as_micros())
            })
            .collect();
        println!("| {what} |{}", cells.concat());
    }
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    if std::env::args().any(|a| a == "--latency") {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
        latency_table(&rt, quick);
        return;
    }
    let size = if quick { QUICK } else { FULL };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let mut rows = Vec::new();
    let setups = [sqlite as fn() -> Setup, || postgres(1, false), || postgres(1, true), || postgres(2, true)];
    // `--sqlite`: the first setup alone.
    let only_sqlite = std::env::args().any(|a| a == "--sqlite");
    for make in setups.into_iter().take(if only_sqlite { 1 } else { usize::MAX }) {
        let setup = make();
        rows.push(rt.block_on(measure(&setup, &size)));
        drop(setup);
    }
    println!(
        "\n{} clients for {} s each ({} logical CPUs; every instance, client, database and bucket on this machine)\n",
        size.clients,
        size.run.as_secs(),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );
    println!("| setup | instances | requests | requests/s | p50 | p99 | errors | lost updates |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {:.0} | {:.1} ms | {:.1} ms | {} | {} |",
            r.name,
            r.instances,
            r.requests,
            r.per_second,
            r.p50.as_secs_f64() * 1000.0,
            r.p99.as_secs_f64() * 1000.0,
            r.errors,
            r.lost
        );
    }
    for r in rows.iter().filter(|r| r.first_error.is_some()) {
        println!("\n{}: first error: {}", r.name, r.first_error.as_deref().unwrap_or(""));
    }
}
