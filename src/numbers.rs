//! Header values that carry a number, read from static tables for the numbers a hit commonly
//! carries (its `Age`, and its `Cache-Status`'s `ttl`): formatting one would allocate on every
//! hit, where a table's value is a static slice.

use bytes::Bytes;
use http::HeaderValue;

/// The numbers the tables hold: `0..TABULATED` (ages and ttls under 2 h 46 min).
pub const TABULATED: u64 = 10_000;

/// The digits of every number in `0..TABULATED`, one after the other.
const DIGITS: usize = 10 + 90 * 2 + 900 * 3 + 9_000 * 4;

/// Every number in `0..TABULATED` after a fixed prefix, one value after the other
/// (`P0P1P2…P9999` for a prefix `P`), made at compile time.
pub struct Table<const LEN: usize> {
    bytes: [u8; LEN],
    prefix: usize,
}

impl<const LEN: usize> Table<LEN> {
    const fn new(prefix: &[u8]) -> Table<LEN> {
        assert!(LEN == prefix.len() * TABULATED as usize + DIGITS);
        let mut bytes = [0u8; LEN];
        let mut n = 0;
        while n < TABULATED as usize {
            let (start, len) = slot(n, prefix.len());
            let mut i = 0;
            while i < prefix.len() {
                bytes[start + i] = prefix[i];
                i += 1;
            }
            let (mut at, mut rest) = (start + len, n);
            while at > start + prefix.len() {
                at -= 1;
                bytes[at] = b'0' + (rest % 10) as u8;
                rest /= 10;
            }
            n += 1;
        }
        Table {
            bytes,
            prefix: prefix.len(),
        }
    }

    /// The value of `n` (the prefix and its digits), when the table holds it.
    pub fn value(&'static self, n: u64) -> Option<HeaderValue> {
        let n = usize::try_from(n)
            .ok()
            .filter(|&n| n < TABULATED as usize)?;
        let (start, len) = slot(n, self.prefix);
        let bytes = self.bytes.get(start..start + len)?;
        HeaderValue::from_maybe_shared(Bytes::from_static(bytes)).ok()
    }
}

/// Where `n`'s value starts in a table whose prefix is `prefix` bytes long, and its length.
const fn slot(n: usize, prefix: usize) -> (usize, usize) {
    let (digits_before, len) = match n {
        0..=9 => (n, 1),
        10..=99 => (10 + 2 * (n - 10), 2),
        100..=999 => (190 + 3 * (n - 100), 3),
        _ => (2_890 + 4 * (n - 1_000), 4),
    };
    (n * prefix + digits_before, prefix + len)
}

/// `Age` values.
pub static AGE: Table<DIGITS> = Table::new(b"");

/// A hit's `Cache-Status` up to its ttl's digits: the tabulated values' prefix, and what
/// `outcome` writes before a ttl past the table.
pub const HIT_TTL_PREFIX: &[u8] = b"corral; hit; ttl=";

/// A fresh hit's `Cache-Status` values, by its ttl.
pub static HIT_TTL: Table<{ HIT_TTL_PREFIX.len() * TABULATED as usize + DIGITS }> =
    Table::new(HIT_TTL_PREFIX);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_reads_as_its_prefix_and_number_and_nothing_past_the_table() {
        for n in 0..TABULATED {
            assert_eq!(AGE.value(n), Some(HeaderValue::from(n)), "{n}");
            let hit = HIT_TTL.value(n).map(|v| v.as_bytes().to_vec());
            assert_eq!(
                hit,
                Some(format!("corral; hit; ttl={n}").into_bytes()),
                "{n}"
            );
        }
        for n in [TABULATED, TABULATED + 1, u64::MAX] {
            assert!(AGE.value(n).is_none() && HIT_TTL.value(n).is_none(), "{n}");
        }
    }
}
