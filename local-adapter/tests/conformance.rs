//! The backend conformance kit (`runner_core::testkit`) against the local sandbox backend (needs
//! root, as CI runs): every check, every hook provided.

mod common;

use std::sync::Arc;
use std::time::Duration;

use local_adapter::LocalExecutor;
use runner_core::testkit::{Conformance, Ending, Subject, Unsupported};
use runner_core::{DestroyReason, ExecutorApi, RunnerId};

/// One local backend on a private data directory. Dropping it (also when a check fails) destroys
/// every runner on it and shuts it down, so no sandbox or cgroup outlives a check.
#[derive(Debug)]
struct Local {
    executor: Option<LocalExecutor>,
    dir: tempfile::TempDir,
}

impl Local {
    async fn start() -> Self {
        common::init_tracing();
        let dir = tempfile::tempdir().expect("tempdir");
        let executor = LocalExecutor::start(common::config(dir.path()))
            .await
            .expect("start the local backend");
        Self {
            executor: Some(executor),
            dir,
        }
    }

    fn executor(&self) -> &LocalExecutor {
        self.executor.as_ref().expect("a running instance")
    }
}

#[async_trait::async_trait]
impl Subject for Local {
    fn backend(&self) -> Arc<dyn ExecutorApi> {
        Arc::new(self.executor().clone())
    }

    async fn restart(&mut self, ending: Ending) -> Result<(), Unsupported> {
        if let Some(old) = self.executor.take() {
            match ending {
                Ending::Clean => old.shutdown().await,
                // A crash: the instance goes away without `shutdown`.
                Ending::Crash => drop(old),
            }
        }
        let executor = LocalExecutor::start(common::config(self.dir.path()))
            .await
            .expect("restart the local backend");
        self.executor = Some(executor);
        Ok(())
    }

    async fn stop_runner_externally(&mut self, runner: &RunnerId) -> Result<(), Unsupported> {
        // Killing the runner's init ends its whole pid namespace, as a crash of it would.
        let namespace = self
            .executor()
            .network_namespace(runner)
            .expect("the runner's init is alive");
        let pid: i32 = namespace
            .to_str()
            .and_then(|p| p.strip_prefix("/proc/"))
            .and_then(|p| p.split('/').next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no init pid in {}", namespace.display()));
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .expect("kill the runner's init");
        Ok(())
    }
}

impl Drop for Local {
    fn drop(&mut self) {
        let Some(executor) = self.executor.take() else {
            return;
        };
        let cleanup = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                for environment in executor.load_environments().await.unwrap_or_default() {
                    for record in executor
                        .load_runners(environment.id)
                        .await
                        .unwrap_or_default()
                    {
                        let _ = executor
                            .destroy_runner(&record.info.id, &DestroyReason::ApiRequest)
                            .await;
                    }
                }
                executor.shutdown().await;
            });
        });
        let _ = cleanup.join();
    }
}

fn conformance() -> Conformance {
    Conformance::new(common::spec(64), Local::start)
        .execution_within(Duration::from_secs(60))
        .require_every_hook()
}

runner_core::conformance_tests!(conformance());
