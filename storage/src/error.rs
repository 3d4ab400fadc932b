//! What can go wrong when the store is opened, read or written.

use std::path::PathBuf;

use runner_core::RunnerId;

/// An error of a [`StateStore`](crate::StateStore) operation.
///
/// Each variant is one thing that can go wrong, so callers can match on it: the two that the
/// records themselves cause ([`StoreError::RunnerNotFound`], [`StoreError::RunnerNotUsed`]) are
/// expected in normal operation; the others mean the store or its file is in trouble.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The directory that should hold the store file could not be created.
    #[error("could not create the store directory {path}: {source}")]
    CreateDirectory {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Another open handle (in this or another process) holds the store file's lock.
    #[error("the store at {path} is already open, in this or another process")]
    AlreadyOpen {
        /// The store file.
        path: PathBuf,
    },
    /// The store file could not be opened or created (unreadable, not a store, needs an upgrade).
    #[error("could not open the store at {path}: {source}")]
    Open {
        /// The store file.
        path: PathBuf,
        /// What redb reported.
        source: redb::DatabaseError,
    },
    /// The file was written by a build with a newer record layout than this one reads.
    #[error(
        "the store at {path} has schema version {found}, but this build reads only version {supported}"
    )]
    UnsupportedSchema {
        /// The store file.
        path: PathBuf,
        /// The version recorded in the file.
        found: u32,
        /// The version this build writes and reads.
        supported: u32,
    },
    /// [`StateStore::close`](crate::StateStore::close) was called; the handle and its clones can
    /// no longer be used.
    #[error("the store has been closed")]
    Closed,
    /// No record exists for the runner.
    #[error("no record of runner {0} is stored")]
    RunnerNotFound(RunnerId),
    /// The runner is recorded idle, so it has no inactivity deadline to refresh.
    #[error("runner {0} is recorded idle, so it has no inactivity deadline")]
    RunnerNotUsed(RunnerId),
    /// A stored record could not be decoded; the file was damaged or written by something else.
    #[error("the stored record of {what} is corrupt: {reason}")]
    CorruptRecord {
        /// Which record (e.g. `runner 3-…`).
        what: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A record could not be encoded (cannot happen with the record types this crate defines;
    /// kept so encoding never panics).
    #[error("could not encode the record of {what}: {source}")]
    Encode {
        /// Which record.
        what: String,
        /// What serde_json reported.
        source: serde_json::Error,
    },
    /// A record's header does not fit the record layout's 4 GiB length field.
    #[error("the record of {what} is too large to store ({len} bytes of header)")]
    RecordTooLarge {
        /// Which record.
        what: String,
        /// The header's length in bytes.
        len: usize,
    },
    /// A transaction could not be started.
    #[error("could not start a store transaction: {0}")]
    Transaction(#[from] redb::TransactionError),
    /// A table could not be opened inside a transaction.
    #[error("could not open a store table: {0}")]
    Table(#[from] redb::TableError),
    /// Reading or writing the file failed (I/O error, corruption detected by a checksum).
    #[error("reading or writing the store failed: {0}")]
    Storage(#[from] redb::StorageError),
    /// A transaction's durability could not be lowered for an eventual write.
    #[error("could not choose the durability of a store write: {0}")]
    Durability(#[from] redb::SetDurabilityError),
    /// A transaction could not be committed; none of its writes took effect.
    #[error("could not commit to the store: {0}")]
    Commit(#[from] redb::CommitError),
    /// The file could not be shut down cleanly by [`StateStore::close`](crate::StateStore::close).
    #[error("could not close the store: {0}")]
    Close(redb::DatabaseError),
}
