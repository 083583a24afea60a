//! The bulk forms of `hold`, `release`, `flush` and `delete`: list the
//! queue (this relay's, or with `--cluster` every relay's: a request by id
//! reaches the relay that holds the message), keep the messages the
//! selection matches, and act on each, with a progress bar on a terminal
//! and a count at the end. Postfix's `postsuper -h ALL deferred`, with
//! filters.

use std::fmt::Write as _;

use serde_json::json;
use tonic::transport::Channel;

use super::filter::Filter;
use super::{json_line, CliError};
use crate::admin::proto;
use crate::admin::proto::queue_client::QueueClient;

/// Which messages a bulk action takes.
#[derive(clap::Args, Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    /// Select among every relay's messages, not only this one's.
    #[arg(long)]
    pub cluster: bool,
    #[command(flatten)]
    pub filter: Filter,
}

impl Selection {
    /// The selection, which a destructive action needs spelled out.
    pub fn required(&self) -> Result<&Selection, CliError> {
        if self.filter.is_given() {
            Ok(self)
        } else {
            Err(CliError::Usage(
                "name a message id, or select messages with --to, --from, --older, --state \
                 or --all"
                    .into(),
            ))
        }
    }
}

/// What to do with each selected message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Make it due now.
    Flush,
    /// Keep it from delivery.
    Hold,
    /// Let it go again.
    Release,
    /// Remove it, with a DSN first when `bounce`.
    Delete {
        /// Report undelivered recipients to the sender.
        bounce: bool,
    },
}

impl Action {
    fn past(self) -> &'static str {
        match self {
            Action::Flush => "flushed",
            Action::Hold => "held",
            Action::Release => "released",
            Action::Delete { bounce: true } => "deleted with a bounce",
            Action::Delete { bounce: false } => "deleted",
        }
    }

    async fn apply(self, client: &mut QueueClient<Channel>, id: &str) -> Result<(), tonic::Status> {
        let id = id.to_owned();
        match self {
            Action::Flush => client
                .flush(proto::FlushRequest { id: Some(id) })
                .await
                .map(drop),
            Action::Hold => client.hold(proto::HoldRequest { id }).await.map(drop),
            Action::Release => client.release(proto::ReleaseRequest { id }).await.map(drop),
            Action::Delete { bounce } => client
                .delete(proto::DeleteRequest { id, bounce })
                .await
                .map(drop),
        }
    }
}

/// Acts on every selected message; the report, or `Partly` when some failed.
pub async fn run(
    client: &mut QueueClient<Channel>,
    selection: &Selection,
    action: Action,
    json: bool,
) -> Result<String, CliError> {
    let listed = super::filter::listed(client, selection.cluster, &selection.filter).await?;
    let selected = &listed.messages;
    let bar = if !json && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        let bar = indicatif::ProgressBar::new(selected.len() as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.set_message(action.past());
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut failed: Vec<(String, String)> = Vec::new();
    for message in selected {
        if let Err(status) = action.apply(client, &message.id).await {
            // A message delivered (and gone) since the listing is not a failure.
            if status.code() != tonic::Code::NotFound {
                failed.push((message.id.clone(), status.message().to_owned()));
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    let done = selected.len() - failed.len();
    let out = if json {
        json_line(&json!({
            "action": action.past(),
            "selected": selected.len(),
            "done": done,
            "failed": failed.iter().map(|(id, error)| json!({"id": id, "error": error})).collect::<Vec<_>>(),
            "unreachable": listed.unreachable,
        }))
    } else {
        let mut out = String::new();
        for (id, error) in &failed {
            let _ = writeln!(out, "{id}: {error}");
        }
        for relay in &listed.unreachable {
            let _ = writeln!(out, "-- not answering, not included: {relay}");
        }
        let _ = writeln!(
            out,
            "{done} of {} selected message(s) {}",
            selected.len(),
            action.past()
        );
        out
    };
    if failed.is_empty() {
        Ok(out)
    } else {
        Err(CliError::Partly {
            output: out,
            failed: failed.len(),
        })
    }
}
