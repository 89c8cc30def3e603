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

/// CPU time (user and system, every thread, also ones that have ended) that
/// process `pid` has used, to the nanosecond; zero if it cannot be read.
/// `/proc/PID/stat` counts in clock ticks (10 ms here), too coarse for one
/// 30 MB read.
#[allow(unsafe_code)]
pub fn cpu_time(pid: u32) -> std::time::Duration {
    let mut clock: libc::clockid_t = 0;
    // SAFETY: writes the clock id of `pid` into our own variable.
    if unsafe { libc::clock_getcpuclockid(pid as libc::pid_t, &mut clock) } != 0 {
        return std::time::Duration::ZERO;
    }
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: reads that clock into our own timespec.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return std::time::Duration::ZERO;
    }
    std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}
