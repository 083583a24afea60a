//! Parsing one SMTP command line (CRLF already removed) into a `Command`.

/// RFC 5321 §4.5.3.1.4: the longest command line, CRLF included.
pub const MAX_COMMAND_LINE: usize = 512;
/// MAIL and RCPT may be longer by what their extensions add (SIZE 26,
/// RET/ENVID 108, SMTPUTF8 and BODY 24; ORCPT/NOTIFY 530, RFC 1870 and 3461).
pub const MAX_MAIL_LINE: usize = MAX_COMMAND_LINE + 26 + 108 + 24;
/// See `MAX_MAIL_LINE`.
pub const MAX_RCPT_LINE: usize = MAX_COMMAND_LINE + 530;
/// RFC 4954 §4: AUTH lines (the command with an initial response, and the
/// responses after 334) may be up to 12288 octets, CRLF included.
pub const MAX_AUTH_LINE: usize = 12288;
/// Longest line the parser will buffer before refusing it.
pub const MAX_ANY_LINE: usize = MAX_AUTH_LINE;

/// A parsed SMTP command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// EHLO domain.
    Ehlo(String),
    /// HELO domain.
    Helo(String),
    /// MAIL FROM: the text after the colon.
    Mail(String),
    /// RCPT TO: the text after the colon.
    Rcpt(String),
    /// DATA.
    Data,
    /// BDAT size [LAST] (RFC 3030).
    Bdat {
        /// Octets that follow the command line.
        size: u64,
        /// Whether this is the last chunk.
        last: bool,
    },
    /// RSET.
    Rset,
    /// NOOP (arguments ignored).
    Noop,
    /// QUIT.
    Quit,
    /// VRFY.
    Vrfy,
    /// EXPN.
    Expn,
    /// HELP (arguments ignored).
    Help,
    /// STARTTLS.
    StartTls,
    /// AUTH with its arguments (mechanism and optional initial response).
    Auth(String),
}

/// Why a command line was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// The verb is not known (500 5.5.2).
    #[error("command unrecognized")]
    Unrecognized,
    /// The verb is known but its arguments are wrong (501 5.5.4).
    #[error("syntax error in parameters: {0}")]
    Syntax(&'static str),
    /// The line is longer than its verb allows (500 5.5.6).
    #[error("command line too long")]
    TooLong,
}

/// Parses one command line; `line` excludes the CRLF. `line_len` limits are
/// checked per verb with the CRLF counted.
pub fn parse(line: &[u8]) -> Result<Command, CommandError> {
    if line.contains(&0) {
        return Err(CommandError::Syntax("NUL octet in command"));
    }
    let text =
        std::str::from_utf8(line).map_err(|_| CommandError::Syntax("command is not UTF-8"))?;
    let (verb, args) = match text.find(' ') {
        Some(at) => (&text[..at], &text[at + 1..]),
        None => (text, ""),
    };
    let verb = verb.to_ascii_uppercase();
    let wire_len = line.len() + 2;
    let limit = match verb.as_str() {
        "MAIL" => MAX_MAIL_LINE,
        "RCPT" => MAX_RCPT_LINE,
        "AUTH" => MAX_AUTH_LINE,
        _ => MAX_COMMAND_LINE,
    };
    if wire_len > limit {
        return Err(CommandError::TooLong);
    }
    let no_args = |command: Command| {
        if args.trim().is_empty() {
            Ok(command)
        } else {
            Err(CommandError::Syntax("no parameters allowed"))
        }
    };
    match verb.as_str() {
        "EHLO" | "HELO" => {
            let domain = args.trim();
            if domain.is_empty() || domain.contains(' ') {
                return Err(CommandError::Syntax(
                    "EHLO/HELO need one domain or address literal",
                ));
            }
            Ok(if verb == "EHLO" {
                Command::Ehlo(domain.to_owned())
            } else {
                Command::Helo(domain.to_owned())
            })
        }
        "MAIL" => {
            strip_keyword(args, "FROM:").map(|rest| Command::Mail(rest.trim_end().to_owned()))
        }
        "RCPT" => strip_keyword(args, "TO:").map(|rest| Command::Rcpt(rest.trim_end().to_owned())),
        "DATA" => no_args(Command::Data),
        "BDAT" => parse_bdat(args),
        "RSET" => no_args(Command::Rset),
        "NOOP" => Ok(Command::Noop),
        "QUIT" => no_args(Command::Quit),
        "VRFY" => Ok(Command::Vrfy),
        "EXPN" => Ok(Command::Expn),
        "HELP" => Ok(Command::Help),
        "STARTTLS" => no_args(Command::StartTls),
        "AUTH" => Ok(Command::Auth(args.trim().to_owned())),
        _ => Err(CommandError::Unrecognized),
    }
}

fn strip_keyword<'a>(args: &'a str, keyword: &str) -> Result<&'a str, CommandError> {
    let head = args.get(..keyword.len()).ok_or(CommandError::Syntax(
        "expected FROM:<address> or TO:<address>",
    ))?;
    if !head.eq_ignore_ascii_case(keyword) {
        return Err(CommandError::Syntax(
            "expected FROM:<address> or TO:<address>",
        ));
    }
    // Tolerate the common `MAIL FROM: <a@b>` with a space, as Postfix does.
    Ok(args[keyword.len()..].trim_start_matches(' '))
}

fn parse_bdat(args: &str) -> Result<Command, CommandError> {
    let mut words = args.split(' ').filter(|w| !w.is_empty());
    let size = words
        .next()
        .ok_or(CommandError::Syntax("BDAT needs a chunk size"))?;
    if size.len() > 19 || !size.bytes().all(|b| b.is_ascii_digit()) {
        return Err(CommandError::Syntax("BDAT chunk size must be a number"));
    }
    let size = size
        .parse()
        .map_err(|_| CommandError::Syntax("BDAT chunk size must be a number"))?;
    let last = match words.next() {
        None => false,
        Some(word) if word.eq_ignore_ascii_case("LAST") => true,
        Some(_) => return Err(CommandError::Syntax("BDAT takes only LAST after the size")),
    };
    if words.next().is_some() {
        return Err(CommandError::Syntax("BDAT takes only LAST after the size"));
    }
    Ok(Command::Bdat { size, last })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verbs_are_case_insensitive() {
        assert_eq!(
            parse(b"ehlo x.example"),
            Ok(Command::Ehlo("x.example".into()))
        );
        assert_eq!(
            parse(b"mail from:<a@b> SIZE=1"),
            Ok(Command::Mail("<a@b> SIZE=1".into()))
        );
        assert_eq!(parse(b"RCPT TO: <a@b>"), Ok(Command::Rcpt("<a@b>".into())));
        assert_eq!(
            parse(b"BDAT 10 last"),
            Ok(Command::Bdat {
                size: 10,
                last: true
            })
        );
    }

    #[test]
    fn refusals() {
        assert_eq!(parse(b"FOO"), Err(CommandError::Unrecognized));
        assert!(matches!(parse(b"DATA x"), Err(CommandError::Syntax(_))));
        assert!(matches!(parse(b"BDAT x"), Err(CommandError::Syntax(_))));
        assert!(matches!(parse(b"EHLO"), Err(CommandError::Syntax(_))));
        assert!(matches!(parse(b"NOOP \0"), Err(CommandError::Syntax(_))));
        let long = format!("NOOP {}", "x".repeat(510));
        assert_eq!(parse(long.as_bytes()), Err(CommandError::TooLong));
    }
}
