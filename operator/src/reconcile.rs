//! The reconcile loop: validate → build → server-side apply (one field
//! manager) → status. It reads the StatefulSet and the relay pods (and each
//! pod's `/stats`), plans the replicas so a scale-down drains first, applies
//! every owned object (and deletes its NetworkPolicy when that is turned
//! off), records events for what it did, and writes the status.
//! An invalid MailQueue gets `Degraded` and waits for the next edit; it never
//! stops the controller. Faults of the relays (an image that cannot be
//! pulled, a missing Secret, etcd unreachable: [`crate::faults`]) make it
//! `Degraded` too, with a Warning event when one appears, and clear by
//! themselves once fixed.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{
    ConfigMap, Event as CoreEvent, ObjectReference, Pod, Service, ServiceAccount,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::{watcher, Controller};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;

use crate::build::{self, Names, CONFIG_HASH, DRAINING_SINCE, TRAFFIC_DRAIN, TRAFFIC_LABEL};
use crate::crd::{MailQueue, MailQueueStatus};
use crate::discovery::PdbVersion;
use crate::faults;
use crate::metrics::Metrics;
use crate::relay_config::{self, RelayConfig};
use crate::scale::{self, PodState};
use crate::stats::StatsSource;
use crate::status::{self, Observed};

/// The one field manager of everything the operator applies.
pub const MANAGER: &str = "postern-operator";

/// How soon to look again while something is changing (a rollout, a drain).
pub const REQUEUE_BUSY: Duration = Duration::from_secs(10);
/// How soon to look again when all is steady, by default (queue statistics go
/// stale): [`Context::resync`].
pub const REQUEUE_IDLE: Duration = Duration::from_secs(30);
/// How soon to retry after an error.
pub const REQUEUE_ERROR: Duration = Duration::from_secs(15);

/// What reconcile needs, passed in (no globals).
pub struct Context {
    /// The API client.
    pub client: Client,
    /// Records events on MailQueues.
    pub recorder: Recorder,
    /// The PodDisruptionBudget version the server serves.
    pub pdb: PdbVersion,
    /// Where relay statistics come from.
    pub stats: Arc<dyn StatsSource>,
    /// The operator's metrics.
    pub metrics: Arc<Metrics>,
    /// The current time (tests fix it).
    pub clock: Arc<dyn Fn() -> Timestamp + Send + Sync>,
    /// How soon to look again when all is steady, to refresh the queue columns.
    pub resync: Duration,
}

/// Why a reconcile failed (it is retried).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The MailQueue lacks a field the API server always sets.
    #[error("the MailQueue has no {0}")]
    Missing(&'static str),
    /// An API call failed.
    #[error("{action}: {source}")]
    Kube {
        /// What was being done.
        action: String,
        /// The client's error.
        #[source]
        source: kube::Error,
    },
    /// An object could not be serialized.
    #[error("cannot serialize: {0}")]
    Serialize(#[from] serde_json::Error),
}

fn kube_err(action: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
    let action = action.into();
    move |source| Error::Kube { action, source }
}

/// Reconciles one MailQueue.
pub async fn reconcile(mq: Arc<MailQueue>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let result = reconcile_mail_queue(&mq, &ctx).await;
    ctx.metrics.reconciled(result.is_ok(), started.elapsed());
    result
}

/// Logs a failed reconcile and retries it later.
pub fn error_policy(mq: Arc<MailQueue>, error: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(
        mailqueue = %mq.name_any(),
        namespace = ?mq.namespace(),
        "reconcile failed: {error}"
    );
    Action::requeue(REQUEUE_ERROR)
}

async fn reconcile_mail_queue(mq: &MailQueue, ctx: &Context) -> Result<Action, Error> {
    let namespace = mq.namespace().ok_or(Error::Missing("metadata.namespace"))?;
    if mq.meta().uid.is_none() {
        return Err(Error::Missing("metadata.uid"));
    }
    let name = mq.name_any();
    let generation = mq.meta().generation;
    let now = (ctx.clock)();
    let previous = mq.status.as_ref();
    let events = Events {
        recorder: &ctx.recorder,
        reference: mq.object_ref(&()),
    };

    // Validate.
    let rendered = match relay_config::render(mq) {
        Ok(rendered) => rendered,
        Err(err) => {
            let message = err.to_string();
            tracing::info!(mailqueue = %name, %namespace, "invalid spec: {message}");
            ctx.metrics.invalid_spec();
            let reported = previous
                .and_then(|status| status::condition(status, status::DEGRADED))
                .is_some_and(|c| c.status == "True" && c.message == message);
            if !reported {
                events.warning("InvalidSpec", "Validate", &message).await;
            }
            let status =
                status::failed_status(previous, generation, "InvalidSpec", &message, true, now);
            write_status(ctx, &namespace, &name, previous, &status).await?;
            return Ok(Action::await_change());
        }
    };
    let new_spec = previous.and_then(|s| s.observed_generation) != generation;
    if new_spec {
        for warning in &rendered.warnings {
            events
                .warning(warning.reason, "Validate", &warning.message)
                .await;
        }
    }

    // Observe.
    let client = ctx.client.clone();
    let statefulsets: Api<StatefulSet> = Api::namespaced(client.clone(), &namespace);
    let current = statefulsets
        .get_opt(&name)
        .await
        .map_err(kube_err("get StatefulSet"))?;
    let current_replicas = current
        .as_ref()
        .and_then(|sts| sts.spec.as_ref())
        .map(|spec| spec.replicas.unwrap_or(1));
    let current_hash = current
        .as_ref()
        .and_then(|sts| {
            sts.spec
                .as_ref()?
                .template
                .metadata
                .as_ref()?
                .annotations
                .as_ref()
        })
        .and_then(|annotations| annotations.get(CONFIG_HASH).cloned());
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let mut relay_pods: Vec<(i32, Pod)> = pods
        .list(&ListParams::default().labels(&build::selector_string(mq)))
        .await
        .map_err(kube_err("list relay pods"))?
        .items
        .into_iter()
        .filter_map(|pod| Some((scale::ordinal(&name, &pod.name_any())?, pod)))
        .collect();
    relay_pods.sort_by_key(|(ordinal, _)| *ordinal);

    let mut observed = Observed {
        generation,
        desired: mq.spec.replicas,
        selector: build::selector_string(mq),
        config_hash: rendered.hash.clone(),
        ..Observed::default()
    };
    let peer_secret = mq
        .spec
        .etcd
        .as_ref()
        .and_then(|etcd| etcd.peer_secret.as_deref());
    let mut states = Vec::new();
    for (ordinal, pod) in &relay_pods {
        let pod_name = pod.name_any();
        observed
            .faults
            .extend(faults::container_faults(pod, peer_secret));
        let queue_depth = match ctx.stats.stats(pod).await {
            Ok(stats) => {
                observed
                    .faults
                    .extend(faults::delivery_fault(&pod_name, &stats));
                observed.queue_depth += stats.queue_depth;
                if let Some(oldest) = stats.oldest_message_time {
                    observed.oldest_message =
                        Some(observed.oldest_message.map_or(oldest, |o| o.min(oldest)));
                }
                Some(stats.queue_depth)
            }
            Err(err) => {
                if pod_ready(pod) {
                    observed
                        .stats_failures
                        .push((pod_name.clone(), err.to_string()));
                }
                None
            }
        };
        let labels = pod.labels();
        let draining_since = (labels.get(TRAFFIC_LABEL).map(String::as_str) == Some(TRAFFIC_DRAIN))
            .then(|| pod.annotations().get(DRAINING_SINCE)?.parse().ok())
            .flatten();
        states.push(PodState {
            name: pod_name,
            ordinal: *ordinal,
            draining_since,
            queue_depth,
        });
    }

    // A pod stuck creating: the kubelet's FailedMount events name a missing
    // Secret (the operator may not read Secrets themselves).
    let creating: Vec<&Pod> = relay_pods
        .iter()
        .map(|(_, pod)| pod)
        .filter(|pod| faults::creating(pod))
        .collect();
    if !creating.is_empty() {
        let failed_mounts =
            ListParams::default().fields("involvedObject.kind=Pod,reason=FailedMount");
        match Api::<CoreEvent>::namespaced(client.clone(), &namespace)
            .list(&failed_mounts)
            .await
        {
            Ok(events) => {
                for pod in creating {
                    observed
                        .faults
                        .extend(faults::mount_faults(pod, &events.items, peer_secret));
                }
            }
            // Not fatal: the status just says less (e.g. RBAC of an older chart).
            Err(err) => {
                tracing::warn!(mailqueue = %name, %namespace, "cannot list FailedMount events: {err}")
            }
        }
    }

    // Plan the number of relays: a scale-down drains before it removes.
    let drain_timeout = relay_config::drain_timeout(mq).unwrap_or(Duration::from_secs(300));
    let plan = scale::plan(
        mq.spec.replicas,
        current_replicas,
        &states,
        now,
        drain_timeout,
    );
    for pod_name in &plan.start_draining {
        mark_pod(ctx, &namespace, pod_name, Some(now)).await?;
        ctx.metrics.drain_started();
        events
            .normal(
                "Draining",
                "Drain",
                &format!(
                    "taking {pod_name} out of the SMTP Service; it is removed when its queue is \
                     empty or after {}",
                    mq.spec.drain_timeout
                ),
            )
            .await;
    }
    for pod_name in &plan.stop_draining {
        mark_pod(ctx, &namespace, pod_name, None).await?;
        events
            .normal(
                "DrainCancelled",
                "Drain",
                &format!("{pod_name} is wanted again (replicas {})", mq.spec.replicas),
            )
            .await;
    }
    observed.draining = plan.draining.clone();

    // Build and apply.
    let grace = i64::try_from(drain_timeout.as_secs())
        .unwrap_or(i64::MAX)
        .max(1);
    let mut statefulset = build::stateful_set(mq, &rendered, plan.replicas, grace);
    if let Some(live) = &current {
        if let Some(kept) = build::keep_spool_claim(&mut statefulset, live) {
            if new_spec {
                events.warning("SpoolUnchanged", "Apply", &kept).await;
            }
        }
    }
    let applied = match apply_all(ctx, mq, &namespace, &rendered, &statefulset).await {
        Ok(applied) => applied,
        Err(err) => {
            let message = err.to_string();
            events.warning("ApplyFailed", "Apply", &message).await;
            let status =
                status::failed_status(previous, generation, "ApplyFailed", &message, false, now);
            write_status(ctx, &namespace, &name, previous, &status).await?;
            return Err(err);
        }
    };
    match (current_replicas, current_hash) {
        (None, _) => {
            events
                .normal(
                    "Created",
                    "Apply",
                    &format!(
                        "created StatefulSet {name} with {} relays, configuration {}",
                        plan.replicas, rendered.hash
                    ),
                )
                .await;
        }
        (Some(_), Some(old)) if old != rendered.hash => {
            events
                .normal(
                    "ConfigChanged",
                    "Apply",
                    &format!(
                        "relay configuration {old} → {}: rolling the relays",
                        rendered.hash
                    ),
                )
                .await;
        }
        _ => {}
    }
    if let Some(before) = current_replicas {
        if plan.replicas < before {
            let removed: Vec<&str> = plan
                .draining
                .iter()
                .filter(|d| d.done)
                .map(|d| d.name.as_str())
                .collect();
            events
                .normal(
                    "ScaledDown",
                    "Scale",
                    &format!(
                        "{before} → {} relays after draining {}",
                        plan.replicas,
                        if removed.is_empty() {
                            "nothing".to_owned()
                        } else {
                            removed.join(", ")
                        }
                    ),
                )
                .await;
        } else if plan.replicas > before {
            events
                .normal(
                    "ScaledUp",
                    "Scale",
                    &format!("{before} → {} relays", plan.replicas),
                )
                .await;
        }
    }

    // Status.
    observed.statefulset = Some(applied);
    let status = status::observed_status(&observed, previous, now);
    if let Some(fault) = new_fault(previous, &status, &observed) {
        events
            .warning(&fault.reason, "Observe", &fault.message)
            .await;
    }
    write_status(ctx, &namespace, &name, previous, &status).await?;
    // Look again soon while something changes or a relay's stats are missing.
    let busy = [status::PROGRESSING, status::DEGRADED, status::DRAINING]
        .iter()
        .any(|kind| status::condition(&status, kind).is_some_and(|c| c.status == "True"));
    Ok(Action::requeue(if busy {
        REQUEUE_BUSY.min(ctx.resync)
    } else {
        ctx.resync
    }))
}

/// Applies every owned object; returns the StatefulSet as the server has it.
async fn apply_all(
    ctx: &Context,
    mq: &MailQueue,
    namespace: &str,
    rendered: &RelayConfig,
    statefulset: &StatefulSet,
) -> Result<StatefulSet, Error> {
    let client = ctx.client.clone();
    let params = PatchParams::apply(MANAGER).force();
    let names = Names::of(mq);
    apply(
        Api::<ServiceAccount>::namespaced(client.clone(), namespace),
        &names.service_account,
        &build::service_account(mq),
        &params,
    )
    .await?;
    apply(
        Api::<ConfigMap>::namespaced(client.clone(), namespace),
        &names.config,
        &build::config_map(mq, rendered),
        &params,
    )
    .await?;
    apply(
        Api::<Service>::namespaced(client.clone(), namespace),
        &names.peers,
        &build::peer_service(mq),
        &params,
    )
    .await?;
    apply(
        Api::<Service>::namespaced(client.clone(), namespace),
        &names.relay,
        &build::smtp_service(mq),
        &params,
    )
    .await?;
    let statefulset = apply(
        Api::<StatefulSet>::namespaced(client.clone(), namespace),
        &names.relay,
        statefulset,
        &params,
    )
    .await?;
    ctx.pdb
        .apply(
            client.clone(),
            namespace,
            &build::pod_disruption_budget(mq),
            &params,
        )
        .await
        .map_err(kube_err(format!(
            "apply {} PodDisruptionBudget {}",
            ctx.pdb.api_resource().api_version,
            names.relay
        )))?;
    let policies = Api::<NetworkPolicy>::namespaced(client, namespace);
    if build::wants_network_policy(mq) {
        apply(policies, &names.relay, &build::network_policy(mq), &params).await?;
    } else {
        remove_network_policy(&policies, mq, &names.relay).await?;
    }
    Ok(statefulset)
}

/// Deletes the NetworkPolicy this MailQueue had while
/// `spec.networkPolicy.enabled` was on. Server-side apply cannot remove an
/// object and garbage collection only follows the MailQueue, so the operator
/// deletes it; a policy of the same name it does not own (its controller is
/// not this MailQueue) stays.
async fn remove_network_policy(
    policies: &Api<NetworkPolicy>,
    mq: &MailQueue,
    name: &str,
) -> Result<(), Error> {
    let Some(live) = policies
        .get_opt(name)
        .await
        .map_err(kube_err(format!("get NetworkPolicy {name}")))?
    else {
        return Ok(());
    };
    let uid = mq.meta().uid.as_deref();
    let ours = live
        .owner_references()
        .iter()
        .any(|owner| owner.controller == Some(true) && Some(owner.uid.as_str()) == uid);
    if !ours {
        return Ok(());
    }
    let preconditions = kube::api::Preconditions {
        uid: live.uid(),
        ..kube::api::Preconditions::default()
    };
    let params = kube::api::DeleteParams {
        preconditions: Some(preconditions),
        ..kube::api::DeleteParams::default()
    };
    match policies.delete(name, &params).await {
        Ok(_) => Ok(()),
        // Gone meanwhile, or replaced by another object: nothing of ours left.
        Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => Ok(()),
        Err(err) => Err(kube_err(format!("delete NetworkPolicy {name}"))(err)),
    }
}

async fn apply<K>(api: Api<K>, name: &str, object: &K, params: &PatchParams) -> Result<K, Error>
where
    K: Resource<DynamicType = ()>
        + Clone
        + Serialize
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    // Server-side apply needs apiVersion and kind in the body; the typed
    // objects leave them to serde of the wrapper.
    let mut body = serde_json::to_value(object)?;
    body["apiVersion"] = K::api_version(&()).into();
    body["kind"] = K::kind(&()).into();
    api.patch(name, params, &Patch::Apply(&body))
        .await
        .map_err(kube_err(format!("apply {} {name}", K::kind(&()))))
}

/// Marks a relay pod draining (out of the SMTP Service, since `since`) or,
/// with `None`, serving again.
async fn mark_pod(
    ctx: &Context,
    namespace: &str,
    pod: &str,
    since: Option<Timestamp>,
) -> Result<(), Error> {
    let patch = match since {
        Some(since) => serde_json::json!({"metadata": {
            "labels": {TRAFFIC_LABEL: TRAFFIC_DRAIN},
            "annotations": {DRAINING_SINCE: since.to_string()},
        }}),
        None => serde_json::json!({"metadata": {
            "labels": {TRAFFIC_LABEL: build::TRAFFIC_SERVE},
            "annotations": {DRAINING_SINCE: null},
        }}),
    };
    Api::<Pod>::namespaced(ctx.client.clone(), namespace)
        .patch(pod, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(kube_err(format!("label pod {pod}")))?;
    Ok(())
}

/// Writes the status (server-side apply on the status subresource) unless it
/// is what the MailQueue already has, so an unchanged status does not trigger
/// another reconcile.
async fn write_status(
    ctx: &Context,
    namespace: &str,
    name: &str,
    previous: Option<&MailQueueStatus>,
    status: &MailQueueStatus,
) -> Result<(), Error> {
    if previous == Some(status) {
        return Ok(());
    }
    let body = serde_json::json!({
        "apiVersion": MailQueue::api_version(&()),
        "kind": MailQueue::kind(&()),
        "status": status,
    });
    Api::<MailQueue>::namespaced(ctx.client.clone(), namespace)
        .patch_status(
            name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await
        .map_err(kube_err("write MailQueue status"))?;
    Ok(())
}

/// The `Degraded` condition when it names a fault of the relays that the
/// previous status did not (a new reason, or it was not degraded before).
fn new_fault<'a>(
    previous: Option<&MailQueueStatus>,
    status: &'a MailQueueStatus,
    observed: &Observed,
) -> Option<&'a Condition> {
    if observed.faults.is_empty() {
        return None;
    }
    let degraded = status::condition(status, status::DEGRADED).filter(|c| c.status == "True")?;
    let before = previous
        .and_then(|previous| status::condition(previous, status::DEGRADED))
        .filter(|c| c.status == "True");
    (before.map(|c| &c.reason) != Some(&degraded.reason)).then_some(degraded)
}

fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|status| status.conditions.as_ref())
        .is_some_and(|conditions| {
            conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        })
}

/// Events about one MailQueue; a failure to record one is logged, never fatal.
struct Events<'a> {
    recorder: &'a Recorder,
    reference: ObjectReference,
}

impl Events<'_> {
    async fn normal(&self, reason: &str, action: &str, note: &str) {
        self.publish(EventType::Normal, reason, action, note).await;
    }

    async fn warning(&self, reason: &str, action: &str, note: &str) {
        self.publish(EventType::Warning, reason, action, note).await;
    }

    async fn publish(&self, type_: EventType, reason: &str, action: &str, note: &str) {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note.chars().take(1000).collect()),
            action: action.into(),
            secondary: None,
        };
        if let Err(err) = self.recorder.publish(&event, &self.reference).await {
            tracing::warn!("cannot record event {reason}: {err}");
        }
    }
}

/// Runs the controller until `shutdown` resolves: watches MailQueues (in one
/// namespace or all) and the objects they own.
pub async fn run(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    fn api<K>(client: &Client, namespace: &Option<String>) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        match namespace {
            Some(namespace) => Api::namespaced(client.clone(), namespace),
            None => Api::all(client.clone()),
        }
    }
    // Owned objects carry the managed-by label; watching only those keeps
    // the caches small in a big cluster.
    let owned =
        || watcher::Config::default().labels("app.kubernetes.io/managed-by=postern-operator");
    Controller::new(
        api::<MailQueue>(&client, &namespace),
        watcher::Config::default(),
    )
    .owns(api::<StatefulSet>(&client, &namespace), owned())
    .owns(api::<Service>(&client, &namespace), owned())
    .owns(api::<ConfigMap>(&client, &namespace), owned())
    .owns(api::<ServiceAccount>(&client, &namespace), owned())
    .owns(api::<NetworkPolicy>(&client, &namespace), owned())
    .graceful_shutdown_on(shutdown)
    .run(reconcile, error_policy, ctx)
    .for_each(|result| async move {
        match result {
            Ok((object, _)) => tracing::debug!("reconciled {object}"),
            // error_policy already logged it.
            Err(kube::runtime::controller::Error::ReconcilerFailed(..)) => {}
            // An owned object changed after its MailQueue was deleted.
            Err(kube::runtime::controller::Error::ObjectNotFound(object)) => {
                tracing::debug!("{object} is gone")
            }
            // A watch failing (no CRD, no permission) must be visible.
            Err(err) => tracing::warn!("controller: {err}"),
        }
    })
    .await;
}
