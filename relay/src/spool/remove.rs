//! Removing a finished message: the local `.env` first (uncommitting it),
//! then the `.eml`; then releasing its object copy, whose segment goes once
//! none of its messages is live.

use super::fsync::remove_if_present;
use super::{Spool, SpoolError};

impl Spool {
    /// Removes the local copy of message `id` (waiting first for copies
    /// still being written). A copy already gone is not an error.
    pub async fn remove_local(&self, id: &str) -> Result<(), SpoolError> {
        self.copies_settled(id).await;
        let env = self.envelope_path(id);
        let eml = self.message_path(id);
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            remove_if_present(&env)?;
            remove_if_present(&eml)
        })
        .await
        .map_err(std::io::Error::other)??;
        // Shared with the commits and removals around it (group commit).
        self.inner.dir_sync.sync().await?;
        Ok(())
    }

    /// Releases the object copy of finished message `id`. Returns whether a
    /// segment held it: then its final state must stay until the segment is
    /// gone ([`super::object::ObjectCopy::finished`] says when), and only if
    /// `forget_state` (every other copy went).
    pub async fn release_object(&self, id: &str, forget_state: bool) -> bool {
        match &self.inner.object {
            Some(object) => object.release(id, forget_state).await,
            None => false,
        }
    }
}
