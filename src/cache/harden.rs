//! Keeping plaintext off the disk by routes other than files: core dumps and swap.
//!
//! - Core dumps are disabled twice over: `RLIMIT_CORE` is set to 0 and the process
//!   is marked non-dumpable (`PR_SET_DUMPABLE`), which also keeps other processes
//!   of the same user from reading its memory through ptrace or /proc.
//! - Memory is locked with `mlockall(MCL_CURRENT | MCL_FUTURE)` when
//!   `RLIMIT_MEMLOCK` leaves room for the cache budget plus a margin. Locking all
//!   future allocations under a too-small limit would make allocations fail, so
//!   then nothing is locked and a single warning says so (only a warning when
//!   swap is enabled at all: without swap, there is nowhere for pages to go).
//!
//! Every command that unlocks a wallet calls this before it reads the
//! passphrase ([`harden_command`], or [`harden_process`] for the mount daemon),
//! so the passphrase, the Argon2id output and the wallet's keys are never in a
//! process that could dump core or be read by another process of the user.

/// Room for everything but the cache (code, runtime, buffers in flight).
const LOCK_MARGIN: u64 = 512 << 20;

/// What could be done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hardening {
    /// Core dumps are off.
    pub core_dumps_disabled: bool,
    /// All memory is locked against swap.
    pub memory_locked: bool,
    /// Why memory is not locked, if it is not.
    pub lock_problem: Option<String>,
}

fn swap_enabled() -> bool {
    // /proc/swaps has a header line, then one line per active swap area.
    std::fs::read_to_string("/proc/swaps").map(|s| s.lines().count() > 1).unwrap_or(true)
}

/// Applies the hardening for a daemon whose cache may hold `cache_budget` bytes.
pub fn harden_process(cache_budget: u64) -> Hardening {
    harden(cache_budget, false)
}

/// The same for a short command that unlocks the wallet (`vaultfs login`,
/// `vaultfs vault`, the parent of a background mount): no warning if memory
/// cannot be locked, since such a command holds secrets for a moment only.
pub fn harden_command() -> Hardening {
    harden(0, true)
}

#[allow(unsafe_code)]
fn harden(cache_budget: u64, quiet: bool) -> Hardening {
    let zero = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: setrlimit and prctl take plain values and a pointer to a valid,
    // initialized rlimit on our stack; they touch no memory of ours otherwise.
    let core_off = unsafe { libc::setrlimit(libc::RLIMIT_CORE, &zero) == 0 }
        & unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) == 0 };

    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the valid rlimit we pass.
    let got = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) == 0 };
    let needed = cache_budget.saturating_add(LOCK_MARGIN);
    let (locked, problem) = if !got {
        (false, Some("cannot read RLIMIT_MEMLOCK".to_string()))
    } else if limit.rlim_cur != libc::RLIM_INFINITY && limit.rlim_cur < needed {
        (
            false,
            Some(format!(
                "RLIMIT_MEMLOCK is {} bytes, less than the cache budget plus margin ({needed}); \
                 raise it (ulimit -l, or LimitMEMLOCK= in a systemd unit) to lock memory",
                limit.rlim_cur
            )),
        )
    } else {
        // SAFETY: mlockall takes flags only.
        let rc = unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE) };
        if rc == 0 {
            (true, None)
        } else {
            (false, Some(format!("mlockall failed: {}", std::io::Error::last_os_error())))
        }
    };
    if let Some(why) = &problem {
        if quiet {
            tracing::debug!("memory not locked: {why}");
        } else if swap_enabled() {
            tracing::warn!("plaintext memory is not locked against swap: {why}");
        } else {
            tracing::info!("memory not locked ({why}); no swap is enabled, so nothing can be swapped out");
        }
    }
    if !core_off {
        tracing::warn!("could not disable core dumps: {}", std::io::Error::last_os_error());
    }
    Hardening { core_dumps_disabled: core_off, memory_locked: locked, lock_problem: problem }
}

#[cfg(test)]
mod tests {
    /// Run in a child process (this test binary, filtered to this test), so
    /// the test runner itself keeps dumping core as it likes.
    #[test]
    fn a_hardened_command_cannot_dump_core_or_be_read_by_its_user() {
        if std::env::var_os("VAULTFS_HARDEN_CHILD").is_some() {
            let h = super::harden_command();
            assert!(h.core_dumps_disabled);
            // SAFETY: prctl and getrlimit take plain values and a valid pointer.
            #[allow(unsafe_code)]
            let (dumpable, core) = unsafe {
                let mut lim = libc::rlimit { rlim_cur: 1, rlim_max: 1 };
                libc::getrlimit(libc::RLIMIT_CORE, &mut lim);
                (libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0), lim.rlim_cur)
            };
            assert_eq!((dumpable, core), (0, 0));
            return;
        }
        let exe = std::env::current_exe().unwrap();
        let out = std::process::Command::new(exe)
            .args([
                "--exact",
                "cache::harden::tests::a_hardened_command_cannot_dump_core_or_be_read_by_its_user",
            ])
            .env("VAULTFS_HARDEN_CHILD", "1")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && text.contains("1 passed"), "{text}");
    }
}
