//! The backend conformance kit (`runner_core::testkit`) against the in-memory fake backend: once
//! with runners ready at once, once with creations reported ready later through the event stream.

use std::sync::Arc;
use std::time::Duration;

use runner_core::fake::{FakeExecutor, Readiness};
use runner_core::testkit::{Commands, Conformance, Ending, Subject, Unsupported};
use runner_core::{DestroyReason, EnvironmentId, EnvironmentSpec, ExecutorApi, RunnerId};

/// One fake backend; its durable state is the shared in-memory state.
#[derive(Debug)]
struct Fake {
    executor: FakeExecutor,
    readiness: Readiness,
}

impl Fake {
    fn new(readiness: Readiness) -> Self {
        let executor = FakeExecutor::new();
        executor.set_readiness(readiness);
        Self {
            executor,
            readiness,
        }
    }
}

#[async_trait::async_trait]
impl Subject for Fake {
    fn backend(&self) -> Arc<dyn ExecutorApi> {
        Arc::new(self.executor.clone())
    }

    async fn restart(&mut self, ending: Ending) -> Result<(), Unsupported> {
        self.executor = match ending {
            Ending::Clean => self.executor.restarted(),
            Ending::Crash => self.executor.crashed(),
        };
        self.executor.set_readiness(self.readiness);
        Ok(())
    }

    async fn stop_runner_externally(&mut self, runner: &RunnerId) -> Result<(), Unsupported> {
        self.executor.stop_runner(
            runner,
            DestroyReason::Stopped("stopped by the conformance kit".into()),
        );
        Ok(())
    }
}

fn spec() -> EnvironmentSpec {
    EnvironmentSpec {
        id: EnvironmentId::new(31).expect("non-zero"),
        image: "fake".into(),
        prewarming_pool_size: 1,
        cpu_limit: 100,
        memory_limit: 64,
        network_access: false,
        exposed_ports: vec![],
    }
}

/// The fake's command language differs from bash only for stderr.
fn conformance(readiness: Readiness) -> Conformance {
    Conformance::new(spec(), move || async move { Fake::new(readiness) })
        .commands(Commands {
            echo_stderr: |word| format!("echo-stderr {word}"),
            ..Commands::bash()
        })
        .ready_within(Duration::from_secs(5))
        .event_within(Duration::from_secs(5))
        .execution_within(Duration::from_secs(5))
        .require_every_hook()
}

mod ready_at_once {
    runner_core::conformance_tests!(super::conformance(super::Readiness::AtOnce));
}

mod ready_later {
    runner_core::conformance_tests!(super::conformance(super::Readiness::After(
        super::Duration::from_millis(20)
    )));
}
