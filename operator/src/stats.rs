//! Reading a relay pod's `/stats` (readiness, queue depth, oldest message,
//! whether delivery runs and why not) over HTTP, behind a small trait so
//! reconcile tests can script the answers.

use std::time::Duration;

use futures::future::BoxFuture;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use serde::Deserialize;

use crate::relay_config::HTTP_PORT;

/// What a relay's `/stats` says.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct RelayStats {
    /// Whether the relay accepts mail.
    pub ready: bool,
    /// Messages in its queue.
    pub queue_depth: i64,
    /// Arrival of its oldest queued message.
    #[serde(default)]
    pub oldest_message_time: Option<Timestamp>,
    /// Whether it delivers (absent from relays that predate the field).
    #[serde(default)]
    pub delivery: Option<DeliveryState>,
    /// Why delivery is stalled, as the relay names it
    /// ([`postern::health::StallReason`]: `etcd_unreachable`, `lease_expired`).
    #[serde(default)]
    pub delivery_reason: Option<String>,
    /// The relay's sentence about its delivery (absent while running).
    #[serde(default)]
    pub delivery_message: Option<String>,
}

/// A relay's delivery state ([`postern::health::Delivery`] as `/stats` spells it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryState {
    /// Delivering.
    Running,
    /// Paused by its configuration.
    Paused,
    /// Shutting down.
    Draining,
    /// Joining the cluster; nothing failed yet.
    Joining,
    /// Not delivering because of a fault (`delivery_reason`).
    Stalled,
    /// A state this operator does not know (a newer relay).
    #[serde(other)]
    Unknown,
}

/// Why a relay's stats could not be read.
#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    /// The pod has no IP yet.
    #[error("the pod has no IP address")]
    NoAddress,
    /// Connecting or talking HTTP failed.
    #[error("{url}: {source}")]
    Http {
        /// The URL asked.
        url: String,
        /// Why.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The relay answered with an error status.
    #[error("{url}: HTTP {status}")]
    Status {
        /// The URL asked.
        url: String,
        /// The status code.
        status: u16,
    },
    /// The answer was not the expected JSON.
    #[error("{url}: {source}")]
    Json {
        /// The URL asked.
        url: String,
        /// Why.
        source: serde_json::Error,
    },
    /// No answer in time.
    #[error("{url}: no answer within {0:?}", TIMEOUT)]
    Timeout {
        /// The URL asked.
        url: String,
    },
}

/// Where relay statistics come from.
pub trait StatsSource: Send + Sync {
    /// The stats of one relay pod.
    fn stats<'a>(&'a self, pod: &'a Pod) -> BoxFuture<'a, Result<RelayStats, StatsError>>;
}

const TIMEOUT: Duration = Duration::from_secs(3);

/// Reads `http://<pod IP>:<container port "http">/stats`.
#[derive(Debug, Default, Clone)]
pub struct HttpStats;

impl StatsSource for HttpStats {
    fn stats<'a>(&'a self, pod: &'a Pod) -> BoxFuture<'a, Result<RelayStats, StatsError>> {
        Box::pin(async move {
            let url = stats_url(pod).ok_or(StatsError::NoAddress)?;
            match tokio::time::timeout(TIMEOUT, fetch(&url)).await {
                Ok(result) => result,
                Err(_) => Err(StatsError::Timeout { url }),
            }
        })
    }
}

/// The stats URL of a pod: its IP and the relay container's `http` port.
pub fn stats_url(pod: &Pod) -> Option<String> {
    let ip: std::net::IpAddr = pod.status.as_ref()?.pod_ip.as_ref()?.parse().ok()?;
    let port = pod
        .spec
        .as_ref()
        .into_iter()
        .flat_map(|spec| &spec.containers)
        .flat_map(|container| container.ports.iter().flatten())
        .find(|port| port.name.as_deref() == Some("http"))
        .map_or(i32::from(HTTP_PORT), |port| port.container_port);
    Some(format!(
        "http://{}/stats",
        std::net::SocketAddr::new(ip, port as u16)
    ))
}

async fn fetch(url: &str) -> Result<RelayStats, StatsError> {
    let http = |source: Box<dyn std::error::Error + Send + Sync>| StatsError::Http {
        url: url.to_owned(),
        source,
    };
    let uri: hyper::Uri = url.parse().map_err(|err| http(Box::new(err)))?;
    let authority = uri.authority().map(|a| a.to_string()).unwrap_or_default();
    let stream = tokio::net::TcpStream::connect(&authority)
        .await
        .map_err(|err| http(Box::new(err)))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|err| http(Box::new(err)))?;
    let driver = tokio::spawn(connection);
    let request = hyper::Request::get(uri.path())
        .header(hyper::header::HOST, authority)
        .body(Empty::<Bytes>::new())
        .map_err(|err| http(Box::new(err)))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|err| http(Box::new(err)))?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|err| http(Box::new(err)))?
        .to_bytes();
    driver.abort();
    if !status.is_success() {
        return Err(StatsError::Status {
            url: url.to_owned(),
            status: status.as_u16(),
        });
    }
    serde_json::from_slice(&body).map_err(|source| StatsError::Json {
        url: url.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn pod(ip: &str, port: i32) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "mx-0"},
            "spec": {"containers": [{"name": "relay", "ports": [
                {"name": "smtp", "containerPort": 2525},
                {"name": "http", "containerPort": port}]}]},
            "status": {"podIP": ip}
        }))
        .unwrap()
    }

    #[test]
    fn url_uses_the_pod_ip_and_http_port() {
        assert_eq!(
            stats_url(&pod("10.1.2.3", 9325)).as_deref(),
            Some("http://10.1.2.3:9325/stats")
        );
        assert_eq!(
            stats_url(&pod("fd00::1", 9325)).as_deref(),
            Some("http://[fd00::1]:9325/stats")
        );
    }

    #[tokio::test]
    async fn reads_a_relays_stats_json() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = vec![0; 1024];
            let n = socket.read(&mut request).await.unwrap();
            assert!(String::from_utf8_lossy(&request[..n]).starts_with("GET /stats HTTP/1.1"));
            let body = r#"{"ready":true,"queue_depth":4,"oldest_age_seconds":61.5,"oldest_message_time":"2026-01-01T11:59:00Z"}"#;
            let reply = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            socket.write_all(reply.as_bytes()).await.unwrap();
        });
        let stats = HttpStats
            .stats(&pod("127.0.0.1", i32::from(port)))
            .await
            .unwrap();
        assert_eq!(stats.queue_depth, 4);
        assert!(stats.ready);
        assert_eq!(
            stats.oldest_message_time,
            Some("2026-01-01T11:59:00Z".parse().unwrap())
        );
        assert_eq!(stats.delivery, None, "a relay before the delivery field");
        server.await.unwrap();
    }

    #[test]
    fn a_stalled_relays_stats_parse() {
        let stats: RelayStats = serde_json::from_str(
            r#"{"ready":true,"queue_depth":3,"oldest_age_seconds":2.0,
                "oldest_message_time":"2026-01-01T11:59:00Z","delivery":"stalled",
                "delivery_reason":"etcd_unreachable",
                "delivery_message":"etcd unreachable: cannot renew the lease: connection refused"}"#,
        )
        .unwrap();
        assert_eq!(stats.delivery, Some(DeliveryState::Stalled));
        assert_eq!(stats.delivery_reason.as_deref(), Some("etcd_unreachable"));
        let newer: RelayStats =
            serde_json::from_str(r#"{"ready":true,"queue_depth":0,"delivery":"hibernating"}"#)
                .unwrap();
        assert_eq!(newer.delivery, Some(DeliveryState::Unknown));
    }

    #[tokio::test]
    async fn a_closed_port_is_an_http_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let err = HttpStats
            .stats(&pod("127.0.0.1", i32::from(port)))
            .await
            .unwrap_err();
        assert!(matches!(err, StatsError::Http { .. }), "{err}");
    }
}
