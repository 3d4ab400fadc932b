//! Forwarding one execution's events from the backend to the client, adding what the core
//! enforces: the time limit, the output cap, the runner's destruction and the client's departure.
//!
//! Exactly one terminal event reaches the client. Sends wait for the client (backpressure) but
//! never keep the time limit or a destruction from taking effect.

use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::destroy::DestroyReason;
use crate::execution::{ExecutionEvent, ExecutionFailure};
use crate::ids::EnvironmentId;
use crate::observe::{ExecutionOutcome, ManagerObserver};

/// Limits the core enforces on every execution.
#[derive(Debug, Clone)]
pub(super) struct ExecutionLimits {
    pub(super) output_limit: Option<u64>,
    pub(super) stop_grace: Duration,
}

/// Reports one execution's end to the observer, once.
pub(super) struct ExecutionReport {
    pub(super) observer: std::sync::Arc<dyn ManagerObserver>,
    pub(super) environment: EnvironmentId,
    pub(super) started: Instant,
}

impl ExecutionReport {
    pub(super) fn finish(self, outcome: ExecutionOutcome) {
        self.observer
            .execution_finished(self.environment, outcome, self.started.elapsed());
    }
}

/// Called when a cancelled execution does not end within the grace period.
pub(super) type StopFailed = Box<dyn FnOnce() -> BoxFuture<'static, ()> + Send>;

/// Why the forwarder stops before the backend's own terminal event.
enum Ending {
    Deliver(ExecutionEvent),
    ClientLeft,
}

/// Forwards `backend` events to `client` until exactly one terminal event has been delivered or
/// the client went away; cancels the backend execution whenever it ends it early.
pub(super) async fn forward_execution(
    mut backend: mpsc::Receiver<ExecutionEvent>,
    client: mpsc::Sender<ExecutionEvent>,
    cancel: CancellationToken,
    time_limit: Option<Duration>,
    mut destroyed: watch::Receiver<Option<DestroyReason>>,
    limits: ExecutionLimits,
    (on_stop_failed, report): (StopFailed, ExecutionReport),
) {
    let deadline = time_limit.map(|limit| Instant::now() + limit);
    let mut output: u64 = 0;
    let mut pending: Option<ExecutionEvent> = None;
    let ending = loop {
        if let Some(reason) = destroyed.borrow_and_update().clone() {
            break Ending::Deliver(reason.execution_event());
        }
        tokio::select! {
            biased;
            changed = destroyed.changed() => {
                if changed.is_err() {
                    // The runner object is gone without a reason; treat like a failure.
                    break Ending::Deliver(ExecutionEvent::Error(ExecutionFailure::Failed));
                }
            }
            () = sleep_until_opt(deadline) => break Ending::Deliver(ExecutionEvent::Timeout),
            () = client.closed() => break Ending::ClientLeft,
            permit = client.reserve(), if pending.is_some() => {
                let Ok(permit) = permit else { break Ending::ClientLeft };
                if let Some(event) = pending.take() {
                    let outcome = ExecutionOutcome::of(&event);
                    permit.send(event);
                    if let Some(outcome) = outcome {
                        report.finish(outcome);
                        return;
                    }
                }
            }
            event = backend.recv(), if pending.is_none() => match event {
                Some(event) => {
                    if let ExecutionEvent::Stdout(b) | ExecutionEvent::Stderr(b) = &event {
                        output = output.saturating_add(b.len() as u64);
                        if let Some(limit) = limits.output_limit.filter(|l| output > *l) {
                            break Ending::Deliver(ExecutionEvent::Error(
                                ExecutionFailure::OutputLimitExceeded(limit),
                            ));
                        }
                    }
                    pending = Some(event);
                }
                None => {
                    // The backend ended without a terminal event: report the runner's fate if
                    // it was destroyed meanwhile, else a failure.
                    let reason = destroyed.borrow().clone();
                    break Ending::Deliver(reason.map_or(
                        ExecutionEvent::Error(ExecutionFailure::Failed),
                        |r| r.execution_event(),
                    ));
                }
            },
        }
    };
    cancel.cancel();
    match ending {
        Ending::Deliver(event) => {
            debug!(?event, "execution ended by the core");
            report.finish(ExecutionOutcome::of(&event).unwrap_or(ExecutionOutcome::Error));
            let _ = client.send(event).await;
        }
        Ending::ClientLeft => report.finish(ExecutionOutcome::Cancelled),
    }
    // Make sure the backend actually stops; otherwise the runner must go.
    let stopped = tokio::time::timeout(limits.stop_grace, async {
        while backend.recv().await.is_some() {}
    })
    .await;
    if stopped.is_err() && destroyed.borrow().is_none() {
        on_stop_failed().await;
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
