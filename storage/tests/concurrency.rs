//! Several threads writing and reading one store through clones of one handle.

mod common;

use std::collections::BTreeMap;
use std::sync::Barrier;
use std::thread;

use common::{at_ms, environment, runner, used};
use runner_core::{RunnerId, RunnerState};
use storage::{StateStore, StoreError, StoredRunner};

const THREADS: usize = 8;
const PER_THREAD: usize = 25;

fn assert_shareable<T: Clone + Send + Sync + std::fmt::Debug + 'static>() {}

#[test]
fn the_store_is_a_shareable_handle() {
    assert_shareable::<StateStore>();
    assert_shareable::<StoredRunner>();
    fn error_is_sendable<E: std::error::Error + Send + Sync + 'static>() {}
    error_is_sendable::<StoreError>();
}

#[test]
fn concurrent_writers_lose_nothing_and_readers_see_whole_records() {
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::open(&dir.path().join("state.redb")).unwrap();
    // The writers, the reader and this thread start together.
    let barrier = Barrier::new(THREADS + 2);

    let expected: BTreeMap<RunnerId, StoredRunner> = thread::scope(|s| {
        let writers: Vec<_> = (0..THREADS)
            .map(|t| {
                let store = store.clone();
                let barrier = &barrier;
                s.spawn(move || {
                    barrier.wait();
                    let mut kept = Vec::new();
                    store.put_environment(&environment(t as u64)).unwrap();
                    for i in 0..PER_THREAD {
                        let mut r = runner(&format!("{t}-{i:03}"), t as u64, RunnerState::Idle);
                        store.put_runner(&r).unwrap();
                        let deadline = (t * 1_000 + i) as u64;
                        store
                            .set_runner_state(&r.id, &used(60, Some(deadline)))
                            .unwrap();
                        store.refresh_deadline(&r.id, at_ms(deadline + 1)).unwrap();
                        if i % 3 == 0 {
                            store.remove_runner(&r.id).unwrap();
                        } else {
                            r.state = used(60, Some(deadline + 1));
                            kept.push(r);
                        }
                    }
                    kept
                })
            })
            .collect();

        let reader = {
            let store = store.clone();
            let barrier = &barrier;
            s.spawn(move || {
                barrier.wait();
                let mut reads = 0;
                while reads < 200 {
                    for r in store.runners().unwrap() {
                        // Every record read is one some writer wrote whole.
                        let template = runner(r.id.as_str(), r.environment.get(), r.state);
                        assert_eq!(r, template);
                    }
                    reads += 1;
                }
            })
        };

        barrier.wait();
        let kept = writers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .map(|r| (r.id.clone(), r))
            .collect();
        reader.join().unwrap();
        kept
    });

    assert_eq!(
        store.runners().unwrap(),
        expected.values().cloned().collect::<Vec<_>>()
    );
    assert_eq!(store.environments().unwrap().len(), THREADS);

    store.close().unwrap();
    drop(store);
    let reopened = StateStore::open(&dir.path().join("state.redb")).unwrap();
    assert_eq!(
        reopened.runners().unwrap(),
        expected.into_values().collect::<Vec<_>>()
    );
}

#[test]
fn racing_updates_of_one_runner_leave_one_of_the_written_states() {
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::open(&dir.path().join("state.redb")).unwrap();
    let r = runner("1-shared", 1, used(60, Some(0)));
    store.put_runner(&r).unwrap();

    thread::scope(|s| {
        for t in 0..THREADS as u64 {
            let store = store.clone();
            let id = r.id.clone();
            s.spawn(move || {
                for i in 0..PER_THREAD as u64 {
                    if t % 2 == 0 {
                        store.refresh_deadline(&id, at_ms(t * 1_000 + i)).unwrap();
                    } else {
                        store
                            .set_runner_state(&id, &used(60, Some(t * 1_000 + i)))
                            .unwrap();
                    }
                }
            });
        }
    });

    let last_values: Vec<_> = (0..THREADS as u64)
        .map(|t| used(60, Some(t * 1_000 + PER_THREAD as u64 - 1)))
        .collect();
    let found = store.runner(&r.id).unwrap().unwrap();
    assert!(
        last_values.contains(&found.state),
        "the final state {:?} is the last write of some thread",
        found.state
    );
    assert_eq!(found.backend_data, r.backend_data);
}

#[test]
fn updates_racing_a_removal_either_apply_or_find_no_runner() {
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::open(&dir.path().join("state.redb")).unwrap();
    let ids: Vec<_> = (0..50)
        .map(|i| {
            let r = runner(&format!("1-{i:02}"), 1, used(60, None));
            store.put_runner(&r).unwrap();
            r.id
        })
        .collect();

    thread::scope(|s| {
        let remover = store.clone();
        let to_remove = ids.clone();
        s.spawn(move || {
            for id in &to_remove {
                remover.remove_runner(id).unwrap();
            }
        });
        for _ in 0..3 {
            let store = store.clone();
            let ids = ids.clone();
            s.spawn(move || {
                for id in &ids {
                    match store.refresh_deadline(id, at_ms(42)) {
                        Ok(()) | Err(StoreError::RunnerNotFound(_)) => {}
                        Err(e) => panic!("unexpected error: {e:?}"),
                    }
                }
            });
        }
    });

    assert!(
        store.runners().unwrap().is_empty(),
        "an update never resurrects a removed runner"
    );
}

#[test]
fn close_racing_writers_keeps_every_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.redb");
    let store = StateStore::open(&path).unwrap();

    let acknowledged: Vec<StoredRunner> = thread::scope(|s| {
        let writers: Vec<_> = (0..4)
            .map(|t| {
                let store = store.clone();
                s.spawn(move || {
                    let mut acked = Vec::new();
                    for i in 0..1_000 {
                        let r = runner(&format!("{t}-{i:04}"), t, RunnerState::Idle);
                        match store.put_runner(&r) {
                            Ok(()) => acked.push(r),
                            Err(StoreError::Closed) => break,
                            Err(e) => panic!("unexpected error: {e:?}"),
                        }
                    }
                    acked
                })
            })
            .collect();
        // Close once some writes have landed; the writers see Closed from then on.
        while store.runners().unwrap().len() < 20 && !writers.iter().all(|w| w.is_finished()) {
            thread::yield_now();
        }
        store.close().unwrap();
        writers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    });

    let reopened = StateStore::open(&path).unwrap();
    assert!(reopened.previous_shutdown_was_clean());
    let stored = reopened.runners().unwrap();
    assert_eq!(stored.len(), acknowledged.len());
    for r in &acknowledged {
        assert!(stored.contains(r), "{} was acknowledged but lost", r.id);
    }
}
