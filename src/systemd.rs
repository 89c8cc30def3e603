//! Telling systemd how a daemon is doing, for units of `Type=notify` with a
//! watchdog (dist/systemd/): readiness once the server listens or the mount
//! is mounted, "stopping" while it saves and shuts down, and a watchdog ping
//! only while a check of the daemon's own health passes.
//!
//! Each function does nothing when the process was not started by systemd
//! (no `NOTIFY_SOCKET`, no `WATCHDOG_USEC`); a failed send is logged at
//! debug level and never stops the daemon. The protocol is the `sd-notify`
//! crate's.

use std::future::Future;
use std::time::Duration;

use sd_notify::NotifyState;

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!(error = %e, "could not notify systemd");
    }
}

/// The daemon is ready; `status` is shown by `systemctl status`.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// The daemon is shutting down (saving files, finishing requests).
pub fn stopping(status: &str) {
    send(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

/// Pings systemd's watchdog at half its interval for as long as `healthy`
/// answers true within that half; a check that fails or hangs skips the
/// ping, so systemd restarts a daemon that stopped working rather than one
/// that stopped running. Returns at once without a watchdog.
pub async fn watchdog<F, Fut>(mut healthy: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let Some(interval) = sd_notify::watchdog_enabled() else { return };
    let every = (interval / 2).max(Duration::from_millis(100));
    tracing::debug!(?interval, "systemd watchdog on");
    loop {
        match tokio::time::timeout(every, healthy()).await {
            Ok(true) => send(&[NotifyState::Watchdog]),
            Ok(false) => tracing::warn!("health check failed: not pinging systemd's watchdog"),
            Err(_) => tracing::warn!("health check took too long: not pinging systemd's watchdog"),
        }
        tokio::time::sleep(every).await;
    }
}
