//! A Nomad cluster for end-to-end tests: a `nomad-emulator` in this test process whose
//! allocations run as local sandboxes, and the variables that point a server at it.
//!
//! A test binary that starts one must run `local_adapter::sandbox_main_if_requested()` before
//! anything else (a `ctor` hook), and its tests must use the multi-threaded runtime.

use std::sync::Arc;
use std::time::{Duration, Instant};

use nomad_emulator::runtime::AllocationRuntime;
use nomad_emulator::sandbox::{SandboxConfig, SandboxRuntime};
use nomad_emulator::{EmulatorConfig, NomadEmulator};

/// The argv prefix that drops to the sandbox's `user` (Poseidon's images have `/sbin/setuser`;
/// the emulator's sandboxes have the host's `setpriv`).
pub const UNPRIVILEGED_PREFIX: &str = "setpriv --reuid=1000 --regid=1000 --clear-groups --";

pub struct Cluster {
    pub emulator: NomadEmulator,
    pub runtime: SandboxRuntime,
    dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts an emulator on 127.0.0.1:0 with short delays.
    pub async fn start() -> Self {
        // Under /tmp: unix socket paths of the sandboxes must stay short.
        let dir = tempfile::Builder::new()
            .prefix("emu")
            .tempdir_in("/tmp")
            .expect("temp dir");
        let runtime = SandboxRuntime::start(SandboxConfig::new(dir.path()))
            .await
            .expect("sandbox runtime");
        let config = EmulatorConfig {
            port: 0,
            ..EmulatorConfig::for_tests()
        };
        let emulator = NomadEmulator::start(config, Arc::new(runtime.clone()))
            .await
            .expect("emulator");
        Self {
            emulator,
            runtime,
            dir,
        }
    }

    /// `POSEIDON_NOMAD_*` variables that make a server use this cluster.
    pub fn server_vars(&self) -> Vec<(String, String)> {
        let address = self.emulator.address();
        [
            ("POSEIDON_NOMAD_ENABLED", "true".to_string()),
            ("POSEIDON_NOMAD_ADDRESS", address.ip().to_string()),
            ("POSEIDON_NOMAD_PORT", address.port().to_string()),
            // The emulator heartbeats every 200 ms; the adapter's watchdog waits twice this.
            ("POSEIDON_NOMAD_HEARTBEATSECONDS", "1".to_string()),
            (
                "POSEIDON_NOMAD_UNPRIVILEGEDPREFIX",
                UNPRIVILEGED_PREFIX.to_string(),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// Waits (bounded) for the cluster's allocations to stop, removes any sandbox left, and
    /// stops the emulator: called from a `Drop`, on the multi-threaded test runtime.
    pub fn stop_blocking(self) {
        let handle = tokio::runtime::Handle::current();
        tokio::task::block_in_place(move || {
            handle.block_on(async move {
                let deadline = Instant::now() + Duration::from_secs(10);
                while !self.runtime.surviving().await.is_empty() && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                self.emulator.shutdown().await;
                for alloc in self.runtime.surviving().await {
                    self.runtime.stop(&alloc).await;
                }
                self.runtime.shutdown().await;
                drop(self.dir);
            });
        });
    }
}
