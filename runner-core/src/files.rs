//! File operations on a runner: copy, delete, list and read (Poseidon's `/files` routes).

use std::fmt;

use bytes::Bytes;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};

use crate::executor::BackendError;

/// One file to write into a runner. A path ending in `/` creates a directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileCopy {
    /// Relative to the working directory (`/workspace`) or absolute.
    pub path: String,
    /// The file's bytes (ignored for directories).
    pub content: Bytes,
}

/// A `PATCH /runners/{id}/files` request: deletions happen before copies.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileUpdate {
    /// Paths to remove recursively.
    pub delete: Vec<String>,
    /// Files to write (as the sandbox's root; files 0744, directories 01777).
    pub copy: Vec<FileCopy>,
}

/// A `GET /runners/{id}/files` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListFilesRequest {
    /// The directory (or file) to list; relative paths are under the working directory.
    pub path: String,
    /// Whether to descend into subdirectories.
    pub recursive: bool,
    /// List as the sandbox's root rather than as `user`.
    pub privileged: bool,
}

/// One entry of a listing, as `ls -l` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FileHeader {
    /// The path, prefixed with the listed directory (e.g. `./dir/a.txt`).
    pub name: String,
    /// One character as in `ls -l`: `-`, `d`, `l`, `c`, `b`, `p`, `s`.
    pub entry_type: char,
    /// A symlink's target; absent for other entries or when unreadable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_target: Option<String>,
    /// Size in bytes.
    pub size: u64,
    /// Last modification, unix seconds.
    pub modification_time: i64,
    /// `rwxr--r--` style permissions.
    pub permissions: String,
    /// Owner name as the sandbox's passwd gives it (or the numeric id).
    pub owner: String,
    /// Group name as the sandbox's group file gives it (or the numeric id).
    pub group: String,
}

/// A file's content, streamed.
pub struct FileContent {
    /// The size announced before streaming (`Content-Length`).
    pub size: u64,
    /// The bytes; yields exactly `size` bytes unless an error ends it early.
    pub body: BoxStream<'static, Result<Bytes, FileError>>,
}

impl fmt::Debug for FileContent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileContent")
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

/// One path of a file update that failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileFailure {
    /// The path as the client gave it.
    pub path: String,
    /// Why it failed.
    pub reason: String,
}

/// Why a file operation failed.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The path does not exist or the requesting user may not read it (HTTP 424).
    #[error("file not found or insufficient permissions")]
    NotFound,
    /// Some paths of an update failed; the others were applied (HTTP 500 `UNKNOWN`).
    #[error("file operation failed for {}", describe(.0))]
    Partial(Vec<FileFailure>),
    /// The request itself is malformed (HTTP 400).
    #[error("invalid path {0:?}")]
    InvalidPath(String),
    /// The backend failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
}

fn describe(failures: &[FileFailure]) -> String {
    failures
        .iter()
        .map(|f| format!("{}: {}", f.path, f.reason))
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_serialises_like_poseidon() {
        let h = FileHeader {
            name: "./a.txt".into(),
            entry_type: '-',
            link_target: None,
            size: 3,
            modification_time: 1,
            permissions: "rwxr--r--".into(),
            owner: "root".into(),
            group: "root".into(),
        };
        let v = serde_json::to_value(&h).unwrap();
        assert_eq!(v["entryType"], "-");
        assert!(v.get("linkTarget").is_none());
        assert_eq!(v["modificationTime"], 1);
    }

    #[test]
    fn partial_failure_names_every_failed_path() {
        let e = FileError::Partial(vec![
            FileFailure {
                path: "/proc/1/environ".into(),
                reason: "Cannot open: Permission denied".into(),
            },
            FileFailure {
                path: "b".into(),
                reason: "x".into(),
            },
        ]);
        let text = e.to_string();
        assert!(text.contains("/proc/1/environ: Cannot open"));
        assert!(text.contains("b: x"));
    }
}
