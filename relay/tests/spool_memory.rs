//! Memory stays bounded while many large messages stream through the spool:
//! 100 concurrent 10 MiB messages (the default local + local-directory copies)
//! must keep the process under 256 MiB resident. Its own test binary, so the
//! peak measured is this test's alone.

#[path = "spool_suite.rs"]
mod suite;

use std::sync::Arc;

use postern::config::Config;
use postern::spool::Spool;

/// Peak resident set size of this process, in KiB (`VmHWM`).
fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_10_mib_messages_stay_under_256_mib() {
    let root = tempfile::tempdir().unwrap();
    let mut config = Config {
        data_dir: root.path().to_owned(),
        ..Config::default()
    };
    config.spool.reserve_bytes = 0;
    config.spool.deadline = std::time::Duration::from_secs(300);
    let (spool, _) = Spool::open(&config).await.unwrap();
    let chunk = Arc::new(vec![b'x'; 64 * 1024]);
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let (spool, chunk) = (spool.clone(), Arc::clone(&chunk));
            tokio::spawn(async move {
                let mut incoming = spool.begin().await.unwrap();
                for _ in 0..160 {
                    incoming.write(&chunk).await.unwrap();
                    // Interleave the messages as concurrent sessions would.
                    tokio::task::yield_now().await;
                }
                incoming.commit(suite::envelope()).await.unwrap()
            })
        })
        .collect();
    for task in tasks {
        let committed = task.await.unwrap();
        let seal =
            postern::spool::message_file::read_seal_at(&spool.message_path(&committed.id)).unwrap();
        assert!(
            matches!(seal, postern::spool::message_file::Seal::Sealed { data_len, .. } if data_len == 10 * 1024 * 1024),
            "{seal:?}"
        );
    }
    spool.drain().await;
    let peak = peak_rss_kib();
    assert!(peak < 256 * 1024, "peak RSS {peak} KiB");
}
