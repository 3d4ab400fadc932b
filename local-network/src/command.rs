//! Running `ip` (iproute2) and `nft` (nftables): arguments are passed as separate `argv` entries
//! (never through a shell), scripts go to standard input, and a failure carries the command
//! line and the tool's own error message.

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt;

use crate::error::NetworkError;
use crate::netns;

/// A host tool and the Debian package that provides it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tool {
    binary: &'static str,
    package: &'static str,
}

/// iproute2's `ip`.
pub(crate) const IP: Tool = Tool {
    binary: "ip",
    package: "iproute2",
};
/// nftables' `nft`.
pub(crate) const NFT: Tool = Tool {
    binary: "nft",
    package: "nftables",
};

/// How long one run of a tool may take before it is killed and reported as failed: these
/// commands finish in milliseconds unless the kernel or a lock holds them up.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// Where tools are looked for besides `PATH` (a service's `PATH` may lack the sbin directories).
const SBIN: [&str; 2] = ["/usr/sbin", "/sbin"];

impl Tool {
    /// The tool's path, or [`NetworkError::ToolMissing`].
    fn locate(self) -> Result<PathBuf, NetworkError> {
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .chain(SBIN.iter().map(PathBuf::from))
            .map(|dir| dir.join(self.binary))
            .find(|candidate| candidate.is_file())
            .ok_or(NetworkError::ToolMissing {
                tool: self.binary,
                package: self.package,
            })
    }

    /// Checks that the tool is installed.
    pub(crate) fn check(self) -> Result<(), NetworkError> {
        self.locate().map(drop)
    }

    /// Runs the tool with `args`, feeding `stdin` if given, inside `netns` if given; returns
    /// its standard output.
    pub(crate) async fn run(
        self,
        args: &[&str],
        stdin: Option<&str>,
        netns: Option<&OwnedFd>,
    ) -> Result<String, NetworkError> {
        self.run_within(COMMAND_TIMEOUT, args, stdin, netns).await
    }

    /// [`Tool::run`], killing the tool after `limit`.
    async fn run_within(
        self,
        limit: Duration,
        args: &[&str],
        stdin: Option<&str>,
        netns: Option<&OwnedFd>,
    ) -> Result<String, NetworkError> {
        let describe = || format!("{} {}", self.binary, args.join(" "));
        let failed = |detail: String| NetworkError::Command {
            command: describe(),
            detail,
        };
        let mut command = tokio::process::Command::new(self.locate()?);
        command
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(netns) = netns {
            netns::run_inside(&mut command, netns);
        }
        let mut child = command
            .spawn()
            .map_err(|e| failed(format!("cannot start: {e}")))?;
        let script_pipe = child.stdin.take();
        // Dropping `child` when the time is up kills it (`kill_on_drop`).
        let finished = tokio::time::timeout(limit, async move {
            if let (Some(script), Some(mut pipe)) = (stdin, script_pipe) {
                pipe.write_all(script.as_bytes())
                    .await
                    .map_err(|e| format!("cannot write the script: {e}"))?;
            }
            child
                .wait_with_output()
                .await
                .map_err(|e| format!("cannot wait: {e}"))
        })
        .await;
        let output = match finished {
            Ok(output) => output.map_err(failed)?,
            Err(_) => {
                return Err(failed(format!(
                    "killed after {} ms without finishing",
                    limit.as_millis()
                )));
            }
        };
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        } else {
            let stderr = String::from_utf8_lossy(&output.stderr);
            Err(failed(format!("{}: {}", output.status, stderr.trim())))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_tool_that_hangs_is_killed_and_reported() {
        let sleep = Tool {
            binary: "sleep",
            package: "coreutils",
        };
        let started = std::time::Instant::now();
        let error = sleep
            .run_within(Duration::from_millis(200), &["30"], None, None)
            .await
            .expect_err("must time out");
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(error.to_string().contains("killed after 200 ms"), "{error}");
    }

    #[tokio::test]
    async fn a_tool_that_finishes_returns_its_output() {
        let echo = Tool {
            binary: "cat",
            package: "coreutils",
        };
        let out = echo
            .run_within(Duration::from_secs(10), &[], Some("script"), None)
            .await
            .expect("cat");
        assert_eq!(out, "script");
    }
}
