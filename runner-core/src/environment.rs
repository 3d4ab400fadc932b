//! Execution environments: what a runner of an environment looks like, and the bounds a
//! specification must respect before any backend sees it.

use serde::{Deserialize, Deserializer, Serialize};

use crate::ids::EnvironmentId;

/// An execution environment as the API shows it (`ExecutionEnvironment` in Poseidon's spec).
///
/// Serialises with every key present; `exposedPorts` is `[]` when there are none and accepts
/// `null` on input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnvironmentSpec {
    /// The environment's id.
    pub id: EnvironmentId,
    /// The image the runners are made from (a container image name, or a configured root
    /// filesystem name on the local backend).
    pub image: String,
    /// How many idle runners the prewarming pool keeps.
    pub prewarming_pool_size: u32,
    /// CPU share in MHz (Nomad's unit): a weight, not a quota.
    pub cpu_limit: u32,
    /// Memory limit in MB.
    pub memory_limit: u32,
    /// Whether runners may open network connections.
    pub network_access: bool,
    /// Ports inside a runner that are reachable from outside.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub exposed_ports: Vec<u16>,
}

fn null_as_empty<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u16>, D::Error> {
    Ok(Option::<Vec<u16>>::deserialize(d)?.unwrap_or_default())
}

/// The limits an operator sets on environment specifications.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecBounds {
    /// Largest allowed `prewarmingPoolSize`.
    pub max_pool_size: u32,
    /// Smallest allowed `memoryLimit` in MB (0 means "backend default" and is always allowed).
    pub min_memory_mb: u32,
    /// Largest allowed `memoryLimit` in MB.
    pub max_memory_mb: u32,
    /// Largest allowed `cpuLimit` in MHz.
    pub max_cpu_mhz: u32,
    /// Largest number of exposed ports per environment.
    pub max_exposed_ports: usize,
    /// Longest image name in bytes.
    pub max_image_len: usize,
}

impl Default for SpecBounds {
    fn default() -> Self {
        Self {
            max_pool_size: 100,
            min_memory_mb: 16,
            max_memory_mb: 64 * 1024,
            max_cpu_mhz: 1_000_000,
            max_exposed_ports: 32,
            max_image_len: 512,
        }
    }
}

/// A specification that breaks a bound; the message names the offending field (API name).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct ValidationError {
    /// The API name of the field (e.g. `prewarmingPoolSize`).
    pub field: &'static str,
    /// What is wrong with it.
    pub problem: String,
}

impl ValidationError {
    /// A problem with `field`.
    pub fn new(field: &'static str, problem: impl Into<String>) -> Self {
        Self {
            field,
            problem: problem.into(),
        }
    }
}

impl EnvironmentSpec {
    /// Checks the specification against `bounds`, returning the first field that breaks one.
    pub fn validate(&self, bounds: &SpecBounds) -> Result<(), ValidationError> {
        if self.image.trim().is_empty() {
            return Err(ValidationError::new("image", "must not be empty"));
        }
        if self.image.len() > bounds.max_image_len
            || self
                .image
                .chars()
                .any(|c| c.is_control() || c.is_whitespace())
        {
            return Err(ValidationError::new(
                "image",
                format!(
                    "must be at most {} bytes without whitespace or control characters",
                    bounds.max_image_len
                ),
            ));
        }
        if self.prewarming_pool_size > bounds.max_pool_size {
            return Err(ValidationError::new(
                "prewarmingPoolSize",
                format!("must be at most {}", bounds.max_pool_size),
            ));
        }
        if self.memory_limit != 0
            && !(bounds.min_memory_mb..=bounds.max_memory_mb).contains(&self.memory_limit)
        {
            return Err(ValidationError::new(
                "memoryLimit",
                format!(
                    "must be 0 (default) or between {} and {} MB",
                    bounds.min_memory_mb, bounds.max_memory_mb
                ),
            ));
        }
        if self.cpu_limit > bounds.max_cpu_mhz {
            return Err(ValidationError::new(
                "cpuLimit",
                format!("must be at most {} MHz", bounds.max_cpu_mhz),
            ));
        }
        if self.exposed_ports.contains(&0) {
            return Err(ValidationError::new(
                "exposedPorts",
                "ports must be between 1 and 65535",
            ));
        }
        if self.exposed_ports.len() > bounds.max_exposed_ports {
            return Err(ValidationError::new(
                "exposedPorts",
                format!("at most {} ports", bounds.max_exposed_ports),
            ));
        }
        Ok(())
    }

    /// Whether `other` differs from `self` only in the pool size, so an update can resize the
    /// pool instead of replacing its runners.
    pub fn differs_only_in_pool_size(&self, other: &EnvironmentSpec) -> bool {
        let mut resized = other.clone();
        resized.prewarming_pool_size = self.prewarming_pool_size;
        normalized_ports(&resized) == normalized_ports(self) && resized.id == self.id
    }
}

fn normalized_ports(spec: &EnvironmentSpec) -> EnvironmentSpec {
    let mut spec = spec.clone();
    spec.exposed_ports.sort_unstable();
    spec.exposed_ports.dedup();
    spec
}

/// Counts of one environment's runners, as `GET /statistics/execution-environments` shows them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnvironmentStatistics {
    /// The environment.
    pub id: EnvironmentId,
    /// Its configured pool size.
    pub prewarming_pool_size: u32,
    /// Runners ready to be claimed.
    pub idle_runners: u32,
    /// Runners claimed by clients.
    pub used_runners: u32,
    /// Runners on their way to the pool: creations in flight and runners the backend accepted
    /// but has not reported ready.
    pub pending_runners: u32,
    /// Whether the latest runner creations failed (the pool refills with backoff meanwhile).
    pub failing: bool,
    /// The latest creation error while failing.
    pub last_error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> EnvironmentSpec {
        EnvironmentSpec {
            id: EnvironmentId::new(1).unwrap(),
            image: "python:3".into(),
            prewarming_pool_size: 2,
            cpu_limit: 100,
            memory_limit: 256,
            network_access: false,
            exposed_ports: vec![],
        }
    }

    #[test]
    fn serialises_with_api_names_and_all_keys() {
        let json = serde_json::to_value(spec()).unwrap();
        for key in [
            "id",
            "image",
            "prewarmingPoolSize",
            "cpuLimit",
            "memoryLimit",
            "networkAccess",
            "exposedPorts",
        ] {
            assert!(json.get(key).is_some(), "missing {key}");
        }
        assert_eq!(json["exposedPorts"], serde_json::json!([]));
    }

    #[test]
    fn null_exposed_ports_read_as_empty() {
        let s: EnvironmentSpec = serde_json::from_str(
            r#"{"id":1,"image":"x","prewarmingPoolSize":1,"cpuLimit":1,"memoryLimit":64,"networkAccess":false,"exposedPorts":null}"#,
        )
        .unwrap();
        assert!(s.exposed_ports.is_empty());
    }

    #[test]
    fn validation_names_the_offending_field() {
        let bounds = SpecBounds::default();
        assert!(spec().validate(&bounds).is_ok());
        let mut s = spec();
        s.prewarming_pool_size = bounds.max_pool_size + 1;
        assert_eq!(s.validate(&bounds).unwrap_err().field, "prewarmingPoolSize");
        let mut s = spec();
        s.memory_limit = 1;
        assert_eq!(s.validate(&bounds).unwrap_err().field, "memoryLimit");
        let mut s = spec();
        s.exposed_ports = vec![80, 0];
        assert_eq!(s.validate(&bounds).unwrap_err().field, "exposedPorts");
        let mut s = spec();
        s.image = String::new();
        assert_eq!(s.validate(&bounds).unwrap_err().field, "image");
    }

    #[test]
    fn pool_size_only_change_is_detected() {
        let a = spec();
        let mut b = spec();
        b.prewarming_pool_size = 9;
        assert!(a.differs_only_in_pool_size(&b));
        b.memory_limit = 512;
        assert!(!a.differs_only_in_pool_size(&b));
    }
}
