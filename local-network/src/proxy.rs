//! Exposed ports: a user-space TCP proxy from a host port to `127.0.0.1:<port>` inside a runner.
//!
//! It needs no route into the runner (it works with and without network access): each accepted
//! connection gets a socket created inside the runner's network namespace, connected to the
//! runner's loopback, and bytes are copied both ways. Cancelling the runner's token stops the
//! listener (freeing the host port) and every connection.
//!
//! Open connections are bounded per exposed port and per runner: a connection beyond either
//! bound is closed at once, so a flood of connections costs the host a bounded number of tasks
//! and descriptors. Sockets inside the runner come from its one [`SocketFactory`] thread.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use runner_core::RunnerId;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::netns::SocketFactory;

/// How long connecting to the program inside the runner may take (its accept queue may be full).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed `accept` (e.g. out of file descriptors), so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// What every exposed port of one runner shares: its namespace's socket factory and its bound
/// on open connections.
#[derive(Debug, Clone)]
pub(crate) struct RunnerProxy {
    pub(crate) runner: RunnerId,
    pub(crate) sockets: SocketFactory,
    pub(crate) connections: Arc<Semaphore>,
    pub(crate) cancel: CancellationToken,
}

/// Serves `listener` (forwarding to `port` inside the runner) until the runner's token fires,
/// with at most `per_port` open connections; the returned task owns the listener, so the host
/// port is free once the task has ended.
pub(crate) fn spawn(
    proxy: RunnerProxy,
    listener: TcpListener,
    port: u16,
    per_port: usize,
) -> JoinHandle<()> {
    let port_connections = Arc::new(Semaphore::new(per_port));
    tokio::spawn(async move {
        let RunnerProxy {
            runner,
            sockets,
            connections,
            cancel,
        } = proxy;
        loop {
            let accepted = tokio::select! {
                () = cancel.cancelled() => break,
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok((client, peer)) => {
                    let permits = Arc::clone(&port_connections)
                        .try_acquire_owned()
                        .and_then(|p| Ok((p, Arc::clone(&connections).try_acquire_owned()?)));
                    let Ok(permits) = permits else {
                        debug!(runner_id = %runner, %peer, port, "too many open connections; closing this one");
                        drop(client);
                        continue;
                    };
                    debug!(runner_id = %runner, %peer, port, "forwarding a connection");
                    tokio::spawn(forward(
                        runner.clone(),
                        client,
                        sockets.clone(),
                        port,
                        cancel.clone(),
                        permits,
                    ));
                }
                Err(error) => {
                    warn!(runner_id = %runner, port, %error, "cannot accept a connection");
                    tokio::select! {
                        () = cancel.cancelled() => break,
                        () = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                    }
                }
            }
        }
    })
}

async fn forward(
    runner: RunnerId,
    mut client: TcpStream,
    sockets: SocketFactory,
    port: u16,
    cancel: CancellationToken,
    _permits: (OwnedSemaphorePermit, OwnedSemaphorePermit),
) {
    let work = async {
        let socket = sockets.tcp_socket().await?;
        let target = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let mut upstream = tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(target))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        tokio::io::copy_bidirectional(&mut client, &mut upstream).await
    };
    tokio::select! {
        () = cancel.cancelled() => {}
        result = work => match result {
            Ok((sent, received)) => {
                debug!(runner_id = %runner, port, sent, received, "connection closed");
            }
            // Usually nothing listens on the port (yet): the client sees its connection closed.
            Err(error) => debug!(runner_id = %runner, port, %error, "connection failed"),
        },
    }
}
