//! The object-store copy: `<prefix>/messages/<id>.eml`, then `<id>.env`, both
//! created only if absent, in S3 (the `object_store` crate) or in a local
//! directory (our own backend, because `object_store`'s LocalFileSystem does
//! not fsync).
//!
//! The bytes are read from the local `.eml` after the data ended. Memory stays
//! bounded: S3 uploads draw on a shared byte budget, messages above
//! [`SINGLE_PUT_MAX`] go up in parts, and the directory backend copies
//! file-to-file in the kernel.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use object_store::aws::{AmazonS3, AmazonS3Builder, S3CopyIfNotExists};
use object_store::path::Path as ObjectPath;
use object_store::{
    ClientOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, RetryConfig,
};
use tokio::sync::Semaphore;

use super::fsync::{remove_if_present, rename_noreplace, DirSync};
use super::quorum::{joined, CopyError, CopyJob, CopyTarget};
use crate::config::{Config, CopyKind, ObjectStoreConfig};

/// Largest message uploaded with one PUT; larger ones go up in parts.
pub const SINGLE_PUT_MAX: u64 = 8 * 1024 * 1024;

/// Size of each part of a multipart upload (S3 wants at least 5 MiB).
pub const PART_SIZE: u64 = 8 * 1024 * 1024;

/// Message bytes all S3 uploads together may hold in memory, in KiB.
const MEMORY_BUDGET_KIB: u32 = 64 * 1024;

/// Which part of a message an object holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// `<id>.eml`.
    Data,
    /// `<id>.env`.
    Envelope,
}

impl Part {
    fn extension(self) -> &'static str {
        match self {
            Part::Data => "eml",
            Part::Envelope => "env",
        }
    }
}

#[derive(Debug)]
enum Backend {
    S3 {
        store: Arc<AmazonS3>,
        prefix: ObjectPath,
    },
    Dir {
        root: PathBuf,
        sync: Arc<DirSync>,
    },
}

/// The object-store copy of messages.
#[derive(Debug)]
pub struct ObjectCopy {
    backend: Backend,
    budget: Semaphore,
}

impl ObjectCopy {
    /// Builds the copy `config.object_store` describes; creates the directory
    /// of the local backend. Requests are retried for at most `spool.deadline`.
    pub fn from_config(config: &Config) -> io::Result<ObjectCopy> {
        let backend = match &config.object_store {
            ObjectStoreConfig::Local { .. } => {
                let root = config.local_object_dir();
                let messages = root.join("messages");
                std::fs::create_dir_all(&messages)?;
                Backend::Dir {
                    root,
                    sync: DirSync::new(messages),
                }
            }
            ObjectStoreConfig::S3 {
                bucket,
                prefix,
                endpoint,
                region,
                access_key_id,
                secret_access_key,
                allow_http,
            } => {
                let mut builder = AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .with_region(region)
                    .with_allow_http(*allow_http)
                    .with_copy_if_not_exists(S3CopyIfNotExists::Multipart)
                    .with_retry(RetryConfig {
                        retry_timeout: config.spool.deadline,
                        ..RetryConfig::default()
                    })
                    .with_client_options(
                        ClientOptions::new()
                            .with_allow_http(*allow_http)
                            .with_connect_timeout(
                                Duration::from_secs(5).min(config.spool.deadline),
                            ),
                    );
                if let Some(endpoint) = endpoint {
                    // Test servers and most S3-compatible stores are not
                    // reachable through bucket subdomains.
                    builder = builder
                        .with_endpoint(endpoint)
                        .with_virtual_hosted_style_request(false);
                }
                if let Some(key) = access_key_id {
                    builder = builder.with_access_key_id(key);
                }
                if let Some(secret) = secret_access_key {
                    builder = builder.with_secret_access_key(secret);
                }
                let store = builder.build().map_err(io::Error::other)?;
                Backend::S3 {
                    store: Arc::new(store),
                    prefix: ObjectPath::from(prefix.as_str()),
                }
            }
        };
        Ok(ObjectCopy {
            backend,
            budget: Semaphore::new(MEMORY_BUDGET_KIB as usize),
        })
    }

    /// The key of one part of message `id` of `spool`, relative to the store:
    /// `<prefix>/spools/<spool>/messages/<id>.<ext>` in S3 (so the relay that
    /// takes a spool over lists exactly its messages), `<prefix>/messages/`
    /// for a relay outside a cluster. The local-directory backend serves one
    /// machine and keeps one flat `messages/` directory.
    pub fn key(&self, spool: &str, id: &str, part: Part) -> ObjectPath {
        let name = format!("{id}.{}", part.extension());
        match &self.backend {
            Backend::S3 { prefix, .. } => Self::messages_prefix(prefix, spool).join(name.as_str()),
            Backend::Dir { .. } => ObjectPath::from("messages").join(name.as_str()),
        }
    }

    /// Where the messages of `spool` live under `prefix`.
    pub fn messages_prefix(prefix: &ObjectPath, spool: &str) -> ObjectPath {
        if spool.is_empty() {
            prefix.clone().join("messages")
        } else {
            prefix.clone().join("spools").join(spool).join("messages")
        }
    }

    /// The prefix all S3 keys of this relay live under (`None` for the
    /// local-directory backend).
    pub fn s3_prefix(&self) -> Option<&ObjectPath> {
        match &self.backend {
            Backend::S3 { prefix, .. } => Some(prefix),
            Backend::Dir { .. } => None,
        }
    }

    /// The store, for readers (the delivery engine, repair, tests). The local
    /// backend is served by `object_store`'s LocalFileSystem over the same
    /// directory.
    pub fn store(&self) -> io::Result<Arc<dyn ObjectStore>> {
        match &self.backend {
            Backend::S3 { store, .. } => Ok(Arc::clone(store) as Arc<dyn ObjectStore>),
            Backend::Dir { root, .. } => Ok(Arc::new(
                object_store::local::LocalFileSystem::new_with_prefix(root)
                    .map_err(io::Error::other)?,
            )),
        }
    }

    fn staging_key(prefix: &ObjectPath, id: &str) -> ObjectPath {
        prefix
            .clone()
            .join("staging")
            .join(format!("{id}.eml").as_str())
    }

    async fn write_s3(
        &self,
        store: &AmazonS3,
        prefix: &ObjectPath,
        job: &CopyJob,
    ) -> Result<(), CopyError> {
        let data_key = self.key(&job.spool, &job.id, Part::Data);
        if job.data_len <= SINGLE_PUT_MAX {
            let _permit = self.reserve(job.data_len).await;
            let bytes = read_at(&job.eml_file, 0, job.data_len).await?;
            let put = put_create(store, &data_key, bytes.into()).await;
            data_in_place(put, store, &data_key, job.data_len).await?;
        } else {
            // Multipart uploads cannot be conditional, so the parts go to a
            // staging key and a conditional copy creates the real one.
            let staging = Self::staging_key(prefix, &job.id);
            let result = self.upload_parts(store, &staging, job).await;
            let result = match result {
                Ok(()) => store
                    .copy_if_not_exists(&staging, &data_key)
                    .await
                    .map_err(CopyError::from),
                Err(err) => Err(err),
            };
            if let Err(err) = store.delete(&staging).await {
                tracing::warn!(id = %job.id, error = %err, "cannot delete a staging object");
            }
            data_in_place(result, store, &data_key, job.data_len).await?;
        }
        put_create(
            store,
            &self.key(&job.spool, &job.id, Part::Envelope),
            job.envelope_json.clone().into(),
        )
        .await
    }

    async fn upload_parts(
        &self,
        store: &AmazonS3,
        key: &ObjectPath,
        job: &CopyJob,
    ) -> Result<(), CopyError> {
        let mut upload = store.put_multipart(key).await?;
        let mut offset = 0;
        let result = async {
            while offset < job.data_len {
                let len = PART_SIZE.min(job.data_len - offset);
                let _permit = self.reserve(len).await;
                let bytes = read_at(&job.eml_file, offset, len).await?;
                upload.put_part(PutPayload::from(bytes)).await?;
                offset += len;
            }
            upload.complete().await?;
            Ok::<(), CopyError>(())
        }
        .await;
        if result.is_err() {
            let _ = upload.abort().await;
        }
        result
    }

    async fn reserve(&self, len: u64) -> tokio::sync::SemaphorePermit<'_> {
        let kib = len.div_ceil(1024).clamp(1, u64::from(MEMORY_BUDGET_KIB)) as u32;
        self.budget
            .acquire_many(kib)
            .await
            .expect("the upload budget is never closed")
    }

    async fn remove_s3(store: &AmazonS3, keys: [ObjectPath; 3]) -> Result<(), CopyError> {
        for key in keys {
            match store.delete(&key).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(err) => return Err(err.into()),
            }
        }
        Ok(())
    }
}

/// The data object is written, or was already: two PUTs are not atomic, so
/// an earlier attempt (cut off before its `.env`, e.g. by the store going
/// down) may have left this message's `.eml`. One of the right length lets
/// the `.env` go on; without this a repair would stop at the `.eml` forever.
async fn data_in_place(
    put: Result<(), CopyError>,
    store: &AmazonS3,
    key: &ObjectPath,
    len: u64,
) -> Result<(), CopyError> {
    match put {
        Err(err) if err.is_already_exists() => match store.head(key).await {
            Ok(meta) if meta.size == len => Ok(()),
            _ => Err(err),
        },
        other => other,
    }
}

async fn put_create(
    store: &AmazonS3,
    key: &ObjectPath,
    payload: PutPayload,
) -> Result<(), CopyError> {
    let opts = PutOptions {
        mode: PutMode::Create,
        ..PutOptions::default()
    };
    store.put_opts(key, payload, opts).await?;
    Ok(())
}

/// Reads `len` bytes at `offset` of `file` on a blocking thread.
async fn read_at(file: &Arc<File>, offset: u64, len: u64) -> io::Result<Bytes> {
    let file = Arc::clone(file);
    tokio::task::spawn_blocking(move || {
        let mut buf = PageBuf::new(len as usize)?;
        file.read_exact_at(buf.as_mut(), offset)?;
        Ok(Bytes::from_owner(buf))
    })
    .await
    .map_err(io::Error::other)?
}

/// A buffer in its own anonymous mapping, so its memory goes back to the
/// system when dropped. Multi-megabyte buffers from malloc raise glibc's
/// dynamic mmap threshold and then stay in the heap: with many uploads that
/// kept RSS near 300 MiB although the budget allows 64 MiB in flight.
struct PageBuf {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: PageBuf owns its mapping exclusively; it is plain memory.
unsafe impl Send for PageBuf {}
// SAFETY: shared access is read-only through `as_ref`.
unsafe impl Sync for PageBuf {}

impl PageBuf {
    fn new(len: usize) -> io::Result<PageBuf> {
        if len == 0 {
            return Ok(PageBuf {
                ptr: std::ptr::NonNull::dangling(),
                len,
            });
        }
        // SAFETY: a fresh private anonymous mapping; no existing memory is touched.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = std::ptr::NonNull::new(ptr.cast())
            .ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(PageBuf { ptr, len })
    }
}

impl AsRef<[u8]> for PageBuf {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `ptr` is valid for `len` bytes (zero-filled by mmap) while self lives.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl AsMut<[u8]> for PageBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_ref`, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for PageBuf {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: unmaps exactly the mapping created in `new`.
            unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
        }
    }
}

/// Blocking: writes a private temp file in `dir` with what `fill` writes and
/// fsyncs it; returns its path.
fn stage(
    dir: &std::path::Path,
    name: &str,
    fill: impl FnOnce(&mut File) -> io::Result<()>,
) -> io::Result<PathBuf> {
    let tmp = dir.join(format!(".{name}.{:016x}.tmp", rand::random::<u64>()));
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        fill(&mut file)?;
        file.sync_data()
    })();
    match result {
        Ok(()) => Ok(tmp),
        Err(err) => {
            let _ = remove_if_present(&tmp);
            Err(err)
        }
    }
}

/// Blocking: moves the staged `.eml` and then `.env` into place, never over
/// an existing object; on failure nothing of ours stays visible.
fn place(
    dir: &std::path::Path,
    id: &str,
    eml_tmp: &std::path::Path,
    env_tmp: &std::path::Path,
) -> Result<(), CopyError> {
    let exists = |path: PathBuf| CopyError::AlreadyExists {
        key: path.display().to_string(),
    };
    let eml = dir.join(format!("{id}.eml"));
    let env = dir.join(format!("{id}.env"));
    match rename_noreplace(eml_tmp, &eml) {
        Ok(()) => {}
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => return Err(exists(eml)),
        Err(err) => return Err(err.into()),
    }
    match rename_noreplace(env_tmp, &env) {
        Ok(()) => Ok(()),
        Err(err) => {
            // The `.eml` is ours (it did not exist), so it may go.
            let _ = remove_if_present(&eml);
            if err.kind() == io::ErrorKind::AlreadyExists {
                Err(exists(env))
            } else {
                Err(err.into())
            }
        }
    }
}

impl CopyTarget for ObjectCopy {
    fn kind(&self) -> CopyKind {
        CopyKind::ObjectStore
    }

    fn write(self: Arc<Self>, job: Arc<CopyJob>) -> BoxFuture<'static, Result<(), CopyError>> {
        Box::pin(async move {
            match &self.backend {
                Backend::S3 { store, prefix } => self.write_s3(store, prefix, &job).await,
                Backend::Dir { sync, .. } => {
                    let dir = sync.dir().to_owned();
                    // Both parts are written and fsync'd side by side, then
                    // named in order (`.eml` first) and made durable with one
                    // group-committed directory fsync.
                    let data = {
                        let (dir, job) = (dir.clone(), Arc::clone(&job));
                        tokio::task::spawn_blocking(move || {
                            stage(&dir, &format!("{}.eml", job.id), |file| {
                                // Opened afresh for a private offset; io::copy
                                // moves the bytes in the kernel (copy_file_range).
                                let mut source = File::open(&job.eml_path)?;
                                let copied = io::copy(&mut source, file)?;
                                if copied != job.data_len {
                                    return Err(io::Error::new(
                                        io::ErrorKind::UnexpectedEof,
                                        format!(
                                            "{} has {copied} octets, expected {}",
                                            job.eml_path.display(),
                                            job.data_len
                                        ),
                                    ));
                                }
                                Ok(())
                            })
                        })
                    };
                    let envelope = {
                        let (dir, job) = (dir.clone(), Arc::clone(&job));
                        tokio::task::spawn_blocking(move || {
                            stage(&dir, &format!("{}.env", job.id), |file| {
                                io::Write::write_all(file, &job.envelope_json)
                            })
                        })
                    };
                    let (data, envelope) = tokio::join!(data, envelope);
                    let (eml_tmp, env_tmp) = match (joined(data), joined(envelope)) {
                        (Ok(eml_tmp), Ok(env_tmp)) => (eml_tmp, env_tmp),
                        (Ok(tmp), Err(err)) | (Err(err), Ok(tmp)) => {
                            let _ = remove_if_present(&tmp);
                            return Err(err);
                        }
                        (Err(err), Err(_)) => return Err(err),
                    };
                    let id = job.id.clone();
                    let placed = tokio::task::spawn_blocking(move || {
                        let placed = place(&dir, &id, &eml_tmp, &env_tmp);
                        let _ = remove_if_present(&eml_tmp);
                        let _ = remove_if_present(&env_tmp);
                        placed
                    })
                    .await?;
                    placed?;
                    sync.sync().await?;
                    Ok(())
                }
            }
        })
    }

    fn remove(
        self: Arc<Self>,
        spool: String,
        id: String,
    ) -> BoxFuture<'static, Result<(), CopyError>> {
        Box::pin(async move {
            match &self.backend {
                Backend::S3 { store, prefix } => {
                    let keys = [
                        self.key(&spool, &id, Part::Envelope),
                        self.key(&spool, &id, Part::Data),
                        Self::staging_key(prefix, &id),
                    ];
                    Self::remove_s3(store, keys).await
                }
                Backend::Dir { sync, .. } => {
                    let dir = sync.dir().to_owned();
                    let id2 = id.clone();
                    tokio::task::spawn_blocking(move || {
                        remove_if_present(&dir.join(format!("{id2}.env")))
                    })
                    .await??;
                    sync.sync().await?;
                    let dir = sync.dir().to_owned();
                    tokio::task::spawn_blocking(move || {
                        remove_if_present(&dir.join(format!("{id}.eml")))
                    })
                    .await??;
                    Ok(())
                }
            }
        })
    }
}
