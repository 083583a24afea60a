//! The envelope of one message as versioned JSON, kept in its message
//! file's seal (see [`super::message_file`]).
//!
//! The envelope is immutable once written; the seal that carries it commits
//! the message. Mutable delivery state lives elsewhere (DESIGN.md §2.5).

use serde::{Deserialize, Serialize};

use crate::smtp::params::{MailParams, Mailbox, RcptParams};

/// The version written by this build; readers refuse newer major versions.
pub const ENVELOPE_VERSION: u32 = 1;

/// Everything known about a message except its bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// Format version (`ENVELOPE_VERSION`).
    pub version: u32,
    /// Spool id, equal to the file stem.
    pub id: String,
    /// The cluster spool (unit of ownership) the message was accepted into;
    /// empty outside a cluster.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub spool: String,
    /// Reverse path; `None` is the null path `<>`.
    pub reverse_path: Option<Mailbox>,
    /// MAIL FROM parameters.
    pub mail_params: MailParams,
    /// Recipients in RCPT order.
    pub recipients: Vec<Recipient>,
    /// Where the message came from.
    pub client: ClientInfo,
    /// Listener name.
    pub listener: String,
    /// Arrival time, RFC 3339 UTC.
    pub received_at: String,
    /// Octets of data in the message file (from offset 0).
    pub data_len: u64,
    /// SHA-256 of the data, lower-case hex.
    pub data_sha256: String,
    /// Header lines (CRLF-terminated) that scanners added: prepended when
    /// the message goes out, so the data itself never changes.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub added_headers: String,
}

impl Envelope {
    /// Blocking: the envelope sealed into the message file at `path`; a
    /// file that is not sealed, or whose envelope is not one, is
    /// `InvalidData`; one that now holds another message (reused after its
    /// own finished) is `NotFound`.
    pub fn read(path: &std::path::Path) -> std::io::Result<Envelope> {
        let text = super::message_file::read_envelope_json(path)?;
        let envelope: Envelope = serde_json::from_slice(&text)
            .map_err(|err| std::io::Error::new(std::io::ErrorKind::InvalidData, err))?;
        // A message file finished and reused for another message since its
        // path was found is no longer this one: gone, as if unlinked.
        let named = path.file_name().and_then(|name| name.to_str());
        if let Some(id) = named.and_then(super::message_file::id_of) {
            if envelope.id != id {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("{} now holds message {}", path.display(), envelope.id),
                ));
            }
        }
        Ok(envelope)
    }

    /// Octets on the wire: the added headers plus the data.
    pub fn wire_len(&self) -> u64 {
        self.added_headers.len() as u64 + self.data_len
    }
}

#[cfg(test)]
impl Envelope {
    /// For unit tests: message `id` from a loopback client, with no sender,
    /// no recipients and no data; tests change what they need.
    pub fn for_tests(id: &str) -> Envelope {
        Envelope {
            version: ENVELOPE_VERSION,
            id: id.into(),
            spool: String::new(),
            reverse_path: None,
            mail_params: Default::default(),
            recipients: Vec::new(),
            client: ClientInfo {
                addr: "127.0.0.1:1".into(),
                helo: "test".into(),
                esmtp: true,
                tls: None,
                auth: None,
            },
            listener: "smtp".into(),
            received_at: "2026-01-01T00:00:00Z".into(),
            data_len: 0,
            data_sha256: String::new(),
            added_headers: String::new(),
        }
    }
}

/// One recipient and its DSN parameters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recipient {
    /// The forward path.
    pub address: Mailbox,
    /// RCPT parameters (NOTIFY, ORCPT).
    pub params: RcptParams,
}

/// Facts about the SMTP client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientInfo {
    /// Peer address (`ip:port`), or `unix` for a Unix socket.
    pub addr: String,
    /// EHLO/HELO argument.
    pub helo: String,
    /// Whether EHLO (not HELO) was used.
    pub esmtp: bool,
    /// TLS protocol and cipher when the session was encrypted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<String>,
    /// Authenticated identity, when any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<String>,
}
