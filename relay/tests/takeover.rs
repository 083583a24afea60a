//! Taking over a dead relay's spool from the local-directory object store:
//! the messages its spool committed are listed, the state it committed under
//! its claim is loaded, and the claim fences the dead owner.

#[path = "spool_suite.rs"]
mod suite;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use postern::cluster::memory::Store;
use postern::cluster::takeover::{take_over, TakeoverError};
use postern::cluster::{Change, Error, LeaseOptions, MemberId, Membership, SpoolId};
use postern::config::{Config, CopyKind};
use postern::spool::object::ObjectCopy;
use postern::spool::Spool;

fn config(root: &std::path::Path) -> Config {
    let mut config = Config {
        data_dir: root.to_owned(),
        ..Config::default()
    };
    config.spool.reserve_bytes = 0;
    // The dead relay kept an object copy (a local directory here).
    config.spool.copies = vec![CopyKind::Local, CopyKind::ObjectStore];
    config.spool.required = 2;
    config
}

async fn relay(store: &Store, name: &str) -> Membership {
    Membership::join(
        Arc::new(store.connect()),
        MemberId::new(name).unwrap(),
        "",
        LeaseOptions::new(Duration::from_secs(10)),
    )
    .await
    .unwrap()
}

#[tokio::test(start_paused = true)]
async fn takeover_lists_the_dead_relays_messages_and_state() {
    // The dead relay accepted three messages into its spool and object store.
    let root = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(&config(root.path())).await.unwrap();
    let mut ids = Vec::new();
    for len in [100, 2000, 70_000] {
        ids.push(
            suite::receive(&spool, &suite::message(len), 4096)
                .await
                .unwrap()
                .id,
        );
    }
    ids.sort();
    // The survivor's object copy knows nothing of them until it lists the
    // dead relay's segments (the local directory backend keeps them flat).
    let objects = ObjectCopy::from_config(&config(root.path())).unwrap();
    assert!(!objects.holds(&ids[0]));

    // Its owner had committed one recipient's outcome, then died.
    let store = Store::new();
    let dead = relay(&store, "dead").await;
    let spool_id = SpoolId::new("dead").unwrap();
    let old = dead.claim(&spool_id).await.unwrap();
    dead.commit(
        &old,
        &ids[1],
        Change::Put(Bytes::from_static(b"{\"rcpt0\":\"delivered\"}")),
    )
    .await
    .unwrap();
    drop(dead);
    tokio::time::sleep(Duration::from_secs(30)).await;

    let survivor = relay(&store, "survivor").await;
    let other = relay(&store, "other").await;
    let takeover = take_over(&survivor, &spool_id, &objects, "").await.unwrap();
    assert_eq!(takeover.messages, ids);
    assert!(ids.iter().all(|id| objects.holds(id)));
    assert!(takeover.claim.token > old.token);
    assert_eq!(
        takeover.states.get(&ids[1]).map(|v| &v[..]),
        Some(&b"{\"rcpt0\":\"delivered\"}"[..])
    );
    assert_eq!(takeover.states.len(), 1);

    // Only one survivor gets it; the dead owner's token is fenced.
    match take_over(&other, &spool_id, &objects, "").await {
        Err(TakeoverError::Coordinator(Error::Claimed { holder, .. })) => {
            assert_eq!(holder.as_str(), "survivor")
        }
        other => panic!("second takeover: {other:?}"),
    }
    assert!(matches!(
        survivor
            .coordinator()
            .commit(&old, &ids[0], Change::Delete)
            .await,
        Err(Error::Fenced { .. })
    ));
}
