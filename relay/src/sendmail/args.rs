//! The sendmail command line, parsed the way sendmail and Postfix parse it:
//! single-letter options in getopt style (`-oi`, `-fuser`, `-f user`, `-ti`),
//! `--` ending the options, operands as recipients.
//!
//! Options may also follow operands (GNU getopt order), since scripts write
//! `sendmail rcpt -v`; a recipient that starts with `-` goes after `--`, as
//! bsd-mailx always does.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use crate::smtp::params::{Body, Notify, Ret};

/// The usage line printed with command-line errors and `--help`.
pub const USAGE: &str = "\
usage: sendmail [-i|-oi] [-t] [-f sender] [-F full-name] [-v] [-N dsn] [-R full|hdrs]
                [-V envid] [-B 8BITMIME|7BIT] [--data-dir DIR | --config FILE] [--] recipient...
       sendmail -bs          SMTP on standard input and output
       sendmail -bp          list the queue (postern queue list)
       sendmail -q[time]     deliver the queue now (postern queue flush)";

/// What the command was asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// `-bm` (the default): read a message and submit it.
    #[default]
    Deliver,
    /// `-bs`: speak SMTP on standard input and output.
    Smtp,
    /// `-bp` (and `mailq`): list the queue.
    ListQueue,
    /// `-q[time]`: attempt delivery of the whole queue now.
    FlushQueue,
    /// `-bi`, `-I` (and `newaliases`): Postern has no aliases file; nothing to do.
    InitAliases,
}

/// A parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    /// What to do.
    pub mode: Mode,
    /// Operands, as given: each may hold an address list (`a@x, B <b@y>`).
    pub recipients: Vec<String>,
    /// `-t`: add the To:, Cc: and Bcc: addresses of the message header.
    pub extract_recipients: bool,
    /// `-i`, `-oi`: a line holding only `.` does not end the message.
    pub ignore_dots: bool,
    /// `-f` / `-r`: the envelope sender as given (`""` and `"<>"` mean the null sender).
    pub sender: Option<String>,
    /// `-F`: the full name for a From: header the command adds.
    pub full_name: Option<String>,
    /// `-v`: print the SMTP dialog on standard error.
    pub verbose: bool,
    /// `-N`: NOTIFY= for every recipient.
    pub notify: Option<Vec<Notify>>,
    /// `-R`: RET=.
    pub ret: Option<Ret>,
    /// `-V`: ENVID=.
    pub envid: Option<String>,
    /// `-B`: BODY=.
    pub body: Option<Body>,
    /// `--data-dir DIR`: where the relay's sockets are.
    pub data_dir: Option<PathBuf>,
    /// `--config FILE` (or `-C FILE`): the relay's configuration file.
    pub config: Option<PathBuf>,
    /// `--help`.
    pub help: bool,
}

impl Default for Invocation {
    fn default() -> Self {
        Invocation {
            mode: Mode::Deliver,
            recipients: Vec::new(),
            extract_recipients: false,
            ignore_dots: false,
            sender: None,
            full_name: None,
            verbose: false,
            notify: None,
            ret: None,
            envid: None,
            body: None,
            data_dir: None,
            config: None,
            help: false,
        }
    }
}

/// Why a command line was refused; every one exits with EX_USAGE (64).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArgsError {
    /// An option sendmail does not have, or one Postern does not support.
    #[error("unknown option {0}")]
    UnknownOption(String),
    /// An option that takes a value came last.
    #[error("option {0} needs a value")]
    MissingValue(String),
    /// A value the option does not allow.
    #[error("bad value {value:?} for {option}: {expected}")]
    BadValue {
        /// The option, with its dash.
        option: String,
        /// What was given.
        value: String,
        /// What is allowed.
        expected: &'static str,
    },
    /// A `-b` mode Postern does not implement (`-bd`, `-bv`, ...).
    #[error("-b{0} is not supported: Postern's sendmail only submits (-bm), speaks SMTP (-bs) or lists the queue (-bp)")]
    UnsupportedMode(String),
    /// An argument that is not UTF-8 where text is needed.
    #[error("argument {0:?} is not valid UTF-8")]
    NotUtf8(String),
    /// A control character (CR, LF, NUL, ...) in an argument: it would end up
    /// in an SMTP command or a header line.
    #[error("argument {0:?} contains a control character")]
    ControlCharacter(String),
    /// Recipients given to a mode that sends nothing.
    #[error("{0} takes no recipients")]
    RecipientsNotAllowed(&'static str),
}

/// How one letter takes its value.
enum Arity {
    /// A flag: more letters may follow in the same word (`-ti`).
    Flag,
    /// The rest of the word, or else the next argument (`-fuser`, `-f user`).
    Required,
    /// Only the rest of the word, possibly empty (`-q`, `-q30m`).
    Attached,
}

fn arity(letter: char) -> Option<Arity> {
    Some(match letter {
        'i' | 't' | 'v' | 'm' | 'n' | 'G' | 'U' | 'I' => Arity::Flag,
        'f' | 'r' | 'F' | 'N' | 'R' | 'V' | 'B' | 'b' | 'o' | 'O' | 'h' | 'L' | 'C' | 'X' | 'p'
        | 'e' | 'M' | 'A' => Arity::Required,
        'q' | 'd' => Arity::Attached,
        _ => return None,
    })
}

/// Parses the arguments that follow the program name.
pub fn parse(args: &[OsString]) -> Result<Invocation, ArgsError> {
    let mut invocation = Invocation::default();
    let mut index = 0;
    let mut options_ended = false;
    while index < args.len() {
        let arg = &args[index];
        index += 1;
        let bytes = arg.as_bytes();
        if options_ended || bytes.len() < 2 || bytes[0] != b'-' {
            let operand = text(arg)?;
            if !operand.trim().is_empty() {
                invocation.recipients.push(operand);
            }
            continue;
        }
        if bytes == b"--" {
            options_ended = true;
            continue;
        }
        if let Some(long) = bytes.strip_prefix(b"--") {
            let (name, inline) = match long.iter().position(|&b| b == b'=') {
                Some(eq) => (&long[..eq], Some(OsStr::from_bytes(&long[eq + 1..]))),
                None => (long, None),
            };
            let name = String::from_utf8_lossy(name).into_owned();
            let mut value = || -> Result<OsString, ArgsError> {
                if let Some(inline) = inline {
                    return Ok(inline.to_owned());
                }
                let next = args
                    .get(index)
                    .ok_or_else(|| ArgsError::MissingValue(format!("--{name}")))?;
                index += 1;
                Ok(next.clone())
            };
            match name.as_str() {
                "data-dir" => invocation.data_dir = Some(PathBuf::from(value()?)),
                "config" => invocation.config = Some(PathBuf::from(value()?)),
                "help" if inline.is_none() => invocation.help = true,
                _ => return Err(ArgsError::UnknownOption(format!("--{name}"))),
            }
            continue;
        }
        let word = text(arg)?;
        for (at, letter) in word[1..].char_indices() {
            let option = format!("-{letter}");
            let rest = &word[1 + at + letter.len_utf8()..];
            let value = match arity(letter) {
                None => return Err(ArgsError::UnknownOption(option)),
                Some(Arity::Flag) => None,
                Some(Arity::Attached) => Some(rest.to_owned()),
                Some(Arity::Required) if !rest.is_empty() => Some(rest.to_owned()),
                Some(Arity::Required) => {
                    let next = args
                        .get(index)
                        .ok_or_else(|| ArgsError::MissingValue(option.clone()))?;
                    index += 1;
                    Some(text(next)?)
                }
            };
            apply(&mut invocation, letter, value)?;
            if !matches!(arity(letter), Some(Arity::Flag)) {
                break;
            }
        }
    }
    let takes_recipients = match invocation.mode {
        Mode::Deliver => None,
        Mode::Smtp => Some("-bs"),
        Mode::ListQueue => Some("-bp"),
        Mode::FlushQueue => Some("-q"),
        Mode::InitAliases => Some("-bi"),
    };
    if let Some(mode) = takes_recipients {
        if !invocation.recipients.is_empty() {
            return Err(ArgsError::RecipientsNotAllowed(mode));
        }
    }
    Ok(invocation)
}

/// An argument as text, refusing what cannot safely go on the wire.
fn text(arg: &OsStr) -> Result<String, ArgsError> {
    let text = arg
        .to_str()
        .ok_or_else(|| ArgsError::NotUtf8(arg.to_string_lossy().into_owned()))?;
    if text.chars().any(char::is_control) {
        return Err(ArgsError::ControlCharacter(text.to_owned()));
    }
    Ok(text.to_owned())
}

fn apply(
    invocation: &mut Invocation,
    letter: char,
    value: Option<String>,
) -> Result<(), ArgsError> {
    let value = value.unwrap_or_default();
    let bad = |expected: &'static str| ArgsError::BadValue {
        option: format!("-{letter}"),
        value: value.clone(),
        expected,
    };
    match letter {
        'i' => invocation.ignore_dots = true,
        't' => invocation.extract_recipients = true,
        'v' => invocation.verbose = true,
        // -m (also send to me: mailx passes it when `metoo` is set), -n (no
        // aliasing), -G (gateway submission), -U (initial user submission):
        // nothing for a relay client to do.
        'm' | 'n' | 'G' | 'U' => {}
        'I' => invocation.mode = Mode::InitAliases,
        'f' | 'r' => invocation.sender = Some(value),
        'F' => invocation.full_name = Some(value),
        'N' => invocation.notify = Some(parse_notify(&value).ok_or_else(|| bad(NOTIFY))?),
        'R' => {
            invocation.ret = Some(match value.to_ascii_lowercase().as_str() {
                "full" => Ret::Full,
                "hdrs" => Ret::Hdrs,
                _ => return Err(bad("full or hdrs")),
            })
        }
        'V' => {
            // RFC 3461 §4.4: at most 100 characters of printable US-ASCII.
            if value.is_empty() || value.len() > 100 || !value.bytes().all(|b| b.is_ascii_graphic())
            {
                return Err(bad("1 to 100 printable ASCII characters"));
            }
            invocation.envid = Some(value);
        }
        'B' => {
            invocation.body = Some(match value.to_ascii_uppercase().as_str() {
                "8BITMIME" => Body::EightBitMime,
                "7BIT" => Body::SevenBit,
                _ => return Err(bad("8BITMIME or 7BIT")),
            })
        }
        'b' => {
            invocation.mode = match value.as_str() {
                "m" => Mode::Deliver,
                "s" => Mode::Smtp,
                "p" => Mode::ListQueue,
                "i" => Mode::InitAliases,
                _ => return Err(ArgsError::UnsupportedMode(value)),
            }
        }
        // -oi is the one -o option that changes anything (Postfix looks at the
        // first letter too); -oem, -odi, -oQ/dir, -o7 and the rest are
        // sendmail.cf settings a relay client has no use for.
        'o' if value.starts_with('i') => invocation.ignore_dots = true,
        'q' => invocation.mode = Mode::FlushQueue,
        'C' => invocation.config = Some(PathBuf::from(value)),
        // -O option=value, -h hops, -L tag, -X logfile, -p protocol,
        // -e errormode, -M macro, -A m|c, -d debug: accepted and ignored.
        _ => {}
    }
    Ok(())
}

const NOTIFY: &str = "never, or a comma-separated list of success, failure and delay";

/// `-N`: `never`, or a comma list of `success`, `failure`, `delay`.
fn parse_notify(value: &str) -> Option<Vec<Notify>> {
    let mut list = Vec::new();
    for word in value.split(',') {
        let notify = match word.trim().to_ascii_lowercase().as_str() {
            "never" => Notify::Never,
            "success" => Notify::Success,
            "failure" => Notify::Failure,
            "delay" => Notify::Delay,
            _ => return None,
        };
        if !list.contains(&notify) {
            list.push(notify);
        }
    }
    if list.contains(&Notify::Never) && list.len() > 1 {
        return None;
    }
    Some(list)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(args: &[&str]) -> Result<Invocation, ArgsError> {
        let args: Vec<OsString> = args.iter().map(OsString::from).collect();
        parse(&args)
    }

    fn ok(args: &[&str]) -> Invocation {
        parse_str(args).unwrap()
    }

    #[test]
    fn recipients_and_the_default_mode() {
        let inv = ok(&["a@example.org", "b"]);
        assert_eq!(inv.mode, Mode::Deliver);
        assert_eq!(inv.recipients, vec!["a@example.org", "b"]);
        assert!(!inv.ignore_dots && !inv.extract_recipients && !inv.verbose);
        assert_eq!(inv.sender, None);
        assert_eq!(ok(&["-bm", "x"]).mode, Mode::Deliver);
    }

    #[test]
    fn dots_options() {
        assert!(ok(&["-i", "x"]).ignore_dots);
        assert!(ok(&["-oi", "x"]).ignore_dots);
        assert!(ok(&["-o", "i", "x"]).ignore_dots);
        // Other -o options are accepted and change nothing.
        let inv = ok(&["-oem", "-odi", "-oQ/var/spool/mqueue", "-o7", "x"]);
        assert!(!inv.ignore_dots);
        assert_eq!(inv.recipients, vec!["x"]);
    }

    #[test]
    fn sender_forms() {
        assert_eq!(ok(&["-f", "x", "r"]).sender.as_deref(), Some("x"));
        assert_eq!(ok(&["-fx", "r"]).sender.as_deref(), Some("x"));
        assert_eq!(ok(&["-r", "y@z", "r"]).sender.as_deref(), Some("y@z"));
        assert_eq!(ok(&["-f", "", "r"]).sender.as_deref(), Some(""));
        assert_eq!(ok(&["-f", "<>", "r"]).sender.as_deref(), Some("<>"));
        // The value of -f is taken whole, even when it starts with a dash.
        assert_eq!(ok(&["-f", "-odd", "r"]).sender.as_deref(), Some("-odd"));
        assert_eq!(
            parse_str(&["r", "-f"]),
            Err(ArgsError::MissingValue("-f".into()))
        );
    }

    #[test]
    fn full_name_keeps_spaces() {
        let inv = ok(&["-F", "A B", "r"]);
        assert_eq!(inv.full_name.as_deref(), Some("A B"));
        assert_eq!(inv.recipients, vec!["r"]);
        assert_eq!(ok(&["-FAda", "r"]).full_name.as_deref(), Some("Ada"));
    }

    #[test]
    fn extract_and_bundled_flags() {
        assert!(ok(&["-t"]).extract_recipients);
        let inv = ok(&["-ti"]);
        assert!(inv.extract_recipients && inv.ignore_dots);
        // A value-taking letter ends the bundle and takes the rest.
        let inv = ok(&["-itfme@x"]);
        assert!(inv.extract_recipients && inv.ignore_dots);
        assert_eq!(inv.sender.as_deref(), Some("me@x"));
    }

    #[test]
    fn double_dash_ends_options() {
        let inv = ok(&["-i", "--", "-notanoption", "b"]);
        assert!(inv.ignore_dots);
        assert_eq!(inv.recipients, vec!["-notanoption", "b"]);
        // Options after operands still count before `--`.
        let inv = ok(&["a", "-v"]);
        assert!(inv.verbose);
        assert_eq!(inv.recipients, vec!["a"]);
    }

    #[test]
    fn what_mailx_and_git_pass() {
        // bsd-mailx: sendmail -i [-m] [-v] [extra options] -- recipients.
        let inv = ok(&["-i", "-m", "-v", "--", "a@x", "b@y"]);
        assert!(inv.ignore_dots && inv.verbose);
        assert_eq!(inv.recipients, vec!["a@x", "b@y"]);
        // git send-email: [sendmail_options] [-f envelope] -i recipients.
        let inv = ok(&["-f", "me@x", "-i", "a@x", "b@y"]);
        assert_eq!(inv.sender.as_deref(), Some("me@x"));
        assert!(inv.ignore_dots);
    }

    #[test]
    fn modes() {
        assert_eq!(ok(&["-bp"]).mode, Mode::ListQueue);
        assert_eq!(ok(&["-b", "p"]).mode, Mode::ListQueue);
        assert_eq!(ok(&["-bs"]).mode, Mode::Smtp);
        assert_eq!(ok(&["-bi"]).mode, Mode::InitAliases);
        assert_eq!(ok(&["-I"]).mode, Mode::InitAliases);
        assert_eq!(ok(&["-q"]).mode, Mode::FlushQueue);
        assert_eq!(ok(&["-q30m"]).mode, Mode::FlushQueue);
        assert_eq!(ok(&["-q1h"]).mode, Mode::FlushQueue);
        assert_eq!(
            parse_str(&["-bd"]),
            Err(ArgsError::UnsupportedMode("d".into()))
        );
        assert_eq!(
            parse_str(&["-bp", "someone"]),
            Err(ArgsError::RecipientsNotAllowed("-bp"))
        );
        assert_eq!(
            parse_str(&["-bs", "someone"]),
            Err(ArgsError::RecipientsNotAllowed("-bs"))
        );
    }

    #[test]
    fn dsn_options() {
        let inv = ok(&["-N", "success,failure", "r"]);
        assert_eq!(inv.notify, Some(vec![Notify::Success, Notify::Failure]));
        assert_eq!(ok(&["-Nnever", "r"]).notify, Some(vec![Notify::Never]));
        assert_eq!(
            ok(&["-N", "Delay, FAILURE", "r"]).notify,
            Some(vec![Notify::Delay, Notify::Failure])
        );
        assert!(matches!(
            parse_str(&["-N", "never,success", "r"]),
            Err(ArgsError::BadValue { .. })
        ));
        assert!(matches!(
            parse_str(&["-N", "sometimes", "r"]),
            Err(ArgsError::BadValue { .. })
        ));
        assert_eq!(ok(&["-R", "hdrs", "r"]).ret, Some(Ret::Hdrs));
        assert_eq!(ok(&["-RFULL", "r"]).ret, Some(Ret::Full));
        assert!(parse_str(&["-R", "some", "r"]).is_err());
        assert_eq!(ok(&["-V", "id-1", "r"]).envid.as_deref(), Some("id-1"));
        assert!(parse_str(&["-V", "has space", "r"]).is_err());
        assert_eq!(ok(&["-B", "8bitmime", "r"]).body, Some(Body::EightBitMime));
        assert_eq!(ok(&["-B7BIT", "r"]).body, Some(Body::SevenBit));
        assert!(parse_str(&["-B", "binarymime", "r"]).is_err());
    }

    #[test]
    fn ignored_options() {
        let inv = ok(&[
            "-h",
            "17",
            "-L",
            "tag",
            "-n",
            "-U",
            "-G",
            "-m",
            "-Ofoo=bar",
            "-X",
            "/tmp/log",
            "-d0.1",
            "-e",
            "p",
            "-Am",
            "r",
        ]);
        assert_eq!(inv.recipients, vec!["r"]);
        assert_eq!(inv.mode, Mode::Deliver);
    }

    #[test]
    fn unknown_options_are_usage_errors() {
        assert_eq!(
            parse_str(&["-Z", "r"]),
            Err(ArgsError::UnknownOption("-Z".into()))
        );
        // The unknown letter is found inside a bundle too.
        assert_eq!(
            parse_str(&["-tz", "r"]),
            Err(ArgsError::UnknownOption("-z".into()))
        );
        assert_eq!(
            parse_str(&["--frobnicate"]),
            Err(ArgsError::UnknownOption("--frobnicate".into()))
        );
    }

    #[test]
    fn long_options_for_the_relay() {
        let inv = ok(&[
            "--data-dir",
            "/var/lib/postern",
            "r",
            "--config=/etc/p.toml",
        ]);
        assert_eq!(inv.data_dir, Some(PathBuf::from("/var/lib/postern")));
        assert_eq!(inv.config, Some(PathBuf::from("/etc/p.toml")));
        assert_eq!(
            ok(&["-C", "/x.toml", "r"]).config,
            Some(PathBuf::from("/x.toml"))
        );
        assert!(ok(&["--help"]).help);
        assert_eq!(
            parse_str(&["--data-dir"]),
            Err(ArgsError::MissingValue("--data-dir".into()))
        );
        // After `--` a long option is a recipient.
        assert_eq!(ok(&["--", "--config"]).recipients, vec!["--config"]);
    }

    #[test]
    fn control_characters_are_refused() {
        assert!(matches!(
            parse_str(&["a@x>\r\nRCPT TO:<b@y"]),
            Err(ArgsError::ControlCharacter(_))
        ));
        assert!(matches!(
            parse_str(&["-F", "A\nBcc: x@y", "r"]),
            Err(ArgsError::ControlCharacter(_))
        ));
    }
}
