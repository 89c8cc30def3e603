//! `vaultfs serve`: the vault server.
//!
//! Data flow: a request arrives over TLS (rustls; `tls.rs`), `api.rs` parses it
//! and calls [`service::Service`], which checks the session and the caller's
//! rights in the vault, then reads or writes metadata in SQLite (`meta.rs`) and
//! content in a [`blob::BlobStore`] (`blob.rs`: files in the data directory by
//! default; `s3.rs`: an S3-compatible bucket, chosen in the config). The server
//! stores only ciphertext and sealed names; it never holds a key. docs/API.md
//! documents the HTTP API.

pub mod admin;
pub mod api;
pub mod backup;
pub mod blob;
pub mod config;
pub mod meta;
pub mod metrics;
mod s3;
pub mod service;
pub mod tls;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use axum_server::accept::NoDelayAcceptor;

use self::blob::{BlobStore, LocalBlobStore};
use self::config::{MetadataBackend, PgTls};
use self::config::{ServerConfig, StorageBackend};
use self::meta::postgres::{tls_connector, PgSettings, PgStore};
use self::meta::{Meta, MetaDb};
use self::service::{Service, ServiceConfig};

/// How often a running server collects garbage (see
/// [`service::Service::collect_garbage`]).
const GARBAGE_EVERY: std::time::Duration = std::time::Duration::from_secs(3600);

/// Name of the metadata database inside the data directory.
pub const META_FILE: &str = "meta.sqlite3";

/// Errors starting or running the server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The data directory or listening socket could not be set up.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The failure.
        source: std::io::Error,
    },
    /// The metadata store could not be opened.
    #[error("metadata store: {0}")]
    Meta(#[from] meta::MetaError),
    /// TLS could not be set up.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The service could not start.
    #[error("{0}")]
    Service(#[from] service::ServiceError),
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ServeError {
    let context = context.into();
    move |source| ServeError::Io { context, source }
}

/// Creates the data directory (owner-only) and opens the metadata store in it.
pub fn open_meta(data_dir: &Path) -> Result<Meta, ServeError> {
    std::fs::create_dir_all(data_dir).map_err(io_err(format!("creating {}", data_dir.display())))?;
    std::fs::set_permissions(data_dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .map_err(io_err(format!("setting permissions of {}", data_dir.display())))?;
    Ok(Meta::open(&data_dir.join(META_FILE))?)
}

/// Opens the metadata database `config` names: SQLite in the data directory
/// (made if needed), or PostgreSQL (its schema brought up to date).
pub fn open_metadata(config: &ServerConfig) -> Result<MetaDb, ServeError> {
    match config.metadata.backend {
        MetadataBackend::Sqlite => Ok(open_meta(&config.data_dir)?.into()),
        MetadataBackend::Postgres => {
            let pg = &config.metadata.postgres;
            let tls = match (pg.tls, &pg.ca_file) {
                (PgTls::Require, Some(ca)) => Some(tls_connector(ca)?),
                _ => None,
            };
            let settings = PgSettings {
                config: pg
                    .connection()
                    .map_err(|e| ServeError::Service(service::ServiceError::BadRequest(e)))?,
                pool_size: pg.pool_size,
                tls,
            };
            tracing::info!(?settings, "metadata in PostgreSQL");
            Ok(PgStore::open(settings)?.into())
        }
    }
}

/// What a started server tells its caller.
#[derive(Debug, Clone)]
pub struct Started {
    /// The address actually bound (port 0 in the config picks a free port).
    pub addr: SocketAddr,
    /// `https` or `http`.
    pub scheme: &'static str,
    /// Fingerprint of the TLS certificate, for pinning.
    pub fingerprint: Option<String>,
}

/// Runs the server until SIGINT or SIGTERM. `on_start` is called once the socket
/// is bound (the CLI prints the address and fingerprint there).
pub async fn run(config: ServerConfig, on_start: impl FnOnce(&Started)) -> Result<(), ServeError> {
    run_until(config, on_start, wait_for_signal()).await
}

/// Runs the server until `shutdown` completes (the demo stops it itself, after
/// the mount has saved everything).
pub async fn run_until(
    config: ServerConfig,
    on_start: impl FnOnce(&Started),
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let meta = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || open_metadata(&config))
            .await
            .map_err(|e| ServeError::Service(service::ServiceError::Internal(e.to_string())))??
    };
    let defaults =
        admin::NewUserDefaults { limits: config.default_limits.into(), login_kdf: config.login_kdf.into() };
    meta.run(|m| admin::record_defaults(m, defaults))
        .0
        .map_err(|e| ServeError::Service(service::ServiceError::Internal(e.to_string())))?;
    match config.storage.backend {
        StorageBackend::Local => {
            let blobs = LocalBlobStore::open(&config.data_dir).map_err(io_err("opening blob store"))?;
            serve(config, meta, blobs, on_start, shutdown).await
        }
        StorageBackend::S3 => {
            // HTTPS to the store goes through reqwest with rustls: use the
            // same ring provider as the rest of the server.
            let _ = rustls::crypto::ring::default_provider().install_default();
            let blobs = s3::S3BlobStore::open(&config.storage.s3, &config.data_dir).map_err(|e| {
                ServeError::Service(service::ServiceError::Internal(format!("opening the S3 store: {e}")))
            })?;
            tracing::info!(bucket = %config.storage.s3.bucket, "blobs are kept in S3");
            serve(config, meta, blobs, on_start, shutdown).await
        }
    }
}

async fn serve<B: BlobStore>(
    config: ServerConfig,
    meta: MetaDb,
    blobs: B,
    on_start: impl FnOnce(&Started),
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let service = Service::new(
        meta,
        blobs,
        ServiceConfig {
            session_ttl_secs: config.session_ttl_secs,
            login_kdf: config.login_kdf.into(),
            lock_ttl: std::time::Duration::from_secs(config.lock_ttl_secs),
        },
    )?;
    let incomplete = service.clean_incomplete().await?;
    let collected = service.collect_garbage().await?;
    if incomplete + collected > 0 {
        tracing::info!(incomplete, collected, "removed leftovers of interrupted uploads");
    }
    let service = Arc::new(service);
    // Garbage collection again every hour: blobs too young to collect at
    // the start go at a later run, without a restart.
    let collector = Arc::clone(&service);
    tokio::spawn(async move {
        let mut every = tokio::time::interval(GARBAGE_EVERY);
        every.tick().await; // the first tick is at once: just done
        loop {
            every.tick().await;
            match collector.collect_garbage().await {
                Ok(0) => {}
                Ok(collected) => tracing::info!(collected, "removed abandoned uploads"),
                Err(e) => tracing::warn!(error = %e, "garbage collection failed; trying again in an hour"),
            }
        }
    });
    let mut app = api::router(Arc::clone(&service));
    if let Some(listen) = config.metrics.listen {
        let m = Arc::new(metrics::Metrics::new());
        app = app.layer(axum::middleware::from_fn_with_state(Arc::clone(&m), metrics::count));
        let svc = Arc::clone(&service);
        // The stored bytes are a sum over every file: asked at most every
        // 30 s, however often Prometheus scrapes.
        let last: Arc<parking_lot::Mutex<Option<(std::time::Instant, u64)>>> = Arc::default();
        let stored = move || -> futures_util::future::BoxFuture<'static, Option<u64>> {
            let (svc, last) = (Arc::clone(&svc), Arc::clone(&last));
            Box::pin(async move {
                let cached = *last.lock();
                if let Some((_, bytes)) =
                    cached.filter(|(at, _)| at.elapsed() < std::time::Duration::from_secs(30))
                {
                    return Some(bytes);
                }
                let bytes = svc.run_admin(|m| m.stored_bytes()).await.ok()?;
                *last.lock() = Some((std::time::Instant::now(), bytes));
                Some(bytes)
            })
        };
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(io_err(format!("listening for metrics on {listen}")))?;
        tracing::info!(%listen, "metrics at http://{listen}/metrics");
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, metrics::router(m, stored)).await {
                tracing::error!(error = %e, "the metrics listener stopped");
            }
        });
    }
    // systemd's watchdog (a unit with WatchdogSec=) is pinged while the
    // metadata store answers a query.
    let watched = Arc::clone(&service);
    tokio::spawn(crate::systemd::watchdog(move || {
        let service = Arc::clone(&watched);
        async move { service.run_admin(|m| m.setting("")).await.is_ok() }
    }));

    // Accepted connections get TCP_NODELAY. With Nagle's algorithm a response
    // written in more than one piece (a TLS record for the head, more for the
    // body) held its last small piece until the client acknowledged the
    // first, and the client delays that acknowledgement by up to 40 ms:
    // after a remount, 5 of 90 lookups, opens and first reads took 40-75 ms
    // instead of 1-10 here.
    let listener = std::net::TcpListener::bind(config.listen)
        .map_err(io_err(format!("listening on {}", config.listen)))?;
    let addr = listener.local_addr().map_err(io_err("reading the bound address"))?;
    let handle = axum_server::Handle::new();
    let stopper = handle.clone();
    let grace = std::time::Duration::from_secs(config.shutdown_grace_secs);
    tokio::spawn(async move {
        shutdown.await;
        tracing::info!(grace_secs = grace.as_secs(), "shutting down: finishing the requests in flight");
        crate::systemd::stopping("finishing the requests in flight");
        // Readiness fails from now on; no new connection is taken, idle
        // ones close, and requests in flight (an upload) get `grace` to end.
        service.drain();
        stopper.graceful_shutdown(Some(grace));
    });

    if config.plain_http {
        on_start(&Started { addr, scheme: "http", fingerprint: None });
        crate::systemd::ready(&format!("listening on http://{addr}"));
        axum_server::from_tcp(listener)
            .map_err(io_err("preparing the listener"))?
            .acceptor(NoDelayAcceptor::new())
            .handle(handle)
            .serve(app.into_make_service())
            .await
            .map_err(io_err("serving"))
    } else {
        let (cert, key) = match (&config.tls.cert, &config.tls.key) {
            (Some(c), Some(k)) => (c.clone(), k.clone()),
            _ => {
                if tls::ensure_self_signed(&config.data_dir, &config.tls.hostnames)? {
                    tracing::info!(
                        "created a self-signed certificate in {}",
                        config.data_dir.join("tls").display()
                    );
                }
                tls::self_signed_paths(&config.data_dir)
            }
        };
        let (tls_config, fingerprint) = tls::server_config(&cert, &key)?;
        on_start(&Started { addr, scheme: "https", fingerprint: Some(fingerprint.clone()) });
        crate::systemd::ready(&format!("listening on https://{addr}, certificate {fingerprint}"));
        let rustls = axum_server::tls_rustls::RustlsConfig::from_config(tls_config);
        let acceptor = axum_server::tls_rustls::RustlsAcceptor::new(rustls).acceptor(NoDelayAcceptor::new());
        axum_server::from_tcp(listener)
            .map_err(io_err("preparing the listener"))?
            .acceptor(acceptor)
            .handle(handle)
            .serve(app.into_make_service())
            .await
            .map_err(io_err("serving"))
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) {
        (Ok(mut int), Ok(mut term)) => {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        }
        _ => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::config::ServerConfig;

    /// Every accepted connection has TCP_NODELAY, over HTTPS and plain HTTP
    /// (see `serve`: without it, some responses waited 40 ms for an ACK).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn accepted_connections_send_without_waiting_for_acknowledgements() {
        for plain_http in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let config = ServerConfig {
                listen: ([127, 0, 0, 1], 0).into(),
                data_dir: dir.path().to_path_buf(),
                plain_http,
                ..Default::default()
            };
            let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
            let server = tokio::spawn(super::run_until(
                config,
                move |s| {
                    let _ = addr_tx.send(s.addr);
                },
                async move {
                    let _ = stop_rx.await;
                },
            ));
            let addr = addr_rx.await.expect("the server did not start");
            // No TLS handshake needed: the option is set as the connection is
            // accepted, just after accept() returns, so the socket can be seen
            // for a moment without it: wait until it is on (it never is
            // without the acceptor).
            let client = tokio::net::TcpStream::connect(addr).await.unwrap();
            let peer = client.local_addr().unwrap().port();
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut seen = None;
            while seen != Some(true) && Instant::now() < deadline {
                seen = accepted_nodelay(addr.port(), peer).or(seen);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let over = if plain_http { "HTTP" } else { "HTTPS" };
            assert!(seen.is_some(), "the server never accepted the connection over {over}");
            assert_eq!(seen, Some(true), "TCP_NODELAY is off on a connection accepted over {over}");
            drop(client);
            let _ = stop_tx.send(());
            server.await.unwrap().unwrap();
        }
    }

    /// TCP_NODELAY of this process's socket on local port `port` whose peer is
    /// on port `peer` (the server's end of a test connection), if it exists yet.
    #[allow(unsafe_code)]
    fn accepted_nodelay(port: u16, peer: u16) -> Option<bool> {
        fn port_of(fd: i32, peer: bool) -> Option<u16> {
            // SAFETY: `addr` is a zeroed sockaddr_storage and `len` its size, as
            // getsockname/getpeername require; a non-socket fd just fails.
            unsafe {
                let mut addr: libc::sockaddr_storage = std::mem::zeroed();
                let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
                let p = (&mut addr as *mut libc::sockaddr_storage).cast::<libc::sockaddr>();
                let rc = if peer {
                    libc::getpeername(fd, p, &mut len)
                } else {
                    libc::getsockname(fd, p, &mut len)
                };
                if rc != 0 || i32::from(addr.ss_family) != libc::AF_INET {
                    return None;
                }
                let v4 = &*(&addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>();
                Some(u16::from_be(v4.sin_port))
            }
        }
        for entry in std::fs::read_dir("/proc/self/fd").ok()? {
            let Some(fd) = entry.ok().and_then(|e| e.file_name().to_str()?.parse::<i32>().ok()) else {
                continue;
            };
            if port_of(fd, false) != Some(port) || port_of(fd, true) != Some(peer) {
                continue;
            }
            let mut on: libc::c_int = 0;
            let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: reads an int-sized option into `on`, whose size `len` gives.
            let rc = unsafe {
                libc::getsockopt(
                    fd,
                    libc::IPPROTO_TCP,
                    libc::TCP_NODELAY,
                    (&mut on as *mut libc::c_int).cast(),
                    &mut len,
                )
            };
            return (rc == 0).then_some(on != 0);
        }
        None
    }
}
