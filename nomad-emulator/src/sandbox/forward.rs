//! A TCP forwarder from the port the scheduler placed on the node to the task's port.

use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tracing::debug;

/// Most connections one forwarder carries at once; more wait to be accepted.
const MAX_CONNECTIONS: usize = 256;

/// Accepts on `host_ip:host_port` and relays every connection to the task's mapped address.
/// Dropping it stops accepting and ends the relayed connections.
#[derive(Debug)]
pub(super) struct Forwarder {
    task: JoinHandle<()>,
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Forwarder {
    /// Binds the listener (an error when the address is taken) and starts relaying.
    pub(super) async fn start(
        host_ip: &str,
        host_port: u16,
        target: String,
    ) -> std::io::Result<Forwarder> {
        let ip: std::net::IpAddr = host_ip
            .parse()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let listener = TcpListener::bind((ip, host_port)).await?;
        let task = tokio::spawn(async move {
            let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
            let mut relays = tokio::task::JoinSet::new();
            loop {
                let Ok(permit) = slots.clone().acquire_owned().await else {
                    return;
                };
                let mut inbound = match listener.accept().await {
                    Ok((inbound, _)) => inbound,
                    Err(_) => {
                        // E.g. out of descriptors: try again in a moment, not in a busy loop.
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let target = target.clone();
                relays.spawn(async move {
                    let _permit = permit;
                    match TcpStream::connect(&target).await {
                        Ok(mut outbound) => {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                        Err(e) => debug!(%target, error = %e, "the task's port does not answer"),
                    }
                });
                while relays.try_join_next().is_some() {}
            }
        });
        Ok(Forwarder { task })
    }
}
