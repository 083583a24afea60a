//! The message as sendmail reads it: lines from standard input (LF or CRLF,
//! ended by EOF or, without `-i`, by a line holding only `.`), split into
//! header fields and body, recipients extracted for `-t`, Bcc: removed, and
//! From:, Date: and Message-ID: added when missing. No I/O beyond the reader
//! it is handed.

use std::io::BufRead;

/// Why the message could not be taken in; both exit with EX_DATAERR (65).
#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    /// Standard input failed.
    #[error("cannot read the message: {0}")]
    Read(#[from] std::io::Error),
    /// A NUL octet, which no SMTP server takes.
    #[error("the message contains a NUL octet, which SMTP cannot carry")]
    Nul,
    /// More octets than the relay accepts (its configuration says how many).
    #[error("the message is larger than {limit} octets, the most the relay accepts")]
    TooLarge {
        /// The relay's `limits.max_message_size`.
        limit: u64,
    },
}

/// The longest line sent, without its CRLF (RFC 5321 §4.5.3.1.6).
pub const MAX_LINE: usize = 998;

/// Reads message lines without their line ends. Without `ignore_dots` a line
/// holding only `.` ends the message (and is not part of it). `limit` bounds
/// the size counted with CRLF line ends. A CR not followed by LF ends a line
/// too (the relay refuses bare CRs); a NUL octet is refused.
pub fn read_lines(
    mut input: impl BufRead,
    ignore_dots: bool,
    limit: Option<u64>,
) -> Result<Vec<Vec<u8>>, MessageError> {
    let mut lines = Vec::new();
    let mut size: u64 = 0;
    loop {
        let mut line = Vec::new();
        if input.read_until(b'\n', &mut line)? == 0 {
            break;
        }
        if line.last() == Some(&b'\n') {
            line.pop();
        }
        while line.last() == Some(&b'\r') {
            line.pop();
        }
        if line.contains(&0) {
            return Err(MessageError::Nul);
        }
        if !ignore_dots && line == b"." {
            break;
        }
        for piece in line.split(|&b| b == b'\r') {
            size += piece.len() as u64 + 2;
            if let Some(limit) = limit {
                if size > limit {
                    return Err(MessageError::TooLarge { limit });
                }
            }
            lines.push(piece.to_vec());
        }
    }
    Ok(lines)
}

/// One header field: its first line and any continuation lines, as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    lines: Vec<Vec<u8>>,
}

impl Field {
    /// A field from `Name: value` (one line; the caller keeps it free of CR/LF).
    pub fn new(name: &str, value: &str) -> Field {
        Field {
            lines: vec![format!("{name}: {value}").into_bytes()],
        }
    }

    /// The field name as written.
    pub fn name(&self) -> &[u8] {
        let first = &self.lines[0];
        let colon = first.iter().position(|&b| b == b':').unwrap_or(first.len());
        first[..colon].trim_ascii_end()
    }

    /// Whether the name is `name`, ignoring case.
    pub fn is(&self, name: &str) -> bool {
        self.name().eq_ignore_ascii_case(name.as_bytes())
    }

    /// The value unfolded (continuation lines joined), as text.
    pub fn value(&self) -> String {
        let first = &self.lines[0];
        let colon = first.iter().position(|&b| b == b':').map_or(0, |c| c + 1);
        let mut value = first[colon..].to_vec();
        for line in &self.lines[1..] {
            value.push(b' ');
            value.extend_from_slice(line.trim_ascii_start());
        }
        String::from_utf8_lossy(value.trim_ascii()).into_owned()
    }
}

/// A message split into header fields and body lines.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Message {
    /// Header fields in order.
    pub header: Vec<Field>,
    /// Body lines, without line ends.
    pub body: Vec<Vec<u8>>,
}

/// `Name:` at the start of a line: printable ASCII except `:`, then optional
/// blanks (RFC 5322's obsolete syntax allows them) before the colon.
fn starts_field(line: &[u8]) -> bool {
    let Some(colon) = line.iter().position(|&b| b == b':') else {
        return false;
    };
    let name = line[..colon].trim_ascii_end();
    !name.is_empty() && name.iter().all(|&b| (33..=126).contains(&b))
}

fn continues_field(line: &[u8]) -> bool {
    matches!(line.first(), Some(b' ' | b'\t'))
}

impl Message {
    /// Splits lines into header and body. The header ends at the first empty
    /// line; a line that is neither a field nor a continuation starts the
    /// body (the separator is supplied when the message is written). A
    /// leading mbox `From ` line is dropped, as Postfix does.
    pub fn parse(mut lines: Vec<Vec<u8>>) -> Message {
        if lines
            .first()
            .is_some_and(|first| first.starts_with(b"From "))
        {
            lines.remove(0);
        }
        let mut header: Vec<Field> = Vec::new();
        let mut rest = lines.into_iter().peekable();
        while let Some(line) = rest.peek() {
            if line.is_empty() {
                rest.next();
                break;
            }
            if continues_field(line) && !header.is_empty() {
                let line = rest.next().expect("peeked");
                header.last_mut().expect("checked").lines.push(line);
            } else if starts_field(line) {
                let line = rest.next().expect("peeked");
                header.push(Field { lines: vec![line] });
            } else {
                break;
            }
        }
        Message {
            header,
            body: rest.collect(),
        }
    }

    /// Whether a field named `name` is present.
    pub fn has(&self, name: &str) -> bool {
        self.header.iter().any(|field| field.is(name))
    }

    /// The addresses `-t` sends to: those of Resent-To:, Resent-Cc: and
    /// Resent-Bcc: when the message has any of them (it is being resent),
    /// else those of To:, Cc: and Bcc:. Every field of those names counts.
    pub fn recipients(&self) -> Vec<String> {
        let resent = ["Resent-To", "Resent-Cc", "Resent-Bcc"];
        let names: &[&str] = if resent.iter().any(|name| self.has(name)) {
            &resent
        } else {
            &["To", "Cc", "Bcc"]
        };
        self.header
            .iter()
            .filter(|field| names.iter().any(|name| field.is(name)))
            .flat_map(|field| parse_addresses(&field.value()))
            .collect()
    }

    /// Removes Bcc: and Resent-Bcc: with their continuation lines. Done
    /// whether or not `-t` was given, like sendmail and Postfix: MUAs (mutt
    /// with `write_bcc`) rely on it.
    pub fn remove_bcc(&mut self) {
        self.header
            .retain(|field| !field.is("Bcc") && !field.is("Resent-Bcc"));
    }

    /// Appends the fields the message lacks: From:, Date:, Message-ID:.
    pub fn complete(&mut self, defaults: &Defaults) {
        for (name, value) in [
            ("From", &defaults.from),
            ("Date", &defaults.date),
            ("Message-ID", &defaults.message_id),
        ] {
            if !self.has(name) {
                self.header.push(Field::new(name, value));
            }
        }
    }

    /// The message in wire form: CRLF line ends, the header, an empty line,
    /// the body; not dot-stuffed (the SMTP client does that).
    /// Lines longer than [`MAX_LINE`] are broken with CRLF and a space, as
    /// Postfix's smtp client does (in the header that makes a continuation).
    pub fn to_wire(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for line in self.header.iter().flat_map(|field| &field.lines) {
            push_line(&mut out, line);
        }
        out.extend_from_slice(b"\r\n");
        for line in &self.body {
            push_line(&mut out, line);
        }
        out
    }
}

/// Appends `line` and CRLF, broken into pieces of at most [`MAX_LINE`]
/// octets (each later piece starts with a space).
fn push_line(out: &mut Vec<u8>, line: &[u8]) {
    let mut rest = line;
    let mut first = true;
    loop {
        let room = if first { MAX_LINE } else { MAX_LINE - 1 };
        let (piece, tail) = rest.split_at(rest.len().min(room));
        if !first {
            out.push(b' ');
        }
        out.extend_from_slice(piece);
        out.extend_from_slice(b"\r\n");
        if tail.is_empty() {
            return;
        }
        rest = tail;
        first = false;
    }
}

/// Values for the fields [`Message::complete`] adds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Defaults {
    /// The From: value, see [`from_value`].
    pub from: String,
    /// The Date: value (RFC 5322 date-time).
    pub date: String,
    /// The Message-ID: value, angle brackets included.
    pub message_id: String,
}

/// The From: value for `address` and an optional full name:
/// `address` or `Name <address>`, the name quoted or RFC 2047-encoded as needed.
pub fn from_value(full_name: Option<&str>, address: &str) -> String {
    match full_name.map(str::trim).filter(|name| !name.is_empty()) {
        None => address.to_owned(),
        Some(name) => format!("{} <{address}>", display_name(name)),
    }
}

fn display_name(name: &str) -> String {
    if !name.is_ascii() {
        return encoded_words(name);
    }
    const SPECIALS: &[char] = &[
        '(', ')', '<', '>', '[', ']', ':', ';', '@', '\\', ',', '.', '"',
    ];
    if !name.contains(SPECIALS) {
        return name.to_owned();
    }
    let mut quoted = String::from("\"");
    for c in name.chars() {
        if c == '"' || c == '\\' {
            quoted.push('\\');
        }
        quoted.push(c);
    }
    quoted.push('"');
    quoted
}

/// RFC 2047 Q-encoded words, each at most 75 characters, split between
/// characters (never inside one).
fn encoded_words(text: &str) -> String {
    const PREFIX: &str = "=?UTF-8?Q?";
    const SUFFIX: &str = "?=";
    let mut words = Vec::new();
    let mut word = String::new();
    for c in text.chars() {
        let mut encoded = String::new();
        if c == ' ' {
            encoded.push('_');
        } else if c.is_ascii_alphanumeric() || "!*+-/".contains(c) {
            encoded.push(c);
        } else {
            let mut buf = [0u8; 4];
            for byte in c.encode_utf8(&mut buf).bytes() {
                encoded.push_str(&format!("={byte:02X}"));
            }
        }
        if PREFIX.len() + word.len() + encoded.len() + SUFFIX.len() > 75 {
            words.push(format!("{PREFIX}{word}{SUFFIX}"));
            word.clear();
        }
        word.push_str(&encoded);
    }
    words.push(format!("{PREFIX}{word}{SUFFIX}"));
    words.join(" ")
}

/// A Message-ID: value unique to this host: time, process and a sequence number.
pub fn message_id(
    now: chrono::DateTime<chrono::Utc>,
    pid: u32,
    sequence: u64,
    host: &str,
) -> String {
    format!(
        "<{}.{:09}.{pid}.{sequence}@{host}>",
        now.format("%Y%m%d%H%M%S"),
        now.timestamp_subsec_nanos()
    )
}

/// The addresses of an RFC 5322 address list: `a@x`, `Name <a@x>`,
/// `"Last, First" <a@x>`, `a@x (comment)`, groups `team: a@x, b@y;` and
/// `undisclosed-recipients:;`. Display names, comments and group names are
/// dropped; quoted local parts keep their quotes. Lenient: what cannot be an
/// address yields nothing rather than an error.
pub fn parse_addresses(value: &str) -> Vec<String> {
    let mut addresses = Vec::new();
    // The mailbox being read: its text outside angle brackets without
    // blanks (an addr-spec when no brackets come), and the bracketed part.
    let mut bare = String::new();
    let mut angle: Option<String> = None;
    let mut chars = value.chars().peekable();
    let finish = |bare: &mut String, angle: &mut Option<String>, out: &mut Vec<String>| {
        let address = match angle.take() {
            Some(inside) => strip_route(inside.trim()).to_owned(),
            None => std::mem::take(bare),
        };
        bare.clear();
        if !address.is_empty() {
            out.push(address);
        }
    };
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                let mut quoted = String::from('"');
                while let Some(c) = chars.next() {
                    quoted.push(c);
                    match c {
                        '\\' => quoted.extend(chars.next()),
                        '"' => break,
                        _ => {}
                    }
                }
                match &mut angle {
                    Some(inside) => inside.push_str(&quoted),
                    None => bare.push_str(&quoted),
                }
            }
            '(' => skip_comment(&mut chars),
            '<' => {
                let mut inside = String::new();
                while let Some(c) = chars.next() {
                    match c {
                        '>' => break,
                        '"' => {
                            inside.push(c);
                            while let Some(c) = chars.next() {
                                inside.push(c);
                                match c {
                                    '\\' => inside.extend(chars.next()),
                                    '"' => break,
                                    _ => {}
                                }
                            }
                        }
                        c if c.is_whitespace() => {}
                        c => inside.push(c),
                    }
                }
                angle = Some(inside);
            }
            // A group's name ends here; its members follow.
            ':' => bare.clear(),
            ',' | ';' => finish(&mut bare, &mut angle, &mut addresses),
            c if c.is_whitespace() => {}
            c => bare.push(c),
        }
    }
    finish(&mut bare, &mut angle, &mut addresses);
    addresses
}

/// Skips a comment whose `(` was just read; comments nest and `\` escapes.
fn skip_comment(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) {
    let mut depth = 1;
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                chars.next();
            }
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return;
                }
            }
            _ => {}
        }
    }
}

/// `@a,@b:user@c` → `user@c` (RFC 5322 obs-route).
fn strip_route(address: &str) -> &str {
    match address.strip_prefix('@') {
        Some(_) => address.split_once(':').map_or(address, |(_, rest)| rest),
        None => address,
    }
}

/// Why an address cannot go into `MAIL FROM:<…>` or `RCPT TO:<…>` as is.
pub fn check_address(address: &str) -> Result<(), &'static str> {
    if address.chars().any(char::is_control) {
        return Err("it contains a control character");
    }
    if address.contains(['<', '>']) {
        return Err("it contains < or >");
    }
    Ok(())
}

/// Removes repeated addresses, keeping the first; local parts compare
/// exactly, domains without regard to case.
pub fn dedup(addresses: Vec<String>) -> Vec<String> {
    let key = |address: &str| match address.rsplit_once('@') {
        Some((local, domain)) => format!("{local}@{}", domain.to_lowercase()),
        None => address.to_owned(),
    };
    let mut seen = std::collections::HashSet::new();
    addresses
        .into_iter()
        .filter(|address| seen.insert(key(address)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_carriage_returns_break_lines_and_nul_is_refused() {
        let lines = read_lines(&b"a\rb\r\nc\r\r\nd\n"[..], true, None).unwrap();
        assert_eq!(
            lines,
            vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec(), b"d".to_vec()]
        );
        assert!(matches!(
            read_lines(&b"ok\nnul\0here\n"[..], true, None),
            Err(MessageError::Nul)
        ));
    }

    #[test]
    fn long_lines_are_broken_with_a_space_as_postfix_does() {
        let long = vec![b'x'; 2500];
        let message = Message::parse(vec![b"Subject: s".to_vec(), Vec::new(), long]);
        let wire = message.to_wire();
        let body = &wire[b"Subject: s\r\n\r\n".len()..];
        let lines: Vec<&[u8]> = body
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .collect();
        assert_eq!(lines.len(), 3);
        assert!(lines.iter().all(|l| l.len() <= MAX_LINE + 1), "CR included");
        assert!(lines[1].starts_with(b" x") && lines[2].starts_with(b" x"));
        let joined: usize = lines.iter().map(|l| l.len() - 1).sum::<usize>() - 2;
        assert_eq!(joined, 2500, "no octet lost (two spaces added)");
    }

    fn lines(text: &str, ignore_dots: bool) -> Vec<Vec<u8>> {
        read_lines(text.as_bytes(), ignore_dots, None).unwrap()
    }

    fn message(text: &str) -> Message {
        Message::parse(lines(text, true))
    }

    fn defaults() -> Defaults {
        Defaults {
            from: "me".into(),
            date: "Thu, 1 Jan 2026 00:00:00 +0000".into(),
            message_id: "<1@host>".into(),
        }
    }

    #[test]
    fn a_lone_dot_ends_the_message_without_dash_i() {
        let text = "Subject: x\n\nbefore\n.\nafter\n";
        assert_eq!(
            lines(text, false),
            vec![b"Subject: x".to_vec(), vec![], b"before".to_vec()]
        );
        // CRLF input: the same.
        assert_eq!(lines("a\r\n.\r\nb\r\n", false), vec![b"a".to_vec()]);
        // ".." or ". " are not the end.
        assert_eq!(
            lines("..\n. \n", false),
            vec![b"..".to_vec(), b". ".to_vec()]
        );
    }

    #[test]
    fn with_dash_i_a_lone_dot_is_content() {
        let text = "Subject: x\n\nbefore\n.\nafter\n";
        let read = lines(text, true);
        assert_eq!(read.len(), 5);
        assert_eq!(read[3], b".");
        assert_eq!(read[4], b"after");
    }

    #[test]
    fn lf_and_crlf_become_crlf_and_a_last_line_without_newline_counts() {
        let wire = message("Subject: x\nA: b\r\n\r\nline one\nline two").to_wire();
        assert_eq!(wire, b"Subject: x\r\nA: b\r\n\r\nline one\r\nline two\r\n");
    }

    #[test]
    fn size_limit_counts_crlf_octets() {
        // "abcd" + CRLF = 6 octets.
        assert!(read_lines(&b"abcd\n"[..], true, Some(6)).is_ok());
        assert!(matches!(
            read_lines(&b"abcd\n"[..], true, Some(5)),
            Err(MessageError::TooLarge { limit: 5 })
        ));
    }

    #[test]
    fn header_and_body_split() {
        let msg = message("To: a@x\n folded@y\nSubject: hi\n\nBody: not a header\n");
        assert_eq!(msg.header.len(), 2);
        assert_eq!(msg.header[0].value(), "a@x folded@y");
        assert_eq!(msg.body, vec![b"Body: not a header".to_vec()]);
    }

    #[test]
    fn no_separator_all_header() {
        let msg = message("To: a@x\nSubject: only headers\n");
        assert_eq!(msg.header.len(), 2);
        assert!(msg.body.is_empty());
        assert_eq!(
            msg.to_wire(),
            b"To: a@x\r\nSubject: only headers\r\n\r\n".to_vec()
        );
    }

    #[test]
    fn no_separator_a_non_header_line_starts_the_body() {
        let msg = message("Subject: hi\nHello there,\nsee you.\n");
        assert_eq!(msg.header.len(), 1);
        assert_eq!(
            msg.to_wire(),
            b"Subject: hi\r\n\r\nHello there,\r\nsee you.\r\n".to_vec()
        );
        // No header at all: the first line is the body.
        let msg = message("just text\n");
        assert!(msg.header.is_empty());
        assert_eq!(msg.body, vec![b"just text".to_vec()]);
    }

    #[test]
    fn an_mbox_from_line_is_dropped() {
        let msg = message(
            "From 1a2b3c Mon Sep 17 00:00:00 2001\nFrom: A <a@x>\nSubject: patch\n\nbody\n",
        );
        assert_eq!(msg.header.len(), 2);
        assert!(msg.header[0].is("From"));
    }

    #[test]
    fn added_fields_only_when_missing() {
        let mut msg = message("Subject: x\n\nbody\n");
        msg.complete(&defaults());
        let wire = String::from_utf8(msg.to_wire()).unwrap();
        assert_eq!(
            wire,
            "Subject: x\r\nFrom: me\r\nDate: Thu, 1 Jan 2026 00:00:00 +0000\r\n\
             Message-ID: <1@host>\r\n\r\nbody\r\n"
        );
        let mut msg = message(
            "from: Someone <s@x>\nDATE: Mon, 2 Feb 2026 10:00:00 +0100\nMessage-Id: <k@x>\n\nbody\n",
        );
        let before = msg.clone();
        msg.complete(&defaults());
        assert_eq!(msg, before);
    }

    #[test]
    fn from_values() {
        assert_eq!(from_value(None, "joe"), "joe");
        assert_eq!(from_value(Some(""), "joe"), "joe");
        assert_eq!(from_value(Some("Joe User"), "joe"), "Joe User <joe>");
        assert_eq!(
            from_value(Some("User, Joe \"J\""), "joe@x"),
            "\"User, Joe \\\"J\\\"\" <joe@x>"
        );
        assert_eq!(
            from_value(Some("Jürgen Groß"), "j@x"),
            "=?UTF-8?Q?J=C3=BCrgen_Gro=C3=9F?= <j@x>"
        );
        let long = "é".repeat(40);
        let encoded = from_value(Some(&long), "j@x");
        for word in encoded.trim_end_matches(" <j@x>").split(' ') {
            assert!(word.len() <= 75, "{word}");
            assert!(word.starts_with("=?UTF-8?Q?") && word.ends_with("?="));
        }
    }

    #[test]
    fn message_ids_differ_by_sequence() {
        let now = chrono::DateTime::from_timestamp(1_767_225_600, 5).unwrap();
        let a = message_id(now, 42, 0, "host.example");
        let b = message_id(now, 42, 1, "host.example");
        assert_eq!(a, "<20260101000000.000000005.42.0@host.example>");
        assert_ne!(a, b);
    }

    #[test]
    fn address_lists() {
        assert_eq!(parse_addresses("a@x"), vec!["a@x"]);
        assert_eq!(
            parse_addresses("\"Doe, John\" <john@x.org>, jane@y.org (Jane, the <boss>)"),
            vec!["john@x.org", "jane@y.org"]
        );
        assert_eq!(
            parse_addresses("Team: a@x, \"B\" <b@y>;, c@z"),
            vec!["a@x", "b@y", "c@z"]
        );
        assert!(parse_addresses("undisclosed-recipients:;").is_empty());
        assert!(parse_addresses("<>").is_empty());
        assert_eq!(
            parse_addresses("\"john doe\"@x.org, <@relay.x:u@y.org>"),
            vec!["\"john doe\"@x.org", "u@y.org"]
        );
        assert_eq!(
            parse_addresses("Name (with (nested) comment) < a @ x >"),
            vec!["a@x"]
        );
        assert_eq!(parse_addresses("user"), vec!["user"]);
        assert_eq!(parse_addresses(" , ,a@x,"), vec!["a@x"]);
    }

    #[test]
    fn extraction_for_dash_t() {
        let msg = message(
            "From: me@x\n\
             To: \"Doe, John\" <john@x.org>,\n\
             \tjane@y.org\n\
             Cc: c1@z\n\
             Subject: To: not@this\n\
             cc: Group: g1@z, g2@z;\n\
             Bcc: hidden@h,\n  hidden2@h\n\
             X-Other: x@x\n\
             \n\
             To: body@no\n",
        );
        assert_eq!(
            msg.recipients(),
            vec![
                "john@x.org",
                "jane@y.org",
                "c1@z",
                "g1@z",
                "g2@z",
                "hidden@h",
                "hidden2@h"
            ]
        );
    }

    #[test]
    fn resent_fields_replace_the_originals() {
        let msg = message("To: old@x\nResent-To: new@y\nResent-Bcc: quiet@z\n\nbody\n");
        assert_eq!(msg.recipients(), vec!["new@y", "quiet@z"]);
    }

    #[test]
    fn bcc_is_removed_with_its_continuation_lines() {
        let mut msg = message(
            "To: a@x\nBcc: hidden@h,\n  hidden2@h\nSubject: s\nBCC: more@h\nResent-Bcc: r@h\n\nbody\n",
        );
        msg.remove_bcc();
        assert_eq!(
            msg.to_wire(),
            b"To: a@x\r\nSubject: s\r\n\r\nbody\r\n".to_vec()
        );
    }

    #[test]
    fn duplicates_compare_domains_without_case() {
        let list = vec![
            "a@Example.ORG".to_owned(),
            "a@example.org".to_owned(),
            "A@example.org".to_owned(),
            "b".to_owned(),
            "b".to_owned(),
        ];
        assert_eq!(dedup(list), vec!["a@Example.ORG", "A@example.org", "b"]);
    }

    #[test]
    fn addresses_that_would_break_a_command() {
        assert!(check_address("a@x").is_ok());
        assert!(check_address("\"odd name\"@x").is_ok());
        assert!(check_address("a@x\rRSET").is_err());
        assert!(check_address("a>b@x").is_err());
    }
}
