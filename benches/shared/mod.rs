//! Pieces the benchmarks share.
#![allow(dead_code)]

use std::process::Command;

/// OpenSSL's own ChaCha20-Poly1305 figure for 64 KiB blocks on one core, in
/// GB/s, or None if `openssl` cannot be run.
pub fn openssl_speed(seconds: u32) -> Option<f64> {
    let out = Command::new("openssl")
        .args(["speed", "-seconds", &seconds.to_string(), "-bytes", "65536", "-evp", "chacha20-poly1305"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    // Last line: "ChaCha20-Poly1305  3576037.38k" (thousands of bytes per second).
    let last = text.lines().rev().find(|l| l.trim_end().ends_with('k'))?;
    let kbytes: f64 = last.split_whitespace().last()?.trim_end_matches('k').parse().ok()?;
    Some(kbytes * 1000.0 / 1e9)
}
