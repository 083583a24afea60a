//! `postern queue`: the command-line client of the admin API.
//!
//! It finds the relay through `--data-dir` (its `admin.sock`), `--config`
//! (the file's `data_dir`, or `[admin] listen` when no socket is there) or
//! `--admin ADDR`, and prints tables, or JSON with `--json`. One file per
//! command that formats something; the plain actions live here.

pub mod bulk;
pub mod filter;
pub mod list;
pub mod shape;
pub mod show;
pub mod stats;
pub mod top;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use serde_json::json;
use tonic::transport::{Channel, Endpoint, Uri};

use super::proto;
use super::proto::queue_client::QueueClient;
use crate::config::Config;
use crate::peer::tls::MutualTls;

/// `postern queue ...`.
#[derive(clap::Args, Debug)]
pub struct QueueArgs {
    #[command(subcommand)]
    command: QueueCommand,
    /// The relay's data directory; its admin socket is DIR/admin.sock
    /// [default: ./postern-data, as `postern serve`].
    #[arg(long, global = true, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// The relay's configuration file: its data_dir, or [admin] listen when
    /// no admin socket is there.
    #[arg(long, short = 'c', global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The admin service at HOST:PORT (TCP) or unix:/PATH.
    #[arg(long, global = true, value_name = "ADDR")]
    admin: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(clap::Subcommand, Debug)]
enum QueueCommand {
    /// Every queued message (or those selected), oldest first: id, age,
    /// size, sender, recipients, next attempt and last error.
    List {
        /// Every relay of the cluster, with a RELAY column.
        #[arg(long)]
        cluster: bool,
        #[command(flatten)]
        filter: filter::Filter,
    },
    /// Postfix's qshape: messages per destination domain by age in minutes.
    Shape {
        /// Every relay of the cluster, summed.
        #[arg(long)]
        cluster: bool,
        /// Rows by recipient domain (default) or by sender domain.
        #[arg(long, value_enum, default_value_t)]
        by: shape::By,
        #[command(flatten)]
        filter: filter::Filter,
    },
    /// One message: its envelope and the state of each recipient.
    Show {
        /// Message id.
        id: String,
    },
    /// Attempt delivery now: of one message, of those selected, or of
    /// every message not held.
    Flush {
        /// Message id; every message not held when absent (and no selection).
        id: Option<String>,
        #[command(flatten)]
        bulk: bulk::Selection,
    },
    /// Keep a message, or those selected, from being delivered until released.
    Hold {
        /// Message id (or select with --to, --from, --older, --state, --all).
        id: Option<String>,
        #[command(flatten)]
        bulk: bulk::Selection,
    },
    /// Release a held message, or those selected; delivery is attempted at once.
    Release {
        /// Message id (or select with --to, --from, --older, --state, --all).
        id: Option<String>,
        #[command(flatten)]
        bulk: bulk::Selection,
    },
    /// Remove a message, or those selected, and every copy of each.
    Delete {
        /// Message id (or select with --to, --from, --older, --state, --all).
        id: Option<String>,
        /// First report undelivered recipients to the sender (a DSN).
        #[arg(long)]
        bounce: bool,
        #[command(flatten)]
        bulk: bulk::Selection,
    },
    /// A live view: rates in and out, deferrals, and queue depth and oldest
    /// age per destination, with sparklines; `q` quits (also `postern top`).
    Top {
        /// Every relay of the cluster, summed.
        #[arg(long)]
        cluster: bool,
        /// Time between samples.
        #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = humantime::parse_duration)]
        interval: Duration,
        /// Print one frame (two samples an interval apart) and exit.
        #[arg(long)]
        once: bool,
    },
    /// Counts by state and destination, and the oldest message's age.
    Stats {
        /// Summed over every relay of the cluster.
        #[arg(long)]
        cluster: bool,
    },
}

/// Where the admin service is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A Unix socket.
    Unix(PathBuf),
    /// `host:port` over TCP.
    Tcp(String),
    /// `host:port` over mutual TLS, presenting the certificate of `files`
    /// (`[admin.tls]` of the configuration given).
    Tls {
        /// `host:port`.
        addr: String,
        /// This client's certificate and key, and the service's CA.
        files: Box<crate::config::MutualTlsFiles>,
    },
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Unix(path) => write!(f, "{}", path.display()),
            Target::Tcp(addr) | Target::Tls { addr, .. } => write!(f, "{addr}"),
        }
    }
}

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Nothing answers at the target.
    #[error("the relay is not running, or not at {target}: {reason}")]
    NotRunning {
        /// Where we looked.
        target: Target,
        /// The connect error.
        reason: String,
    },
    /// The configuration file is unusable.
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    /// The relay refused the request.
    #[error("{}", .0.message())]
    Rpc(#[from] tonic::Status),
    /// Neither an id nor a selection, or both.
    #[error("{0}")]
    Usage(String),
    /// A bulk action failed for some messages; what it printed says which.
    #[error("{output}{failed} message(s) failed")]
    Partly {
        /// The report of what was done.
        output: String,
        /// How many failed.
        failed: usize,
    },
}

impl QueueArgs {
    /// Where to connect, from the flags.
    pub fn target(&self) -> Result<Target, CliError> {
        if let Some(admin) = &self.admin {
            return Ok(match admin.strip_prefix("unix:") {
                Some(path) => Target::Unix(PathBuf::from(path)),
                None => Target::Tcp(admin.clone()),
            });
        }
        if let Some(path) = &self.config {
            let mut config = Config::load(path)?;
            if let Some(data_dir) = &self.data_dir {
                config.data_dir = data_dir.clone();
            }
            let socket = config.admin_socket();
            return Ok(match (config.admin.listen, config.admin.tls) {
                (Some(listen), Some(files)) if !socket.exists() => Target::Tls {
                    addr: listen.to_string(),
                    files: Box::new(files),
                },
                (Some(listen), None) if !socket.exists() => Target::Tcp(listen.to_string()),
                _ => Target::Unix(socket),
            });
        }
        let data_dir = self
            .data_dir
            .clone()
            .unwrap_or_else(|| Config::default().data_dir);
        Ok(Target::Unix(data_dir.join("admin.sock")))
    }
}

/// Runs `postern queue ...` and returns the process exit code.
pub fn run(args: QueueArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("postern queue: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(execute(&args)) {
        Ok(output) => {
            print!("{output}");
            ExitCode::SUCCESS
        }
        Err(CliError::Partly { output, failed }) => {
            print!("{output}");
            eprintln!("postern queue: {failed} message(s) failed");
            ExitCode::FAILURE
        }
        Err(err) => {
            eprintln!("postern queue: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Runs one command; returns what to print.
pub async fn execute(args: &QueueArgs) -> Result<String, CliError> {
    let target = args.target()?;
    let mut client = connect(&target).await?;
    let json = args.json;
    let out = match &args.command {
        QueueCommand::List { cluster, filter } => {
            let response = filter::listed(&mut client, *cluster, filter).await?;
            let messages = response.messages;
            let mut out = if json {
                json_line(&serde_json::Value::Array(
                    messages.iter().map(list::message_json).collect(),
                ))
            } else if *cluster {
                list::cluster_table(&messages)
            } else {
                list::table(&messages)
            };
            if !json {
                for unreachable in &response.unreachable {
                    let _ = writeln!(out, "-- not answering: {unreachable}");
                }
            }
            out
        }
        QueueCommand::Shape {
            cluster,
            by,
            filter,
        } => {
            let response = filter::listed(&mut client, *cluster, filter).await?;
            let rows = shape::shape(&response.messages, *by);
            if json {
                json_line(&shape::json(&rows))
            } else {
                let mut out = shape::render(&rows);
                for unreachable in &response.unreachable {
                    let _ = writeln!(out, "-- not answering: {unreachable}");
                }
                out
            }
        }
        QueueCommand::Flush { id: None, bulk } if bulk.filter.is_given() || bulk.cluster => {
            bulk::run(&mut client, bulk, bulk::Action::Flush, json).await?
        }
        QueueCommand::Hold { id: None, bulk } => {
            bulk::run(&mut client, bulk.required()?, bulk::Action::Hold, json).await?
        }
        QueueCommand::Release { id: None, bulk } => {
            bulk::run(&mut client, bulk.required()?, bulk::Action::Release, json).await?
        }
        QueueCommand::Delete {
            id: None,
            bounce,
            bulk,
        } => {
            let action = bulk::Action::Delete { bounce: *bounce };
            bulk::run(&mut client, bulk.required()?, action, json).await?
        }
        QueueCommand::Flush { id: Some(_), bulk }
        | QueueCommand::Hold { id: Some(_), bulk }
        | QueueCommand::Release { id: Some(_), bulk }
        | QueueCommand::Delete {
            id: Some(_), bulk, ..
        } if bulk.filter.is_given() || bulk.cluster => {
            return Err(CliError::Usage(
                "give a message id or a selection (--to, --from, --older, --state, --all), \
                 not both"
                    .into(),
            ));
        }
        QueueCommand::Top {
            cluster,
            interval,
            once,
        } => {
            let interval = (*interval).max(Duration::from_millis(100));
            top::run(&mut client, &target.to_string(), *cluster, interval, *once).await?
        }
        QueueCommand::Show { id } => {
            let message = client
                .show(proto::ShowRequest { id: id.clone() })
                .await?
                .into_inner();
            if json {
                json_line(&list::message_json(&message))
            } else {
                show::render(&message)
            }
        }
        QueueCommand::Flush { id, .. } => {
            let flushed = client
                .flush(proto::FlushRequest { id: id.clone() })
                .await?
                .into_inner()
                .flushed;
            if json {
                json_line(&json!({ "flushed": flushed }))
            } else {
                match id {
                    Some(id) => format!("{id}: delivery attempt scheduled now\n"),
                    None => format!("{flushed} message(s) scheduled for delivery now\n"),
                }
            }
        }
        QueueCommand::Hold { id: Some(id), .. } => {
            let message = client
                .hold(proto::HoldRequest { id: id.clone() })
                .await?
                .into_inner();
            done(json, &message, "held")
        }
        QueueCommand::Release { id: Some(id), .. } => {
            let message = client
                .release(proto::ReleaseRequest { id: id.clone() })
                .await?
                .into_inner();
            done(json, &message, "released")
        }
        QueueCommand::Delete {
            id: Some(id),
            bounce,
            ..
        } => {
            let response = client
                .delete(proto::DeleteRequest {
                    id: id.clone(),
                    bounce: *bounce,
                })
                .await?
                .into_inner();
            if json {
                json_line(
                    &json!({ "id": response.id, "deleted": true, "bounced": response.bounced }),
                )
            } else if response.bounced {
                format!(
                    "{}: deleted; a bounce was sent to the sender\n",
                    response.id
                )
            } else {
                format!("{}: deleted\n", response.id)
            }
        }
        QueueCommand::Stats { cluster } => {
            let response = client
                .stats(proto::StatsRequest { cluster: *cluster })
                .await?
                .into_inner();
            if json {
                json_line(&stats::stats_json(&response))
            } else {
                let mut out = stats::render(&response);
                if !response.relays.is_empty() {
                    let _ = writeln!(out, "Relays: {}", response.relays.join(", "));
                }
                for unreachable in &response.unreachable {
                    let _ = writeln!(out, "Not answering: {unreachable}");
                }
                out
            }
        }
    };
    Ok(out)
}

fn done(json: bool, message: &proto::Message, what: &str) -> String {
    if json {
        json_line(&list::message_json(message))
    } else {
        format!("{}: {what}\n", message.id)
    }
}

fn json_line(value: &serde_json::Value) -> String {
    let mut text = serde_json::to_string_pretty(value).expect("JSON values serialize");
    text.push('\n');
    text
}

/// Connects to the admin service, failing fast when nothing listens.
pub async fn connect(target: &Target) -> Result<QueueClient<Channel>, CliError> {
    let not_running = |reason: String| CliError::NotRunning {
        target: target.clone(),
        reason,
    };
    let channel = match target {
        Target::Unix(path) => {
            // Connect once ourselves: the io error names the cause plainly
            // (no such file, connection refused, permission denied).
            tokio::net::UnixStream::connect(path)
                .await
                .map_err(|err| not_running(err.to_string()))?;
            let path = path.clone();
            // The URI is required but unused: the connector picks the socket.
            Endpoint::from_static("http://admin.sock")
                .connect_timeout(Duration::from_secs(5))
                .timeout(Duration::from_secs(60))
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(
                            tokio::net::UnixStream::connect(path).await?,
                        ))
                    }
                }))
                .await
                .map_err(|err| not_running(error_chain(&err)))?
        }
        Target::Tcp(addr) => Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|err| not_running(format!("bad address: {err}")))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(60))
            .connect()
            .await
            .map_err(|err| not_running(error_chain(&err)))?,
        Target::Tls { addr, files } => {
            let tls = MutualTls::load(files).map_err(|err| not_running(err.to_string()))?;
            let resolved = tokio::net::lookup_host(addr.as_str())
                .await
                .map_err(|err| not_running(format!("cannot resolve: {err}")))?
                .next()
                .ok_or_else(|| not_running("no address".into()))?;
            // Connect once ourselves, so a refused certificate says so.
            let probe = tls
                .connect(resolved)
                .await
                .map_err(|err| not_running(format!("TLS: {err}")))?;
            drop(probe);
            let endpoint = Endpoint::from_shared(format!("http://{resolved}"))
                .map_err(|err| not_running(format!("bad address: {err}")))?
                .connect_timeout(Duration::from_secs(5))
                .timeout(Duration::from_secs(60));
            tls.channel(endpoint, resolved)
        }
    };
    Ok(QueueClient::new(channel).max_decoding_message_size(super::MAX_RESPONSE_BYTES))
}

/// An error and its sources, `: `-separated (tonic's own text is terse).
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let _ = write!(text, ": {cause}");
        source = cause.source();
    }
    text
}

// ------------------------------------------------------------ formatting

/// Left-aligned columns two spaces apart; the last column is not padded.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let columns = headers.len();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = headers.iter().map(|h| (*h).to_owned()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (index, cell) in row.iter().enumerate().take(columns) {
            if index + 1 == columns {
                line.push_str(cell);
            } else {
                let pad = widths[index] - cell.chars().count();
                line.push_str(cell);
                line.extend(std::iter::repeat_n(' ', pad + 2));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// A duration in the two largest units: `42s`, `5m`, `3h12m`, `2d4h`.
pub fn short_duration(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, hours, minutes) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60);
    if days > 0 {
        if hours > 0 {
            format!("{days}d{hours}h")
        } else {
            format!("{days}d")
        }
    } else if secs >= 3600 {
        if minutes > 0 {
            format!("{}h{minutes}m", secs / 3600)
        } else {
            format!("{}h", secs / 3600)
        }
    } else if secs >= 60 {
        format!("{}m", secs / 60)
    } else {
        format!("{secs}s")
    }
}

/// When the next attempt is, relative to the relay's clock.
pub fn next_attempt(message: &proto::Message) -> String {
    match message.state() {
        proto::MessageState::Held => "held".into(),
        _ if message.in_flight => "now (delivering)".into(),
        _ if message.next_attempt_ms <= message.now_ms => "now".into(),
        _ => format!(
            "in {}",
            short_duration(message.next_attempt_ms - message.now_ms)
        ),
    }
}

/// A size in octets, compactly: `812`, `1.2K`, `3.4M`.
pub fn short_size(octets: u64) -> String {
    const K: f64 = 1024.0;
    let value = octets as f64;
    if octets < 1024 {
        octets.to_string()
    } else if value < K * K {
        format!("{:.1}K", value / K)
    } else if value < K * K * K {
        format!("{:.1}M", value / (K * K))
    } else {
        format!("{:.1}G", value / (K * K * K))
    }
}

/// The sender as written in SMTP: `<>` for the null reverse path.
pub fn sender(message: &proto::Message) -> String {
    if message.sender.is_empty() {
        "<>".into()
    } else {
        message.sender.clone()
    }
}

/// The state's name in output: active, deferred or held.
pub fn state_name(state: proto::MessageState) -> &'static str {
    match state {
        proto::MessageState::Active => "active",
        proto::MessageState::Deferred => "deferred",
        proto::MessageState::Held => "held",
        proto::MessageState::Unspecified => "unknown",
    }
}

/// Unix ms as RFC 3339 UTC, seconds precision.
pub fn timestamp(ms: u64) -> String {
    chrono::DateTime::from_timestamp_millis(ms as i64)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default()
}

/// `text` cut to `max` characters, with `…` when cut.
pub fn truncate(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_owned()
    } else {
        let mut cut: String = text.chars().take(max.saturating_sub(1)).collect();
        cut.push('…');
        cut
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns_and_leaves_the_last_unpadded() {
        let rows = vec![
            vec!["a".to_owned(), "long cell".to_owned(), "x".to_owned()],
            vec!["bbbb".to_owned(), "c".to_owned(), "".to_owned()],
        ];
        assert_eq!(
            table(&["ID", "WHAT", "LAST"], &rows),
            "ID    WHAT       LAST\n\
             a     long cell  x\n\
             bbbb  c\n"
        );
    }

    #[test]
    fn durations_use_two_units() {
        assert_eq!(short_duration(0), "0s");
        assert_eq!(short_duration(59_999), "59s");
        assert_eq!(short_duration(60_000), "1m");
        assert_eq!(short_duration(3_600_000), "1h");
        assert_eq!(short_duration(3_600_000 + 12 * 60_000 + 5_000), "1h12m");
        assert_eq!(short_duration(2 * 86_400_000 + 4 * 3_600_000), "2d4h");
        assert_eq!(short_duration(5 * 86_400_000), "5d");
    }

    #[test]
    fn sizes_are_compact() {
        assert_eq!(short_size(812), "812");
        assert_eq!(short_size(1024), "1.0K");
        assert_eq!(short_size(1536), "1.5K");
        assert_eq!(short_size(3 * 1024 * 1024 + 400 * 1024), "3.4M");
    }

    #[test]
    fn truncation_marks_the_cut() {
        assert_eq!(truncate("short", 10), "short");
        assert_eq!(truncate("0123456789abc", 10), "012345678…");
    }

    #[test]
    fn targets_from_flags() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Top {
            #[command(flatten)]
            args: QueueArgs,
        }
        let target = |argv: &[&str]| {
            Top::try_parse_from(std::iter::once("queue").chain(argv.iter().copied()))
                .unwrap()
                .args
                .target()
                .unwrap()
        };
        assert_eq!(
            target(&["list"]),
            Target::Unix(PathBuf::from("./postern-data/admin.sock"))
        );
        assert_eq!(
            target(&["stats", "--data-dir", "/var/lib/postern"]),
            Target::Unix(PathBuf::from("/var/lib/postern/admin.sock"))
        );
        assert_eq!(
            target(&["--admin", "127.0.0.1:9326", "list"]),
            Target::Tcp("127.0.0.1:9326".into())
        );
        assert_eq!(
            target(&["show", "X", "--admin", "unix:/run/p.sock"]),
            Target::Unix(PathBuf::from("/run/p.sock"))
        );
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("postern.toml");
        std::fs::write(
            &file,
            format!(
                "data_dir = {:?}\n[admin]\nlisten = \"127.0.0.1:9326\"\n",
                dir.path()
            ),
        )
        .unwrap();
        let file = file.to_str().unwrap();
        // No socket in the data dir: the TCP listener.
        assert_eq!(
            target(&["list", "--config", file]),
            Target::Tcp("127.0.0.1:9326".into())
        );
        std::fs::write(dir.path().join("admin.sock"), b"").unwrap();
        assert_eq!(
            target(&["list", "--config", file]),
            Target::Unix(dir.path().join("admin.sock"))
        );
    }
}
