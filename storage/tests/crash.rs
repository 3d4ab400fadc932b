//! Crash safety with a real `kill -9`: every write acknowledged before the kill is there after
//! reopening.
//!
//! The test re-executes its own binary as the writer (selected by an environment variable passed
//! to the child only), reads the writer's acknowledgements from a pipe, SIGKILLs it mid-stream,
//! then reopens the store in this process.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{at_ms, environment, runner, used};
use runner_core::{RunnerId, RunnerState};
use storage::StateStore;

/// Set (to the store path) only in the child's environment.
const CHILD_STORE_VAR: &str = "STORAGE_CRASH_TEST_STORE";
/// How many acknowledgements the parent waits for before it kills each writer.
const KILL_AFTER_ACKS: [usize; 3] = [7, 60, 150];
/// The writer stops by itself after this many rounds, should the parent never kill it.
const MAX_ROUNDS: u64 = 100_000;

#[test]
fn acknowledged_writes_survive_kill_9() {
    if let Some(path) = std::env::var_os(CHILD_STORE_VAR) {
        write_until_killed(PathBuf::from(path));
        return;
    }

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.redb");
    // Several writers in turn on one file, killed after different numbers of writes, so the
    // kill lands at different points of a commit and each reopen starts from a crashed file.
    for acks_before_kill in KILL_AFTER_ACKS {
        let acked = run_writer_until_killed(&path, acks_before_kill);
        assert!(acked.len() >= acks_before_kill);
        assert_acknowledged_writes_are_stored(&path, &acked);
    }
}

/// Starts a writer on `path`, SIGKILLs it once it acknowledged `acks_before_kill` writes, and
/// returns every acknowledgement it printed before it died.
fn run_writer_until_killed(path: &Path, acks_before_kill: usize) -> Vec<String> {
    let mut child = KillOnDrop(
        Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "acknowledged_writes_survive_kill_9",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_STORE_VAR, path)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let stdout = child.0.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();

    let mut acked = Vec::new();
    while acked.len() < acks_before_kill {
        let line = lines
            .next()
            .expect("the writer ended before it was killed")
            .unwrap();
        if let Some(ack) = line.strip_prefix("ACK ") {
            acked.push(ack.to_owned());
        }
    }
    child.0.kill().unwrap();
    let status = child.0.wait().unwrap();
    assert_eq!(
        status.signal(),
        Some(9),
        "the writer died of SIGKILL: {status:?}"
    );
    // Acknowledgements written before the kill and still in the pipe count as well.
    for line in lines {
        if let Some(ack) = line.unwrap().strip_prefix("ACK ") {
            acked.push(ack.to_owned());
        }
    }
    acked
}

fn assert_acknowledged_writes_are_stored(path: &Path, acked: &[String]) {
    let store = StateStore::open(path).unwrap();
    assert!(!store.previous_shutdown_was_clean());
    let runners: BTreeMap<_, _> = store
        .runners()
        .unwrap()
        .into_iter()
        .map(|r| (r.id.clone(), r))
        .collect();
    let environments = store.environments().unwrap();

    for ack in acked {
        let mut words = ack.split(' ');
        match (words.next(), words.next()) {
            (Some("env"), Some(id)) => {
                let expected = environment(id.parse().unwrap());
                assert!(
                    environments.contains(&expected),
                    "environment {id} was lost"
                );
            }
            (Some("put"), Some(round)) => {
                let expected = runner(&runner_id(round.parse().unwrap()), 1, RunnerState::Idle);
                let found = runners
                    .get(&expected.id)
                    .unwrap_or_else(|| panic!("{ack} was lost"));
                // A later acknowledged used-mark may have replaced the idle state.
                assert_eq!(found.backend_data, expected.backend_data, "{ack}");
                assert_eq!(found.mapped_ports, expected.mapped_ports, "{ack}");
            }
            (Some("used"), Some(round)) => {
                let round: u64 = round.parse().unwrap();
                let found = &runners[&RunnerId::new(runner_id(round))];
                let RunnerState::Used(state) = found.state else {
                    panic!("the used-mark of round {round} was lost: {found:?}");
                };
                assert_eq!(state.inactivity_timeout, Duration::from_secs(30));
                // Eventual refreshes only ever move the deadline later.
                assert!(
                    state.deadline >= Some(at_ms(deadline_ms(round, 0))),
                    "round {round}: {state:?}"
                );
            }
            (Some("flushed"), Some(round)) => {
                let round: u64 = round.parse().unwrap();
                let found = &runners[&RunnerId::new(runner_id(round))];
                assert_eq!(
                    found.state,
                    used(30, Some(deadline_ms(round, 3))),
                    "flush made the eventual refreshes of round {round} durable"
                );
            }
            _ => panic!("unexpected acknowledgement {ack:?}"),
        }
    }
}

fn runner_id(round: u64) -> String {
    format!("1-round-{round:06}")
}

fn deadline_ms(round: u64, refresh: u64) -> u64 {
    1_700_000_000_000 + round * 1_000 + refresh
}

/// The child: durable writes, each acknowledged on stdout once the call returned, mixed with
/// eventual refreshes that are acknowledged only once a `flush` made them durable, until the
/// parent kills it.
fn write_until_killed(path: PathBuf) {
    let store = StateStore::open(&path).unwrap();
    let mut out = std::io::stdout().lock();
    let mut ack = |text: String| {
        writeln!(out, "ACK {text}").unwrap();
        out.flush().unwrap();
    };
    for round in 0..MAX_ROUNDS {
        if round.is_multiple_of(10) {
            store.put_environment(&environment(round)).unwrap();
            ack(format!("env {round}"));
        }
        let id = runner_id(round);
        store
            .put_runner(&runner(&id, 1, RunnerState::Idle))
            .unwrap();
        ack(format!("put {round}"));
        let id = RunnerId::new(id);
        store
            .set_runner_state(&id, &used(30, Some(deadline_ms(round, 0))))
            .unwrap();
        ack(format!("used {round}"));
        for refresh in 1..=3 {
            store
                .refresh_deadline(&id, at_ms(deadline_ms(round, refresh)))
                .unwrap();
        }
        if round.is_multiple_of(5) {
            store.flush().unwrap();
            ack(format!("flushed {round}"));
        }
    }
}

/// Kills the child if the test fails before it does.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
