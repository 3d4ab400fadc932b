//! The on-disk encoding of records: private serde types, converted to and from runner-core's.
//!
//! runner-core's `RunnerState` has no serde derives (it is not an API type), so the store keeps
//! its own record types here; changing them changes the file format and needs a new
//! [`SCHEMA_VERSION`](crate::store::SCHEMA_VERSION).
//!
//! A runner record is `[format byte][u32 LE header length][JSON header][backend data]`: the
//! adapter's opaque bytes are stored raw instead of as a JSON array of numbers.
//! Times are unix milliseconds; a deadline is truncated to the millisecond.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use runner_core::{EnvironmentId, EnvironmentSpec, MappedPort, RunnerId, RunnerState, UsedState};
use serde::{Deserialize, Serialize};

use crate::error::StoreError;

/// A runner as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRunner {
    /// The runner's id (the key of its record).
    pub id: RunnerId,
    /// The environment it belongs to.
    pub environment: EnvironmentId,
    /// Idle, or used with its inactivity timeout and deadline. The deadline is stored with
    /// millisecond precision (truncated), the timeout likewise.
    pub state: RunnerState,
    /// Where its exposed ports are reachable from outside.
    pub mapped_ports: Vec<MappedPort>,
    /// Opaque bytes the adapter owns (e.g. its serialised sandbox handle), stored as given.
    pub backend_data: Vec<u8>,
}

/// The first byte of every runner record.
const RUNNER_FORMAT: u8 = 1;
/// Format byte plus the header length.
const RUNNER_PREFIX_LEN: usize = 1 + 4;

#[derive(Serialize, Deserialize)]
struct RunnerHeader {
    environment: u64,
    state: StateRecord,
    mapped_ports: Vec<MappedPort>,
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum StateRecord {
    Idle,
    Used {
        inactivity_timeout_ms: u64,
        deadline_unix_ms: Option<u64>,
    },
}

pub(crate) fn encode_runner(runner: &StoredRunner) -> Result<Vec<u8>, StoreError> {
    let header = RunnerHeader {
        environment: runner.environment.get(),
        state: StateRecord::from(&runner.state),
        mapped_ports: runner.mapped_ports.clone(),
    };
    let json = serde_json::to_vec(&header).map_err(|source| StoreError::Encode {
        what: format!("runner {}", runner.id),
        source,
    })?;
    let len = u32::try_from(json.len()).map_err(|_| StoreError::RecordTooLarge {
        what: format!("runner {}", runner.id),
        len: json.len(),
    })?;
    let mut out = Vec::with_capacity(RUNNER_PREFIX_LEN + json.len() + runner.backend_data.len());
    out.push(RUNNER_FORMAT);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(&runner.backend_data);
    Ok(out)
}

pub(crate) fn decode_runner(id: &str, bytes: &[u8]) -> Result<StoredRunner, StoreError> {
    let corrupt = |reason: String| StoreError::CorruptRecord {
        what: format!("runner {id}"),
        reason,
    };
    let (&format, rest) = bytes
        .split_first()
        .ok_or_else(|| corrupt("it is empty".into()))?;
    if format != RUNNER_FORMAT {
        return Err(corrupt(format!("unknown record format {format}")));
    }
    let (len, rest) = rest
        .split_first_chunk::<4>()
        .ok_or_else(|| corrupt("it ends inside its header length".into()))?;
    let len = usize::try_from(u32::from_le_bytes(*len))
        .map_err(|_| corrupt("its header length does not fit in memory".into()))?;
    if rest.len() < len {
        return Err(corrupt(format!(
            "its header claims {len} bytes but only {} follow",
            rest.len()
        )));
    }
    let (json, backend_data) = rest.split_at(len);
    let header: RunnerHeader =
        serde_json::from_slice(json).map_err(|e| corrupt(format!("its header: {e}")))?;
    let environment = EnvironmentId::new(header.environment).ok_or_else(|| {
        corrupt(format!(
            "environment id {} is out of range",
            header.environment
        ))
    })?;
    let state = header.state.into_state().map_err(corrupt)?;
    Ok(StoredRunner {
        id: RunnerId::new(id),
        environment,
        state,
        mapped_ports: header.mapped_ports,
        backend_data: backend_data.to_vec(),
    })
}

impl StoredRunner {
    /// This record with `state` replaced, for read-modify-write updates.
    pub(crate) fn with_state(mut self, state: RunnerState) -> Self {
        self.state = state;
        self
    }
}

pub(crate) fn encode_environment(spec: &EnvironmentSpec) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(spec).map_err(|source| StoreError::Encode {
        what: format!("environment {}", spec.id),
        source,
    })
}

pub(crate) fn decode_environment(key: u64, bytes: &[u8]) -> Result<EnvironmentSpec, StoreError> {
    let corrupt = |reason: String| StoreError::CorruptRecord {
        what: format!("environment {key}"),
        reason,
    };
    let spec: EnvironmentSpec =
        serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
    if spec.id.get() != key {
        return Err(corrupt(format!(
            "it is stored under a different id ({})",
            spec.id
        )));
    }
    Ok(spec)
}

impl From<&RunnerState> for StateRecord {
    fn from(state: &RunnerState) -> Self {
        match state {
            RunnerState::Idle => StateRecord::Idle,
            RunnerState::Used(used) => StateRecord::Used {
                inactivity_timeout_ms: millis(used.inactivity_timeout),
                deadline_unix_ms: used.deadline.map(unix_millis),
            },
        }
    }
}

impl StateRecord {
    fn into_state(self) -> Result<RunnerState, String> {
        Ok(match self {
            StateRecord::Idle => RunnerState::Idle,
            StateRecord::Used {
                inactivity_timeout_ms,
                deadline_unix_ms,
            } => RunnerState::Used(UsedState {
                inactivity_timeout: Duration::from_millis(inactivity_timeout_ms),
                deadline: deadline_unix_ms.map(from_unix_millis).transpose()?,
            }),
        })
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// `t` as unix milliseconds, truncated; times before the epoch are stored as the epoch.
pub(crate) fn unix_millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(millis).unwrap_or(0)
}

fn from_unix_millis(ms: u64) -> Result<SystemTime, String> {
    UNIX_EPOCH
        .checked_add(Duration::from_millis(ms))
        .ok_or_else(|| format!("deadline {ms} ms after the epoch is out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runner(state: RunnerState, backend_data: Vec<u8>) -> StoredRunner {
        StoredRunner {
            id: RunnerId::new("7-abc"),
            environment: EnvironmentId::new(7).unwrap(),
            state,
            mapped_ports: vec![MappedPort {
                exposed_port: 8080,
                host_address: "127.0.0.1:40001".into(),
            }],
            backend_data,
        }
    }

    #[test]
    fn runner_record_round_trips_with_raw_backend_data() {
        let used = RunnerState::Used(UsedState {
            inactivity_timeout: Duration::from_secs(60),
            deadline: Some(UNIX_EPOCH + Duration::from_millis(1_700_000_000_123)),
        });
        for state in [RunnerState::Idle, used] {
            let r = runner(state, vec![0, 1, 2, 255, b'{']);
            let bytes = encode_runner(&r).unwrap();
            assert!(
                bytes.ends_with(&[0, 1, 2, 255, b'{']),
                "backend data is stored raw"
            );
            assert_eq!(decode_runner("7-abc", &bytes).unwrap(), r);
        }
    }

    #[test]
    fn deadline_is_truncated_to_the_millisecond() {
        let r = runner(
            RunnerState::Used(UsedState {
                inactivity_timeout: Duration::ZERO,
                deadline: Some(UNIX_EPOCH + Duration::from_nanos(5_000_999_999)),
            }),
            vec![],
        );
        let back = decode_runner("7-abc", &encode_runner(&r).unwrap()).unwrap();
        let RunnerState::Used(used) = back.state else {
            panic!("state changed kind: {:?}", back.state);
        };
        assert_eq!(
            used.deadline,
            Some(UNIX_EPOCH + Duration::from_millis(5_000))
        );
        assert_eq!(used.inactivity_timeout, Duration::ZERO);
    }

    #[test]
    fn damaged_runner_records_are_reported_not_panicked_on() {
        let good = encode_runner(&runner(RunnerState::Idle, vec![9; 4])).unwrap();
        let mut wrong_format = good.clone();
        wrong_format[0] = 2;
        let mut long_header = good.clone();
        long_header[1..5].copy_from_slice(&u32::MAX.to_le_bytes());
        let mut bad_json = good.clone();
        bad_json[5] = b'[';
        for bytes in [
            &[][..],
            &[RUNNER_FORMAT, 1, 0][..],
            &wrong_format[..],
            &long_header[..],
            &bad_json[..],
        ] {
            let err = decode_runner("7-abc", bytes).unwrap_err();
            assert!(
                matches!(&err, StoreError::CorruptRecord { what, .. } if what == "runner 7-abc"),
                "{err:?}"
            );
        }
    }

    #[test]
    fn environment_stored_under_another_id_is_corrupt() {
        let spec = EnvironmentSpec {
            id: EnvironmentId::new(3).unwrap(),
            image: "python:3".into(),
            prewarming_pool_size: 1,
            cpu_limit: 100,
            memory_limit: 128,
            network_access: true,
            exposed_ports: vec![80],
        };
        let bytes = encode_environment(&spec).unwrap();
        assert_eq!(decode_environment(3, &bytes).unwrap(), spec);
        assert!(matches!(
            decode_environment(4, &bytes),
            Err(StoreError::CorruptRecord { .. })
        ));
    }
}
