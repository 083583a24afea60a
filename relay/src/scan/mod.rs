//! T-shaped content scanning: after a message is on the local spool and
//! before the client hears our reply, each scanner of the listener reads the
//! spooled message (never a proxy, never a re-injection) and its verdict
//! becomes ours: accept (maybe with headers to add), tempfail or reject.
//!
//! Headers a scanner adds go into the envelope (`added_headers`) and are
//! prepended when the message leaves, so the spooled data never changes.

pub mod header;
pub mod rspamd;
pub mod smtp;

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use tracing::{info, warn};

use crate::config::{ScannerConfig, ScannerFailure, ScannerKind};
use crate::metrics::Metrics;
use crate::smtp::Reply;
use crate::spool::envelope::Envelope;

/// What a scanner is told about the message besides its bytes.
#[derive(Debug)]
pub struct ScanRequest<'a> {
    /// The envelope (`added_headers` holds what earlier scanners added).
    pub envelope: &'a Envelope,
    /// The spooled data (the message's `.part` file), complete on disk.
    pub data_path: &'a Path,
    /// The SMTP client's address (none for local submission).
    pub client_ip: Option<IpAddr>,
    /// The authenticated user, if any.
    pub user: Option<&'a str>,
    /// Our host name.
    pub hostname: &'a str,
}

/// A scanner's verdict on one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Go on; prepend these header lines (CRLF-terminated, maybe empty).
    Accept {
        /// Header lines to add.
        headers: String,
    },
    /// Refuse for now with this 4xx.
    Tempfail(Reply),
    /// Refuse for good with this 5xx.
    Reject(Reply),
}

/// Why a scan produced no verdict: the scanner is down, too slow or said
/// something we cannot use.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ScanError(pub String);

/// One configured scanner.
#[derive(Debug)]
pub struct Scanner {
    config: ScannerConfig,
}

impl Scanner {
    /// The scanner described by `config` (validated already).
    pub fn new(config: ScannerConfig) -> Scanner {
        Scanner { config }
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// Scans within the configured timeout; a failure becomes the
    /// configured `on_failure` verdict (and is counted).
    pub async fn scan(&self, request: &ScanRequest<'_>, metrics: &Metrics) -> Verdict {
        let work = async {
            match self.config.kind {
                ScannerKind::Rspamd => rspamd::scan(&self.config, request).await,
                ScannerKind::Smtp | ScannerKind::Lmtp => smtp::scan(&self.config, request).await,
            }
        };
        let result = match tokio::time::timeout(self.config.timeout, work).await {
            Ok(result) => result,
            Err(_) => Err(ScanError(format!(
                "no verdict within {}",
                humantime::format_duration(self.config.timeout)
            ))),
        };
        let id = &request.envelope.id;
        match result {
            Ok(verdict) => {
                match &verdict {
                    Verdict::Accept { .. } => {}
                    Verdict::Tempfail(reply) => {
                        Metrics::count(&metrics.scan_tempfailed);
                        info!(%id, scanner = %self.config.name, reply = %reply.lines.join(" "), "scanner deferred the message");
                    }
                    Verdict::Reject(reply) => {
                        Metrics::count(&metrics.scan_rejected);
                        info!(%id, scanner = %self.config.name, reply = %reply.lines.join(" "), "scanner refused the message");
                    }
                }
                verdict
            }
            Err(err) => {
                Metrics::count(&metrics.scan_failures);
                match self.config.on_failure {
                    ScannerFailure::Accept => {
                        warn!(%id, scanner = %self.config.name, "scan failed, accepting unscanned (on_failure = accept): {err}");
                        Verdict::Accept {
                            headers: String::new(),
                        }
                    }
                    ScannerFailure::Tempfail => {
                        warn!(%id, scanner = %self.config.name, "scan failed, deferring the message: {err}");
                        Verdict::Tempfail(Reply::new(
                            451,
                            "4.7.1",
                            "Content scanner unavailable, try again later",
                        ))
                    }
                }
            }
        }
    }
}

/// The scanners of one listener, in order.
#[derive(Debug, Clone, Default)]
pub struct ScanChain {
    scanners: Vec<Arc<Scanner>>,
}

impl ScanChain {
    /// The scanners named in `names`, from `all` (validated to exist).
    pub fn new(names: &[String], all: &[ScannerConfig]) -> ScanChain {
        ScanChain {
            scanners: names
                .iter()
                .filter_map(|name| all.iter().find(|s| &s.name == name))
                .map(|config| Arc::new(Scanner::new(config.clone())))
                .collect(),
        }
    }

    /// Whether there is nothing to run.
    pub fn is_empty(&self) -> bool {
        self.scanners.is_empty()
    }

    /// Runs every scanner in order, adding accepted headers to
    /// `envelope.added_headers`; the first refusal ends the chain.
    pub async fn run(
        &self,
        envelope: &mut Envelope,
        data_path: &Path,
        client_ip: Option<IpAddr>,
        user: Option<&str>,
        hostname: &str,
        metrics: &Metrics,
    ) -> Result<(), Reply> {
        for scanner in &self.scanners {
            let request = ScanRequest {
                envelope,
                data_path,
                client_ip,
                user,
                hostname,
            };
            match scanner.scan(&request, metrics).await {
                Verdict::Accept { headers } => envelope.added_headers.push_str(&headers),
                Verdict::Tempfail(reply) | Verdict::Reject(reply) => return Err(reply),
            }
        }
        Ok(())
    }
}
