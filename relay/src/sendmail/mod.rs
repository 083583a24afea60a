//! `postern sendmail` (also run as `sendmail`, `mailq` or `newaliases`
//! through a link): the classic sendmail command line as a plain SMTP client
//! of the relay's submission socket `<data_dir>/submit.sock`.
//!
//! The relay learns who is submitting from the socket's peer credentials
//! (`AUTH EXTERNAL =`), so this command needs no privileges and no
//! configuration of its own. Exit codes are sysexits.h's ([`exit`]); every
//! failure says on standard error whether the message was sent.

pub mod args;
pub mod client;
pub mod message;

use std::ffi::OsString;
use std::io::{self, BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::config::{Config, ConfigError};
use args::{Invocation, Mode, USAGE};
use client::{Envelope, SendError};
use message::{check_address, dedup, from_value, parse_addresses, read_lines, Defaults, Message};

/// Exit codes from sysexits.h, the contract between sendmail and its callers
/// (mailx, cron, git send-email, PHP's mail()).
pub mod exit {
    /// The command line is wrong.
    pub const USAGE: u8 = 64;
    /// The message cannot be read or is too large.
    pub const DATAERR: u8 = 65;
    /// Recipients were refused.
    pub const NOUSER: u8 = 67;
    /// A permanent refusal other than of recipients or of the sender.
    pub const UNAVAILABLE: u8 = 69;
    /// Postern's own fault.
    pub const SOFTWARE: u8 = 70;
    /// Try again later: the relay is down or answered 4xx.
    pub const TEMPFAIL: u8 = 75;
    /// The relay's answers are not SMTP.
    pub const PROTOCOL: u8 = 76;
    /// This user may not submit, or not with that sender.
    pub const NOPERM: u8 = 77;
}

/// The submission socket's name inside the data directory.
pub const SUBMIT_SOCKET: &str = "submit.sock";

/// The configuration file looked at when nothing else names the relay.
pub const SYSTEM_CONFIG: &str = "/etc/postern/postern.toml";

/// Where the relay is, and its configuration when a file told us.
#[derive(Debug, Clone)]
pub struct Location {
    /// The relay's data directory.
    pub data_dir: PathBuf,
    /// The configuration file the data directory came from, if any.
    pub config_file: Option<PathBuf>,
    /// That file's configuration (its size limit bounds what is read).
    pub config: Option<Config>,
}

impl Location {
    fn dir(data_dir: PathBuf) -> Location {
        Location {
            data_dir,
            config_file: None,
            config: None,
        }
    }

    fn file(path: &Path) -> Result<Location, ConfigError> {
        let config = Config::load(path)?;
        Ok(Location {
            data_dir: config.data_dir.clone(),
            config_file: Some(path.to_owned()),
            config: Some(config),
        })
    }

    /// `<data_dir>/submit.sock`.
    pub fn socket(&self) -> PathBuf {
        self.data_dir.join(SUBMIT_SOCKET)
    }
}

/// Finds the relay's data directory; the first of these wins: `--data-dir`,
/// `--config FILE` (its `data_dir`), `$POSTERN_DATA_DIR`, `$POSTERN_CONFIG`
/// (a file), `system_config` when it exists, else `./postern-data` as
/// `postern serve` uses without a file. `env` reads environment variables.
pub fn locate(
    data_dir: Option<&Path>,
    config: Option<&Path>,
    env: &dyn Fn(&str) -> Option<OsString>,
    system_config: &Path,
) -> Result<Location, ConfigError> {
    if let Some(dir) = data_dir {
        let mut location = match config {
            Some(file) => Location::file(file)?,
            None => Location::dir(PathBuf::new()),
        };
        location.data_dir = dir.to_owned();
        return Ok(location);
    }
    if let Some(file) = config {
        return Location::file(file);
    }
    let set = |name: &str| env(name).filter(|value| !value.is_empty());
    if let Some(dir) = set("POSTERN_DATA_DIR") {
        return Ok(Location::dir(PathBuf::from(dir)));
    }
    if let Some(file) = set("POSTERN_CONFIG") {
        return Location::file(Path::new(&file));
    }
    if system_config.exists() {
        return Location::file(system_config);
    }
    Ok(Location::dir(Config::default().data_dir))
}

/// The sendmail arguments when this process runs as sendmail: its file name
/// is `sendmail` (a link `/usr/sbin/sendmail -> postern`), `mailq` (as
/// `-bp`) or `newaliases` (as `-bi`), or its first argument is `sendmail`.
/// `None` for every other `postern` command line.
pub fn invoked_as_sendmail(argv: &[OsString]) -> Option<Vec<OsString>> {
    let name = argv
        .first()
        .and_then(|arg0| Path::new(arg0).file_name())
        .and_then(|name| name.to_str());
    let rest = argv.get(1..).unwrap_or_default();
    let with = |flag: &str| {
        let mut args = vec![OsString::from(flag)];
        args.extend_from_slice(rest);
        args
    };
    match name {
        Some("sendmail") => Some(rest.to_vec()),
        Some("mailq") => Some(with("-bp")),
        Some("newaliases") => Some(with("-bi")),
        _ if rest.first().is_some_and(|arg| arg == "sendmail") => Some(rest[1..].to_vec()),
        _ => None,
    }
}

/// The invoking user, from the password database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// Login name: the default envelope sender, which the relay qualifies.
    pub login: String,
    /// `$NAME`, else the GECOS full name: for an added From: header.
    pub full_name: Option<String>,
}

/// The user running this process (getuid, not the effective user).
pub fn current_user() -> Option<User> {
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    let entry = crate::users::by_uid(uid);
    let name_from_env = std::env::var("NAME")
        .ok()
        .filter(|name| !name.trim().is_empty() && !name.chars().any(char::is_control));
    let Some(entry) = entry else {
        // A uid without a passwd entry (containers): the login name the
        // environment gives is only a request; the relay decides from the uid.
        let login = std::env::var("LOGNAME")
            .or_else(|_| std::env::var("USER"))
            .ok()
            .filter(|login| !login.is_empty())?;
        return Some(User {
            login,
            full_name: name_from_env,
        });
    };
    let login = entry.name;
    let gecos = entry.gecos;
    let full_name = name_from_env.or_else(|| gecos.and_then(|gecos| gecos_name(&gecos, &login)));
    Some(User { login, full_name })
}

/// The full name in a GECOS field: its first comma-separated part, with `&`
/// standing for the capitalised login name (the BSD convention).
fn gecos_name(gecos: &str, login: &str) -> Option<String> {
    let name = gecos.split(',').next().unwrap_or_default().trim();
    if name.is_empty() || name.chars().any(char::is_control) {
        return None;
    }
    let mut capitalised = login.to_owned();
    if let Some(first) = capitalised.get_mut(..1) {
        first.make_ascii_uppercase();
    }
    Some(name.replace('&', &capitalised))
}

/// Runs the command for the arguments that follow `sendmail`.
pub fn main(args: Vec<OsString>) -> ExitCode {
    let invocation = match args::parse(&args) {
        Ok(invocation) => invocation,
        Err(err) => {
            eprintln!("sendmail: {err}");
            eprintln!("{USAGE}");
            return ExitCode::from(exit::USAGE);
        }
    };
    if invocation.help {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    if invocation.mode == Mode::InitAliases {
        // Postern has no aliases database; newaliases has nothing to rebuild.
        return ExitCode::SUCCESS;
    }
    let env = |name: &str| std::env::var_os(name);
    let location = match locate(
        invocation.data_dir.as_deref(),
        invocation.config.as_deref(),
        &env,
        Path::new(SYSTEM_CONFIG),
    ) {
        Ok(location) => location,
        Err(err) => {
            // EX_TEMPFAIL, as Postfix's sendmail does for configuration
            // trouble: the caller keeps the message and can try again.
            let fate = match invocation.mode {
                Mode::Deliver => "; the message was NOT sent",
                _ => "",
            };
            eprintln!("sendmail: cannot tell where the relay is: {err}{fate}");
            return ExitCode::from(exit::TEMPFAIL);
        }
    };
    let code = match invocation.mode {
        Mode::ListQueue => return run_queue(&location, "list"),
        Mode::FlushQueue => return run_queue(&location, "flush"),
        Mode::InitAliases => 0,
        Mode::Smtp => smtp(
            &invocation,
            &location,
            Box::new(io::stdin()),
            &mut io::stdout(),
            &mut io::stderr(),
        ),
        Mode::Deliver => deliver(
            &invocation,
            &location,
            current_user().as_ref(),
            io::stdin().lock(),
            &mut io::stderr(),
        ),
    };
    ExitCode::from(code)
}

/// `postern queue`'s command line for `-bp` (`list`) and `-q` (`flush`),
/// aimed at the relay this command found.
pub fn queue_args(location: &Location, command: &str) -> Vec<OsString> {
    let mut argv = vec![OsString::from("queue"), OsString::from(command)];
    if let Some(file) = &location.config_file {
        argv.push("--config".into());
        argv.push(file.into());
    }
    argv.push("--data-dir".into());
    argv.push(location.data_dir.clone().into());
    argv
}

#[derive(clap::Parser)]
struct QueueCommandLine {
    #[command(flatten)]
    args: crate::admin::cli::QueueArgs,
}

fn run_queue(location: &Location, command: &str) -> ExitCode {
    use clap::Parser;
    match QueueCommandLine::try_parse_from(queue_args(location, command)) {
        Ok(line) => crate::admin::cli::run(line.args),
        Err(err) => {
            eprintln!("sendmail: {err}");
            ExitCode::from(exit::SOFTWARE)
        }
    }
}

/// Numbers the Message-IDs this process makes, so two never repeat.
static MESSAGE_SEQUENCE: AtomicU64 = AtomicU64::new(0);

/// `-bm`: reads the message from `input`, submits it, reports on `errors`
/// (which also gets the `-v` dialog). Returns the exit code.
pub fn deliver(
    invocation: &Invocation,
    location: &Location,
    user: Option<&User>,
    input: impl BufRead,
    errors: &mut dyn Write,
) -> u8 {
    let mut fail = |code: u8, text: String| {
        let _ = writeln!(errors, "sendmail: {text}");
        code
    };
    let sender = match &invocation.sender {
        Some(raw) => match parse_sender(raw) {
            Ok(sender) => sender,
            Err(why) => return fail(exit::USAGE, format!("bad sender {raw:?}: {why}")),
        },
        None => match user {
            Some(user) => user.login.clone(),
            None => {
                return fail(
                    exit::NOUSER,
                    "cannot tell who you are (your uid has no passwd entry); give the \
                     sender with -f; the message was NOT sent"
                        .into(),
                )
            }
        },
    };
    let mut recipients = Vec::new();
    for operand in &invocation.recipients {
        for address in parse_addresses(operand) {
            if let Err(why) = check_address(&address) {
                return fail(exit::USAGE, format!("bad recipient {address:?}: {why}"));
            }
            recipients.push(address);
        }
    }
    if recipients.is_empty() && !invocation.extract_recipients {
        return fail(
            exit::USAGE,
            "no recipients: name them, or use -t to take them from the message header".into(),
        );
    }
    let limit = location
        .config
        .as_ref()
        .map(|config| config.limits.max_message_size);
    let lines = match read_lines(input, invocation.ignore_dots, limit) {
        Ok(lines) => lines,
        Err(err) => return fail(exit::DATAERR, format!("{err}; the message was NOT sent")),
    };
    let mut message = Message::parse(lines);
    if invocation.extract_recipients {
        for address in message.recipients() {
            if let Err(why) = check_address(&address) {
                return fail(
                    exit::DATAERR,
                    format!(
                        "bad address {address:?} in the header: {why}; the message was NOT sent"
                    ),
                );
            }
            recipients.push(address);
        }
    }
    message.remove_bcc();
    let recipients = dedup(recipients);
    if recipients.is_empty() {
        return fail(
            exit::USAGE,
            "no recipients: none given and none in the To:, Cc: or Bcc: header; the \
             message was NOT sent"
                .into(),
        );
    }
    // The relay names itself in its greeting; bare local parts (the default
    // sender is the login name) are qualified with that name, as Postfix's
    // sendmail appends $myorigin.
    let trace: Option<&mut dyn Write> = if invocation.verbose {
        Some(&mut *errors)
    } else {
        None
    };
    let result = client::connect(&location.socket()).and_then(|stream| {
        client::submit(stream, trace, |domain| {
            // The user's own name only goes with the user's own address.
            let (from_address, own_name) = match (&invocation.sender, user) {
                (None, Some(user)) => (user.login.clone(), user.full_name.as_deref()),
                (Some(_), _) if !sender.is_empty() => (sender.clone(), None),
                (_, Some(user)) => (user.login.clone(), None),
                (_, None) => ("MAILER-DAEMON".to_owned(), None),
            };
            let full_name = invocation.full_name.as_deref().or(own_name);
            message.complete(&Defaults {
                from: from_value(full_name, &qualify(&from_address, domain)),
                date: chrono::Local::now().to_rfc2822(),
                message_id: message::message_id(
                    chrono::Utc::now(),
                    std::process::id(),
                    MESSAGE_SEQUENCE.fetch_add(1, Ordering::Relaxed),
                    domain,
                ),
            });
            let envelope = Envelope {
                sender: qualify(&sender, domain),
                recipients: recipients.iter().map(|r| qualify(r, domain)).collect(),
                notify: invocation.notify.clone(),
                ret: invocation.ret,
                envid: invocation.envid.clone(),
                body: invocation.body,
            };
            (envelope, message.to_wire())
        })
    });
    let recipient_count = recipients.len();
    let mut say = |text: String| {
        let _ = writeln!(errors, "sendmail: {text}");
    };
    match result {
        Ok(outcome) if outcome.refused.is_empty() => 0,
        Ok(outcome) => {
            for refusal in &outcome.refused {
                say(refusal.to_string());
            }
            say(format!(
                "the message was sent to the other {} recipient(s) only",
                recipient_count - outcome.refused.len()
            ));
            // EX_NOUSER although others got it: the caller must learn that
            // some did not (mailx then keeps the message in dead.letter).
            exit::NOUSER
        }
        Err(err) => {
            if let SendError::NoRecipientAccepted { refused } = &err {
                for refusal in refused {
                    say(refusal.to_string());
                }
            }
            say(err.to_string());
            err.exit_code()
        }
    }
}

/// `address` with `@domain` added when it has no domain (empty stays empty:
/// the null sender).
fn qualify(address: &str, domain: &str) -> String {
    if address.is_empty() || address.contains('@') {
        address.to_owned()
    } else {
        format!("{address}@{domain}")
    }
}

/// The envelope sender from `-f`/`-r`: empty for the null sender (`''` or
/// `<>`), else the one address in the value (`a@x`, `<a@x>`, `Name <a@x>`).
fn parse_sender(raw: &str) -> Result<String, &'static str> {
    let raw = raw.trim();
    if raw.is_empty() || raw == "<>" {
        return Ok(String::new());
    }
    let mut addresses = parse_addresses(raw);
    if addresses.len() != 1 {
        return Err("not one address");
    }
    let address = addresses.remove(0);
    check_address(&address)?;
    Ok(address)
}

/// `-bs`: connects, authenticates, then lets the caller speak SMTP on
/// `input`/`output`. Returns the exit code.
pub fn smtp(
    invocation: &Invocation,
    location: &Location,
    input: Box<dyn Read + Send>,
    output: &mut dyn Write,
    errors: &mut dyn Write,
) -> u8 {
    let result = {
        let trace: Option<&mut dyn Write> = if invocation.verbose {
            Some(&mut *errors)
        } else {
            None
        };
        match client::connect(&location.socket()) {
            Ok(stream) => client::serve_stdio(stream, trace, input, &mut *output),
            Err(err) => {
                let _ = write!(output, "421 4.3.0 {err}\r\n");
                let _ = output.flush();
                Err(err)
            }
        }
    };
    match result {
        Ok(()) => 0,
        Err(err) => {
            let _ = writeln!(errors, "sendmail: {err}");
            err.exit_code()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::os::unix::net::UnixListener;

    fn os(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    #[test]
    fn dispatch_by_program_name_or_first_argument() {
        assert_eq!(
            invoked_as_sendmail(&os(&["/usr/sbin/sendmail", "-oi", "a@x"])),
            Some(os(&["-oi", "a@x"]))
        );
        assert_eq!(
            invoked_as_sendmail(&os(&["postern", "sendmail", "-bs"])),
            Some(os(&["-bs"]))
        );
        assert_eq!(
            invoked_as_sendmail(&os(&["/usr/bin/mailq"])),
            Some(os(&["-bp"]))
        );
        assert_eq!(
            invoked_as_sendmail(&os(&["newaliases"])),
            Some(os(&["-bi"]))
        );
        assert_eq!(invoked_as_sendmail(&os(&["postern", "serve"])), None);
        assert_eq!(invoked_as_sendmail(&os(&["postern"])), None);
        assert_eq!(invoked_as_sendmail(&[]), None);
        // Only the first argument selects sendmail.
        assert_eq!(
            invoked_as_sendmail(&os(&["postern", "queue", "sendmail"])),
            None
        );
    }

    fn locate_with(
        data_dir: Option<&Path>,
        config: Option<&Path>,
        vars: &[(&str, &str)],
        system: &Path,
    ) -> Result<Location, ConfigError> {
        let vars: HashMap<String, OsString> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        locate(data_dir, config, &|name| vars.get(name).cloned(), system)
    }

    #[test]
    fn the_first_source_of_the_data_directory_wins() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.toml");
        std::fs::write(
            &file,
            "data_dir = \"/from/file\"\n[limits]\nmax_message_size = 4096\n",
        )
        .unwrap();
        let system = dir.path().join("system.toml");
        std::fs::write(&system, "data_dir = \"/from/system\"\n").unwrap();
        let missing = dir.path().join("missing.toml");
        let env_file = file.to_str().unwrap();

        let at = |location: Location| location.data_dir;
        // --data-dir beats everything, --config's limits still count.
        let both = locate_with(
            Some(Path::new("/flag")),
            Some(&file),
            &[("POSTERN_DATA_DIR", "/env")],
            &system,
        )
        .unwrap();
        assert_eq!(both.data_dir, PathBuf::from("/flag"));
        assert_eq!(both.config.unwrap().limits.max_message_size, 4096);
        assert_eq!(
            at(locate_with(None, Some(&file), &[("POSTERN_DATA_DIR", "/env")], &system).unwrap()),
            PathBuf::from("/from/file")
        );
        assert_eq!(
            at(locate_with(
                None,
                None,
                &[("POSTERN_DATA_DIR", "/env"), ("POSTERN_CONFIG", env_file)],
                &system
            )
            .unwrap()),
            PathBuf::from("/env")
        );
        let from_env_file =
            locate_with(None, None, &[("POSTERN_CONFIG", env_file)], &system).unwrap();
        assert_eq!(from_env_file.data_dir, PathBuf::from("/from/file"));
        assert_eq!(from_env_file.config_file, Some(file.clone()));
        // Empty variables count as unset.
        assert_eq!(
            at(locate_with(None, None, &[("POSTERN_DATA_DIR", "")], &system).unwrap()),
            PathBuf::from("/from/system")
        );
        let default = locate_with(None, None, &[], &missing).unwrap();
        assert_eq!(default.data_dir, PathBuf::from("./postern-data"));
        assert!(default.config.is_none());
        assert_eq!(
            default.socket(),
            PathBuf::from("./postern-data/submit.sock")
        );
        // A named file that cannot be read is an error, not a fallback.
        assert!(locate_with(None, Some(&missing), &[], &system).is_err());
    }

    #[test]
    fn queue_commands_aim_at_the_located_relay() {
        use clap::Parser;
        let location = Location::dir(PathBuf::from("/var/lib/postern"));
        let argv = queue_args(&location, "list");
        assert_eq!(
            argv,
            os(&["queue", "list", "--data-dir", "/var/lib/postern"])
        );
        let line = QueueCommandLine::try_parse_from(argv).unwrap();
        assert_eq!(
            line.args.target().unwrap(),
            crate::admin::cli::Target::Unix(PathBuf::from("/var/lib/postern/admin.sock"))
        );
        assert!(QueueCommandLine::try_parse_from(queue_args(&location, "flush")).is_ok());
    }

    #[test]
    fn gecos_full_names() {
        assert_eq!(
            gecos_name("Joe User,,,", "joe").as_deref(),
            Some("Joe User")
        );
        assert_eq!(gecos_name("& Smith", "joe").as_deref(), Some("Joe Smith"));
        assert_eq!(gecos_name(",,,", "joe"), None);
        assert_eq!(gecos_name("", "joe"), None);
    }

    #[test]
    fn bare_local_parts_are_qualified_with_the_relays_name() {
        assert_eq!(qualify("joe", "relay.example"), "joe@relay.example");
        assert_eq!(qualify("joe@x", "relay.example"), "joe@x");
        assert_eq!(qualify("", "relay.example"), "");
    }

    #[test]
    fn null_and_bracketed_senders() {
        assert_eq!(parse_sender(""), Ok(String::new()));
        assert_eq!(parse_sender("<>"), Ok(String::new()));
        assert_eq!(parse_sender("<a@x>"), Ok("a@x".into()));
        assert_eq!(parse_sender("Joe <joe@x>"), Ok("joe@x".into()));
        assert_eq!(parse_sender("joe"), Ok("joe".into()));
        assert!(parse_sender("a@x, b@y").is_err());
    }

    /// A relay that accepts everything and hands back what it received.
    fn accepting_relay(dir: &Path) -> std::thread::JoinHandle<(Vec<String>, String)> {
        let listener = UnixListener::bind(dir.join(SUBMIT_SOCKET)).unwrap();
        std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut writer = stream.try_clone().unwrap();
            let mut reader = io::BufReader::new(stream);
            writer.write_all(b"220 relay.test ESMTP\r\n").unwrap();
            let (mut commands, mut data) = (Vec::new(), String::new());
            let mut in_data = false;
            let mut line = String::new();
            while reader.read_line(&mut line).unwrap() > 0 {
                if in_data {
                    if line == ".\r\n" {
                        in_data = false;
                        writer.write_all(b"250 2.0.0 queued\r\n").unwrap();
                    } else {
                        data.push_str(&line);
                    }
                } else {
                    commands.push(line.trim_end().to_owned());
                    let reply: &[u8] = match &line[..4] {
                        "EHLO" => b"250-relay\r\n250 AUTH EXTERNAL\r\n",
                        "AUTH" => b"235 2.7.0 ok\r\n",
                        "DATA" => {
                            in_data = true;
                            b"354 go\r\n"
                        }
                        "QUIT" => b"221 bye\r\n",
                        _ => b"250 2.1.0 ok\r\n",
                    };
                    writer.write_all(reply).unwrap();
                }
                line.clear();
            }
            (commands, data)
        })
    }

    fn user() -> User {
        User {
            login: "joe".into(),
            full_name: Some("Joe User".into()),
        }
    }

    #[test]
    fn dash_t_end_to_end() {
        let dir = tempfile::tempdir().unwrap();
        let relay = accepting_relay(dir.path());
        let location = Location::dir(dir.path().to_owned());
        let invocation = args::parse(&os(&["-t", "-i", "extra@x", "Ann@Example.org"])).unwrap();
        let input = "To: \"Doe, Ann\" <Ann@example.ORG>, bob@y\n\
                     Bcc: secret@z,\n  secret2@z\n\
                     Subject: hi\n\n.dot line\n.\nmore\n";
        let mut errors = Vec::new();
        let code = deliver(
            &invocation,
            &location,
            Some(&user()),
            input.as_bytes(),
            &mut errors,
        );
        assert_eq!(code, 0, "{}", String::from_utf8_lossy(&errors));
        let (commands, data) = relay.join().unwrap();
        let rcpts: Vec<&str> = commands
            .iter()
            .filter(|c| c.starts_with("RCPT"))
            .map(String::as_str)
            .collect();
        assert_eq!(
            rcpts,
            vec![
                "RCPT TO:<extra@x>",
                "RCPT TO:<Ann@Example.org>",
                "RCPT TO:<bob@y>",
                "RCPT TO:<secret@z>",
                "RCPT TO:<secret2@z>",
            ]
        );
        // The bare login is qualified with the name in the relay's greeting.
        assert!(commands
            .iter()
            .any(|c| c.starts_with("MAIL FROM:<joe@relay.test>")));
        assert!(!data.contains("secret"), "{data}");
        assert!(
            data.contains("\r\nFrom: Joe User <joe@relay.test>\r\n"),
            "{data}"
        );
        assert!(data.contains("\r\nDate: "), "{data}");
        assert!(data.contains("@relay.test>\r\n"), "Message-ID: {data}");
        // -i: the lone dot is content, dot-stuffed on the wire.
        assert!(data.ends_with("\r\n..dot line\r\n..\r\nmore\r\n"), "{data}");
    }

    #[test]
    fn no_recipients_is_a_usage_error_before_reading() {
        let location = Location::dir(PathBuf::from("/nonexistent"));
        let mut errors = Vec::new();
        let invocation = args::parse(&[]).unwrap();
        // A reader that fails proves nothing was read.
        struct Unreadable;
        impl Read for Unreadable {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::other("must not be read"))
            }
        }
        let code = deliver(
            &invocation,
            &location,
            Some(&user()),
            io::BufReader::new(Unreadable),
            &mut errors,
        );
        assert_eq!(code, exit::USAGE);
        assert!(String::from_utf8_lossy(&errors).contains("no recipients"));
        // -t with a header naming nobody: also 64.
        let invocation = args::parse(&os(&["-t"])).unwrap();
        let mut errors = Vec::new();
        let code = deliver(
            &invocation,
            &location,
            Some(&user()),
            &b"To: undisclosed-recipients:;\n\nhi\n"[..],
            &mut errors,
        );
        assert_eq!(code, exit::USAGE);
    }

    #[test]
    fn relay_down_exits_75_and_says_not_sent() {
        let dir = tempfile::tempdir().unwrap();
        let location = Location::dir(dir.path().to_owned());
        let invocation = args::parse(&os(&["a@x"])).unwrap();
        let mut errors = Vec::new();
        let code = deliver(
            &invocation,
            &location,
            Some(&user()),
            &b"hi\n"[..],
            &mut errors,
        );
        assert_eq!(code, exit::TEMPFAIL);
        let errors = String::from_utf8(errors).unwrap();
        assert!(
            errors.starts_with("sendmail: the relay is not reachable at "),
            "{errors}"
        );
        assert!(errors.contains("submit.sock"), "{errors}");
        assert!(
            errors.trim_end().ends_with("the message was NOT sent"),
            "{errors}"
        );
    }

    #[test]
    fn oversized_for_the_configured_limit_is_a_data_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.toml");
        std::fs::write(&file, "[limits]\nmax_message_size = 1024\n").unwrap();
        let mut location = Location::file(&file).unwrap();
        location.data_dir = dir.path().to_owned();
        let invocation = args::parse(&os(&["a@x"])).unwrap();
        let big = "x".repeat(2000);
        let mut errors = Vec::new();
        let code = deliver(
            &invocation,
            &location,
            Some(&user()),
            big.as_bytes(),
            &mut errors,
        );
        assert_eq!(code, exit::DATAERR);
        assert!(String::from_utf8_lossy(&errors).contains("1024"));
    }

    #[test]
    fn dash_bs_with_the_relay_down_answers_421() {
        let dir = tempfile::tempdir().unwrap();
        let location = Location::dir(dir.path().to_owned());
        let invocation = args::parse(&os(&["-bs"])).unwrap();
        let (mut output, mut errors) = (Vec::new(), Vec::new());
        let code = smtp(
            &invocation,
            &location,
            Box::new(io::empty()),
            &mut output,
            &mut errors,
        );
        assert_eq!(code, exit::TEMPFAIL);
        assert!(output.starts_with(b"421 4.3.0 the relay is not reachable"));
    }
}
