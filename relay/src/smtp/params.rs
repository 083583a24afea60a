//! MAIL FROM and RCPT TO: paths and ESMTP parameters (RFC 5321, 1870, 6152, 6531, 3461).
//!
//! Parsing is strict: unknown parameters, duplicates and malformed values are
//! errors the session turns into 555 5.5.4 or 501 5.5.4 replies.

use serde::{Deserialize, Serialize};

/// RFC 5321 §4.5.3.1.1: the longest local part.
pub const MAX_LOCAL_PART: usize = 64;
/// RFC 5321 §4.5.3.1.2: the longest domain.
pub const MAX_DOMAIN: usize = 255;
/// RFC 5321 §4.5.3.1.3: the longest path, angle brackets included.
pub const MAX_PATH: usize = 256;

/// A mailbox `local@domain` as given on the wire (the local part may be quoted).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mailbox {
    /// The local part exactly as sent (quotes kept).
    pub local: String,
    /// The domain or address literal.
    pub domain: String,
}

impl Mailbox {
    /// Parses `local@domain` (no angle brackets), as configuration names a
    /// mailbox; the syntax and length rules of RCPT TO apply, non-ASCII allowed.
    pub fn parse(text: &str) -> Result<Mailbox, ParamError> {
        parse_mailbox(text, true)
    }

    /// `local@domain`, or the bare local part for `<Postmaster>` without a
    /// domain (RFC 5321 §4.1.1.3).
    pub fn address(&self) -> String {
        if self.domain.is_empty() {
            return self.local.clone();
        }
        format!("{}@{}", self.local, self.domain)
    }

    /// Whether the local part is `postmaster`, which RFC 5321 §4.5.1 says
    /// is compared without regard to case.
    pub fn is_postmaster(&self) -> bool {
        self.local.eq_ignore_ascii_case("postmaster")
    }

    /// The domain in lower case, for policy lookups.
    pub fn domain_lowercase(&self) -> String {
        self.domain.to_ascii_lowercase()
    }
}

/// BODY= (RFC 6152, RFC 3030).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Body {
    /// 7-bit US-ASCII.
    #[serde(rename = "7BIT")]
    SevenBit,
    /// 8BITMIME.
    #[serde(rename = "8BITMIME")]
    EightBitMime,
}

/// RET= (RFC 3461): what a DSN should carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Ret {
    /// The whole message.
    Full,
    /// Only the headers.
    Hdrs,
}

/// Parameters of MAIL FROM.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MailParams {
    /// SIZE= declared by the client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// BODY=.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<Body>,
    /// SMTPUTF8 given.
    #[serde(default)]
    pub smtputf8: bool,
    /// RET=.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ret: Option<Ret>,
    /// ENVID= (xtext-decoded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envid: Option<String>,
}

/// NOTIFY= values (RFC 3461 §4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Notify {
    /// NEVER (alone).
    Never,
    /// SUCCESS.
    Success,
    /// FAILURE.
    Failure,
    /// DELAY.
    Delay,
}

impl Notify {
    /// The keyword as it goes on the wire.
    pub fn keyword(self) -> &'static str {
        match self {
            Notify::Never => "NEVER",
            Notify::Success => "SUCCESS",
            Notify::Failure => "FAILURE",
            Notify::Delay => "DELAY",
        }
    }
}

/// Parameters of RCPT TO.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RcptParams {
    /// NOTIFY=; `None` when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify: Option<Vec<Notify>>,
    /// ORCPT= as `addr-type;address` (xtext-decoded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub orcpt: Option<String>,
}

/// Why a path or parameter was refused; the session maps each to a reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParamError {
    /// The path is not `<...>` or its syntax is wrong.
    #[error("syntax error in address")]
    BadPath,
    /// Local part longer than 64 octets.
    #[error("local part longer than 64 octets")]
    LocalPartTooLong,
    /// Domain longer than 255 octets.
    #[error("domain longer than 255 octets")]
    DomainTooLong,
    /// Non-ASCII address without SMTPUTF8.
    #[error("non-ASCII address needs SMTPUTF8")]
    NeedsSmtpUtf8,
    /// A parameter this server does not know.
    #[error("unknown parameter {0}")]
    Unknown(String),
    /// A known parameter with a bad or repeated value.
    #[error("invalid value for {0}")]
    BadValue(String),
}

/// Parses `<path>` and parameters of MAIL FROM (the text after `MAIL FROM:`).
/// Returns `None` as the mailbox for the null reverse path `<>`.
pub fn parse_mail(args: &str) -> Result<(Option<Mailbox>, MailParams), ParamError> {
    let (path, rest) = split_path(args)?;
    let mut params = MailParams::default();
    let mut seen = Vec::new();
    for (key, value) in split_params(rest)? {
        if seen.contains(&key) {
            return Err(ParamError::BadValue(key));
        }
        seen.push(key.clone());
        match key.as_str() {
            "SIZE" => {
                let value = value.ok_or_else(|| ParamError::BadValue(key.clone()))?;
                if value.is_empty()
                    || value.len() > 20
                    || !value.bytes().all(|b| b.is_ascii_digit())
                {
                    return Err(ParamError::BadValue(key));
                }
                params.size = Some(value.parse().map_err(|_| ParamError::BadValue(key))?);
            }
            "BODY" => {
                params.body = Some(match value.map(|v| v.to_ascii_uppercase()).as_deref() {
                    Some("7BIT") => Body::SevenBit,
                    Some("8BITMIME") => Body::EightBitMime,
                    _ => return Err(ParamError::BadValue(key)),
                });
            }
            "SMTPUTF8" => {
                if value.is_some() {
                    return Err(ParamError::BadValue(key));
                }
                params.smtputf8 = true;
            }
            "RET" => {
                params.ret = Some(match value.map(|v| v.to_ascii_uppercase()).as_deref() {
                    Some("FULL") => Ret::Full,
                    Some("HDRS") => Ret::Hdrs,
                    _ => return Err(ParamError::BadValue(key)),
                });
            }
            "ENVID" => {
                let value = value.ok_or_else(|| ParamError::BadValue(key.clone()))?;
                let decoded =
                    decode_xtext(&value).ok_or_else(|| ParamError::BadValue(key.clone()))?;
                if decoded.is_empty() || decoded.len() > 100 {
                    return Err(ParamError::BadValue(key));
                }
                params.envid = Some(decoded);
            }
            _ => return Err(ParamError::Unknown(key)),
        }
    }
    let mailbox = match path {
        None => None,
        Some(text) => Some(parse_mailbox(&text, params.smtputf8)?),
    };
    Ok((mailbox, params))
}

/// Parses `<path>` and parameters of RCPT TO (the text after `RCPT TO:`).
/// `smtputf8` says whether the transaction's MAIL FROM carried SMTPUTF8.
pub fn parse_rcpt(args: &str, smtputf8: bool) -> Result<(Mailbox, RcptParams), ParamError> {
    let (path, rest) = split_path(args)?;
    let path = path.ok_or(ParamError::BadPath)?;
    // RFC 5321 §4.1.1.3: `<Postmaster>` without a domain is accepted.
    let mailbox = if path.eq_ignore_ascii_case("postmaster") {
        Mailbox {
            local: path,
            domain: String::new(),
        }
    } else {
        parse_mailbox(&path, smtputf8)?
    };
    let mut params = RcptParams::default();
    let mut seen = Vec::new();
    for (key, value) in split_params(rest)? {
        if seen.contains(&key) {
            return Err(ParamError::BadValue(key));
        }
        seen.push(key.clone());
        match key.as_str() {
            "NOTIFY" => {
                let value = value.ok_or_else(|| ParamError::BadValue(key.clone()))?;
                let mut list = Vec::new();
                for item in value.split(',') {
                    let notify = match item.to_ascii_uppercase().as_str() {
                        "NEVER" => Notify::Never,
                        "SUCCESS" => Notify::Success,
                        "FAILURE" => Notify::Failure,
                        "DELAY" => Notify::Delay,
                        _ => return Err(ParamError::BadValue(key)),
                    };
                    if list.contains(&notify) {
                        return Err(ParamError::BadValue(key));
                    }
                    list.push(notify);
                }
                if list.contains(&Notify::Never) && list.len() > 1 {
                    return Err(ParamError::BadValue(key));
                }
                params.notify = Some(list);
            }
            "ORCPT" => {
                let value = value.ok_or_else(|| ParamError::BadValue(key.clone()))?;
                let (addr_type, addr) = value
                    .split_once(';')
                    .ok_or_else(|| ParamError::BadValue(key.clone()))?;
                if addr_type.is_empty()
                    || addr.is_empty()
                    || !addr_type
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                {
                    return Err(ParamError::BadValue(key));
                }
                let decoded =
                    decode_xtext(addr).ok_or_else(|| ParamError::BadValue(key.clone()))?;
                if decoded.len() > 500 {
                    return Err(ParamError::BadValue(key));
                }
                params.orcpt = Some(format!("{addr_type};{decoded}"));
            }
            _ => return Err(ParamError::Unknown(key)),
        }
    }
    Ok((mailbox, params))
}

/// Splits `<path> params` into the path (without brackets, `None` for `<>`)
/// and the parameter text. A source route (`<@a,@b:x@y>`) is accepted and dropped.
fn split_path(args: &str) -> Result<(Option<String>, &str), ParamError> {
    let args = args.trim_start_matches(' ');
    if !args.starts_with('<') {
        return Err(ParamError::BadPath);
    }
    // Find the closing bracket outside a quoted string.
    let bytes = args.as_bytes();
    let mut in_quote = false;
    let mut escaped = false;
    let mut end = None;
    for (index, &byte) in bytes.iter().enumerate().skip(1) {
        if escaped {
            escaped = false;
            continue;
        }
        match byte {
            b'\\' if in_quote => escaped = true,
            b'"' => in_quote = !in_quote,
            b'>' if !in_quote => {
                end = Some(index);
                break;
            }
            b'<' if !in_quote => return Err(ParamError::BadPath),
            _ => {}
        }
    }
    let end = end.ok_or(ParamError::BadPath)?;
    if end + 1 > MAX_PATH {
        return Err(
            if args[1..end]
                .rsplit_once('@')
                .is_some_and(|(l, _)| l.len() > MAX_LOCAL_PART)
            {
                ParamError::LocalPartTooLong
            } else {
                ParamError::DomainTooLong
            },
        );
    }
    let mut inner = &args[1..end];
    let rest = &args[end + 1..];
    if !rest.is_empty() && !rest.starts_with(' ') {
        return Err(ParamError::BadPath);
    }
    if inner.starts_with('@') {
        let (_, mailbox) = inner.split_once(':').ok_or(ParamError::BadPath)?;
        inner = mailbox;
    }
    if inner.is_empty() {
        Ok((None, rest))
    } else {
        Ok((Some(inner.to_owned()), rest))
    }
}

/// Splits `KEY[=VALUE]` words; keys are upper-cased.
fn split_params(rest: &str) -> Result<Vec<(String, Option<String>)>, ParamError> {
    let mut out = Vec::new();
    for word in rest.split(' ').filter(|w| !w.is_empty()) {
        let (key, value) = match word.split_once('=') {
            Some((key, value)) => (key, Some(value.to_owned())),
            None => (word, None),
        };
        if key.is_empty() || !key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(ParamError::BadPath);
        }
        out.push((key.to_ascii_uppercase(), value));
    }
    Ok(out)
}

/// Checks `local@domain` syntax and the RFC 5321 length limits.
fn parse_mailbox(text: &str, smtputf8: bool) -> Result<Mailbox, ParamError> {
    if !smtputf8 && !text.is_ascii() {
        return Err(ParamError::NeedsSmtpUtf8);
    }
    let (local, domain) = text.rsplit_once('@').ok_or(ParamError::BadPath)?;
    if local.is_empty() || domain.is_empty() {
        return Err(ParamError::BadPath);
    }
    if local.len() > MAX_LOCAL_PART {
        return Err(ParamError::LocalPartTooLong);
    }
    if domain.len() > MAX_DOMAIN {
        return Err(ParamError::DomainTooLong);
    }
    if !valid_local_part(local) || !valid_domain(domain) {
        return Err(ParamError::BadPath);
    }
    Ok(Mailbox {
        local: local.to_owned(),
        domain: domain.to_owned(),
    })
}

fn valid_local_part(local: &str) -> bool {
    if let Some(quoted) = local.strip_prefix('"') {
        let Some(body) = quoted.strip_suffix('"') else {
            return false;
        };
        let mut chars = body.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' if !chars.next().is_some_and(|n| (' '..='~').contains(&n)) => return false,
                '\\' => {}
                '"' => return false,
                c if c.is_control() => return false,
                _ => {}
            }
        }
        return true;
    }
    // Dot-string: atoms separated by single dots.
    local.split('.').all(|atom| {
        !atom.is_empty()
            && atom.chars().all(|c| {
                c.is_ascii_alphanumeric()
                    || "!#$%&'*+-/=?^_`{|}~".contains(c)
                    || (!c.is_ascii() && !c.is_control())
            })
    })
}

fn valid_domain(domain: &str) -> bool {
    if let Some(literal) = domain.strip_prefix('[') {
        let Some(body) = literal.strip_suffix(']') else {
            return false;
        };
        if let Some(v6) = body.strip_prefix("IPv6:") {
            return v6.parse::<std::net::Ipv6Addr>().is_ok();
        }
        return body.parse::<std::net::Ipv4Addr>().is_ok();
    }
    domain.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label.chars().all(|c| {
                c.is_ascii_alphanumeric() || c == '-' || (!c.is_ascii() && !c.is_control())
            })
    })
}

/// Decodes RFC 3461 xtext (`+XX` hex escapes); `None` when malformed.
pub fn decode_xtext(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        let byte = bytes[index];
        if byte == b'+' {
            let hex = text.get(index + 1..index + 3)?;
            if !hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
            {
                return None;
            }
            out.push(u8::from_str_radix(hex, 16).ok()?);
            index += 3;
        } else if (b'!'..=b'~').contains(&byte) && byte != b'=' {
            out.push(byte);
            index += 1;
        } else {
            return None;
        }
    }
    String::from_utf8(out).ok()
}

/// Encodes text as RFC 3461 xtext.
pub fn encode_xtext(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if (b'!'..=b'~').contains(&byte) && byte != b'+' && byte != b'=' {
            out.push(byte as char);
        } else {
            out.push_str(&format!("+{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mail_with_every_parameter() {
        let (mailbox, params) =
            parse_mail("<a@example.org> SIZE=1000 BODY=8BITMIME RET=HDRS ENVID=QQ+2B1 SMTPUTF8")
                .unwrap();
        assert_eq!(mailbox.unwrap().address(), "a@example.org");
        assert_eq!(params.size, Some(1000));
        assert_eq!(params.body, Some(Body::EightBitMime));
        assert_eq!(params.ret, Some(Ret::Hdrs));
        assert_eq!(params.envid.as_deref(), Some("QQ+1"));
        assert!(params.smtputf8);
    }

    #[test]
    fn null_reverse_path_and_source_route() {
        assert_eq!(parse_mail("<>").unwrap().0, None);
        let (mailbox, _) = parse_rcpt("<@relay.example:b@example.org>", false).unwrap();
        assert_eq!(mailbox.address(), "b@example.org");
    }

    #[test]
    fn refusals() {
        assert_eq!(
            parse_mail("<a@b> FOO=1").unwrap_err(),
            ParamError::Unknown("FOO".into())
        );
        assert_eq!(
            parse_mail("<a@b> SIZE=x").unwrap_err(),
            ParamError::BadValue("SIZE".into())
        );
        assert_eq!(
            parse_mail("<a@b> SIZE=1 SIZE=2").unwrap_err(),
            ParamError::BadValue("SIZE".into())
        );
        assert_eq!(parse_mail("a@b").unwrap_err(), ParamError::BadPath);
        assert_eq!(parse_mail("<ü@b>").unwrap_err(), ParamError::NeedsSmtpUtf8);
        assert!(parse_mail("<ü@b> SMTPUTF8").is_ok());
        let long_local = format!("<{}@b>", "x".repeat(65));
        assert_eq!(
            parse_mail(&long_local).unwrap_err(),
            ParamError::LocalPartTooLong
        );
        let long_domain = format!("<a@{}>", ["abcdefghij"; 26].join("."));
        assert_eq!(
            parse_mail(&long_domain).unwrap_err(),
            ParamError::DomainTooLong
        );
        assert_eq!(
            parse_rcpt("<a@b> NOTIFY=NEVER,SUCCESS", false).unwrap_err(),
            ParamError::BadValue("NOTIFY".into())
        );
        assert_eq!(
            parse_rcpt("<a..b@c>", false).unwrap_err(),
            ParamError::BadPath
        );
    }

    #[test]
    fn rcpt_dsn_parameters() {
        let (_, params) = parse_rcpt(
            "<b@example.org> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b+40example.org",
            false,
        )
        .unwrap();
        assert_eq!(params.notify, Some(vec![Notify::Success, Notify::Failure]));
        assert_eq!(params.orcpt.as_deref(), Some("rfc822;b@example.org"));
        let (postmaster, _) = parse_rcpt("<Postmaster>", false).unwrap();
        assert_eq!(postmaster.local, "Postmaster");
        assert_eq!(postmaster.address(), "Postmaster");
        assert!(postmaster.is_postmaster());
        assert!(!parse_rcpt("<postmasters@x>", false)
            .unwrap()
            .0
            .is_postmaster());
    }

    #[test]
    fn configured_mailboxes_parse() {
        let mailbox = Mailbox::parse("ops@example.org").unwrap();
        assert_eq!(mailbox.address(), "ops@example.org");
        assert_eq!(Mailbox::parse("ops").unwrap_err(), ParamError::BadPath);
        assert_eq!(
            Mailbox::parse("<ops@example.org>").unwrap_err(),
            ParamError::BadPath
        );
    }

    #[test]
    fn xtext_round_trip() {
        let text = "a+b=c d";
        assert_eq!(decode_xtext(&encode_xtext(text)).as_deref(), Some(text));
    }
}
