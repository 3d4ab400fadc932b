//! The store's API through a real file: round trips, ordering, idempotence, errors, shutdown.

mod common;

use common::{at_ms, env_id, environment, runner, used};
use runner_core::{RunnerId, RunnerState};
use storage::{StateStore, StoreError};

fn open(dir: &tempfile::TempDir) -> StateStore {
    StateStore::open(&dir.path().join("state.redb")).unwrap()
}

#[test]
fn open_creates_missing_parent_directories() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a/b/c/state.redb");
    let store = StateStore::open(&path).unwrap();
    assert!(path.is_file());
    assert!(store.environments().unwrap().is_empty());
    assert!(store.runners().unwrap().is_empty());
}

#[test]
fn environments_round_trip_in_id_order_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    for id in [42, 7, 1_000_000, 0] {
        store.put_environment(&environment(id)).unwrap();
    }
    let mut replaced = environment(7);
    replaced.prewarming_pool_size = 9;
    replaced.exposed_ports.clear();
    store.put_environment(&replaced).unwrap();

    let expected = vec![
        environment(0),
        replaced.clone(),
        environment(42),
        environment(1_000_000),
    ];
    assert_eq!(store.environments().unwrap(), expected);

    store.close().unwrap();
    drop(store);
    let store = open(&dir);
    assert_eq!(store.environments().unwrap(), expected);
}

#[test]
fn removing_an_environment_is_idempotent_and_leaves_runners_alone() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    store.put_environment(&environment(1)).unwrap();
    store.put_environment(&environment(2)).unwrap();
    store
        .put_runner(&runner("1-a", 1, RunnerState::Idle))
        .unwrap();

    store.remove_environment(env_id(1)).unwrap();
    store.remove_environment(env_id(1)).unwrap();
    store.remove_environment(env_id(99)).unwrap();

    assert_eq!(store.environments().unwrap(), vec![environment(2)]);
    assert_eq!(store.runners().unwrap().len(), 1);
}

#[test]
fn runners_round_trip_with_every_field_and_in_id_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let records = [
        runner("2-b", 2, used(60, Some(1_700_000_000_123))),
        runner("1-z", 1, RunnerState::Idle),
        runner("1-a", 1, used(0, None)),
    ];
    for r in &records {
        store.put_runner(r).unwrap();
    }
    for r in &records {
        assert_eq!(store.runner(&r.id).unwrap().as_ref(), Some(r));
    }
    let ids: Vec<_> = store
        .runners()
        .unwrap()
        .into_iter()
        .map(|r| r.id.to_string())
        .collect();
    assert_eq!(ids, ["1-a", "1-z", "2-b"]);
    assert_eq!(store.runner(&RunnerId::new("1-missing")).unwrap(), None);

    store.close().unwrap();
    drop(store);
    let store = open(&dir);
    let mut expected = records.to_vec();
    expected.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(store.runners().unwrap(), expected);
}

#[test]
fn put_runner_replaces_the_whole_record() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    store
        .put_runner(&runner("1-a", 1, used(5, Some(1_000))))
        .unwrap();
    let mut replacement = runner("1-a", 3, RunnerState::Idle);
    replacement.mapped_ports.clear();
    replacement.backend_data = vec![];
    store.put_runner(&replacement).unwrap();
    assert_eq!(store.runners().unwrap(), vec![replacement]);
}

#[test]
fn set_runner_state_changes_only_the_state() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let idle = runner("1-a", 1, RunnerState::Idle);
    store.put_runner(&idle).unwrap();

    let claimed = used(30, Some(1_800_000_000_000));
    store.set_runner_state(&idle.id, &claimed).unwrap();
    let mut expected = idle.clone();
    expected.state = claimed;
    assert_eq!(store.runner(&idle.id).unwrap(), Some(expected.clone()));

    store
        .set_runner_state(&idle.id, &RunnerState::Idle)
        .unwrap();
    assert_eq!(store.runner(&idle.id).unwrap(), Some(idle));
}

#[test]
fn set_runner_state_of_an_absent_runner_is_runner_not_found() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let id = RunnerId::new("1-ghost");
    let err = store.set_runner_state(&id, &used(1, None)).unwrap_err();
    assert!(
        matches!(&err, StoreError::RunnerNotFound(r) if *r == id),
        "{err:?}"
    );
    assert_eq!(err.to_string(), "no record of runner 1-ghost is stored");
    assert_eq!(
        store.runner(&id).unwrap(),
        None,
        "a failed update creates nothing"
    );
}

#[test]
fn refresh_deadline_updates_a_used_runner_and_survives_close() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let r = runner("1-a", 1, used(60, None));
    store.put_runner(&r).unwrap();
    store.refresh_deadline(&r.id, at_ms(1_000)).unwrap();
    store.refresh_deadline(&r.id, at_ms(2_500)).unwrap();

    let mut expected = r.clone();
    expected.state = used(60, Some(2_500));
    assert_eq!(
        store.runner(&r.id).unwrap(),
        Some(expected.clone()),
        "visible at once"
    );

    store.close().unwrap();
    drop(store);
    let store = open(&dir);
    assert_eq!(store.runner(&r.id).unwrap(), Some(expected));
}

#[test]
fn refresh_deadline_of_an_idle_or_absent_runner_fails_without_writing() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let idle = runner("1-a", 1, RunnerState::Idle);
    store.put_runner(&idle).unwrap();

    let err = store.refresh_deadline(&idle.id, at_ms(5)).unwrap_err();
    assert!(
        matches!(&err, StoreError::RunnerNotUsed(r) if *r == idle.id),
        "{err:?}"
    );
    assert_eq!(store.runner(&idle.id).unwrap(), Some(idle));

    let ghost = RunnerId::new("1-ghost");
    let err = store.refresh_deadline(&ghost, at_ms(5)).unwrap_err();
    assert!(
        matches!(&err, StoreError::RunnerNotFound(r) if *r == ghost),
        "{err:?}"
    );
}

#[test]
fn removing_a_runner_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let a = runner("1-a", 1, RunnerState::Idle);
    let b = runner("1-b", 1, used(1, None));
    store.put_runner(&a).unwrap();
    store.put_runner(&b).unwrap();

    store.remove_runner(&a.id).unwrap();
    store.remove_runner(&a.id).unwrap();
    store.remove_runner(&RunnerId::new("never-stored")).unwrap();

    assert_eq!(store.runner(&a.id).unwrap(), None);
    assert_eq!(store.runners().unwrap(), vec![b]);
}

#[test]
fn a_new_store_counts_as_cleanly_shut_down() {
    let dir = tempfile::tempdir().unwrap();
    assert!(open(&dir).previous_shutdown_was_clean());
}

#[test]
fn reopening_without_close_reports_an_unclean_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    store.put_environment(&environment(1)).unwrap();
    drop(store);

    let store = open(&dir);
    assert!(!store.previous_shutdown_was_clean());
    assert_eq!(store.environments().unwrap(), vec![environment(1)]);
}

#[test]
fn reopening_after_close_reports_a_clean_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    store.close().unwrap();
    drop(store);
    let store = open(&dir);
    assert!(store.previous_shutdown_was_clean());

    // An unclean run in between is forgotten once a later run closes cleanly.
    drop(store);
    let store = open(&dir);
    assert!(!store.previous_shutdown_was_clean());
    store.close().unwrap();
    drop(store);
    assert!(open(&dir).previous_shutdown_was_clean());
}

#[test]
fn close_releases_the_file_for_every_clone_and_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let clone = store.clone();

    let err = StateStore::open(&dir.path().join("state.redb")).unwrap_err();
    assert!(matches!(err, StoreError::AlreadyOpen { .. }), "{err:?}");

    store.close().unwrap();
    store.close().unwrap();
    assert!(matches!(clone.runners(), Err(StoreError::Closed)));
    assert!(matches!(
        clone.put_environment(&environment(1)),
        Err(StoreError::Closed)
    ));
    assert!(matches!(clone.flush(), Err(StoreError::Closed)));

    // The clone still exists, yet the file can be opened again.
    let reopened = open(&dir);
    assert!(reopened.previous_shutdown_was_clean());
    assert!(reopened.environments().unwrap().is_empty());
}

#[test]
fn debug_output_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let text = format!("{store:?}");
    assert!(text.contains("state.redb"), "{text}");
    assert!(text.contains("open: true"), "{text}");
}

#[test]
fn a_file_that_is_not_a_store_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.redb");
    std::fs::write(&path, vec![0xAB; 8192]).unwrap();
    let err = StateStore::open(&path).unwrap_err();
    assert!(matches!(err, StoreError::Open { .. }), "{err:?}");
}

#[test]
fn dropping_the_last_handle_keeps_eventual_writes() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let r = runner("1-a", 1, used(60, Some(1_000)));
    store.put_runner(&r).unwrap();
    store.refresh_deadline(&r.id, at_ms(9_000)).unwrap();
    drop(store);

    let store = open(&dir);
    assert!(!store.previous_shutdown_was_clean());
    assert_eq!(
        store.runner(&r.id).unwrap().unwrap().state,
        used(60, Some(9_000))
    );
}

#[derive(Default)]
struct Recorded(std::sync::Mutex<Vec<(&'static str, bool)>>);

impl storage::WriteObserver for Recorded {
    fn write_committed(&self, operation: &'static str, durable: bool, _: std::time::Duration) {
        self.0.lock().unwrap().push((operation, durable));
    }
}

#[test]
fn committed_writes_are_reported_by_operation_and_durability() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let recorded = std::sync::Arc::new(Recorded::default());
    assert!(store.set_write_observer(recorded.clone()));
    assert!(
        !store.set_write_observer(std::sync::Arc::new(Recorded::default())),
        "set once"
    );
    store.put_environment(&environment(1)).unwrap();
    store
        .put_runner(&runner("1-a", 1, RunnerState::Idle))
        .unwrap();
    let id = RunnerId::from("1-a");
    store.set_runner_state(&id, &used(60, Some(1_000))).unwrap();
    store.refresh_deadline(&id, at_ms(2_000)).unwrap();
    assert!(
        store
            .refresh_deadline(&RunnerId::from("1-x"), at_ms(1))
            .is_err()
    );
    store.remove_runner(&id).unwrap();
    let recorded = recorded.0.lock().unwrap().clone();
    let operations: Vec<_> = recorded.iter().map(|(op, _)| *op).collect();
    assert_eq!(
        operations,
        [
            "put_environment",
            "put_runner",
            "set_runner_state",
            "refresh_deadline",
            "remove_runner"
        ],
        "a failed write is not reported"
    );
    // A deadline refresh is eventual unless the last durable commit is old (a slow machine).
    assert!(
        recorded
            .iter()
            .all(|(op, durable)| *durable || *op == "refresh_deadline")
    );
}
