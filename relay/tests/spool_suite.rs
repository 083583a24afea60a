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
use postern::spool::object::{ObjectCopy, SegmentEvent, SINGLE_PUT_MAX};
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

/// Names of the files in `dir` and its subdirectories (the local spool
/// spreads messages over 32), sorted, dotfiles left out.
pub fn files(dir: &Path) -> Vec<String> {
    fn walk(dir: &Path, names: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_dir() {
                walk(&entry.path(), names);
            } else {
                names.push(entry.file_name().into_string().unwrap());
            }
        }
    }
    let mut names = Vec::new();
    walk(dir, &mut names);
    names.retain(|n| !n.starts_with('.'));
    names.sort();
    names
}

/// The data and the envelope JSON of the sealed message file at `path`.
pub fn sealed(path: &Path) -> (Vec<u8>, Vec<u8>) {
    postern::spool::message_file::read_sealed(path).unwrap()
}

/// A job for `data`, staged in `dir` under a fresh id.
pub fn job(dir: &Path, data: &[u8]) -> Arc<CopyJob> {
    let id = postern::spool::id::IdGenerator::new().next_id();
    let data_path = dir.join(format!("{id}.part"));
    std::fs::write(&data_path, data).unwrap();
    let mut env = envelope();
    env.id = id.clone();
    env.data_len = data.len() as u64;
    env.data_sha256 = hex::encode(Sha256::digest(data));
    Arc::new(CopyJob {
        spool: String::new(),
        id,
        data_file: Arc::new(std::fs::File::open(&data_path).unwrap()),
        data_path,
        data_len: data.len() as u64,
        envelope_json: Bytes::from(serde_json::to_vec(&env).unwrap()),
    })
}

/// The envelope JSON and data of message `id` in the object copy, `None`
/// when no segment holds it.
pub async fn object(copy: &ObjectCopy, id: &str) -> Option<(Vec<u8>, Vec<u8>)> {
    copy.read(id)
        .await
        .unwrap_or_else(|err| panic!("reading {id}: {err}"))
        .map(|(env, data)| (env.to_vec(), data.to_vec()))
}

/// Keys of the segment objects under `copy`'s prefix for `spool`.
pub async fn segment_keys(copy: &ObjectCopy, spool: &str) -> Vec<String> {
    use futures::TryStreamExt;
    let listed: Vec<_> = copy
        .store()
        .list(Some(&copy.segments_prefix(spool)))
        .try_collect()
        .await
        .unwrap();
    let mut keys: Vec<String> = listed
        .into_iter()
        .map(|m| m.location.to_string())
        .filter(|k| k.ends_with(".seg"))
        .collect();
    keys.sort();
    keys
}

/// The conformance suite for an object-copy backend described by `config`.
pub async fn object_copy_conformance(config: &Config) {
    let staging = tempfile::tempdir().unwrap();
    let copy = Arc::new(ObjectCopy::from_config(config).unwrap());
    assert!(segment_keys(&copy, "").await.is_empty());

    // A small message: envelope and data land with the exact bytes, in one
    // segment of their own.
    let data = message(10_000);
    let small = job(staging.path(), &data);
    Arc::clone(&copy).write(Arc::clone(&small)).await.unwrap();
    assert_eq!(
        object(&copy, &small.id).await,
        Some((small.envelope_json.to_vec(), data.clone()))
    );
    assert_eq!(segment_keys(&copy, "").await.len(), 1);

    // Never overwrite: a second write of the same id is refused.
    let err = Arc::clone(&copy)
        .write(Arc::clone(&small))
        .await
        .unwrap_err();
    assert!(err.is_already_exists(), "expected AlreadyExists, got {err}");

    // Releasing the only message deletes its segment; again is harmless.
    assert!(copy.release(&small.id, true).await);
    assert_eq!(object(&copy, &small.id).await, None);
    assert!(segment_keys(&copy, "").await.is_empty());
    assert!(!copy.release(&small.id, true).await);

    // Messages written together share segments (one per window), each
    // readable alone with ranged reads.
    let batch: Vec<_> = (0..20)
        .map(|n| job(staging.path(), &message(1_000 + n * 997)))
        .collect();
    let writes = batch
        .iter()
        .map(|job| Arc::clone(&copy).write(Arc::clone(job)));
    for result in futures::future::join_all(writes).await {
        result.unwrap();
    }
    let keys = segment_keys(&copy, "").await;
    assert!(
        !keys.is_empty() && keys.len() <= 2,
        "20 messages written at once went into {} segments",
        keys.len()
    );
    for job in &batch {
        let (env, data) = object(&copy, &job.id).await.unwrap();
        assert_eq!(env, job.envelope_json.to_vec());
        assert_eq!(data.len() as u64, job.data_len);
        assert!(data == std::fs::read(&job.data_path).unwrap());
    }

    // A relay that never saw them (a restart, a takeover) finds them by
    // listing the segments and reading their indexes.
    let fresh = ObjectCopy::from_config(config).unwrap();
    let mut ids: Vec<String> = batch.iter().map(|j| j.id.clone()).collect();
    ids.sort();
    assert_eq!(fresh.list_spool("").await.unwrap(), ids);
    let (env, _) = object(&fresh, &ids[3]).await.unwrap();
    assert!(!env.is_empty());

    // A damaged segment goes to quarantine (kept, counted) and its messages
    // are not counted.
    let damaged = copy
        .segments_prefix("")
        .join("01ZZZZZZZZZZZZZZZZZZZZZZZZ.seg");
    let garbage = Bytes::from_static(b"not a segment at all, PSTNSEG1");
    copy.store()
        .put(&damaged, garbage.clone().into())
        .await
        .unwrap();
    let another = ObjectCopy::from_config(config).unwrap();
    assert_eq!(another.list_spool("").await.unwrap(), ids);
    assert_eq!(another.quarantined_segments(), 1);
    let quarantined = another
        .quarantine_prefix("")
        .join("01ZZZZZZZZZZZZZZZZZZZZZZZZ.seg");
    let kept = copy.store().get(&quarantined).await.unwrap();
    assert_eq!(kept.bytes().await.unwrap(), garbage);
    assert!(matches!(
        copy.store().head(&damaged).await,
        Err(object_store::Error::NotFound { .. })
    ));
    assert!(!segment_keys(&copy, "").await.contains(&damaged.to_string()));
    copy.store().delete(&quarantined).await.unwrap();

    // A segment goes only when its last message is released.
    for job in &batch[..19] {
        copy.release(&job.id, true).await;
    }
    assert_eq!(segment_keys(&copy, "").await.len(), 1);
    assert!(object(&copy, &batch[19].id).await.is_some());
    copy.release(&batch[19].id, true).await;
    assert!(segment_keys(&copy, "").await.is_empty());

    // A message above the single-PUT limit goes up in parts, bytes intact.
    let big_data = message(SINGLE_PUT_MAX as usize + 3 * 1024 * 1024 + 7);
    let big = job(staging.path(), &big_data);
    Arc::clone(&copy).write(Arc::clone(&big)).await.unwrap();
    let (_, stored) = object(&copy, &big.id).await.unwrap();
    assert_eq!(stored.len(), big_data.len());
    assert!(stored == big_data, "large message bytes differ");
    let err = Arc::clone(&copy).write(Arc::clone(&big)).await.unwrap_err();
    assert!(err.is_already_exists(), "expected AlreadyExists, got {err}");
    Arc::clone(&copy)
        .remove(String::new(), big.id.clone())
        .await
        .unwrap();
    assert_eq!(object(&copy, &big.id).await, None);
    assert!(segment_keys(&copy, "").await.is_empty());

    // Copy-forward: a segment mostly finished lets its last live message
    // move into a new segment, and then goes.
    let ten: Vec<_> = (0..10)
        .map(|n| job(staging.path(), &message(5_000 + n)))
        .collect();
    let writes = ten
        .iter()
        .map(|job| Arc::clone(&copy).write(Arc::clone(job)));
    for result in futures::future::join_all(writes).await {
        result.unwrap();
    }
    // Not stale while half its bytes are live.
    assert!(copy.stale_segments(std::time::Duration::ZERO).is_empty());
    for job in &ten[..9] {
        copy.release(&job.id, true).await;
    }
    let before = segment_keys(&copy, "").await;
    let stale = copy.stale_segments(std::time::Duration::ZERO);
    assert_eq!(stale.len(), before.len(), "{stale:?}");
    assert!(stale.iter().all(|(_, ids)| ids == &[ten[9].id.clone()]));
    // Young segments are not stale.
    assert!(copy
        .stale_segments(std::time::Duration::from_secs(3600))
        .is_empty());
    Arc::clone(&copy)
        .forward(Arc::clone(&ten[9]))
        .await
        .unwrap();
    let after = segment_keys(&copy, "").await;
    assert_eq!(after.len(), 1, "{after:?}");
    assert!(!before.contains(&after[0]), "{before:?} {after:?}");
    let (env, data) = object(&copy, &ten[9].id).await.unwrap();
    assert_eq!(env, ten[9].envelope_json.to_vec());
    assert!(data == std::fs::read(&ten[9].data_path).unwrap());
    copy.release(&ten[9].id, true).await;
    assert!(segment_keys(&copy, "").await.is_empty());

    // In a cluster spool: a message refused after its copy landed in a
    // segment that stays is reported withdrawn (to be recorded final); the
    // states of released messages may go once their segment is gone.
    let mut events = copy.events();
    let in_spool = |data: &[u8]| {
        let mut job = Arc::try_unwrap(job(staging.path(), data)).unwrap();
        job.spool = "s1".into();
        Arc::new(job)
    };
    let (refused, kept) = (in_spool(&message(3_000)), in_spool(&message(4_000)));
    let (a, b) = tokio::join!(
        Arc::clone(&copy).write(Arc::clone(&refused)),
        Arc::clone(&copy).write(Arc::clone(&kept))
    );
    a.unwrap();
    b.unwrap();
    // Both joined one batch in the same poll: one segment holds them.
    assert_eq!(segment_keys(&copy, "s1").await.len(), 1);
    Arc::clone(&copy)
        .remove("s1".into(), refused.id.clone())
        .await
        .unwrap();
    assert_eq!(
        events.try_recv().unwrap(),
        SegmentEvent::Withdrawn("s1".into(), refused.id.clone())
    );
    copy.release(&kept.id, true).await;
    let mut forgotten = match events.try_recv().unwrap() {
        SegmentEvent::Forget(spool, ids) if spool == "s1" => ids,
        other => panic!("expected Forget, got {other:?}"),
    };
    forgotten.sort();
    let mut both = vec![refused.id.clone(), kept.id.clone()];
    both.sort();
    assert_eq!(forgotten, both);
    assert!(segment_keys(&copy, "s1").await.is_empty());
}

/// Repair conformance for an object-copy backend: local data damaged while
/// the relay was down (cut short, a byte flipped, gone) is found before
/// delivery and replaced with the object copy's intact bytes, the damaged
/// data kept in quarantine; an intact message is left as it is.
pub async fn damaged_local_data_is_repaired_from_the_object_copy(config: &Config) {
    use postern::config::CopyKind;
    use postern::spool::Checked;
    let (spool, _) = Spool::open(config).await.unwrap();
    let mut sent = Vec::new();
    for n in 0..3 {
        let data = message(7_000 + n * 1_001);
        let id = receive(&spool, &data, 512).await.unwrap().id;
        sent.push((id, data));
    }
    // Cut short: the tail, and the seal with it, is gone.
    let cut = std::fs::OpenOptions::new()
        .write(true)
        .open(spool.message_path(&sent[0].0))
        .unwrap();
    cut.set_len(100).unwrap();
    // One data octet flipped in place: the seal still holds.
    let flipped = std::fs::OpenOptions::new()
        .write(true)
        .open(spool.message_path(&sent[1].0))
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&flipped, &[sent[1].1[3_000] ^ 0x20], 3_000).unwrap();
    drop(spool);

    let (spool, recovered) = Spool::open(config).await.unwrap();
    assert_eq!(recovered.quarantined, 0, "{recovered:?}");
    assert_eq!(recovered.messages.len(), 3, "the cut one repaired at start");
    let mut outcomes = Vec::new();
    for envelope in &recovered.messages {
        outcomes.push(spool.verify_or_repair(envelope).await.unwrap());
    }
    let repaired = Checked::Repaired(CopyKind::ObjectStore);
    assert_eq!(
        outcomes,
        vec![Checked::Intact, repaired, Checked::Intact],
        "in id order: cut (repaired at start), flipped, intact"
    );
    for (id, data) in &sent {
        assert!(
            sealed(&spool.message_path(id)).0 == *data,
            "{id}: the spool holds the original bytes again"
        );
    }
    let mut kept = files(spool.quarantine_dir());
    kept.sort();
    let mut expected = vec![format!("{}.msg", sent[0].0), format!("{}.msg", sent[1].0)];
    expected.sort();
    assert_eq!(kept, expected, "the damaged files, kept for a human");
    let scratch = config.data_dir.join("repair");
    assert!(files(&scratch).is_empty(), "{:?}", files(&scratch));
}
