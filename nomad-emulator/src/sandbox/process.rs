//! A process spawned in an allocation's sandbox, as an exec session sees it.

use async_trait::async_trait;
use local_adapter::{ProcessControl, SpawnExit, SpawnedProcess};

use crate::exec::{ExecIo, ExecProcess};

struct Control(ProcessControl);

#[async_trait]
impl ExecProcess for Control {
    fn resize(&self, rows: u16, cols: u16) {
        // Without a terminal a size means nothing, as in Nomad.
        let _ = self.0.resize(rows, cols);
    }

    fn kill(&self) {
        self.0.kill();
    }

    async fn wait(&self) -> Option<i32> {
        match self.0.wait().await {
            SpawnExit::Exited(code) => Some(i32::from(code)),
            // Killed by the session, or the sandbox went away: the session decides.
            SpawnExit::Killed | SpawnExit::ProcessLimit | SpawnExit::RunnerGone(_) => None,
        }
    }
}

/// The session's view of `process`.
pub(super) fn exec_io(process: SpawnedProcess) -> ExecIo {
    ExecIo {
        stdin: Box::new(process.stdin),
        stdout: Box::new(process.stdout),
        stderr: process
            .stderr
            .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
        control: Box::new(Control(process.control)),
    }
}
