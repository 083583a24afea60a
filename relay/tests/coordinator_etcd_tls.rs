//! The coordinator against a real etcd (Debian's etcd-server 3.4) that
//! requires TLS with client certificates (`--client-cert-auth`) and has
//! authentication on: the conformance suite with the right CA, client
//! certificate, user and password, all read through the relay's own
//! `[cluster]` settings (`etcd_ca`, `etcd_cert`, `etcd_key`, `etcd_user`,
//! `etcd_password_file`); then each wrong piece fails with its own error.
//!
//! One etcd for this test binary, its auth tokens valid for one second
//! unused. The CAs and certificates are made here (rcgen); etcd's users and
//! roles are set up with the etcd-client API before `auth enable`: `root`,
//! and `relay` whose role grants read and write on `/postern-test/` only. etcd must be installed (`bash
//! e2e/install-deps`); without it these tests fail, they never skip.

#[path = "common/etcd.rs"]
mod etcd_server;
#[path = "common/pki.rs"]
mod pki;
#[path = "common/stall_proxy.rs"]
mod stall_proxy;
#[path = "coordinator_suite.rs"]
mod suite;

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, Permission, TlsOptions};
use pki::{ca, leaf, write};
use postern::cluster::etcd::{Etcd, EtcdOptions};
use postern::cluster::{Coordinator, Error, LeaseOptions};
use postern::config::ClusterConfig;
use rcgen::ExtendedKeyUsagePurpose;
use stall_proxy::Proxy;
use suite::{Backend, Node};

/// etcd's shortest lease (1.5 × its election timeout, rounded up).
const TTL: Duration = Duration::from_secs(2);
/// The relays' etcd user, and the only prefix its role covers.
const USER: &str = "relay";
const PASSWORD: &str = "s3cret relay password";
const PREFIX: &str = "/postern-test/";
/// The client certificate's common name: no etcd user has it, so the
/// certificate alone (etcd's CN authentication) grants nothing.
const CLIENT_CN: &str = "postern-test-client";

/// The files of the PKI and the running etcd.
struct Setup {
    /// `https://127.0.0.1:PORT`.
    url: &'static str,
    /// The CA that signed etcd's and the client's certificates.
    ca: PathBuf,
    /// A CA that signed nothing etcd has.
    other_ca: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
    password: PathBuf,
    wrong_password: PathBuf,
}

/// The PKI, etcd (started once) and its users, roles and `auth enable`.
fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap().keep();
        let authority = ca("postern test CA");
        let (server_cert, server_key) = leaf(
            &authority,
            "etcd",
            &["127.0.0.1", "localhost"],
            // etcd 3.4's gateway presents the server certificate as a client.
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        );
        let (client_cert, client_key) = leaf(
            &authority,
            CLIENT_CN,
            &[],
            vec![ExtendedKeyUsagePurpose::ClientAuth],
        );
        let ca_file = write(&dir, "ca.crt", &authority.pem());
        let server = etcd_server::ServerTls {
            cert: write(&dir, "server.crt", &server_cert),
            key: write(&dir, "server.key", &server_key),
            client_ca: ca_file.clone(),
            // Tokens expire after a second unused, so the suite also shows
            // that the client fetches a new one and carries on.
            args: vec!["--auth-token-ttl".into(), "1".into()],
        };
        let setup = Setup {
            url: etcd_server::shared_tls(&server),
            other_ca: write(&dir, "other-ca.crt", &ca("another CA").pem()),
            ca: ca_file,
            client_cert: write(&dir, "client.crt", &client_cert),
            client_key: write(&dir, "client.key", &client_key),
            // As a mounted Secret made from a file often is: with a newline.
            password: write(&dir, "password", &format!("{PASSWORD}\n")),
            wrong_password: write(&dir, "wrong-password", "not the password"),
        };
        // Called from async tests: set etcd up on a runtime of its own.
        let (url, ca, cert, key) = (
            setup.url,
            authority.pem(),
            client_cert.clone(),
            client_key.clone(),
        );
        std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(enable_auth(url, ca, cert, key))
        })
        .join()
        .unwrap();
        setup
    })
}

/// Creates `root` and `relay` (read-write on [`PREFIX`]) and turns
/// authentication on.
async fn enable_auth(url: &str, ca: String, cert: String, key: String) {
    let tls = TlsOptions::new()
        .ca_certificate(Certificate::from_pem(ca))
        .identity(Identity::from_pem(cert, key));
    let mut client = Client::connect([url], Some(ConnectOptions::new().with_tls(tls)))
        .await
        .unwrap();
    client
        .user_add("root", "root password", None)
        .await
        .unwrap();
    client.user_grant_role("root", "root").await.unwrap();
    client.role_add("postern").await.unwrap();
    client
        .role_grant_permission("postern", Permission::read_write(PREFIX).with_prefix())
        .await
        .unwrap();
    client.user_add(USER, PASSWORD, None).await.unwrap();
    client.user_grant_role(USER, "postern").await.unwrap();
    client.auth_enable().await.unwrap();
}

/// A relay's `[cluster]` settings for `endpoint`: the right CA, client
/// certificate, user and password file.
fn cluster(setup: &Setup, endpoint: String, prefix: &str) -> ClusterConfig {
    ClusterConfig {
        etcd: vec![endpoint],
        prefix: prefix.to_owned(),
        etcd_ca: Some(setup.ca.clone()),
        etcd_cert: Some(setup.client_cert.clone()),
        etcd_key: Some(setup.client_key.clone()),
        etcd_user: Some(USER.to_owned()),
        etcd_password_file: Some(setup.password.clone()),
        ..ClusterConfig::default()
    }
}

fn options(cluster: &ClusterConfig) -> EtcdOptions {
    let mut options = cluster.etcd_options().unwrap();
    options.request_timeout = Duration::from_secs(2);
    options.connect_timeout = Duration::from_secs(5);
    options
}

fn prefix() -> String {
    format!("{PREFIX}{:016x}/", rand::random::<u64>())
}

/// Every member connects with the full credentials, through its own proxy.
struct SecuredEtcd {
    setup: &'static Setup,
    prefix: String,
}

impl Backend for SecuredEtcd {
    fn options(&self) -> LeaseOptions {
        LeaseOptions::new(TTL)
    }

    fn expiry_slack(&self) -> Duration {
        // etcd looks for expired leases every 500 ms; allow for a busy machine.
        Duration::from_secs(3)
    }

    async fn node(&self) -> Node {
        let upstream = self
            .setup
            .url
            .trim_start_matches("https://")
            .parse()
            .unwrap();
        let proxy = Proxy::start(upstream).await;
        let cluster = cluster(self.setup, format!("https://{}", proxy.addr), &self.prefix);
        let etcd = Etcd::connect(options(&cluster)).await.unwrap();
        let cut = proxy.cut;
        Node {
            coordinator: Arc::new(etcd),
            cut: Box::new(move |on| {
                cut.send_replace(on);
            }),
        }
    }
}

macro_rules! conformance {
    ($($property:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $property() {
                let backend = SecuredEtcd { setup: setup(), prefix: prefix() };
                suite::$property(&backend).await;
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
    watch_resumes_after_a_revision,
);

/// Connects with `cluster` and makes one request; prints the error as a
/// relay's log would show it.
async fn try_connect(cluster: &ClusterConfig) -> Result<(), Error> {
    let result = match Etcd::connect(options(cluster)).await {
        Ok(etcd) => etcd.snapshot().await.map(|_| ()),
        Err(err) => Err(err),
    };
    if let Err(err) = &result {
        eprintln!("{err}");
    }
    result
}

#[tokio::test]
async fn a_wrong_password_is_refused() {
    let setup = setup();
    let mut cluster = cluster(setup, setup.url.to_owned(), &prefix());
    cluster.etcd_password_file = Some(setup.wrong_password.clone());
    match try_connect(&cluster).await {
        Err(Error::Unauthorized(message)) => {
            assert!(message.contains("authentication failed"), "{message}")
        }
        other => panic!("expected Unauthorized, got {other:?}"),
    }
}

#[tokio::test]
async fn no_client_certificate_is_a_tls_error() {
    let setup = setup();
    let mut cluster = cluster(setup, setup.url.to_owned(), &prefix());
    cluster.etcd_cert = None;
    cluster.etcd_key = None;
    match try_connect(&cluster).await {
        Err(Error::Tls(message)) => {
            assert!(message.to_lowercase().contains("certificate"), "{message}")
        }
        other => panic!("expected a TLS error, got {other:?}"),
    }
}

#[tokio::test]
async fn a_ca_that_did_not_sign_etcds_certificate_is_a_tls_error() {
    let setup = setup();
    let mut cluster = cluster(setup, setup.url.to_owned(), &prefix());
    cluster.etcd_ca = Some(setup.other_ca.clone());
    match try_connect(&cluster).await {
        Err(Error::Tls(message)) => {
            assert!(message.contains("invalid peer certificate"), "{message}")
        }
        other => panic!("expected a TLS error, got {other:?}"),
    }
}

/// Authentication is really on: the client certificate alone (its common
/// name is no user) gets nothing.
#[tokio::test]
async fn a_certificate_without_a_user_is_refused() {
    let setup = setup();
    let mut cluster = cluster(setup, setup.url.to_owned(), &prefix());
    cluster.etcd_user = None;
    cluster.etcd_password_file = None;
    match try_connect(&cluster).await {
        Err(Error::Unauthorized(_)) => {}
        other => panic!("expected Unauthorized, got {other:?}"),
    }
}

/// The user's role covers only its prefix: another prefix is refused.
#[tokio::test]
async fn a_prefix_outside_the_users_role_is_refused() {
    let setup = setup();
    let cluster = cluster(setup, setup.url.to_owned(), "/elsewhere/");
    match try_connect(&cluster).await {
        Err(Error::Unauthorized(message)) => {
            assert!(message.contains("permission denied"), "{message}")
        }
        other => panic!("expected Unauthorized, got {other:?}"),
    }
}
