//! `postern serve`: opens the spool, binds the listeners and the health
//! endpoint, and runs until SIGTERM or SIGINT, then drains.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::info;

use crate::admin;
use crate::admin::access::AdminAccess;
use crate::admin::cluster::ClusterAdmin;
use crate::admin::queue_service::QueueService;
use crate::cluster::node::{ClusterNode, PeerNetwork};
use crate::config::{Config, CopyKind};
use crate::delivery::summary;
use crate::health::{ClusterDelivery, Health};
use crate::http::{self, Readiness};
use crate::inbound::limits::ConnectionLimiter;
use crate::inbound::rate::RateLimits;
use crate::inbound::{self, Listener};
use crate::metrics::Metrics;
use crate::peer::tls::MutualTls;
use crate::peer::{self, store::ReplicaStore, PeerClient, PeerCopy, PeerService, Peers};
use crate::queue::Queue;
use crate::spool::Spool;

/// How long in-flight sessions may run on after a shutdown signal.
const DRAIN_GRACE: Duration = Duration::from_secs(30);

/// Runs the relay until a shutdown signal.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        let _ = shutdown_tx.send(true);
    });
    run_until(config, shutdown_rx).await
}

/// Runs the relay until `shutdown` turns true.
pub async fn run_until(config: Config, shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    let resolv_conf = std::fs::read_to_string(summary::RESOLV_CONF).ok();
    info!(
        "delivery: {}",
        summary::summary(&config, resolv_conf.as_deref())
    );
    info!("spool: {}", config.durability_summary());
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data directory {}", config.data_dir.display()))?;
    let peering = match &config.cluster {
        Some(cluster) => {
            let secret = cluster.shared_secret()?;
            let tls = match &cluster.tls {
                Some(files) => Some(MutualTls::load(files).context("cluster.tls")?),
                None => None,
            };
            let client = Arc::new(
                PeerClient::new(
                    &secret,
                    config.spool.deadline.max(Duration::from_secs(5)),
                    tls.clone(),
                )
                .map_err(|err| anyhow::anyhow!("peer client: {err}"))?,
            );
            Some((cluster.clone(), secret, tls, client))
        }
        None => None,
    };
    let peer_targets = match &peering {
        Some((_, _, _, client)) if config.spool.copies.contains(&CopyKind::Peer) => {
            PeerCopy::targets(&config, Arc::clone(client))
        }
        _ => Vec::new(),
    };
    // A cluster member recovers its spool before it joins (the cluster
    // node's first listing counts on it); a single relay accepts mail while
    // recovery runs, so a deep queue does not keep it closed.
    let (spool, recovered) = if peering.is_some() {
        let (spool, recovered) = Spool::open_with_peers(&config, peer_targets)
            .await
            .context("cannot open the spool")?;
        log_recovered(recovered.messages.len(), &recovered);
        (spool, recovered.messages)
    } else {
        let spool = Spool::open_unrecovered(&config, peer_targets)
            .await
            .context("cannot open the spool")?;
        (spool, Vec::new())
    };

    let metrics = Arc::new(Metrics::default());
    let queue = Queue::open(&config, spool.clone(), recovered, Arc::clone(&metrics))
        .map_err(|err| anyhow::anyhow!("cannot start the queue: {err}"))?;
    let recovery = if peering.is_some() {
        queue.remove_orphan_states().await;
        None
    } else {
        Some(tokio::spawn(recover_in_background(
            spool.clone(),
            queue.clone(),
        )))
    };
    // In a cluster: the peer service (replicas, takeover reads and the
    // cluster-wide admin API, behind the shared secret) and the membership.
    let (peer_stop, peer_stopped) = watch::channel(false);
    let mut cluster_node = None;
    let mut peer_task = None;
    let mut admin_service = QueueService::new(queue.clone());
    if let Some((cluster, secret, tls, client)) = peering {
        admin_service = admin_service.with_cluster(ClusterAdmin::new(
            cluster.member_name(),
            Peers::from_config(&cluster),
            secret.clone(),
            tls.clone(),
        ));
        let replicas = Arc::new(
            ReplicaStore::open(&config.data_dir).context("cannot open the replica directory")?,
        );
        let service = PeerService::new(Arc::clone(&replicas), Some(spool.clone()));
        let routes = peer::routes(service, Some(admin_service.clone()), &secret);
        let socket = TcpListener::bind(cluster.peer_listen)
            .await
            .with_context(|| format!("cannot bind the peer service on {}", cluster.peer_listen))?;
        info!(address = %socket.local_addr()?, tls = tls.is_some(), "peer service listening");
        peer_task = Some(tokio::spawn(peer::serve(
            socket,
            routes,
            tls,
            signalled(peer_stopped),
        )));
        let network = Arc::new(PeerNetwork {
            peers: Peers::from_config(&cluster),
            client,
        });
        let node =
            ClusterNode::start(&config, spool.clone(), queue.clone(), network, replicas).await?;
        queue.set_ownership(Arc::new(node.clone()));
        cluster_node = Some(node);
    }

    let forwarding = spool.object_copy().is_some().then(|| {
        tokio::spawn(forward_stale_segments(
            queue.clone(),
            config.spool.segment_forward_after,
        ))
    });
    let queue_task = tokio::spawn({
        let queue = queue.clone();
        let shutdown = signalled(shutdown.clone());
        async move { queue.run(shutdown).await }
    });

    let admin_path = config.admin_socket();
    let admin_socket = admin::bind_unix(&admin_path)
        .await
        .with_context(|| format!("cannot bind the admin socket {}", admin_path.display()))?;
    info!(socket = %admin_path.display(), "admin service listening");
    let mut admin_tasks = vec![tokio::spawn(admin::serve_unix(
        admin_socket,
        admin_path,
        admin_service.clone(),
        AdminAccess::new(config.admin.group.as_deref())
            .context("cannot set up admin access ([admin] group)")?,
        signalled(shutdown.clone()),
    ))];
    if let Some(listen) = config.admin.listen {
        let tls = match &config.admin.tls {
            Some(files) => Some(MutualTls::load(files).context("admin.tls")?),
            None => None,
        };
        let socket = TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot bind the admin service on {listen}"))?;
        info!(address = %socket.local_addr()?, tls = tls.is_some(), "admin service listening");
        admin_tasks.push(tokio::spawn(admin::serve_tcp(
            socket,
            admin_service.clone(),
            tls,
            signalled(shutdown.clone()),
        )));
    }

    let readiness = Readiness::default();
    let health = Health::new(
        config.delivery.paused,
        cluster_node
            .clone()
            .map(|node| Arc::new(node) as Arc<dyn ClusterDelivery>),
    );
    let http_socket = TcpListener::bind(config.http.listen)
        .await
        .with_context(|| format!("cannot bind the health endpoint {}", config.http.listen))?;
    let http_task = tokio::spawn(http::serve(
        http_socket,
        readiness.clone(),
        Arc::clone(&metrics),
        Arc::clone(spool.copy_latency()),
        health.clone(),
        signalled(shutdown.clone()),
    ));

    let connections = ConnectionLimiter::new(
        config.limits.max_connections,
        config.limits.max_connections_per_ip,
    )
    .with_rates(RateLimits::new(&config.rate_limits));
    let submission_auth = inbound::auth::SubmissionAuth::new(&config.auth)
        .context("[auth]")?
        .map(Arc::new);
    let dkim = postern_dkim(&config)?;
    let mut listeners = Vec::new();
    for listener_config in &config.listeners {
        let mut listener =
            Listener::new(&config, listener_config, spool.clone(), connections.clone())
                .map_err(|err| anyhow::anyhow!("listener {}: {err}", listener_config.name))?;
        listener.draining = shutdown.clone();
        listener.queue = Some(queue.clone());
        listener.metrics = Arc::clone(&metrics);
        if listener_config.mode.is_submission() {
            listener.auth = submission_auth.clone();
        }
        listener.dkim = dkim.clone();
        let socket = TcpListener::bind(listener_config.address)
            .await
            .with_context(|| {
                format!(
                    "cannot bind listener {} on {}",
                    listener_config.name, listener_config.address
                )
            })?;
        info!(listener = %listener_config.name, address = %socket.local_addr()?, mode = ?listener_config.mode, tls = listener.tls.is_some(), "listening");
        listeners.push(tokio::spawn(inbound::serve(
            Arc::new(listener),
            socket,
            signalled(shutdown.clone()),
        )));
    }
    if config.submission.enabled {
        let mut listener = Listener::submission(&config, spool.clone(), connections.clone())
            .map_err(|err| anyhow::anyhow!("submission: {err}"))?;
        listener.dkim = dkim.clone();
        listener.draining = shutdown.clone();
        listener.queue = Some(queue.clone());
        listener.metrics = Arc::clone(&metrics);
        let path = config.submission_socket();
        let socket = admin::bind_unix(&path)
            .await
            .with_context(|| format!("cannot bind the submission socket {}", path.display()))?;
        info!(socket = %path.display(), "local submission listening (postern sendmail)");
        listeners.push(tokio::spawn(inbound::serve(
            Arc::new(listener),
            socket,
            signalled(shutdown.clone()),
        )));
    }
    readiness.set(true);
    info!(hostname = %config.hostname, data_dir = %config.data_dir.display(), "postern ready");

    signalled(shutdown.clone()).await;
    readiness.set(false);
    health.set_draining();
    info!(
        open = connections.open(),
        "shutting down: not accepting, waiting for sessions in progress"
    );
    let drained = tokio::time::timeout(DRAIN_GRACE, futures::future::join_all(listeners)).await;
    if drained.is_err() {
        info!(
            open = connections.open(),
            "drain grace period over; closing the remaining sessions"
        );
    }
    let _ = queue_task.await;
    for task in [forwarding, recovery].into_iter().flatten() {
        task.abort();
    }
    // Copies still being written after their 250 (the ones beyond the quorum)
    // finish before we exit.
    if tokio::time::timeout(DRAIN_GRACE, spool.drain())
        .await
        .is_err()
    {
        tracing::warn!("background copies still running at exit; repair will re-create them");
    }
    // Copies are complete: hand the spools over so a peer delivers them now.
    if let Some(node) = cluster_node {
        node.leave().await;
    }
    let _ = peer_stop.send(true);
    if let Some(task) = peer_task {
        if let Ok(Err(err)) = task.await {
            tracing::warn!("peer service: {err}");
        }
    }
    let _ = http_task.await;
    for task in admin_tasks {
        if let Ok(Err(err)) = task.await {
            tracing::warn!("admin service: {err}");
        }
    }
    info!("stopped");
    Ok(())
}

/// Resolves once the watch value is true.
async fn signalled(mut shutdown: watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received"),
        _ = int.recv() => info!("SIGINT received"),
    }
}

fn log_recovered(messages: usize, recovered: &crate::spool::Recovered) {
    info!(
        messages,
        removed = recovered.removed,
        quarantined = recovered.quarantined,
        "spool recovered"
    );
}

/// Outside a cluster: recovers the spool while the relay accepts and
/// delivers, queueing what it finds one subdirectory at a time; then
/// releases the object-store segments of finished messages and removes
/// state files left by messages that are gone.
async fn recover_in_background(spool: Spool, queue: Queue) {
    let mut live = std::collections::HashSet::new();
    let mut count = 0;
    let keep_ids = spool.object_copy().is_some();
    let recovered = async {
        let mut recovery = spool.recover().await?;
        while let Some(batch) = recovery.next_batch().await? {
            count += batch.len();
            if keep_ids {
                live.extend(batch.iter().map(|envelope| envelope.id.clone()));
            }
            queue.add_recovered(batch).await;
        }
        Ok::<_, crate::spool::SpoolError>(recovery.finish())
    };
    match recovered.await {
        Ok(recovered) => log_recovered(count, &recovered),
        Err(err) => {
            // Nothing is lost: what was not recovered stays on disk for the
            // next start. This relay goes on with what it has.
            tracing::error!(error = %err, "cannot recover the whole spool; the rest waits for a restart");
            return;
        }
    }
    release_finished_segments(&spool, live);
    queue.remove_orphan_states().await;
}

/// Outside a cluster: the object-store segments written before this start
/// hold finished messages (all those recovery did not find, `live` names
/// the others); releasing them deletes the segments that hold nothing else.
fn release_finished_segments(spool: &Spool, live: std::collections::HashSet<String>) {
    let Some(objects) = spool.object_copy().cloned() else {
        return;
    };
    tokio::spawn(async move {
        match objects.list_spool("").await {
            Ok(_) => {
                objects
                    .release_foreign_unless("", |id| live.contains(id))
                    .await
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot list the object store; finished segments stay until the next start")
            }
        }
    });
}

/// Copies long-queued messages out of mostly finished segments, checking
/// every quarter of `after` (at most every minute).
async fn forward_stale_segments(queue: Queue, after: Duration) {
    let every = (after / 4).min(Duration::from_secs(60));
    loop {
        tokio::time::sleep(every).await;
        queue.forward_stale_segments(after).await;
    }
}

/// The `[[dkim]]` keys, each named in the log with the DNS name its public
/// key must be published under.
fn postern_dkim(config: &Config) -> anyhow::Result<Option<Arc<crate::dkim::DkimKeys>>> {
    let keys = crate::dkim::DkimKeys::load(&config.dkim).context("[[dkim]]")?;
    for dkim in &config.dkim {
        info!(domain = %dkim.domain, record = %format!("{}._domainkey.{}", dkim.selector, dkim.domain), "DKIM signing");
    }
    Ok(keys.map(Arc::new))
}
