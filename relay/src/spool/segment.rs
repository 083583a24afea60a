//! The layout of a segment object: many messages in one object, each
//! message's envelope and wire-format data contiguous, an index at the end.
//!
//! ```text
//! [envelope JSON][data] [envelope JSON][data] ... [index JSON][footer]
//! footer = index length (u64 LE) | SHA-256 of the index | "PSTNSEG1"
//! ```
//!
//! A reader fetches the footer and the index with one ranged GET of the
//! object's tail, then each message with ranged GETs. The index checksum
//! catches a damaged or truncated object; each message's data carries its
//! own SHA-256 in its envelope. Pure, so it is tested without a store.

use std::ops::Range;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Marks the end of a segment object.
pub const MAGIC: &[u8; 8] = b"PSTNSEG1";

/// Octets after the index: its length, its SHA-256, [`MAGIC`].
pub const FOOTER_LEN: u64 = 8 + 32 + 8;

/// Octets of an object's tail read first: the footer and, usually, the whole
/// index (about 100 octets per message).
pub const TAIL_READ: u64 = 64 * 1024;

/// Where one message lies in its segment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slot {
    /// The message's spool id.
    pub id: String,
    /// Offset and length of its envelope JSON.
    pub envelope: (u64, u64),
    /// Offset and length of its data.
    pub data: (u64, u64),
}

impl Slot {
    /// The envelope's byte range in the object.
    pub fn envelope_range(&self) -> Range<u64> {
        self.envelope.0..self.envelope.0 + self.envelope.1
    }

    /// The data's byte range in the object.
    pub fn data_range(&self) -> Range<u64> {
        self.data.0..self.data.0 + self.data.1
    }
}

#[derive(Serialize, Deserialize)]
struct Index {
    version: u32,
    messages: Vec<Slot>,
}

/// Why a segment's tail could not be read as an index.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum SegmentError {
    /// The object is shorter than a footer, or the footer has no magic.
    #[error("no segment footer")]
    NoFooter,
    /// The index is longer than the object.
    #[error("index of {index} octets does not fit an object of {size}")]
    BadLength {
        /// Index length the footer announces.
        index: u64,
        /// Size of the object.
        size: u64,
    },
    /// The tail read does not reach back to the start of the index.
    #[error("the index starts {0} octets before the tail read")]
    NeedMore(u64),
    /// The index does not match its checksum.
    #[error("index checksum mismatch")]
    Checksum,
    /// The index is not what this relay writes.
    #[error("unreadable index: {0}")]
    Unreadable(String),
}

/// Lays out messages given as (id, envelope length, data length): returns
/// their slots, in order, with the offsets they get in the object.
pub fn layout(messages: impl IntoIterator<Item = (String, u64, u64)>) -> Vec<Slot> {
    let mut offset = 0;
    messages
        .into_iter()
        .map(|(id, envelope_len, data_len)| {
            let slot = Slot {
                id,
                envelope: (offset, envelope_len),
                data: (offset + envelope_len, data_len),
            };
            offset += envelope_len + data_len;
            slot
        })
        .collect()
}

/// The index and footer that end a segment holding `slots`.
pub fn trailer(slots: &[Slot]) -> Vec<u8> {
    let index = serde_json::to_vec(&Index {
        version: 1,
        messages: slots.to_vec(),
    })
    .expect("an index serializes");
    let mut out = index.clone();
    out.extend_from_slice(&(index.len() as u64).to_le_bytes());
    out.extend_from_slice(&Sha256::digest(&index));
    out.extend_from_slice(MAGIC);
    out
}

/// Reads the index from `tail`, the last `tail.len()` octets of an object of
/// `size` octets. Every slot is checked to lie before the index.
pub fn parse_tail(tail: &[u8], size: u64) -> Result<Vec<Slot>, SegmentError> {
    let tail_len = tail.len() as u64;
    if tail_len < FOOTER_LEN || tail_len > size || !tail.ends_with(MAGIC) {
        return Err(SegmentError::NoFooter);
    }
    let footer = &tail[tail.len() - FOOTER_LEN as usize..];
    let index_len = u64::from_le_bytes(footer[..8].try_into().expect("8 octets"));
    if index_len > size - FOOTER_LEN {
        return Err(SegmentError::BadLength {
            index: index_len,
            size,
        });
    }
    if index_len > tail_len - FOOTER_LEN {
        return Err(SegmentError::NeedMore(index_len + FOOTER_LEN - tail_len));
    }
    let end = tail.len() - FOOTER_LEN as usize;
    let index = &tail[end - index_len as usize..end];
    if Sha256::digest(index)[..] != footer[8..40] {
        return Err(SegmentError::Checksum);
    }
    let index: Index =
        serde_json::from_slice(index).map_err(|e| SegmentError::Unreadable(e.to_string()))?;
    if index.version != 1 {
        return Err(SegmentError::Unreadable(format!(
            "version {}",
            index.version
        )));
    }
    let body = size - FOOTER_LEN - index_len;
    for slot in &index.messages {
        if slot.envelope_range().end > body
            || slot.data_range().end > body
            || !crate::spool::id::is_valid(&slot.id)
        {
            return Err(SegmentError::Unreadable(format!(
                "slot of {} lies outside the segment",
                slot.id
            )));
        }
    }
    Ok(index.messages)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u64) -> String {
        crate::spool::id::IdGenerator::new().next_id()[..20].to_owned() + &format!("{n:06}")
    }

    /// A whole segment of `messages` (envelope, data) as it is uploaded.
    fn segment(messages: &[(String, &[u8], &[u8])]) -> (Vec<u8>, Vec<Slot>) {
        let slots = layout(
            messages
                .iter()
                .map(|(id, env, data)| (id.clone(), env.len() as u64, data.len() as u64)),
        );
        let mut object = Vec::new();
        for (_, env, data) in messages {
            object.extend_from_slice(env);
            object.extend_from_slice(data);
        }
        object.extend_from_slice(&trailer(&slots));
        (object, slots)
    }

    #[test]
    fn a_segment_reads_back_every_message_from_its_slots() {
        let messages = [
            (
                id(1),
                &b"{\"a\":1}"[..],
                &b"Subject: one\r\n\r\nbody\r\n"[..],
            ),
            (id(2), &b"{}"[..], &b""[..]),
            (id(3), &b"{\"c\":3}"[..], &b"x\r\n"[..]),
        ];
        let (object, slots) = segment(&messages);
        let size = object.len() as u64;
        let parsed = parse_tail(&object, size).unwrap();
        assert_eq!(parsed, slots);
        for ((id, env, data), slot) in messages.iter().zip(&parsed) {
            assert_eq!(&slot.id, id);
            let r = slot.envelope_range();
            assert_eq!(&object[r.start as usize..r.end as usize], *env);
            let r = slot.data_range();
            assert_eq!(&object[r.start as usize..r.end as usize], *data);
        }
        // A tail that ends in the footer but starts inside the index asks for more.
        let short = &object[object.len() - FOOTER_LEN as usize - 3..];
        match parse_tail(short, size) {
            Err(SegmentError::NeedMore(more)) => assert!(more > 0),
            other => panic!("expected NeedMore, got {other:?}"),
        }
    }

    #[test]
    fn damaged_or_truncated_segments_are_refused() {
        let (object, _) = segment(&[(id(1), b"{}", b"data\r\n")]);
        let size = object.len() as u64;
        // A flipped byte in the index.
        let mut flipped = object.clone();
        let at = flipped.len() - FOOTER_LEN as usize - 5;
        flipped[at] ^= 0x20;
        assert_eq!(parse_tail(&flipped, size), Err(SegmentError::Checksum));
        // Truncated: the footer is gone.
        let cut = &object[..object.len() - 10];
        assert_eq!(
            parse_tail(cut, cut.len() as u64),
            Err(SegmentError::NoFooter)
        );
        // A footer announcing more index than the object holds.
        let mut long = object.clone();
        let at = long.len() - FOOTER_LEN as usize;
        long[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            parse_tail(&long, size),
            Err(SegmentError::BadLength { .. })
        ));
        // Not a segment at all.
        assert_eq!(parse_tail(b"short", 5), Err(SegmentError::NoFooter));
    }
}
