//! Shared by the spool tests: envelopes, configs, and the conformance suite
//! every object-copy backend (local directory, real S3) must pass.
//!
//! Included with `#[path]` by `spool_local.rs` and `spool_s3.rs`; compiled
//! alone it has no tests.
#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use object_store::ObjectStoreExt;
use postern::config::Config;
use postern::smtp::params::Mailbox;
use postern::spool::envelope::{ClientInfo, Envelope, Recipient, ENVELOPE_VERSION};
use postern::spool::object::{ObjectCopy, Part, SINGLE_PUT_MAX};
use postern::spool::quorum::{CopyJob, CopyTarget};
use postern::spool::Spool;
use sha2::{Digest, Sha256};

/// An envelope as the SMTP driver would hand it over (id, length and digest
/// are left for the spool to fill).
pub fn envelope() -> Envelope {
    Envelope {
        version: ENVELOPE_VERSION,
        id: String::new(),
        spool: String::new(),
        reverse_path: Some(Mailbox {
            local: "sender".into(),
            domain: "example.org".into(),
        }),
        mail_params: Default::default(),
        recipients: vec![Recipient {
            address: Mailbox {
                local: "rcpt".into(),
                domain: "example.net".into(),
            },
            params: Default::default(),
        }],
        client: ClientInfo {
            addr: "192.0.2.1:40000".into(),
            helo: "client.example.org".into(),
            esmtp: true,
            tls: None,
            auth: None,
        },
        listener: "smtp".into(),
        received_at: "2026-01-01T00:00:00Z".into(),
        data_len: 0,
        data_sha256: String::new(),
        added_headers: String::new(),
    }
}

/// Deterministic wire-format message data of about `len` octets.
pub fn message(len: usize) -> Vec<u8> {
    let mut data = b"Received: from client.example.org\r\nSubject: test\r\n\r\n".to_vec();
    let mut n = 0u64;
    while data.len() < len {
        data.extend_from_slice(format!("line {n} of the body, some filler text\r\n").as_bytes());
        n += 1;
    }
    data
}

/// Receives `data` in `chunk`-sized writes and commits it.
pub async fn receive(
    spool: &Spool,
    data: &[u8],
    chunk: usize,
) -> Result<postern::spool::Committed, postern::spool::SpoolError> {
    let mut incoming = spool.begin().await?;
    for part in data.chunks(chunk) {
        incoming.write(part).await?;
    }
    incoming.commit(envelope()).await
}

/// Names in `dir`, sorted, dotfiles left out.
pub fn files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| !n.starts_with('.'))
        .collect();
    names.sort();
    names
}

/// A job for `data`, staged in `dir` under a fresh id.
pub fn job(dir: &Path, data: &[u8]) -> Arc<CopyJob> {
    let id = postern::spool::id::IdGenerator::new().next_id();
    let eml_path = dir.join(format!("{id}.eml"));
    std::fs::write(&eml_path, data).unwrap();
    let mut env = envelope();
    env.id = id.clone();
    env.data_len = data.len() as u64;
    env.data_sha256 = hex::encode(Sha256::digest(data));
    Arc::new(CopyJob {
        spool: String::new(),
        id,
        eml_file: Arc::new(std::fs::File::open(&eml_path).unwrap()),
        eml_path,
        data_len: data.len() as u64,
        envelope_json: Bytes::from(serde_json::to_vec(&env).unwrap()),
    })
}

/// Reads one object, `None` when absent.
pub async fn object(copy: &ObjectCopy, id: &str, part: Part) -> Option<Vec<u8>> {
    let store = copy.store().unwrap();
    match store.get(&copy.key("", id, part)).await {
        Ok(got) => Some(got.bytes().await.unwrap().to_vec()),
        Err(object_store::Error::NotFound { .. }) => None,
        Err(err) => panic!("reading {id}: {err}"),
    }
}

/// The conformance suite for an object-copy backend described by `config`.
pub async fn object_copy_conformance(config: &Config) {
    let staging = tempfile::tempdir().unwrap();
    let copy = Arc::new(ObjectCopy::from_config(config).unwrap());

    // A small message: both parts land with the exact bytes.
    let data = message(10_000);
    let small = job(staging.path(), &data);
    Arc::clone(&copy).write(Arc::clone(&small)).await.unwrap();
    assert_eq!(
        object(&copy, &small.id, Part::Data).await.as_deref(),
        Some(&data[..])
    );
    assert_eq!(
        object(&copy, &small.id, Part::Envelope).await.as_deref(),
        Some(&small.envelope_json[..])
    );

    // Never overwrite: a second write of the same id is refused.
    let err = Arc::clone(&copy)
        .write(Arc::clone(&small))
        .await
        .unwrap_err();
    assert!(err.is_already_exists(), "expected AlreadyExists, got {err}");
    assert_eq!(
        object(&copy, &small.id, Part::Data).await.as_deref(),
        Some(&data[..])
    );

    // Removal takes both parts back and may be repeated.
    Arc::clone(&copy)
        .remove(String::new(), small.id.clone())
        .await
        .unwrap();
    assert_eq!(object(&copy, &small.id, Part::Envelope).await, None);
    assert_eq!(object(&copy, &small.id, Part::Data).await, None);
    Arc::clone(&copy)
        .remove(String::new(), small.id.clone())
        .await
        .unwrap();

    // A message above the single-PUT limit goes up in parts, bytes intact.
    let big_data = message(SINGLE_PUT_MAX as usize + 3 * 1024 * 1024 + 7);
    let big = job(staging.path(), &big_data);
    Arc::clone(&copy).write(Arc::clone(&big)).await.unwrap();
    let stored = object(&copy, &big.id, Part::Data).await.unwrap();
    assert_eq!(stored.len(), big_data.len());
    assert!(stored == big_data, "large message bytes differ");
    let err = Arc::clone(&copy).write(Arc::clone(&big)).await.unwrap_err();
    assert!(err.is_already_exists(), "expected AlreadyExists, got {err}");
    Arc::clone(&copy)
        .remove(String::new(), big.id.clone())
        .await
        .unwrap();
    assert_eq!(object(&copy, &big.id, Part::Data).await, None);
}
