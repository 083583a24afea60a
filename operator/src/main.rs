//! The `postern-operator` command: `run` runs the controller (with leader
//! election, `/healthz` and `/metrics`), `crd` prints the CustomResourceDefinition.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use k8s_openapi::api::coordination::v1::Lease;
use kube::runtime::events::{Recorder, Reporter};
use kube::{Api, Client};
use postern_operator::leader::LeaseLock;
use postern_operator::metrics::Metrics;
use postern_operator::reconcile::{self, Context};
use postern_operator::stats::HttpStats;
use postern_operator::{crd, discovery, http};
use tokio::sync::watch;

/// Kubernetes operator for Postern relay clusters (MailQueue resources).
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the controller against the cluster of the kubeconfig (KUBECONFIG,
    /// ~/.kube/config) or, inside a pod, of its service account.
    Run(RunArgs),
    /// Print the MailQueue CustomResourceDefinition as YAML.
    Crd,
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Manage MailQueues in this namespace only; all namespaces when absent.
    #[arg(long, env = "POSTERN_WATCH_NAMESPACE", value_name = "NAMESPACE")]
    namespace: Option<String>,
    /// Address of /healthz and /metrics.
    #[arg(long, default_value = "0.0.0.0:8080", value_name = "ADDR:PORT")]
    http: SocketAddr,
    /// Name of the leader-election Lease.
    #[arg(long, default_value = "postern-operator", value_name = "NAME")]
    lease_name: String,
    /// Namespace of the Lease; the pod's namespace (POD_NAMESPACE) or the
    /// kubeconfig's default.
    #[arg(long, env = "POD_NAMESPACE", value_name = "NAMESPACE")]
    lease_namespace: Option<String>,
    /// How long the Lease holds without renewal before a standby takes over.
    #[arg(long, default_value = "15s", value_parser = parse_duration_arg, value_name = "DURATION")]
    lease_duration: Duration,
    /// This replica's identity in the Lease; the pod name (POD_NAME) or host name and pid.
    #[arg(long, env = "POD_NAME", value_name = "ID")]
    identity: Option<String>,
    /// How often a steady MailQueue is looked at again, refreshing its queue
    /// columns from the relays' /stats.
    #[arg(long, default_value = "30s", value_parser = parse_duration_arg, value_name = "DURATION")]
    resync: Duration,
    /// Reconcile without leader election (only one replica may run).
    #[arg(long)]
    no_leader_election: bool,
}

fn parse_duration_arg(text: &str) -> Result<Duration, String> {
    crd::parse_duration(text).ok_or_else(|| format!("{text:?} is not a duration such as 15s or 1m"))
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => {
            print!("{}", crd::crd_yaml());
            Ok(())
        }
        Command::Run(args) => {
            init_logging();
            // One process-wide rustls provider: kube's client and anything
            // else using rustls must agree (the relay crate brings aws-lc-rs).
            let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("cannot start the runtime")?
                .block_on(run(args))
        }
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let client = Client::try_default()
        .await
        .context("no Kubernetes API configuration (kubeconfig or in-cluster)")?;
    let pdb = discovery::pdb_version(&client).await?;
    tracing::info!(
        "PodDisruptionBudgets via {}",
        pdb.api_resource().api_version
    );
    let metrics = Arc::new(Metrics::default());

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down");
        let _ = stop_tx.send(true);
    });

    let listener = tokio::net::TcpListener::bind(args.http)
        .await
        .with_context(|| format!("cannot listen on {}", args.http))?;
    tracing::info!("/healthz and /metrics on {}", listener.local_addr()?);
    let http = tokio::spawn(http::serve(
        listener,
        Arc::clone(&metrics),
        stopped(stop_rx.clone()),
    ));

    let identity = args.identity.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "postern-operator".into());
        format!("{host}-{}", std::process::id())
    });
    let lock = if args.no_leader_election {
        None
    } else {
        let namespace = args
            .lease_namespace
            .clone()
            .unwrap_or_else(|| client.default_namespace().to_owned());
        let api: Api<Lease> = Api::namespaced(client.clone(), &namespace);
        let lock = LeaseLock::new(api, &args.lease_name, &identity, args.lease_duration);
        tracing::info!(%identity, "waiting for the lease {namespace}/{}", args.lease_name);
        tokio::select! {
            acquired = lock.acquire() => acquired?,
            () = stopped(stop_rx.clone()) => return Ok(()),
        }
        tracing::info!(%identity, "leading");
        Some(lock)
    };
    metrics.set_leader(true);

    let ctx = Arc::new(Context {
        client: client.clone(),
        recorder: Recorder::new(
            client,
            Reporter {
                controller: reconcile::MANAGER.into(),
                instance: Some(identity),
            },
        ),
        pdb,
        stats: Arc::new(HttpStats),
        metrics: Arc::clone(&metrics),
        clock: Arc::new(k8s_openapi::jiff::Timestamp::now),
        resync: args.resync,
    });
    let controller = reconcile::run(ctx, args.namespace.clone(), stopped(stop_rx.clone()));
    let lost = async {
        match &lock {
            Some(lock) => lock.keep().await,
            None => std::future::pending().await,
        }
    };
    let result = tokio::select! {
        () = controller => Ok(()),
        err = lost => Err(anyhow::Error::new(err)),
    };
    metrics.set_leader(false);
    if let Some(lock) = &lock {
        if result.is_ok() {
            if let Err(err) = lock.release().await {
                tracing::warn!("releasing the lease: {err}");
            }
        }
    }
    http.abort();
    result
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(err) => {
            tracing::warn!("cannot watch SIGTERM: {err}");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
