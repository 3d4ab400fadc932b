//! The backend conformance kit (`runner_core::testkit`) against the Nomad adapter on the
//! nomad-emulator whose allocations run as local sandboxes (needs root, as CI runs): every
//! check, every hook provided.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::sandboxes::Sandboxes;
use nomad_adapter::{NomadConfig, NomadExecutor};
use nomad_emulator::{EmulatorConfig, NomadEmulator};
use runner_core::testkit::{Conformance, Ending, Subject, Unsupported};
use runner_core::{EnvironmentId, EnvironmentSpec, ExecutorApi, RunnerId};

#[ctor::ctor]
fn sandbox_hook() {
    local_adapter::sandbox_main_if_requested();
}

/// One emulated cluster (its state and sandboxes survive adapter restarts) and the adapter
/// instance running on it, with the adapter's data directory.
struct Nomad {
    emulator: Option<NomadEmulator>,
    executor: Option<NomadExecutor>,
    config: NomadConfig,
    sandboxes: Option<Sandboxes>,
    _data: tempfile::TempDir,
}

impl Nomad {
    async fn start() -> Self {
        common::init_tracing();
        let sandboxes = Sandboxes::start().await;
        let data = tempfile::tempdir().unwrap();
        let emulator = NomadEmulator::start(EmulatorConfig::for_tests(), sandboxes.runtime())
            .await
            .expect("the emulator");
        let config = NomadConfig {
            address: emulator.base_url(),
            datadir: data.path().to_path_buf(),
            unprivilegedprefix: "setpriv --reuid=1000 --regid=1000 --clear-groups --".into(),
            heartbeatseconds: 0.5,
            ..NomadConfig::default()
        };
        let executor = NomadExecutor::connect(config.clone())
            .await
            .expect("connect the adapter");
        Self {
            emulator: Some(emulator),
            executor: Some(executor),
            config,
            sandboxes: Some(sandboxes),
            _data: data,
        }
    }

    fn executor(&self) -> &NomadExecutor {
        self.executor.as_ref().expect("a running adapter")
    }
}

impl std::fmt::Debug for Nomad {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nomad")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

#[async_trait::async_trait]
impl Subject for Nomad {
    fn backend(&self) -> Arc<dyn ExecutorApi> {
        Arc::new(self.executor().clone())
    }

    async fn restart(&mut self, ending: Ending) -> Result<(), Unsupported> {
        if let Some(old) = self.executor.take() {
            match ending {
                Ending::Clean => old.shutdown().await.expect("a clean shutdown"),
                // A crash: the instance goes away without `shutdown`.
                Ending::Crash => drop(old),
            }
        }
        self.executor = Some(
            NomadExecutor::connect(self.config.clone())
                .await
                .expect("reconnect the adapter"),
        );
        Ok(())
    }

    async fn stop_runner_externally(&mut self, runner: &RunnerId) -> Result<(), Unsupported> {
        let emulator = self.emulator.as_ref().expect("a running emulator");
        let c = emulator.control();
        let alloc = c
            .allocs(runner.as_str())
            .iter()
            .max_by_key(|a| a["CreateIndex"].as_u64())
            .and_then(|a| a["ID"].as_str().map(str::to_string))
            .expect("the runner's allocation");
        // Its task dies; Nomad restarts it in place, which ends the runner.
        assert!(c.crash_task(&alloc, 1));
        Ok(())
    }
}

impl Drop for Nomad {
    fn drop(&mut self) {
        let executor = self.executor.take();
        let emulator = self.emulator.take();
        let cleanup = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                drop(executor);
                if let Some(emulator) = emulator {
                    emulator.shutdown().await;
                }
            });
        });
        let _ = cleanup.join();
        // Then every sandbox is stopped.
        drop(self.sandboxes.take());
    }
}

fn conformance() -> Conformance {
    let spec = EnvironmentSpec {
        id: EnvironmentId::new(64).expect("an id"),
        image: "conformance".into(),
        prewarming_pool_size: 1,
        cpu_limit: 100,
        memory_limit: 128,
        network_access: false,
        exposed_ports: vec![],
    };
    Conformance::new(spec, Nomad::start)
        .ready_within(Duration::from_secs(60))
        .execution_within(Duration::from_secs(60))
        .require_every_hook()
}

runner_core::conformance_tests!(conformance());
