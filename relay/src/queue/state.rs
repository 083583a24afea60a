//! Durable per-recipient delivery state, kept apart from the immutable
//! `.eml`/`.env` (DESIGN.md §2.5): `<data_dir>/state/<id>.json`, replaced
//! atomically (write, fsync, rename, fsync the directory) before the next step.
//! Outside a cluster a message delivered to every recipient gets none: it
//! is removed at once (`Queue::attempt`).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::spool::fsync::{remove_existing, remove_if_present, write_synced, DirSync};

/// Version written by this build.
pub const STATE_VERSION: u32 = 1;

/// Where one recipient stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Not delivered yet.
    Pending,
    /// Accepted by the next hop.
    Delivered,
    /// Refused for good or expired; a DSN reports it.
    Failed,
}

/// One recipient's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecipientState {
    /// Where it stands.
    pub status: Status,
    /// The last reply (ours or the next hop's), for `queue show` and DSNs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_reply: Option<String>,
    /// The server that gave it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<String>,
}

/// The mutable state of one message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryState {
    /// Format version.
    pub version: u32,
    /// Attempts made so far.
    pub attempts: u32,
    /// When the next attempt is due (Unix ms).
    pub next_attempt_ms: u64,
    /// Held by an operator: not delivered until released.
    #[serde(default)]
    pub held: bool,
    /// A delay warning was sent.
    #[serde(default)]
    pub delay_warned: bool,
    /// Per recipient, in envelope order.
    pub recipients: Vec<RecipientState>,
}

impl DeliveryState {
    /// The state of a new message: everything pending, due now.
    pub fn new(recipients: usize, now_ms: u64) -> DeliveryState {
        DeliveryState {
            version: STATE_VERSION,
            attempts: 0,
            next_attempt_ms: now_ms,
            held: false,
            delay_warned: false,
            recipients: vec![
                RecipientState {
                    status: Status::Pending,
                    last_reply: None,
                    remote: None,
                };
                recipients
            ],
        }
    }

    /// Indexes of recipients still pending.
    pub fn pending(&self) -> Vec<usize> {
        (0..self.recipients.len())
            .filter(|&i| self.recipients[i].status == Status::Pending)
            .collect()
    }

    /// Whether every recipient is delivered or failed.
    pub fn is_final(&self) -> bool {
        self.recipients.iter().all(|r| r.status != Status::Pending)
    }

    /// This state with `other`'s knowledge added: a recipient final in
    /// either is final (delivery outcomes never go back to pending).
    pub fn merged(&self, other: &DeliveryState) -> DeliveryState {
        let mut merged = self.clone();
        merged.attempts = self.attempts.max(other.attempts);
        merged.delay_warned |= other.delay_warned;
        for (mine, theirs) in merged.recipients.iter_mut().zip(&other.recipients) {
            if mine.status == Status::Pending && theirs.status != Status::Pending {
                *mine = theirs.clone();
            }
        }
        merged
    }

    /// The last reply of any pending recipient, for listings.
    pub fn last_error(&self) -> Option<&str> {
        self.recipients
            .iter()
            .filter(|r| r.status == Status::Pending)
            .find_map(|r| r.last_reply.as_deref())
    }
}

/// Writes `bytes` to `tmp` (fsync'd) and renames it over `path`; the caller
/// syncs the directory. A leftover `tmp` from a failed save is replaced.
fn write_durable_rename(tmp: &Path, path: &Path, bytes: &[u8]) -> io::Result<()> {
    remove_if_present(tmp)?;
    write_synced(tmp, bytes)?;
    std::fs::rename(tmp, path)
}

/// Reads and writes state files.
#[derive(Debug, Clone)]
pub struct StateStore {
    dir: PathBuf,
    sync: Arc<DirSync>,
}

impl StateStore {
    /// Opens (creating) the state directory.
    pub fn open(dir: &Path) -> io::Result<StateStore> {
        std::fs::create_dir_all(dir)?;
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "tmp") {
                remove_if_present(&path)?;
            }
        }
        Ok(StateStore {
            dir: dir.to_owned(),
            sync: DirSync::new(dir.to_owned()),
        })
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// The saved state, if any; a damaged file reads as absent (the message
    /// is then retried from scratch, which may duplicate but never loses).
    pub fn load(&self, id: &str) -> Option<DeliveryState> {
        let bytes = std::fs::read(self.path(id)).ok()?;
        match serde_json::from_slice(&bytes) {
            Ok(state) => Some(state),
            Err(err) => {
                tracing::error!(id, "damaged delivery state, starting over: {err}");
                None
            }
        }
    }

    /// Durably replaces the state.
    pub async fn save(&self, id: &str, state: &DeliveryState) -> io::Result<()> {
        let bytes = serde_json::to_vec(state).map_err(io::Error::other)?;
        let path = self.path(id);
        let tmp = self.dir.join(format!("{id}.json.tmp"));
        tokio::task::spawn_blocking(move || write_durable_rename(&tmp, &path, &bytes))
            .await
            .map_err(io::Error::other)??;
        self.sync.sync().await
    }

    /// Removes the state of a finished message (most have none: see
    /// `Queue::attempt`), syncing the directory only when one was there.
    pub async fn remove(&self, id: &str) -> io::Result<()> {
        let path = self.path(id);
        let existed = tokio::task::spawn_blocking(move || remove_existing(&path))
            .await
            .map_err(io::Error::other)??;
        if existed {
            self.sync.sync().await?;
        }
        Ok(())
    }

    /// Ids that have a state file.
    pub fn ids(&self) -> io::Result<Vec<String>> {
        let mut ids = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let name = entry?.file_name();
            if let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".json")) {
                ids.push(id.to_owned());
            }
        }
        Ok(ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn save_load_remove() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let mut state = DeliveryState::new(2, 5);
        state.recipients[0].status = Status::Delivered;
        store.save("ID", &state).await.unwrap();
        assert_eq!(store.load("ID"), Some(state.clone()));
        assert_eq!(state.pending(), vec![1]);
        assert!(!state.is_final());
        assert_eq!(store.ids().unwrap(), vec!["ID".to_owned()]);
        store.remove("ID").await.unwrap();
        assert_eq!(store.load("ID"), None);
        std::fs::write(dir.path().join("BAD.json"), b"{").unwrap();
        assert_eq!(store.load("BAD"), None);
    }
}
