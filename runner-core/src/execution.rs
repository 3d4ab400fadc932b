//! Executions: what a client asks to run, and the events it receives back (design §2).
//!
//! Events travel through bounded channels end to end: a client that stops reading stops the
//! backend from reading the process's output, so memory stays flat.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::ids::ExecutionId;

/// How many events may wait between a producer and a consumer of an execution's output.
pub const EVENT_BUFFER: usize = 64;

/// How many stdin chunks may wait before the client's writes are slowed down.
pub const STDIN_BUFFER: usize = 16;

/// Linux's `MAX_ARG_STRLEN`: the longest single argument or environment entry `exec` takes,
/// counting its terminating NUL byte.
pub const MAX_ARG_BYTES: usize = 131_072;

/// The most bytes the command and all environment entries may take together (each counted
/// with its NUL), well below the 2 MiB `exec` usually allows so the backend's own arguments and
/// variables still fit.
pub const MAX_EXEC_BYTES: usize = 1 << 20;

/// The most environment variables an execution may set.
pub const MAX_VARIABLES: usize = 4096;

/// A command to run in a runner (`POST /runners/{id}/execute`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExecutionRequest {
    /// A shell command line, run with `bash -c`.
    pub command: String,
    /// Seconds after which the execution is killed and reported as `timeout`; 0 = no limit.
    #[serde(default)]
    pub time_limit: u64,
    /// Run as the sandbox's root instead of the unprivileged `user`.
    #[serde(default)]
    pub privileged_execution: bool,
    /// Extra environment variables, passed exactly as given.
    #[serde(default)]
    pub environment: BTreeMap<String, String>,
}

/// An execution request a backend cannot run safely.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidExecution {
    /// The command contains a NUL byte, which no `exec` can pass.
    #[error("command: must not contain NUL bytes")]
    NulInCommand,
    /// An environment variable name is empty or contains `=` or NUL.
    #[error("environment: invalid variable name {0:?}")]
    BadVariableName(String),
    /// An environment variable value contains NUL.
    #[error("environment: value of {0:?} must not contain NUL bytes")]
    NulInValue(String),
    /// The command is longer than one `exec` argument may be.
    #[error("command: must be at most {max} bytes long, is {len}", max = MAX_ARG_BYTES - 1)]
    CommandTooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// A `NAME=VALUE` entry is longer than one `exec` environment entry may be.
    #[error(
        "environment: {name}=VALUE must be at most {max} bytes long, is {len}",
        max = MAX_ARG_BYTES - 1
    )]
    VariableTooLong {
        /// The variable's name, cut to 64 bytes.
        name: String,
        /// The length of `NAME=VALUE` in bytes.
        len: usize,
    },
    /// More environment variables than [`MAX_VARIABLES`].
    #[error("environment: at most {MAX_VARIABLES} variables are allowed, got {0}")]
    TooManyVariables(usize),
    /// The command and the environment together exceed [`MAX_EXEC_BYTES`].
    #[error("command and environment: must be at most {MAX_EXEC_BYTES} bytes together, are {0}")]
    TooLarge(usize),
}

/// `text` cut to at most 64 bytes at a character boundary, so errors stay short.
fn shortened(text: &str) -> String {
    let mut end = text.len().min(64);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

impl ExecutionRequest {
    /// A request to run `command` unprivileged, without time limit or variables.
    pub fn new(command: impl Into<String>) -> Self {
        Self {
            command: command.into(),
            time_limit: 0,
            privileged_execution: false,
            environment: BTreeMap::new(),
        }
    }

    /// About how many bytes of memory the request holds while it is stored: its text plus a
    /// per-allocation overhead, so that many tiny variables are not counted as free.
    pub fn stored_size(&self) -> usize {
        const PER_ALLOCATION: usize = 64;
        let variables: usize = self
            .environment
            .iter()
            .map(|(name, value)| name.len() + value.len() + 2 * PER_ALLOCATION)
            .sum();
        self.command.len() + PER_ALLOCATION + variables
    }

    /// The time limit, if any.
    pub fn time_limit(&self) -> Option<Duration> {
        (self.time_limit > 0).then(|| Duration::from_secs(self.time_limit))
    }

    /// Checks that the request can be passed to `exec` unchanged: no NUL bytes, valid names,
    /// and within Linux's limits on one argument ([`MAX_ARG_BYTES`]) and this crate's bounds on
    /// the whole ([`MAX_VARIABLES`], [`MAX_EXEC_BYTES`]).
    pub fn validate(&self) -> Result<(), InvalidExecution> {
        if self.command.contains('\0') {
            return Err(InvalidExecution::NulInCommand);
        }
        let command_bytes = self.command.len() + 1;
        if command_bytes > MAX_ARG_BYTES {
            return Err(InvalidExecution::CommandTooLong {
                len: self.command.len(),
            });
        }
        if self.environment.len() > MAX_VARIABLES {
            return Err(InvalidExecution::TooManyVariables(self.environment.len()));
        }
        let mut total = command_bytes;
        for (name, value) in &self.environment {
            if name.is_empty() || name.contains('=') || name.contains('\0') {
                return Err(InvalidExecution::BadVariableName(shortened(name)));
            }
            if value.contains('\0') {
                return Err(InvalidExecution::NulInValue(shortened(name)));
            }
            // `NAME=VALUE` and its NUL.
            let entry_bytes = name.len() + value.len() + 2;
            if entry_bytes > MAX_ARG_BYTES {
                return Err(InvalidExecution::VariableTooLong {
                    name: shortened(name),
                    len: entry_bytes - 1,
                });
            }
            total += entry_bytes;
        }
        if total > MAX_EXEC_BYTES {
            return Err(InvalidExecution::TooLarge(total));
        }
        Ok(())
    }
}

/// A stored execution request taken by its id: the id is used up, the request not started yet.
///
/// Taking and starting are two steps so that a transport can answer an unknown id before it
/// commits to a stream, and report a failed start inside the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TakenExecution {
    /// The id it was stored under.
    pub id: ExecutionId,
    /// What to run.
    pub request: ExecutionRequest,
}

/// Why an execution ended with an `error` message; `Display` gives the exact text the client sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecutionFailure {
    /// The runner was killed for memory.
    OomKilled,
    /// The runner was deleted, or its environment updated or deleted.
    StoppedAsExpected,
    /// The output cap of this many bytes was reached.
    OutputLimitExceeded(u64),
    /// The runner's process table is full (its process limit was reached): a command could not
    /// be started, and the runner is replaced.
    ProcessLimitReached,
    /// Anything else.
    Failed,
}

impl fmt::Display for ExecutionFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::OomKilled => f.write_str("the allocation was OOM Killed"),
            Self::StoppedAsExpected => f.write_str("the allocation stopped as expected"),
            Self::OutputLimitExceeded(n) => write!(f, "the output limit of {n} bytes was exceeded"),
            Self::ProcessLimitReached => f.write_str(
                "the runner's process limit was reached (too many processes); the runner is replaced",
            ),
            Self::Failed => f.write_str("Error executing the request"),
        }
    }
}

/// One event of a running execution.
///
/// A stream carries any number of `Stdout`/`Stderr` events and then exactly one terminal event
/// (`Exit`, `Timeout` or `Error`), after which it ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecutionEvent {
    /// Bytes the command wrote to its terminal (stdout).
    Stdout(Bytes),
    /// Bytes the command wrote to stderr.
    Stderr(Bytes),
    /// The main process exited with this code.
    Exit(u8),
    /// The time limit or the runner's inactivity timeout ended the execution.
    Timeout,
    /// The execution ended abnormally.
    Error(ExecutionFailure),
}

impl ExecutionEvent {
    /// Whether this event ends the stream.
    pub fn is_terminal(&self) -> bool {
        !matches!(self, Self::Stdout(_) | Self::Stderr(_))
    }
}

/// A running execution as the client side sees it.
///
/// Dropping `events` (or the whole value) cancels the execution and kills its process tree.
#[derive(Debug)]
pub struct Execution {
    /// Bytes for the command's stdin; bounded, so a fast writer waits.
    pub stdin: mpsc::Sender<Bytes>,
    /// Output and the final event.
    pub events: mpsc::Receiver<ExecutionEvent>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_reads_api_json_with_defaults() {
        let r: ExecutionRequest = serde_json::from_str(r#"{"command":"true"}"#).unwrap();
        assert_eq!(r, ExecutionRequest::new("true"));
        assert_eq!(r.time_limit(), None);
        let r: ExecutionRequest = serde_json::from_str(
            r#"{"command":"env","timeLimit":3,"privilegedExecution":true,"environment":{"A":"b c"}}"#,
        )
        .unwrap();
        assert_eq!(r.time_limit(), Some(Duration::from_secs(3)));
        assert!(r.privileged_execution);
        assert_eq!(r.environment["A"], "b c");
    }

    #[test]
    fn validation_rejects_what_exec_cannot_pass() {
        assert!(ExecutionRequest::new("echo 'quoted'").validate().is_ok());
        assert_eq!(
            ExecutionRequest::new("a\0b").validate(),
            Err(InvalidExecution::NulInCommand)
        );
        let mut r = ExecutionRequest::new("env");
        r.environment.insert("A=B".into(), "x".into());
        assert!(matches!(
            r.validate(),
            Err(InvalidExecution::BadVariableName(_))
        ));
    }

    #[test]
    fn validation_keeps_exec_limits() {
        let longest = "x".repeat(MAX_ARG_BYTES - 1);
        assert!(ExecutionRequest::new(longest.clone()).validate().is_ok());
        assert_eq!(
            ExecutionRequest::new(format!("{longest}x")).validate(),
            Err(InvalidExecution::CommandTooLong { len: MAX_ARG_BYTES })
        );

        let mut r = ExecutionRequest::new("env");
        // `A=` plus the value fill one entry exactly.
        r.environment
            .insert("A".into(), "v".repeat(MAX_ARG_BYTES - 3));
        assert!(r.validate().is_ok());
        r.environment
            .insert("A".into(), "v".repeat(MAX_ARG_BYTES - 2));
        assert!(matches!(
            r.validate(),
            Err(InvalidExecution::VariableTooLong { len, .. }) if len == MAX_ARG_BYTES
        ));

        let mut r = ExecutionRequest::new("env");
        for i in 0..=MAX_VARIABLES {
            r.environment.insert(format!("V{i}"), String::new());
        }
        assert_eq!(
            r.validate(),
            Err(InvalidExecution::TooManyVariables(MAX_VARIABLES + 1))
        );

        let mut r = ExecutionRequest::new("env");
        for i in 0..10 {
            r.environment
                .insert(format!("V{i}"), "v".repeat(MAX_ARG_BYTES - 10));
        }
        assert!(matches!(r.validate(), Err(InvalidExecution::TooLarge(_))));
        assert!(
            InvalidExecution::TooLarge(1)
                .to_string()
                .starts_with("command and environment")
        );
    }
}
