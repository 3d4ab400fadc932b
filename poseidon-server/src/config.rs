//! Configuration (design §5): a YAML file overridden by `POSEIDON_<SECTION>_<KEY>` variables.
//!
//! Poseidon's keys keep their meaning (except `nomad.enabled`, which defaults to `false`); our
//! own keys use the same lower-case, underscore-free scheme so every key has a variable. Keys
//! this server does not use (`sentry.*`, `aws.*`, `profiling.*`, `server.interactivestderr`, …)
//! are accepted and listed by [`Config::ignored_keys`] so the binary can log them once. A key or
//! section present without a value (YAML null, e.g. a section holding only commented-out keys,
//! as in Poseidon's own example file) means its defaults. Every invalid value is reported with
//! its key.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::Serialized;
use runner_core::{ManagerConfig, SpecBounds};
use serde::{Deserialize, Serialize};

use crate::dto::ExecutionEnvironment;
use crate::state::ApiSettings;

/// A configuration that cannot be used; the message names the key.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

fn invalid(key: &str, problem: impl std::fmt::Display) -> ConfigError {
    ConfigError(format!("`{key}`: {problem}"))
}

/// A key present without a value (`images:`) means its default.
fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// `server.tls`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct TlsConfig {
    /// Serve HTTPS.
    pub active: bool,
    /// PEM certificate chain.
    pub certfile: String,
    /// PEM private key.
    pub keyfile: String,
    /// CA file (accepted for compatibility; used by clients of this server).
    pub cafile: String,
}

/// `server.alert`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct AlertConfig {
    /// `/health` answers 503 when an environment's idle/pool ratio is below this (0 = never).
    pub prewarmingpoolthreshold: f64,
    /// Seconds below the threshold before an environment's runners are reloaded (0 = never).
    pub prewarmingpoolreloadtimeout: u64,
}

/// `server`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct ServerConfig {
    /// Listen address.
    pub address: String,
    /// Listen port (0 picks a free one).
    pub port: u16,
    /// `Poseidon-Token`; empty disables authentication.
    pub token: String,
    /// HTTPS.
    pub tls: TlsConfig,
    /// Pool alerts.
    pub alert: AlertConfig,
    /// Largest request body in bytes (ours).
    pub bodylimit: u64,
    /// Seconds open execution streams may run on after SIGTERM (ours).
    pub shutdowngrace: u64,
    /// Most connections open at a time; one over it is closed at once (ours).
    pub maxconnections: u64,
    /// `local` (sandboxes on this machine) or `fake` (in-memory, runs nothing; for API tests) (ours).
    pub backend: String,
    /// Poseidon's keys that this server does not use, accepted for compatibility.
    #[serde(flatten)]
    pub ignored: BTreeMap<String, figment::value::Value>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            address: "127.0.0.1".into(),
            port: 7200,
            token: String::new(),
            tls: TlsConfig::default(),
            alert: AlertConfig::default(),
            bodylimit: 64 * 1024 * 1024,
            shutdowngrace: 15,
            maxconnections: crate::serve::DEFAULT_MAX_CONNECTIONS as u64,
            backend: "local".into(),
            ignored: BTreeMap::new(),
        }
    }
}

/// `nomad`: the Nomad backend, with Poseidon's keys (`enabled` defaults to `false` here, so the
/// embedded backend runs unless it is set).
pub type NomadConfig = nomad_adapter::NomadConfig;

/// `local`: the embedded backend.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct LocalConfig {
    /// Where the backend keeps its store and the runners' writable layers.
    pub datadir: PathBuf,
    /// Image name → root filesystem directory; an image not listed runs on the host's system
    /// directories (allow-list).
    #[serde(deserialize_with = "null_as_default")]
    pub images: BTreeMap<String, PathBuf>,
    /// Memory limit in MB of runners whose environment asks for `0`.
    pub defaultmemory: u32,
    /// Most processes (and threads) per runner.
    pub maxprocesses: u32,
    /// Size of a runner's private writable layer in MB (at most half the runner's memory).
    pub disklimit: u32,
    /// Size of a runner's `/dev/shm` in MB (at most a quarter of the runner's memory).
    pub shmlimit: u32,
    /// Open files per execution.
    pub maxopenfiles: u64,
    /// Largest file an execution may write, in MB.
    pub maxfilesize: u64,
    /// Runner networking (`networkAccess`, `exposedPorts`).
    pub network: NetworkSection,
    /// Run runners without memory, process and CPU limits when the machine has no usable
    /// cgroups (otherwise the server refuses to start there).
    pub allowunlimited: bool,
}

/// `local.network`: runner networking. The keys besides `enabled` are those of
/// [`local_network::NetworkConfig`]: `bridgesubnet`, `advertisedhost`, `bindaddress`,
/// `portrange`, `blockedranges`, `hostports`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct NetworkSection {
    /// Whether runners may get network access and exposed ports at all (default true).
    pub enabled: bool,
    /// The networking settings.
    #[serde(flatten)]
    pub settings: local_network::NetworkConfig,
}

impl Default for NetworkSection {
    fn default() -> Self {
        Self {
            enabled: true,
            settings: local_network::NetworkConfig::default(),
        }
    }
}

impl Default for LocalConfig {
    fn default() -> Self {
        let local = local_adapter::LocalConfig::default();
        Self {
            datadir: PathBuf::from("./poseidon-data"),
            images: BTreeMap::new(),
            defaultmemory: local.default_memory_mb,
            maxprocesses: local.max_processes,
            disklimit: local.disk_limit_mb,
            shmlimit: local.shm_limit_mb,
            maxopenfiles: local.max_open_files,
            maxfilesize: local.max_file_size_mb,
            network: NetworkSection::default(),
            allowunlimited: false,
        }
    }
}

impl LocalConfig {
    /// The local backend's configuration.
    pub fn backend_config(&self) -> local_adapter::LocalConfig {
        local_adapter::LocalConfig {
            data_dir: self.datadir.clone(),
            images: self.images.clone(),
            default_memory_mb: self.defaultmemory,
            max_processes: self.maxprocesses,
            disk_limit_mb: self.disklimit,
            shm_limit_mb: self.shmlimit,
            max_open_files: self.maxopenfiles,
            max_file_size_mb: self.maxfilesize,
            network: self.network.enabled.then(|| self.network.settings.clone()),
            allow_unlimited: self.allowunlimited,
            ..local_adapter::LocalConfig::default()
        }
    }
}

/// `limits`: bounds on what clients may ask for (ours).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct LimitsConfig {
    /// Largest `prewarmingPoolSize`.
    pub maxpoolsize: u32,
    /// Smallest `memoryLimit` in MB (0 always means the default).
    pub minmemory: u32,
    /// Largest `memoryLimit` in MB.
    pub maxmemory: u32,
    /// Largest `cpuLimit` in MHz.
    pub maxcpu: u32,
    /// Most runners (idle and used) over all environments.
    pub maxrunners: usize,
    /// Seconds an execution id stays valid if never connected.
    pub executionidexpiry: u64,
    /// Output bytes after which an execution is ended with an error (0 = no cap).
    pub outputlimit: u64,
    /// Most `delete` plus `copy` entries in one `PATCH /runners/{id}/files` request.
    pub maxfileentries: u64,
    /// Most bytes of execution requests stored per runner and not yet connected.
    pub maxpendingbytes: u64,
    /// Milliseconds a claim on an empty pool waits for a runner on its way (0 = fail at once).
    pub claimwait: u64,
    /// Seconds a runner the backend accepted may take to become ready before it is replaced.
    pub startuptimeout: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        let bounds = SpecBounds::default();
        let manager = ManagerConfig::default();
        Self {
            maxpoolsize: bounds.max_pool_size,
            minmemory: bounds.min_memory_mb,
            maxmemory: bounds.max_memory_mb,
            maxcpu: bounds.max_cpu_mhz,
            maxrunners: manager.max_runners,
            executionidexpiry: manager.execution_ttl.as_secs(),
            outputlimit: 0,
            maxfileentries: crate::file_update::DEFAULT_MAX_FILE_ENTRIES as u64,
            maxpendingbytes: manager.max_pending_bytes as u64,
            claimwait: u64::try_from(manager.claim_wait.as_millis()).unwrap_or(u64::MAX),
            startuptimeout: manager.startup_timeout.as_secs(),
        }
    }
}

/// `logger`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct LoggerConfig {
    /// `trace`, `debug`, `info`, `warn`, `error` (logrus names accepted, any case).
    pub level: String,
    /// `TextFormatter` or `JSONFormatter` (`text`/`json` accepted).
    pub formatter: String,
}

impl Default for LoggerConfig {
    fn default() -> Self {
        Self {
            level: "INFO".into(),
            formatter: "TextFormatter".into(),
        }
    }
}

/// `influxdb`: metrics export in line protocol (Poseidon's keys); an empty `url` disables it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct InfluxdbConfig {
    /// The InfluxDB v2 server, e.g. `http://influxdb:8086`; empty disables the export.
    pub url: String,
    /// API token (`Authorization: Token …`).
    pub token: String,
    /// Organization.
    pub organization: String,
    /// Bucket.
    pub bucket: String,
    /// The `stage` tag of every point (e.g. `production`).
    pub stage: String,
    /// Other keys, accepted for compatibility.
    #[serde(flatten)]
    pub other: BTreeMap<String, figment::value::Value>,
}

impl InfluxdbConfig {
    /// The writer's configuration, `None` when the export is disabled.
    pub fn writer_config(&self) -> Option<monitoring::InfluxConfig> {
        if self.url.is_empty() {
            return None;
        }
        let mut config = monitoring::InfluxConfig::new(
            self.url.clone(),
            self.token.clone(),
            self.organization.clone(),
            self.bucket.clone(),
        );
        config
            .default_tags
            .insert("stage".into(), self.stage.clone());
        Some(config)
    }
}

/// `sentry`: error and performance reporting (Poseidon's keys, sentry-go's `ClientOptions`);
/// an empty `dsn` disables it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct SentryConfig {
    /// Where events go, e.g. `https://key@sentry.example.org/1`; empty disables Sentry.
    pub dsn: String,
    /// The environment events are filed under (e.g. `production`).
    pub environment: String,
    /// The release events are filed under; also what `/version` answers.
    pub release: String,
    /// Share of request transactions sent to Sentry, in [0, 1].
    pub tracessamplerate: f64,
    /// Attach stack traces to events.
    pub attachstacktrace: bool,
    /// Sentry's own debug output on stderr.
    pub debug: bool,
    /// Other keys (`enabletracing`, `profilessamplerate`, …), accepted for compatibility.
    #[serde(flatten)]
    pub other: BTreeMap<String, figment::value::Value>,
}

impl Default for SentryConfig {
    fn default() -> Self {
        Self {
            dsn: String::new(),
            environment: String::new(),
            release: String::new(),
            tracessamplerate: 0.0,
            attachstacktrace: true,
            debug: false,
            other: BTreeMap::new(),
        }
    }
}

impl SentryConfig {
    /// The Sentry client's settings; `None` when no DSN is set.
    pub fn settings(&self) -> Option<crate::telemetry::SentrySettings> {
        if self.dsn.is_empty() {
            return None;
        }
        let non_empty = |s: &str| (!s.is_empty()).then(|| s.to_string());
        Some(crate::telemetry::SentrySettings {
            dsn: self.dsn.clone(),
            environment: non_empty(&self.environment),
            release: non_empty(&self.release),
            traces_sample_rate: self.tracessamplerate as f32,
            attach_stacktrace: self.attachstacktrace,
            debug: self.debug,
        })
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    /// HTTP server.
    pub server: ServerConfig,
    /// The Nomad backend.
    pub nomad: NomadConfig,
    /// Embedded backend.
    pub local: LocalConfig,
    /// Client bounds.
    pub limits: LimitsConfig,
    /// Logging.
    pub logger: LoggerConfig,
    /// InfluxDB metrics export.
    pub influxdb: InfluxdbConfig,
    /// Sentry (`sentry.release` also feeds `/version`).
    pub sentry: SentryConfig,
    /// Environments created at start-up when they do not exist yet.
    #[serde(deserialize_with = "null_as_default")]
    pub environments: Vec<ExecutionEnvironment>,
    /// Sections this server does not use (`aws`, `profiling`, …), accepted for compatibility.
    #[serde(flatten)]
    pub ignored: BTreeMap<String, figment::value::Value>,
}

/// Removes every mapping entry whose value is null, at any depth of nested mappings, so that a
/// key present without a value takes its default. Sequences are left as they are.
fn drop_null_entries(value: &mut serde_yaml::Value) {
    if let serde_yaml::Value::Mapping(map) = value {
        map.retain(|_, v| !v.is_null());
        for (_, v) in map.iter_mut() {
            drop_null_entries(v);
        }
    }
}

impl Config {
    /// Reads `file` (a missing file means defaults) and the `POSEIDON_*` variables of `env`.
    pub fn load(
        file: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if file.exists() {
            let text = std::fs::read_to_string(file)
                .map_err(|e| ConfigError(format!("cannot read {}: {e}", file.display())))?;
            // Parsed here rather than by figment's YAML provider so that null entries can be
            // dropped first: figment would let a null section replace its defaults.
            let mut yaml: serde_yaml::Value = serde_yaml::from_str(&text)
                .map_err(|e| ConfigError(format!("{}: {e}", file.display())))?;
            drop_null_entries(&mut yaml);
            if !yaml.is_null() {
                figment = figment.merge(Serialized::defaults(yaml));
            }
        }
        let vars: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("POSEIDON_"))
            .collect();
        for (key, value) in vars {
            let path = key["POSEIDON_".len()..].to_lowercase().replace('_', ".");
            figment = figment.merge(Serialized::default(&path, value));
        }
        // Lossy: variable values are text and become numbers or booleans where a key needs one
        // (`POSEIDON_SERVER_PORT=abc` still fails, naming the key).
        let config: Config = figment.extract_lossy().map_err(|e| {
            let key = e.path.join(".");
            let kind = e.kind.to_string();
            if key.is_empty() {
                ConfigError(kind)
            } else {
                invalid(&key, kind)
            }
        })?;
        config.validate()?;
        Ok(config)
    }

    /// The keys present in the configuration that this server does not use, as dotted paths
    /// (`aws`, `server.interactivestderr`, `sentry.profilessamplerate`, …), sorted.
    pub fn ignored_keys(&self) -> Vec<String> {
        let sections = [
            ("", &self.ignored),
            ("server.", &self.server.ignored),
            ("influxdb.", &self.influxdb.other),
            ("sentry.", &self.sentry.other),
        ];
        let mut keys: Vec<String> = sections
            .into_iter()
            .flat_map(|(prefix, map)| map.keys().map(move |k| format!("{prefix}{k}")))
            .collect();
        keys.sort();
        keys
    }

    /// Checks what types alone cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.nomad.enabled {
            if self.nomad.address.trim().is_empty() {
                return Err(invalid(
                    "nomad.address",
                    "required when nomad.enabled is true",
                ));
            }
            let tls = &self.nomad.tls;
            if tls.certfile.is_empty() != tls.keyfile.is_empty() {
                return Err(invalid(
                    "nomad.tls",
                    "certfile and keyfile must be given together (mTLS)",
                ));
            }
        }
        if self.server.address.parse::<IpAddr>().is_err() && self.server.address != "localhost" {
            return Err(invalid("server.address", "must be an IP address"));
        }
        if self.server.tls.active {
            if self.server.tls.certfile.is_empty() {
                return Err(invalid(
                    "server.tls.certfile",
                    "required when server.tls.active is true",
                ));
            }
            if self.server.tls.keyfile.is_empty() {
                return Err(invalid(
                    "server.tls.keyfile",
                    "required when server.tls.active is true",
                ));
            }
        }
        let threshold = self.server.alert.prewarmingpoolthreshold;
        if !(0.0..1.0).contains(&threshold) {
            return Err(invalid(
                "server.alert.prewarmingpoolthreshold",
                "must be in [0, 1)",
            ));
        }
        if self.server.bodylimit == 0 || usize::try_from(self.server.bodylimit).is_err() {
            return Err(invalid(
                "server.bodylimit",
                "must be a positive number of bytes",
            ));
        }
        if self.server.maxconnections == 0
            || usize::try_from(self.server.maxconnections)
                .map_or(true, |n| n > tokio::sync::Semaphore::MAX_PERMITS)
        {
            return Err(invalid(
                "server.maxconnections",
                "must be a positive number of connections",
            ));
        }
        if !matches!(self.server.backend.as_str(), "local" | "fake") {
            return Err(invalid("server.backend", "must be `local` or `fake`"));
        }
        if self.local.network.enabled
            && let Err(e) = self.local.network.settings.validate()
        {
            return Err(invalid("local.network", e.to_string()));
        }
        if self.local.datadir.as_os_str().is_empty() {
            return Err(invalid("local.datadir", "must not be empty"));
        }
        for (key, value) in [
            ("local.defaultmemory", u64::from(self.local.defaultmemory)),
            ("local.maxprocesses", u64::from(self.local.maxprocesses)),
            ("local.disklimit", u64::from(self.local.disklimit)),
            ("local.shmlimit", u64::from(self.local.shmlimit)),
            ("local.maxopenfiles", self.local.maxopenfiles),
            ("local.maxfilesize", self.local.maxfilesize),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be positive"));
            }
        }
        if self.limits.minmemory > self.limits.maxmemory {
            return Err(invalid(
                "limits.minmemory",
                "must not exceed limits.maxmemory",
            ));
        }
        if self.limits.maxrunners == 0 {
            return Err(invalid("limits.maxrunners", "must be positive"));
        }
        if self.limits.maxfileentries == 0 || usize::try_from(self.limits.maxfileentries).is_err() {
            return Err(invalid(
                "limits.maxfileentries",
                "must be a positive number",
            ));
        }
        if self.limits.maxpendingbytes == 0 || usize::try_from(self.limits.maxpendingbytes).is_err()
        {
            return Err(invalid(
                "limits.maxpendingbytes",
                "must be a positive number of bytes",
            ));
        }
        if self.limits.startuptimeout == 0 {
            return Err(invalid("limits.startuptimeout", "must be positive"));
        }
        if self.limits.claimwait > 60_000 {
            return Err(invalid(
                "limits.claimwait",
                "must be at most 60000 ms (clients wait for the answer)",
            ));
        }
        if self.limits.executionidexpiry == 0 {
            return Err(invalid("limits.executionidexpiry", "must be positive"));
        }
        if !self.influxdb.url.is_empty() {
            monitoring::write_url(
                &self.influxdb.url,
                &self.influxdb.organization,
                &self.influxdb.bucket,
            )
            .map_err(|e| invalid("influxdb.url", e))?;
        }
        if !self.sentry.dsn.is_empty() {
            self.sentry
                .dsn
                .parse::<sentry::types::Dsn>()
                .map_err(|e| invalid("sentry.dsn", e))?;
        }
        if !(0.0..=1.0).contains(&self.sentry.tracessamplerate) {
            return Err(invalid("sentry.tracessamplerate", "must be in [0, 1]"));
        }
        crate::telemetry::level_filter(&self.logger.level)
            .map_err(|e| invalid("logger.level", e))?;
        crate::telemetry::Format::parse(&self.logger.formatter)
            .map_err(|e| invalid("logger.formatter", e))?;
        for (i, env) in self.environments.iter().enumerate() {
            if runner_core::EnvironmentId::new(env.id).is_none() {
                return Err(invalid(&format!("environments[{i}].id"), "is out of range"));
            }
        }
        Ok(())
    }

    /// The socket address to listen on.
    pub fn listen_addr(&self) -> SocketAddr {
        let ip = if self.server.address == "localhost" {
            IpAddr::from([127, 0, 0, 1])
        } else {
            self.server
                .address
                .parse()
                .unwrap_or(IpAddr::from([127, 0, 0, 1]))
        };
        SocketAddr::new(ip, self.server.port)
    }

    /// The bounds on environment specifications.
    pub fn bounds(&self) -> SpecBounds {
        SpecBounds {
            max_pool_size: self.limits.maxpoolsize,
            min_memory_mb: self.limits.minmemory,
            max_memory_mb: self.limits.maxmemory,
            max_cpu_mhz: self.limits.maxcpu,
            ..SpecBounds::default()
        }
    }

    /// The manager's configuration.
    pub fn manager_config(&self) -> ManagerConfig {
        let reload = self.server.alert.prewarmingpoolreloadtimeout;
        ManagerConfig {
            bounds: self.bounds(),
            max_runners: self.limits.maxrunners,
            execution_ttl: Duration::from_secs(self.limits.executionidexpiry),
            max_pending_bytes: usize::try_from(self.limits.maxpendingbytes)
                .unwrap_or(runner_core::DEFAULT_MAX_PENDING_BYTES),
            output_limit: (self.limits.outputlimit > 0).then_some(self.limits.outputlimit),
            alert_threshold: self.server.alert.prewarmingpoolthreshold,
            alert_reload_delay: (reload > 0).then(|| Duration::from_secs(reload)),
            claim_wait: Duration::from_millis(self.limits.claimwait),
            startup_timeout: Duration::from_secs(self.limits.startuptimeout),
            ..ManagerConfig::default()
        }
    }

    /// What `/version` answers: `sentry.release`, else this crate's version.
    pub fn release(&self) -> String {
        if self.sentry.release.is_empty() {
            env!("CARGO_PKG_VERSION").to_string()
        } else {
            self.sentry.release.clone()
        }
    }

    /// `server.maxconnections` as a count (validated to fit).
    pub fn max_connections(&self) -> usize {
        usize::try_from(self.server.maxconnections).unwrap_or(crate::serve::DEFAULT_MAX_CONNECTIONS)
    }

    /// The HTTP layer's settings.
    pub fn api_settings(&self, bound: SocketAddr) -> ApiSettings {
        ApiSettings {
            token: (!self.server.token.is_empty()).then(|| self.server.token.clone()),
            tls: self.server.tls.active,
            release: self.release(),
            body_limit: usize::try_from(self.server.bodylimit).unwrap_or(usize::MAX),
            max_file_entries: usize::try_from(self.limits.maxfileentries).unwrap_or(usize::MAX),
            bounds: self.bounds(),
            fallback_host: bound.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn vars(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn defaults_without_file_match_poseidon() {
        let c = Config::load(Path::new("/nonexistent/configuration.yaml"), vars(&[]))
            .expect("defaults");
        assert_eq!(c.listen_addr().to_string(), "127.0.0.1:7200");
        assert!(!c.nomad.enabled);
        assert!(c.server.token.is_empty());
        assert_eq!(c.server.bodylimit, 64 * 1024 * 1024);
        assert_eq!(c.max_connections(), 4096);
    }

    #[test]
    fn environment_overrides_file() {
        let mut f = tempfile::NamedTempFile::new().expect("temp file");
        writeln!(
            f,
            "server:\n  port: 8000\n  token: filetoken\n  alert:\n    prewarmingpoolthreshold: 0.5\nlocal:\n  datadir: /tmp/x\nsentry:\n  dsn: ''\n  release: abc\ninfluxdb:\n  url: ''\naws:\n  enabled: false\n"
        )
        .expect("write");
        let c = Config::load(
            f.path(),
            vars(&[
                ("POSEIDON_SERVER_PORT", "9000"),
                ("POSEIDON_SERVER_TOKEN", "12345"),
                ("POSEIDON_LOCAL_DATADIR", "/tmp/y"),
                ("POSEIDON_LOG_FILE", "/tmp/log"),
                ("HOME", "/root"),
            ]),
        )
        .expect("valid");
        assert_eq!(c.server.port, 9000);
        assert_eq!(c.server.token, "12345");
        assert_eq!(c.local.datadir, PathBuf::from("/tmp/y"));
        assert!((c.server.alert.prewarmingpoolthreshold - 0.5).abs() < f64::EPSILON);
        assert_eq!(c.release(), "abc");
        assert!(c.influxdb.writer_config().is_none(), "empty url disables");
    }

    #[test]
    fn influxdb_section_is_typed_and_keeps_unknown_keys() {
        let mut f = tempfile::NamedTempFile::new().expect("temp file");
        writeln!(
            f,
            "influxdb:\n  url: http://influx:8086\n  token: t\n  organization: o\n  bucket: b\n  stage: prod\n  somethingelse: 1\n"
        )
        .expect("write");
        let c =
            Config::load(f.path(), vars(&[("POSEIDON_INFLUXDB_STAGE", "staging")])).expect("valid");
        let w = c.influxdb.writer_config().expect("enabled");
        assert_eq!(w.url, "http://influx:8086");
        assert_eq!(
            (w.token.as_str(), w.organization.as_str(), w.bucket.as_str()),
            ("t", "o", "b")
        );
        assert_eq!(
            w.default_tags.get("stage").map(String::as_str),
            Some("staging")
        );
        assert!(c.influxdb.other.contains_key("somethingelse"));
    }

    #[test]
    fn nomad_keys_are_poseidons_and_variables_override_them() {
        let mut f = tempfile::NamedTempFile::new().expect("temp file");
        writeln!(
            f,
            "nomad:\n  enabled: true\n  address: nomad.example\n  port: 4646\n  namespace: poseidon\n  disableforcepull: true\n  network:\n    mode: cni/secure-bridge\n  tls:\n    active: true\n    cafile: /ca.pem\n"
        )
        .expect("write");
        let c = Config::load(
            f.path(),
            vars(&[
                ("POSEIDON_NOMAD_PORT", "4747"),
                ("POSEIDON_NOMAD_TOKEN", "secret"),
            ]),
        )
        .expect("valid");
        let n = &c.nomad;
        assert!(c.nomad.enabled);
        assert_eq!(n.address, "nomad.example");
        assert_eq!(n.port, 4747);
        assert_eq!(n.token, "secret");
        assert_eq!(n.namespace, "poseidon");
        assert!(n.disableforcepull);
        assert_eq!(n.network.mode, "cni/secure-bridge");
        assert!(n.tls.active);
        assert_eq!(n.tls.cafile, "/ca.pem");
    }

    #[test]
    fn invalid_values_name_their_key() {
        let none = Path::new("/nonexistent.yaml");
        let msg = |v: &[(&str, &str)]| {
            Config::load(none, vars(v))
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        assert!(msg(&[("POSEIDON_SERVER_PORT", "abc")]).contains("server.port"));
        assert!(msg(&[("POSEIDON_SERVER_PORT", "70000")]).contains("server.port"));
        assert!(msg(&[("POSEIDON_NOMAD_PORT", "many")]).contains("nomad.port"));
        assert!(
            msg(&[
                ("POSEIDON_NOMAD_ENABLED", "true"),
                ("POSEIDON_NOMAD_TLS_CERTFILE", "/c.pem")
            ])
            .contains("nomad.tls")
        );
        assert!(msg(&[("POSEIDON_LOGGER_LEVEL", "loud")]).contains("logger.level"));
        assert!(msg(&[("POSEIDON_SERVER_TLS_ACTIVE", "true")]).contains("server.tls.certfile"));
        assert!(msg(&[("POSEIDON_SERVER_BODYLIMIT", "-1")]).contains("server.bodylimit"));
        assert!(msg(&[("POSEIDON_SERVER_MAXCONNECTIONS", "0")]).contains("server.maxconnections"));
        assert!(msg(&[("POSEIDON_INFLUXDB_URL", "influxdb:8086")]).contains("influxdb.url"));
        assert!(msg(&[("POSEIDON_INFLUXDB_URL", "ftp://influxdb")]).contains("influxdb.url"));
        assert!(msg(&[("POSEIDON_LIMITS_STARTUPTIMEOUT", "0")]).contains("limits.startuptimeout"));
        assert!(msg(&[("POSEIDON_LIMITS_CLAIMWAIT", "600000")]).contains("limits.claimwait"));
    }

    #[test]
    fn claim_wait_and_startup_timeout_reach_the_manager() {
        let none = Path::new("/nonexistent.yaml");
        let c = Config::load(
            none,
            vars(&[
                ("POSEIDON_LIMITS_CLAIMWAIT", "250"),
                ("POSEIDON_LIMITS_STARTUPTIMEOUT", "30"),
            ]),
        )
        .expect("valid");
        let m = c.manager_config();
        assert_eq!(m.claim_wait, Duration::from_millis(250));
        assert_eq!(m.startup_timeout, Duration::from_secs(30));
        let defaults = Config::load(none, vars(&[]))
            .expect("valid")
            .manager_config();
        assert_eq!(defaults.claim_wait, Duration::from_secs(2));
    }

    #[test]
    fn the_example_configuration_is_valid() {
        let example = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../configuration.example.yaml"
        ));
        let c = Config::load(example, vars(&[])).expect("example is valid");
        assert_eq!(c.listen_addr().to_string(), "127.0.0.1:7200");
        assert!((c.server.alert.prewarmingpoolthreshold - 0.5).abs() < f64::EPSILON);
    }

    #[test]
    fn null_sections_mean_defaults_and_poseidons_keys_are_ignored() {
        let file = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/poseidon-shaped-configuration.yaml"
        ));
        let c = Config::load(file, vars(&[])).expect("Poseidon's shape loads");
        assert!(c.influxdb.writer_config().is_none());
        assert!(c.sentry.settings().is_none());
        assert_eq!(c.release(), env!("CARGO_PKG_VERSION"));
        assert!(!c.server.tls.active);
        assert_eq!(c.server.alert.prewarmingpoolreloadtimeout, 300);
        let ignored = c.ignored_keys();
        for key in [
            "aws",
            "profiling",
            "server.interactivestderr",
            "server.systemdsocketactivation",
        ] {
            assert!(ignored.iter().any(|k| k == key), "{key} in {ignored:?}");
        }

        let mut f = tempfile::NamedTempFile::new().expect("temp file");
        writeln!(
            f,
            "server:\n  tls:\n  alert:\n  token:\nlocal:\n  network:\nlimits:\nlogger:\nenvironments:\nsentry:\n  release: r1\ninfluxdb:\nnomad:\n"
        )
        .expect("write");
        let c = Config::load(f.path(), vars(&[])).expect("null sections are defaults");
        assert_eq!(c.listen_addr().to_string(), "127.0.0.1:7200");
        assert_eq!(c.release(), "r1");
        assert!(c.local.backend_config().network.is_some());
        assert!(c.ignored_keys().is_empty(), "{:?}", c.ignored_keys());
    }

    #[test]
    fn malformed_yaml_is_an_error() {
        let mut f = tempfile::NamedTempFile::new().expect("temp file");
        writeln!(f, "server: [unclosed").expect("write");
        assert!(Config::load(f.path(), vars(&[])).is_err());
    }

    #[test]
    fn network_settings_come_from_file_and_environment() {
        let mut f = tempfile::NamedTempFile::new().expect("temp file");
        writeln!(
            f,
            "local:\n  network:\n    advertisedhost: runners.example.org\n    portrange: 40000-40100\n    bridgesubnet: 10.77.0.0/16\n"
        )
        .expect("write");
        let c = Config::load(
            f.path(),
            vars(&[("POSEIDON_LOCAL_NETWORK_ADVERTISEDHOST", "10.0.0.5")]),
        )
        .expect("valid");
        let net = c.local.backend_config().network.expect("networking on");
        assert_eq!(net.advertised_host, "10.0.0.5");
        assert_eq!(net.port_range, 40000..=40100);
        assert_eq!(net.bridge_subnet.to_string(), "10.77.0.0/16");

        let off = Config::load(
            Path::new("/nonexistent.yaml"),
            vars(&[("POSEIDON_LOCAL_NETWORK_ENABLED", "false")]),
        )
        .expect("valid");
        assert!(off.local.backend_config().network.is_none());

        let mut bad = tempfile::NamedTempFile::new().expect("temp file");
        writeln!(bad, "local:\n  network:\n    portrange: 50000-40000\n").expect("write");
        let err = Config::load(bad.path(), vars(&[])).expect_err("inverted range");
        assert!(err.to_string().contains("local.network"), "{err}");
    }

    #[test]
    fn sentry_keys_come_from_file_and_environment() {
        let mut f = tempfile::NamedTempFile::new().expect("temp file");
        writeln!(
            f,
            "sentry:\n  dsn: http://key@127.0.0.1:9/1\n  environment: staging\n  release: r7\n  profilessamplerate: 0.5\n"
        )
        .expect("write");
        let c = Config::load(
            f.path(),
            vars(&[("POSEIDON_SENTRY_TRACESSAMPLERATE", "0.25")]),
        )
        .expect("valid");
        let s = c.sentry.settings().expect("enabled");
        assert_eq!(s.dsn, "http://key@127.0.0.1:9/1");
        assert_eq!(s.environment.as_deref(), Some("staging"));
        assert_eq!(s.release.as_deref(), Some("r7"));
        assert!((s.traces_sample_rate - 0.25).abs() < f32::EPSILON);
        assert!(s.attach_stacktrace);
        assert_eq!(c.release(), "r7");
        assert_eq!(
            c.ignored_keys(),
            vec!["sentry.profilessamplerate".to_string()]
        );

        let none = Path::new("/nonexistent.yaml");
        let msg = |v: &[(&str, &str)]| {
            Config::load(none, vars(v))
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        assert!(msg(&[("POSEIDON_SENTRY_DSN", "not a dsn")]).contains("sentry.dsn"));
        assert!(
            msg(&[("POSEIDON_SENTRY_TRACESSAMPLERATE", "2")]).contains("sentry.tracessamplerate")
        );
    }
}
