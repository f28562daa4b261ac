//! The wire format of an entry in Redis (see [`crate::entry`] for its layout).

use bytes::{BufMut, Bytes, BytesMut};
use http::StatusCode;
use http::header::{HeaderMap, HeaderName, HeaderValue};

use super::{Entry, Lifetime};
use crate::vary::{VaryField, VaryRecord};

const MAGIC: u8 = 0xC0;
const VERSION: u8 = 0x02;
/// The previous format (no variant fields), still read so a rolling upgrade keeps its entries.
const VERSION_1: u8 = 0x01;
/// The fewest bytes one encoded header takes: its two lengths and a one-byte name.
const MIN_HEADER_BYTES: usize = 2 + 1 + 4;
/// The fewest bytes one encoded tag takes: its length.
const MIN_TAG_BYTES: usize = 2;

/// Where an encoded entry's [`Lifetime`] lies (`stored_at`, `fresh_until`, `swr_until`,
/// `sie_until`), in every version: bytes `LIFETIME_AT..LIFETIME_AT + LIFETIME_LEN`. A soft purge
/// rewrites those bytes in Redis, in place, if they are still what it read (see `l2/soft.rs`).
pub const LIFETIME_AT: usize = 4;
/// How many bytes an encoded [`Lifetime`] takes ([`Lifetime::to_wire`]).
pub const LIFETIME_LEN: usize = 32;

impl Lifetime {
    /// The lifetime as it is encoded in an entry, at [`LIFETIME_AT`].
    pub fn to_wire(&self) -> [u8; LIFETIME_LEN] {
        let mut out = [0; LIFETIME_LEN];
        let times = [
            self.stored_at,
            self.fresh_until,
            self.swr_until,
            self.sie_until,
        ];
        for (slot, time) in out.chunks_exact_mut(8).zip(times) {
            slot.copy_from_slice(&time.to_le_bytes());
        }
        out
    }
}

/// Why a stored value could not be decoded. Such a value is a miss.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("not a corral entry (bad magic byte)")]
    Foreign,
    #[error("entry format version {0} is not understood by this build")]
    Version(u8),
    #[error("entry is truncated or garbled")]
    Garbled,
}

impl Entry {
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(self.body.len() + 256);
        out.put_u8(MAGIC);
        out.put_u8(VERSION);
        out.put_u16_le(self.status.as_u16());
        out.put_u64_le(self.times.stored_at);
        out.put_u64_le(self.times.fresh_until);
        out.put_u64_le(self.times.swr_until);
        out.put_u64_le(self.times.sie_until);
        out.put_u32_le(self.fill_ms);
        let headers: Vec<_> = self
            .headers
            .iter()
            .filter(|(n, v)| {
                n.as_str().len() <= usize::from(u16::MAX) && v.len() <= u32::MAX as usize
            })
            .take(usize::from(u16::MAX))
            .collect();
        out.put_u16_le(headers.len() as u16);
        for (name, value) in headers {
            out.put_u16_le(name.as_str().len() as u16);
            out.put_slice(name.as_str().as_bytes());
            out.put_u32_le(value.len() as u32);
            out.put_slice(value.as_bytes());
        }
        let tags: Vec<_> = self
            .tags
            .iter()
            .filter(|t| t.len() <= usize::from(u16::MAX))
            .take(usize::from(u16::MAX))
            .collect();
        out.put_u16_le(tags.len() as u16);
        for tag in tags {
            out.put_u16_le(tag.len() as u16);
            out.put_slice(tag.as_bytes());
        }
        // Header names are short and values come from one request header: both fit their
        // prefixes; an entry varying on more than u16::MAX names does not exist.
        let vary = self.vary.fields();
        out.put_u16_le(vary.len().min(usize::from(u16::MAX)) as u16);
        for field in vary.iter().take(usize::from(u16::MAX)) {
            out.put_u16_le(field.name.as_str().len() as u16);
            out.put_slice(field.name.as_str().as_bytes());
            match &field.value {
                None => out.put_u8(0),
                Some(v) => {
                    out.put_u8(1);
                    out.put_u32_le(v.len() as u32);
                    out.put_slice(v.as_bytes());
                }
            }
        }
        out.put_slice(&self.body);
        out.freeze()
    }

    /// Decodes a stored value. The body is a zero-copy slice of `raw`.
    pub fn decode(raw: Bytes) -> Result<Entry, DecodeError> {
        let mut r = Reader { raw: &raw, pos: 0 };
        if r.u8()? != MAGIC {
            return Err(DecodeError::Foreign);
        }
        let version = r.u8()?;
        if version != VERSION && version != VERSION_1 {
            return Err(DecodeError::Version(version));
        }
        let status = StatusCode::from_u16(r.u16()?).map_err(|_| DecodeError::Garbled)?;
        let times = Lifetime {
            stored_at: r.u64()?,
            fresh_until: r.u64()?,
            swr_until: r.u64()?,
            sie_until: r.u64()?,
        };
        let fill_ms = r.u32()?;
        // Every count is bounded by the bytes actually present (a header takes at least
        // `MIN_HEADER_BYTES`, a tag `MIN_TAG_BYTES`), so a hostile count costs no allocation, and the
        // header map is filled with `try_` calls, so no count can make it panic.
        let n_headers = usize::from(r.u16()?);
        if n_headers > r.remaining() / MIN_HEADER_BYTES {
            return Err(DecodeError::Garbled);
        }
        // Room in the table for an answer's own fields (see `ANSWER_FIELDS`).
        let mut headers = HeaderMap::try_with_capacity(n_headers + super::ANSWER_FIELDS)
            .or_else(|_| HeaderMap::try_with_capacity(n_headers))
            .map_err(|_| DecodeError::Garbled)?;
        for _ in 0..n_headers {
            let name_len = usize::from(r.u16()?);
            let name =
                HeaderName::from_bytes(r.take(name_len)?).map_err(|_| DecodeError::Garbled)?;
            let value_len = r.u32()? as usize;
            let start = r.pos;
            r.take(value_len)?;
            let value = HeaderValue::from_maybe_shared(raw.slice(start..start + value_len))
                .map_err(|_| DecodeError::Garbled)?;
            headers
                .try_append(name, value)
                .map_err(|_| DecodeError::Garbled)?;
        }
        let n_tags = usize::from(r.u16()?);
        if n_tags > r.remaining() / MIN_TAG_BYTES {
            return Err(DecodeError::Garbled);
        }
        let mut tags = Vec::with_capacity(n_tags);
        for _ in 0..n_tags {
            let len = usize::from(r.u16()?);
            let tag = std::str::from_utf8(r.take(len)?).map_err(|_| DecodeError::Garbled)?;
            tags.push(tag.to_owned());
        }
        let mut vary = Vec::new();
        if version == VERSION {
            for _ in 0..r.u16()? {
                let len = usize::from(r.u16()?);
                let name =
                    HeaderName::from_bytes(r.take(len)?).map_err(|_| DecodeError::Garbled)?;
                let value = match r.u8()? {
                    0 => None,
                    1 => {
                        let len = r.u32()? as usize;
                        let text =
                            std::str::from_utf8(r.take(len)?).map_err(|_| DecodeError::Garbled)?;
                        Some(text.to_owned())
                    }
                    _ => return Err(DecodeError::Garbled),
                };
                vary.push(VaryField { name, value });
            }
        }
        let body = raw.slice(r.pos..);
        Ok(Entry {
            status,
            corral_only: crate::header_rules::holds_corral_only(&headers),
            // A copy: the table keeps its room, the fields' list is of their own size.
            headers: headers.clone(),
            body,
            times,
            fill_ms,
            tags,
            vary: VaryRecord::new(vary),
        })
    }
}

struct Reader<'a> {
    raw: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.raw.len().saturating_sub(self.pos)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.pos.checked_add(n).ok_or(DecodeError::Garbled)?;
        let slice = self.raw.get(self.pos..end).ok_or(DecodeError::Garbled)?;
        self.pos = end;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        self.take(N)?.try_into().map_err(|_| DecodeError::Garbled)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::tests::sample;

    #[test]
    fn encode_decode_round_trips() {
        let e = sample();
        assert_eq!(Entry::decode(e.encode()), Ok(e));
    }

    #[test]
    fn the_lifetime_lies_where_a_soft_purge_rewrites_it() {
        let mut e = sample();
        let encoded = e.encode();
        let at = LIFETIME_AT..LIFETIME_AT + LIFETIME_LEN;
        assert_eq!(&encoded[at.clone()], &e.times.to_wire());
        e.times.fresh_until = 9;
        let mut rewritten = encoded.to_vec();
        rewritten[at].copy_from_slice(&e.times.to_wire());
        assert_eq!(Entry::decode(rewritten.into()), Ok(e));
    }

    #[test]
    fn version_1_entries_decode_as_not_varying() {
        let mut e = sample();
        e.vary = VaryRecord::default();
        let v2 = e.encode();
        // Version 1 is version 2 without the (empty) vary count.
        let mut v1 = BytesMut::new();
        v1.put_u8(MAGIC);
        v1.put_u8(VERSION_1);
        let body_at = v2.len() - e.body.len();
        v1.put_slice(&v2[2..body_at - 2]);
        v1.put_slice(&e.body);
        assert_eq!(Entry::decode(v1.freeze()), Ok(e));
    }

    #[test]
    fn foreign_and_truncated_values_are_errors() {
        assert_eq!(
            Entry::decode(Bytes::from_static(b"hello")),
            Err(DecodeError::Foreign)
        );
        assert_eq!(
            Entry::decode(Bytes::from_static(&[MAGIC, 9])),
            Err(DecodeError::Version(9))
        );
        let full = sample().encode();
        for cut in 0..40 {
            assert!(Entry::decode(full.slice(..cut)).is_err(), "cut at {cut}");
        }
    }

    /// A value claiming more headers than its bytes can hold is garbled, whatever the count: the
    /// claim must not size an allocation, nor reach `HeaderMap`'s capacity limit (which panics).
    #[test]
    fn hostile_counts_are_bounded_by_the_bytes_present() {
        let mut head = sample().encode().slice(..40).to_vec();
        head.extend_from_slice(&u16::MAX.to_le_bytes());
        assert_eq!(Entry::decode(head.into()), Err(DecodeError::Garbled));

        // 40,000 real one-byte headers: more than a `HeaderMap` can hold.
        let mut many = sample().encode().slice(..40).to_vec();
        many.extend_from_slice(&40_000u16.to_le_bytes());
        for _ in 0..40_000 {
            many.extend_from_slice(&1u16.to_le_bytes());
            many.push(b'x');
            many.extend_from_slice(&0u32.to_le_bytes());
        }
        many.extend_from_slice(&0u16.to_le_bytes());
        assert_eq!(Entry::decode(many.into()), Err(DecodeError::Garbled));

        let mut tags = sample().encode().slice(..40).to_vec();
        tags.extend_from_slice(&0u16.to_le_bytes());
        tags.extend_from_slice(&u16::MAX.to_le_bytes());
        assert_eq!(Entry::decode(tags.into()), Err(DecodeError::Garbled));
    }
}
