//! `poseidon-server`: parse arguments, load the configuration, build the backend and the
//! manager, recover, and serve until SIGTERM/SIGINT.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use local_adapter::LocalExecutor;
use nomad_adapter::NomadExecutor;
use poseidon_server::config::Config;
use poseidon_server::metrics::Metrics;
use poseidon_server::observe::{InstrumentedExecutor, ServerObserver, StoreObserver};
use poseidon_server::serve::{self, TlsFiles};
use poseidon_server::{AppState, app, metrics, systemd, telemetry};
use runner_core::{EnvironmentId, EnvironmentSpec, ExecutorApi, Manager, RunnerManager};

/// mimalloc rather than glibc's malloc: glibc keeps freed memory in its per-thread arenas, so
/// after a burst of large requests the server stayed hundreds of megabytes above its baseline
/// (issue 9 item 2); mimalloc returns freed pages to the system within milliseconds.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// How often runner counts are written to InfluxDB (Poseidon: idle runners every minute).
const STATISTICS_INTERVAL: Duration = Duration::from_secs(60);

/// A code-execution runner manager with Poseidon's HTTP API v1.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// The YAML configuration file (a missing file means defaults; POSEIDON_* variables override it).
    #[arg(long, default_value = "./configuration.yaml")]
    config: PathBuf,
}

fn main() -> ExitCode {
    // The sandbox fork server (runners' inits come from it) is this binary re-executed: it
    // must branch off before anything else.
    local_adapter::sandbox_main_if_requested();
    let args = Args::parse();
    let config = match Config::load(&args.config, std::env::vars()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("poseidon-server: {e}");
            return ExitCode::from(2);
        }
    };
    let sentry = config.sentry.settings();
    let _telemetry = telemetry::init_with(
        &config.logger.level,
        &config.logger.formatter,
        sentry.as_ref(),
    );
    let ignored = config.ignored_keys();
    if !ignored.is_empty() {
        tracing::info!(
            keys = %ignored.join(", "),
            "configuration keys not used by this server are ignored"
        );
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("poseidon-server: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("poseidon-server: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Connects to Nomad, retrying with capped exponential backoff while it cannot be reached (the
/// server serves only once its runners are recovered); a configuration Nomad cannot work with
/// fails at once.
async fn connect_nomad(settings: &nomad_adapter::NomadConfig) -> anyhow::Result<NomadExecutor> {
    let stop = stop_requested();
    tokio::pin!(stop);
    let mut delay = Duration::from_millis(500);
    loop {
        let attempt = tokio::select! {
            attempt = NomadExecutor::connect(settings.clone()) => attempt,
            () = &mut stop => anyhow::bail!("stopped while waiting for Nomad"),
        };
        match attempt {
            Ok(executor) => return Ok(executor),
            Err(e @ nomad_adapter::NomadError::Unreachable(_)) => {
                tracing::warn!(error = %e, retry_in = ?delay, address = %settings.base_url(), "Nomad is not reachable yet");
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = &mut stop => anyhow::bail!("stopped while waiting for Nomad"),
                }
                delay = (delay * 2).min(Duration::from_secs(30));
            }
            Err(e) => return Err(e).context("connecting to Nomad"),
        }
    }
}

/// Resolves on SIGTERM or SIGINT (before the server's own shutdown handling is installed). The
/// handlers are installed when the future is created, so a signal arriving before it is first
/// polled is not lost.
fn stop_requested() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => std::future::pending().await,
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    // Taken before anything starts child processes.
    let activated =
        systemd::activated_listener().context("taking the socket-activated listener")?;
    let mut local = None;
    let mut nomad = None;
    let backend: Arc<dyn ExecutorApi> = match config.server.backend.as_str() {
        _ if config.nomad.enabled => {
            let executor = connect_nomad(&config.nomad).await?;
            nomad = Some(executor.clone());
            Arc::new(executor)
        }
        "fake" => {
            tracing::warn!("using the in-memory fake backend: executions run nothing real");
            Arc::new(runner_core::fake::FakeExecutor::new())
        }
        _ => {
            let executor = LocalExecutor::start(config.local.backend_config())
                .await
                .with_context(|| {
                    format!(
                        "starting the local backend in {}",
                        config.local.datadir.display()
                    )
                })?;
            local = Some(executor.clone());
            Arc::new(executor)
        }
    };
    let influx = match config.influxdb.writer_config() {
        Some(writer) => {
            Some(monitoring::InfluxWriter::start(writer).context("starting the InfluxDB writer")?)
        }
        None => None,
    };
    // Metrics exist before the manager: its observer and the instrumented backend record into
    // the registry `/metrics` renders.
    let metrics = Arc::new(Metrics::new());
    if let Some(local) = &local {
        local.observe_store_writes(Arc::new(StoreObserver::new(metrics.clone())));
    }
    let backend_name = backend_label(&config);
    let backend: Arc<dyn ExecutorApi> = Arc::new(InstrumentedExecutor::new(
        backend,
        metrics.clone(),
        backend_name,
    ));
    let observer = ServerObserver::new(metrics.clone(), backend_name, influx.clone());
    let manager =
        RunnerManager::with_observer(backend, config.manager_config(), Arc::new(observer));
    let report = manager
        .recover()
        .await
        .context("recovering runners from the backend")?;
    tracing::info!(?report, "recovered");
    for declared in &config.environments {
        let id = EnvironmentId::new(declared.id).context("declared environment id")?;
        if manager.environment(id).is_none() {
            let spec = EnvironmentSpec {
                id,
                image: declared.image.clone(),
                prewarming_pool_size: declared.prewarming_pool_size,
                cpu_limit: declared.cpu_limit,
                memory_limit: declared.memory_limit,
                network_access: declared.network_access,
                exposed_ports: declared.exposed_ports.clone(),
            };
            manager
                .put_environment(spec)
                .await
                .with_context(|| format!("creating declared environment {id}"))?;
        }
    }

    let listener = match activated {
        Some(listener) => {
            tracing::info!("socket-activated: serving on the listener systemd passed");
            listener
        }
        None => std::net::TcpListener::bind(config.listen_addr())
            .with_context(|| format!("binding {}", config.listen_addr()))?,
    };
    let bound = listener.local_addr()?;
    let tls = if config.server.tls.active {
        Some(serve::tls_config(&TlsFiles {
            cert: config.server.tls.certfile.clone().into(),
            key: config.server.tls.keyfile.clone().into(),
        })?)
    } else {
        None
    };
    let state = AppState::with_metrics(
        manager.clone(),
        config.api_settings(bound),
        influx.clone(),
        metrics,
    );
    for (id, stats) in manager.statistics() {
        state.write_point(metrics::pool_size_point(id, stats.prewarming_pool_size));
    }
    let statistics = tokio::spawn(metrics::report_statistics(
        state.clone(),
        STATISTICS_INTERVAL,
    ));
    let streams = state.streams.clone();
    let grace = Duration::from_secs(config.server.shutdowngrace);
    let signals = serve::ShutdownSignals::install().context("catching SIGTERM and SIGINT")?;
    let watchdog = tokio::spawn(systemd::watchdog());
    systemd::notify("READY=1");
    let shutdown = async {
        signals.received().await;
        systemd::notify("STOPPING=1");
    };
    let served = serve::serve(
        listener,
        app(state),
        tls,
        streams,
        grace,
        config.max_connections(),
        shutdown,
    )
    .await;
    watchdog.abort();
    statistics.abort();
    if let Some(influx) = &influx {
        influx.shutdown().await;
    }
    served?;
    manager.shutdown().await;
    if let Some(local) = local {
        local.shutdown().await;
    }
    if let Some(nomad) = nomad
        && let Err(e) = nomad.shutdown().await
    {
        tracing::warn!(error = %e, "recording the clean shutdown for the Nomad backend failed");
    }
    tracing::info!("stopped; runners stay for the next start");
    Ok(())
}

/// The `backend` label of backend metrics.
fn backend_label(config: &Config) -> &'static str {
    match config.server.backend.as_str() {
        _ if config.nomad.enabled => "nomad",
        "fake" => "fake",
        _ => "local",
    }
}
