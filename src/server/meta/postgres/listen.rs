//! Every instance listens for what the others change: a connection of its
//! own (outside the pool) `LISTEN`s on the channels the triggers and lock
//! calls `NOTIFY`, and calls the service back:
//! - `vaultfs_changes`: a vault changed (waits for changes look again);
//! - `vaultfs_locks`: a lock may have been given up (lock waits look again);
//! - `vaultfs_sessions`, with a user id: that user's sessions ended somewhere
//!   (the cache of confirmed sessions drops theirs).
//!
//! A notification is delivered to every listener, the instance that made the
//! change included. When the connection is lost, notifications sent meanwhile
//! are lost with it: on every (re)connection all three callbacks run, as if
//! everything changed, and then a connection is tried again every
//! [`RETRY`] until one stands.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{AsyncMessage, NoTls, Socket};

/// How long between attempts to connect the listener again.
const RETRY: Duration = Duration::from_secs(2);

/// What the listener calls (each must be quick: it runs on the listener's task).
#[derive(Clone)]
pub struct Events {
    /// A vault changed.
    pub changed: Arc<dyn Fn() + Send + Sync>,
    /// A lock may have been given up.
    pub lock_released: Arc<dyn Fn() + Send + Sync>,
    /// The sessions of a user (by id) ended, or may have.
    pub sessions_ended: Arc<dyn Fn(Option<i64>) + Send + Sync>,
}

impl Events {
    fn everything(&self) {
        (self.changed)();
        (self.lock_released)();
        (self.sessions_ended)(None);
    }
}

/// Starts the listener on `rt` (it runs until the runtime stops).
pub fn start(
    rt: &tokio::runtime::Handle,
    config: tokio_postgres::Config,
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
    events: Events,
) {
    rt.spawn(async move {
        let mut failed_before = false;
        loop {
            let done = match &tls {
                Some(tls) => listen(&config, tls.clone(), &events).await,
                None => listen(&config, NoTls, &events).await,
            };
            match done {
                Ok(()) => tracing::warn!("the database closed the listening connection; connecting again"),
                Err(e) if !failed_before => {
                    tracing::warn!(error = %e, "lost the listening connection to the database; trying again")
                }
                Err(_) => {}
            }
            failed_before = true;
            tokio::time::sleep(RETRY).await;
        }
    });
}

async fn listen<T>(
    config: &tokio_postgres::Config,
    tls: T,
    events: &Events,
) -> Result<(), tokio_postgres::Error>
where
    T: MakeTlsConnect<Socket>,
    T::Stream: Send + 'static,
{
    let (client, mut connection) = config.connect(tls).await?;
    let (tx, mut messages) = tokio::sync::mpsc::unbounded_channel::<(String, String)>();
    // The connection's messages are read by this stream; the client's
    // LISTEN commands go through the same connection.
    let pump = async move {
        let mut stream = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = stream.next().await {
            match message {
                Ok(AsyncMessage::Notification(n)) => {
                    if tx.send((n.channel().to_owned(), n.payload().to_owned())).is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    };
    let handle = async {
        client.batch_execute("LISTEN vaultfs_changes; LISTEN vaultfs_locks; LISTEN vaultfs_sessions").await?;
        // What was sent while there was no listener is not known.
        events.everything();
        while let Some((channel, payload)) = messages.recv().await {
            match channel.as_str() {
                "vaultfs_changes" => (events.changed)(),
                "vaultfs_locks" => (events.lock_released)(),
                "vaultfs_sessions" => (events.sessions_ended)(payload.parse().ok()),
                _ => {}
            }
        }
        Ok::<(), tokio_postgres::Error>(())
    };
    tokio::select! {
        done = pump => done,
        done = handle => done,
    }
}
