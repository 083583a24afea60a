//! Taking over the spools of relays that are gone: [`Orphans`] claims every
//! spool that loses its owner, and [`take_over`] gathers what the new owner
//! needs to deliver one: the claim, the spool's message ids from its
//! segments in the object store, and the state its previous owners committed.
//!
//! [`super::node`] runs them for a live relay.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::membership::Membership;
use super::{Claim, Error, Event, SpoolId};
use crate::spool::object::ObjectCopy;

/// Why a takeover could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum TakeoverError {
    /// Claiming or loading state failed (`Error::Claimed`: someone else won).
    #[error(transparent)]
    Coordinator(#[from] Error),
    /// Listing the object store failed.
    #[error("object store: {0}")]
    ObjectStore(#[from] object_store::Error),
}

/// What the new owner of a spool starts from.
#[derive(Debug)]
pub struct Takeover {
    /// The claim every state change must be committed under.
    pub claim: Claim,
    /// Ids of the spool's live messages in its segments, sorted (ids are
    /// time-ordered, so oldest first).
    pub messages: Vec<String>,
    /// State committed by earlier owners, by message id.
    pub states: BTreeMap<String, Bytes>,
}

/// Claims `spool` and gathers what delivering it needs: its messages from
/// the segments `objects` lists for it (the dead relay's object copy) and
/// the state committed under earlier claims. Fails with `Error::Claimed`
/// when another relay won the spool.
pub async fn take_over(
    membership: &Membership,
    spool: &SpoolId,
    objects: &ObjectCopy,
    listed_as: &str,
) -> Result<Takeover, TakeoverError> {
    let claim = membership.claim(spool).await?;
    // Listed after the claim: the previous owner can no longer commit, and
    // messages it accepted meanwhile are in the listing or in its own next spool.
    let messages = objects.list_spool(listed_as).await?;
    let states = membership
        .coordinator()
        .load(spool, "")
        .await?
        .into_iter()
        .collect();
    Ok(Takeover {
        claim,
        messages,
        states,
    })
}

/// Claims orphaned spools as they appear and hands the claims won to the
/// caller. Every surviving relay runs one; for each orphan exactly one wins.
///
/// It resynchronises (snapshot, then watch from the snapshot's revision)
/// after any error and whenever the relay was unsafe, so an orphan is never
/// missed: registered spools without a claim are found in the snapshot.
/// Stop it (drop) before releasing spools on drain, or it claims them back.
#[derive(Debug)]
pub struct Orphans {
    claims: mpsc::Receiver<Claim>,
    task: JoinHandle<()>,
}

impl Drop for Orphans {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Orphans {
    /// Starts following; `retry_every` paces resynchronisation after errors.
    pub fn start(membership: Arc<Membership>, retry_every: Duration) -> Orphans {
        let (tx, claims) = mpsc::channel(64);
        let task = tokio::spawn(follow(membership, tx, retry_every));
        Orphans { claims, task }
    }

    /// The next spool this relay won.
    pub async fn next(&mut self) -> Option<Claim> {
        self.claims.recv().await
    }
}

/// Claims `spool` if possible; `false` if the attempt failed for a reason
/// other than someone else holding it (retry after a resync).
async fn try_claim(membership: &Membership, spool: &SpoolId, tx: &mpsc::Sender<Claim>) -> bool {
    match membership.claim(spool).await {
        Ok(claim) => {
            tracing::info!(member = %membership.id(), %spool, token = %claim.token, "took over spool");
            let _ = tx.send(claim).await;
            true
        }
        Err(Error::Claimed { .. }) => true,
        Err(err) => {
            tracing::warn!(member = %membership.id(), %spool, error = %err, "cannot claim orphaned spool");
            false
        }
    }
}

async fn follow(membership: Arc<Membership>, tx: mpsc::Sender<Claim>, retry_every: Duration) {
    let coordinator = Arc::clone(membership.coordinator());
    let mut safety = membership.safety();
    loop {
        safety.wait_safe().await;
        let snapshot = match coordinator.snapshot().await {
            Ok(snapshot) => snapshot,
            Err(err) => {
                tracing::warn!(error = %err, "cluster snapshot failed");
                tokio::time::sleep(retry_every).await;
                continue;
            }
        };
        let mut healthy = true;
        for spool in snapshot.orphans() {
            healthy &= try_claim(&membership, spool, &tx).await;
        }
        let mut events = match coordinator.watch(snapshot.revision).await {
            Ok(events) if healthy => events,
            Ok(_) => {
                tokio::time::sleep(retry_every).await;
                continue;
            }
            Err(err) => {
                tracing::warn!(error = %err, "cluster watch failed");
                tokio::time::sleep(retry_every).await;
                continue;
            }
        };
        loop {
            tokio::select! {
                item = events.next() => match item {
                    Some(Ok((_, Event::Released { spool, retired: false }))) => {
                        if !try_claim(&membership, &spool, &tx).await {
                            tokio::time::sleep(retry_every).await;
                            break;
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(err)) => {
                        tracing::warn!(error = %err, "cluster watch ended");
                        tokio::time::sleep(retry_every).await;
                        break;
                    }
                    None => break,
                },
                () = safety.wait_unsafe() => break,
            }
        }
    }
}
