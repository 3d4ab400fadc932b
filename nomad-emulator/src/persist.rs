//! Persistence of the cluster state in `data_dir` (jobs, evaluations, allocations, nodes and the
//! raft index), so a new emulator process on the same directory carries on.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::emulator::Inner;
use crate::state::Persisted;

/// The state file in `dir`.
pub(crate) fn file(dir: &Path) -> PathBuf {
    dir.join("nomad-emulator-state.json")
}

/// Reads the state of `dir`; `Ok(None)` when there is none yet.
pub(crate) fn load(dir: &Path) -> Result<Option<Persisted>, String> {
    let path = file(dir);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| e.to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

/// Writes `state` to `dir` atomically (temporary file, then rename).
pub(crate) fn save(dir: &Path, state: &Persisted) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join("nomad-emulator-state.json.tmp");
    let bytes = serde_json::to_vec(state).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, file(dir))
}

/// Writes the state after commits (coalesced: at most one write in flight).
pub(crate) async fn writer(inner: Arc<Inner>, dir: PathBuf) {
    let mut rx = inner.lock().index_tx.subscribe();
    loop {
        if rx.changed().await.is_err() {
            return;
        }
        let snapshot = inner.lock().persisted();
        let dir2 = dir.clone();
        let r = tokio::task::spawn_blocking(move || save(&dir2, &snapshot)).await;
        if let Ok(Err(e)) = r {
            tracing::warn!(error = %e, dir = %dir.display(), "state write failed");
        }
    }
}
