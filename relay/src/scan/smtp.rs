//! A scanner that is an SMTP or LMTP server: it is sent the spooled message
//! (early delivery to the scanner) and its answer becomes ours — any 5xx
//! refuses the message, any 4xx defers it, 2xx for every recipient accepts.

use std::net::SocketAddr;

use super::{ScanError, ScanRequest, Verdict};
use crate::config::{Protocol, ScannerConfig, ScannerKind, TlsMode};
use crate::delivery::client::{ClientSettings, Connection, RcptOutcome, Target, Timeouts};
use crate::delivery::route::NextHop;

/// Sends the message to the scanner at `config.address` and reads its verdict.
pub async fn scan(config: &ScannerConfig, request: &ScanRequest<'_>) -> Result<Verdict, ScanError> {
    let target = match NextHop::parse(&config.address).map_err(ScanError)? {
        NextHop::Unix(path) => Target::Unix(path),
        NextHop::Host { host, port } => {
            let addr: SocketAddr = tokio::net::lookup_host((host.as_str(), port))
                .await
                .map_err(|err| ScanError(format!("{}: {err}", config.address)))?
                .next()
                .ok_or_else(|| ScanError(format!("{}: no address", config.address)))?;
            Target::Tcp { addr, name: host }
        }
    };
    let settings = ClientSettings {
        helo_name: request.hostname.to_owned(),
        protocol: if config.kind == ScannerKind::Lmtp {
            Protocol::Lmtp
        } else {
            Protocol::Smtp
        },
        tls: TlsMode::None,
        tls_config: None,
        auth: None,
        // The scanner's own timeout bounds the whole exchange.
        timeouts: Timeouts {
            connect: config.timeout,
            command: config.timeout,
            data_init: config.timeout,
            data_block: config.timeout,
            data_end: config.timeout,
        },
    };
    let mut connection = Connection::open(&target, settings)
        .await
        .map_err(|err| ScanError(format!("{}: {err}", target.label())))?;
    // Refusals our client would make up (no SMTPUTF8, over its SIZE) are no
    // verdict of the scanner's: they are a scan that could not happen.
    let caps = connection.capabilities();
    if request.envelope.mail_params.smtputf8 && !caps.smtputf8 {
        tokio::spawn(connection.quit());
        return Err(ScanError(format!(
            "{} does not offer SMTPUTF8, which this message needs",
            target.label()
        )));
    }
    if let Some(limit) = caps
        .size
        .filter(|&limit| limit > 0 && request.envelope.wire_len() > limit)
    {
        tokio::spawn(connection.quit());
        return Err(ScanError(format!(
            "{} takes at most {limit} octets",
            target.label()
        )));
    }
    let recipients: Vec<usize> = (0..request.envelope.recipients.len()).collect();
    let outcomes = connection
        .send(request.envelope, &recipients, request.data_path)
        .await
        .map_err(|(err, _)| ScanError(format!("{}: {err}", target.label())))?;
    tokio::spawn(connection.quit());
    Ok(combine(&outcomes))
}

/// The scanner's replies for every recipient, as one verdict: the first
/// refusal wins, then the first deferral.
fn combine(outcomes: &[RcptOutcome]) -> Verdict {
    if let Some(RcptOutcome::Failed(reply)) = outcomes
        .iter()
        .find(|o| matches!(o, RcptOutcome::Failed(_)))
    {
        return Verdict::Reject(reply.clone());
    }
    if let Some(RcptOutcome::Deferred(reply)) = outcomes
        .iter()
        .find(|o| matches!(o, RcptOutcome::Deferred(_)))
    {
        return Verdict::Tempfail(reply.clone());
    }
    Verdict::Accept {
        headers: String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::Reply;

    #[test]
    fn refusal_beats_deferral_beats_acceptance() {
        let ok = RcptOutcome::Delivered(Reply::new(250, "2.0.0", "ok"));
        let later = RcptOutcome::Deferred(Reply::new(451, "4.7.1", "later"));
        let no = RcptOutcome::Failed(Reply::new(554, "5.7.1", "virus"));
        assert_eq!(
            combine(std::slice::from_ref(&ok)),
            Verdict::Accept {
                headers: String::new()
            }
        );
        assert_eq!(
            combine(&[ok.clone(), later.clone()]),
            Verdict::Tempfail(later.reply().clone())
        );
        assert_eq!(
            combine(&[later, no.clone(), ok]),
            Verdict::Reject(no.reply().clone())
        );
    }
}
