//! Exposed ports: a user-space TCP proxy from a host port to `127.0.0.1:<port>` inside a runner.
//!
//! It needs no route into the runner (it works with and without network access): each accepted
//! connection gets a socket created inside the runner's network namespace, connected to the
//! runner's loopback, and bytes are copied both ways. Cancelling the runner's token stops the
//! listener (freeing the host port) and every connection.

use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use runner_core::RunnerId;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::netns;

/// How long connecting to the program inside the runner may take (its accept queue may be full).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed `accept` (e.g. out of file descriptors), so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Serves `listener` until `cancel` fires; the returned task owns the listener, so the host
/// port is free once the task has ended.
pub(crate) fn spawn(
    runner: RunnerId,
    listener: TcpListener,
    netns: Arc<OwnedFd>,
    port: u16,
    cancel: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                () = cancel.cancelled() => break,
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok((client, peer)) => {
                    debug!(runner_id = %runner, %peer, port, "forwarding a connection");
                    tokio::spawn(forward(
                        runner.clone(),
                        client,
                        Arc::clone(&netns),
                        port,
                        cancel.clone(),
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
    netns: Arc<OwnedFd>,
    port: u16,
    cancel: CancellationToken,
) {
    let work = async {
        let socket = netns::tcp_socket_in(netns).await?;
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
