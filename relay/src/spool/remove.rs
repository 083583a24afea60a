//! Removing a finished message: its local message file (kept as a free file
//! for reuse when the pool has room, see [`super::free_files`]), then releasing its
//! object copy, whose segment goes once none of its messages is live.

use super::fsync::remove_if_present;
use super::{Spool, SpoolError};

impl Spool {
    /// Removes the local copy of message `id` (waiting first for copies
    /// still being written): its name goes; its file joins the free files
    /// when they have room, else it is unlinked. A copy already gone is not
    /// an error.
    ///
    /// `durable`: wait until the removal is on disk. A cluster needs that
    /// before it forgets the message's final state (else a power failure
    /// could bring back a copy that looks new). A single relay does not: the
    /// worst a lost removal does is deliver the message once more after a
    /// power failure, as Postfix, which does not sync its unlinks, would too.
    pub async fn remove_local(&self, id: &str, durable: bool) -> Result<(), SpoolError> {
        self.copies_settled(id).await;
        let path = self.message_path(id);
        let free = self.inner.free.clone();
        tokio::task::spawn_blocking(move || {
            // Kept for a new message to overwrite when the pool has room.
            if !free.is_some_and(|free| free.keep(&path)) {
                remove_if_present(&path)?;
            }
            Ok::<_, std::io::Error>(())
        })
        .await
        .map_err(std::io::Error::other)??;
        if durable {
            // Shared with the commits and removals around it (group commit).
            self.message_dir_sync(id).sync().await?;
        }
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
