//! The spool on one machine: the local spool plus the local-directory object
//! store (the embedded default), on a real filesystem.

#[path = "spool_suite.rs"]
mod suite;

use postern::config::{Config, CopyKind};
use postern::spool::envelope::Envelope;
use postern::spool::{Spool, SpoolError};
use sha2::{Digest, Sha256};
use suite::{envelope, files, message, receive};

fn config(root: &std::path::Path) -> Config {
    let mut config = Config {
        data_dir: root.to_owned(),
        ..Config::default()
    };
    config.spool.reserve_bytes = 0;
    // Both copies: these tests check the local-directory object store too.
    config.spool.copies = vec![CopyKind::Local, CopyKind::ObjectStore];
    config.spool.required = 2;
    config
}

#[tokio::test]
async fn object_copy_conformance_local_directory() {
    let root = tempfile::tempdir().unwrap();
    suite::object_copy_conformance(&config(root.path())).await;
}

#[tokio::test]
async fn commit_writes_both_copies_with_the_same_bytes() {
    let root = tempfile::tempdir().unwrap();
    let (spool, recovered) = Spool::open(&config(root.path())).await.unwrap();
    assert!(recovered.messages.is_empty());
    let data = message(3 * 1024 * 1024 + 11);
    let committed = receive(&spool, &data, 1000).await.unwrap();
    let id = committed.id.clone();
    assert_eq!(committed.confirmed.len(), 2);

    let (local_data, local_json) = suite::sealed(&spool.message_path(&id));
    assert!(local_data == data);
    let env: Envelope = serde_json::from_slice(&local_json).unwrap();
    let mut expected = envelope();
    expected.id = id.clone();
    expected.data_len = data.len() as u64;
    expected.data_sha256 = hex::encode(Sha256::digest(&data));
    assert_eq!(env, expected);
    assert_eq!(files(spool.dir()), vec![format!("{id}.msg")]);

    // The object copy: one segment file holding the message.
    let (object_env, object_data) = spool
        .object_copy()
        .unwrap()
        .read(&id)
        .await
        .unwrap()
        .expect("an object copy");
    assert!(object_data == data);
    let object_env: Envelope = serde_json::from_slice(&object_env).unwrap();
    assert_eq!(object_env, expected);
    let segments = files(&root.path().join("objects/segments"));
    assert_eq!(segments.len(), 1, "{segments:?}");
    assert!(segments[0].ends_with(".seg"), "{segments:?}");

    assert_eq!(spool.committed().await.unwrap(), vec![expected]);
}

#[tokio::test]
async fn an_empty_message_commits() {
    let root = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(&config(root.path())).await.unwrap();
    let committed = spool
        .begin()
        .await
        .unwrap()
        .commit(envelope())
        .await
        .unwrap();
    let env = &spool.committed().await.unwrap()[0];
    assert_eq!(env.id, committed.id);
    assert_eq!(env.data_len, 0);
    assert_eq!(env.data_sha256, hex::encode(Sha256::digest(b"")));
}

#[tokio::test]
async fn dropped_and_aborted_messages_leave_nothing() {
    let root = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(&config(root.path())).await.unwrap();
    let mut dropped = spool.begin().await.unwrap();
    dropped.write(&message(300_000)).await.unwrap();
    assert_eq!(files(spool.dir()).len(), 1);
    drop(dropped);
    let mut aborted = spool.begin().await.unwrap();
    aborted.write(b"Subject: x\r\n\r\n").await.unwrap();
    aborted.abort().await;
    assert!(files(spool.dir()).is_empty());
    assert!(spool.committed().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_commits_get_distinct_ordered_ids() {
    let root = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(&config(root.path())).await.unwrap();
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let spool = spool.clone();
            tokio::spawn(async move {
                receive(&spool, &message(10_000 + i), 4096)
                    .await
                    .unwrap()
                    .id
            })
        })
        .collect();
    let mut ids = Vec::new();
    for task in tasks {
        ids.push(task.await.unwrap());
    }
    let committed: Vec<String> = spool
        .committed()
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 50);
    assert_eq!(committed, ids);
}

#[tokio::test]
async fn no_room_is_reported_before_and_while_writing_and_harms_nothing() {
    let root = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(&config(root.path())).await.unwrap();
    let kept = receive(&spool, &message(5_000), 1000).await.unwrap().id;
    let mut incoming = spool.begin().await.unwrap();
    incoming.write(&message(500_000)).await.unwrap();
    drop(spool);

    let mut full = config(root.path());
    full.spool.reserve_bytes = u64::MAX / 4;
    let (spool, recovered) = {
        drop(incoming);
        Spool::open(&full).await.unwrap()
    };
    assert_eq!(recovered.messages.len(), 1);
    assert!(matches!(
        spool.check_room(1000),
        Err(SpoolError::NoRoom { .. })
    ));
    assert!(matches!(
        spool.begin().await,
        Err(SpoolError::NoRoom { .. })
    ));
    assert_eq!(spool.committed().await.unwrap()[0].id, kept);
    assert_eq!(files(spool.dir()), vec![format!("{kept}.msg")]);
}

#[tokio::test]
async fn crossing_the_reserve_while_writing_is_no_room_and_the_partial_file_goes() {
    let root = tempfile::tempdir().unwrap();
    let mut config = config(root.path());
    // Leave 16 MiB above the reserve, then write more than that.
    let available = postern::spool::local::available_bytes(root.path()).unwrap();
    config.spool.reserve_bytes = available.saturating_sub(16 * 1024 * 1024);
    let (spool, _) = Spool::open(&config).await.unwrap();
    let mut incoming = spool.begin().await.unwrap();
    let id = incoming.id().to_owned();
    let chunk = vec![b'x'; 64 * 1024];
    let mut written = 0;
    let err = loop {
        match incoming.write(&chunk).await {
            Ok(()) => written += chunk.len(),
            Err(err) => break err,
        }
        assert!(
            written < 256 * 1024 * 1024,
            "no NoRoom after {written} octets"
        );
    };
    assert!(matches!(err, SpoolError::NoRoom { .. }), "{err}");
    assert!(!spool.message_path(&id).exists());
    assert!(incoming.write(b"more").await.is_err());
    assert!(incoming.commit(envelope()).await.is_err());
    assert!(files(spool.dir()).is_empty());
}

#[tokio::test]
async fn without_a_local_copy_the_spool_file_is_only_staging() {
    let root = tempfile::tempdir().unwrap();
    let mut config = config(root.path());
    config.spool.copies = vec![CopyKind::ObjectStore];
    config.spool.required = 1;
    let (spool, _) = Spool::open(&config).await.unwrap();
    let data = message(20_000);
    let committed = receive(&spool, &data, 999).await.unwrap();
    assert_eq!(committed.confirmed, vec![CopyKind::ObjectStore]);
    spool.drain().await;
    assert!(files(spool.dir()).is_empty());
    let (_, object_data) = spool
        .object_copy()
        .unwrap()
        .read(&committed.id)
        .await
        .unwrap()
        .expect("an object copy");
    assert!(object_data == data);
}

#[tokio::test]
async fn a_failed_object_copy_fails_the_quorum_and_takes_back_the_local_copy() {
    let root = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(&config(root.path())).await.unwrap();
    let mut incoming = spool.begin().await.unwrap();
    incoming.write(&message(2_000)).await.unwrap();
    // The object directory is replaced by a file: the object copy cannot
    // be written, and the quorum of two is lost.
    let segments = root.path().join("objects/segments");
    std::fs::remove_dir(&segments).unwrap();
    std::fs::write(&segments, b"not a directory").unwrap();
    let id = incoming.id().to_owned();
    let err = incoming.commit(envelope()).await.unwrap_err();
    match err {
        SpoolError::QuorumFailed {
            required,
            ref detail,
            ..
        } => {
            assert_eq!(required, 2);
            assert!(detail.contains("ObjectStore"), "{detail}");
        }
        other => panic!("unexpected {other}"),
    }
    assert!(files(spool.dir()).is_empty(), "{:?}", files(spool.dir()));
    spool.drain().await;
    assert!(!spool.object_copy().unwrap().holds(&id));
    assert_eq!(std::fs::read(&segments).unwrap(), b"not a directory");
}

/// What a last run left: one committed message (its id returned) and what a
/// crash mid-DATA leaves, a `.part` file.
async fn last_run_with_a_crash(config: &Config) -> String {
    let (spool, _) = Spool::open(config).await.unwrap();
    let kept = receive(&spool, &message(7_000), 512).await.unwrap().id;
    let crashed = postern::spool::id::IdGenerator::new().next_id();
    std::fs::write(spool.receiving_path(&crashed), message(400_000)).unwrap();
    kept
}

#[tokio::test]
async fn reopening_recovers_committed_messages_and_drops_uncommitted_ones() {
    let root = tempfile::tempdir().unwrap();
    let config = config(root.path());
    let kept = last_run_with_a_crash(&config).await;

    let (spool, recovered) = Spool::open(&config).await.unwrap();
    assert_eq!(recovered.removed, 1);
    assert_eq!(recovered.quarantined, 0);
    let ids: Vec<&str> = recovered.messages.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, vec![kept.as_str()]);
    assert_eq!(files(spool.dir()), vec![format!("{kept}.msg")]);
}

#[tokio::test]
async fn recovery_runs_while_new_messages_are_received() {
    let root = tempfile::tempdir().unwrap();
    let config = config(root.path());
    let kept = last_run_with_a_crash(&config).await;

    let spool = Spool::open_unrecovered(&config, Vec::new()).await.unwrap();
    // Received before recovery looks: one committed, one half-way through
    // DATA with its bytes on disk but no envelope yet.
    let fresh = receive(&spool, &message(5_000), 512).await.unwrap().id;
    let mut receiving = spool.begin().await.unwrap();
    for part in message(400_000).chunks(4096) {
        receiving.write(part).await.unwrap();
    }
    assert!(receiving.path().exists());

    let mut recovery = spool.recover().await.unwrap();
    let mut found = Vec::new();
    while let Some(batch) = recovery.next_batch().await.unwrap() {
        found.extend(batch.into_iter().map(|m| m.id));
    }
    let counts = recovery.finish();
    assert_eq!(found, vec![kept.clone()], "only the last run's message");
    assert_eq!(
        (counts.removed, counts.quarantined),
        (1, 0),
        "the crashed leftover"
    );
    assert!(
        receiving.path().exists(),
        "a message being received is no leftover"
    );
    let late = receiving.commit(envelope()).await.unwrap().id;
    let mut expected: Vec<String> = [&kept, &fresh, &late]
        .iter()
        .map(|id| format!("{id}.msg"))
        .collect();
    expected.sort();
    assert_eq!(files(spool.dir()), expected);
}

#[tokio::test]
async fn damaged_local_data_is_repaired_from_the_local_directory_object_copy() {
    let root = tempfile::tempdir().unwrap();
    suite::damaged_local_data_is_repaired_from_the_object_copy(&config(root.path())).await;
}

#[tokio::test]
async fn damaged_local_data_with_no_other_copy_is_quarantined() {
    let root = tempfile::tempdir().unwrap();
    let mut config = config(root.path());
    config.spool.copies = vec![CopyKind::Local];
    config.spool.required = 1;
    let (spool, _) = Spool::open(&config).await.unwrap();
    let cut = receive(&spool, &message(7_000), 512).await.unwrap().id;
    let flipped = receive(&spool, &message(8_000), 512).await.unwrap().id;
    // The seal gone with the tail, and a data octet flipped under an intact seal.
    std::fs::write(spool.message_path(&cut), b"truncated").unwrap();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(spool.message_path(&flipped))
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, b"#", 100).unwrap();
    drop(spool);
    let (spool, recovered) = Spool::open(&config).await.unwrap();
    assert_eq!(recovered.quarantined, 1, "the cut one, at start");
    assert_eq!(recovered.messages.len(), 1);
    assert_eq!(
        spool
            .verify_or_repair(&recovered.messages[0])
            .await
            .unwrap(),
        postern::spool::Checked::Quarantined
    );
    let mut expected = vec![format!("{cut}.msg"), format!("{flipped}.msg")];
    expected.sort();
    assert_eq!(files(spool.quarantine_dir()), expected);
    assert!(files(spool.dir()).is_empty());
}

#[tokio::test]
async fn a_spool_is_owned_by_one_relay_at_a_time() {
    let root = tempfile::tempdir().unwrap();
    let config = config(root.path());
    let (spool, _) = Spool::open(&config).await.unwrap();
    let err = Spool::open(&config).await.unwrap_err();
    assert!(err.to_string().contains("in use"), "{err}");
    drop(spool);
    Spool::open(&config).await.unwrap();
}

#[tokio::test]
async fn with_files_synced_one_by_one_a_commit_is_recovered_the_same() {
    let root = tempfile::tempdir().unwrap();
    let mut config = config(root.path());
    config.spool.sync = postern::config::SyncMode::Files;
    let (spool, _) = Spool::open(&config).await.unwrap();
    let data = message(70_000);
    let id = receive(&spool, &data, 4096).await.unwrap().id;
    assert!(suite::sealed(&spool.message_path(&id)).0 == data);
    assert_eq!(files(spool.dir()), vec![format!("{id}.msg")]);
    drop(spool);
    let (_, recovered) = Spool::open(&config).await.unwrap();
    let ids: Vec<&str> = recovered.messages.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, vec![id.as_str()]);
}

/// A delivered message's file goes to the free files, and the next message
/// is written into it: the same inode, holding exactly the new message and
/// its seal (nothing of the longer earlier one), recovered as itself.
#[tokio::test]
async fn a_finished_message_file_is_reused_whole_by_the_next_message() {
    use std::os::unix::fs::MetadataExt;
    let root = tempfile::tempdir().unwrap();
    let mut config = config(root.path());
    config.spool.copies = vec![CopyKind::Local];
    config.spool.required = 1;
    let (spool, _) = Spool::open(&config).await.unwrap();
    let first = receive(&spool, &message(20_000), 1000).await.unwrap();
    let inode = std::fs::metadata(spool.message_path(&first.id))
        .unwrap()
        .ino();
    spool.remove_local(&first.id, false).await.unwrap();
    assert!(!spool.message_path(&first.id).exists());
    let free = spool.dir().join(postern::spool::FREE_DIR);
    assert_eq!(files(&free).len(), 1, "kept as a free file");

    let data = message(3_000);
    let second = receive(&spool, &data, 1000).await.unwrap();
    let path = spool.message_path(&second.id);
    assert_eq!(std::fs::metadata(&path).unwrap().ino(), inode, "reused");
    assert!(files(&free).is_empty());
    let (got, json) = suite::sealed(&path);
    assert!(got == data, "the new message's data alone");
    let env: Envelope = serde_json::from_slice(&json).unwrap();
    assert_eq!(env.id, second.id);
    assert_eq!(env.data_sha256, hex::encode(Sha256::digest(&data)));

    drop(spool);
    let (_spool, recovered) = Spool::open(&config).await.unwrap();
    let ids: Vec<&str> = recovered.messages.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, vec![second.id.as_str()]);
}
