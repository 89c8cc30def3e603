//! Recent log lines kept in memory, so a mount running in the background (whose
//! standard error goes nowhere once it detaches) can still show what it logged:
//! `vaultfs status --log`.
//!
//! Log lines can carry file names, so they are never written to a file by
//! default; they stay in this bounded ring in process memory (locked against
//! swap along with the rest when the system allows) and leave it only over the
//! mount's private status socket.

use parking_lot::Mutex;
use std::collections::VecDeque;
use std::io::Write;

use zeroize::Zeroize;

/// Lines kept.
const KEEP: usize = 500;

static RING: Mutex<VecDeque<String>> = parking_lot::const_mutex(VecDeque::new());

/// The most recent lines, oldest first.
pub fn recent(n: usize) -> Vec<String> {
    let ring = RING.lock();
    ring.iter().skip(ring.len().saturating_sub(n)).cloned().collect()
}

fn keep(text: &[u8]) {
    let mut ring = RING.lock();
    for line in strip_ansi(text).lines().filter(|l| !l.trim().is_empty()) {
        if ring.len() == KEEP {
            if let Some(mut old) = ring.pop_front() {
                old.zeroize();
            }
        }
        ring.push_back(line.to_string());
    }
}

/// Removes terminal colour sequences (ESC [ ... letter).
fn strip_ansi(text: &[u8]) -> String {
    let text = String::from_utf8_lossy(text);
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Where log events go: standard error, and the ring.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sink;

/// One event being formatted; written out when dropped.
pub struct Event(Vec<u8>);

impl Write for Event {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        let _ = std::io::stderr().write_all(&self.0);
        keep(&self.0);
        self.0.zeroize();
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Sink {
    type Writer = Event;
    fn make_writer(&'a self) -> Event {
        Event(Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_recent_lines_without_colours() {
        {
            let mut e = Sink.make_writer_for_test();
            e.write_all(b"\x1b[32m INFO\x1b[0m first line\n").unwrap();
        }
        {
            let mut e = Sink.make_writer_for_test();
            e.write_all(b"second line\n").unwrap();
        }
        let lines = recent(2);
        assert_eq!(lines, [" INFO first line", "second line"]);
        for i in 0..KEEP + 10 {
            keep(format!("line {i}\n").as_bytes());
        }
        assert_eq!(recent(usize::MAX).len(), KEEP);
        assert_eq!(recent(1), [format!("line {}", KEEP + 9)]);
    }

    impl Sink {
        fn make_writer_for_test(&self) -> Event {
            tracing_subscriber::fmt::MakeWriter::make_writer(self)
        }
    }
}
