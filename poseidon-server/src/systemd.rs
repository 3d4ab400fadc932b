//! systemd integration without libsystemd: socket activation (`LISTEN_FDS`), `READY=1` once
//! listening, `STOPPING=1` on shutdown, and `WATCHDOG=1` pings at half the `WATCHDOG_USEC`
//! interval while the runtime is alive. All of it is a no-op unless systemd set the variables.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// The TCP listener systemd passed to this process (socket activation: the first descriptor of
/// `LISTEN_FDS`, if `LISTEN_PID` names this process), or `None` when not socket-activated. The
/// listener is made close-on-exec, so no process this server starts inherits it.
pub fn activated_listener() -> std::io::Result<Option<std::net::TcpListener>> {
    let mut passed = listenfd::ListenFd::from_env();
    if passed.len() == 0 {
        return Ok(None);
    }
    let listener = passed.take_tcp_listener(0)?;
    if let Some(listener) = &listener {
        rustix::io::fcntl_setfd(listener, rustix::io::FdFlags::CLOEXEC)?;
    }
    Ok(listener)
}

/// Sends `state` (e.g. `READY=1`) to systemd; returns whether it was sent.
pub fn notify(state: &str) -> bool {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return false;
    };
    let Ok(socket) = UnixDatagram::unbound() else {
        return false;
    };
    let bytes = path.as_bytes();
    let sent = match bytes.strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name)
            .and_then(|addr| socket.send_to_addr(state.as_bytes(), &addr)),
        None => socket.send_to(state.as_bytes(), &path),
    };
    if let Err(e) = &sent {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
    sent.is_ok()
}

/// Half the watchdog interval systemd asks for, if any.
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

/// Pings the watchdog forever (spawn it); returns at once without a watchdog.
pub async fn watchdog() {
    let Some(interval) = watchdog_interval() else {
        return;
    };
    let mut ticks = tokio::time::interval(interval);
    loop {
        ticks.tick().await;
        notify("WATCHDOG=1");
    }
}
