//! The `MailQueue` custom resource (`postern.dev/v1alpha1`): what a user sets
//! (spec, with the schema's minimums, enums and patterns) and what the
//! operator reports (status, conditions, printer columns).
//!
//! The schema only holds checks a Kubernetes 1.20 API server can enforce (no
//! CEL); rules spanning fields live in [`crate::relay_config`] and surface as a
//! `Degraded` condition.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, CustomResourceExt};
use postern::config::{DeliveryConfig, LimitsConfig, SpoolConfig};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A DNS-1123 label: names of listeners and Kubernetes objects.
const LABEL: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";
/// A mail domain; a leading dot matches subdomains (as the relay's routes do).
const DOMAIN: &str =
    r"^\.?[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?(\.[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?)*$";
/// A duration as the relay writes them: `90s`, `5m`, `1h30m`, `5d`.
const DURATION: &str = r"^([0-9]+(ms|s|m|h|d))+$";
/// An IPv4 or IPv6 network in CIDR notation (parsed exactly by the operator).
const CIDR: &str = r"^[0-9A-Fa-f:.]+/[0-9]{1,3}$";
/// A next hop: `host:port`, `[host]:port` or `unix:/path`.
const NEXT_HOP: &str = r"^(unix:/.+|\[[^\]]+\]:[0-9]{1,5}|[^\s:\[\]]+:[0-9]{1,5})$";
/// A storage quantity such as `10Gi`.
const QUANTITY: &str = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$";
/// An http(s) URL.
const URL: &str = r"^https?://[^\s]+$";

/// A Postern relay cluster: a StatefulSet of relays with their spool volumes,
/// Services for SMTP and for peers, the relay configuration and a disruption budget.
// kube's `printcolumn(...)` repeats keys such as `type_` by design.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "postern.dev",
    version = "v1alpha1",
    kind = "MailQueue",
    plural = "mailqueues",
    shortname = "mq",
    namespaced,
    doc = "A Postern relay cluster, run by postern-operator.",
    status = "MailQueueStatus",
    derive = "PartialEq",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        description = "Ready relays of the desired number",
        json_path = ".status.ready"
    ),
    printcolumn(
        name = "Queued",
        type_ = "integer",
        description = "Messages waiting in the relays' queues",
        json_path = ".status.queueDepth"
    ),
    printcolumn(
        name = "Oldest",
        type_ = "date",
        description = "Arrival of the oldest queued message",
        json_path = ".status.oldestMessageTime"
    ),
    printcolumn(
        name = "Status",
        type_ = "string",
        description = "Reason of the Degraded condition while it is true, else of the Ready condition",
        json_path = ".status.state"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    printcolumn(
        name = "Image",
        type_ = "string",
        priority = 1,
        description = "Relay image",
        json_path = ".spec.image"
    ),
    printcolumn(
        name = "Draining",
        type_ = "string",
        priority = 1,
        description = "Relays being drained before a scale-down",
        json_path = ".status.draining"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct MailQueueSpec {
    /// Number of relays. A scale-down first drains the highest ordinals (no new
    /// SMTP sessions reach them) and removes them once their queues are empty
    /// or the drain timeout passed.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0))]
    pub replicas: i32,
    /// Relay container image (its `postern` binary runs `serve`). Default:
    /// `localhost/postern:<operator version>`, the name `deploy/image/build`
    /// gives the image it builds; set it to where you pushed that image.
    #[serde(default = "default_image")]
    #[schemars(length(min = 1))]
    pub image: String,
    /// Pull policy of the relay image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<PullPolicy>,
    /// Name the relays use in their greeting, EHLO and `Received:` headers.
    /// Default: `<name>.<namespace>.svc`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DOMAIN), length(max = 253))]
    pub hostname: Option<String>,
    /// SMTP listeners; each is a container port and a port of the SMTP Service.
    #[serde(default = "default_listeners")]
    #[schemars(length(min = 1))]
    pub listeners: Vec<Listener>,
    /// The Service that carries SMTP to the relays.
    #[serde(default)]
    pub service: SmtpService,
    /// Domains the relays accept mail for from anyone.
    #[serde(default)]
    pub relay_domains: Vec<Domain>,
    /// Client networks (CIDR) allowed to relay to any domain; none by default.
    #[serde(default)]
    pub trusted_networks: Vec<Network>,
    /// Static routes: recipient domains to next hops. Everything else goes by
    /// MX lookup or to `relayhost`.
    #[serde(default)]
    pub routes: Vec<Route>,
    /// Content scanners that listeners name in `scanners`: each reads the
    /// spooled message before the end-of-data reply and decides it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scanners: Vec<Scanner>,
    /// Password authentication for `submission` and `submissions` listeners.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<SubmissionAuth>,
    /// DKIM keys: mail from the relay's own users (authenticated, trusted
    /// networks) whose `From:` domain has a key is signed with it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dkim: Vec<DkimKey>,
    /// Next hop for all mail without a matching route (`host:port`, `[host]:port`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = NEXT_HOP))]
    pub relayhost: Option<String>,
    /// Which durable copies are written and how many confirm before `250`.
    #[serde(default)]
    pub ack_policy: AckPolicy,
    /// S3-compatible object storage for the object-store copy. Without it the
    /// copy goes to a directory on the spool volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object_store: Option<ObjectStore>,
    /// etcd for cluster membership and spool ownership leases between relays.
    /// When set, the relays form one cluster: they join etcd under
    /// `/postern/<namespace>/<name>`, reach each other's peer service on port
    /// 9327 through the headless `<name>-peers` Service, take over the spools
    /// of relays that died, and may keep `peer` copies (`ackPolicy.copies`).
    /// Without it every relay delivers only its own spool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etcd: Option<Etcd>,
    /// Retries and delivery concurrency.
    #[serde(default)]
    pub delivery: Delivery,
    /// Protocol and connection limits.
    #[serde(default)]
    pub limits: Limits,
    /// The per-relay spool volume.
    #[serde(default)]
    pub spool: SpoolVolume,
    /// How long a stopping relay may take to finish its sessions (its pods'
    /// termination grace period), and how long a scale-down waits for a
    /// drained relay's queue to empty.
    #[serde(default = "default_drain_timeout")]
    #[schemars(regex(pattern = DURATION))]
    pub drain_timeout: String,
    /// Compute resources of the relay container. When absent the relays
    /// request `cpu: 100m` and `memory: 128Mi` (enough for a lightly loaded
    /// relay; set your own for real traffic) and have no limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
    /// A NetworkPolicy for the relay pods, made by the operator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_policy: Option<RelayNetworkPolicy>,
}

/// The relays' NetworkPolicy. The operator makes it (not the chart) because
/// it is the one that knows each MailQueue's listener ports and which pods
/// are its relays.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RelayNetworkPolicy {
    /// Make a NetworkPolicy `<name>` that admits, to the relay pods, the SMTP
    /// listeners' ports and the HTTP port (9325: health, `/stats` the
    /// operator reads, `/metrics`) from anywhere, and the peer port (9327)
    /// only from this MailQueue's own relays; all other ingress is dropped
    /// (egress is not restricted). Needs a network plugin that enforces
    /// NetworkPolicies. Turning it off deletes the policy the operator made.
    #[serde(default)]
    pub enabled: bool,
}

/// Compute resources (`cpu`, `memory`, …) of the relay container.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Resources {
    /// What the scheduler reserves.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub requests: BTreeMap<String, Quantity>,
    /// What the container may use at most.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub limits: BTreeMap<String, Quantity>,
}

impl Resources {
    /// As the container field.
    pub fn to_requirements(&self) -> ResourceRequirements {
        ResourceRequirements {
            requests: (!self.requests.is_empty()).then(|| self.requests.clone()),
            limits: (!self.limits.is_empty()).then(|| self.limits.clone()),
            ..ResourceRequirements::default()
        }
    }
}

/// A mail domain; `.example.org` matches subdomains.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(transparent)]
pub struct Domain(#[schemars(regex(pattern = DOMAIN), length(min = 1, max = 255))] pub String);

/// A network in CIDR notation, such as `10.0.0.0/8`.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(transparent)]
pub struct Network(#[schemars(regex(pattern = CIDR))] pub String);

/// An etcd endpoint URL.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(transparent)]
pub struct Endpoint(#[schemars(regex(pattern = URL))] pub String);

/// When the kubelet pulls the image.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum PullPolicy {
    /// Every time a pod starts.
    Always,
    /// Only when the node lacks it.
    IfNotPresent,
    /// Never; the image must be on the node.
    Never,
}

/// One SMTP listener.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Listener {
    /// Name of the listener and of its container and Service ports.
    #[schemars(regex(pattern = LABEL), length(min = 1, max = 15))]
    pub name: String,
    /// Container port the relay binds.
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// Port of the SMTP Service; default: `port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub service_port: Option<i32>,
    /// A `kubernetes.io/tls` Secret (`tls.crt`, `tls.key`); STARTTLS is offered when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = LABEL_OR_SUBDOMAIN))]
    pub tls_secret: Option<String>,
    /// Names of `spec.scanners` run, in order, on every message of this listener.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scanners: Vec<String>,
    /// `smtp` (relaying, the default), `submission` (587: STARTTLS, then
    /// AUTH) or `submissions` (465: implicit TLS, then AUTH). Submission
    /// listeners need `tlsSecret` and `spec.auth`.
    #[serde(default, skip_serializing_if = "ListenerMode::is_smtp")]
    pub mode: ListenerMode,
}

/// What a listener is for.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ListenerMode {
    /// Relaying: the relay policy decides, no AUTH.
    #[default]
    Smtp,
    /// Message submission with STARTTLS, then AUTH PLAIN or LOGIN.
    Submission,
    /// Message submission over implicit TLS (RFC 8314).
    Submissions,
}

impl ListenerMode {
    /// Whether this is the relaying default.
    pub fn is_smtp(&self) -> bool {
        *self == ListenerMode::Smtp
    }
}

/// One DKIM signing key.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DkimKey {
    /// The signing domain (`d=`); its subdomains are signed with it too.
    pub domain: String,
    /// The selector: the public key is at `<selector>._domainkey.<domain>`.
    #[schemars(regex(pattern = LABEL))]
    pub selector: String,
    /// A Secret whose `private.key` is the PEM private key (RSA of 2048
    /// bits or more, or Ed25519), mounted read-only under
    /// `/etc/postern/dkim/<selector>.<domain>`.
    #[schemars(regex(pattern = LABEL_OR_SUBDOMAIN))]
    pub secret: String,
}

/// How submission listeners check passwords: one of `passwordSecret` or
/// `dovecot`.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SubmissionAuth {
    /// A Secret whose `passwd` key holds `user:hash` lines (argon2id,
    /// bcrypt or SHA-512-crypt, as `doveadm pw` or `mkpasswd` make them;
    /// plaintext is refused). Mounted read-only under `/etc/postern/auth`;
    /// the relays re-read it when it changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = LABEL_OR_SUBDOMAIN))]
    pub password_secret: Option<String>,
    /// Dovecot's authentication service, `host:port` of an `inet_listener`
    /// in its `service auth`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dovecot: Option<String>,
    /// Which envelope senders each user may use: addresses, `@domain`, or
    /// `<>`. A user not listed may use its login when that is an address.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub senders: BTreeMap<String, Vec<String>>,
    /// Failed attempts from one address or for one user within 15 minutes
    /// before it is refused (421) for the rest of the window; default 10.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_failures: Option<i32>,
}

/// A Secret name (DNS-1123 subdomain).
const LABEL_OR_SUBDOMAIN: &str =
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";

/// The SMTP Service.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SmtpService {
    /// Service type.
    #[serde(default, rename = "type")]
    pub type_: ServiceType,
    /// Annotations for the Service (load-balancer settings, for example).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// Kubernetes Service types that make sense for SMTP.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum ServiceType {
    /// Reachable inside the cluster.
    #[default]
    ClusterIP,
    /// Also on a port of every node.
    NodePort,
    /// Also through the cloud's load balancer.
    LoadBalancer,
}

/// A static route.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Route {
    /// Recipient domains this route serves; `.example.org` matches subdomains.
    #[schemars(length(min = 1))]
    pub domains: Vec<Domain>,
    /// `host:port`, `[host]:port` or `unix:/path`; no MX lookup.
    #[schemars(regex(pattern = NEXT_HOP))]
    pub next_hop: String,
    /// Protocol spoken to the next hop.
    #[serde(default)]
    pub protocol: RouteProtocol,
    /// STARTTLS towards the next hop.
    #[serde(default)]
    pub tls: RouteTls,
    /// Secret whose key `auth` holds `username:password` for AUTH PLAIN (only over TLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = LABEL_OR_SUBDOMAIN))]
    pub credentials_secret: Option<String>,
    /// Early delivery: try this next hop during the end of data, before
    /// answering; its 250 or 5xx becomes the reply, anything else queues.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub early_delivery: bool,
    /// How long early delivery may take before the message is queued
    /// instead (default 20s, at most 5m).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION))]
    pub early_budget: Option<String>,
}

/// A content scanner.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Scanner {
    /// Name that listeners use in `scanners`.
    #[schemars(regex(pattern = LABEL), length(min = 1, max = 63))]
    pub name: String,
    /// Protocol: rspamd's HTTP protocol, or an SMTP/LMTP server.
    pub kind: ScannerKind,
    /// rspamd: `host:port` of its normal worker; smtp/lmtp: `host:port` or `unix:/path`.
    #[schemars(regex(pattern = NEXT_HOP))]
    pub address: String,
    /// Longest a scan may take (default 30s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION))]
    pub timeout: Option<String>,
    /// Scanner down or too slow: `tempfail` (451, the default) or `accept`.
    #[serde(default)]
    pub on_failure: ScannerFailure,
    /// rspamd sharing the spool volume (a sidecar): pass the file's path
    /// instead of the message.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pass_file: bool,
}

/// A scanner's protocol.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ScannerKind {
    /// rspamd's `POST /checkv2`.
    Rspamd,
    /// An SMTP server that takes or refuses the message.
    Smtp,
    /// An LMTP server.
    Lmtp,
}

/// What a scanner failure means for the message.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ScannerFailure {
    /// 451 4.7.1: the client tries again later.
    #[default]
    Tempfail,
    /// Accept the message unscanned.
    Accept,
}

/// Protocol to a next hop.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RouteProtocol {
    /// ESMTP.
    #[default]
    Smtp,
    /// LMTP: one reply per recipient.
    Lmtp,
}

/// TLS towards a next hop.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RouteTls {
    /// Never STARTTLS.
    None,
    /// STARTTLS when offered, certificate not verified.
    #[default]
    Opportunistic,
    /// STARTTLS with a verified certificate, or the delivery waits.
    Required,
}

/// The ack policy.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AckPolicy {
    /// Copies written in parallel for every message.
    #[serde(default = "default_copies")]
    #[schemars(length(min = 1))]
    pub copies: Vec<CopyKind>,
    /// How many of `copies` must confirm before the client gets `250`; a
    /// `peer` entry counts `peerReplicas` times.
    #[serde(default = "default_required")]
    #[schemars(range(min = 1))]
    pub required: i32,
    /// Peer relays that each keep a replica of every message when `copies`
    /// has `peer` (at most the number of relays minus one can answer).
    #[serde(default = "default_peer_replicas")]
    #[schemars(range(min = 1))]
    pub peer_replicas: i32,
    /// How long end-of-data waits for the quorum before answering `451`.
    #[serde(default = "default_ack_deadline")]
    #[schemars(regex(pattern = DURATION))]
    pub deadline: String,
}

impl Default for AckPolicy {
    fn default() -> Self {
        AckPolicy {
            copies: default_copies(),
            required: default_required(),
            peer_replicas: default_peer_replicas(),
            deadline: default_ack_deadline(),
        }
    }
}

/// A kind of durable copy.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum CopyKind {
    /// The relay's fsync'd spool on its volume.
    Local,
    /// The object store.
    ObjectStore,
    /// Replicas on `peerReplicas` other relays of the cluster; needs `spec.etcd`.
    Peer,
}

/// S3-compatible object storage.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ObjectStore {
    /// Endpoint URL (MinIO, Ceph…); AWS when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = URL))]
    pub endpoint: Option<String>,
    /// Bucket.
    #[schemars(length(min = 3, max = 63))]
    pub bucket: String,
    /// Key prefix for this relay cluster's objects.
    // No empty-string default in the schema: Kubernetes 1.20 reads `default: ""` as null.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub prefix: String,
    /// Region.
    #[serde(default = "default_region")]
    #[schemars(length(min = 1))]
    pub region: String,
    /// Secret with keys `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = LABEL_OR_SUBDOMAIN))]
    pub credentials_secret: Option<String>,
    /// Allow a plain-HTTP endpoint.
    #[serde(default)]
    pub allow_http: bool,
}

/// etcd for cluster membership and ownership leases.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Etcd {
    /// Client URLs.
    #[schemars(length(min = 1))]
    pub endpoints: Vec<Endpoint>,
    /// Required: a Secret in the MailQueue's namespace whose key `secret`
    /// holds the shared secret (at least 16 characters) every request
    /// between relays carries. Create it yourself, e.g. `kubectl create secret
    /// generic mx-peer --from-literal=secret=$(openssl rand -hex 24)`; it is
    /// mounted read-only into the relay pods, the operator never reads it.
    /// Without it the MailQueue is Degraded (InvalidSpec).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = LABEL_OR_SUBDOMAIN))]
    pub peer_secret: Option<String>,
    /// Mutual TLS between the relays (replicas, takeover reads, cluster
    /// admin): a Secret in the MailQueue's namespace with `tls.crt` and
    /// `tls.key`, a certificate for the relays (server and client use), and
    /// `ca.crt`, the CA whose certificates they accept, as a cert-manager
    /// Certificate writes them. Give the cluster a CA of its own: every
    /// certificate it issued is taken for a member. Mounted read-only under
    /// `/etc/postern/peer-tls`; the relays pick up a renewed certificate
    /// without a restart. Without it the peer channel is plaintext.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = LABEL_OR_SUBDOMAIN))]
    pub peer_tls_secret: Option<String>,
    /// TLS towards etcd: a Secret in the MailQueue's namespace with `ca.crt`,
    /// the CA that signed etcd's server certificate (nothing else is
    /// trusted), and `tls.crt` and `tls.key`, the relays' client certificate
    /// for an etcd run with `--client-cert-auth` (as cert-manager writes a
    /// Certificate's Secret). Every endpoint must then be `https://`, and an
    /// `https://` endpoint needs it. Mounted read-only into the relay pods
    /// under `/etc/postern/etcd/tls`; the operator never reads it. The relays
    /// read it when they start: after renewing the certificate, restart them
    /// (`kubectl rollout restart statefulset/<name>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = LABEL_OR_SUBDOMAIN))]
    pub tls_secret: Option<String>,
    /// Whether `tlsSecret` holds a client certificate (`tls.crt`, `tls.key`)
    /// the relays present. Default true; false when etcd does not ask for
    /// client certificates and the Secret has only `ca.crt`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_client_certificate: Option<bool>,
    /// etcd authentication (`etcdctl auth enable`): a Secret in the
    /// MailQueue's namespace with the keys `username` and `password` of an
    /// etcd user whose role grants read and write on the prefix
    /// `/postern/<namespace>/<name>/`. Mounted read-only into the relay pods
    /// under `/etc/postern/etcd/auth` (both as files: nothing in the pods'
    /// environment); the operator never reads it. Send it over TLS
    /// (`tlsSecret`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = LABEL_OR_SUBDOMAIN))]
    pub auth_secret: Option<String>,
    /// Deprecated and ignored: use `tlsSecret` and `authSecret`. Still
    /// accepted so MailQueues that set it stay valid; setting it is reported
    /// as a Warning event (`Deprecated`). It never had an effect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = LABEL_OR_SUBDOMAIN))]
    pub credentials_secret: Option<String>,
}

impl Etcd {
    /// Whether the relays present a client certificate from `tlsSecret`.
    pub fn client_certificate(&self) -> bool {
        self.tls_secret.is_some() && self.tls_client_certificate != Some(false)
    }
}

/// Delivery settings.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Delivery {
    /// Delays between attempts; the last repeats until `maxAge`.
    #[serde(default = "default_retry_schedule")]
    #[schemars(length(min = 1), inner(regex(pattern = DURATION)))]
    pub retry_schedule: Vec<String>,
    /// A message still undelivered after this long bounces.
    #[serde(default = "default_max_age")]
    #[schemars(regex(pattern = DURATION))]
    pub max_age: String,
    /// Warn the sender once a message waited this long; off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION))]
    pub delay_warning: Option<String>,
    /// Keep accepting and queueing, deliver nothing.
    #[serde(default)]
    pub paused: bool,
    /// Deliveries in progress per relay.
    #[serde(default = "default_max_concurrency")]
    #[schemars(range(min = 1))]
    pub max_concurrency: i32,
    /// Deliveries in progress to one destination per relay.
    #[serde(default = "default_max_per_destination")]
    #[schemars(range(min = 1))]
    pub max_per_destination: i32,
}

impl Default for Delivery {
    fn default() -> Self {
        Delivery {
            retry_schedule: default_retry_schedule(),
            max_age: default_max_age(),
            delay_warning: None,
            paused: false,
            max_concurrency: default_max_concurrency(),
            max_per_destination: default_max_per_destination(),
        }
    }
}

/// Limits.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Limits {
    /// Largest message accepted, in octets.
    #[serde(default = "default_max_message_size")]
    #[schemars(range(min = 1024))]
    pub max_message_size: i64,
    /// Most recipients in one transaction.
    #[serde(default = "default_max_recipients")]
    #[schemars(range(min = 1))]
    pub max_recipients: i32,
    /// Concurrent SMTP connections per relay.
    #[serde(default = "default_max_connections")]
    #[schemars(range(min = 1))]
    pub max_connections: i32,
    /// Concurrent SMTP connections from one client address per relay.
    #[serde(default = "default_max_connections_per_ip")]
    #[schemars(range(min = 1))]
    pub max_connections_per_ip: i32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_size: default_max_message_size(),
            max_recipients: default_max_recipients(),
            max_connections: default_max_connections(),
            max_connections_per_ip: default_max_connections_per_ip(),
        }
    }
}

/// The spool volume of each relay (a PersistentVolumeClaim template).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SpoolVolume {
    /// Requested size.
    #[serde(default = "default_spool_size")]
    #[schemars(regex(pattern = QUANTITY))]
    pub size: String,
    /// StorageClass; the cluster's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = LABEL_OR_SUBDOMAIN))]
    pub storage_class_name: Option<String>,
}

impl Default for SpoolVolume {
    fn default() -> Self {
        SpoolVolume {
            size: default_spool_size(),
            storage_class_name: None,
        }
    }
}

/// What the operator observed.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MailQueueStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Relay pods that exist (the scale subresource's status).
    #[serde(default)]
    pub replicas: i32,
    /// Relay pods that are ready.
    #[serde(default)]
    pub ready_replicas: i32,
    /// `ready/desired`, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<String>,
    /// Label selector of the relay pods (the scale subresource's selector).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// Messages queued over all relays that answered.
    #[serde(default)]
    pub queue_depth: i64,
    /// Arrival of the oldest queued message; absent when the queues are empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_message_time: Option<Time>,
    /// Pods being drained before a scale-down, comma-separated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub draining: Option<String>,
    /// Hash of the relay configuration the pods should run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_hash: Option<String>,
    /// The STATUS column: the `Degraded` condition's reason while it is
    /// true (`ImagePullFailed`, `PeerSecretMissing`, `EtcdUnreachable`, …),
    /// else the `Ready` condition's reason (`RelaysReady`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// `Ready`, `Progressing`, `Degraded`, `Draining`.
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// The relay image deploy/image/build makes for this version.
pub fn default_image() -> String {
    format!("localhost/postern:{}", env!("CARGO_PKG_VERSION"))
}

fn default_replicas() -> i32 {
    2
}

fn default_listeners() -> Vec<Listener> {
    vec![Listener {
        name: "smtp".into(),
        port: 2525,
        service_port: Some(25),
        tls_secret: None,
        scanners: Vec::new(),
        mode: ListenerMode::Smtp,
    }]
}

fn default_drain_timeout() -> String {
    "5m".into()
}

fn default_copies() -> Vec<CopyKind> {
    vec![CopyKind::Local, CopyKind::ObjectStore]
}

/// Both default copies: a MailQueue's mail must outlive its node, so the
/// object-store copy is confirmed too (the relay's own single-node default
/// is one local copy).
fn default_required() -> i32 {
    2
}

fn default_peer_replicas() -> i32 {
    postern::config::ClusterConfig::default().replicas as i32
}

fn default_ack_deadline() -> String {
    duration_text(SpoolConfig::default().deadline)
}

fn default_region() -> String {
    "us-east-1".into()
}

fn default_retry_schedule() -> Vec<String> {
    DeliveryConfig::default()
        .retry_schedule
        .into_iter()
        .map(duration_text)
        .collect()
}

fn default_max_age() -> String {
    duration_text(DeliveryConfig::default().max_age)
}

fn default_max_concurrency() -> i32 {
    DeliveryConfig::default().max_concurrency as i32
}

fn default_max_per_destination() -> i32 {
    DeliveryConfig::default().max_per_destination as i32
}

fn default_max_message_size() -> i64 {
    LimitsConfig::default().max_message_size as i64
}

fn default_max_recipients() -> i32 {
    LimitsConfig::default().max_recipients as i32
}

fn default_max_connections() -> i32 {
    LimitsConfig::default().max_connections as i32
}

fn default_max_connections_per_ip() -> i32 {
    LimitsConfig::default().max_connections_per_ip as i32
}

fn default_spool_size() -> String {
    "10Gi".into()
}

/// A duration in the CRD's notation (`5m`, `1h30m`, `5d`), the largest units first.
pub fn duration_text(duration: std::time::Duration) -> String {
    let mut secs = duration.as_secs();
    let millis = duration.subsec_millis();
    if secs == 0 && millis == 0 {
        return "0s".into();
    }
    let mut text = String::new();
    for (unit, size) in [("d", 86_400), ("h", 3600), ("m", 60), ("s", 1)] {
        if secs >= size {
            text.push_str(&format!("{}{unit}", secs / size));
            secs %= size;
        }
    }
    if millis > 0 {
        text.push_str(&format!("{millis}ms"));
    }
    text
}

/// Parses a duration in the CRD's notation.
pub fn parse_duration(text: &str) -> Option<std::time::Duration> {
    let mut total = std::time::Duration::ZERO;
    let mut rest = text;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit())?;
        if digits == 0 {
            return None;
        }
        let value: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (std::time::Duration::from_millis(1), 2)
        } else {
            let secs = match rest.as_bytes()[0] {
                b's' => 1,
                b'm' => 60,
                b'h' => 3600,
                b'd' => 86_400,
                _ => return None,
            };
            (std::time::Duration::from_secs(secs), 1)
        };
        total = total.checked_add(unit.checked_mul(u32::try_from(value).ok()?)?)?;
        rest = &rest[len..];
    }
    Some(total)
}

/// Whether `text` is a storage quantity the schema's pattern accepts (`10Gi`, `500M`, `1.5Ti`).
pub fn parse_quantity_ok(text: &str) -> bool {
    let number_end = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(number_end);
    let mut parts = number.split('.');
    let whole_ok = parts.next().is_some_and(|p| !p.is_empty());
    let fraction_ok = parts.next().is_none_or(|p| !p.is_empty());
    whole_ok
        && fraction_ok
        && parts.next().is_none()
        && [
            "", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei", "k", "M", "G", "T", "P", "E",
        ]
        .contains(&suffix)
}

/// The CustomResourceDefinition, as `postern-operator crd` prints it.
pub fn crd() -> CustomResourceDefinition {
    MailQueue::crd()
}

/// The CRD as YAML, exactly as committed under `crds/`.
pub fn crd_yaml() -> String {
    let yaml = serde_yaml::to_string(&crd()).expect("a CRD always serializes");
    format!("# Generated by `postern-operator crd`; do not edit.\n---\n{yaml}")
}

/// The chart's `templates/crd.yaml`: the same CRD, kept on `helm uninstall`
/// (deleting it would delete every MailQueue), installed when `crds.install` is set.
pub fn chart_crd_template() -> String {
    let mut crd = crd();
    crd.metadata.annotations = Some(BTreeMap::from([(
        "helm.sh/resource-policy".to_owned(),
        "keep".to_owned(),
    )]));
    let yaml = serde_yaml::to_string(&crd).expect("a CRD always serializes");
    format!(
        "{{{{- if .Values.crds.install }}}}\n\
         # Generated by `postern-operator crd` (see crds/); do not edit.\n\
         {yaml}{{{{- end }}}}\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn durations_round_trip() {
        for (text, secs) in [("5m", 300), ("1h30m", 5400), ("5d", 432_000), ("90s", 90)] {
            assert_eq!(
                parse_duration(text),
                Some(Duration::from_secs(secs)),
                "{text}"
            );
        }
        assert_eq!(duration_text(Duration::from_secs(5400)), "1h30m");
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        for bad in ["", "5", "m", "5x", "1.5h", "-1s"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn quantities() {
        for good in ["10Gi", "1", "1.5Ti", "500M"] {
            assert!(parse_quantity_ok(good), "{good}");
        }
        for bad in ["", "Gi", "10GB", "1.", ".5Gi", "1.2.3"] {
            assert!(!parse_quantity_ok(bad), "{bad}");
        }
    }

    /// Kubernetes 1.20 takes `default: ""` for null and rejects the CRD.
    #[test]
    fn schema_has_no_empty_string_defaults() {
        fn walk(value: &serde_json::Value, path: &str) {
            match value {
                serde_json::Value::Object(map) => {
                    if map.get("default") == Some(&serde_json::Value::from("")) {
                        panic!("{path} has default \"\"");
                    }
                    for (key, child) in map {
                        walk(child, &format!("{path}.{key}"));
                    }
                }
                serde_json::Value::Array(items) => {
                    for (index, child) in items.iter().enumerate() {
                        walk(child, &format!("{path}[{index}]"));
                    }
                }
                _ => {}
            }
        }
        walk(&serde_json::to_value(crd()).unwrap(), "crd");
    }

    #[test]
    fn schema_has_no_unsigned_formats() {
        let yaml = crd_yaml();
        assert!(!yaml.contains("uint"), "unsigned format in the CRD");
        assert!(yaml.contains("minimum"), "no minimums in the CRD");
    }
}
