//! The `postern` command: `serve` runs the relay, `queue` manages its queue,
//! `config check` validates a file, `sendmail` submits mail (also when run
//! through a link named `sendmail`, `mailq` or `newaliases`).

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use postern::config::Config;

/// Postern: an SMTP relay that answers 250 only after a durable quorum of copies.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the relay. Without --config: SMTP on 127.0.0.1:2525, data under
    /// ./postern-data (one fsync'd local spool),
    /// health on 127.0.0.1:9325, loopback trusted to relay.
    Serve {
        /// TOML configuration file (see README); flags below override it.
        #[arg(long, short = 'c', value_name = "FILE")]
        config: Option<PathBuf>,
        /// Address of the SMTP listener (replaces the first [[listener]]'s address).
        #[arg(long, value_name = "ADDR:PORT")]
        listen: Option<SocketAddr>,
        /// Directory for the spool, the delivery state and the admin sockets.
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
        /// Address of the health endpoint (/healthz, /readyz, /metrics).
        #[arg(long, value_name = "ADDR:PORT")]
        http: Option<SocketAddr>,
        /// Send all mail without a matching [[route]] to this next hop
        /// (host:port, [host]:port or unix:/path), like Postfix's relayhost.
        #[arg(long, value_name = "HOST:PORT")]
        relayhost: Option<String>,
    },
    /// Manage the queue of a running relay (over its admin socket or --admin).
    Queue(postern::admin::cli::QueueArgs),
    /// A live view of a running relay: `postern queue top` (`--help` there).
    #[command(disable_help_flag = true)]
    Top {
        /// The options of `postern queue top`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Submit mail with sendmail's command line (`-i`, `-t`, `-f`, `-bs`, ...)
    /// over the relay's submission socket; `postern sendmail --help` lists
    /// the options. A link named sendmail, mailq or newaliases runs this too.
    #[command(disable_help_flag = true)]
    Sendmail {
        /// sendmail's options and recipients, parsed by sendmail's rules.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Work with configuration files.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Subcommand, Debug)]
enum ConfigCommand {
    /// Validate a configuration file and say exactly what is wrong with it.
    Check {
        /// The TOML file.
        file: PathBuf,
    },
}

/// Caps glibc's heap at two arenas before the runtime's threads start
/// (unless `MALLOC_ARENA_MAX` says otherwise). By default every thread that
/// allocates (tokio's workers, the blocking pool) may get an arena of its
/// own, up to eight per core, and each keeps what it once held: with
/// 100,000 messages queued and delivery running the relay held 105 MiB, with
/// two arenas 69 MiB (bench/restart-at-scale). mimalloc, tried instead, held
/// 274 MiB.
fn limit_heap_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets an allocator parameter; called before
        // the runtime starts other threads.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) };
    }
}

fn main() -> ExitCode {
    let argv: Vec<OsString> = std::env::args_os().collect();
    // Before clap: sendmail's options (-oi, -bs, -fuser) follow getopt rules
    // clap does not have.
    if let Some(args) = postern::sendmail::invoked_as_sendmail(&argv) {
        return postern::sendmail::main(args);
    }
    let cli = Cli::parse_from(argv);
    match cli.command {
        Command::Queue(args) => postern::admin::cli::run(args),
        Command::Top { args } => {
            #[derive(Parser)]
            struct Queue {
                #[command(flatten)]
                args: postern::admin::cli::QueueArgs,
            }
            let argv = ["postern queue", "top"]
                .map(OsString::from)
                .into_iter()
                .chain(args);
            postern::admin::cli::run(Queue::parse_from(argv).args)
        }
        Command::Sendmail { args } => postern::sendmail::main(args),
        Command::Config {
            command: ConfigCommand::Check { file },
        } => match Config::load(&file)
            .and_then(|config| config.check_files().map(|()| config))
            .map_err(|err| err.to_string())
            .and_then(|config| check_key_files(&config).map(|()| config))
        {
            Ok(config) => {
                for warning in config.warnings() {
                    eprintln!("{}: warning: {warning}", file.display());
                }
                println!("{}: ok", file.display());
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("{err}");
                ExitCode::FAILURE
            }
        },
        Command::Serve {
            config,
            listen,
            data_dir,
            http,
            relayhost,
        } => {
            init_logging();
            let mut config = match config {
                Some(path) => match Config::load(&path) {
                    Ok(config) => config,
                    Err(err) => {
                        eprintln!("{err}");
                        return ExitCode::FAILURE;
                    }
                },
                None => Config::default(),
            };
            if let Some(listen) = listen {
                config.listeners[0].address = listen;
            }
            if let Some(data_dir) = data_dir {
                config.data_dir = data_dir;
            }
            if let Some(http) = http {
                config.http.listen = http;
            }
            if relayhost.is_some() {
                config.delivery.relayhost = relayhost;
            }
            if let Err(err) = config
                .validate()
                .and_then(|()| config.check_files())
                .map_err(|err| err.to_string())
                .and_then(|()| check_key_files(&config))
            {
                eprintln!("{err}");
                return ExitCode::FAILURE;
            }
            // One process-wide rustls provider: object_store's S3 client and our
            // STARTTLS must agree, or rustls panics choosing between two.
            let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
            limit_heap_arenas();
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(err) => {
                    eprintln!("cannot start the runtime: {err}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(postern::server::run(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    tracing::error!("{err:#}");
                    eprintln!("postern: {err:#}");
                    ExitCode::FAILURE
                }
            }
        }
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

/// Loads `[auth] password_file` (naming a line that holds a plaintext or
/// unknown hash) and the `[[dkim]]` keys, so the relay refuses them before
/// it starts.
fn check_key_files(config: &Config) -> Result<(), String> {
    if let Some(path) = &config.auth.password_file {
        postern::inbound::auth::passwords::PasswordFile::load(path)
            .map_err(|err| format!("auth.password_file: {err}"))?;
    }
    postern::dkim::DkimKeys::load(&config.dkim).map_err(|err| err.to_string())?;
    Ok(())
}
