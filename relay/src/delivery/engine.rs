//! The delivery engine: one attempt for a set of recipients of a message,
//! grouped by destination, with per-destination limits, MX fallback and
//! connection reuse.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use super::client::{ClientSettings, Connection, RcptOutcome, Target, Timeouts};
use super::mx::{MxResolver, Resolution};
use super::route::{Destination, Router};
use crate::config::{Config, TlsMode};
use crate::smtp::Reply;
use crate::spool::envelope::Envelope;

/// One recipient's result in an attempt.
#[derive(Debug, Clone)]
pub struct RecipientResult {
    /// Index into the envelope's recipients.
    pub index: usize,
    /// What happened.
    pub outcome: RcptOutcome,
    /// The server that answered, if one did.
    pub remote: Option<String>,
}

/// Delivers messages; shared by all delivery tasks.
pub struct Deliverer {
    router: Router,
    resolver: MxResolver,
    helo_name: String,
    timeouts: Timeouts,
    max_per_destination: usize,
    max_messages_per_connection: usize,
    idle_timeout: Duration,
    opportunistic_tls: Arc<rustls::ClientConfig>,
    verified_tls: Arc<rustls::ClientConfig>,
    limits: Mutex<HashMap<String, Arc<Semaphore>>>,
    pool: Mutex<HashMap<Target, Vec<(Connection, Instant)>>>,
    gate: std::sync::OnceLock<Gate>,
}

/// Asked once a delivery holds its destination slot, right before it
/// connects: `false` holds the message back (no outcome, no attempt).
pub type Gate = Arc<dyn Fn(&Envelope) -> bool + Send + Sync>;

impl std::fmt::Debug for Deliverer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deliverer")
            .field("helo_name", &self.helo_name)
            .finish()
    }
}

impl Deliverer {
    /// Builds the engine from the configuration.
    pub fn new(config: &Config) -> Result<Deliverer, String> {
        let delivery = &config.delivery;
        let resolver = MxResolver::new(&config.dns, delivery.mx_port)?;
        Ok(Deliverer {
            router: Router::new(config),
            resolver,
            helo_name: delivery
                .helo_name
                .clone()
                .unwrap_or_else(|| config.hostname.clone()),
            timeouts: Timeouts {
                connect: delivery.connect_timeout,
                command: delivery.command_timeout,
                data_init: delivery.data_init_timeout,
                data_block: delivery.data_block_timeout,
                data_end: delivery.data_end_timeout,
            },
            max_per_destination: delivery.max_per_destination,
            max_messages_per_connection: delivery.max_messages_per_connection,
            idle_timeout: delivery.idle_connection_timeout,
            opportunistic_tls: Arc::new(super::tls::unverified_client_config()),
            verified_tls: Arc::new(super::tls::verified_client_config()),
            limits: Mutex::new(HashMap::new()),
            pool: Mutex::new(HashMap::new()),
            gate: std::sync::OnceLock::new(),
        })
    }

    /// Sets the [`Gate`] (once): a cluster holds deliveries back while its
    /// ownership of the message is uncertain.
    pub fn set_gate(&self, gate: Gate) {
        let _ = self.gate.set(gate);
    }

    /// Whether any route delivers early.
    pub fn has_early_routes(&self) -> bool {
        self.router.has_early_routes()
    }

    /// The destination a recipient domain routes to.
    pub fn route(&self, domain: &str) -> Destination {
        self.router.route(domain)
    }

    /// Tries once to deliver `recipients` (indexes) of the message in `data_path`.
    pub async fn attempt(
        &self,
        envelope: &Envelope,
        data_path: &Path,
        recipients: &[usize],
    ) -> Vec<RecipientResult> {
        let mut groups: Vec<(Destination, Vec<usize>)> = Vec::new();
        for &index in recipients {
            let destination = self
                .router
                .route(&envelope.recipients[index].address.domain);
            match groups.iter_mut().find(|(d, _)| *d == destination) {
                Some((_, members)) => members.push(index),
                None => groups.push((destination, vec![index])),
            }
        }
        let attempts = groups.iter().map(|(destination, members)| {
            self.deliver_group(destination, envelope, data_path, members, true)
        });
        futures::future::join_all(attempts)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    /// Early delivery: tries, once and before the message is queued, the
    /// recipients whose route opts in, each destination within its route's
    /// budget (past it, those recipients are deferred and the connection is
    /// dropped). Recipients of other routes get no result. Not gated: the
    /// message is not in the queue, so no other relay can hold it.
    pub async fn attempt_early(
        &self,
        envelope: &Envelope,
        data_path: &Path,
    ) -> Vec<RecipientResult> {
        let mut groups: Vec<(Destination, Vec<usize>)> = Vec::new();
        for (index, recipient) in envelope.recipients.iter().enumerate() {
            let destination = self.router.route(&recipient.address.domain);
            if destination.early_budget.is_none() {
                continue;
            }
            match groups.iter_mut().find(|(d, _)| *d == destination) {
                Some((_, members)) => members.push(index),
                None => groups.push((destination, vec![index])),
            }
        }
        let attempts = groups.iter().map(|(destination, members)| async move {
            let budget = destination.early_budget.unwrap_or_default();
            let attempt = self.deliver_group(destination, envelope, data_path, members, false);
            match tokio::time::timeout(budget, attempt).await {
                Ok(results) => results,
                Err(_) => members
                    .iter()
                    .map(|&index| RecipientResult {
                        index,
                        outcome: RcptOutcome::Deferred(Reply::new(
                            451,
                            "4.4.7",
                            format!(
                                "{}: no verdict within the early-delivery budget of {}",
                                destination.key(),
                                humantime::format_duration(budget)
                            ),
                        )),
                        remote: None,
                    })
                    .collect(),
            }
        });
        futures::future::join_all(attempts)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    async fn deliver_group(
        &self,
        destination: &Destination,
        envelope: &Envelope,
        data_path: &Path,
        members: &[usize],
        gated: bool,
    ) -> Vec<RecipientResult> {
        let all = |outcome: RcptOutcome, remote: Option<String>| {
            members
                .iter()
                .map(|&index| RecipientResult {
                    index,
                    outcome: outcome.clone(),
                    remote: remote.clone(),
                })
                .collect::<Vec<_>>()
        };
        let limit = self.limit(&destination.key());
        let Ok(_permit) = limit.acquire_owned().await else {
            return all(
                RcptOutcome::Deferred(Reply::new(451, "4.3.0", "shutting down")),
                None,
            );
        };
        // The slot may have taken a while: ask again whether we may deliver.
        if gated && self.gate.get().is_some_and(|gate| !gate(envelope)) {
            return Vec::new();
        }
        let targets = match self.resolver.resolve(destination).await {
            Resolution::Targets(targets) => targets,
            Resolution::NullMx => {
                let reply = Reply::new(
                    556,
                    "5.1.10",
                    format!(
                        "Domain {} does not accept mail (null MX, RFC 7505)",
                        destination.domain
                    ),
                );
                return all(RcptOutcome::Failed(reply), None);
            }
            Resolution::NotFound(why) => {
                return all(RcptOutcome::Failed(Reply::new(550, "5.1.2", why)), None)
            }
            Resolution::Temporary(why) => {
                return all(RcptOutcome::Deferred(Reply::new(451, "4.4.3", why)), None)
            }
        };
        let mut last_failure = Reply::new(451, "4.4.1", "no mail host could be reached");
        for target in &targets {
            let (mut connection, pooled) = match self.take_pooled(target) {
                Some(connection) => (connection, true),
                None => match Connection::open(target, self.settings(destination)).await {
                    Ok(connection) => (connection, false),
                    Err(err) => {
                        tracing::info!(target = %target.label(), "connection failed: {err}");
                        last_failure = err.outcome(&target.label()).reply().clone();
                        continue;
                    }
                },
            };
            let mut result = connection.send(envelope, members, data_path).await;
            if pooled && matches!(&result, Err((_, partial)) if partial.iter().all(Option::is_none))
            {
                // The pooled connection had gone stale; try a fresh one once.
                match Connection::open(target, self.settings(destination)).await {
                    Ok(fresh) => {
                        connection = fresh;
                        result = connection.send(envelope, members, data_path).await;
                    }
                    Err(err) => {
                        last_failure = err.outcome(&target.label()).reply().clone();
                        continue;
                    }
                }
            }
            let remote = Some(match connection.last_transfer {
                Some(transfer) => format!("{} via {transfer}", connection.label()),
                None => connection.label().to_owned(),
            });
            return match result {
                Ok(outcomes) => {
                    self.put_pooled(target.clone(), connection);
                    members
                        .iter()
                        .zip(outcomes)
                        .map(|(&index, outcome)| RecipientResult {
                            index,
                            outcome,
                            remote: remote.clone(),
                        })
                        .collect()
                }
                Err((err, partial)) => {
                    // Lost mid-transaction: whatever the server may have taken
                    // is retried later (at most a duplicate, never a loss).
                    let fallback = err.outcome(&target.label());
                    members
                        .iter()
                        .zip(partial)
                        .map(|(&index, outcome)| RecipientResult {
                            index,
                            outcome: outcome.unwrap_or_else(|| fallback.clone()),
                            remote: remote.clone(),
                        })
                        .collect()
                }
            };
        }
        let outcome = if last_failure.is_permanent() && targets.len() == 1 {
            RcptOutcome::Failed(last_failure)
        } else {
            // RFC 5321 §5.1: every MX host was tried; a 5xx greeting from one is
            // no verdict on the message, so defer.
            RcptOutcome::Deferred(Reply {
                code: if last_failure.is_permanent() {
                    451
                } else {
                    last_failure.code
                },
                ..last_failure
            })
        };
        all(outcome, None)
    }

    fn settings(&self, destination: &Destination) -> ClientSettings {
        let auth = destination.auth_file.as_ref().and_then(|path| {
            let text = std::fs::read_to_string(path).ok()?;
            let (user, password) = text.trim_end().split_once(':')?;
            Some((user.to_owned(), password.to_owned()))
        });
        ClientSettings {
            helo_name: self.helo_name.clone(),
            protocol: destination.protocol,
            tls: destination.tls,
            tls_config: Some(match destination.tls {
                TlsMode::Required => Arc::clone(&self.verified_tls),
                _ => Arc::clone(&self.opportunistic_tls),
            }),
            auth,
            timeouts: self.timeouts.clone(),
        }
    }

    fn limit(&self, key: &str) -> Arc<Semaphore> {
        let mut limits = self.limits.lock().expect("limits lock");
        Arc::clone(
            limits
                .entry(key.to_owned())
                .or_insert_with(|| Arc::new(Semaphore::new(self.max_per_destination))),
        )
    }

    fn take_pooled(&self, target: &Target) -> Option<Connection> {
        let mut pool = self.pool.lock().expect("pool lock");
        let idle = pool.get_mut(target)?;
        while let Some((connection, since)) = idle.pop() {
            if since.elapsed() < self.idle_timeout {
                return Some(connection);
            }
        }
        None
    }

    fn put_pooled(&self, target: Target, connection: Connection) {
        if connection.transactions >= self.max_messages_per_connection {
            tokio::spawn(connection.quit());
            return;
        }
        self.pool
            .lock()
            .expect("pool lock")
            .entry(target)
            .or_default()
            .push((connection, Instant::now()));
    }

    /// Closes connections idle longer than the idle timeout (or all of them).
    pub async fn close_idle(&self, all: bool) {
        let stale: Vec<Connection> = {
            let mut pool = self.pool.lock().expect("pool lock");
            let mut stale = Vec::new();
            for idle in pool.values_mut() {
                let (old, fresh): (Vec<_>, Vec<_>) = idle
                    .drain(..)
                    .partition(|(_, since)| all || since.elapsed() >= self.idle_timeout);
                *idle = fresh;
                stale.extend(old.into_iter().map(|(connection, _)| connection));
            }
            pool.retain(|_, idle| !idle.is_empty());
            stale
        };
        for connection in stale {
            connection.quit().await;
        }
    }
}
