//! Removing a finished message from every copy: `.env` first (uncommitting
//! it), then `.eml`, locally and in the object store.

use object_store::ObjectStoreExt;

use super::fsync::remove_if_present;
use super::{Spool, SpoolError};

impl Spool {
    /// Removes the local and object-store copies of message `id` of `spool`.
    /// Copies already gone are not an error.
    pub async fn remove(&self, spool: &str, id: &str) -> Result<(), SpoolError> {
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
        if let Some(store) = self.object_store() {
            for envelope_part in [true, false] {
                if let Some(key) = self.object_key(spool, id, envelope_part) {
                    match store.delete(&key).await {
                        Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                        // Reported, so a cluster keeps the message's final
                        // state: a later owner that finds this copy then
                        // knows it is finished instead of delivering it again.
                        Err(err) => {
                            tracing::warn!(id, key = %key, "cannot delete object copy: {err}");
                            return Err(SpoolError::Io(std::io::Error::other(format!(
                                "cannot delete object copy {key}: {err}"
                            ))));
                        }
                    }
                }
            }
        }
        Ok(())
    }
}
