//! `vaultfs status`, and the small socket each running mount answers it on.
//!
//! Each mount listens on a Unix socket in a private directory
//! (`$XDG_RUNTIME_DIR/vaultfs/`, else `/tmp/vaultfs-UID/`, mode 0700), named after
//! a hash of the mount point. A connection gets one line of JSON and is closed.
//! The socket carries counters and the names of files being uploaded, only to the
//! user who owns the mount; it is not a file and holds no file content.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::Args;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::CliResult;
use crate::fs::core::FsStatus;
use crate::fs::VaultFs;
use crate::remote::Remote;

/// `vaultfs status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// A mount point; without one, every running mount of this user is shown.
    mountpoint: Option<PathBuf>,
    /// Also show the mount's most recent log lines (kept in its memory only).
    #[arg(long, conflicts_with = "watch")]
    log: bool,
    /// Keep showing the status, redrawn every `--interval` seconds with
    /// progress bars and rates on a terminal (plain text, a block per
    /// interval, otherwise), until interrupted or the mount ends.
    #[arg(long)]
    watch: bool,
    /// Seconds between two looks with `--watch`.
    #[arg(long, default_value_t = 1.0, requires = "watch", value_parser = interval)]
    interval: f64,
}

fn interval(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(s) if (0.1..=3600.0).contains(&s) => Ok(s),
        _ => Err(format!("`{text}` is not a number of seconds from 0.1 to 3600")),
    }
}

/// Log lines a status answer carries.
const LOG_LINES: usize = 200;

/// What one mount reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MountStatus {
    /// Where it is mounted.
    pub mountpoint: PathBuf,
    /// The server.
    pub server: String,
    /// The daemon's process id.
    pub pid: u32,
    /// Cache and uploads.
    pub fs: FsStatus,
    /// The most recent log lines, oldest first.
    #[serde(default)]
    pub log: Vec<String>,
}

fn socket_dir() -> std::io::Result<PathBuf> {
    // SAFETY: getuid only reads the process's user id.
    #[allow(unsafe_code)]
    let uid = unsafe { libc::getuid() };
    let dir = match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(d) => PathBuf::from(d).join("vaultfs"),
        None => std::env::temp_dir().join(format!("vaultfs-{uid}")),
    };
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir)?;
    check_private_dir(&dir, uid)?;
    Ok(dir)
}

/// Refuses a socket directory that is not a directory of `uid`'s with mode
/// 0700 (not followed if it is a symbolic link). In a shared /tmp another user
/// could have made `/tmp/vaultfs-UID` first: then they could read the names of
/// files being uploaded from the socket, or answer `vaultfs status` with lies.
fn check_private_dir(dir: &Path, uid: u32) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(dir)?;
    let mode = meta.mode() & 0o7777;
    if !meta.file_type().is_dir() || meta.uid() != uid || mode != 0o700 {
        let kind = if meta.file_type().is_symlink() { "a symbolic link" } else { "not a private directory" };
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "refusing the status socket directory {}: {kind} (owner uid {}, mode {mode:o}); it must be \
                 a directory owned by uid {uid} with mode 700: remove it, or set XDG_RUNTIME_DIR",
                dir.display(),
                meta.uid()
            ),
        ));
    }
    Ok(())
}

fn socket_path(mountpoint: &Path) -> std::io::Result<PathBuf> {
    let digest = Sha256::digest(mountpoint.as_os_str().as_encoded_bytes());
    Ok(socket_dir()?.join(format!("{}.sock", crate::ids::hex_encode(&digest[..8]))))
}

/// Removes the socket when the mount ends.
pub struct StatusSocket(PathBuf);

impl Drop for StatusSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Starts answering status requests for the mount at `mountpoint`.
pub fn serve_status<R: Remote>(
    rt: &tokio::runtime::Handle,
    fs: &Arc<VaultFs<R>>,
    mountpoint: &Path,
    server: &str,
) -> std::io::Result<StatusSocket> {
    let path = socket_path(mountpoint)?;
    let _ = std::fs::remove_file(&path);
    let listener = {
        let _guard = rt.enter();
        tokio::net::UnixListener::bind(&path)?
    };
    let (fs, mountpoint, server) = (Arc::clone(fs), mountpoint.to_path_buf(), server.to_string());
    rt.spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else { continue };
            let status = MountStatus {
                mountpoint: mountpoint.clone(),
                server: server.clone(),
                pid: std::process::id(),
                fs: fs.status(),
                log: super::logring::recent(LOG_LINES),
            };
            if let Ok(mut line) = serde_json::to_vec(&status) {
                line.push(b'\n');
                let _ = tokio::io::AsyncWriteExt::write_all(&mut stream, &line).await;
            }
        }
    });
    Ok(StatusSocket(path))
}

/// What asking a mount's socket gave.
enum Answer {
    Status(Box<MountStatus>),
    /// Nobody listens: a socket left by a mount that was killed.
    Gone,
    /// A mount that did not answer in time, or answered nonsense: busy, or
    /// another version; its socket stays.
    Silent,
}

fn query(path: &Path) -> Answer {
    let stream = match std::os::unix::net::UnixStream::connect(path) {
        Ok(s) => s,
        Err(e)
            if matches!(e.kind(), std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound) =>
        {
            return Answer::Gone
        }
        Err(_) => return Answer::Silent,
    };
    if stream.set_read_timeout(Some(std::time::Duration::from_secs(5))).is_err() {
        return Answer::Silent;
    }
    let mut line = String::new();
    if BufReader::new(stream).read_line(&mut line).is_err() {
        return Answer::Silent;
    }
    match serde_json::from_str::<MountStatus>(&line) {
        Ok(mut s) => {
            s.sanitize();
            Answer::Status(Box::new(s))
        }
        Err(_) => Answer::Silent,
    }
}

/// `text` with control characters (terminal escape sequences among them)
/// shown as `?`: file names are chosen by whoever shares the vault.
fn printable(text: &str) -> String {
    text.chars().map(|c| if c.is_control() { '?' } else { c }).collect()
}

impl MountStatus {
    /// Makes every name and message safe to print on a terminal.
    fn sanitize(&mut self) {
        for t in self.fs.uploads.iter_mut().chain(self.fs.downloads.iter_mut()) {
            t.name = printable(&t.name);
        }
        for r in &mut self.fs.refused {
            *r = printable(r);
        }
        for l in &mut self.log {
            *l = printable(l);
        }
    }
}

pub(super) fn human(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// A 20-character progress bar.
pub fn bar(sent: u64, total: u64) -> String {
    let filled = (sent.min(total) * 20).checked_div(total).unwrap_or(20) as usize;
    format!("[{}{}]", "#".repeat(filled), "-".repeat(20 - filled))
}

/// One transfer's line: name, bar, percentage and sizes.
fn progress(out: &mut impl Write, label: &str, name: &str, done: u64, total: u64) -> std::io::Result<()> {
    writeln!(
        out,
        "  {label:<9}  {name}  {} {:>3}%  {} of {}",
        bar(done, total),
        (done.min(total) * 100).checked_div(total).unwrap_or(100),
        human(done),
        human(total)
    )
}

pub(super) fn print(out: &mut impl Write, s: &MountStatus) -> std::io::Result<()> {
    writeln!(out, "{}  ({}, process {})", s.mountpoint.display(), s.server, s.pid)?;
    writeln!(
        out,
        "  cache      {} of {} in memory, {} file(s), {} unsaved",
        human(s.fs.cache_used),
        human(s.fs.cache_budget),
        s.fs.cached_files,
        s.fs.unsaved
    )?;
    let feed = if s.fs.feed_live {
        "the server pushes changes (feed live)"
    } else {
        "the server's change feed is down: asking as needed"
    };
    writeln!(out, "  listing    {} entries; {feed}", s.fs.listed)?;
    if s.fs.locks_shared {
        let n = s.fs.locks_held;
        writeln!(out, "  locks      {n} held on the server, seen by every mount (who holds one: getfattr -n user.vaultfs.locks FILE)")?;
    } else {
        writeln!(out, "  locks      held on this machine only (the server keeps none)")?;
    }
    if !s.fs.passthrough.is_empty() {
        writeln!(
            out,
            "  reads      passthrough {}; {} open(s) served so, {} in backing files",
            s.fs.passthrough,
            s.fs.passthrough_opens,
            human(s.fs.backing_bytes)
        )?;
    }
    if s.fs.deleting > 0 {
        writeln!(out, "  deleting   {} removed file(s) or record(s) on the server", s.fs.deleting)?;
    }
    if s.fs.uploads.is_empty() {
        writeln!(out, "  uploading  nothing")?;
    }
    for (i, d) in s.fs.downloads.iter().enumerate() {
        progress(out, if i == 0 { "fetching" } else { "" }, &d.name, d.sent, d.total.unwrap_or(0))?;
    }
    for (i, what) in s.fs.refused.iter().enumerate() {
        let label = if i == 0 { "refused" } else { "" };
        writeln!(out, "  {label:<9}  {what}")?;
    }
    for (i, u) in s.fs.uploads.iter().enumerate() {
        let label = if i == 0 { "uploading" } else { "" };
        match u.total {
            Some(total) => progress(out, label, &u.name, u.sent, total)?,
            None => writeln!(
                out,
                "  {label:<9}  {}  streaming (not end-to-end encrypted), {} sent",
                u.name,
                human(u.sent)
            )?,
        }
    }
    Ok(())
}

/// The status of the mount asked for, or of every running mount.
pub(super) fn look(
    mountpoint: Option<&Path>,
) -> Result<Vec<MountStatus>, Box<dyn std::error::Error + Send + Sync>> {
    let paths = match mountpoint {
        Some(m) => {
            let m = std::fs::canonicalize(m).map_err(|e| format!("{}: {e}", m.display()))?;
            vec![socket_path(&m)?]
        }
        None => std::fs::read_dir(socket_dir()?)?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "sock"))
            .collect(),
    };
    let mut found = Vec::new();
    for path in paths {
        match query(&path) {
            Answer::Status(s) => found.push(*s),
            // A socket left by a mount that was killed: tidy it away.
            Answer::Gone if mountpoint.is_none() => {
                let _ = std::fs::remove_file(&path);
            }
            Answer::Gone | Answer::Silent => {}
        }
    }
    found.sort_by(|a, b| a.mountpoint.cmp(&b.mountpoint));
    Ok(found)
}

pub(super) fn none_running(mountpoint: Option<&Path>) -> String {
    match mountpoint {
        Some(m) => format!("{} is not a running vaultfs mount", m.display()),
        None => "no running vaultfs mounts".to_string(),
    }
}

/// `vaultfs status`.
pub fn run(args: StatusArgs) -> CliResult {
    if args.watch {
        return super::watch::watch(args.mountpoint.as_deref(), args.interval);
    }
    let found = look(args.mountpoint.as_deref())?;
    if found.is_empty() {
        return Err(none_running(args.mountpoint.as_deref()).into());
    }
    let mut out = std::io::stdout().lock();
    for s in &found {
        print(&mut out, s)?;
        if args.log {
            writeln!(out, "  recent log lines:")?;
            for line in &s.log {
                writeln!(out, "    {line}")?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_socket_directory_must_be_private() {
        use std::os::unix::fs::PermissionsExt;
        // SAFETY: getuid only reads the process's user id.
        #[allow(unsafe_code)]
        let uid = unsafe { libc::getuid() };
        let dir = tempfile::tempdir().unwrap();
        let ok = dir.path().join("ok");
        std::fs::DirBuilder::new().mode(0o700).create(&ok).unwrap();
        check_private_dir(&ok, uid).unwrap();
        std::fs::set_permissions(&ok, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = check_private_dir(&ok, uid).unwrap_err().to_string();
        assert!(e.contains("mode 777") && e.contains("remove it"), "{e}");
        std::fs::set_permissions(&ok, std::fs::Permissions::from_mode(0o700)).unwrap();
        let e = check_private_dir(&ok, uid + 1).unwrap_err().to_string();
        assert!(e.contains(&format!("owner uid {uid}")), "{e}");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&ok, &link).unwrap();
        let e = check_private_dir(&link, uid).unwrap_err().to_string();
        assert!(e.contains("symbolic link"), "{e}");
    }

    #[test]
    fn names_from_the_vault_cannot_drive_the_terminal() {
        assert_eq!(printable("a\u{1b}]0;pwned\u{7}b\nc"), "a?]0;pwned?b?c");
        assert_eq!(printable("plain name.pdf"), "plain name.pdf");
    }

    #[test]
    fn bars_and_sizes() {
        assert_eq!(bar(0, 100), "[--------------------]");
        assert_eq!(bar(50, 100), "[##########----------]");
        assert_eq!(bar(100, 100), "[####################]");
        assert_eq!(bar(5, 0), "[####################]");
        assert_eq!(human(512), "512 B");
        assert_eq!(human(30 << 20), "30.0 MiB");
    }

    #[test]
    fn status_prints_uploads_with_progress() {
        let s = MountStatus {
            mountpoint: "/m".into(),
            server: "https://x".into(),
            pid: 7,
            log: Vec::new(),
            fs: FsStatus {
                cache_used: 1 << 20,
                cache_budget: 512 << 20,
                cached_files: 2,
                unsaved: 1,
                uploads: vec![
                    crate::fs::core::UploadStatus {
                        name: "a.pdf".into(),
                        sent: 15 << 20,
                        total: Some(30 << 20),
                    },
                    crate::fs::core::UploadStatus { name: "v.mkv".into(), sent: 100 << 20, total: None },
                ],
                refused: vec!["file ab12: stale version: generation 3, expected at least 5".into()],
                listed: 1234,
                feed_live: true,
                locks_shared: true,
                locks_held: 3,
                passthrough: "off (not root)".into(),
                passthrough_opens: 0,
                backing_bytes: 0,
                deleting: 2,
                downloads: vec![crate::fs::core::UploadStatus {
                    name: "b.iso".into(),
                    sent: 3 << 20,
                    total: Some(12 << 20),
                }],
            },
        };
        let mut out = Vec::new();
        print(&mut out, &s).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("1.0 MiB of 512.0 MiB in memory, 2 file(s), 1 unsaved"), "{text}");
        assert!(text.contains("a.pdf  [##########----------]  50%"), "{text}");
        assert!(text.contains("reads      passthrough off (not root); 0 open(s) served so"), "{text}");
        assert!(text.contains("deleting   2 removed file(s) or record(s) on the server"), "{text}");
        assert!(text.contains("v.mkv  streaming"), "{text}");
        assert!(
            text.contains("fetching   b.iso  [#####---------------]  25%  3.0 MiB of 12.0 MiB"),
            "{text}"
        );
        assert!(text.contains("refused    file ab12: stale version"), "{text}");
        assert!(text.contains("listing    1234 entries; the server pushes changes (feed live)"), "{text}");
        assert!(text.contains("locks      3 held on the server"), "{text}");
    }
}
