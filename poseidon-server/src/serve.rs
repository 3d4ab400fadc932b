//! The server loop: plain HTTP or TLS (rustls) on a listener, Poseidon's timeouts
//! (`ReadHeaderTimeout` 15 s, `IdleTimeout` 60 s, request bodies within 15 s; no write timeout,
//! so long streams are never cut), TCP_NODELAY,
//! and graceful shutdown: stop accepting, let open execution streams end within a grace period,
//! then end the remaining ones with a close 1001.
//!
//! At most `max_connections` connections are open at a time ([`LimitedAcceptor`]): one over the
//! cap is closed as soon as it is accepted, so clients that open connections and never finish
//! a request cannot grow the server's memory without bound; the connections already open are
//! served as before.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum_server::Handle;
use axum_server::accept::{Accept, TcpConfigAcceptor, TcpSocketConfig};
use axum_server::tls_rustls::{RustlsAcceptor, RustlsConfig};
use futures::future::BoxFuture;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::state::Streams;

/// How long a new connection may take to send its first request's headers (Poseidon's
/// `ReadHeaderTimeout`).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(15);

/// How long a kept-alive connection may stay idle (Poseidon's `IdleTimeout`). hyper starts its
/// header-read timer when a connection becomes idle, so this one timer bounds both the idle time
/// and the headers of every later request on the connection.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Why serving failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The TLS certificate or key could not be loaded.
    #[error("cannot load TLS certificate {cert} or key {key}: {reason}")]
    Tls {
        /// Certificate file.
        cert: PathBuf,
        /// Key file.
        key: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The listener failed.
    #[error("server error: {0}")]
    Io(#[from] io::Error),
}

/// TLS certificate and key files (PEM).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// Certificate chain.
    pub cert: PathBuf,
    /// Private key.
    pub key: PathBuf,
}

/// Loads a rustls configuration accepting TLS 1.3 only (as Poseidon).
pub fn tls_config(files: &TlsFiles) -> Result<RustlsConfig, ServeError> {
    let fail = |reason: String| ServeError::Tls {
        cert: files.cert.clone(),
        key: files.key.clone(),
        reason,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| fail(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| fail(e.to_string()))?;
    if certs.is_empty() {
        return Err(fail("no certificate in the file".into()));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| fail(e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| fail(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| fail(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(RustlsConfig::from_config(Arc::new(config)))
}

/// The default of `server.maxconnections`: connections open at the same time.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;

/// Wraps an acceptor so that at most a fixed number of connections are open at a time.
///
/// Each accepted connection holds a permit for as long as its stream lives (an upgraded
/// WebSocket included); a connection accepted while none is free is closed at once, without
/// waiting, so the accept loop and the connections already served stay responsive.
#[derive(Debug, Clone)]
pub struct LimitedAcceptor<A> {
    inner: A,
    permits: Arc<Semaphore>,
}

impl<A> LimitedAcceptor<A> {
    /// At most `max_connections` connections through `inner` at a time (at least one).
    pub fn new(inner: A, max_connections: usize) -> Self {
        let permits = max_connections.clamp(1, Semaphore::MAX_PERMITS);
        Self {
            inner,
            permits: Arc::new(Semaphore::new(permits)),
        }
    }
}

impl<A, S> Accept<TcpStream, S> for LimitedAcceptor<A>
where
    A: Accept<TcpStream, S>,
    A::Future: Send + 'static,
    A::Stream: Send + 'static,
    A::Service: Send + 'static,
{
    type Stream = Limited<A::Stream>;
    type Service = A::Service;
    type Future = BoxFuture<'static, io::Result<(Self::Stream, Self::Service)>>;

    fn accept(&self, stream: TcpStream, service: S) -> Self::Future {
        let Ok(permit) = Arc::clone(&self.permits).try_acquire_owned() else {
            tracing::debug!(
                peer = ?stream.peer_addr().ok(),
                "connection limit reached: closing a new connection"
            );
            // Dropping the stream closes the connection.
            return Box::pin(std::future::ready(Err(io::Error::other(
                "connection limit reached",
            ))));
        };
        let accepted = self.inner.accept(stream, service);
        Box::pin(async move {
            let (stream, service) = accepted.await?;
            Ok((
                Limited {
                    stream,
                    _permit: permit,
                },
                service,
            ))
        })
    }
}

/// A connection's stream holding its [`LimitedAcceptor`] permit until it is dropped.
#[derive(Debug)]
pub struct Limited<T> {
    stream: T,
    _permit: OwnedSemaphorePermit,
}

impl<T: AsyncRead + Unpin> AsyncRead for Limited<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Limited<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

fn tcp_acceptor(max_connections: usize) -> LimitedAcceptor<TcpConfigAcceptor> {
    LimitedAcceptor::new(
        TcpConfigAcceptor::new(TcpSocketConfig::new().nodelay(true)),
        max_connections,
    )
}

/// Serves `app` on `listener` until `shutdown` resolves, then shuts down gracefully: no new
/// connections, `grace` for open requests and execution streams, then the rest are ended. At
/// most `max_connections` connections are open at a time.
pub async fn serve(
    listener: std::net::TcpListener,
    app: Router,
    tls: Option<RustlsConfig>,
    streams: Streams,
    grace: Duration,
    max_connections: usize,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let handle: Handle<SocketAddr> = Handle::new();
    let service = app.into_make_service_with_connect_info::<SocketAddr>();
    let server = match tls {
        None => {
            let mut server = axum_server::from_tcp(listener)?
                .acceptor(tcp_acceptor(max_connections))
                .handle(handle.clone())
                .first_request_timeout(HEADER_READ_TIMEOUT);
            server
                .http_builder()
                .http1()
                .header_read_timeout(IDLE_TIMEOUT);
            tokio::spawn(server.serve(service))
        }
        Some(config) => {
            let mut server = axum_server::from_tcp(listener)?
                .acceptor(RustlsAcceptor::new(config).acceptor(tcp_acceptor(max_connections)))
                .handle(handle.clone())
                .first_request_timeout(HEADER_READ_TIMEOUT);
            server
                .http_builder()
                .http1()
                .header_read_timeout(IDLE_TIMEOUT);
            tokio::spawn(server.serve(service))
        }
    };
    tracing::info!(address = %addr, "listening");

    let mut server = server;
    tokio::select! {
        result = &mut server => {
            return match result {
                Ok(r) => r.map_err(ServeError::Io),
                Err(e) => Err(ServeError::Io(io::Error::other(e))),
            };
        }
        () = shutdown => {}
    }

    tracing::info!(
        grace_seconds = grace.as_secs(),
        "shutting down: no new connections"
    );
    handle.graceful_shutdown(Some(grace));
    streams.tracker.close();
    if tokio::time::timeout(grace, streams.tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            open = streams.tracker.len(),
            "grace period over: ending open execution streams"
        );
        streams.cancel.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), streams.tracker.wait()).await;
    }
    match tokio::time::timeout(grace + Duration::from_secs(1), server).await {
        Ok(Ok(result)) => result.map_err(ServeError::Io),
        Ok(Err(e)) => Err(ServeError::Io(io::Error::other(e))),
        Err(_) => {
            tracing::warn!("connections still open after the grace period");
            Ok(())
        }
    }
}

/// SIGTERM and SIGINT, caught from the moment [`ShutdownSignals::install`] returns. Installed
/// before the server says it is ready: a signal that arrives between "ready" and the first wait
/// for it must stop the server gracefully, not kill it with the default action.
#[derive(Debug)]
pub struct ShutdownSignals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    /// Starts catching SIGTERM and SIGINT (needs a tokio runtime).
    pub fn install() -> io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
        })
    }

    /// Resolves on the first SIGTERM or SIGINT since [`ShutdownSignals::install`].
    pub async fn received(mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => tracing::info!("SIGINT received"),
            _ = self.terminate.recv() => tracing::info!("SIGTERM received"),
        }
    }
}
