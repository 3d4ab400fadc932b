//! Records for the integration tests.

#![allow(dead_code)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use runner_core::{EnvironmentId, EnvironmentSpec, MappedPort, RunnerId, RunnerState, UsedState};
use storage::StoredRunner;

pub fn env_id(id: u64) -> EnvironmentId {
    EnvironmentId::new(id).unwrap()
}

pub fn environment(id: u64) -> EnvironmentSpec {
    EnvironmentSpec {
        id: env_id(id),
        image: format!("image-{id}"),
        prewarming_pool_size: 3,
        cpu_limit: 200,
        memory_limit: 256,
        network_access: id.is_multiple_of(2),
        exposed_ports: vec![8080, 9000],
    }
}

/// A millisecond-aligned wall-clock time, so it survives the store's millisecond precision.
pub fn at_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

pub fn used(timeout_s: u64, deadline_ms: Option<u64>) -> RunnerState {
    RunnerState::Used(UsedState {
        inactivity_timeout: Duration::from_secs(timeout_s),
        deadline: deadline_ms.map(at_ms),
    })
}

pub fn runner(id: &str, env: u64, state: RunnerState) -> StoredRunner {
    StoredRunner {
        id: RunnerId::new(id),
        environment: env_id(env),
        state,
        mapped_ports: vec![MappedPort {
            exposed_port: 8080,
            host_address: format!("127.0.0.1:{}", 40_000 + env),
        }],
        backend_data: format!("sandbox handle of {id}\0\u{1}").into_bytes(),
    }
}
