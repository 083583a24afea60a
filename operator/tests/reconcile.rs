//! Reconcile scenarios against a scripted API server (tower-test's mock
//! service): each test states the exact sequence of API calls the operator
//! must make (method and path), checks what it sends (server-side apply with
//! one field manager, owner references, replicas, pod drain labels, events,
//! status and conditions), and answers as a real API server would. A call
//! out of order, or one too many, fails the test.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use http::{Request, Response};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::client::Body;
use kube::runtime::controller::Action;
use kube::runtime::events::{Recorder, Reporter};
use kube::Client;
use postern_operator::crd::MailQueue;
use postern_operator::discovery::{self, PdbVersion};
use postern_operator::leader::LeaseLock;
use postern_operator::metrics::Metrics;
use postern_operator::reconcile::{self, Context, REQUEUE_BUSY, REQUEUE_IDLE};
use postern_operator::relay_config;
use postern_operator::stats::{RelayStats, StatsError, StatsSource};
use serde_json::{json, Value};
use tower_test::mock::Handle;

const NOW: &str = "2026-01-01T12:00:00Z";
const NS: &str = "mail";

/// Stats answers by pod name; a missing pod answers with a connection error.
#[derive(Default)]
struct FakeStats(HashMap<String, (i64, Option<&'static str>)>);

impl StatsSource for FakeStats {
    fn stats<'a>(&'a self, pod: &'a Pod) -> BoxFuture<'a, Result<RelayStats, StatsError>> {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let answer = self.0.get(&name).map(|(depth, oldest)| RelayStats {
            ready: true,
            queue_depth: *depth,
            oldest_message_time: oldest.map(|t| t.parse().unwrap()),
            ..RelayStats::default()
        });
        Box::pin(async move {
            answer.ok_or(StatsError::Http {
                url: format!("http://{name}/stats"),
                source: "connection refused".into(),
            })
        })
    }
}

/// Whole `/stats` answers by pod name; a missing pod answers with a connection error.
#[derive(Default)]
struct ScriptedStats(HashMap<String, RelayStats>);

impl StatsSource for ScriptedStats {
    fn stats<'a>(&'a self, pod: &'a Pod) -> BoxFuture<'a, Result<RelayStats, StatsError>> {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let answer = self.0.get(&name).cloned();
        Box::pin(async move {
            answer.ok_or(StatsError::Http {
                url: format!("http://{name}/stats"),
                source: "connection refused".into(),
            })
        })
    }
}

/// One request as the API server saw it.
#[derive(Debug)]
struct Call {
    method: String,
    path: String,
    query: String,
    content_type: String,
    body: Value,
}

/// The scripted API server.
struct ApiServer {
    handle: Handle<Request<Body>, Response<Body>>,
}

impl ApiServer {
    /// Waits for the next request, checks its method and path, and answers
    /// with `respond(request)`.
    async fn expect(
        &mut self,
        method: &str,
        path: &str,
        respond: impl FnOnce(&Call) -> (u16, Value),
    ) -> Call {
        let (request, send) =
            tokio::time::timeout(Duration::from_secs(10), self.handle.next_request())
                .await
                .unwrap_or_else(|_| panic!("no request; expected {method} {path}"))
                .unwrap_or_else(|| panic!("client gone; expected {method} {path}"));
        let call = Call {
            method: request.method().to_string(),
            path: request.uri().path().to_owned(),
            query: request.uri().query().unwrap_or_default().to_owned(),
            content_type: request
                .headers()
                .get("content-type")
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default(),
            body: {
                let bytes = request.into_body().collect_bytes().await.unwrap();
                if bytes.is_empty() {
                    Value::Null
                } else {
                    serde_json::from_slice(&bytes).unwrap()
                }
            },
        };
        assert_eq!(
            (call.method.as_str(), call.path.as_str()),
            (method, path),
            "unexpected call {} {}?{}",
            call.method,
            call.path,
            call.query
        );
        let (status, body) = respond(&call);
        send.send_response(
            Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(Body::from(serde_json::to_vec(&body).unwrap()))
                .unwrap(),
        );
        call
    }

    /// Expects a server-side apply by the operator's field manager and
    /// answers with the applied object (plus `status`).
    async fn expect_apply(&mut self, path: &str, status: Value) -> Call {
        let call = self
            .expect("PATCH", path, |call| {
                let mut object = call.body.clone();
                object["metadata"]["uid"] = "00000000-0000-4000-8000-00000000beef".into();
                object["metadata"]["generation"] = 1.into();
                object["metadata"]["resourceVersion"] = "1".into();
                if !status.is_null() {
                    object["status"] = status;
                }
                (200, object)
            })
            .await;
        assert_eq!(call.content_type, "application/apply-patch+yaml", "{path}");
        assert!(
            call.query.contains("fieldManager=postern-operator")
                && call.query.contains("force=true"),
            "{path}: {}",
            call.query
        );
        call
    }

    /// Expects an event with `reason` and returns its note.
    async fn expect_event(&mut self, type_: &str, reason: &str) -> String {
        let call = self
            .expect(
                "POST",
                &format!("/apis/events.k8s.io/v1/namespaces/{NS}/events"),
                |call| (201, call.body.clone()),
            )
            .await;
        assert_eq!(call.body["reason"], reason, "{:?}", call.body);
        assert_eq!(call.body["type"], type_);
        assert_eq!(call.body["regarding"]["kind"], "MailQueue");
        assert_eq!(call.body["reportingController"], "postern-operator");
        call.body["note"].as_str().unwrap().to_owned()
    }

    /// Expects the status write and returns the status sent.
    async fn expect_status(&mut self, name: &str) -> Value {
        let path = format!("/apis/postern.dev/v1alpha1/namespaces/{NS}/mailqueues/{name}/status");
        let call = self
            .expect("PATCH", &path, |call| {
                // The server answers with the whole MailQueue.
                let mut object = call.body.clone();
                object["metadata"] = json!({"name": name, "namespace": NS, "generation": 1});
                object["spec"] = json!({"image": "postern:0.1.0"});
                (200, object)
            })
            .await;
        assert_eq!(call.content_type, "application/apply-patch+yaml");
        assert!(
            call.query.contains("fieldManager=postern-operator"),
            "{}",
            call.query
        );
        assert_eq!(call.body["kind"], "MailQueue");
        call.body["status"].clone()
    }

    /// Expects every owned object to be applied, in order; returns the
    /// StatefulSet sent.
    async fn expect_applies(&mut self, name: &str, pdb: &str, sts_status: Value) -> Value {
        let core = format!("/api/v1/namespaces/{NS}");
        for path in [
            format!("{core}/serviceaccounts/{name}-relay"),
            format!("{core}/configmaps/{name}-config"),
            format!("{core}/services/{name}-peers"),
            format!("{core}/services/{name}"),
        ] {
            let call = self.expect_apply(&path, Value::Null).await;
            assert_owned(&call.body, name);
        }
        let sts = self
            .expect_apply(
                &format!("/apis/apps/v1/namespaces/{NS}/statefulsets/{name}"),
                sts_status,
            )
            .await;
        assert_owned(&sts.body, name);
        let pdb_call = self
            .expect_apply(
                &format!("/apis/{pdb}/namespaces/{NS}/poddisruptionbudgets/{name}"),
                Value::Null,
            )
            .await;
        assert_eq!(pdb_call.body["apiVersion"], pdb);
        assert_eq!(pdb_call.body["spec"]["maxUnavailable"], 1);
        assert_owned(&pdb_call.body, name);
        self.expect_get_network_policy(name, None).await;
        sts.body
    }

    /// Expects the operator to look for the NetworkPolicy it would delete
    /// (`spec.networkPolicy` off); answers with `existing` or 404.
    async fn expect_get_network_policy(&mut self, name: &str, existing: Option<Value>) {
        self.expect(
            "GET",
            &format!("/apis/networking.k8s.io/v1/namespaces/{NS}/networkpolicies/{name}"),
            |_| match existing {
                Some(policy) => (200, policy),
                None => (404, not_found("networkpolicies.networking.k8s.io", name)),
            },
        )
        .await;
    }

    async fn expect_get_statefulset(&mut self, name: &str, existing: Option<Value>) {
        self.expect(
            "GET",
            &format!("/apis/apps/v1/namespaces/{NS}/statefulsets/{name}"),
            |_| match existing {
                Some(sts) => (200, sts),
                None => (404, not_found("statefulsets.apps", name)),
            },
        )
        .await;
    }

    async fn expect_list_pods(&mut self, name: &str, pods: Vec<Value>) {
        let call = self
            .expect("GET", &format!("/api/v1/namespaces/{NS}/pods"), |_| {
                (
                    200,
                    json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": pods}),
                )
            })
            .await;
        assert!(
            call.query
                .contains(&format!("app.kubernetes.io%2Finstance%3D{name}")),
            "pods are listed by the relay selector: {}",
            call.query
        );
    }

    /// Fails if the operator makes another call.
    async fn expect_no_more(&mut self) {
        if let Ok(Some((request, _))) =
            tokio::time::timeout(Duration::from_millis(200), self.handle.next_request()).await
        {
            panic!("unexpected call {} {}", request.method(), request.uri());
        }
    }
}

fn assert_owned(object: &Value, name: &str) {
    let owners = &object["metadata"]["ownerReferences"];
    assert_eq!(owners[0]["kind"], "MailQueue", "{object}");
    assert_eq!(owners[0]["name"], name);
    assert_eq!(owners[0]["controller"], true);
}

fn not_found(kind: &str, name: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": format!("{kind} \"{name}\" not found"), "reason": "NotFound",
           "details": {"name": name, "kind": kind}, "code": 404})
}

fn context(pdb: PdbVersion, stats: FakeStats) -> (Arc<Context>, ApiServer) {
    context_with(pdb, Arc::new(stats))
}

fn context_with(pdb: PdbVersion, stats: Arc<dyn StatsSource>) -> (Arc<Context>, ApiServer) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let ctx = Context {
        client: client.clone(),
        recorder: Recorder::new(
            client,
            Reporter {
                controller: "postern-operator".into(),
                instance: None,
            },
        ),
        pdb,
        stats,
        metrics: Arc::new(Metrics::default()),
        clock: Arc::new(|| NOW.parse().unwrap()),
        resync: REQUEUE_IDLE,
    };
    (Arc::new(ctx), ApiServer { handle })
}

fn mail_queue(spec: Value) -> MailQueue {
    common::mail_queue("mx", spec)
}

/// A StatefulSet as the server has it: `replicas` wanted, `ready` ready, config `hash`.
fn statefulset(mq: &MailQueue, replicas: i32, hash: &str) -> Value {
    let rendered = relay_config::render(mq).unwrap();
    let mut sts = serde_json::to_value(postern_operator::build::stateful_set(
        mq, &rendered, replicas, 300,
    ))
    .unwrap();
    sts["metadata"]["generation"] = 1.into();
    sts["spec"]["template"]["metadata"]["annotations"]["postern.dev/config-hash"] = hash.into();
    sts
}

fn sts_status(replicas: i32, ready: i32) -> Value {
    json!({"replicas": replicas, "readyReplicas": ready, "updatedReplicas": replicas,
           "currentReplicas": replicas, "observedGeneration": 1,
           "currentRevision": "mx-1", "updateRevision": "mx-1"})
}

fn pod(ordinal: i32, draining_since: Option<&str>) -> Value {
    let mut labels = json!({"app.kubernetes.io/name": "postern", "app.kubernetes.io/instance": "mx",
                            "postern.dev/traffic": "serve"});
    let mut annotations = json!({});
    if let Some(since) = draining_since {
        labels["postern.dev/traffic"] = "drain".into();
        annotations["postern.dev/draining-since"] = since.into();
    }
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": format!("mx-{ordinal}"), "namespace": NS, "labels": labels,
                        "annotations": annotations},
           "spec": {"containers": [{"name": "relay", "ports": [{"name": "http", "containerPort": 9325}]}]},
           "status": {"phase": "Running", "podIP": format!("10.0.0.{}", ordinal + 10),
                      "conditions": [{"type": "Ready", "status": "True"}]}})
}

fn condition<'a>(status: &'a Value, kind: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == kind)
        .unwrap_or_else(|| panic!("no {kind} condition in {status}"))
}

async fn run(
    ctx: &Arc<Context>,
    mq: MailQueue,
) -> tokio::task::JoinHandle<Result<Action, reconcile::Error>> {
    tokio::spawn(reconcile::reconcile(Arc::new(mq), Arc::clone(ctx)))
}

#[tokio::test]
async fn a_new_mail_queue_gets_all_its_objects_and_a_status() {
    let (ctx, mut api) = context(PdbVersion::V1, FakeStats::default());
    let mq = mail_queue(json!({"image": "postern:0.1.0", "replicas": 3}));
    let task = run(&ctx, mq).await;

    api.expect_get_statefulset("mx", None).await;
    api.expect_list_pods("mx", vec![]).await;
    let sts = api
        .expect_applies("mx", "policy/v1", sts_status(0, 0))
        .await;
    assert_eq!(sts["spec"]["replicas"], 3);
    assert_eq!(sts["apiVersion"], "apps/v1");
    let note = api.expect_event("Normal", "Created").await;
    assert!(note.contains("with 3 relays"), "{note}");
    let status = api.expect_status("mx").await;
    api.expect_no_more().await;

    assert_eq!(task.await.unwrap().unwrap(), Action::requeue(REQUEUE_BUSY));
    assert_eq!(status["ready"], "0/3");
    assert_eq!(status["observedGeneration"], 1);
    assert_eq!(
        status["selector"],
        "app.kubernetes.io/instance=mx,app.kubernetes.io/name=postern"
    );
    assert_eq!(condition(&status, "Ready")["reason"], "RelaysNotReady");
    assert_eq!(condition(&status, "Progressing")["status"], "True");
    assert_eq!(condition(&status, "Degraded")["status"], "False");
    assert_eq!(condition(&status, "Draining")["status"], "False");
    assert_eq!(condition(&status, "Ready")["lastTransitionTime"], NOW);
}

#[tokio::test]
async fn ready_relays_report_queue_depth_and_oldest_message() {
    let stats = FakeStats(HashMap::from([
        ("mx-0".to_owned(), (2, Some("2026-01-01T11:00:00Z"))),
        ("mx-1".to_owned(), (0, None)),
        ("mx-2".to_owned(), (5, Some("2026-01-01T10:30:00Z"))),
    ]));
    let (ctx, mut api) = context(PdbVersion::V1, stats);
    let mq = mail_queue(json!({"image": "postern:0.1.0", "replicas": 3}));
    let hash = relay_config::render(&mq).unwrap().hash;
    let task = run(&ctx, mq.clone()).await;

    api.expect_get_statefulset("mx", Some(statefulset(&mq, 3, &hash)))
        .await;
    api.expect_list_pods("mx", vec![pod(0, None), pod(1, None), pod(2, None)])
        .await;
    api.expect_applies("mx", "policy/v1", sts_status(3, 3))
        .await;
    let status = api.expect_status("mx").await;
    api.expect_no_more().await;

    assert_eq!(task.await.unwrap().unwrap(), Action::requeue(REQUEUE_IDLE));
    assert_eq!(status["ready"], "3/3");
    assert_eq!(status["readyReplicas"], 3);
    assert_eq!(status["queueDepth"], 7);
    assert_eq!(status["oldestMessageTime"], "2026-01-01T10:30:00Z");
    assert_eq!(condition(&status, "Ready")["status"], "True");
    assert_eq!(condition(&status, "Ready")["reason"], "RelaysReady");
    assert_eq!(condition(&status, "Progressing")["reason"], "Stable");
}

#[tokio::test]
async fn an_unchanged_status_is_not_written_again() {
    let stats = FakeStats(HashMap::from([("mx-0".to_owned(), (0, None))]));
    let (ctx, mut api) = context(PdbVersion::V1, stats);
    let mut mq = mail_queue(json!({"image": "postern:0.1.0", "replicas": 1}));
    let hash = relay_config::render(&mq).unwrap().hash;

    let task = run(&ctx, mq.clone()).await;
    api.expect_get_statefulset("mx", Some(statefulset(&mq, 1, &hash)))
        .await;
    api.expect_list_pods("mx", vec![pod(0, None)]).await;
    api.expect_applies("mx", "policy/v1", sts_status(1, 1))
        .await;
    let status = api.expect_status("mx").await;
    task.await.unwrap().unwrap();

    mq.status = Some(serde_json::from_value(status).unwrap());
    let task = run(&ctx, mq.clone()).await;
    api.expect_get_statefulset("mx", Some(statefulset(&mq, 1, &hash)))
        .await;
    api.expect_list_pods("mx", vec![pod(0, None)]).await;
    api.expect_applies("mx", "policy/v1", sts_status(1, 1))
        .await;
    api.expect_no_more().await;
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn an_invalid_mail_queue_is_degraded_and_nothing_is_applied() {
    let (ctx, mut api) = context(PdbVersion::V1, FakeStats::default());
    let mut mq = mail_queue(json!({"image": "postern:0.1.0", "trustedNetworks": ["10.0.0.0/99"]}));
    let task = run(&ctx, mq.clone()).await;

    let note = api.expect_event("Warning", "InvalidSpec").await;
    assert!(note.contains("spec.trustedNetworks[0]"), "{note}");
    let status = api.expect_status("mx").await;
    api.expect_no_more().await;
    assert_eq!(task.await.unwrap().unwrap(), Action::await_change());
    let degraded = condition(&status, "Degraded");
    assert_eq!(degraded["status"], "True");
    assert_eq!(degraded["reason"], "InvalidSpec");
    assert_eq!(degraded["message"], note);
    assert_eq!(condition(&status, "Ready")["reason"], "InvalidSpec");

    // Seen again (a periodic resync): no second event, no identical status write.
    mq.status = Some(serde_json::from_value(status).unwrap());
    let task = run(&ctx, mq).await;
    api.expect_no_more().await;
    assert_eq!(task.await.unwrap().unwrap(), Action::await_change());
    assert!(ctx
        .metrics
        .render()
        .contains("postern_operator_invalid_specs_total 2\n"));
}

#[tokio::test]
async fn a_config_change_rolls_the_relays_with_an_event() {
    let (ctx, mut api) = context(PdbVersion::V1, FakeStats::default());
    let mq = mail_queue(
        json!({"image": "postern:0.1.0", "replicas": 2, "relayDomains": ["example.org"]}),
    );
    let hash = relay_config::render(&mq).unwrap().hash;
    let task = run(&ctx, mq.clone()).await;

    api.expect_get_statefulset("mx", Some(statefulset(&mq, 2, "0123456789abcdef")))
        .await;
    api.expect_list_pods("mx", vec![]).await;
    let sts = api
        .expect_applies("mx", "policy/v1", sts_status(2, 2))
        .await;
    assert_eq!(
        sts["spec"]["template"]["metadata"]["annotations"]["postern.dev/config-hash"],
        hash
    );
    let note = api.expect_event("Normal", "ConfigChanged").await;
    assert!(
        note.contains(&format!("0123456789abcdef → {hash}")),
        "{note}"
    );
    api.expect_status("mx").await;
    api.expect_no_more().await;
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn scale_down_drains_the_highest_relay_before_removing_it() {
    // Step 1: spec says 2, the StatefulSet has 3, mx-2 still holds 5 messages.
    let stats = FakeStats(HashMap::from([
        ("mx-0".to_owned(), (0, None)),
        ("mx-1".to_owned(), (0, None)),
        ("mx-2".to_owned(), (5, Some("2026-01-01T11:58:00Z"))),
    ]));
    let (ctx, mut api) = context(PdbVersion::V1, stats);
    let mq = mail_queue(json!({"image": "postern:0.1.0", "replicas": 2}));
    let hash = relay_config::render(&mq).unwrap().hash;
    let task = run(&ctx, mq.clone()).await;

    api.expect_get_statefulset("mx", Some(statefulset(&mq, 3, &hash)))
        .await;
    api.expect_list_pods("mx", vec![pod(0, None), pod(1, None), pod(2, None)])
        .await;
    let mark = api
        .expect(
            "PATCH",
            &format!("/api/v1/namespaces/{NS}/pods/mx-2"),
            |call| (200, call.body.clone()),
        )
        .await;
    assert_eq!(mark.content_type, "application/merge-patch+json");
    assert_eq!(
        mark.body["metadata"]["labels"]["postern.dev/traffic"],
        "drain"
    );
    assert_eq!(
        mark.body["metadata"]["annotations"]["postern.dev/draining-since"],
        NOW
    );
    api.expect_event("Normal", "Draining").await;
    let sts = api
        .expect_applies("mx", "policy/v1", sts_status(3, 3))
        .await;
    assert_eq!(sts["spec"]["replicas"], 3, "mx-2 stays until drained");
    let status = api.expect_status("mx").await;
    api.expect_no_more().await;
    assert_eq!(task.await.unwrap().unwrap(), Action::requeue(REQUEUE_BUSY));
    assert_eq!(status["draining"], "mx-2");
    assert_eq!(status["queueDepth"], 5);
    assert_eq!(condition(&status, "Draining")["status"], "True");
    assert_eq!(condition(&status, "Draining")["message"], "mx-2: 5 queued");
    assert_eq!(condition(&status, "Progressing")["reason"], "ScalingDown");

    // Step 2: a minute later mx-2's queue is empty: the StatefulSet goes to 2.
    let stats = FakeStats(HashMap::from([
        ("mx-0".to_owned(), (0, None)),
        ("mx-1".to_owned(), (0, None)),
        ("mx-2".to_owned(), (0, None)),
    ]));
    let (ctx, mut api) = context(PdbVersion::V1, stats);
    let mut mq = mq.clone();
    mq.status = Some(serde_json::from_value(status).unwrap());
    let task = run(&ctx, mq.clone()).await;
    api.expect_get_statefulset("mx", Some(statefulset(&mq, 3, &hash)))
        .await;
    api.expect_list_pods(
        "mx",
        vec![
            pod(0, None),
            pod(1, None),
            pod(2, Some("2026-01-01T11:59:00Z")),
        ],
    )
    .await;
    let sts = api
        .expect_applies("mx", "policy/v1", sts_status(3, 3))
        .await;
    assert_eq!(sts["spec"]["replicas"], 2);
    let note = api.expect_event("Normal", "ScaledDown").await;
    assert_eq!(note, "3 → 2 relays after draining mx-2");
    let status = api.expect_status("mx").await;
    api.expect_no_more().await;
    task.await.unwrap().unwrap();
    assert_eq!(condition(&status, "Draining")["message"], "mx-2: drained");
}

#[tokio::test]
async fn a_1_20_server_gets_a_policy_v1beta1_disruption_budget() {
    let (ctx, mut api) = context(PdbVersion::V1beta1, FakeStats::default());
    let mq = mail_queue(json!({"image": "postern:0.1.0", "replicas": 1}));
    let task = run(&ctx, mq).await;
    api.expect_get_statefulset("mx", None).await;
    api.expect_list_pods("mx", vec![]).await;
    api.expect_applies("mx", "policy/v1beta1", sts_status(0, 0))
        .await;
    api.expect_event("Normal", "Created").await;
    api.expect_status("mx").await;
    api.expect_no_more().await;
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_failed_apply_is_degraded_and_retried() {
    let (ctx, mut api) = context(PdbVersion::V1, FakeStats::default());
    let mq = mail_queue(json!({"image": "postern:0.1.0", "replicas": 1}));
    let task = run(&ctx, mq).await;
    api.expect_get_statefulset("mx", None).await;
    api.expect_list_pods("mx", vec![]).await;
    for path in [
        "serviceaccounts/mx-relay",
        "configmaps/mx-config",
        "services/mx-peers",
        "services/mx",
    ] {
        api.expect_apply(&format!("/api/v1/namespaces/{NS}/{path}"), Value::Null)
            .await;
    }
    api.expect("PATCH", &format!("/apis/apps/v1/namespaces/{NS}/statefulsets/mx"), |_| {
        (422, json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                     "message": "StatefulSet.apps \"mx\" is invalid: spec: Forbidden: updates to statefulset spec for fields other than 'replicas', 'template', and 'updateStrategy' are forbidden",
                     "reason": "Invalid", "code": 422}))
    })
    .await;
    let note = api.expect_event("Warning", "ApplyFailed").await;
    assert!(
        note.contains("apply StatefulSet mx") && note.contains("Forbidden"),
        "{note}"
    );
    let status = api.expect_status("mx").await;
    api.expect_no_more().await;
    let err = task.await.unwrap().unwrap_err();
    assert!(matches!(err, reconcile::Error::Kube { .. }), "{err}");
    assert_eq!(condition(&status, "Degraded")["reason"], "ApplyFailed");
    let action = reconcile::error_policy(Arc::new(mail_queue(json!({"image": "x"}))), &err, ctx);
    assert_eq!(action, Action::requeue(reconcile::REQUEUE_ERROR));
}

#[tokio::test]
async fn a_clustered_mail_queue_applies_its_cluster_wiring() {
    let (ctx, mut api) = context(PdbVersion::V1, FakeStats::default());
    let mq = mail_queue(json!({"image": "postern:0.1.0", "replicas": 2,
                               "ackPolicy": {"copies": ["local", "peer"], "required": 2},
                               "etcd": {"endpoints": ["http://etcd:2379"],
                                        "peerSecret": "mx-peer"}}));
    let task = run(&ctx, mq).await;
    // No warning: etcd is used now.
    api.expect_get_statefulset("mx", None).await;
    api.expect_list_pods("mx", vec![]).await;
    let core = format!("/api/v1/namespaces/{NS}");
    api.expect_apply(&format!("{core}/serviceaccounts/mx-relay"), Value::Null)
        .await;
    let config = api
        .expect_apply(&format!("{core}/configmaps/mx-config"), Value::Null)
        .await;
    let toml = config.body["data"]["postern.toml"].as_str().unwrap();
    let parsed = postern::config::Config::parse(toml).unwrap();
    let cluster = parsed.cluster.expect("a [cluster] section");
    assert_eq!(cluster.etcd, ["http://etcd:2379"]);
    assert_eq!(cluster.peers, ["mx-peers.mail.svc:9327"]);
    assert_eq!(cluster.prefix, "/postern/mail/mx");
    let peers = api
        .expect_apply(&format!("{core}/services/mx-peers"), Value::Null)
        .await;
    let ports = peers.body["spec"]["ports"].as_array().unwrap();
    assert!(
        ports
            .iter()
            .any(|p| p["name"] == "peer" && p["port"] == 9327 && p["targetPort"] == 9327),
        "{ports:?}"
    );
    api.expect_apply(&format!("{core}/services/mx"), Value::Null)
        .await;
    let sts = api
        .expect_apply(
            &format!("/apis/apps/v1/namespaces/{NS}/statefulsets/mx"),
            sts_status(0, 0),
        )
        .await;
    let pod = &sts.body["spec"]["template"]["spec"];
    assert!(
        pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["secret"]["secretName"] == "mx-peer"),
        "{pod}"
    );
    assert!(
        pod["containers"][0]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "peer" && p["containerPort"] == 9327),
        "{pod}"
    );
    api.expect_apply(
        &format!("/apis/policy/v1/namespaces/{NS}/poddisruptionbudgets/mx"),
        Value::Null,
    )
    .await;
    api.expect_get_network_policy("mx", None).await;
    api.expect_event("Normal", "Created").await;
    api.expect_status("mx").await;
    api.expect_no_more().await;
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn the_deprecated_etcd_credentials_secret_is_reported() {
    let (ctx, mut api) = context(PdbVersion::V1, FakeStats::default());
    let mq = mail_queue(json!({"image": "postern:0.1.0", "replicas": 1,
                               "etcd": {"endpoints": ["http://etcd:2379"],
                                        "peerSecret": "mx-peer",
                                        "credentialsSecret": "etcd-client"}}));
    let task = run(&ctx, mq).await;
    let note = api.expect_event("Warning", "Deprecated").await;
    assert!(
        note.contains("spec.etcd.credentialsSecret") && note.contains("tlsSecret"),
        "{note}"
    );
    api.expect_get_statefulset("mx", None).await;
    api.expect_list_pods("mx", vec![]).await;
    api.expect_applies("mx", "policy/v1", sts_status(0, 0))
        .await;
    api.expect_event("Normal", "Created").await;
    api.expect_status("mx").await;
    api.expect_no_more().await;
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn cluster_mistakes_are_invalid_specs() {
    for (spec, field) in [
        (
            json!({"image": "postern:0.1.0",
                   "ackPolicy": {"copies": ["local", "peer"], "required": 1}}),
            "spec.ackPolicy.copies",
        ),
        (
            json!({"image": "postern:0.1.0",
                   "etcd": {"endpoints": ["http://etcd:2379"]}}),
            "spec.etcd.peerSecret",
        ),
    ] {
        let (ctx, mut api) = context(PdbVersion::V1, FakeStats::default());
        let task = run(&ctx, mail_queue(spec)).await;
        let note = api.expect_event("Warning", "InvalidSpec").await;
        assert!(note.contains(field), "{note}");
        let status = api.expect_status("mx").await;
        api.expect_no_more().await;
        assert_eq!(task.await.unwrap().unwrap(), Action::await_change());
        let degraded = condition(&status, "Degraded");
        assert_eq!(degraded["status"], "True");
        assert_eq!(degraded["reason"], "InvalidSpec");
    }
}

fn api_groups(policy_versions: &[&str]) -> Value {
    let versions: Vec<Value> = policy_versions
        .iter()
        .map(|v| json!({"groupVersion": format!("policy/{v}"), "version": v}))
        .collect();
    let mut groups = vec![
        json!({"name": "apps", "versions": [{"groupVersion": "apps/v1", "version": "v1"}],
                                 "preferredVersion": {"groupVersion": "apps/v1", "version": "v1"}}),
    ];
    if let Some(first) = versions.first() {
        groups.push(json!({"name": "policy", "versions": versions, "preferredVersion": first}));
    }
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

#[tokio::test]
async fn discovery_picks_the_disruption_budget_version_the_server_has() {
    for (served, expected) in [
        (&["v1", "v1beta1"][..], Some(PdbVersion::V1)),
        (&["v1beta1"][..], Some(PdbVersion::V1beta1)),
        (&[][..], None),
    ] {
        let (ctx, mut api) = context(PdbVersion::V1, FakeStats::default());
        let client = ctx.client.clone();
        let task = tokio::spawn(async move { discovery::pdb_version(&client).await });
        api.expect("GET", "/apis", |_| (200, api_groups(served)))
            .await;
        let result = task.await.unwrap();
        assert_eq!(result.ok(), expected, "{served:?}");
    }
}

fn lease(holder: &str, renewed: &str) -> Value {
    json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
           "metadata": {"name": "postern-operator", "namespace": "ops", "resourceVersion": "7"},
           "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15,
                    "renewTime": renewed, "acquireTime": renewed, "leaseTransitions": 2}})
}

#[tokio::test]
async fn leader_election_takes_a_free_or_expired_lease_only() {
    let path = "/apis/coordination.k8s.io/v1/namespaces/ops/leases";
    let lock = |ctx: &Arc<Context>| {
        LeaseLock::new(
            kube::Api::namespaced(ctx.client.clone(), "ops"),
            "postern-operator",
            "me",
            Duration::from_secs(15),
        )
    };
    let fresh = Timestamp::now().to_string();
    let stale = (Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_secs(60)).to_string();

    // No Lease: create it.
    let (ctx, mut api) = context(PdbVersion::V1, FakeStats::default());
    let lock_a = lock(&ctx);
    let task = tokio::spawn(async move { lock_a.try_acquire_or_renew().await });
    api.expect("GET", &format!("{path}/postern-operator"), |_| {
        (404, not_found("leases", "postern-operator"))
    })
    .await;
    let create = api
        .expect("POST", path, |call| (201, call.body.clone()))
        .await;
    assert_eq!(create.body["spec"]["holderIdentity"], "me");
    assert!(task.await.unwrap().unwrap());

    // Held and renewed by another replica: wait.
    let (ctx, mut api) = context(PdbVersion::V1, FakeStats::default());
    let lock_b = lock(&ctx);
    let task = tokio::spawn(async move { lock_b.try_acquire_or_renew().await });
    let other = lease("other", &fresh);
    api.expect("GET", &format!("{path}/postern-operator"), move |_| {
        (200, other)
    })
    .await;
    assert!(!task.await.unwrap().unwrap());

    // Expired: take it over, with its resourceVersion, counting the transition.
    let (ctx, mut api) = context(PdbVersion::V1, FakeStats::default());
    let lock_c = lock(&ctx);
    let task = tokio::spawn(async move { lock_c.try_acquire_or_renew().await });
    let expired = lease("other", &stale);
    api.expect("GET", &format!("{path}/postern-operator"), move |_| {
        (200, expired)
    })
    .await;
    let put = api
        .expect("PUT", &format!("{path}/postern-operator"), |call| {
            (200, call.body.clone())
        })
        .await;
    assert_eq!(put.body["metadata"]["resourceVersion"], "7");
    assert_eq!(put.body["spec"]["holderIdentity"], "me");
    assert_eq!(put.body["spec"]["leaseTransitions"], 3);
    assert!(task.await.unwrap().unwrap());

    // Another candidate won the race (409): not leader.
    let (ctx, mut api) = context(PdbVersion::V1, FakeStats::default());
    let lock_d = lock(&ctx);
    let task = tokio::spawn(async move { lock_d.try_acquire_or_renew().await });
    let expired = lease("other", &stale);
    api.expect("GET", &format!("{path}/postern-operator"), move |_| {
        (200, expired)
    })
    .await;
    api.expect("PUT", &format!("{path}/postern-operator"), |_| {
        (
            409,
            json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                     "reason": "Conflict", "code": 409, "message": "the object has been modified"}),
        )
    })
    .await;
    assert!(!task.await.unwrap().unwrap());
}

#[tokio::test]
async fn a_spool_resize_keeps_the_live_volume_claims_and_says_so() {
    let (ctx, mut api) = context(PdbVersion::V1, FakeStats::default());
    let live_mq = mail_queue(json!({"image": "postern:0.1.0", "replicas": 1}));
    let hash = relay_config::render(&live_mq).unwrap().hash;
    let live = statefulset(&live_mq, 1, &hash);
    let mq = mail_queue(json!({"image": "postern:0.1.0", "replicas": 1,
                               "spool": {"size": "50Gi", "storageClassName": "fast"}}));
    let task = run(&ctx, mq).await;

    api.expect_get_statefulset("mx", Some(live)).await;
    api.expect_list_pods("mx", vec![]).await;
    let note = api.expect_event("Warning", "SpoolUnchanged").await;
    assert!(
        note.contains("50Gi on fast") && note.contains("keep 10Gi on the default storage class"),
        "{note}"
    );
    let sts = api
        .expect_applies("mx", "policy/v1", sts_status(1, 1))
        .await;
    let claim = &sts["spec"]["volumeClaimTemplates"][0]["spec"];
    assert_eq!(claim["resources"]["requests"]["storage"], "10Gi");
    assert!(claim.get("storageClassName").is_none(), "{claim}");
    api.expect_status("mx").await;
    api.expect_no_more().await;
    task.await.unwrap().unwrap();
}

/// `spec.networkPolicy.enabled`: the policy is applied after the other
/// objects; turned off, the operator deletes the policy it made (only
/// that: a same-named policy another controller owns stays).
#[tokio::test]
async fn the_network_policy_is_applied_and_removed_when_turned_off() {
    let spec = |enabled: bool| {
        json!({"image": "postern:0.1.0", "replicas": 1,
               "etcd": {"endpoints": ["http://etcd:2379"], "peerSecret": "mx-peer"},
               "networkPolicy": {"enabled": enabled}})
    };
    let policy_path = format!("/apis/networking.k8s.io/v1/namespaces/{NS}/networkpolicies/mx");
    let pdb_path = format!("/apis/policy/v1/namespaces/{NS}/poddisruptionbudgets/mx");

    // On: applied, owned, and the peer port admits only the relays.
    let (ctx, mut api) = context(PdbVersion::V1, FakeStats::default());
    let task = run(&ctx, mail_queue(spec(true))).await;
    api.expect_get_statefulset("mx", None).await;
    api.expect_list_pods("mx", vec![]).await;
    apply_all_but_the_policy(&mut api).await;
    api.expect_apply(&pdb_path, Value::Null).await;
    let policy = api.expect_apply(&policy_path, Value::Null).await;
    assert_owned(&policy.body, "mx");
    assert_eq!(policy.body["kind"], "NetworkPolicy");
    let ingress = policy.body["spec"]["ingress"].as_array().unwrap();
    assert_eq!(ingress.len(), 2, "{ingress:?}");
    assert_eq!(
        ingress[1]["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/instance"],
        "mx"
    );
    assert_eq!(ingress[1]["ports"][0]["port"], 9327);
    api.expect_event("Normal", "Created").await;
    api.expect_status("mx").await;
    api.expect_no_more().await;
    task.await.unwrap().unwrap();

    // Off, with the operator's policy in place: deleted, on its uid.
    let mq = mail_queue(spec(false));
    let mut ours = serde_json::to_value(postern_operator::build::network_policy(&mq)).unwrap();
    ours["metadata"]["uid"] = "11111111-0000-4000-8000-000000000001".into();
    let (ctx, mut api) = context(PdbVersion::V1, FakeStats::default());
    let task = run(&ctx, mq.clone()).await;
    api.expect_get_statefulset("mx", None).await;
    api.expect_list_pods("mx", vec![]).await;
    apply_all_but_the_policy(&mut api).await;
    api.expect_apply(&pdb_path, Value::Null).await;
    api.expect_get_network_policy("mx", Some(ours)).await;
    let delete = api
        .expect("DELETE", &policy_path, |_| {
            (
                200,
                json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}),
            )
        })
        .await;
    assert_eq!(
        delete.body["preconditions"]["uid"],
        "11111111-0000-4000-8000-000000000001"
    );
    api.expect_event("Normal", "Created").await;
    api.expect_status("mx").await;
    api.expect_no_more().await;
    task.await.unwrap().unwrap();

    // Off, with someone else's policy of that name: left alone.
    let foreign = json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                         "metadata": {"name": "mx", "namespace": NS, "uid": "2"},
                         "spec": {"podSelector": {}}});
    let (ctx, mut api) = context(PdbVersion::V1, FakeStats::default());
    let task = run(&ctx, mq).await;
    api.expect_get_statefulset("mx", None).await;
    api.expect_list_pods("mx", vec![]).await;
    apply_all_but_the_policy(&mut api).await;
    api.expect_apply(&pdb_path, Value::Null).await;
    api.expect_get_network_policy("mx", Some(foreign)).await;
    api.expect_event("Normal", "Created").await;
    api.expect_status("mx").await;
    api.expect_no_more().await;
    task.await.unwrap().unwrap();
}

/// The applies of a new MailQueue up to the StatefulSet, in order.
async fn apply_all_but_the_policy(api: &mut ApiServer) {
    let core = format!("/api/v1/namespaces/{NS}");
    for path in [
        format!("{core}/serviceaccounts/mx-relay"),
        format!("{core}/configmaps/mx-config"),
        format!("{core}/services/mx-peers"),
        format!("{core}/services/mx"),
    ] {
        api.expect_apply(&path, Value::Null).await;
    }
    api.expect_apply(
        &format!("/apis/apps/v1/namespaces/{NS}/statefulsets/mx"),
        sts_status(0, 0),
    )
    .await;
}

/// A relay pod that is not running: its container waits with `reason`.
fn waiting_pod(ordinal: i32, reason: &str, message: &str) -> Value {
    let mut pod = pod(ordinal, None);
    pod["metadata"]["uid"] = format!("uid-mx-{ordinal}").into();
    pod["status"] = json!({
        "phase": "Pending", "podIP": format!("10.0.0.{}", ordinal + 10),
        "conditions": [{"type": "Ready", "status": "False"}],
        "containerStatuses": [{"name": "relay", "image": "postern:nope", "imageID": "",
                               "ready": false, "restartCount": 0,
                               "state": {"waiting": {"reason": reason, "message": message}}}]});
    pod
}

fn stalled(reason: &str, message: &str) -> RelayStats {
    serde_json::from_value(
        json!({"ready": true, "queue_depth": 4, "delivery": "stalled",
                                  "delivery_reason": reason, "delivery_message": message}),
    )
    .unwrap()
}

fn running() -> RelayStats {
    serde_json::from_value(json!({"ready": true, "queue_depth": 0, "delivery": "running"})).unwrap()
}

#[tokio::test]
async fn an_image_that_cannot_be_pulled_is_degraded_once_reported_and_recovers() {
    let mq = mail_queue(json!({"image": "postern:nope", "replicas": 2}));
    let hash = relay_config::render(&mq).unwrap().hash;
    let failing = || {
        vec![
            waiting_pod(
                0,
                "ImagePullBackOff",
                "Back-off pulling image \"postern:nope\"",
            ),
            waiting_pod(1, "ErrImagePull", "rpc error: not found"),
        ]
    };

    let (ctx, mut api) = context(PdbVersion::V1, FakeStats::default());
    let task = run(&ctx, mq.clone()).await;
    api.expect_get_statefulset("mx", Some(statefulset(&mq, 2, &hash)))
        .await;
    api.expect_list_pods("mx", failing()).await;
    api.expect_applies("mx", "policy/v1", sts_status(2, 0))
        .await;
    let note = api.expect_event("Warning", "ImagePullFailed").await;
    let status = api.expect_status("mx").await;
    api.expect_no_more().await;
    assert_eq!(task.await.unwrap().unwrap(), Action::requeue(REQUEUE_BUSY));
    let degraded = condition(&status, "Degraded");
    assert_eq!(degraded["status"], "True");
    assert_eq!(degraded["reason"], "ImagePullFailed");
    assert_eq!(
        degraded["message"],
        "mx-0: image \"postern:nope\" cannot be pulled (ImagePullBackOff: Back-off pulling \
         image \"postern:nope\"); mx-1: image \"postern:nope\" cannot be pulled \
         (ErrImagePull: rpc error: not found)"
    );
    assert_eq!(note, degraded["message"]);
    assert_eq!(status["state"], "ImagePullFailed");
    assert_eq!(condition(&status, "Ready")["reason"], "RelaysNotReady");

    // Still failing: no second event, nothing new to write.
    let mut mq = mq;
    mq.status = Some(serde_json::from_value(status).unwrap());
    let task = run(&ctx, mq.clone()).await;
    api.expect_get_statefulset("mx", Some(statefulset(&mq, 2, &hash)))
        .await;
    api.expect_list_pods("mx", failing()).await;
    api.expect_applies("mx", "policy/v1", sts_status(2, 0))
        .await;
    api.expect_no_more().await;
    task.await.unwrap().unwrap();

    // The image is fixed: the pods run, Degraded clears, STATUS follows Ready.
    let stats = FakeStats(HashMap::from([
        ("mx-0".to_owned(), (0, None)),
        ("mx-1".to_owned(), (0, None)),
    ]));
    let (ctx, mut api) = context(PdbVersion::V1, stats);
    let task = run(&ctx, mq.clone()).await;
    api.expect_get_statefulset("mx", Some(statefulset(&mq, 2, &hash)))
        .await;
    api.expect_list_pods("mx", vec![pod(0, None), pod(1, None)])
        .await;
    api.expect_applies("mx", "policy/v1", sts_status(2, 2))
        .await;
    let status = api.expect_status("mx").await;
    api.expect_no_more().await;
    assert_eq!(task.await.unwrap().unwrap(), Action::requeue(REQUEUE_IDLE));
    assert_eq!(condition(&status, "Degraded")["status"], "False");
    assert_eq!(condition(&status, "Degraded")["reason"], "AsExpected");
    assert_eq!(condition(&status, "Degraded")["lastTransitionTime"], NOW);
    assert_eq!(status["state"], "RelaysReady");
}

#[tokio::test]
async fn a_missing_peer_secret_is_read_from_the_kubelets_failed_mount_events() {
    let (ctx, mut api) = context(PdbVersion::V1, FakeStats::default());
    let mq = mail_queue(json!({"image": "postern:0.1.0", "replicas": 1,
                               "etcd": {"endpoints": ["http://etcd:2379"],
                                        "peerSecret": "mx-peer"}}));
    let hash = relay_config::render(&mq).unwrap().hash;
    let task = run(&ctx, mq.clone()).await;
    api.expect_get_statefulset("mx", Some(statefulset(&mq, 1, &hash)))
        .await;
    api.expect_list_pods("mx", vec![waiting_pod(0, "ContainerCreating", "")])
        .await;
    let list = api
        .expect("GET", &format!("/api/v1/namespaces/{NS}/events"), |_| {
            let event = |uid: &str, message: &str| {
                json!({"metadata": {"name": format!("mx-0.{uid}"), "namespace": NS},
                       "involvedObject": {"kind": "Pod", "name": "mx-0", "uid": uid},
                       "reason": "FailedMount", "type": "Warning", "message": message})
            };
            let items = vec![
                event(
                    "uid-mx-0",
                    "MountVolume.SetUp failed for volume \"peer-secret\" : secret \"mx-peer\" not found",
                ),
                // The pod before this one (same name, other uid).
                event(
                    "uid-old",
                    "MountVolume.SetUp failed for volume \"smtp-tls\" : secret \"gone\" not found",
                ),
            ];
            (
                200,
                json!({"apiVersion": "v1", "kind": "EventList", "metadata": {}, "items": items}),
            )
        })
        .await;
    assert!(
        list.query
            .contains("fieldSelector=involvedObject.kind%3DPod%2Creason%3DFailedMount"),
        "{}",
        list.query
    );
    api.expect_applies("mx", "policy/v1", sts_status(1, 0))
        .await;
    let note = api.expect_event("Warning", "PeerSecretMissing").await;
    let status = api.expect_status("mx").await;
    api.expect_no_more().await;
    task.await.unwrap().unwrap();
    let degraded = condition(&status, "Degraded");
    assert_eq!(degraded["reason"], "PeerSecretMissing");
    assert_eq!(
        degraded["message"],
        "mx-0: Secret \"mx-peer\" named by spec.etcd.peerSecret does not exist (FailedMount)"
    );
    assert_eq!(note, degraded["message"]);
    assert_eq!(status["state"], "PeerSecretMissing");
}

#[tokio::test]
async fn events_that_cannot_be_listed_leave_the_reconcile_running() {
    let (ctx, mut api) = context(PdbVersion::V1, FakeStats::default());
    let mq = mail_queue(json!({"image": "postern:0.1.0", "replicas": 1}));
    let hash = relay_config::render(&mq).unwrap().hash;
    let task = run(&ctx, mq.clone()).await;
    api.expect_get_statefulset("mx", Some(statefulset(&mq, 1, &hash)))
        .await;
    api.expect_list_pods("mx", vec![waiting_pod(0, "ContainerCreating", "")])
        .await;
    api.expect("GET", &format!("/api/v1/namespaces/{NS}/events"), |_| {
        (
            403,
            json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                   "message": "events is forbidden", "reason": "Forbidden", "code": 403}),
        )
    })
    .await;
    api.expect_applies("mx", "policy/v1", sts_status(1, 0))
        .await;
    let status = api.expect_status("mx").await;
    api.expect_no_more().await;
    task.await.unwrap().unwrap();
    assert_eq!(condition(&status, "Degraded")["status"], "False");
    assert_eq!(status["state"], "RelaysNotReady");
}

#[tokio::test]
async fn a_relay_that_cannot_reach_etcd_degrades_the_mail_queue_but_not_its_readiness() {
    let stats = ScriptedStats(HashMap::from([
        (
            "mx-0".to_owned(),
            stalled(
                "etcd_unreachable",
                "etcd unreachable: renewing the lease got no answer within 600ms",
            ),
        ),
        ("mx-1".to_owned(), running()),
    ]));
    let (ctx, mut api) = context_with(PdbVersion::V1, Arc::new(stats));
    let mq = mail_queue(json!({"image": "postern:0.1.0", "replicas": 2,
                               "etcd": {"endpoints": ["http://etcd:2379"],
                                        "peerSecret": "mx-peer"}}));
    let hash = relay_config::render(&mq).unwrap().hash;
    let task = run(&ctx, mq.clone()).await;
    api.expect_get_statefulset("mx", Some(statefulset(&mq, 2, &hash)))
        .await;
    api.expect_list_pods("mx", vec![pod(0, None), pod(1, None)])
        .await;
    api.expect_applies("mx", "policy/v1", sts_status(2, 2))
        .await;
    let note = api.expect_event("Warning", "EtcdUnreachable").await;
    let status = api.expect_status("mx").await;
    api.expect_no_more().await;
    assert_eq!(task.await.unwrap().unwrap(), Action::requeue(REQUEUE_BUSY));
    let degraded = condition(&status, "Degraded");
    assert_eq!(degraded["reason"], "EtcdUnreachable");
    assert_eq!(
        degraded["message"],
        "mx-0: delivery stalled: etcd unreachable: renewing the lease got no answer within 600ms"
    );
    assert_eq!(note, degraded["message"]);
    assert_eq!(condition(&status, "Ready")["status"], "True");
    assert_eq!(status["queueDepth"], 4);
    assert_eq!(status["state"], "EtcdUnreachable");

    // etcd is back: both relays run; the condition and STATUS recover.
    let stats = ScriptedStats(HashMap::from([
        ("mx-0".to_owned(), running()),
        ("mx-1".to_owned(), running()),
    ]));
    let (ctx, mut api) = context_with(PdbVersion::V1, Arc::new(stats));
    let mut mq = mq;
    mq.status = Some(serde_json::from_value(status).unwrap());
    let task = run(&ctx, mq.clone()).await;
    api.expect_get_statefulset("mx", Some(statefulset(&mq, 2, &hash)))
        .await;
    api.expect_list_pods("mx", vec![pod(0, None), pod(1, None)])
        .await;
    api.expect_applies("mx", "policy/v1", sts_status(2, 2))
        .await;
    let status = api.expect_status("mx").await;
    api.expect_no_more().await;
    assert_eq!(task.await.unwrap().unwrap(), Action::requeue(REQUEUE_IDLE));
    assert_eq!(condition(&status, "Degraded")["status"], "False");
    assert_eq!(status["state"], "RelaysReady");
}
