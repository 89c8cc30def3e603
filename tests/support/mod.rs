//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod mount;
pub mod postgres;
pub mod server;
pub mod vectors;

use vaultfs::crypto::{FileContext, KeyId, VaultKey};
use vaultfs::ids::{FileId, RecordId, VaultId};

/// Deterministic plaintext: byte i is i mod 251 (a prime, so the pattern never
/// lines up with chunk boundaries and a moved chunk would show).
pub fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// A fixed vault key.
pub fn vault_key(n: u8) -> VaultKey {
    VaultKey::from_bytes(KeyId([n; 16]), [n ^ 0xa5; 32])
}

/// A file context with ids derived from `vault`, `record`, `file`.
pub fn context(vault: u8, record: u8, file: u8) -> FileContext {
    FileContext { vault: VaultId([vault; 16]), record: RecordId([record; 16]), file: FileId([file; 16]) }
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    vaultfs::ids::hex_encode(bytes)
}

/// Hex to bytes, panicking on bad input (test data is ours).
pub fn unhex(s: &str) -> Vec<u8> {
    vaultfs::ids::hex_decode(s).unwrap_or_else(|| panic!("bad hex in test data: {s:.40}"))
}

/// Peak resident memory of process `pid` since the last reset, in KiB (0 if
/// the process is gone).
pub fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Watches the resident memory of `pid` by kind until dropped or
/// [`RssWatch::finish`]ed: the largest anonymous, file-backed and shared
/// (memfd) parts seen, every 10 ms, and the threads. For a test whose memory
/// bound fails, to say what grew.
pub struct RssWatch {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<String>>,
}

impl RssWatch {
    pub fn start(pid: u32) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = std::sync::Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let keys = ["VmRSS:", "RssAnon:", "RssFile:", "RssShmem:", "Threads:"];
            let mut most = [0u64; 5];
            while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
                for (i, key) in keys.iter().enumerate() {
                    let v = status
                        .lines()
                        .find_map(|l| l.strip_prefix(key))
                        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                        .unwrap_or(0);
                    most[i] = most[i].max(v);
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            keys.iter().zip(most).map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")
        });
        RssWatch { stop, thread: Some(thread) }
    }

    /// The largest of each part seen (kB; threads as a count).
    pub fn finish(mut self) -> String {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.take().and_then(|t| t.join().ok()).unwrap_or_default()
    }
}

impl Drop for RssWatch {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Resets the peak resident memory of `pid` to what it uses now (so the
/// Argon2id unlock at mount, 64 MiB, does not count as the cost of what follows).
pub fn reset_peak_rss(pid: u32) -> std::io::Result<()> {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5")
}

/// Prints a suite's result line, and adds it to the report `.ci/test` prints
/// at the end (VAULTFS_SUITE_REPORT names the file).
pub fn report(line: &str) {
    println!("SUITE {line}");
    if let Some(path) = std::env::var_os("VAULTFS_SUITE_REPORT") {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).unwrap();
        writeln!(f, "{line}").unwrap();
    }
}

/// An extended attribute of `path` as text (empty if it has none or it
/// cannot be read).
pub fn xattr(path: &std::path::Path, name: &str) -> String {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let name = std::ffi::CString::new(name).unwrap();
    let mut buf = [0u8; 256];
    // SAFETY: both strings are NUL-terminated; getxattr writes at most buf.len() bytes.
    let n = unsafe { libc::getxattr(path.as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    xattr_text(n, &buf)
}

/// An extended attribute read through an open descriptor (no path lookup,
/// which would ask the server).
pub fn fxattr(fd: i32, name: &str) -> String {
    let name = std::ffi::CString::new(name).unwrap();
    let mut buf = [0u8; 256];
    // SAFETY: the name is NUL-terminated; fgetxattr writes at most buf.len() bytes.
    let n = unsafe { libc::fgetxattr(fd, name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    xattr_text(n, &buf)
}

fn xattr_text(n: isize, buf: &[u8]) -> String {
    match usize::try_from(n) {
        Ok(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
        Err(_) => String::new(),
    }
}

/// Runs `script` with `sh -e` in `dir`; its stdout (it must succeed).
pub fn sh(dir: &std::path::Path, script: &str) -> String {
    let out = std::process::Command::new("sh").arg("-ec").arg(script).current_dir(dir).output().unwrap();
    assert!(
        out.status.success(),
        "script failed: {script}\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
