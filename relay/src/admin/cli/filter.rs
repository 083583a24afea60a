//! Which messages `list`, `shape` and the bulk forms of `hold`, `release`,
//! `flush` and `delete` act on: `--to`, `--from`, `--older`, `--state`, or
//! `--all`, as Postfix's `postsuper -d ALL deferred` and qshape's filters.

use std::time::Duration;

use tonic::transport::Channel;

use super::CliError;
use crate::admin::proto;
use crate::admin::proto::queue_client::QueueClient;

/// A message state to select.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateFilter {
    /// Being delivered now, or due.
    Active,
    /// Waiting for its next attempt.
    Deferred,
    /// Held by an operator.
    Held,
}

/// The selection flags.
#[derive(clap::Args, Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Only messages with a pending recipient at DOMAIN (`.DOMAIN`: or any
    /// subdomain of it).
    #[arg(long, value_name = "DOMAIN")]
    pub to: Option<String>,
    /// Only messages from SENDER: an address, `@DOMAIN`, or `<>` for the
    /// null sender.
    #[arg(long, value_name = "SENDER")]
    pub from: Option<String>,
    /// Only messages queued longer than DURATION (`30m`, `1h`, `2d`).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub older: Option<Duration>,
    /// Only messages in STATE.
    #[arg(long, value_enum, value_name = "STATE")]
    pub state: Option<StateFilter>,
    /// Every message: a bulk action needs this or another filter, so that a
    /// forgotten id never acts on the whole queue.
    #[arg(long)]
    pub all: bool,
}

fn domain_key(domain: &str) -> String {
    domain.trim_end_matches('.').to_ascii_lowercase()
}

impl Filter {
    /// Whether any selection was asked for (`--all` included).
    pub fn is_given(&self) -> bool {
        *self != Filter::default()
    }

    /// Whether `message` is selected.
    pub fn matches(&self, message: &proto::Message) -> bool {
        if let Some(state) = self.state {
            if message.state() != proto::MessageState::from(state) {
                return false;
            }
        }
        if let Some(older) = self.older {
            let age = message.now_ms.saturating_sub(message.arrival_ms);
            if u128::from(age) <= older.as_millis() {
                return false;
            }
        }
        if let Some(from) = &self.from {
            let sender = message.sender.to_ascii_lowercase();
            let selected = match from.as_str() {
                "<>" => sender.is_empty(),
                _ => match from.strip_prefix('@') {
                    Some(domain) => sender
                        .rsplit_once('@')
                        .is_some_and(|(_, d)| domain_key(d) == domain_key(domain)),
                    None => sender == from.to_ascii_lowercase(),
                },
            };
            if !selected {
                return false;
            }
        }
        if let Some(to) = &self.to {
            let (wanted, subdomains) = match to.strip_prefix('.') {
                Some(parent) => (domain_key(parent), true),
                None => (domain_key(to), false),
            };
            let at = |address: &str| {
                let domain = domain_key(address.rsplit_once('@').map_or("", |(_, d)| d));
                domain == wanted || (subdomains && domain.ends_with(&format!(".{wanted}")))
            };
            if !message
                .recipients
                .iter()
                .any(|r| r.status == "pending" && at(&r.address))
            {
                return false;
            }
        }
        true
    }
}

/// The queue (this relay's, or every relay's with `cluster`), keeping only
/// the messages `filter` selects.
pub async fn listed(
    client: &mut QueueClient<Channel>,
    cluster: bool,
    filter: &Filter,
) -> Result<proto::ListResponse, CliError> {
    let mut response = client
        .list(proto::ListRequest { cluster })
        .await?
        .into_inner();
    response.messages.retain(|m| filter.matches(m));
    Ok(response)
}

impl From<StateFilter> for proto::MessageState {
    fn from(state: StateFilter) -> proto::MessageState {
        match state {
            StateFilter::Active => proto::MessageState::Active,
            StateFilter::Deferred => proto::MessageState::Deferred,
            StateFilter::Held => proto::MessageState::Held,
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A message from `sender` to `rcpts` (address, status), `age_min` old.
    pub(in crate::admin::cli) fn message(
        sender: &str,
        rcpts: &[(&str, &str)],
        age_min: u64,
        state: proto::MessageState,
    ) -> proto::Message {
        let now_ms = 10_000_000_000;
        proto::Message {
            id: format!("{sender}-{age_min}"),
            sender: sender.into(),
            recipients: rcpts
                .iter()
                .map(|(address, status)| proto::Recipient {
                    address: (*address).into(),
                    status: (*status).into(),
                    ..proto::Recipient::default()
                })
                .collect(),
            arrival_ms: now_ms - age_min * 60_000,
            now_ms,
            state: state as i32,
            ..proto::Message::default()
        }
    }

    #[test]
    fn each_flag_narrows_and_all_takes_everything() {
        use proto::MessageState::{Deferred, Held};
        let a = message("a@x.test", &[("r@Dest.test", "pending")], 90, Deferred);
        let b = message(
            "",
            &[("r@sub.dest.test", "pending"), ("s@done.test", "delivered")],
            5,
            Held,
        );
        let filter = |args: &[&str]| {
            use clap::Parser;
            #[derive(clap::Parser)]
            struct Top {
                #[command(flatten)]
                filter: Filter,
            }
            let top =
                Top::try_parse_from(std::iter::once("x").chain(args.iter().copied())).unwrap();
            [&a, &b]
                .iter()
                .filter(|m| top.filter.matches(m))
                .map(|m| m.id.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(filter(&["--all"]), ["a@x.test-90", "-5"]);
        assert_eq!(filter(&["--to", "dest.test"]), ["a@x.test-90"]);
        assert_eq!(filter(&["--to", ".dest.test"]), ["a@x.test-90", "-5"]);
        assert!(
            filter(&["--to", "done.test"]).is_empty(),
            "delivered recipients do not count"
        );
        assert_eq!(filter(&["--from", "<>"]), ["-5"]);
        assert_eq!(filter(&["--from", "@X.test"]), ["a@x.test-90"]);
        assert_eq!(filter(&["--from", "A@x.test"]), ["a@x.test-90"]);
        assert_eq!(filter(&["--older", "1h"]), ["a@x.test-90"]);
        assert_eq!(filter(&["--state", "held"]), ["-5"]);
        assert!(filter(&["--state", "deferred", "--older", "2h"]).is_empty());
        assert!(!Filter::default().is_given());
    }
}
