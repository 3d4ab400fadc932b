//! What can go wrong while setting up runner networking.

use std::path::PathBuf;

use runner_core::RunnerId;

/// An error of [`crate::HostNetwork`]; the message reads as a sentence for logs and API errors.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// A configuration value (or the instance tag) is unusable; the message names it.
    #[error("invalid network configuration: {0}")]
    InvalidConfig(String),
    /// A tool this crate needs is not installed (`ip` from iproute2, `nft` from nftables).
    #[error("`{tool}` is not installed or not executable (install the Debian package `{package}`)")]
    ToolMissing {
        /// The binary.
        tool: &'static str,
        /// The Debian package that provides it.
        package: &'static str,
    },
    /// A command to configure the host failed.
    #[error("`{command}` failed: {detail}")]
    Command {
        /// The command line (arguments joined by spaces, for the log only).
        command: String,
        /// Exit status and standard error, or why it could not run.
        detail: String,
    },
    /// Another interface of this machine already uses addresses of the bridge subnet.
    #[error("the bridge subnet {subnet} overlaps {existing} on interface {interface}")]
    SubnetInUse {
        /// The configured subnet.
        subnet: String,
        /// The conflicting address.
        existing: String,
        /// The interface that has it.
        interface: String,
    },
    /// The runner's network namespace cannot be opened (the runner is gone, or the path is wrong).
    #[error("cannot open the network namespace {path}: {source}")]
    Namespace {
        /// The path given to `attach`.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The runner is attached already; detach it first.
    #[error("runner {0} is attached already")]
    AlreadyAttached(RunnerId),
    /// No free address is left in the bridge subnet.
    #[error("no free address left in the bridge subnet")]
    AddressesExhausted,
    /// No free host port is left in the configured range.
    #[error("no free host port left in the exposed-port range")]
    PortsExhausted,
    /// The network was torn down; nothing can be attached any more.
    #[error("the host network of this instance was torn down")]
    TornDown,
    /// A system call or file access failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        source: std::io::Error,
    },
}

impl NetworkError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}
