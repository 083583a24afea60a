//! Spool ids: 26 characters of Crockford base32 over 48 bits of Unix
//! milliseconds and 80 random bits (the ULID layout), so ids sort by arrival
//! time, are unique across a cluster without coordination, and are safe as file
//! names and object keys.

use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// Length of a spool id in characters.
pub const ID_LEN: usize = 26;

/// Crockford's base32 alphabet: no I, L, O, U, so ids cannot be misread.
const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

const RANDOM_BITS: u32 = 80;
const RANDOM_MASK: u128 = (1 << RANDOM_BITS) - 1;
const TIME_MASK: u64 = (1 << 48) - 1;

/// Hands out ids that strictly increase within the generator.
///
/// Ids from one generator never repeat and never go backwards, even when the
/// clock does: within one millisecond (or after the clock stepped back) the
/// random part of the previous id is incremented instead of drawn anew.
#[derive(Debug, Default)]
pub struct IdGenerator {
    last: Mutex<Option<(u64, u128)>>,
}

impl IdGenerator {
    /// A generator with no history.
    pub fn new() -> IdGenerator {
        IdGenerator::default()
    }

    /// The next id, stamped with the current time.
    pub fn next_id(&self) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        self.next_at(now)
    }

    /// The next id for a clock reading of `millis`.
    fn next_at(&self, millis: u64) -> String {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let (time, random) = match *last {
            Some((prev_time, prev_random)) if millis <= prev_time => {
                if prev_random == RANDOM_MASK {
                    // The random part is exhausted for this millisecond; borrow
                    // the next one rather than repeat an id.
                    (prev_time + 1, rand::random::<u128>() & (RANDOM_MASK >> 1))
                } else {
                    (prev_time, prev_random + 1)
                }
            }
            _ => (millis, rand::random::<u128>() & RANDOM_MASK),
        };
        *last = Some((time, random));
        encode(time, random)
    }
}

/// Encodes the 128-bit value `time << 80 | random` as 26 base32 digits.
fn encode(time: u64, random: u128) -> String {
    let value = (u128::from(time & TIME_MASK) << RANDOM_BITS) | (random & RANDOM_MASK);
    let mut out = [0u8; ID_LEN];
    for (i, slot) in out.iter_mut().enumerate() {
        let shift = 5 * (ID_LEN - 1 - i);
        *slot = ALPHABET[((value >> shift) & 0x1f) as usize];
    }
    out.iter().map(|&b| b as char).collect()
}

/// How many values an id's last digit takes: the local spool spreads its
/// files over this many subdirectories by that digit.
pub const LAST_DIGITS: usize = ALPHABET.len();

/// The value (0..32) of `text`'s last base32 digit; 0 when it is not one.
/// Consecutive ids of one millisecond differ there by one, so a burst of
/// messages spreads evenly.
pub fn last_digit(text: &str) -> usize {
    text.bytes()
        .last()
        .and_then(|b| ALPHABET.iter().position(|&a| a == b))
        .unwrap_or(0)
}

/// The character of digit value `digit` (0..32).
pub fn digit_char(digit: usize) -> char {
    ALPHABET[digit % ALPHABET.len()] as char
}

/// Whether `text` has the shape of a spool id (so it may name a file or key).
pub fn is_valid(text: &str) -> bool {
    text.len() == ID_LEN
        && text.bytes().all(|b| ALPHABET.contains(&b))
        // 26 digits carry 130 bits; the top digit may only use 3 of its 5.
        && text.as_bytes()[0] <= b'7'
}

/// The Unix milliseconds an id was stamped with, when `text` is an id.
pub fn timestamp_millis(text: &str) -> Option<u64> {
    to_bits(text).map(|value| (value >> RANDOM_BITS) as u64)
}

/// The 128 bits `text` encodes, when it is an id: what the queue keeps in
/// memory instead of the 26 characters (they sort the same way).
pub fn to_bits(text: &str) -> Option<u128> {
    if !is_valid(text) {
        return None;
    }
    let mut value: u128 = 0;
    for b in text.bytes() {
        let digit = ALPHABET.iter().position(|&a| a == b)? as u128;
        value = (value << 5) | digit;
    }
    Some(value)
}

/// The id whose bits are `value` (the inverse of [`to_bits`]).
pub fn from_bits(value: u128) -> String {
    encode((value >> RANDOM_BITS) as u64, value & RANDOM_MASK)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn ids_sort_by_time_and_within_a_millisecond() {
        let ids = IdGenerator::new();
        let a = ids.next_at(1_000);
        let b = ids.next_at(1_000);
        let c = ids.next_at(1_001);
        assert!(a < b, "{a} < {b}");
        assert!(b < c, "{b} < {c}");
        assert_eq!(timestamp_millis(&a), Some(1_000));
        assert_eq!(timestamp_millis(&c), Some(1_001));
    }

    #[test]
    fn a_clock_stepping_back_does_not_reorder_ids() {
        let ids = IdGenerator::new();
        let a = ids.next_at(5_000);
        let b = ids.next_at(4_000);
        assert!(a < b, "{a} < {b}");
        assert_eq!(timestamp_millis(&b), Some(5_000));
    }

    #[test]
    fn an_exhausted_millisecond_moves_to_the_next() {
        let ids = IdGenerator::new();
        *ids.last.lock().unwrap() = Some((7, RANDOM_MASK));
        let next = ids.next_at(7);
        assert_eq!(timestamp_millis(&next), Some(8));
        assert!(encode(7, RANDOM_MASK) < next);
    }

    #[test]
    fn ids_are_unique_across_generators_and_threads() {
        let generators: Vec<IdGenerator> = (0..4).map(|_| IdGenerator::new()).collect();
        let all: Vec<String> = std::thread::scope(|s| {
            let handles: Vec<_> = generators
                .iter()
                .map(|g| s.spawn(move || (0..10_000).map(|_| g.next_id()).collect::<Vec<_>>()))
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap())
                .collect()
        });
        let unique: HashSet<&String> = all.iter().collect();
        assert_eq!(unique.len(), all.len());
    }

    #[test]
    fn ids_use_only_the_crockford_alphabet() {
        let ids = IdGenerator::new();
        for _ in 0..1_000 {
            let id = ids.next_id();
            assert_eq!(id.len(), ID_LEN);
            assert!(is_valid(&id), "{id}");
            assert!(id
                .bytes()
                .all(|b| b.is_ascii_digit() || b.is_ascii_uppercase()));
            assert!(!id.contains(['I', 'L', 'O', 'U']), "{id}");
        }
        assert_eq!(encode(0, 0), "0".repeat(ID_LEN));
        assert_eq!(
            encode(TIME_MASK, RANDOM_MASK),
            format!("7{}", "Z".repeat(ID_LEN - 1))
        );
    }

    #[test]
    fn a_burst_of_ids_spreads_over_every_last_digit() {
        let ids = IdGenerator::new();
        let mut seen = HashSet::new();
        for _ in 0..LAST_DIGITS {
            let id = ids.next_at(9_000);
            assert_eq!(digit_char(last_digit(&id)), id.chars().last().unwrap());
            seen.insert(last_digit(&id));
        }
        assert_eq!(seen.len(), LAST_DIGITS);
        assert_eq!(last_digit("not an id!"), 0);
    }

    #[test]
    fn bits_round_trip_and_sort_like_the_text() {
        let generator = IdGenerator::new();
        let ids: Vec<String> = (0..1000).map(|i| generator.next_at(i / 7)).collect();
        let bits: Vec<u128> = ids.iter().map(|id| to_bits(id).unwrap()).collect();
        for (id, value) in ids.iter().zip(&bits) {
            assert_eq!(&from_bits(*value), id);
        }
        assert!(bits.windows(2).all(|pair| pair[0] < pair[1]));
        assert_eq!(to_bits("not an id"), None);
    }

    #[test]
    fn non_ids_are_rejected() {
        assert!(!is_valid(""));
        assert!(!is_valid("../../etc/passwd"));
        assert!(!is_valid(&"0".repeat(ID_LEN - 1)));
        assert!(!is_valid(&format!("8{}", "0".repeat(ID_LEN - 1))));
        assert!(!is_valid(&"o".repeat(ID_LEN)));
    }
}
