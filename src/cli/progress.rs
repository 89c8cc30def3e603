//! Progress bars for long commands and `status --watch` (indicatif), on
//! standard error: drawn on a terminal, hidden elsewhere (a log or a pipe
//! gets the command's closing lines only).

use indicatif::{ProgressBar, ProgressStyle};

/// A style from `template` (a fixed template: a mistake in it shows as
/// indicatif's default bar rather than failing the command).
pub fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("#>-")
}

/// A bar over bytes, with rate and time left, its length set once known.
pub fn bytes(what: &str) -> ProgressBar {
    let bar = ProgressBar::new(0).with_style(style(
        "{msg} [{bar:30}] {binary_bytes} of {binary_total_bytes}, {binary_bytes_per_sec}, {eta} left",
    ));
    bar.set_message(what.to_string());
    bar
}

/// A bar over `len` items (files, say).
pub fn count(what: &str, len: u64) -> ProgressBar {
    let bar = ProgressBar::new(len).with_style(style("{msg} [{bar:30}] {pos} of {len}, {eta} left"));
    bar.set_message(what.to_string());
    bar
}
