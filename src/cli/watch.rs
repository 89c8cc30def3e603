//! `vaultfs status --watch`: the status of running mounts, looked at every
//! interval until interrupted (or until the mount named ends).
//!
//! On a terminal it is drawn with indicatif: per mount a line naming it, a
//! bar of the cache's use against its budget, and a bar per upload and per
//! download with its bytes and rate, redrawn in place; a transfer's bar goes
//! when it ends. Elsewhere (a pipe, a log) each look prints the plain status
//! of `vaultfs status` under a line with the time, so the output can be read
//! and parsed as it grows.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar};

use super::progress::style;
use super::status::{look, none_running, print, MountStatus};
use super::CliResult;

/// Shows the status every `interval` seconds until interrupted, or until the
/// mount at `mountpoint` (if one is named) is gone.
pub fn watch(mountpoint: Option<&Path>, interval: f64) -> CliResult {
    let every = Duration::from_secs_f64(interval);
    if std::io::stdout().is_terminal() {
        let mut board = Board::default();
        loop {
            let found = look(mountpoint)?;
            if found.is_empty() && mountpoint.is_some() {
                board.clear();
                println!("{}", none_running(mountpoint));
                return Ok(());
            }
            board.draw(&found);
            std::thread::sleep(every);
        }
    }
    let mut out = std::io::stdout().lock();
    loop {
        let found = look(mountpoint)?;
        let now = time::OffsetDateTime::now_utc();
        writeln!(out, "-- {:02}:{:02}:{:02} UTC", now.hour(), now.minute(), now.second())?;
        if found.is_empty() {
            writeln!(out, "{}", none_running(mountpoint))?;
            if mountpoint.is_some() {
                return Ok(());
            }
        }
        for s in &found {
            print(&mut out, s)?;
        }
        out.flush()?;
        std::thread::sleep(every);
    }
}

/// The bars on the terminal, kept from one look to the next so indicatif can
/// work out rates.
#[derive(Default)]
struct Board {
    multi: MultiProgress,
    mounts: HashMap<PathBuf, MountBars>,
}

struct MountBars {
    head: ProgressBar,
    cache: ProgressBar,
    /// By direction and name.
    transfers: HashMap<(bool, String), ProgressBar>,
}

impl Board {
    fn draw(&mut self, found: &[MountStatus]) {
        let seen: Vec<&PathBuf> = found.iter().map(|s| &s.mountpoint).collect();
        self.mounts.retain(|m, bars| {
            let keep = seen.contains(&m);
            if !keep {
                bars.head.finish_with_message(format!("{} (ended)", m.display()));
            }
            keep
        });
        for s in found {
            let multi = &self.multi;
            let bars = self.mounts.entry(s.mountpoint.clone()).or_insert_with(|| MountBars {
                head: multi.add(ProgressBar::new(0).with_style(style("{msg}"))),
                cache: multi.add(ProgressBar::new(0).with_style(style(
                    "  cache     [{bar:30}] {binary_bytes} of {binary_total_bytes} {msg}",
                ))),
                transfers: HashMap::new(),
            });
            let fs = &s.fs;
            let mut head = format!("{}  ({}, process {})", s.mountpoint.display(), s.server, s.pid);
            if fs.deleting > 0 {
                head.push_str(&format!("; deleting {}", fs.deleting));
            }
            if let Some(last) = fs.refused.last() {
                head.push_str(&format!("; refused: {last}"));
            }
            bars.head.set_message(head);
            bars.cache.set_length(fs.cache_budget);
            bars.cache.set_position(fs.cache_used.min(fs.cache_budget));
            bars.cache.set_message(format!("{} file(s), {} unsaved", fs.cached_files, fs.unsaved));
            let now: Vec<(bool, &crate::fs::core::UploadStatus)> =
                fs.uploads.iter().map(|u| (true, u)).chain(fs.downloads.iter().map(|d| (false, d))).collect();
            bars.transfers.retain(|(up, name), bar| {
                let going = now.iter().any(|(u, t)| u == up && &t.name == name);
                if !going {
                    bar.finish_and_clear();
                }
                going
            });
            for (up, t) in now {
                let bar = bars.transfers.entry((up, t.name.clone())).or_insert_with(|| {
                    let (verb, template) = match (up, t.total) {
                        (true, Some(_)) => (
                            "up  ",
                            "[{bar:30}] {binary_bytes} of {binary_total_bytes}, {binary_bytes_per_sec}",
                        ),
                        (true, None) => ("up  ", "{spinner} {binary_bytes} streamed, {binary_bytes_per_sec}"),
                        (false, _) => (
                            "down",
                            "[{bar:30}] {binary_bytes} of {binary_total_bytes}, {binary_bytes_per_sec}",
                        ),
                    };
                    let bar = multi.add(ProgressBar::new(t.total.unwrap_or(0)));
                    bar.set_style(style(&format!("  {verb}      {{msg}} {template}")));
                    bar.set_message(t.name.clone());
                    bar
                });
                if let Some(total) = t.total {
                    bar.set_length(total);
                }
                bar.set_position(t.sent);
            }
        }
    }

    fn clear(&mut self) {
        for (_, bars) in self.mounts.drain() {
            for (_, t) in bars.transfers {
                t.finish_and_clear();
            }
            bars.cache.finish_and_clear();
            bars.head.finish_and_clear();
        }
    }
}
