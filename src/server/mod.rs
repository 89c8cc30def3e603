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
pub mod blob;
pub mod config;
pub mod meta;
pub mod s3;
pub mod service;
pub mod tls;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use self::blob::{BlobStore, LocalBlobStore};
use self::config::{ServerConfig, StorageBackend};
use self::meta::Meta;
use self::service::{Service, ServiceConfig};

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
    let mut meta = open_meta(&config.data_dir)?;
    admin::record_defaults(
        &mut meta,
        admin::NewUserDefaults { limits: config.default_limits.into(), login_kdf: config.login_kdf.into() },
    )
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
    meta: Meta,
    blobs: B,
    on_start: impl FnOnce(&Started),
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let service = Service::new(
        meta,
        blobs,
        ServiceConfig { session_ttl_secs: config.session_ttl_secs, login_kdf: config.login_kdf.into() },
    )?;
    let (incomplete, orphans) = service.collect_garbage().await?;
    if incomplete + orphans > 0 {
        tracing::info!(incomplete, orphans, "removed leftovers of interrupted uploads");
    }
    let app = api::router(Arc::new(service));

    let listener = std::net::TcpListener::bind(config.listen)
        .map_err(io_err(format!("listening on {}", config.listen)))?;
    let addr = listener.local_addr().map_err(io_err("reading the bound address"))?;
    let handle = axum_server::Handle::new();
    let stopper = handle.clone();
    tokio::spawn(async move {
        shutdown.await;
        tracing::info!("shutting down");
        stopper.graceful_shutdown(Some(std::time::Duration::from_secs(10)));
    });

    if config.plain_http {
        on_start(&Started { addr, scheme: "http", fingerprint: None });
        axum_server::from_tcp(listener)
            .map_err(io_err("preparing the listener"))?
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
        on_start(&Started { addr, scheme: "https", fingerprint: Some(fingerprint) });
        let rustls = axum_server::tls_rustls::RustlsConfig::from_config(tls_config);
        axum_server::tls_rustls::from_tcp_rustls(listener, rustls)
            .map_err(io_err("preparing the listener"))?
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
