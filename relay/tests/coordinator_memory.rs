//! The coordinator conformance suite against `SingleNode` (the in-process
//! backend), on paused Tokio time: TTLs pass instantly and exactly.

#[path = "coordinator_suite.rs"]
mod suite;

use std::sync::Arc;
use std::time::Duration;

use postern::cluster::memory::Store;
use postern::cluster::LeaseOptions;
use suite::{Backend, Node};

struct Memory {
    store: Store,
}

impl Memory {
    fn new() -> Memory {
        Memory {
            store: Store::new(),
        }
    }
}

impl Backend for Memory {
    fn options(&self) -> LeaseOptions {
        LeaseOptions::new(Duration::from_secs(10))
    }

    fn expiry_slack(&self) -> Duration {
        Duration::from_millis(1)
    }

    async fn node(&self) -> Node {
        let node = self.store.connect();
        let link = node.link().clone();
        Node {
            coordinator: Arc::new(node),
            cut: Box::new(move |cut| if cut { link.cut() } else { link.restore() }),
        }
    }
}

macro_rules! conformance {
    ($($property:ident),* $(,)?) => {
        $(
            #[tokio::test(start_paused = true)]
            async fn $property() {
                suite::$property(&Memory::new()).await;
            }
        )*
    };
}

conformance!(
    racing_claims_have_one_winner,
    claims_are_idempotent_and_tokens_grow,
    stale_token_is_fenced,
    lease_expiry_is_seen_by_watchers,
    release_frees_the_claim_at_once,
    unrenewable_lease_is_unsafe_before_expiry,
    snapshot_commit_load_retire,
    batched_commits_are_one_revision_and_fenced_whole,
    watch_resumes_after_a_revision,
);
