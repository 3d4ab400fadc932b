//! `nomad-emulator`: a stand-in Nomad agent whose allocations run as local sandboxes.
//!
//! `cargo run -p nomad-emulator -- --port 4646`, then point any Nomad client at
//! `http://127.0.0.1:4646` (e.g. `NOMAD_ADDR=http://127.0.0.1:4646 nomad job status`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use nomad_emulator::cli::{self, Args};
use nomad_emulator::runtime::AllocationRuntime;
use nomad_emulator::sandbox::{SandboxConfig, SandboxRuntime};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    // The sandbox fork server (allocations' inits come from it) is this binary re-executed: it
    // must branch off first.
    local_adapter::sandbox_main_if_requested();
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("nomad-emulator: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nomad-emulator: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    // Without `--data-dir` the sandboxes live in a directory of this process's own, so two
    // emulators never share one; with it, they survive a restart together with the state.
    let sandbox_dir = match &args.data_dir {
        Some(dir) => dir.join("sandboxes"),
        None => PathBuf::from(format!("/tmp/nomad-emulator-{}", std::process::id())),
    };
    std::fs::create_dir_all(&sandbox_dir)
        .with_context(|| format!("creating {}", sandbox_dir.display()))?;
    let mut config = SandboxConfig::new(&sandbox_dir);
    config.images = args.image_map();
    let sandboxes = SandboxRuntime::start(config)
        .await
        .context("starting the sandbox runtime")?;
    let served = cli::serve(args.clone(), Arc::new(sandboxes.clone())).await;
    if args.data_dir.is_none() {
        // Nothing can reattach to these sandboxes: remove them.
        for alloc in sandboxes.surviving().await {
            sandboxes.stop(&alloc).await;
        }
    }
    sandboxes.shutdown().await;
    if args.data_dir.is_none() {
        let _ = std::fs::remove_dir_all(&sandbox_dir);
    }
    served
}
