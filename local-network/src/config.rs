//! What an operator can configure about runner networking, with the defaults and why.
//!
//! The server reads this from its `local.network` section; keys are lower case without separators,
//! like Poseidon's (`bridgesubnet`, `advertisedhost`, `bindaddress`, `portrange`, `blockedranges`,
//! `hostports`).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::ops::RangeInclusive;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::NetworkError;

/// An IPv4 network in CIDR notation (`10.213.0.0/16`); the address is always the network address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ipv4Net {
    network: Ipv4Addr,
    prefix: u8,
}

impl Ipv4Net {
    /// The network of `addr` with `prefix` bits (host bits are cleared), or an error when
    /// `prefix` is above 32.
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Result<Self, NetworkError> {
        if prefix > 32 {
            return Err(NetworkError::InvalidConfig(format!(
                "prefix length {prefix} of {addr} is above 32"
            )));
        }
        Ok(Self {
            network: Ipv4Addr::from(u32::from(addr) & mask(prefix)),
            prefix,
        })
    }

    /// The network address.
    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// The last address of the network (its broadcast address when the prefix is below 31).
    pub fn last(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) | !mask(self.prefix))
    }

    /// Whether `addr` lies in this network.
    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        u32::from(addr) & mask(self.prefix) == u32::from(self.network)
    }

    /// Whether the two networks share at least one address.
    pub fn overlaps(&self, other: &Ipv4Net) -> bool {
        self.contains(other.network) || other.contains(self.network)
    }
}

fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl FromStr for Ipv4Net {
    type Err = NetworkError;

    /// Parses `a.b.c.d/n`; a bare address means `/32`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || NetworkError::InvalidConfig(format!("`{s}` is not an IPv4 network"));
        let (addr, prefix) = match s.split_once('/') {
            Some((addr, prefix)) => (addr, prefix.parse::<u8>().map_err(|_| invalid())?),
            None => (s, 32),
        };
        Self::new(addr.parse().map_err(|_| invalid())?, prefix)
    }
}

impl Serialize for Ipv4Net {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Ipv4Net {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// How runners reach the network and how their exposed ports are published.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct NetworkConfig {
    /// The subnet of this instance's bridge (`bridgesubnet`, default `10.213.0.0/16`). The first
    /// host address is the bridge's own (the runners' gateway); every runner with network access
    /// gets one further address, so a `/16` serves 65 532 runners. Must not overlap any network
    /// already configured on the machine, nor another instance's subnet; prefix at most 30.
    #[serde(rename = "bridgesubnet")]
    pub bridge_subnet: Ipv4Net,
    /// The host part of every `hostAddress` returned to clients (`advertisedhost`, default
    /// `127.0.0.1`, matching the default `bind_address`). Set it to the name or address under
    /// which clients reach this machine when `bind_address` is not loopback.
    #[serde(rename = "advertisedhost")]
    pub advertised_host: String,
    /// Where the host-port listeners of exposed ports bind (`bindaddress`, default `127.0.0.1`).
    /// Loopback by default, like `server.address`: publishing learners' programs on the machine's
    /// outside interfaces is an operator's decision (set `0.0.0.0` and `advertisedhost` together).
    #[serde(rename = "bindaddress")]
    pub bind_address: IpAddr,
    /// Host ports handed out for exposed ports (`portrange`, `"20000-31999"` by default, Nomad's
    /// dynamic port range: it stays clear of Linux's ephemeral range 32768–60999, so outgoing
    /// connections of the host never hold a port a runner needs).
    #[serde(rename = "portrange", with = "port_range_text")]
    pub port_range: RangeInclusive<u16>,
    /// Destinations runners with network access may never reach (`blockedranges`). The default
    /// blocks what is never a legitimate target of an exercise and is dangerous to expose: `0.0.0.0/8`
    /// ("this network"), `100.64.0.0/10` (carrier-grade NAT, where some clouds put metadata
    /// services), `169.254.0.0/16` (link-local, including the cloud metadata address
    /// 169.254.169.254), `224.0.0.0/4` (multicast) and `240.0.0.0/4` (reserved and broadcast).
    /// Private ranges (`10.0.0.0/8`, `172.16.0.0/12`, `192.168.0.0/16`) are reachable unless
    /// listed here, since a site's package mirror often lives in one; list them to isolate runners
    /// from the site's internal network. The host's own addresses are always blocked (see
    /// `host_ports`), whatever this list says.
    #[serde(rename = "blockedranges")]
    pub blocked_ranges: Vec<Ipv4Net>,
    /// TCP and UDP ports on the bridge's host-side address that runners may reach (`hostports`,
    /// default none): a way to offer a service of the host (e.g. a caching package proxy that
    /// listens on the bridge address) to runners. Everything else of the host is unreachable from
    /// runners: its loopback addresses, its other addresses, the server's port and the host
    /// ports of exposed ports (so runners cannot reach each other through the proxy either).
    #[serde(rename = "hostports")]
    pub host_ports: Vec<u16>,
    /// Open connections one exposed port forwards at a time (`maxconnectionsperport`, default
    /// 256); a connection beyond it is closed at once.
    #[serde(rename = "maxconnectionsperport")]
    pub max_connections_per_port: usize,
    /// Open connections all exposed ports of one runner forward at a time
    /// (`maxconnectionsperrunner`, default 1024); a connection beyond it is closed at once.
    #[serde(rename = "maxconnectionsperrunner")]
    pub max_connections_per_runner: usize,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        let net = |a, b, c, d, prefix| Ipv4Net {
            network: Ipv4Addr::new(a, b, c, d),
            prefix,
        };
        Self {
            bridge_subnet: net(10, 213, 0, 0, 16),
            advertised_host: "127.0.0.1".into(),
            bind_address: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port_range: 20000..=31999,
            blocked_ranges: vec![
                net(0, 0, 0, 0, 8),
                net(100, 64, 0, 0, 10),
                net(169, 254, 0, 0, 16),
                net(224, 0, 0, 0, 4),
                net(240, 0, 0, 0, 4),
            ],
            host_ports: Vec::new(),
            max_connections_per_port: 256,
            max_connections_per_runner: 1024,
        }
    }
}

impl NetworkConfig {
    /// Checks the values against each other; [`crate::HostNetwork::start`] calls it.
    pub fn validate(&self) -> Result<(), NetworkError> {
        let invalid = |key: &str, problem: String| {
            Err(NetworkError::InvalidConfig(format!("`{key}`: {problem}")))
        };
        if self.bridge_subnet.prefix() > 30 {
            return invalid(
                "bridgesubnet",
                format!(
                    "{} leaves no address for runners (the prefix must be at most 30)",
                    self.bridge_subnet
                ),
            );
        }
        if self.port_range.is_empty() || *self.port_range.start() == 0 {
            return invalid(
                "portrange",
                format!(
                    "{}-{} is empty or includes port 0",
                    self.port_range.start(),
                    self.port_range.end()
                ),
            );
        }
        if self.advertised_host.trim().is_empty() {
            return invalid("advertisedhost", "must not be empty".into());
        }
        if let Some(port) = self
            .host_ports
            .iter()
            .find(|port| self.port_range.contains(port) || **port == 0)
        {
            return invalid(
                "hostports",
                format!("port {port} is 0 or inside the exposed-port range"),
            );
        }
        for (key, value) in [
            ("maxconnectionsperport", self.max_connections_per_port),
            ("maxconnectionsperrunner", self.max_connections_per_runner),
        ] {
            if !(1..=65_536).contains(&value) {
                return invalid(key, format!("{value} is not between 1 and 65536"));
            }
        }
        Ok(())
    }

    /// The bridge's own address, the runners' gateway: the subnet's first host address.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.bridge_subnet.network()) + 1)
    }
}

mod port_range_text {
    use std::ops::RangeInclusive;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(
        range: &RangeInclusive<u16>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&format_args!("{}-{}", range.start(), range.end()))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<RangeInclusive<u16>, D::Error> {
        let text = String::deserialize(deserializer)?;
        let parse = |s: &str| s.trim().parse::<u16>().ok();
        text.split_once('-')
            .and_then(|(start, end)| Some(parse(start)?..=parse(end)?))
            .ok_or_else(|| {
                serde::de::Error::custom(format!("`{text}` is not a port range like 20000-31999"))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_is_valid() {
        let config = NetworkConfig::default();
        config.validate().expect("default is valid");
        assert_eq!(config.bridge_subnet.to_string(), "10.213.0.0/16");
        assert_eq!(config.gateway(), Ipv4Addr::new(10, 213, 0, 1));
        assert!(
            config
                .blocked_ranges
                .iter()
                .any(|r| r.contains(Ipv4Addr::new(169, 254, 169, 254)))
        );
    }

    #[test]
    fn networks_parse_normalise_and_overlap() {
        let net: Ipv4Net = "10.213.7.9/16".parse().expect("valid");
        assert_eq!(net.to_string(), "10.213.0.0/16");
        assert_eq!(net.last(), Ipv4Addr::new(10, 213, 255, 255));
        assert!(net.overlaps(&"10.0.0.0/8".parse().expect("valid")));
        assert!(!net.overlaps(&"10.214.0.0/16".parse().expect("valid")));
        assert!("10.0.0.0/33".parse::<Ipv4Net>().is_err());
        assert!("nonsense".parse::<Ipv4Net>().is_err());
        assert_eq!(
            "1.2.3.4".parse::<Ipv4Net>().expect("valid").to_string(),
            "1.2.3.4/32"
        );
    }

    #[test]
    fn validation_rejects_inconsistent_values() {
        let mut config = NetworkConfig {
            bridge_subnet: "10.0.0.0/31".parse().expect("valid"),
            ..NetworkConfig::default()
        };
        assert!(config.validate().is_err());
        config.bridge_subnet = "10.9.0.0/24".parse().expect("valid");
        config.port_range = 0..=10;
        assert!(config.validate().is_err(), "port 0 in the range");
        config = NetworkConfig {
            host_ports: vec![20001],
            ..NetworkConfig::default()
        };
        assert!(config.validate().is_err(), "host port in the exposed range");
    }

    #[test]
    fn config_round_trips_through_serde_with_poseidon_style_keys() {
        let json = serde_json::json!({
            "bridgesubnet": "10.9.0.0/24",
            "portrange": "30000-30010",
            "blockedranges": ["169.254.0.0/16", "10.0.0.0/8"],
        });
        let config: NetworkConfig = serde_json::from_value(json).expect("valid config");
        assert_eq!(config.port_range, 30000..=30010);
        assert_eq!(config.blocked_ranges.len(), 2);
        assert_eq!(config.advertised_host, "127.0.0.1");
        let back = serde_json::to_value(&config).expect("serialisable");
        assert_eq!(back["portrange"], "30000-30010");
    }
}
