//! The Nomad backend's configuration, spelled as Poseidon's `nomad:` YAML section (lower-case
//! keys), plus the keys of our own (data directory, unprivileged prefix, stream watchdog).

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Configuration of [`crate::NomadExecutor`] (`nomad.*`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct NomadConfig {
    /// Whether the Nomad backend is used (`nomad.enabled`).
    pub enabled: bool,
    /// Host (or `http(s)://host`) of a Nomad agent or server (`nomad.address`).
    pub address: String,
    /// Its HTTP port (`nomad.port`).
    pub port: u16,
    /// ACL token sent as `X-Nomad-Token` (`nomad.token`); empty means none.
    pub token: String,
    /// TLS towards Nomad (`nomad.tls`).
    pub tls: TlsConfig,
    /// The namespace every job lives in (`nomad.namespace`).
    pub namespace: String,
    /// Networking of runners that have `networkAccess` (`nomad.network`).
    pub network: NetworkConfig,
    /// Leave `force_pull` off on every job (`nomad.disableforcepull`).
    pub disableforcepull: bool,
    /// Where the clean-shutdown marker lives (`nomad.datadir`); ours, not Poseidon's.
    pub datadir: PathBuf,
    /// The argv prefix that runs a command as the unprivileged user inside a runner
    /// (`nomad.unprivilegedprefix`, split on whitespace). Poseidon's images ship `/sbin/setuser`.
    pub unprivilegedprefix: String,
    /// Nomad's event-stream heartbeat interval in seconds (`nomad.heartbeatseconds`); the stream
    /// is reconnected when nothing, heartbeats included, arrived for twice this long.
    pub heartbeatseconds: f64,
    /// How long a registration waits for its evaluation on the event stream before reading it
    /// directly, in seconds (`nomad.registertimeoutseconds`).
    pub registertimeoutseconds: f64,
    /// The directory relative file paths are resolved against inside a runner, which must be
    /// the image's working directory (`nomad.workdir`); Poseidon's images use `/workspace`.
    pub workdir: String,
}

impl Default for NomadConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            address: "127.0.0.1".into(),
            port: 4646,
            token: String::new(),
            tls: TlsConfig::default(),
            namespace: "default".into(),
            network: NetworkConfig::default(),
            disableforcepull: false,
            datadir: PathBuf::from("./data/nomad"),
            unprivilegedprefix: "/sbin/setuser user".into(),
            heartbeatseconds: 30.0,
            registertimeoutseconds: 10.0,
            workdir: "/workspace".into(),
        }
    }
}

/// `nomad.tls`: HTTPS towards Nomad, optionally with a client certificate (mTLS).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct TlsConfig {
    /// Use HTTPS and WSS.
    pub active: bool,
    /// PEM file of the CA that signed Nomad's certificate; empty trusts the public roots.
    pub cafile: String,
    /// PEM client certificate for mTLS; empty means none.
    pub certfile: String,
    /// PEM key of `certfile`.
    pub keyfile: String,
}

/// `nomad.network`: the group network of runners with network access (Nomad's
/// `NetworkResource`, as Poseidon's config carries it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct NetworkConfig {
    /// The group network `mode` (`bridge` by default, as Poseidon).
    pub mode: String,
    /// `Device`, if set.
    pub device: String,
    /// `CIDR`, if set.
    pub cidr: String,
    /// `IP`, if set.
    pub ip: String,
    /// `Hostname`, if set.
    pub hostname: String,
    /// `MBits`, if set.
    pub mbits: Option<u32>,
    /// `DNS`, if set.
    pub dns: Option<DnsConfig>,
}

/// `nomad.network.dns`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DnsConfig {
    /// Name servers.
    pub servers: Vec<String>,
    /// Search domains.
    pub searches: Vec<String>,
    /// resolv.conf options.
    pub options: Vec<String>,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            mode: "bridge".into(),
            device: String::new(),
            cidr: String::new(),
            ip: String::new(),
            hostname: String::new(),
            mbits: None,
            dns: None,
        }
    }
}

impl NetworkConfig {
    /// The group network object (without ports), Nomad's field names.
    pub fn to_nomad(&self) -> serde_json::Value {
        let mut n = serde_json::json!({ "Mode": self.mode });
        for (key, value) in [
            ("Device", &self.device),
            ("CIDR", &self.cidr),
            ("IP", &self.ip),
            ("Hostname", &self.hostname),
        ] {
            if !value.is_empty() {
                n[key] = serde_json::json!(value);
            }
        }
        if let Some(mbits) = self.mbits {
            n["MBits"] = serde_json::json!(mbits);
        }
        if let Some(dns) = &self.dns {
            n["DNS"] = serde_json::json!({
                "Servers": dns.servers, "Searches": dns.searches, "Options": dns.options
            });
        }
        n
    }
}

impl NomadConfig {
    /// The base URL of the HTTP API, e.g. `http://127.0.0.1:4646`.
    pub fn base_url(&self) -> String {
        let address = self.address.trim_end_matches('/');
        if address.starts_with("http://") || address.starts_with("https://") {
            // An address that already names a port keeps it.
            let after_scheme = address.split_once("://").map_or(address, |(_, rest)| rest);
            if after_scheme.contains(':') {
                return address.to_string();
            }
            return format!("{address}:{}", self.port);
        }
        let scheme = if self.tls.active { "https" } else { "http" };
        format!("{scheme}://{address}:{}", self.port)
    }

    /// The unprivileged prefix as argv words.
    pub fn unprivileged_prefix(&self) -> Vec<String> {
        self.unprivilegedprefix
            .split_whitespace()
            .map(str::to_string)
            .collect()
    }

    /// The heartbeat watchdog: twice the heartbeat interval (at least 100 ms).
    pub fn watchdog(&self) -> Duration {
        secs(self.heartbeatseconds * 2.0).max(Duration::from_millis(100))
    }

    /// How long a registration waits for its evaluation on the stream.
    pub fn register_timeout(&self) -> Duration {
        secs(self.registertimeoutseconds)
    }
}

fn secs(value: f64) -> Duration {
    if value.is_finite() && value > 0.0 {
        Duration::try_from_secs_f64(value).unwrap_or(Duration::MAX)
    } else {
        Duration::ZERO
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poseidon_yaml_keys_deserialize() {
        let c: NomadConfig = serde_json::from_value(serde_json::json!({
            "enabled": true, "address": "nomad.example", "port": 4647, "token": "t",
            "tls": {"active": true, "cafile": "ca.pem", "certfile": "c.pem", "keyfile": "k.pem"},
            "namespace": "poseidon", "network": {"mode": "cni/secure-bridge"},
            "disableforcepull": true
        }))
        .unwrap();
        assert!(c.enabled && c.tls.active && c.disableforcepull);
        assert_eq!(c.base_url(), "https://nomad.example:4647");
        assert_eq!(c.network.mode, "cni/secure-bridge");
        assert_eq!(c.namespace, "poseidon");
        assert_eq!(c.unprivileged_prefix(), ["/sbin/setuser", "user"]);
        let c: NomadConfig = serde_json::from_value(serde_json::json!({
            "network": {"mode": "bridge", "cidr": "10.0.0.0/8", "dns": {"servers": ["1.1.1.1"]}}
        }))
        .unwrap();
        let n = c.network.to_nomad();
        assert_eq!(n["CIDR"], "10.0.0.0/8");
        assert_eq!(n["DNS"]["Servers"][0], "1.1.1.1");
        assert!(n.get("Device").is_none());
    }

    #[test]
    fn unknown_keys_are_ignored_and_urls_keep_explicit_ports() {
        // Poseidon's configuration files carry keys of other versions: accepted, as by the
        // server's other sections.
        let c: NomadConfig =
            serde_json::from_value(serde_json::json!({"address": "x", "future": 1})).unwrap();
        assert_eq!(c.address, "x");
        let c = NomadConfig {
            address: "http://127.0.0.1:1234".into(),
            ..NomadConfig::default()
        };
        assert_eq!(c.base_url(), "http://127.0.0.1:1234");
        assert_eq!(NomadConfig::default().base_url(), "http://127.0.0.1:4646");
        assert_eq!(NomadConfig::default().watchdog(), Duration::from_secs(60));
    }
}
