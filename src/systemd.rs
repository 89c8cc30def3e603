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

/// Looks at the daemon's health four times per watchdog interval and pings
/// systemd's watchdog after each look, unless the last [`UNHEALTHY_LOOKS`]
/// looks in a row failed or took longer than a quarter interval. So a
/// metadata store stuck for about one interval gets the daemon restarted,
/// while one slow look (a long fsync) does not. Returns at once without a
/// watchdog.
pub async fn watchdog<F, Fut>(mut healthy: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let Some(interval) = sd_notify::watchdog_enabled() else { return };
    let tick = (interval / 4).max(Duration::from_millis(50));
    tracing::debug!(?interval, "systemd watchdog on");
    let mut failed = 0u32;
    loop {
        match tokio::time::timeout(tick, healthy()).await {
            Ok(true) => failed = 0,
            Ok(false) => {
                failed += 1;
                tracing::warn!(failed, "health check failed");
            }
            Err(_) => {
                failed += 1;
                tracing::warn!(failed, "health check took longer than {tick:?}");
            }
        }
        if failed < UNHEALTHY_LOOKS {
            send(&[NotifyState::Watchdog]);
        } else if failed == UNHEALTHY_LOOKS {
            tracing::error!("not pinging systemd's watchdog any more: systemd will restart this daemon");
        }
        tokio::time::sleep(tick).await;
    }
}

/// Failed looks in a row after which the watchdog is no longer pinged.
const UNHEALTHY_LOOKS: u32 = 3;
