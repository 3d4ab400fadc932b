//! Identifiers of environments, runners and executions.
//!
//! Ids are plain values: cheap to clone, hashable, and serialised exactly as the API shows them
//! (an environment id is a JSON integer, runner and execution ids are strings).

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The id of an execution environment, as the client chose it (`PUT /execution-environments/{id}`).
///
/// Valid ids are `0..=i64::MAX`, matching Poseidon (which stores them as Go `int`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct EnvironmentId(u64);

impl EnvironmentId {
    /// The largest id a client may use.
    pub const MAX: u64 = i64::MAX as u64;

    /// Wraps `id`, or returns `None` when it is above [`EnvironmentId::MAX`].
    pub fn new(id: u64) -> Option<Self> {
        (id <= Self::MAX).then_some(Self(id))
    }

    /// The numeric value.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for EnvironmentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for EnvironmentId {
    type Err = InvalidId;

    /// Parses a decimal id; signs, spaces and values above [`EnvironmentId::MAX`] are rejected.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(InvalidId::new("environment id", s));
        }
        s.parse::<u64>()
            .ok()
            .and_then(Self::new)
            .ok_or_else(|| InvalidId::new("environment id", s))
    }
}

/// The id of a runner, chosen by the backend that created it.
///
/// Backends use `<environment id>-<uuid>` (as Poseidon does) so the environment can be read back
/// from the id after a restart; the core treats the id as opaque.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RunnerId(Arc<str>);

impl RunnerId {
    /// Wraps a backend-chosen id.
    pub fn new(id: impl Into<Arc<str>>) -> Self {
        Self(id.into())
    }

    /// A fresh id of the form `<environment>-<uuid v4>`.
    pub fn generate(environment: EnvironmentId) -> Self {
        Self(format!("{environment}-{}", Uuid::new_v4()).into())
    }

    /// The environment encoded in an id made by [`RunnerId::generate`], if any.
    pub fn environment(&self) -> Option<EnvironmentId> {
        self.0.split_once('-')?.0.parse().ok()
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RunnerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for RunnerId {
    fn from(value: &str) -> Self {
        Self::new(value)
    }
}

/// The single-use id of a stored execution request (a UUID v4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ExecutionId(Uuid);

impl ExecutionId {
    /// A fresh random id.
    pub fn generate() -> Self {
        Self(Uuid::new_v4())
    }
}

impl fmt::Display for ExecutionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

impl FromStr for ExecutionId {
    type Err = InvalidId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s)
            .map(Self)
            .map_err(|_| InvalidId::new("execution id", s))
    }
}

/// A text that is not a valid id of the named kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind}: {value:?}")]
pub struct InvalidId {
    kind: &'static str,
    value: String,
}

impl InvalidId {
    fn new(kind: &'static str, value: &str) -> Self {
        let value = value.chars().take(64).collect();
        Self { kind, value }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn environment_id_parses_only_plain_decimal_in_range() {
        assert_eq!("42".parse::<EnvironmentId>().unwrap().get(), 42);
        assert!("-1".parse::<EnvironmentId>().is_err());
        assert!("+1".parse::<EnvironmentId>().is_err());
        assert!("".parse::<EnvironmentId>().is_err());
        assert!("9223372036854775808".parse::<EnvironmentId>().is_err());
        assert!("9223372036854775807".parse::<EnvironmentId>().is_ok());
    }

    #[test]
    fn generated_runner_id_carries_its_environment() {
        let env = EnvironmentId::new(17).unwrap();
        let id = RunnerId::generate(env);
        assert!(id.as_str().starts_with("17-"));
        assert_eq!(id.environment(), Some(env));
        assert_eq!(RunnerId::from("x-y").environment(), None);
    }

    #[test]
    fn execution_id_round_trips_through_text() {
        let id = ExecutionId::generate();
        assert_eq!(id.to_string().parse::<ExecutionId>().unwrap(), id);
        assert!("not-a-uuid".parse::<ExecutionId>().is_err());
    }
}
