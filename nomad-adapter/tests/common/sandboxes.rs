//! The emulator's local-sandbox runtime on a private directory, cleaned up on drop (every
//! allocation's sandbox is stopped), so no sandbox outlives a test.

use std::sync::Arc;

use nomad_emulator::runtime::AllocationRuntime;
use nomad_emulator::sandbox::{SandboxConfig, SandboxRuntime};

pub struct Sandboxes {
    runtime: SandboxRuntime,
    _dir: tempfile::TempDir,
}

impl Sandboxes {
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config = SandboxConfig::new(dir.path());
        config.local.default_memory_mb = 256;
        config.local.max_processes = 128;
        config.local.disk_limit_mb = 64;
        config.local.network = None;
        let runtime = SandboxRuntime::start(config)
            .await
            .expect("the sandbox runtime");
        Self { runtime, _dir: dir }
    }

    pub fn runtime(&self) -> Arc<dyn AllocationRuntime> {
        Arc::new(self.runtime.clone())
    }
}

impl Drop for Sandboxes {
    fn drop(&mut self) {
        let runtime = self.runtime.clone();
        let cleanup = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                for alloc in runtime.surviving().await {
                    runtime.stop(&alloc).await;
                }
                runtime.shutdown().await;
            });
        });
        let _ = cleanup.join();
    }
}
