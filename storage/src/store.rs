//! [`StateStore`]: the redb file, its tables, and which writes are durable when they return.
//!
//! Every write is one redb transaction, so a record is either entirely old or entirely new
//! after a crash. This module never holds a transaction across calls and never blocks a reader
//! on a writer (redb readers see the last commit).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime};

use redb::{
    Database, DatabaseError, Durability, ReadableDatabase, ReadableTable, TableDefinition,
    WriteTransaction,
};
use runner_core::{EnvironmentId, EnvironmentSpec, RunnerId, RunnerState};
use tracing::{debug, info, warn};

use crate::error::StoreError;
use crate::record::{
    StoredRunner, decode_environment, decode_runner, encode_environment, encode_runner, unix_millis,
};

/// The version of the record layout this build writes; a file with another version is refused.
pub(crate) const SCHEMA_VERSION: u32 = 1;

/// Environment id → JSON `EnvironmentSpec`; u64 keys iterate in id order.
const ENVIRONMENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("environments");
/// Runner id → runner record (see `record`).
const RUNNERS: TableDefinition<&str, &[u8]> = TableDefinition::new("runners");
/// Store-wide facts: the schema version and the open marker.
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

const SCHEMA_KEY: &str = "schema_version";
/// Present while a process has the store open; `close` removes it.
const OPEN_MARKER_KEY: &str = "open";

/// redb's page cache; the records are small, so the default of 1 GiB would only be a larger cap.
const CACHE_BYTES: usize = 32 * 1024 * 1024;

/// An eventual write is promoted to a durable one when the last durable commit is older than
/// this, which bounds how much an idle-but-refreshing store can lose and how long redb keeps
/// pages of non-durable commits from being reused.
const EVENTUAL_WINDOW: Duration = Duration::from_secs(1);

/// The durable embedded store of environment and runner records.
///
/// Cheap to clone (an `Arc` inside); clones share one open file. Methods block on disk I/O:
/// async callers run them in `tokio::task::spawn_blocking`. Writers from many threads are
/// serialised by redb (one write transaction at a time); reads run concurrently with them.
///
/// Each write says whether it is **durable** (fsync'd before the call returns: it survives a
/// `kill -9` or power loss after returning) or **eventual** (visible to readers at once, and
/// made durable by the next durable commit: any durable write, [`StateStore::flush`],
/// [`StateStore::close`], dropping the last handle, or an eventual write issued more than a
/// second after the last durable commit). A crash loses at most the eventual writes since the
/// last durable commit, never part of one write, and never reorders writes.
#[derive(Clone)]
pub struct StateStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    /// `None` once `close` has run.
    db: RwLock<Option<Database>>,
    previous_shutdown_was_clean: bool,
    /// When the last durable commit finished; read and written only inside a write transaction,
    /// so writers see it in commit order.
    last_durable: Mutex<Instant>,
    /// Told about every committed write (metrics); set at most once.
    observer: OnceLock<Arc<dyn WriteObserver>>,
}

/// Receives the duration of every committed write, e.g. for a latency metric. Called on the
/// writing thread right after the commit: an implementation must return at once.
pub trait WriteObserver: Send + Sync + 'static {
    /// A write named `operation` (`put_runner`, `set_runner_state`, `refresh_deadline`, …)
    /// committed, `durable` (fsync'd) or not, `took` after the call began.
    fn write_committed(&self, operation: &'static str, durable: bool, took: Duration);
}

impl fmt::Debug for StateStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let open = self
            .inner
            .db
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some();
        f.debug_struct("StateStore")
            .field("path", &self.inner.path)
            .field("open", &open)
            .field(
                "previous_shutdown_was_clean",
                &self.inner.previous_shutdown_was_clean,
            )
            .finish()
    }
}

/// Whether a write must be on disk when its call returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Commit {
    Durable,
    Eventual,
}

impl StateStore {
    /// Opens or creates the store file at `path` (parent directories are created).
    ///
    /// A file left by a crash (even `kill -9` mid-commit) is repaired to its last durable commit.
    /// Records the open durably, so that the next open can tell whether this one ended with
    /// [`StateStore::close`]. Fails with [`StoreError::AlreadyOpen`] while another handle, in this
    /// or another process, has the file open.
    pub fn open(path: &Path) -> Result<StateStore, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::CreateDirectory {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(path)
            .map_err(|source| match source {
                DatabaseError::DatabaseAlreadyOpen => StoreError::AlreadyOpen {
                    path: path.to_path_buf(),
                },
                source => StoreError::Open {
                    path: path.to_path_buf(),
                    source,
                },
            })?;
        let previous_shutdown_was_clean = mark_open(&db, path)?;
        if previous_shutdown_was_clean {
            info!(path = %path.display(), "opened the state store");
        } else {
            warn!(
                path = %path.display(),
                "opened the state store; the process that had it open before did not close it"
            );
        }
        Ok(StateStore {
            inner: Arc::new(Inner {
                path: path.to_path_buf(),
                db: RwLock::new(Some(db)),
                previous_shutdown_was_clean,
                last_durable: Mutex::new(Instant::now()),
                observer: OnceLock::new(),
            }),
        })
    }

    /// Reports every committed write from now on to `observer`; returns `false` (and changes
    /// nothing) when an observer is already set.
    pub fn set_write_observer(&self, observer: Arc<dyn WriteObserver>) -> bool {
        self.inner.observer.set(observer).is_ok()
    }

    /// Whether the process that last had this store open ended with [`StateStore::close`]. A
    /// brand-new store counts as clean.
    ///
    /// Answers for the moment of [`StateStore::open`]; it does not change while the store is open.
    pub fn previous_shutdown_was_clean(&self) -> bool {
        self.inner.previous_shutdown_was_clean
    }

    /// Flushes everything and records a clean shutdown, then closes the file (releasing its
    /// lock, so it can be opened again at once).
    ///
    /// Waits for calls in flight on other clones; afterwards every method of this handle and its
    /// clones returns [`StoreError::Closed`], except `close` itself, which returns `Ok(())` again.
    pub fn close(&self) -> Result<(), StoreError> {
        let mut slot = self
            .inner
            .db
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let Some(db) = slot.take() else {
            return Ok(());
        };
        let txn = db.begin_write()?;
        {
            let mut meta = txn.open_table(META)?;
            meta.remove(OPEN_MARKER_KEY)?;
        }
        txn.commit()?;
        db.close().map_err(StoreError::Close)?;
        info!(path = %self.inner.path.display(), "closed the state store");
        Ok(())
    }

    /// Makes every eventual write so far durable (one fsync'd commit); returns when it is.
    ///
    /// Callers that want a bound on what a crash loses call it periodically; it costs one
    /// durable commit even when nothing is pending.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.write("flush", Commit::Durable, |_| Ok(()))
    }

    /// Inserts or replaces the environment `spec.id`. **Durable.**
    ///
    /// Environments are few and change on an operator's request; losing one would lose every
    /// runner of it at the next start, so the call returns only once it is on disk.
    pub fn put_environment(&self, spec: &EnvironmentSpec) -> Result<(), StoreError> {
        let value = encode_environment(spec)?;
        self.write("put_environment", Commit::Durable, |txn| {
            txn.open_table(ENVIRONMENTS)?
                .insert(spec.id.get(), value.as_slice())?;
            Ok(())
        })?;
        debug!(environment_id = %spec.id, "stored environment");
        Ok(())
    }

    /// Removes the environment `id`; removing an absent one succeeds. **Durable.**
    ///
    /// Runner records of the environment are left alone: the caller removes them as it destroys
    /// the runners.
    pub fn remove_environment(&self, id: EnvironmentId) -> Result<(), StoreError> {
        self.write("remove_environment", Commit::Durable, |txn| {
            txn.open_table(ENVIRONMENTS)?.remove(id.get())?;
            Ok(())
        })?;
        debug!(environment_id = %id, "removed environment");
        Ok(())
    }

    /// Every stored environment, ordered by id.
    pub fn environments(&self) -> Result<Vec<EnvironmentSpec>, StoreError> {
        self.read(|db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(ENVIRONMENTS)?;
            let mut out = Vec::new();
            for entry in table.iter()? {
                let (key, value) = entry?;
                out.push(decode_environment(key.value(), value.value())?);
            }
            Ok(out)
        })
    }

    /// Inserts or replaces the record of `runner.id`. **Durable.**
    ///
    /// A runner is recorded when its sandbox exists; losing the record would leak the sandbox,
    /// and losing a replaced record's `Used` state would let a claimed runner be handed out
    /// again, so the call returns only once it is on disk.
    pub fn put_runner(&self, runner: &StoredRunner) -> Result<(), StoreError> {
        let value = encode_runner(runner)?;
        self.write("put_runner", Commit::Durable, |txn| {
            txn.open_table(RUNNERS)?
                .insert(runner.id.as_str(), value.as_slice())?;
            Ok(())
        })?;
        debug!(runner_id = %runner.id, environment_id = %runner.environment, "stored runner");
        Ok(())
    }

    /// Replaces the state of runner `id`, keeping the rest of its record. **Durable.**
    ///
    /// This is a claim's used-mark: if it were lost in a crash, the runner would come back idle
    /// and could be handed to a second client, so the call returns only once it is on disk. The
    /// way back to `Idle` is durable too (state transitions are rare; only deadline refreshes are
    /// eventual). Fails with [`StoreError::RunnerNotFound`] when no record of `id` exists.
    pub fn set_runner_state(&self, id: &RunnerId, state: &RunnerState) -> Result<(), StoreError> {
        self.update_runner("set_runner_state", id, Commit::Durable, |runner| {
            Ok(runner.with_state(*state))
        })?;
        debug!(runner_id = %id, ?state, "stored runner state");
        Ok(())
    }

    /// Sets the inactivity deadline of the used runner `id`. **Eventual.**
    ///
    /// The manager refreshes the deadline at the start of every operation on a runner, so this is
    /// the hot write; it does not wait for an fsync. A crash can lose the refreshes since the last
    /// durable commit (at most about a second of them while writes keep coming): the runner is
    /// then recovered as used with an earlier deadline, which is safe (it expires sooner, it is
    /// never handed out twice). Fails with [`StoreError::RunnerNotFound`] when no record of `id`
    /// exists and [`StoreError::RunnerNotUsed`] when it is recorded idle.
    pub fn refresh_deadline(&self, id: &RunnerId, deadline: SystemTime) -> Result<(), StoreError> {
        self.update_runner(
            "refresh_deadline",
            id,
            Commit::Eventual,
            |runner| match runner.state {
                RunnerState::Idle => Err(StoreError::RunnerNotUsed(id.clone())),
                RunnerState::Used(mut used) => {
                    used.deadline = Some(deadline);
                    Ok(runner.with_state(RunnerState::Used(used)))
                }
            },
        )?;
        tracing::trace!(runner_id = %id, deadline_unix_ms = unix_millis(deadline), "refreshed deadline");
        Ok(())
    }

    /// Removes the record of runner `id`; removing an absent one succeeds. **Durable.**
    ///
    /// A lost removal would bring back the record of a destroyed sandbox (as idle, possibly), so
    /// the call returns only once it is on disk.
    pub fn remove_runner(&self, id: &RunnerId) -> Result<(), StoreError> {
        self.write("remove_runner", Commit::Durable, |txn| {
            txn.open_table(RUNNERS)?.remove(id.as_str())?;
            Ok(())
        })?;
        debug!(runner_id = %id, "removed runner");
        Ok(())
    }

    /// The record of runner `id`, or `None` when there is none.
    pub fn runner(&self, id: &RunnerId) -> Result<Option<StoredRunner>, StoreError> {
        self.read(|db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(RUNNERS)?;
            let Some(value) = table.get(id.as_str())? else {
                return Ok(None);
            };
            decode_runner(id.as_str(), value.value()).map(Some)
        })
    }

    /// Every stored runner, ordered by id (byte order of the id text).
    pub fn runners(&self) -> Result<Vec<StoredRunner>, StoreError> {
        self.read(|db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(RUNNERS)?;
            let mut out = Vec::new();
            for entry in table.iter()? {
                let (key, value) = entry?;
                out.push(decode_runner(key.value(), value.value())?);
            }
            Ok(out)
        })
    }

    /// Reads the record of `id`, replaces it by `change(record)`, in one transaction.
    fn update_runner(
        &self,
        operation: &'static str,
        id: &RunnerId,
        commit: Commit,
        change: impl FnOnce(StoredRunner) -> Result<StoredRunner, StoreError>,
    ) -> Result<(), StoreError> {
        self.write(operation, commit, |txn| {
            let mut table = txn.open_table(RUNNERS)?;
            let current = match table.get(id.as_str())? {
                Some(value) => decode_runner(id.as_str(), value.value())?,
                None => return Err(StoreError::RunnerNotFound(id.clone())),
            };
            let value = encode_runner(&change(current)?)?;
            table.insert(id.as_str(), value.as_slice())?;
            Ok(())
        })
    }

    fn read<T>(
        &self,
        op: impl FnOnce(&Database) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let slot = self.inner.db.read().unwrap_or_else(PoisonError::into_inner);
        op(slot.as_ref().ok_or(StoreError::Closed)?)
    }

    /// Runs `op` in one write transaction and commits it as `commit` asks; an error from `op`
    /// aborts the transaction, so nothing of it is written. A committed write is reported to the
    /// observer as `operation`, with how long it took (waiting for the writer lock included).
    fn write<T>(
        &self,
        operation: &'static str,
        commit: Commit,
        op: impl FnOnce(&WriteTransaction) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let started = Instant::now();
        let (out, durable) = self.write_unobserved(commit, op)?;
        if let Some(observer) = self.inner.observer.get() {
            observer.write_committed(operation, durable, started.elapsed());
        }
        Ok(out)
    }

    fn write_unobserved<T>(
        &self,
        commit: Commit,
        op: impl FnOnce(&WriteTransaction) -> Result<T, StoreError>,
    ) -> Result<(T, bool), StoreError> {
        let slot = self.inner.db.read().unwrap_or_else(PoisonError::into_inner);
        let db = slot.as_ref().ok_or(StoreError::Closed)?;
        let mut txn = db.begin_write()?;
        // Inside the transaction, so concurrent writers read and update this in commit order.
        let durable = commit == Commit::Durable || self.last_durable_elapsed() >= EVENTUAL_WINDOW;
        if !durable {
            txn.set_durability(Durability::None)?;
        }
        let out = op(&txn)?;
        txn.commit()?;
        if durable {
            *self
                .inner
                .last_durable
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Instant::now();
        }
        Ok((out, durable))
    }

    fn last_durable_elapsed(&self) -> Duration {
        self.inner
            .last_durable
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .elapsed()
    }
}

/// Creates the tables, checks the schema version and writes the open marker, in one durable
/// transaction. Returns whether the marker was absent (the previous holder closed the store, or
/// there was none).
fn mark_open(db: &Database, path: &Path) -> Result<bool, StoreError> {
    let txn = db.begin_write()?;
    let clean = {
        txn.open_table(ENVIRONMENTS)?;
        txn.open_table(RUNNERS)?;
        let mut meta = txn.open_table(META)?;
        let schema = meta.get(SCHEMA_KEY)?.map(|v| v.value().to_vec());
        match schema {
            None => {
                meta.insert(SCHEMA_KEY, SCHEMA_VERSION.to_le_bytes().as_slice())?;
            }
            Some(bytes) => {
                let found = <[u8; 4]>::try_from(bytes.as_slice())
                    .map(u32::from_le_bytes)
                    .map_err(|_| StoreError::CorruptRecord {
                        what: "the schema version".into(),
                        reason: format!("it is {} bytes long instead of 4", bytes.len()),
                    })?;
                if found != SCHEMA_VERSION {
                    return Err(StoreError::UnsupportedSchema {
                        path: path.to_path_buf(),
                        found,
                        supported: SCHEMA_VERSION,
                    });
                }
            }
        }
        let clean = meta.get(OPEN_MARKER_KEY)?.is_none();
        let marker = format!(
            "pid {} at {} ms",
            std::process::id(),
            unix_millis(SystemTime::now())
        );
        meta.insert(OPEN_MARKER_KEY, marker.as_bytes())?;
        clean
    };
    txn.commit()?;
    Ok(clean)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_with_a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(META)
                .unwrap()
                .insert(SCHEMA_KEY, (SCHEMA_VERSION + 1).to_le_bytes().as_slice())
                .unwrap();
            txn.commit().unwrap();
        }
        let err = StateStore::open(&path).unwrap_err();
        assert!(
            matches!(err, StoreError::UnsupportedSchema { found, supported, .. }
                if found == SCHEMA_VERSION + 1 && supported == SCHEMA_VERSION),
            "{err:?}"
        );
    }

    #[test]
    fn eventual_write_is_promoted_once_the_last_durable_commit_is_old() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(&dir.path().join("state.redb")).unwrap();
        let long_ago = Instant::now()
            .checked_sub(EVENTUAL_WINDOW * 2)
            .unwrap_or_else(Instant::now);
        *store.inner.last_durable.lock().unwrap() = long_ago;
        store.write("test", Commit::Eventual, |_| Ok(())).unwrap();
        assert!(
            store.last_durable_elapsed() < EVENTUAL_WINDOW,
            "the eventual write should have been committed durably"
        );
        let before = *store.inner.last_durable.lock().unwrap();
        store.write("test", Commit::Eventual, |_| Ok(())).unwrap();
        assert_eq!(
            *store.inner.last_durable.lock().unwrap(),
            before,
            "a recent durable commit leaves the next eventual write non-durable"
        );
    }
}
